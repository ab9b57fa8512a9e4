"""The majority vote equals a brute-force recount in both modes, ties and long windows included."""

import math
import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fercache.errors import FercacheError
from fercache.framewise.pred_file import Predictions, VideoPredictions
from fercache.framewise.vote import majority_vote
from fercache.predictions.smooth import smooth_predictions

UNIT = 2**24


def brute_force_vote(
    labels: np.ndarray, probabilities: np.ndarray, window: int, mode: str, lengths: list[int]
) -> list[int]:
    """Recount every row's window from scratch, straight from the documented rules."""
    voted = []
    start = 0
    for length in lengths:
        for t in range(length):
            if mode == "centered":
                low, high = max(0, t - window // 2), min(length, t + window - window // 2)
            else:
                low = t // window * window
                high = min(length, low + window)
            rows = range(start + low, start + high)
            counts = Counter(int(labels[row]) for row in rows)
            top = max(counts.values())
            tied = [label for label, count in counts.items() if count == top]
            sums = {
                label: sum(math.floor(float(probabilities[r, label]) * UNIT + 0.5) for r in rows)
                for label in tied
            }
            voted.append(max(tied, key=lambda label: (sums[label], -label)))
        start += length
    return voted


@st.composite
def vote_inputs(draw):
    classes = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(0, 50), min_size=1, max_size=4))
    rows = sum(lengths)
    # Few distinct labels and coarse probabilities make count ties and sum ties common.
    labels = draw(st.lists(st.integers(0, min(classes, 3) - 1), min_size=rows, max_size=rows))
    grid = st.sampled_from([0.0, 0.25, 0.5, 1.0, 0.1, 0.3])
    probabilities = draw(st.lists(grid, min_size=rows * classes, max_size=rows * classes))
    window = draw(st.integers(1, 70))  # often longer than a video
    return (
        np.array(labels, dtype=np.int64),
        np.array(probabilities, dtype=np.float32).reshape(rows, classes),
        window,
        lengths,
    )


@pytest.mark.parametrize("mode", ["centered", "block"])
@settings(max_examples=150, deadline=None)
@given(inputs=vote_inputs())
def test_vote_equals_brute_force(mode, inputs):
    labels, probabilities, window, lengths = inputs
    voted = majority_vote(labels, probabilities, window, mode, np.array(lengths))
    assert voted.tolist() == brute_force_vote(labels, probabilities, window, mode, lengths)


def test_tie_goes_to_the_higher_summed_probability_then_the_lower_class():
    labels = np.array([2, 2, 5, 5])
    probabilities = np.zeros((4, 8), np.float32)
    probabilities[:, 5] = 0.4
    probabilities[:, 2] = 0.3
    assert majority_vote(labels, probabilities, 4, "block").tolist() == [5, 5, 5, 5]
    probabilities[:, 2] = 0.4
    assert majority_vote(labels, probabilities, 4, "block").tolist() == [2, 2, 2, 2]


def test_window_longer_than_the_video_votes_over_the_whole_video():
    labels = np.array([1, 3, 3, 1, 3])
    probabilities = np.full((5, 4), 0.25, np.float32)
    for mode in ("centered", "block"):
        assert majority_vote(labels, probabilities, 1000, mode).tolist() == [3] * 5


def test_votes_never_cross_a_video_boundary():
    labels = np.array([0, 0, 0, 0, 1, 0, 0])
    probabilities = np.full((7, 2), 0.5, np.float32)
    voted = majority_vote(labels, probabilities, 30, "centered", np.array([4, 1, 2]))
    assert voted.tolist() == [0, 0, 0, 0, 1, 0, 0]


def test_window_30_centred_edges_are_15_before_and_14_after():
    labels = np.zeros(60, np.int64)
    labels[45:] = 1  # 15 ones at the end
    voted = majority_vote(labels, np.full((60, 2), 0.5, np.float32), 30, "centered")
    # Row 31 sees rows 16..45 (one 1); row 44 sees rows 29..58: 14 ones, 16 zeros -> still 0.
    # Row 45 sees rows 30..59: 15 and 15, tied on counts and on sums -> the lower class, 0.
    # Row 46 sees rows 31..59 (29 rows, 15 ones) -> 1.
    assert voted[:46].tolist() == [0] * 46 and voted[46:].tolist() == [1] * 14


@pytest.mark.parametrize(
    ("labels", "window", "mode", "message"),
    [
        ([0, 1], 30, "median", "unknown vote mode 'median'"),
        ([0, 1], 0, "centered", "at least 1 frame"),
        ([0, 8], 30, "centered", "labels must lie in [0, 8)"),
    ],
)
def test_bad_vote_arguments_are_clear_errors(labels, window, mode, message):
    with pytest.raises(FercacheError, match=re.escape(message)):
        majority_vote(np.array(labels), np.full((2, 8), 0.125, np.float32), window, mode)


def test_smoothing_a_pred_file_votes_each_video_and_keeps_probabilities(tmp_path):
    rng = np.random.default_rng(0)
    videos = {}
    for name, length in (("a", 40), ("b", 7)):
        probabilities = rng.dirichlet(np.ones(8), size=length).astype(np.float32)
        videos[name] = VideoPredictions.from_probabilities(np.arange(1, length + 1), probabilities)
    Predictions("val", "test", videos).write(tmp_path / "raw.h5")

    smoothing = smooth_predictions(tmp_path / "raw.h5", tmp_path / "smooth.h5", 9, "block")

    smoothed = Predictions.read(tmp_path / "smooth.h5")
    assert smoothed.smoothing == ({"window": 9, "mode": "block"},) == smoothing.smoothing
    for name, rows in videos.items():
        expected = majority_vote(rows.labels, rows.probabilities, 9, "block")
        np.testing.assert_array_equal(smoothed.videos[name].labels, expected)
        np.testing.assert_array_equal(smoothed.videos[name].probabilities, rows.probabilities)


def test_numba_caches_in_a_user_folder_never_in_the_package(tmp_path):
    """A read-only site-packages (a container) must not make every vote recompile."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = (
        "import numpy as np, numba\n"
        "from fercache.framewise.vote import majority_vote\n"
        "majority_vote(np.zeros(5, np.int64), np.full((5, 8), 0.125, np.float32), 3, 'centered')\n"
        "print(numba.config.CACHE_DIR)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    env |= {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
    shown = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True)
    assert shown.stdout.strip() == str(tmp_path / "cache" / "fercache" / "numba"), shown.stderr
    assert any((tmp_path / "cache" / "fercache" / "numba").rglob("*.nbi"))

    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")  # the user's own choice wins
    shown = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True)
    assert shown.stdout.strip() == str(tmp_path / "mine"), shown.stderr

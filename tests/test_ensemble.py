"""Soft voting of PRED files, the `subsample` setting, and bagging (issue 8, part B)."""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fercache.cli import app
from fercache.errors import FercacheError
from fercache.framewise.pred_file import Predictions, VideoPredictions
from fercache.predictions.ensemble import ensemble, parse_weights
from fercache.predictions.evaluate import evaluate
from fercache.temporal.config import load_config
from fercache.temporal.loop import TrainRequest
from fercache.temporal.subsample import subsample_videos
from tests.train_data import TINY_TEMPORAL, TreeSpec, write_cache, write_tree

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def _predictions(seed: int, *, frames: int = 40, without: str = "") -> Predictions:
    """Two videos of random EXPR probabilities, AU probabilities and VA values (less one)."""
    rng = np.random.default_rng(seed)
    videos = {}
    for video in ("a", "b_left"):
        arrays = {
            "probabilities": rng.dirichlet(np.ones(8), frames),
            "au": rng.random((frames, 12)),
            "va": rng.uniform(-1, 1, (frames, 2)),
        }
        videos[video] = VideoPredictions.from_probabilities(
            np.arange(1, frames + 1),
            has_image=rng.random(frames) > 0.1,
            **{name: None if name == without else values for name, values in arrays.items()},
        )
    return Predictions(split="val", source=f"test model {seed}", videos=videos)


def _written(tmp_path: Path, name: str, predictions: Predictions) -> Path:
    return predictions.write(tmp_path / name)


# --- ensemble -------------------------------------------------------------------------------


def test_weighted_vote_averages_every_array_and_relabels_by_arg_max(tmp_path):
    inputs = [_predictions(seed) for seed in (1, 2)]
    paths = [_written(tmp_path, f"p{k}.h5", p) for k, p in enumerate(inputs)]

    result = ensemble(paths, tmp_path / "vote.h5", weights=[1, 3])

    voted = Predictions.read(tmp_path / "vote.h5")
    assert result.weights == (0.25, 0.75) and result.notes == ()
    assert voted.split == "val" and voted.smoothing == ()
    for video, rows in voted.videos.items():
        first, second = (p.videos[video] for p in inputs)
        for name in ("probabilities", "au", "va"):
            expected = 0.25 * getattr(first, name) + 0.75 * getattr(second, name)
            np.testing.assert_allclose(getattr(rows, name), expected, rtol=1e-6)
        np.testing.assert_array_equal(rows.labels, rows.probabilities.argmax(axis=1))
        np.testing.assert_array_equal(rows.has_image, first.has_image & second.has_image)
    for path, predictions in zip(paths, inputs, strict=True):
        assert str(path) in voted.source and predictions.source in voted.source


@pytest.mark.parametrize("missing", ["au", "probabilities"])
def test_an_array_only_some_inputs_carry_is_left_out_with_a_warning(tmp_path, missing):
    complete = _written(tmp_path, "all.h5", _predictions(1))
    partial = _written(tmp_path, "partial.h5", _predictions(2, without=missing))
    out = tmp_path / "vote.h5"

    result = runner.invoke(app, ["ensemble", str(complete), str(partial), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert f"'{missing}' is not in every input: left out" in result.stderr
    for rows in Predictions.read(out).videos.values():
        assert getattr(rows, missing) is None and rows.va is not None


def test_au_thresholds_are_kept_when_shared_and_reset_when_they_differ(tmp_path):
    tuned = tuple(float(value) for value in np.linspace(0.3, 0.7, 12))
    shared = [
        _written(tmp_path, f"tuned{k}.h5", replace(_predictions(k), au_thresholds=tuned))
        for k in (1, 2)
    ]
    assert ensemble(shared, tmp_path / "shared.h5").notes == ()
    assert Predictions.read(tmp_path / "shared.h5").au_thresholds == tuned

    untuned = _written(tmp_path, "untuned.h5", _predictions(3))
    result = ensemble([shared[0], untuned], tmp_path / "mixed.h5")
    assert Predictions.read(tmp_path / "mixed.h5").au_thresholds == (0.5,) * 12
    assert result.notes == (
        "the inputs' AU thresholds differ: the vote uses 0.5; tune them on the vote",
    )


def _other_split(predictions: Predictions) -> Predictions:
    return replace(predictions, split="train")


def _fewer_videos(predictions: Predictions) -> Predictions:
    return replace(predictions, videos={"a": predictions.videos["a"]})


def _shifted_frames(predictions: Predictions) -> Predictions:
    rows = predictions.videos["b_left"]
    shifted = replace(rows, frames=rows.frames + 1)
    return replace(predictions, videos={**predictions.videos, "b_left": shifted})


def _smoothed(predictions: Predictions) -> Predictions:
    labels = {video: rows.labels for video, rows in predictions.videos.items()}
    return predictions.with_labels(labels, {"window": 30, "mode": "centered"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_other_split, r"second\.h5 holds train predictions but .*first\.h5 holds val"),
        (_fewer_videos, r"second\.h5 lacks video\(s\) b_left \(compared with .*first\.h5\)"),
        (_shifted_frames, r"second\.h5: video 'b_left' has 40 frames that differ .*first\.h5"),
        (_smoothed, r"second\.h5: holds majority-voted labels .* then smooth the ensemble"),
    ],
)
def test_inputs_that_cannot_be_voted_together_are_refused_naming_the_files(
    tmp_path, change, message
):
    first = _written(tmp_path, "first.h5", _predictions(1))
    second = _written(tmp_path, "second.h5", change(_predictions(2)))
    with pytest.raises(FercacheError, match=message):
        ensemble([first, second], tmp_path / "vote.h5")
    assert not (tmp_path / "vote.h5").exists()


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("1", "gives 1 weights for 2 PRED files"),
        ("1,-1", "must be finite, non-negative"),
        ("0,0", "not all zero"),
        ("1,x", "give one number per PRED file"),
    ],
)
def test_bad_weights_are_clean_cli_errors(tmp_path, weights, message):
    paths = [str(_written(tmp_path, f"p{k}.h5", _predictions(k))) for k in (1, 2)]
    result = runner.invoke(
        app, ["ensemble", *paths, "--out", str(tmp_path / "v.h5"), "--weights", weights]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in result.stderr


def test_one_input_or_a_missing_file_is_refused(tmp_path):
    only = _written(tmp_path, "only.h5", _predictions(1))
    with pytest.raises(FercacheError, match="at least two PRED files"):
        ensemble([only], tmp_path / "v.h5")
    with pytest.raises(FercacheError, match=r"missing\.h5: no such predictions file"):
        ensemble([only, tmp_path / "missing.h5"], tmp_path / "v.h5")
    assert parse_weights(None) is None and parse_weights("1,2.5") == [1.0, 2.5]


# --- subsample and bagging ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """Ten training and two validation videos with a 16-dim cache."""
    root = tmp_path_factory.mktemp("bagging")
    labels = write_tree(root / "data", TreeSpec(train_videos=10, val_videos=2, frames=120))
    write_cache(root / "cache", root / "data", labels)
    return {"data": root / "data", "cache": root / "cache"}


@dataclass(frozen=True)
class Split:
    """What `subsample_videos` reads of the trainer's split: its videos, in order."""

    videos: list[str]


def test_subsample_draws_a_seeded_fraction_of_the_training_videos():
    split = Split([f"train{number:02d}" for number in range(10)])
    drawn = {seed: subsample_videos(split, 0.3, seed).videos for seed in range(6)}

    assert all(len(videos) == 3 for videos in drawn.values())
    assert all(videos == sorted(videos) for videos in drawn.values())  # order kept
    assert all(set(videos) <= set(split.videos) for videos in drawn.values())
    assert subsample_videos(split, 0.3, 4).videos == drawn[4]  # the seed alone decides
    assert len({tuple(videos) for videos in drawn.values()}) > 1
    assert len(subsample_videos(split, 0.01, 0).videos) == 1  # never empty
    assert subsample_videos(split, 1.0, 0) is split
    for bad in ("subsample=0", "subsample=1.5"):
        with pytest.raises(FercacheError, match=r"subsample must lie in \(0, 1\]"):
            load_config(None, [bad])


@pytest.fixture(scope="module")
def bagged(tree, tmp_path_factory) -> dict:
    """`fercache train --bagging 3 --subsample 0.5`, one epoch per bag."""
    out = tmp_path_factory.mktemp("bagged") / "bags"
    result = runner.invoke(
        app,
        [
            *("train", str(tree["cache"]), "--data", str(tree["data"]), "--out", str(out)),
            *("--bagging", "3", "--subsample", "0.5", "--epochs", "1", "--seed", "5"),
            *(item for setting in TINY_TEMPORAL for item in ("--set", setting)),
            *("--device", "cpu", "--no-progress"),
        ],
    )
    assert result.exit_code == 0, result.output
    return {**tree, "out": out, "output": result.output}


def test_bagging_trains_three_distinct_models_and_evaluates_their_vote(bagged):
    out = bagged["out"]
    summary = json.loads((out / "bagging.json").read_text())
    bag_dirs = [out / f"bag-{k}" for k in range(3)]

    # Three models: seeds 5, 6, 7, each on half of the ten training videos, distinct weights.
    assert [bag["seed"] for bag in summary["bags"]] == [5, 6, 7]
    assert all(bag["train_videos"] == 5 for bag in summary["bags"])
    assert summary["subsample"] == 0.5
    weights = [load_file(bag_dir / "best.safetensors") for bag_dir in bag_dirs]
    for first in range(3):
        for second in range(first + 1, 3):
            assert any(
                not torch.equal(weights[first][name], weights[second][name])
                for name in weights[first]
            )

    # The vote is the mean of the three bags' validation probabilities, and it is evaluated.
    bags = [Predictions.read(bag_dir / "val.h5") for bag_dir in bag_dirs]
    voted = Predictions.read(out / "ensemble-val.h5")
    assert set(voted.videos) == {"val00", "val01"}
    for video, rows in voted.videos.items():
        mean = np.mean([bag.videos[video].probabilities for bag in bags], axis=0)
        np.testing.assert_allclose(rows.probabilities, mean, rtol=1e-6)
    report = json.loads((out / "ensemble-val.json").read_text())
    assert report["expr_f1"] == pytest.approx(
        evaluate(out / "ensemble-val.h5", bagged["data"], "val")["expr_f1"]
    )
    assert summary["ensemble"]["expr_f1"] == report["expr_f1"]
    for bag, bag_dir in zip(summary["bags"], bag_dirs, strict=True):
        assert bag["expr_f1"] == json.loads((bag_dir / "val.json").read_text())["expr_f1"]
    assert "soft vote" in bagged["output"] and "bag-2" in bagged["output"]


def test_two_runs_predictions_vote_to_the_mean_of_their_probabilities(bagged, tmp_path):
    first, second = (bagged["out"] / f"bag-{k}" / "val.h5" for k in (0, 1))
    out = tmp_path / "two.h5"

    result = runner.invoke(app, ["ensemble", str(first), str(second), "--out", str(out)])

    assert result.exit_code == 0, result.output
    runs = [Predictions.read(path) for path in (first, second)]
    voted = Predictions.read(out)
    for video, rows in voted.videos.items():
        mean = (runs[0].videos[video].probabilities + runs[1].videos[video].probabilities) / 2
        np.testing.assert_allclose(rows.probabilities, mean, rtol=1e-6)
        np.testing.assert_array_equal(rows.labels, mean.argmax(axis=1))
    assert 0 <= evaluate(out, bagged["data"], "val")["expr_f1"] <= 1


def test_rerun_bagging_reuses_finished_bags_and_refuses_changed_settings(bagged, tmp_path):
    from fercache.experiments.bagging import train_bagged

    out = bagged["out"]
    before = (out / "bag-1" / "best.safetensors").stat().st_mtime_ns
    request = TrainRequest(
        overrides=(*TINY_TEMPORAL, "subsample=0.5"), epochs=1, seed=5, device="cpu", progress=False
    )
    again = train_bagged([bagged["cache"]], bagged["data"], out, request, 3)
    assert (out / "bag-1" / "best.safetensors").stat().st_mtime_ns == before
    assert [bag["best_val_f1"] for bag in again["bags"]] == [
        json.loads((out / f"bag-{k}" / "summary.json").read_text())["best_val_f1"] for k in range(3)
    ]
    changed = replace(request, overrides=(*TINY_TEMPORAL, "subsample=0.3"))
    with pytest.raises(FercacheError, match=r"subsample 0\.5 -> 0\.3"):
        train_bagged([bagged["cache"]], bagged["data"], out, changed, 3)
    with pytest.raises(FercacheError, match="bagging needs at least 2 models"):
        train_bagged([bagged["cache"]], bagged["data"], tmp_path / "x", request, 1)

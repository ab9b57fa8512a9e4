"""Sliding-window majority vote over per-frame labels: Yu et al.'s post-processing.

`majority_vote(labels, probabilities, window, mode, lengths)` is a plain function on numpy
arrays, used by the `smooth` stage (`fercache.predictions.smooth`, on PRED files) and by training
(to score the voted validation labels).

Rules (rows are consecutive frames of one video; `lengths` splits a concatenation into videos
and no window ever crosses from one video into the next; a PRED file's rows are the frames that
need a prediction, which for annotations and organisers' lists are consecutive frames):

- `centered`: row t votes over rows t - window//2 ... t + (window - 1) - window//2 (for window
  30: 15 before, itself, 14 after; for 31: 15 and 15), clipped to its video. Near the edges the
  window is shorter, never padded; a window longer than the video covers the whole video.
- `block`: windows tile each video from its first row: rows [0, w), [w, 2w), ...; the last
  block is whatever remains (shorter). Every row takes its block's most frequent label (the
  paper's literal wording).
- Ties: among the labels with the highest count, the one with the highest summed probability
  of its class over the window's rows wins; if those sums are equal too, the lowest class index.
  Probabilities are summed as integers in units of 2**-24 (each value rounded to that unit), so
  the result is exact and does not depend on summation order.

The centred vote keeps a running histogram (each step adds the row entering the window and
removes the row leaving it) plus a histogram of its counts, so the highest count, whether it is
tied and, mostly, which class holds it are known in O(1) per row; it computes the probability
sums only where a tie needs them, sliding them along from the last tie: O(rows x classes) in
the worst case, close to O(rows) on real output. The block vote counts each block once.
"""

import os
from pathlib import Path

import numba
import numpy as np

from fercache.errors import FercacheError

# numba caches compiled functions beside the module unless told otherwise: inside the installed
# package, where a read-only site-packages (a container) would make every vote recompile. A
# user cache folder instead; a NUMBA_CACHE_DIR the user set wins.
if not numba.config.CACHE_DIR:
    _user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    numba.config.CACHE_DIR = str(_user_cache / "fercache" / "numba")

MODES = ("centered", "block")
PROBABILITY_UNITS = float(2**24)  # tie sums are exact integers in units of 2**-24


def majority_vote(
    labels: np.ndarray,
    probabilities: np.ndarray,
    window: int,
    mode: str = "centered",
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """Majority-voted labels (int64, same length as `labels`); see the module doc for the rules.

    `labels`: (N,) class indices in [0, C); `probabilities`: (N, C) non-negative scores used
    only to break ties; `lengths`: rows per video (sums to N), None for one video.
    """
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
    lengths = np.array([len(labels)] if lengths is None else lengths, dtype=np.int64)
    _check_vote_inputs(labels, probabilities, window, mode, lengths)
    voted = np.empty_like(labels)
    if mode == "centered":
        _centered_vote(labels, probabilities, lengths, window, voted)
    else:
        _block_vote(labels, probabilities, lengths, window, voted)
    return voted


def _check_vote_inputs(
    labels: np.ndarray, probabilities: np.ndarray, window: int, mode: str, lengths: np.ndarray
) -> None:
    if mode not in MODES:
        raise FercacheError(f"unknown vote mode '{mode}': choose one of {', '.join(MODES)}")
    if window < 1:
        raise FercacheError(f"the vote window must be at least 1 frame, not {window}")
    if probabilities.ndim != 2 or len(probabilities) != len(labels):
        raise FercacheError(
            f"probabilities must be (frames, classes) = ({len(labels)}, C), "
            f"not {probabilities.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= probabilities.shape[1]):
        raise FercacheError(
            f"labels must lie in [0, {probabilities.shape[1]}); found "
            f"{labels.min()}..{labels.max()}"
        )
    if lengths.sum() != len(labels) or (lengths < 0).any():
        raise FercacheError(f"video lengths sum to {lengths.sum()}, not {len(labels)} frames")


@numba.njit(cache=True, inline="always")
def _add_probabilities(row, sign, probabilities, sums):
    for c in range(probabilities.shape[1]):
        sums[c] += sign * np.int64(probabilities[row, c] * PROBABILITY_UNITS + 0.5)


@numba.njit(cache=True, inline="always")
def _most_frequent(counts) -> tuple[int, bool]:
    """The lowest class with the highest count, and whether another class has that count."""
    best = 0
    tied = False
    for c in range(1, counts.shape[0]):
        if counts[c] > counts[best]:
            best = c
            tied = False
        elif counts[c] == counts[best]:
            tied = True
    return best, tied


@numba.njit(cache=True, inline="always")
def _break_tie(counts, sums, best) -> int:
    for c in range(best + 1, sums.shape[0]):
        if counts[c] == counts[best] and sums[c] > sums[best]:
            best = c
    return best


@numba.njit(cache=True, inline="always")
def _shift(label, delta, counts, histogram_of_counts):
    """Add `delta` to the count of `label`, keeping the histogram of counts; the new count."""
    histogram_of_counts[counts[label]] -= 1
    counts[label] += delta
    histogram_of_counts[counts[label]] += 1
    return counts[label]


@numba.njit(cache=True)
def _centered_vote(labels, probabilities, lengths, window, voted):
    # One thread on purpose: numba's parallel (OpenMP) layer perturbs torch's own OpenMP pool
    # and broke the trainer's bit-for-bit reproducibility, which calls this vote every epoch.
    start = 0
    for length in lengths:
        _centered_video(labels, probabilities, start, start + length, window, voted)
        start += length


@numba.njit(cache=True)
def _centered_video(labels, probabilities, start, end, window, voted):
    # Per video: `counts` per class, `of_count[k]` = classes counted k times, `top` = highest
    # count. A row is a tie exactly when of_count[top] > 1; otherwise `best` is the one class
    # at `top`, found again by a scan only when the update moved it elsewhere. So a row costs
    # O(1) except at ties and after them.
    # Probability sums are only needed at ties, so they are brought up to date lazily: slid
    # from the row where they were last valid, or recounted when that row is more than a window
    # back. Each row enters and leaves them at most once per direction, which keeps the whole
    # vote O(rows x classes) even when every row is a tie.
    classes = probabilities.shape[1]
    before = window // 2
    after = window - 1 - before
    counts = np.zeros(classes, np.int64)
    of_count = np.zeros(min(window, end - start) + 2, np.int64)
    of_count[0] = classes
    top = 0
    for row in range(start, min(end, start + after + 1)):
        top = max(top, _shift(labels[row], 1, counts, of_count))
    sums = np.zeros(classes, np.int64)
    sums_row = start - window - 1  # the row whose window `sums` covers; far away: stale
    best = 0
    for row in range(start, end):
        if of_count[top] > 1:
            best = _most_frequent(counts)[0]
            if row - sums_row > window:
                sums[:] = 0
                for inside in range(max(start, row - before), min(end, row + after + 1)):
                    _add_probabilities(inside, 1, probabilities, sums)
            else:
                for passed in range(sums_row, row):
                    _slide_probabilities(passed, start, end, before, after, probabilities, sums)
            sums_row = row
            voted[row] = _break_tie(counts, sums, best)
        else:
            if counts[best] != top:
                best = _most_frequent(counts)[0]
            voted[row] = best
        entering = labels[row + after + 1] if row + after + 1 < end else -1
        leaving = labels[row - before] if row - before >= start else -1
        if entering == leaving:  # the window's counts do not change: common on real output
            continue
        if entering >= 0 and _shift(entering, 1, counts, of_count) > top:
            top += 1
            best = entering
        if leaving >= 0:
            _shift(leaving, -1, counts, of_count)
            if of_count[top] == 0:
                top -= 1


@numba.njit(cache=True, inline="always")
def _slide_probabilities(row, start, end, before, after, probabilities, sums):
    """Move `sums` from the window of `row` to the window of `row + 1`."""
    if row + after + 1 < end:
        _add_probabilities(row + after + 1, 1, probabilities, sums)
    if row - before >= start:
        _add_probabilities(row - before, -1, probabilities, sums)


@numba.njit(cache=True)
def _block_vote(labels, probabilities, lengths, window, voted):
    classes = probabilities.shape[1]
    counts = np.zeros(classes, np.int64)
    sums = np.zeros(classes, np.int64)
    start = 0
    for length in lengths:
        end = start + length
        for block in range(start, end, window):
            block_end = min(block + window, end)
            counts[:] = 0
            for row in range(block, block_end):
                counts[labels[row]] += 1
            best, tied = _most_frequent(counts)
            if tied:
                sums[:] = 0
                for row in range(block, block_end):
                    _add_probabilities(row, 1, probabilities, sums)
                best = _break_tie(counts, sums, best)
            voted[block:block_end] = best
        start = end

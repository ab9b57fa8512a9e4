"""Majority vote at Aff-Wild2 scale: the numba vote against the peers' ways and the memory limit.

    python benchmarks/smooth.py [--frames 2700000] [--window 30] [--subset 100000]

Labels are a noisy per-frame classifier's arg-max over segment-structured videos (about 550
videos of about 4,900 frames, 8 classes). Timed in one run, best of `--repeats`:
- the numba vote (`fercache.framewise.vote.majority_vote`), centred and block, on all frames;
- `np.copy` of the label array: the memory-bound limit;
- a plain Python loop with a `collections.Counter` per frame, and
  `scipy.ndimage.generic_filter` with a mode function (only when scipy is importable): both
  are timed on the first `--subset` frames and scaled linearly to all frames (both are
  per-frame work, so the cost is linear); the output says so.
Goals (issue 5): >= 300x the Python loop, >= 150x scipy, <= 10x np.copy.
"""

import argparse
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from fercache.framewise.vote import majority_vote

CLASSES = 8


def make_predictions(frames: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels int64, probabilities float32 (N, 8), video lengths) of a noisy classifier."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1_000, 8_800, size=frames // 4_000 + 1)
    lengths = lengths[np.cumsum(lengths) < frames]
    lengths = np.append(lengths, frames - lengths.sum())
    segments = rng.integers(10, 300, size=frames // 10 + 1)
    truth = np.repeat(rng.integers(0, CLASSES, size=len(segments)), segments)[:frames]
    logits = rng.normal(size=(frames, CLASSES)).astype(np.float32)
    logits[np.arange(frames), truth] += 1.5
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return probabilities.argmax(axis=1).astype(np.int64), probabilities, lengths


def best_time(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def counter_vote(labels: list[int], window: int) -> list[int]:
    """The peers' way: recount a Counter over each frame's centred window."""
    before, after = window // 2, window - 1 - window // 2
    return [
        Counter(labels[max(0, t - before) : t + after + 1]).most_common(1)[0][0]
        for t in range(len(labels))
    ]


def scipy_vote(labels: np.ndarray, window: int) -> np.ndarray | None:
    try:
        from scipy.ndimage import generic_filter
    except ImportError:
        return None
    return generic_filter(
        labels,
        lambda values: np.bincount(values.astype(np.int64), minlength=CLASSES).argmax(),
        size=window,
        mode="nearest",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=2_700_000)
    parser.add_argument("--window", type=int, default=30)
    parser.add_argument("--subset", type=int, default=100_000, help="frames for the slow ways")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    labels, probabilities, lengths = make_predictions(args.frames, args.seed)
    majority_vote(labels[:1000], probabilities[:1000], args.window)  # compile / load the cache
    print(f"{args.frames:,} frames in {len(lengths)} videos, window {args.window}")

    timings = {
        "numba vote, centered": best_time(
            lambda: majority_vote(labels, probabilities, args.window, "centered", lengths),
            args.repeats,
        ),
        "numba vote, block": best_time(
            lambda: majority_vote(labels, probabilities, args.window, "block", lengths),
            args.repeats,
        ),
        "np.copy of the labels": best_time(lambda: np.copy(labels), args.repeats * 4),
    }
    scale = args.frames / args.subset
    subset_list = labels[: args.subset].tolist()
    counter = best_time(lambda: counter_vote(subset_list, args.window), 1)
    timings[f"Python Counter loop (scaled from {args.subset:,})"] = counter * scale
    scipy_seconds = best_time(lambda: scipy_vote(labels[: args.subset], args.window), 1)
    if scipy_vote(labels[:10], args.window) is not None:
        timings[f"scipy generic_filter (scaled from {args.subset:,})"] = scipy_seconds * scale

    vote = timings["numba vote, centered"]
    for name, seconds in timings.items():
        print(f"  {name:<45} {seconds * 1e3:>10.1f} ms   {seconds / vote:>8.2f}x the vote")
    copy = timings["np.copy of the labels"]
    print(
        f"vote vs Python loop: {counter * scale / vote:,.0f}x faster (goal >= 300x); "
        f"vote / np.copy: {vote / copy:.1f}x (goal <= 10x)"
    )
    if len(timings) == 5:
        print(f"vote vs scipy generic_filter: {scipy_seconds * scale / vote:,.0f}x (goal >= 150x)")


if __name__ == "__main__":
    main()

"""Seeds and random processes of the generator.

Every random draw comes from a generator seeded by (seed, stream, index), so each video, pool
image and identity can be drawn alone, in any process, in any order, and give the same result.
"""

import math
from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """Independent random streams: every result depends only on (seed, stream, index)."""

    PLAN = 0
    IDENTITY = 1
    VIDEO = 2
    LABELLED = 3
    UNLABELLED = 4
    BACKGROUNDS = 5


def stream_rng(seed: int, stream: Stream, index: int = 0) -> np.random.Generator:
    """The generator of item `index` of `stream`."""
    return np.random.default_rng(np.random.SeedSequence([seed, int(stream), index]))


def ar1(rng: np.random.Generator, frames: int, sd: float, tau: float) -> np.ndarray:
    """A stationary AR(1) process with standard deviation `sd` and time constant `tau`."""
    keep = math.exp(-1 / tau)
    shocks = rng.normal(0.0, sd * math.sqrt(1 - keep**2), frames)
    values = np.empty(frames)
    value = rng.normal(0.0, sd)
    for t in range(frames):
        value = keep * value + shocks[t]
        values[t] = value
    return values


def random_stretches(
    rng: np.random.Generator, frames: int, count: int, shortest: int, longest: int
) -> list[tuple[int, int]]:
    """`count` random (start, length) stretches inside [0, frames); they may overlap."""
    result = []
    for _ in range(count):
        length = min(int(rng.integers(shortest, longest + 1)), frames)
        result.append((int(rng.integers(frames - length + 1)), length))
    return result

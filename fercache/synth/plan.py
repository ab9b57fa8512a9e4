"""What to generate and the plan of every video: names, splits, identities, label segments.

The plan is cheap and made in one process: `plan_videos` deals label segments to videos so that
each split holds every class in Aff-Wild2's frame shares; the frames themselves are drawn later,
video by video (`timeline.simulate_video`).
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from fercache.data.layout import SPLIT_FOLDERS
from fercache.data.tasks import EXPR, EXPR_CLASSES
from fercache.errors import FercacheError
from fercache.synth.face import N_VARIANTS
from fercache.synth.streams import Stream, stream_rng

N_CLASSES = len(EXPR_CLASSES)

# Frame shares of the classes in Aff-Wild2's EXPR set.
VIDEO_CLASS_SHARES = np.array([0.30, 0.03, 0.02, 0.017, 0.16, 0.13, 0.053, 0.29])
MIN_SEGMENTS_PER_CLASS = 2  # per split: macro-F1 over all 8 classes is defined on tiny trees
MIN_POOL_IMAGES_PER_CLASS = 5
_SEGMENT_SPREAD = 0.7  # sigma of the lognormal segment length
_LONGEST_SEGMENT = 300
_MAX_FRAMES = 50_000  # mean frames; the longest video must fit five-digit frame names


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. `workers` changes only the speed, never the output."""

    videos: int = 24  # annotation names; the _left/_right pair counts as two
    frames: int = 500  # mean frames per video; lengths vary 0.6x..1.4x
    seed: int = 0
    val_fraction: float = 0.33  # share of videos (and so identities) in Validation_Set
    labelled_pool: int = 2000
    unlabelled_pool: int = 4000
    workers: int = 0  # 0 = every core; 1 = in this process

    def validate(self) -> None:
        """Raise FercacheError naming the option to fix."""
        least_labelled = N_CLASSES * MIN_POOL_IMAGES_PER_CLASS
        problems = [
            (self.videos >= 4, f"--videos must be at least 4 (got {self.videos})"),
            (
                64 <= self.frames <= _MAX_FRAMES,
                f"--frames must be between 64 and {_MAX_FRAMES} (got {self.frames})",
            ),
            (self.seed >= 0, f"--seed must be 0 or more (got {self.seed})"),
            (
                0 < self.val_fraction < 1,
                f"val_fraction must lie strictly between 0 and 1 (got {self.val_fraction})",
            ),
            (
                least_labelled <= self.labelled_pool <= 999_999,
                f"--labelled must be between {least_labelled} (a few images of every class) "
                f"and 999999 (got {self.labelled_pool})",
            ),
            (
                1 <= self.unlabelled_pool <= 999_999,
                f"--unlabelled must be between 1 and 999999 (got {self.unlabelled_pool})",
            ),
            (self.workers >= 0, f"--workers must be 0 (every core) or more (got {self.workers})"),
        ]
        for ok, message in problems:
            if not ok:
                raise FercacheError(message)

    def recorded(self) -> dict:
        """The fields that determine the output (all but `workers`), for synth.json."""
        return {key: value for key, value in asdict(self).items() if key != "workers"}


@dataclass(frozen=True)
class Segment:
    """A stretch of one expression. `label` is what the EXPR file says: the class, or -1."""

    label: int
    expression: int  # the class drawn (the same as label unless label is -1)
    length: int
    apex: float  # peak intensity
    variant: int  # see face.expression_geometry


@dataclass(frozen=True)
class VideoPlan:
    """One annotation name: its subject, split and label segments."""

    index: int
    name: str
    split: str  # "train" or "val"
    identity: int
    segments: tuple[Segment, ...]
    trailing_without_image: int  # last frames with a label but no image

    @property
    def frames(self) -> int:
        return sum(segment.length for segment in self.segments)


def plan_videos(config: SynthConfig) -> list[VideoPlan]:
    """Every video of the tree; video i shows identity i and is seeded by (seed, VIDEO, i)."""
    rng = stream_rng(config.seed, Stream.PLAN)
    names, pair = _video_names(rng, config.videos)
    splits = _assign_splits(rng, names, pair, config.val_fraction)
    targets = np.round(config.frames * rng.uniform(0.6, 1.4, len(names))).astype(int)
    targets[names.index(pair[1])] = targets[names.index(pair[0])]
    median = min(60.0, config.frames / 5)
    segments: dict[str, list[Segment]] = {}
    for split in SPLIT_FOLDERS:
        members = [name for name in names if splits[name] == split]
        room = {name: int(targets[names.index(name)]) for name in members}
        segments.update(_deal(_split_segments(rng, sum(room.values()), median), room))
    for name in names:
        segments[name] = _insert_expr_invalid(rng, segments[name], median)
    _equalise_pair(segments, pair)
    trailing = dict.fromkeys(names, 0)
    for name in rng.choice(names, size=max(1, round(0.35 * len(names))), replace=False):
        trailing[str(name)] = int(rng.integers(2, 11))
    return [
        VideoPlan(index, name, splits[name], index, tuple(segments[name]), trailing[name])
        for index, name in enumerate(names)
    ]


def _video_names(rng: np.random.Generator, count: int) -> tuple[list[str], tuple[str, str]]:
    """Names in the styles of Aff-Wild2 (sorted), and the one _left/_right pair among them."""
    numbers = rng.choice(np.arange(1, 10 * count + 10), size=count - 1, replace=False)
    resolutions = ("640x360", "640x480", "1280x720", "1920x1080", "480x360")
    names = []
    for number in numbers[1:]:
        style = rng.random()
        if style < 0.45:
            names.append(f"video{number}")
        elif style < 0.9:
            names.append(f"{number}-30-{resolutions[rng.integers(len(resolutions))]}")
        else:
            names.append(f"video{number}_{rng.integers(1, 4)}")
    pair = (f"video{numbers[0]}_left", f"video{numbers[0]}_right")
    return sorted([*names, *pair]), pair


def _assign_splits(
    rng: np.random.Generator, names: list[str], pair: tuple[str, str], val_fraction: float
) -> dict[str, str]:
    # the pair (one video, two subjects) stays in Train_Set, which has room for two
    val_count = min(max(1, round(len(names) * val_fraction)), len(names) - 2)
    singles = [name for name in names if name not in pair]
    val = set(rng.choice(singles, size=val_count, replace=False).tolist())
    return {name: "val" if name in val else "train" for name in names}


def _segment_lengths(rng: np.random.Generator, count: int, median: float) -> np.ndarray:
    lengths = rng.lognormal(math.log(median), _SEGMENT_SPREAD, count)
    return np.clip(np.round(lengths), median / 3, min(_LONGEST_SEGMENT, 5 * median)).astype(int)


def _new_segment(rng: np.random.Generator, label: int, expression: int, length: int) -> Segment:
    return Segment(
        label, expression, int(length), rng.uniform(0.4, 1.0), int(rng.integers(N_VARIANTS))
    )


def _split_segments(rng: np.random.Generator, frames: int, median: float) -> list[Segment]:
    """Segments of every class in Aff-Wild2's frame shares, each class at least twice."""
    mean_length = median * math.exp(_SEGMENT_SPREAD**2 / 2)
    counts = np.maximum(MIN_SEGMENTS_PER_CLASS, np.round(frames * VIDEO_CLASS_SHARES / mean_length))
    segments = [
        _new_segment(rng, label, label, length)
        for label, count in enumerate(counts.astype(int))
        for length in _segment_lengths(rng, count, median)
    ]
    return [segments[i] for i in rng.permutation(len(segments))]


def _deal(segments: list[Segment], room: dict[str, int]) -> dict[str, list[Segment]]:
    """Give each segment to the video with the most room left, so lengths follow the targets."""
    left = dict(room)
    dealt: dict[str, list[Segment]] = {name: [] for name in room}
    for segment in segments:
        name = max(left, key=lambda n: (left[n], n))
        dealt[name].append(segment)
        left[name] -= segment.length
    return dealt


def _insert_expr_invalid(
    rng: np.random.Generator, segments: list[Segment], median: float
) -> list[Segment]:
    """Insert a few EXPR -1 stretches (tens of frames; the face still shows something)."""
    frames = sum(segment.length for segment in segments)
    result = list(segments)
    for _ in range(min(4, 1 + rng.poisson(frames / 400))):
        length = min(int(rng.integers(10, 50)), max(5, frames // 8), int(2 * median))
        expression = int(rng.choice(N_CLASSES, p=VIDEO_CLASS_SHARES / VIDEO_CLASS_SHARES.sum()))
        position = int(rng.integers(len(result) + 1))
        result.insert(position, _new_segment(rng, EXPR.invalid, expression, length))
    return result


def _equalise_pair(segments: dict[str, list[Segment]], pair: tuple[str, str]) -> None:
    """Both subjects of one video have as many frames: pad the shorter with Neutral."""
    lengths = {name: sum(s.length for s in segments[name]) for name in pair}
    shorter = min(pair, key=lambda name: lengths[name])
    missing = max(lengths.values()) - lengths[shorter]
    if missing:
        segments[shorter].append(Segment(0, 0, missing, 0.0, 0))

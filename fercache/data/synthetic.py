"""A synthetic Aff-Wild2 tree: drawn faces in videos, EXPR/AU/VA annotations, phase-1 pools.

The tree has exactly the layout of the real data (`cropped_aligned/<video>/00001.jpg`,
`Annotations/<task>_Recognition_Challenge/<Split>_Set/<video>.txt`) plus `pools/` for the
semi-supervised phase and `synth.json`, written last, which records what was generated and
every planted quirk. The same `SynthConfig` always gives the same bytes, whatever the number
of worker processes.

Why it is hard, on purpose (so that each stage of the method has something to fix):
expressions come in segments of seconds whose intensity ramps up from near zero to an apex
(0.4..1.0) over 3-25 frames and back down at the end, so the first and last frames of a
labelled segment look almost neutral: ambiguous alone, clear in context. People talk: the mouth
opens and closes at 3-5 Hz whatever they feel, which looks like Surprise or Fear in a single
frame. Hands, bars and objects cover the mouth or eyes for 10-60 frames, and blur bursts
smear the face. Brief (2-6 frame) micro-expressions flicker towards another class while the
label stays put: a per-frame classifier flickers with them, a window vote removes them. Some
people look slightly happy, sad or cross at rest, and people blink. Head pose, scale,
lighting, colour cast, noise and JPEG quality drift smoothly through each video. The labelled
still-image pool has few identities (30), mostly frontal, clean and at apex intensity, with
AffectNet-like class shares; the unlabelled pool has many identities (300) with the full
video-like nuisance range and every intensity, so it carries variety the labelled pool lacks.
"""

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from enum import IntEnum
from functools import lru_cache, partial
from multiprocessing import get_context
from operator import call
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from fercache.data.faces import (
    GEOMETRY_SIZE,
    LANDMARKS,
    N_VARIANTS,
    OCCLUDER_KINDS,
    Geometry,
    Identity,
    Nuisance,
    Occluder,
    expression_geometry,
    face_landmarks,
    render_face,
    sample_background,
    sample_identity,
)
from fercache.data.tasks import AU, AU_NAMES, EXPR, EXPR_CLASSES, VA
from fercache.errors import FercacheError
from fercache.progress import progress_bar

FORMAT_VERSION = 1
FPS = 30
IMAGE_SIZE = 112
IMAGES_DIRNAME = "cropped_aligned"
ANNOTATION_FOLDERS = {
    "expr": "EXPR_Recognition_Challenge",
    "au": "AU_Detection_Challenge",
    "va": "VA_Estimation_Challenge",
}
SPLIT_FOLDERS = {"train": "Train_Set", "val": "Validation_Set"}
N_CLASSES = len(EXPR_CLASSES)
LANDMARKS_CSV = "landmarks.csv"  # in pools/: the labelled pool's 68 landmarks per image

# Frame shares of the classes in Aff-Wild2's EXPR set, and image shares in AffectNet/ExpW.
VIDEO_CLASS_SHARES = np.array([0.30, 0.03, 0.02, 0.017, 0.16, 0.13, 0.053, 0.29])
POOL_CLASS_SHARES = np.array([0.25, 0.08, 0.03, 0.03, 0.40, 0.08, 0.08, 0.05])
MIN_SEGMENTS_PER_CLASS = 2  # per split: macro-F1 over all 8 classes is defined on tiny trees
MIN_POOL_IMAGES_PER_CLASS = 5
LABELLED_IDENTITIES = 30
UNLABELLED_IDENTITIES = 300
_SEGMENT_SPREAD = 0.7  # sigma of the lognormal segment length
_LONGEST_SEGMENT = 300
_POOL_CHUNK = 250  # pool images per worker task
_BACKGROUNDS_PER_POOL = 64
_MAX_FRAMES = 50_000  # mean frames; the longest video must fit five-digit frame names

# FACS-like action units of each class, with the class intensity at which each one shows.
_AU_ONSET: dict[int, dict[str, float]] = {
    1: {"AU4": 0.25, "AU7": 0.35, "AU23": 0.4, "AU24": 0.3},
    2: {"AU10": 0.25, "AU15": 0.35, "AU4": 0.5},
    3: {"AU1": 0.25, "AU2": 0.35, "AU4": 0.45, "AU25": 0.3, "AU26": 0.5},
    4: {"AU6": 0.35, "AU12": 0.2, "AU25": 0.5},
    5: {"AU1": 0.3, "AU4": 0.35, "AU15": 0.25},
    6: {"AU1": 0.25, "AU2": 0.25, "AU25": 0.3, "AU26": 0.4},
    7: {"AU2": 0.4, "AU24": 0.4},
}
_TALKING_LIPS_PART = 0.15  # talking mouth opening at which AU25 (lips part) shows
_TALKING_JAW_DROP = 0.4  # ... and AU26 (jaw drop)
# Valence/arousal of each class at full intensity.
_VA_CENTRES = np.array(
    [[0.0, 0.0], [-0.6, 0.7], [-0.6, 0.4], [-0.5, 0.75], [0.75, 0.5], [-0.6, -0.35],
     [0.25, 0.8], [0.0, 0.3]]
)  # fmt: skip

# Pose and camera quantities that drift through a video as AR(1) processes:
# (standard deviation at full wildness, time constant in frames).
_DRIFTS: dict[str, tuple[float, float]] = {
    "roll": (0.04, 40),  # small: the crops are aligned on the eyes, so little roll is left
    "yaw": (0.15, 50),
    "pitch": (0.09, 40),
    "scale": (0.03, 60),
    "shift_x": (0.015, 30),
    "shift_y": (0.015, 30),
    "light_angle": (0.3, 100),
    "brightness": (8.0, 80),
}
_WILD, _STUDIO = 1.0, 0.25  # nuisance wildness of videos/unlabelled pool, and labelled pool


class _Stream(IntEnum):
    """Independent random streams: every result depends only on (seed, stream, index)."""

    PLAN = 0
    IDENTITY = 1
    VIDEO = 2
    LABELLED = 3
    UNLABELLED = 4
    BACKGROUNDS = 5


def _rng(seed: int, stream: _Stream, index: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, int(stream), index]))


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


# --------------------------------------------------------------------------------------------
# The plan: names, splits, identities and label segments of every video (cheap, one process).


@dataclass(frozen=True)
class Segment:
    """A stretch of one expression. `label` is what the EXPR file says: the class, or -1."""

    label: int
    expression: int  # the class drawn (the same as label unless label is -1)
    length: int
    apex: float  # peak intensity
    variant: int  # see faces.expression_geometry


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
    rng = _rng(config.seed, _Stream.PLAN)
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


# --------------------------------------------------------------------------------------------
# One video, frame by frame: expression, face motion, nuisance, labels.


@dataclass(frozen=True)
class VideoTimeline:
    """Everything about each frame of one video (index t is frame t + 1)."""

    identity: Identity
    expr: np.ndarray  # EXPR label, -1 invalid
    expression: np.ndarray  # class drawn
    intensity: np.ndarray  # its intensity, 0..1 (ramps at the ends of segments)
    geometry: np.ndarray  # (frames, GEOMETRY_SIZE) faces.Geometry values
    au: np.ndarray  # (frames, 12) 0/1, rows of -1 invalid
    va: np.ndarray  # (frames, 2) in [-1, 1], rows of -5 invalid
    has_image: np.ndarray  # False: "face not detected", no JPEG written
    events: dict[str, np.ndarray]  # per-frame flags: occlusion, blur, talking, micro, blink
    nuisance: list[Nuisance]
    jpeg_quality: np.ndarray


def simulate_video(plan: VideoPlan, seed: int) -> VideoTimeline:
    """The frames of `plan` without rendering them: deterministic in (seed, plan)."""
    rng = _rng(seed, _Stream.VIDEO, plan.index)
    identity = sample_identity(_rng(seed, _Stream.IDENTITY, plan.identity))
    frames = plan.frames
    expr, expression, intensity, direction = _segment_tracks(rng, plan.segments)
    micro = _micro_expressions(rng, expression)
    talk_opening = _talking(rng, frames)
    blink_closure = _blinks(rng, frames)
    shown = (1 - micro.weight) * intensity  # how much of the segment's expression shows
    expression_geometry = shown[:, None] * direction + micro.strength[:, None] * micro.direction
    geometry = identity.expressiveness * expression_geometry + identity.rest.as_array()
    geometry[:, _FIELD["mouth_open"]] += talk_opening
    for eye in ("eye_open_left", "eye_open_right"):
        geometry[:, _FIELD[eye]] -= blink_closure
    geometry += np.stack([_ar1(rng, frames, 0.05, 8) for _ in range(GEOMETRY_SIZE)], axis=1)
    au = _action_units(rng, expression, shown, micro, talk_opening)
    va = _valence_arousal(rng, expression, shown, micro)
    nuisance, quality, occlusion, blur = _video_nuisance(rng, frames, identity)
    return VideoTimeline(
        identity=identity,
        expr=expr,
        expression=expression,
        intensity=intensity,
        geometry=geometry,
        au=au,
        va=va,
        has_image=_image_mask(rng, frames, plan.trailing_without_image),
        events={
            "occlusion": occlusion,
            "blur": blur,
            "talking": talk_opening > 0,
            "micro": micro.strength > 0,
            "blink": blink_closure > 0,
        },
        nuisance=nuisance,
        jpeg_quality=quality,
    )


_FIELD = {field.name: index for index, field in enumerate(fields(Geometry))}


def _ar1(rng: np.random.Generator, frames: int, sd: float, tau: float) -> np.ndarray:
    """A stationary AR(1) process with standard deviation `sd` and time constant `tau`."""
    keep = math.exp(-1 / tau)
    shocks = rng.normal(0.0, sd * math.sqrt(1 - keep**2), frames)
    values = np.empty(frames)
    value = rng.normal(0.0, sd)
    for t in range(frames):
        value = keep * value + shocks[t]
        values[t] = value
    return values


def _stretches(
    rng: np.random.Generator, frames: int, count: int, shortest: int, longest: int
) -> list[tuple[int, int]]:
    """`count` random (start, length) stretches inside [0, frames); they may overlap."""
    result = []
    for _ in range(count):
        length = min(int(rng.integers(shortest, longest + 1)), frames)
        result.append((int(rng.integers(frames - length + 1)), length))
    return result


def _mask(frames: int, stretches: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(frames, dtype=bool)
    for start, length in stretches:
        mask[start : start + length] = True
    return mask


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


@lru_cache(maxsize=N_CLASSES * N_VARIANTS)
def _apex(label: int, variant: int) -> np.ndarray:
    return expression_geometry(label, 1.0, variant).as_array()


def _segment_tracks(
    rng: np.random.Generator, segments: tuple[Segment, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: EXPR label, class drawn, intensity (onset/apex/offset), apex geometry."""
    expr, expression, intensity, direction = [], [], [], []
    for segment in segments:
        length = segment.length
        onset, offset = (min(int(rng.integers(3, 26)), max(1, length // 3)) for _ in range(2))
        k = np.arange(length)
        ramp = _smoothstep(np.minimum((k + 1) / (onset + 1), (length - k) / (offset + 1)))
        wobble = 1 + _ar1(rng, length, 0.1, 20)
        expr.append(np.full(length, segment.label))
        expression.append(np.full(length, segment.expression))
        intensity.append(np.clip(segment.apex * ramp * wobble, 0.0, 1.0))
        direction.append(np.tile(_apex(segment.expression, segment.variant), (length, 1)))
    return (
        np.concatenate(expr),
        np.concatenate(expression),
        np.concatenate(intensity),
        np.concatenate(direction),
    )


@dataclass(frozen=True)
class _MicroExpressions:
    expression: np.ndarray  # class flickered towards (the segment's class where none)
    weight: np.ndarray  # how far the face moves away from the segment's expression, 0..1
    strength: np.ndarray  # intensity of the flicker's expression (weight x its apex share)
    direction: np.ndarray  # (frames, GEOMETRY_SIZE) its apex geometry


def _micro_expressions(rng: np.random.Generator, expression: np.ndarray) -> _MicroExpressions:
    """Unlabelled 2-6 frame flickers towards another class; the label stays the segment's."""
    frames = len(expression)
    micro = _MicroExpressions(
        expression.copy(), np.zeros(frames), np.zeros(frames), np.zeros((frames, GEOMETRY_SIZE))
    )
    for start, length in _stretches(rng, frames, rng.poisson(frames / 90), 2, 6):
        span = slice(start, start + length)
        other = (int(expression[start]) + int(rng.integers(1, N_CLASSES))) % N_CLASSES
        micro.expression[span] = other
        micro.direction[span] = _apex(other, int(rng.integers(N_VARIANTS)))
        profile = np.sin(np.pi * (np.arange(length) + 1) / (length + 1))
        micro.weight[span] = rng.uniform(0.6, 1.0) * profile
        micro.strength[span] = rng.uniform(0.6, 1.0) * micro.weight[span]
    return micro


def _talking(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Mouth opening from speech: stretches where it opens and closes at 3-5 Hz, whatever the
    expression."""
    opening = np.zeros(frames)
    for start, length in _stretches(rng, frames, rng.poisson(frames / 250), 30, 150):
        t = np.arange(length) / FPS
        syllables = 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6.3))
        opening[start : start + length] = rng.uniform(0.25, 0.55) * syllables
    return opening


def _blinks(rng: np.random.Generator, frames: int) -> np.ndarray:
    """How far the eyes close, per frame: a 2-4 frame blink every few seconds."""
    closure = np.zeros(frames)
    for start, length in _stretches(rng, frames, rng.poisson(frames / 100), 2, 4):
        closure[start : start + length] = 1.6 * np.sin(
            np.pi * (np.arange(length) + 1) / (length + 1)
        )
    return closure


@lru_cache(maxsize=1)
def _au_onsets() -> np.ndarray:
    """(class, AU) intensity at which the AU shows; infinite where it never does."""
    onsets = np.full((N_CLASSES, len(AU_NAMES)), np.inf)
    for label, units in _AU_ONSET.items():
        for name, onset in units.items():
            onsets[label, AU_NAMES.index(name)] = onset
    return onsets


def _action_units(
    rng: np.random.Generator,
    expression: np.ndarray,
    shown: np.ndarray,
    micro: _MicroExpressions,
    talk_opening: np.ndarray,
) -> np.ndarray:
    """AU labels of the face drawn: each class's AUs above their onset, lips/jaw from talking."""
    onsets = _au_onsets()
    active = (shown[:, None] > onsets[expression]) | (
        micro.strength[:, None] > onsets[micro.expression]
    )
    active[:, AU_NAMES.index("AU25")] |= talk_opening > _TALKING_LIPS_PART
    active[:, AU_NAMES.index("AU26")] |= talk_opening > _TALKING_JAW_DROP
    return _invalidate_stretches(rng, active.astype(np.int64), AU.invalid)


def _valence_arousal(
    rng: np.random.Generator, expression: np.ndarray, shown: np.ndarray, micro: _MicroExpressions
) -> np.ndarray:
    """Class centres scaled by intensity, plus slow annotator noise, within [-1, 1]."""
    va = shown[:, None] * _VA_CENTRES[expression]
    va += micro.strength[:, None] * _VA_CENTRES[micro.expression]
    va += np.stack([_ar1(rng, len(va), 0.06, 20) for _ in range(2)], axis=1)
    return _invalidate_stretches(rng, np.clip(va, -1.0, 1.0), VA.invalid)


def _invalidate_stretches(
    rng: np.random.Generator, labels: np.ndarray, invalid: float
) -> np.ndarray:
    """Up to two stretches of whole invalid rows (10-40 frames), independent of EXPR's."""
    frames = len(labels)
    longest = min(40, max(10, frames // 6))
    for start, length in _stretches(rng, frames, int(rng.integers(0, 3)), 10, longest):
        labels[start : start + length] = invalid
    return labels


def _image_mask(rng: np.random.Generator, frames: int, trailing: int) -> np.ndarray:
    """False where the face detector found no face: short stretches, and the last frames."""
    count = int(rng.integers(1, 4)) if rng.random() < 0.8 else 0
    longest = min(30, max(3, frames // 10))
    has_image = ~_mask(frames, _stretches(rng, frames, count, 3, longest))
    has_image[frames - trailing :] = False
    return has_image


# --------------------------------------------------------------------------------------------
# Nuisance: shared by videos (drifting) and pool images (drawn independently).


@dataclass(frozen=True)
class _Scene:
    """What stays fixed through one video (or one pool image)."""

    background: Image.Image
    offsets: dict[str, float]  # where each drifting quantity of _DRIFTS is centred
    light_angle: float
    light_strength: float
    contrast: float
    colour_cast: tuple[float, float, float]
    noise: float
    blur: float
    jpeg_quality: float


def _sample_scene(rng: np.random.Generator, background: Image.Image, wildness: float) -> _Scene:
    """`wildness` scales every departure from a frontal, evenly lit, sharp, clean shot."""
    offsets = {
        "roll": rng.normal(0, 0.02),
        "yaw": rng.normal(0, 0.08),
        "pitch": rng.normal(0, 0.04),
        "scale": rng.normal(0, 0.03),
        "shift_x": 0.0,
        "shift_y": 0.0,
        "light_angle": 0.0,
        "brightness": rng.normal(0, 18),
    }
    return _Scene(
        background=background,
        offsets={key: value * wildness for key, value in offsets.items()},
        light_angle=rng.uniform(0, 2 * np.pi),
        light_strength=rng.uniform(0.0, 0.45) * wildness,
        contrast=1 + rng.uniform(-0.3, 0.15) * wildness,
        colour_cast=tuple(1 + rng.normal(0, 0.06, 3) * wildness),
        noise=rng.uniform(1.5, 8.0) * wildness,
        blur=rng.uniform(0.0, 0.7) * wildness,
        jpeg_quality=92 - rng.uniform(0, 42) * wildness,
    )


def _sample_occluder(rng: np.random.Generator, identity: Identity) -> Occluder:
    kind = OCCLUDER_KINDS[rng.integers(len(OCCLUDER_KINDS))]
    if kind == "hand":  # over the mouth and chin
        skin = np.clip(np.array(identity.skin) * rng.uniform(0.85, 1.1), 0, 255)
        return Occluder(
            kind=kind,
            x=rng.normal(0, 0.12),
            y=rng.uniform(0.35, 0.55),
            width=0.75,
            height=0.6,
            angle=rng.normal(0, 0.3),
            colour=tuple(int(c) for c in skin),
        )
    if kind == "bar":  # across the eyes or the brows: hair, a shadow, a strap
        return Occluder(
            kind=kind,
            x=0.0,
            y=rng.uniform(-0.4, -0.18),
            width=2.2,
            height=rng.uniform(0.18, 0.3),
            angle=rng.normal(0, 0.15),
            colour=tuple(int(c) for c in rng.uniform(10, 90, 3)),
        )
    return Occluder(  # an object: a cup, a phone, a microphone
        kind=kind,
        x=rng.choice([-1, 1]) * rng.uniform(0.0, 0.35),
        y=rng.uniform(0.2, 0.6),
        width=rng.uniform(0.4, 0.7),
        height=rng.uniform(0.5, 0.9),
        angle=rng.normal(0, 0.2),
        colour=tuple(int(c) for c in rng.uniform(30, 230, 3)),
    )


def _nuisance(
    scene: _Scene,
    drift: dict[str, float],
    occluder: Occluder | None,
    blur: float,
    motion_blur: int,
    motion_angle: float,
    noise_seed: int,
) -> Nuisance:
    """One image's nuisance: the scene, plus where the drifting quantities are now."""
    return Nuisance(
        background=scene.background,
        roll=drift["roll"],
        yaw=float(np.clip(drift["yaw"], -0.7, 0.7)),
        pitch=drift["pitch"],
        scale=1 + drift["scale"],
        shift_x=drift["shift_x"],
        shift_y=drift["shift_y"],
        light_angle=scene.light_angle + drift["light_angle"],
        light_strength=scene.light_strength,
        brightness=drift["brightness"],
        contrast=scene.contrast,
        colour_cast=scene.colour_cast,
        blur=scene.blur + blur,
        motion_blur=motion_blur,
        motion_angle=motion_angle,
        noise=scene.noise,
        noise_seed=noise_seed,
        occluder=occluder,
    )


def _video_nuisance(
    rng: np.random.Generator, frames: int, identity: Identity
) -> tuple[list[Nuisance], np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame nuisance drifting through a video; also JPEG quality, occlusion, blur flags."""
    scene = _sample_scene(rng, sample_background(rng, IMAGE_SIZE), _WILD)
    drifts = {
        key: scene.offsets[key] + _ar1(rng, frames, sd, tau) for key, (sd, tau) in _DRIFTS.items()
    }
    occluders: list[Occluder | None] = [None] * frames
    for start, length in _stretches(rng, frames, rng.poisson(frames / 250), 10, 60):
        occluder = _sample_occluder(rng, identity)
        wander = _ar1(rng, length, 0.05, 15)
        for k in range(length):
            occluders[start + k] = replace(occluder, x=occluder.x + wander[k])
    burst_blur = np.zeros(frames)
    motion = np.zeros(frames, dtype=int)
    for start, length in _stretches(rng, frames, rng.poisson(frames / 150), 5, 20):
        if rng.random() < 0.5:
            burst_blur[start : start + length] = rng.uniform(1.2, 2.5)
        else:
            motion[start : start + length] = rng.integers(3, 8)
    motion_angle = rng.uniform(0, np.pi)
    noise_seeds = rng.integers(2**31, size=frames)
    nuisance = [
        _nuisance(
            scene,
            {key: float(values[t]) for key, values in drifts.items()},
            occluders[t],
            float(burst_blur[t]),
            int(motion[t]),
            motion_angle,
            int(noise_seeds[t]),
        )
        for t in range(frames)
    ]
    quality = np.clip(np.round(scene.jpeg_quality + _ar1(rng, frames, 5, 50)), 30, 95)
    occluded = np.array([occluder is not None for occluder in occluders])
    return nuisance, quality, occluded, (burst_blur > 0) | (motion > 0)


# --------------------------------------------------------------------------------------------
# Pools of still images for phase 1.


@dataclass(frozen=True)
class _PoolKind:
    stream: _Stream
    folder: str
    identities: int
    first_identity: int  # after the video identities (and the labelled pool's): all disjoint
    wildness: float


def _pool_kinds(config: SynthConfig) -> dict[str, _PoolKind]:
    labelled_ids = min(LABELLED_IDENTITIES, config.labelled_pool)
    unlabelled_ids = min(UNLABELLED_IDENTITIES, config.unlabelled_pool)
    return {
        "labelled": _PoolKind(_Stream.LABELLED, "labelled", labelled_ids, config.videos, _STUDIO),
        "unlabelled": _PoolKind(
            _Stream.UNLABELLED, "unlabelled", unlabelled_ids, config.videos + labelled_ids, _WILD
        ),
    }


def plan_labelled_pool(config: SynthConfig) -> np.ndarray:
    """The class of every labelled pool image: AffectNet-like shares, every class a few times."""
    rng = _rng(config.seed, _Stream.PLAN, 1)
    counts = np.maximum(
        MIN_POOL_IMAGES_PER_CLASS, np.round(config.labelled_pool * POOL_CLASS_SHARES)
    ).astype(int)
    largest = int(np.argmax(counts))
    counts[largest] += config.labelled_pool - counts.sum()
    return rng.permutation(np.repeat(np.arange(N_CLASSES), counts))


@lru_cache(maxsize=2)
def _pool_backgrounds(seed: int, stream: _Stream) -> tuple[Image.Image, ...]:
    rng = _rng(seed, _Stream.BACKGROUNDS, int(stream))
    return tuple(sample_background(rng, IMAGE_SIZE) for _ in range(_BACKGROUNDS_PER_POOL))


class _PoolDraw(NamedTuple):
    """Every random choice behind one pool image."""

    identity: Identity
    expression: int
    intensity: float
    geometry: np.ndarray
    nuisance: Nuisance
    jpeg_quality: int


def _pool_draw(seed: int, kind: _PoolKind, index: int, label: int | None) -> _PoolDraw:
    """What pool image `index` shows; label None draws a broad unlabelled class."""
    rng = _rng(seed, kind.stream, index)
    identity_index = kind.first_identity + index % kind.identities
    identity = sample_identity(_rng(seed, _Stream.IDENTITY, identity_index))
    background = _pool_backgrounds(seed, kind.stream)[rng.integers(_BACKGROUNDS_PER_POOL)]
    scene = _sample_scene(rng, background, kind.wildness)
    drift = {
        key: scene.offsets[key] + rng.normal(0, sd * kind.wildness)
        for key, (sd, _) in _DRIFTS.items()
    }
    if label is None:  # unlabelled: any class, any intensity, video-like disturbances
        broad = 0.5 * VIDEO_CLASS_SHARES / VIDEO_CLASS_SHARES.sum() + 0.5 / N_CLASSES
        expression, intensity = int(rng.choice(N_CLASSES, p=broad)), rng.uniform(0.0, 1.0)
        talk = rng.uniform(0.0, 0.5) if rng.random() < 0.25 else 0.0
        occluder = _sample_occluder(rng, identity) if rng.random() < 0.15 else None
        blur = rng.uniform(1.2, 2.5) if rng.random() < 0.12 else 0.0
    else:  # labelled: apex, frontal and clean
        expression, intensity, talk, occluder, blur = label, rng.uniform(0.7, 1.0), 0.0, None, 0.0
    geometry = (
        identity.expressiveness * intensity * _apex(expression, int(rng.integers(N_VARIANTS)))
    )
    geometry += identity.rest.as_array() + rng.normal(0, 0.05, GEOMETRY_SIZE)
    geometry[_FIELD["mouth_open"]] += talk
    nuisance = _nuisance(scene, drift, occluder, blur, 0, 0.0, int(rng.integers(2**31)))
    return _PoolDraw(
        identity, expression, float(intensity), geometry, nuisance, round(scene.jpeg_quality)
    )


def _pool_image(
    seed: int, kind: _PoolKind, index: int, label: int | None
) -> tuple[Image.Image, int, np.ndarray]:
    """Pool image `index`, its JPEG quality and its 68 landmarks (pixels)."""
    draw = _pool_draw(seed, kind, index, label)
    face = Geometry.from_array(draw.geometry)
    image = render_face(draw.identity, face, draw.nuisance, IMAGE_SIZE)
    return image, draw.jpeg_quality, face_landmarks(draw.identity, face, draw.nuisance, IMAGE_SIZE)


def unlabelled_truth(config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """The class each unlabelled pool image was drawn with and its intensity (0 looks neutral
    whatever the class), by index: what measures the pseudo labels a teacher gives them. No
    training reads it; it is recomputed from the seed, not written to the tree."""
    kind = _pool_kinds(config)["unlabelled"]
    draws = [_pool_draw(config.seed, kind, i, None) for i in range(config.unlabelled_pool)]
    return (
        np.array([draw.expression for draw in draws]),
        np.array([draw.intensity for draw in draws]),
    )


def _pool_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


# --------------------------------------------------------------------------------------------
# Writing the tree.


def _annotation_path(out: Path, task: str, split: str, video: str) -> Path:
    return out / "Annotations" / ANNOTATION_FOLDERS[task] / SPLIT_FOLDERS[split] / f"{video}.txt"


def _format_va(values: np.ndarray) -> str:
    if values[0] == VA.invalid:
        return f"{VA.invalid:g},{VA.invalid:g}"
    valence, arousal = np.round(values, 3) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{valence:.3f},{arousal:.3f}"


def _annotation_lines(timeline: VideoTimeline) -> dict[str, list[str]]:
    return {
        "expr": [str(label) for label in timeline.expr.tolist()],
        "au": [",".join(map(str, row)) for row in timeline.au.tolist()],
        "va": [_format_va(row) for row in timeline.va],
    }


class _Done(NamedTuple):
    """What a finished worker task reports: items for the progress bar, a video's record,
    the landmarks of labelled pool images by index."""

    items: int
    video: str | None = None
    record: dict | None = None
    landmarks: dict[int, np.ndarray] | None = None


def _write_video(out: Path, plan: VideoPlan, seed: int) -> _Done:
    timeline = simulate_video(plan, seed)
    folder = out / IMAGES_DIRNAME / plan.name
    folder.mkdir(parents=True, exist_ok=True)
    for t in np.flatnonzero(timeline.has_image).tolist():
        face = render_face(
            timeline.identity,
            Geometry.from_array(timeline.geometry[t]),
            timeline.nuisance[t],
            IMAGE_SIZE,
        )
        face.save(folder / f"{t + 1:05d}.jpg", quality=int(timeline.jpeg_quality[t]))
    headers = {"expr": EXPR.header, "au": AU.header, "va": VA.header}
    for task, lines in _annotation_lines(timeline).items():
        path = _annotation_path(out, task, plan.split, plan.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([headers[task], *lines]) + "\n", newline="\n")
    return _Done(plan.frames, plan.name, _video_record(plan, timeline))


def _video_record(plan: VideoPlan, timeline: VideoTimeline) -> dict:
    has_image = timeline.has_image
    valid = timeline.expr[timeline.expr != EXPR.invalid]
    trailing = len(has_image) - (int(np.flatnonzero(has_image)[-1]) + 1 if has_image.any() else 0)
    return {
        "split": plan.split,
        "identity": plan.identity,
        "frames": plan.frames,
        "images": int(has_image.sum()),
        "frames_without_image": int((~has_image).sum()),
        "trailing_frames_without_image": trailing,
        "expr_invalid": int((timeline.expr == EXPR.invalid).sum()),
        "expr_counts": np.bincount(valid, minlength=N_CLASSES).tolist(),
        "au_invalid": int((timeline.au == AU.invalid).all(axis=1).sum()),
        "va_invalid": int((timeline.va == VA.invalid).all(axis=1).sum()),
    }


def _write_pool_chunk(
    out: Path, seed: int, kind: _PoolKind, start: int, labels: list[int | None]
) -> _Done:
    folder = out / "pools" / kind.folder
    folder.mkdir(parents=True, exist_ok=True)
    landmarks = {}
    for offset, label in enumerate(labels):
        image, quality, landmarks[start + offset] = _pool_image(seed, kind, start + offset, label)
        image.save(folder / _pool_name(start + offset), quality=quality)
    return _Done(len(labels), landmarks=landmarks if kind.stream == _Stream.LABELLED else None)


def _tasks(
    out: Path, config: SynthConfig, plans: list[VideoPlan], labelled: np.ndarray
) -> list[Callable[[], _Done]]:
    """All the work, biggest first so that the workers finish together."""
    kinds = _pool_kinds(config)
    by_length = sorted(plans, key=lambda plan: -plan.frames)
    videos = [partial(_write_video, out, plan, config.seed) for plan in by_length]
    pool_labels: dict[str, list[int | None]] = {
        "labelled": labelled.tolist(),
        "unlabelled": [None] * config.unlabelled_pool,
    }
    pools = [
        partial(
            _write_pool_chunk,
            out,
            config.seed,
            kinds[name],
            start,
            labels[start : start + _POOL_CHUNK],
        )
        for name, labels in pool_labels.items()
        for start in range(0, len(labels), _POOL_CHUNK)
    ]
    return videos + pools


def _results(tasks: list[Callable[[], _Done]], workers: int) -> Iterator[_Done]:
    if workers == 1:
        yield from map(call, tasks)
        return
    # spawn, not fork: the caller may hold threads (progress bars, torch) that fork would copy
    with get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(call, tasks)


def _prepare_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FercacheError(f"{out} is a file, not a folder: choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "synth.json").is_file():
            raise FercacheError(
                f"{out} is not empty and holds no synth.json, so it is not a complete synthetic "
                "tree: choose an empty or new folder (--force only replaces a synthetic tree; "
                "delete the folder yourself if it is a half-written one)"
            )
        if not force:
            raise FercacheError(
                f"{out} already holds a synthetic tree: pass --force to replace it, "
                "or choose another folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _readme(config: SynthConfig) -> str:
    return (
        f"Synthetic Aff-Wild2-shaped tree made by fercache (format {FORMAT_VERSION}); "
        "synth.json lists what it holds and where its quirks are.\n"
        f"Command: fercache synth OUT --videos {config.videos} --frames {config.frames} "
        f"--seed {config.seed} --labelled {config.labelled_pool} "
        f"--unlabelled {config.unlabelled_pool} (val_fraction {config.val_fraction})\n"
    )


def _write_landmarks(path: Path, folder: str, landmarks: dict[int, np.ndarray]) -> None:
    """`path,x0,y0,...,x67,y67` per labelled pool image: pixels of the saved 112 px image."""
    header = ["path"] + [f"{axis}{i}" for i in range(LANDMARKS) for axis in "xy"]
    rows = [
        ",".join([f"{folder}/{_pool_name(index)}", *(f"{v:.2f}" for v in points.ravel())])
        for index, points in sorted(landmarks.items())
    ]
    path.write_text("\n".join([",".join(header), *rows]) + "\n", newline="\n")


def generate(out: Path, config: SynthConfig, progress: bool = True, *, force: bool = False) -> dict:
    """Write the synthetic tree into `out` and return what synth.json records.

    `out` must be missing or empty; with `force`, an earlier synthetic tree (a folder holding
    synth.json) is replaced. Any other folder is refused, never deleted.
    """
    config.validate()
    out = Path(out)
    _prepare_output(out, force)
    plans = plan_videos(config)
    labelled = plan_labelled_pool(config)
    tasks = _tasks(out, config, plans, labelled)
    workers = min(config.workers or os.cpu_count() or 1, len(tasks))
    total = sum(plan.frames for plan in plans) + config.labelled_pool + config.unlabelled_pool
    videos: dict[str, dict] = {}
    landmarks: dict[int, np.ndarray] = {}
    with progress_bar("synthesising frames and images", total, progress) as advance:
        for done in _results(tasks, workers):
            if done.video is not None:
                videos[done.video] = done.record
            landmarks.update(done.landmarks or {})
            advance(done.items)
    kinds = _pool_kinds(config)
    pools = out / "pools"
    rows = [
        f"{kinds['labelled'].folder}/{_pool_name(i)},{label}" for i, label in enumerate(labelled)
    ]
    (pools / "labelled.csv").write_text("\n".join(["path,label", *rows]) + "\n", newline="\n")
    _write_landmarks(pools / LANDMARKS_CSV, kinds["labelled"].folder, landmarks)
    pair = sorted(name for name in videos if name.endswith(("_left", "_right")))
    info = {
        "fercache_synth": FORMAT_VERSION,
        "config": config.recorded(),
        "videos": dict(sorted(videos.items())),
        "left_right_pair": pair,
        "pools": {
            "labelled": config.labelled_pool,
            "labelled_counts": np.bincount(labelled, minlength=N_CLASSES).tolist(),
            "labelled_identities": kinds["labelled"].identities,
            "unlabelled": config.unlabelled_pool,
            "unlabelled_identities": kinds["unlabelled"].identities,
        },
    }
    (out / "README.txt").write_text(_readme(config), newline="\n")
    (out / "synth.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", newline="\n")
    return info

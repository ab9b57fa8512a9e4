"""One video, frame by frame: expression, face motion, nuisance and the EXPR/AU/VA labels.

Expressions come in segments of seconds whose intensity ramps up from near zero to an apex
(0.4..1.0) over 3-25 frames and back down at the end, so the first and last frames of a labelled
segment look almost neutral: ambiguous alone, clear in context. People talk: the mouth opens and
closes at 3-5 Hz whatever they feel, which looks like Surprise or Fear in a single frame. Brief
(2-6 frame) micro-expressions flicker towards another class while the label stays put. Some
people look slightly happy, sad or cross at rest, and people blink.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fercache.data.tasks import AU, AU_NAMES, VA
from fercache.synth.face import (
    GEOMETRY_FIELD,
    GEOMETRY_SIZE,
    N_VARIANTS,
    Identity,
    Nuisance,
    apex_array,
    sample_identity,
)
from fercache.synth.plan import N_CLASSES, Segment, VideoPlan
from fercache.synth.scene import video_nuisance
from fercache.synth.streams import Stream, ar1, random_stretches, stream_rng

FPS = 30

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


@dataclass(frozen=True)
class VideoTimeline:
    """Everything about each frame of one video (index t is frame t + 1)."""

    identity: Identity
    expr: np.ndarray  # EXPR label, -1 invalid
    expression: np.ndarray  # class drawn
    intensity: np.ndarray  # its intensity, 0..1 (ramps at the ends of segments)
    geometry: np.ndarray  # (frames, GEOMETRY_SIZE) face.Geometry values
    au: np.ndarray  # (frames, 12) 0/1, rows of -1 invalid
    va: np.ndarray  # (frames, 2) in [-1, 1], rows of -5 invalid
    has_image: np.ndarray  # False: "face not detected", no JPEG written
    events: dict[str, np.ndarray]  # per-frame flags: occlusion, blur, talking, micro, blink
    nuisance: list[Nuisance]
    jpeg_quality: np.ndarray


def simulate_video(plan: VideoPlan, seed: int) -> VideoTimeline:
    """The frames of `plan` without rendering them: deterministic in (seed, plan)."""
    rng = stream_rng(seed, Stream.VIDEO, plan.index)
    identity = sample_identity(stream_rng(seed, Stream.IDENTITY, plan.identity))
    frames = plan.frames
    expr, expression, intensity, direction = _segment_tracks(rng, plan.segments)
    micro = _micro_expressions(rng, expression)
    talk_opening = _talking(rng, frames)
    blink_closure = _blinks(rng, frames)
    shown = (1 - micro.weight) * intensity  # how much of the segment's expression shows
    expression_geometry = shown[:, None] * direction + micro.strength[:, None] * micro.direction
    geometry = identity.expressiveness * expression_geometry + identity.rest.as_array()
    geometry[:, GEOMETRY_FIELD["mouth_open"]] += talk_opening
    for eye in ("eye_open_left", "eye_open_right"):
        geometry[:, GEOMETRY_FIELD[eye]] -= blink_closure
    geometry += np.stack([ar1(rng, frames, 0.05, 8) for _ in range(GEOMETRY_SIZE)], axis=1)
    au = _action_units(rng, expression, shown, micro, talk_opening)
    va = _valence_arousal(rng, expression, shown, micro)
    nuisance, quality, occlusion, blur = video_nuisance(rng, frames, identity)
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


def _mask(frames: int, stretches: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(frames, dtype=bool)
    for start, length in stretches:
        mask[start : start + length] = True
    return mask


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


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
        wobble = 1 + ar1(rng, length, 0.1, 20)
        expr.append(np.full(length, segment.label))
        expression.append(np.full(length, segment.expression))
        intensity.append(np.clip(segment.apex * ramp * wobble, 0.0, 1.0))
        direction.append(np.tile(apex_array(segment.expression, segment.variant), (length, 1)))
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
    for start, length in random_stretches(rng, frames, rng.poisson(frames / 90), 2, 6):
        span = slice(start, start + length)
        other = (int(expression[start]) + int(rng.integers(1, N_CLASSES))) % N_CLASSES
        micro.expression[span] = other
        micro.direction[span] = apex_array(other, int(rng.integers(N_VARIANTS)))
        profile = np.sin(np.pi * (np.arange(length) + 1) / (length + 1))
        micro.weight[span] = rng.uniform(0.6, 1.0) * profile
        micro.strength[span] = rng.uniform(0.6, 1.0) * micro.weight[span]
    return micro


def _talking(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Mouth opening from speech: stretches where it opens and closes at 3-5 Hz, whatever the
    expression."""
    opening = np.zeros(frames)
    for start, length in random_stretches(rng, frames, rng.poisson(frames / 250), 30, 150):
        t = np.arange(length) / FPS
        syllables = 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6.3))
        opening[start : start + length] = rng.uniform(0.25, 0.55) * syllables
    return opening


def _blinks(rng: np.random.Generator, frames: int) -> np.ndarray:
    """How far the eyes close, per frame: a 2-4 frame blink every few seconds."""
    closure = np.zeros(frames)
    for start, length in random_stretches(rng, frames, rng.poisson(frames / 100), 2, 4):
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
    va += np.stack([ar1(rng, len(va), 0.06, 20) for _ in range(2)], axis=1)
    return _invalidate_stretches(rng, np.clip(va, -1.0, 1.0), VA.invalid)


def _invalidate_stretches(
    rng: np.random.Generator, labels: np.ndarray, invalid: float
) -> np.ndarray:
    """Up to two stretches of whole invalid rows (10-40 frames), independent of EXPR's."""
    frames = len(labels)
    longest = min(40, max(10, frames // 6))
    for start, length in random_stretches(rng, frames, int(rng.integers(0, 3)), 10, longest):
        labels[start : start + length] = invalid
    return labels


def _image_mask(rng: np.random.Generator, frames: int, trailing: int) -> np.ndarray:
    """False where the face detector found no face: short stretches, and the last frames."""
    count = int(rng.integers(1, 4)) if rng.random() < 0.8 else 0
    longest = min(30, max(3, frames // 10))
    has_image = ~_mask(frames, random_stretches(rng, frames, count, 3, longest))
    has_image[frames - trailing :] = False
    return has_image

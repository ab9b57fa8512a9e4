"""The still-image pools of phase 1: labelled images (with landmarks) and unlabelled faces.

The labelled pool has few identities (30), mostly frontal, clean and at apex intensity, with
AffectNet-like class shares; the unlabelled pool has many identities (300) with the full
video-like nuisance range and every intensity, so it carries variety the labelled pool lacks.
Every image is drawn alone from (seed, pool, index).
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from fercache.data.layout import IMAGE_SIZE, LANDMARKS
from fercache.data.tasks import EXPR_CLASSES
from fercache.synth.face import (
    GEOMETRY_FIELD,
    GEOMETRY_SIZE,
    N_VARIANTS,
    Geometry,
    Identity,
    Nuisance,
    apex_array,
    sample_identity,
)
from fercache.synth.landmarks import face_landmarks
from fercache.synth.plan import (
    MIN_POOL_IMAGES_PER_CLASS,
    N_CLASSES,
    VIDEO_CLASS_SHARES,
    SynthConfig,
)
from fercache.synth.render import render_face, sample_background
from fercache.synth.scene import DRIFTS, STUDIO, WILD, sample_occluder, sample_scene, scene_nuisance
from fercache.synth.streams import Stream, stream_rng

# Image shares of the classes in AffectNet/ExpW.
POOL_CLASS_SHARES = np.array([0.25, 0.08, 0.03, 0.03, 0.40, 0.08, 0.08, 0.05])
LABELLED_IDENTITIES = 30
UNLABELLED_IDENTITIES = 300
_BACKGROUNDS_PER_POOL = 64


@dataclass(frozen=True)
class PoolKind:
    """One pool: its random stream, folder under pools/, identities and nuisance wildness."""

    stream: Stream
    folder: str
    identities: int
    first_identity: int  # after the video identities (and the labelled pool's): all disjoint
    wildness: float


def pool_kinds(config: SynthConfig) -> dict[str, PoolKind]:
    """The labelled and the unlabelled pool of `config`."""
    labelled_ids = min(LABELLED_IDENTITIES, config.labelled_pool)
    unlabelled_ids = min(UNLABELLED_IDENTITIES, config.unlabelled_pool)
    return {
        "labelled": PoolKind(Stream.LABELLED, "labelled", labelled_ids, config.videos, STUDIO),
        "unlabelled": PoolKind(
            Stream.UNLABELLED, "unlabelled", unlabelled_ids, config.videos + labelled_ids, WILD
        ),
    }


def plan_labelled_pool(config: SynthConfig) -> np.ndarray:
    """The class of every labelled pool image: AffectNet-like shares, every class a few times."""
    rng = stream_rng(config.seed, Stream.PLAN, 1)
    counts = np.maximum(
        MIN_POOL_IMAGES_PER_CLASS, np.round(config.labelled_pool * POOL_CLASS_SHARES)
    ).astype(int)
    # the minimum of the small classes comes off the largest ones, never below the minimum
    while counts.sum() > config.labelled_pool:
        counts[np.argmax(counts)] -= 1
    counts[np.argmax(counts)] += config.labelled_pool - counts.sum()
    return rng.permutation(np.repeat(np.arange(N_CLASSES), counts))


@lru_cache(maxsize=2)
def _pool_backgrounds(seed: int, stream: Stream) -> tuple[Image.Image, ...]:
    rng = stream_rng(seed, Stream.BACKGROUNDS, int(stream))
    return tuple(sample_background(rng, IMAGE_SIZE) for _ in range(_BACKGROUNDS_PER_POOL))


class PoolDraw(NamedTuple):
    """Every random choice behind one pool image."""

    identity: Identity
    expression: int
    intensity: float
    geometry: np.ndarray
    nuisance: Nuisance
    jpeg_quality: int


def pool_draw(seed: int, kind: PoolKind, index: int, label: int | None) -> PoolDraw:
    """What pool image `index` shows; label None draws a broad unlabelled class."""
    rng = stream_rng(seed, kind.stream, index)
    identity_index = kind.first_identity + index % kind.identities
    identity = sample_identity(stream_rng(seed, Stream.IDENTITY, identity_index))
    background = _pool_backgrounds(seed, kind.stream)[rng.integers(_BACKGROUNDS_PER_POOL)]
    scene = sample_scene(rng, background, kind.wildness)
    drift = {
        key: scene.offsets[key] + rng.normal(0, sd * kind.wildness)
        for key, (sd, _) in DRIFTS.items()
    }
    if label is None:  # unlabelled: any class, any intensity, video-like disturbances
        broad = 0.5 * VIDEO_CLASS_SHARES / VIDEO_CLASS_SHARES.sum() + 0.5 / N_CLASSES
        expression, intensity = int(rng.choice(N_CLASSES, p=broad)), rng.uniform(0.0, 1.0)
        talk = rng.uniform(0.0, 0.5) if rng.random() < 0.25 else 0.0
        occluder = sample_occluder(rng, identity) if rng.random() < 0.15 else None
        blur = rng.uniform(1.2, 2.5) if rng.random() < 0.12 else 0.0
    else:  # labelled: apex, frontal and clean
        expression, intensity, talk, occluder, blur = label, rng.uniform(0.7, 1.0), 0.0, None, 0.0
    geometry = (
        identity.expressiveness * intensity * apex_array(expression, int(rng.integers(N_VARIANTS)))
    )
    geometry += identity.rest.as_array() + rng.normal(0, 0.05, GEOMETRY_SIZE)
    geometry[GEOMETRY_FIELD["mouth_open"]] += talk
    nuisance = scene_nuisance(scene, drift, occluder, blur, 0, 0.0, int(rng.integers(2**31)))
    return PoolDraw(
        identity, expression, float(intensity), geometry, nuisance, round(scene.jpeg_quality)
    )


def pool_image(
    seed: int, kind: PoolKind, index: int, label: int | None
) -> tuple[Image.Image, int, np.ndarray]:
    """Pool image `index`, its JPEG quality and its 68 landmarks (pixels)."""
    draw = pool_draw(seed, kind, index, label)
    face = Geometry.from_array(draw.geometry)
    image = render_face(draw.identity, face, draw.nuisance, IMAGE_SIZE)
    return image, draw.jpeg_quality, face_landmarks(draw.identity, face, draw.nuisance, IMAGE_SIZE)


def unlabelled_truth(config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """The class each unlabelled pool image was drawn with and its intensity (0 looks neutral
    whatever the class), by index: what measures the pseudo labels a teacher gives them. No
    training reads it; it is recomputed from the seed, not written to the tree."""
    kind = pool_kinds(config)["unlabelled"]
    draws = [pool_draw(config.seed, kind, i, None) for i in range(config.unlabelled_pool)]
    return (
        np.array([draw.expression for draw in draws]),
        np.array([draw.intensity for draw in draws]),
    )


def pool_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


def write_labelled_csv(path: Path, folder: str, labels: np.ndarray) -> None:
    """`path,label` per labelled pool image, in index order; labels by class name, which
    `fercache pretrain` reads without a numbering declaration."""
    rows = [f"{folder}/{pool_name(i)},{EXPR_CLASSES[label]}" for i, label in enumerate(labels)]
    path.write_text("\n".join(["path,label", *rows]) + "\n", newline="\n")


def write_landmarks(path: Path, folder: str, landmarks: dict[int, np.ndarray]) -> None:
    """`path,x0,y0,...,x67,y67` per labelled pool image: pixels of the saved 112 px image."""
    header = ["path"] + [f"{axis}{i}" for i in range(LANDMARKS) for axis in "xy"]
    rows = [
        ",".join([f"{folder}/{pool_name(index)}", *(f"{v:.2f}" for v in points.ravel())])
        for index, points in sorted(landmarks.items())
    ]
    path.write_text("\n".join([",".join(header), *rows]) + "\n", newline="\n")

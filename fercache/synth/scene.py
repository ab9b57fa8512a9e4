"""Nuisance: camera, lighting, occluders and blur, shared by videos and pool images.

Through a video, head pose, scale, lighting, colour cast, noise and JPEG quality drift smoothly;
hands, bars and objects cover the mouth or eyes for 10-60 frames, and blur bursts smear the face.
A pool image draws the same quantities once.
"""

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from fercache.data.layout import IMAGE_SIZE
from fercache.synth.face import OCCLUDER_KINDS, Identity, Nuisance, Occluder
from fercache.synth.render import sample_background
from fercache.synth.streams import ar1, random_stretches

# Pose and camera quantities that drift through a video as AR(1) processes:
# (standard deviation at full wildness, time constant in frames).
DRIFTS: dict[str, tuple[float, float]] = {
    "roll": (0.04, 40),  # small: the crops are aligned on the eyes, so little roll is left
    "yaw": (0.15, 50),
    "pitch": (0.09, 40),
    "scale": (0.03, 60),
    "shift_x": (0.015, 30),
    "shift_y": (0.015, 30),
    "light_angle": (0.3, 100),
    "brightness": (8.0, 80),
}
WILD, STUDIO = 1.0, 0.25  # nuisance wildness of videos/unlabelled pool, and labelled pool


@dataclass(frozen=True)
class Scene:
    """What stays fixed through one video (or one pool image)."""

    background: Image.Image
    offsets: dict[str, float]  # where each drifting quantity of DRIFTS is centred
    light_angle: float
    light_strength: float
    contrast: float
    colour_cast: tuple[float, float, float]
    noise: float
    blur: float
    jpeg_quality: float


def sample_scene(rng: np.random.Generator, background: Image.Image, wildness: float) -> Scene:
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
    return Scene(
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


def sample_occluder(rng: np.random.Generator, identity: Identity) -> Occluder:
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


def scene_nuisance(
    scene: Scene,
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


def video_nuisance(
    rng: np.random.Generator, frames: int, identity: Identity
) -> tuple[list[Nuisance], np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame nuisance drifting through a video; also JPEG quality, occlusion, blur flags."""
    scene = sample_scene(rng, sample_background(rng, IMAGE_SIZE), WILD)
    drifts = {
        key: scene.offsets[key] + ar1(rng, frames, sd, tau) for key, (sd, tau) in DRIFTS.items()
    }
    occluders: list[Occluder | None] = [None] * frames
    for start, length in random_stretches(rng, frames, rng.poisson(frames / 250), 10, 60):
        occluder = sample_occluder(rng, identity)
        wander = ar1(rng, length, 0.05, 15)
        for k in range(length):
            occluders[start + k] = replace(occluder, x=occluder.x + wander[k])
    burst_blur = np.zeros(frames)
    motion = np.zeros(frames, dtype=int)
    for start, length in random_stretches(rng, frames, rng.poisson(frames / 150), 5, 20):
        if rng.random() < 0.5:
            burst_blur[start : start + length] = rng.uniform(1.2, 2.5)
        else:
            motion[start : start + length] = rng.integers(3, 8)
    motion_angle = rng.uniform(0, np.pi)
    noise_seeds = rng.integers(2**31, size=frames)
    nuisance = [
        scene_nuisance(
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
    quality = np.clip(np.round(scene.jpeg_quality + ar1(rng, frames, 5, 50)), 30, 95)
    occluded = np.array([occluder is not None for occluder in occluders])
    return nuisance, quality, occluded, (burst_blur > 0) | (motion > 0)

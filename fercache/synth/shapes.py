"""Where the parts of a drawn face lie, and how face points reach the image.

Points are in *face units*: x to the right, y down, origin just above the nose tip, the head
about 1.8 units wide. `Projector` takes them through a pseudo-3D head pose (features lie on an
ellipsoid, so a turned head compresses its far side) and re-centres them as Aff-Wild2's landmark
alignment would (so yaw moves the outline, ears and hair around the features). The outlines here
(jaw, lids, brows, nose, lips) are shared by the renderer, which fills them, and the landmarks,
which are points on them.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fercache.synth.face import Geometry, Identity, Nuisance

SUPERSAMPLE = 2  # draw at 2x, then box-downsample: cheap anti-aliasing
_UNIT = 0.48  # one face unit in canvas widths: the head fills the crop, like cropped_aligned
_ORIGIN = (0.5, 0.5)  # canvas position of the face origin, as fractions of the width
HEAD_Y = -0.08  # centre of the head ellipse
HEAD_DEPTH = 0.8  # how far the face surface stands out of the silhouette plane
EYE_Y, BROW_Y, MOUTH_Y = -0.22, -0.40, 0.42
_ALIGNED_Y = 0.1  # the face point that landmark alignment keeps in place (around the nose)


class Projector:
    """Projects face-unit points through the head pose onto a canvas `width` pixels wide."""

    def __init__(self, width: int, identity: Identity, nuisance: Nuisance) -> None:
        unit = _UNIT * width * nuisance.scale
        self.unit = unit
        self.origin_x = width * (_ORIGIN[0] + nuisance.shift_x)
        self.origin_y = width * (_ORIGIN[1] + nuisance.shift_y)
        self.cos_roll, self.sin_roll = unit * np.cos(nuisance.roll), unit * np.sin(nuisance.roll)
        self.cos_yaw, self.sin_yaw = np.cos(nuisance.yaw), np.sin(nuisance.yaw)
        self.cos_pitch, self.sin_pitch = np.cos(nuisance.pitch), np.sin(nuisance.pitch)
        self.radius_x, self.radius_y = identity.head_width, identity.head_height
        # Aff-Wild2's crops are aligned on facial landmarks: the middle of the face stays put
        # and a turned head shows as its outline (ears, hair, cheeks) moving around it.
        centre_depth = float(self._depth(np.array(0.0), np.array(_ALIGNED_Y)))
        self.align_x = centre_depth * self.sin_yaw
        self.align_y = _ALIGNED_Y * (self.cos_pitch - 1) + centre_depth * self.sin_pitch

    def _depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """How far face points stand out of the silhouette plane (the head is an ellipsoid)."""
        inside = 1 - (x / self.radius_x) ** 2 - ((y - HEAD_Y) / self.radius_y) ** 2
        return HEAD_DEPTH * np.sqrt(np.maximum(inside, 0.0))

    def _turn(self, points: np.ndarray, lift: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x and y of face points after yaw, pitch and the alignment that re-centres them."""
        x, y = points[:, 0], points[:, 1]
        z = self._depth(x, y) + lift
        return (
            x * self.cos_yaw + z * self.sin_yaw - self.align_x,
            y * self.cos_pitch + z * self.sin_pitch - self.align_y,
        )

    def canvas_points(self, points: np.ndarray, lift: float | np.ndarray = 0.0) -> np.ndarray:
        """(n, 2) canvas coordinates; `lift` (one value or one per point) raises points off
        the face."""
        turned_x, turned_y = self._turn(points, lift)
        canvas = np.empty_like(points)
        canvas[:, 0] = turned_x * self.cos_roll - turned_y * self.sin_roll + self.origin_x
        canvas[:, 1] = turned_x * self.sin_roll + turned_y * self.cos_roll + self.origin_y
        return canvas


@lru_cache(maxsize=8)
def unit_circle(points: int) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def ellipse(cx: float, cy: float, rx: float, ry: float, points: int = 20) -> np.ndarray:
    return unit_circle(points) * (rx, ry) + (cx, cy)


def polyline(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.stack([xs, ys], axis=1)


def bezier(start: tuple, control: tuple, end: tuple, points: int = 9) -> np.ndarray:
    t = np.linspace(0, 1, points)[:, None]
    return (1 - t) ** 2 * np.array(start) + 2 * t * (1 - t) * np.array(control) + t**2 * end


def closed_outline(xs: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """The closed outline between two curves over the same xs."""
    return np.concatenate([polyline(xs, top), polyline(xs[::-1], bottom[::-1])])


def jaw_shaped(identity: Identity, jaw_drop: float, outline: np.ndarray) -> np.ndarray:
    """Points of the head ellipse narrowed towards the chin and moved down by a dropped jaw."""
    chin = HEAD_Y + identity.head_height
    below = np.clip((outline[:, 1] - 0.2) / (chin - 0.2), 0.0, 1.0)
    outline[:, 0] *= 1 - identity.jaw * 0.32 * below**2
    outline[:, 1] += jaw_drop * below
    return outline


def jaw_drop_of(geometry: Geometry) -> float:
    return 0.14 * max(geometry.mouth_open, 0.0)


def _eye_open_factor(openness: float) -> float:
    return max(0.04, 1 + openness)


@dataclass(frozen=True)
class Lids:
    """One eye's lid curves over `u` in [-1, 1] (image left to right)."""

    u: np.ndarray
    xs: np.ndarray
    upper: np.ndarray
    lower: np.ndarray
    cx: float
    half_w: float
    half_h: float


def eye_lids(identity: Identity, side: int, openness: float, cheek_raise: float) -> Lids:
    cx, half_w = side * 0.36 * identity.eye_spacing, 0.16 * identity.eye_size
    half_h = 0.075 * identity.eye_size * _eye_open_factor(openness)
    u = np.linspace(-1, 1, 11)
    xs = cx + half_w * u
    upper = EYE_Y - half_h * (1 - u**2) ** 0.8 - 0.01 * side * u  # outer corner slightly higher
    lower = EYE_Y + half_h * (0.8 - 0.35 * max(cheek_raise, 0.0)) * (1 - u**2) ** 0.9
    return Lids(u, xs, upper, lower, cx, half_w, half_h)


def brow_spine(identity: Identity, geometry: Geometry, side: int) -> np.ndarray:
    """The brow's centre line, 9 points from its inner end to its outer end."""
    raise_ = geometry.brow_raise_left if side < 0 else geometry.brow_raise_right
    centre = side * 0.36 * identity.eye_spacing
    squeeze = 0.04 * max(-geometry.brow_inner, 0.0)
    inner = (
        centre - side * (0.15 - squeeze),
        BROW_Y - 0.16 * raise_ - 0.17 * geometry.brow_inner,
    )
    outer = (centre + side * 0.19, BROW_Y - 0.15 * raise_ + 0.05 * geometry.brow_inner + 0.03)
    arch = 0.02 + 0.05 * identity.brow_arch
    middle = (centre + side * 0.03, BROW_Y - arch - 0.17 * raise_ - 0.04 * geometry.brow_inner)
    return bezier(inner, middle, outer)


def nose_tip_and_wing(identity: Identity, geometry: Geometry) -> tuple[float, float]:
    """y of the nose tip and half-width of the nostril wings (a wrinkled nose lifts and widens)."""
    wrinkle = max(geometry.nose_wrinkle, 0.0)
    tip = 0.13 * identity.nose_length - 0.03 * wrinkle
    wing = 0.1 * identity.nose_width * (1 + 0.15 * wrinkle)
    return tip, wing


def mouth_corner_x(identity: Identity, geometry: Geometry) -> float:
    narrowing = 1 - 0.3 * max(geometry.mouth_round, 0.0)
    return 0.28 * identity.mouth_size * (1 + 0.35 * geometry.mouth_width) * narrowing


@dataclass(frozen=True)
class Lips:
    """The lip curves over `u` in [-1, 1] (image left to right corner)."""

    u: np.ndarray
    xs: np.ndarray
    upper_inner: np.ndarray
    lower_inner: np.ndarray
    upper_outer: np.ndarray
    lower_outer: np.ndarray


def lip_curves(identity: Identity, geometry: Geometry) -> Lips:
    half_w = mouth_corner_x(identity, geometry)
    u = np.linspace(-1, 1, 15)
    xs = 0.09 * geometry.mouth_shift + half_w * u
    centre = (
        MOUTH_Y
        - 0.14 * geometry.mouth_curve * (u**2 - 0.3)
        - 0.05 * geometry.mouth_tilt * u
        + 0.04 * abs(geometry.mouth_shift) * u**2
    )
    opening = 0.38 * max(geometry.mouth_open, 0.0)
    roundness = np.clip(geometry.mouth_round, 0.0, 1.0)
    profile = (1 - u**2) ** (1.0 - 0.5 * roundness)
    bared = 0.05 * max(geometry.upper_lip_raise, 0.0) * (1 - u**2) ** 0.5
    upper_inner = centre - 0.35 * opening * profile - bared
    lower_inner = centre + 0.65 * opening * profile
    thickness = 0.05 * identity.lip_thickness * max(0.2, 1 - 0.75 * geometry.lip_press)
    rim = (1 - u**2) ** 0.6
    bow = 0.012 * np.exp(-((u * 6) ** 2))  # the dip of the cupid's bow
    upper_outer = upper_inner - 0.85 * thickness * rim + bow
    lower_outer = lower_inner + thickness * rim
    return Lips(u, xs, upper_inner, lower_inner, upper_outer, lower_outer)

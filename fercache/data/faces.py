"""Procedural faces for the synthetic data: identities, expression geometry and a renderer.

A face is a stack of polygons and lines in *face units*: x to the right, y down, origin just
above the nose tip, the head about 1.8 units wide. Points are projected with a pseudo-3D head
pose (features lie on an ellipsoid, so a turned head compresses its far side) and re-centred as
Aff-Wild2's landmark alignment would (so yaw moves the outline, ears and hair around the
features), drawn at twice the output size and downsampled for anti-aliasing, then degraded by
blur, lighting, colour cast and sensor noise. Nothing here draws random numbers of its own except
`sample_identity` / `sample_background` (from the caller's generator) and the sensor noise
(from `Nuisance.noise_seed`): the same inputs always give the same pixels.
"""

from dataclasses import astuple, dataclass, fields, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 2  # draw at 2x, then box-downsample: cheap anti-aliasing
_UNIT = 0.48  # one face unit in canvas widths: the head fills the crop, like cropped_aligned
_ORIGIN = (0.5, 0.5)  # canvas position of the face origin, as fractions of the width
_HEAD_Y = -0.08  # centre of the head ellipse
_HEAD_DEPTH = 0.8  # how far the face surface stands out of the silhouette plane
_EYE_Y, _BROW_Y, _MOUTH_Y = -0.22, -0.40, 0.42
_ALIGNED_Y = 0.1  # the face point that landmark alignment keeps in place (around the nose)
_MOUTH_INTERIOR = (70, 25, 30)
_TEETH = (236, 232, 220)
_SCLERA = (236, 234, 228)

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Geometry:
    """Facial action parameters, as offsets from a relaxed face (all 0 = at rest).

    Left and right are the viewer's (image) left and right. Roughly, 1 is a full expression's
    strength; the renderer clamps what would make an impossible face.
    """

    mouth_width: float = 0.0  # + stretched wider, - narrower
    mouth_open: float = 0.0  # lips parted / jaw dropped: 0 closed .. 1 wide open
    mouth_curve: float = 0.0  # + corners up (smile), - corners down
    upper_lip_raise: float = 0.0  # upper lip pulled up, baring the teeth
    lip_press: float = 0.0  # + lips pressed thin, - lips pushed out (pout)
    mouth_round: float = 0.0  # opening rounded (an "O") and the mouth narrowed
    mouth_shift: float = 0.0  # lips pushed sideways, + to the right
    mouth_tilt: float = 0.0  # right corner up and left corner down (or the reverse when -)
    brow_raise_left: float = 0.0
    brow_raise_right: float = 0.0
    brow_inner: float = 0.0  # + inner ends up (sad, afraid), - inner ends down and together (angry)
    eye_open_left: float = 0.0  # + wide, - narrowed, about -1.3 closed
    eye_open_right: float = 0.0
    nose_wrinkle: float = 0.0
    cheek_raise: float = 0.0

    def as_array(self) -> np.ndarray:
        return np.array(astuple(self), dtype=np.float64)

    @classmethod
    def from_array(cls, values: np.ndarray) -> "Geometry":
        return cls(*(float(value) for value in values))


GEOMETRY_SIZE = len(fields(Geometry))

# The apex (intensity 1) of each expression class, in tasks.EXPR_CLASSES order. Similar pairs
# are deliberate, as in real data: Fear and Surprise share raised brows, wide eyes and an open
# mouth (Fear: inner brows up, mouth stretched; Surprise: mouth round); Anger and Disgust share
# lowered brows (Anger: lips pressed; Disgust: upper lip up, nose wrinkled).
_APEX: tuple[Geometry, ...] = (
    Geometry(),  # Neutral
    Geometry(  # Anger
        brow_raise_left=-0.7, brow_raise_right=-0.7, brow_inner=-1.0, eye_open_left=-0.35,
        eye_open_right=-0.35, lip_press=1.0, mouth_width=-0.15, mouth_curve=-0.2,
    ),
    Geometry(  # Disgust
        upper_lip_raise=1.0, nose_wrinkle=1.0, brow_raise_left=-0.45, brow_raise_right=-0.45,
        brow_inner=-0.4, eye_open_left=-0.3, eye_open_right=-0.3, mouth_curve=-0.5,
        mouth_tilt=0.3, cheek_raise=0.3,
    ),
    Geometry(  # Fear
        brow_raise_left=0.5, brow_raise_right=0.5, brow_inner=1.0, eye_open_left=0.6,
        eye_open_right=0.6, mouth_open=0.45, mouth_width=0.4, mouth_curve=-0.3,
    ),
    Geometry(  # Happiness
        mouth_curve=1.0, mouth_width=0.3, mouth_open=0.2, upper_lip_raise=0.2, cheek_raise=1.0,
        eye_open_left=-0.3, eye_open_right=-0.3,
    ),
    Geometry(  # Sadness
        brow_inner=0.85, brow_raise_left=-0.15, brow_raise_right=-0.15, mouth_curve=-0.85,
        eye_open_left=-0.35, eye_open_right=-0.35, mouth_width=-0.05, lip_press=0.3,
    ),
    Geometry(  # Surprise
        brow_raise_left=1.0, brow_raise_right=1.0, brow_inner=0.2, eye_open_left=0.7,
        eye_open_right=0.7, mouth_open=0.9, mouth_round=0.8, mouth_width=-0.2,
    ),
)  # fmt: skip
# "Other" has several unrelated looks, all asymmetric or odd, so it is a varied class.
_OTHER_PATTERNS: tuple[Geometry, ...] = (
    # sceptical: one brow up, lips pushed to one side
    Geometry(brow_raise_left=0.9, brow_raise_right=-0.2, mouth_shift=0.8, mouth_tilt=0.3,
             lip_press=0.5),
    # pout: lips pushed out and rounded, a slight frown on one side
    Geometry(mouth_round=1.0, mouth_width=-0.45, lip_press=-0.6, brow_raise_left=0.3,
             brow_inner=-0.25, eye_open_right=-0.2),
    # wink with a half smile
    Geometry(eye_open_left=-1.4, mouth_tilt=0.8, mouth_curve=0.3, cheek_raise=0.3,
             brow_raise_left=-0.3),
)  # fmt: skip
OTHER = len(_APEX)
N_VARIANTS = 2 * len(_OTHER_PATTERNS)  # bit 0: mirrored left/right; the rest: Other's pattern


def _mirrored(geometry: Geometry) -> Geometry:
    return replace(
        geometry,
        mouth_shift=-geometry.mouth_shift,
        mouth_tilt=-geometry.mouth_tilt,
        brow_raise_left=geometry.brow_raise_right,
        brow_raise_right=geometry.brow_raise_left,
        eye_open_left=geometry.eye_open_right,
        eye_open_right=geometry.eye_open_left,
    )


def expression_geometry(label: int, intensity: float, variant: int = 0) -> Geometry:
    """The face of expression class `label` at `intensity` (0 = relaxed, 1 = apex).

    Linear in intensity. `variant` in [0, N_VARIANTS) mirrors the face (bit 0) and, for Other,
    picks one of its patterns.
    """
    apex = _OTHER_PATTERNS[variant // 2 % len(_OTHER_PATTERNS)] if label == OTHER else _APEX[label]
    if variant % 2:
        apex = _mirrored(apex)
    return Geometry.from_array(apex.as_array() * intensity)


HAIR_STYLES = ("short", "fringe", "long", "curly", "bald")
_HAIR_STYLE_SHARES = (0.3, 0.15, 0.3, 0.13, 0.12)
_SKIN_LIGHT = np.array([241.0, 206.0, 180.0])
_SKIN_DARK = np.array([86.0, 56.0, 40.0])
_HAIR_COLOURS: tuple[Colour, ...] = (
    (25, 20, 18), (58, 40, 28), (105, 72, 44), (185, 148, 92), (150, 72, 36), (150, 148, 145),
)  # fmt: skip
_IRIS_COLOURS: tuple[Colour, ...] = ((68, 44, 30), (38, 28, 24), (62, 92, 122), (84, 108, 70))


@dataclass(frozen=True)
class Identity:
    """What stays the same in one person's face. Sizes are multipliers of a typical face."""

    head_width: float  # half-width of the head, face units
    head_height: float  # half-height of the head, face units
    jaw: float  # 0 round jaw .. 1 narrow chin
    skin: Colour
    hair: Colour
    hair_style: str  # one of HAIR_STYLES
    hairline: float  # y of the hairline
    eye_spacing: float
    eye_size: float
    iris: Colour
    brow_thickness: float
    brow_arch: float
    nose_length: float
    nose_width: float
    mouth_size: float
    lip_thickness: float
    lip: Colour
    expressiveness: float  # how strongly this person's expressions show
    rest: Geometry  # resting-face bias: some people look slightly happy, sad or cross at rest
    glasses: Colour | None  # frame colour, or no glasses


def _colour(values: np.ndarray) -> Colour:
    clipped = np.clip(np.round(values), 0, 255).astype(int)
    return (int(clipped[0]), int(clipped[1]), int(clipped[2]))


def _shade(colour: Colour, factor: float) -> Colour:
    return _colour(np.array(colour, dtype=np.float64) * factor)


def sample_identity(rng: np.random.Generator) -> Identity:
    """A random person."""
    skin_tone = rng.beta(1.4, 1.4)
    skin = ((1 - skin_tone) * _SKIN_LIGHT + skin_tone * _SKIN_DARK) * rng.normal(1, 0.03, 3)
    lip = skin * np.array([0.8, 0.5, 0.5]) + np.array([40.0, 0.0, 0.0])
    hair = np.array(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))]) * rng.uniform(0.85, 1.15)
    eyes_rest = rng.normal(0, 0.12)
    brows_rest = rng.normal(0, 0.1)
    return Identity(
        head_width=rng.uniform(0.82, 0.98),
        head_height=rng.uniform(0.98, 1.1),
        jaw=rng.uniform(0.0, 1.0),
        skin=_colour(skin),
        hair=_colour(hair),
        hair_style=HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=_HAIR_STYLE_SHARES)],
        hairline=rng.uniform(-0.78, -0.6),
        eye_spacing=rng.uniform(0.9, 1.1),
        eye_size=rng.uniform(0.85, 1.15),
        iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))],
        brow_thickness=rng.uniform(0.7, 1.4),
        brow_arch=rng.uniform(0.0, 1.0),
        nose_length=rng.uniform(0.85, 1.15),
        nose_width=rng.uniform(0.85, 1.2),
        mouth_size=rng.uniform(0.85, 1.15),
        lip_thickness=rng.uniform(0.7, 1.3),
        lip=_colour(lip),
        expressiveness=rng.uniform(0.85, 1.15),
        rest=Geometry(
            mouth_curve=rng.normal(0, 0.2),
            brow_inner=rng.normal(0, 0.15),
            brow_raise_left=brows_rest,
            brow_raise_right=brows_rest,
            eye_open_left=eyes_rest,
            eye_open_right=eyes_rest,
        ),
        glasses=_colour(rng.uniform(10, 120, 3)) if rng.random() < 0.2 else None,
    )


OCCLUDER_KINDS = ("hand", "bar", "object")


@dataclass(frozen=True)
class Occluder:
    """Something in front of the face (a hand, a bar, an object), placed in face units."""

    kind: str  # one of OCCLUDER_KINDS
    x: float
    y: float
    width: float
    height: float
    angle: float  # radians
    colour: Colour


@dataclass(frozen=True)
class Nuisance:
    """Everything about one image that is not the person or their expression."""

    background: Image.Image  # from sample_background(size); cropped around the face
    roll: float = 0.0  # in-plane rotation, radians
    yaw: float = 0.0  # radians; features shift sideways, the far side compresses
    pitch: float = 0.0  # radians; + looks down
    scale: float = 1.0
    shift_x: float = 0.0  # translation, fractions of the image width
    shift_y: float = 0.0
    light_angle: float = 0.0  # direction the light comes from, radians
    light_strength: float = 0.0  # 0 flat .. ~0.6 strongly one-sided
    brightness: float = 0.0  # added, 0..255 units
    contrast: float = 1.0
    colour_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gain
    blur: float = 0.0  # Gaussian radius, output pixels
    motion_blur: int = 0  # length of a motion smear, output pixels
    motion_angle: float = 0.0
    noise: float = 0.0  # sensor noise standard deviation, 0..255 units
    noise_seed: int = 0
    occluder: Occluder | None = None


def sample_background(rng: np.random.Generator, size: int = 112) -> Image.Image:
    """An out-of-focus cluttered scene, larger than the image so that it can pan."""
    side = size + size // 2  # the margin lets the camera pan
    base = rng.uniform(40, 210, 3)
    image = Image.new("RGB", (side, side), _colour(base))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 10)):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * side
        w, h = rng.uniform(0.1, 0.6, 2) * side
        colour = _colour(base + rng.normal(0, 45, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 3.0)))
    return image.resize((side * SUPERSAMPLE, side * SUPERSAMPLE), Image.Resampling.BILINEAR)


class _Projector:
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
        inside = 1 - (x / self.radius_x) ** 2 - ((y - _HEAD_Y) / self.radius_y) ** 2
        return _HEAD_DEPTH * np.sqrt(np.maximum(inside, 0.0))

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


class _Painter(_Projector):
    """A projector that draws on its canvas."""

    def __init__(self, image: Image.Image, identity: Identity, nuisance: Nuisance) -> None:
        super().__init__(image.width, identity, nuisance)
        self.draw = ImageDraw.Draw(image)

    def project(self, points: np.ndarray, lift: float = 0.0) -> list[float]:
        """Canvas coordinates, flat [x0, y0, x1, y1, ...], as ImageDraw takes them."""
        return self.canvas_points(points, lift).ravel().tolist()

    def polygon(self, points: np.ndarray, colour: Colour, lift: float = 0.0) -> None:
        self.draw.polygon(self.project(points, lift), fill=colour)

    def line(self, points: np.ndarray, colour: Colour, width: float, lift: float = 0.0) -> None:
        pixels = max(1, round(width * self.unit))
        self.draw.line(self.project(points, lift), fill=colour, width=pixels)


@lru_cache(maxsize=8)
def _circle(points: int) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _ellipse(cx: float, cy: float, rx: float, ry: float, points: int = 20) -> np.ndarray:
    return _circle(points) * (rx, ry) + (cx, cy)


def _curve(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.stack([xs, ys], axis=1)


def _bezier(start: tuple, control: tuple, end: tuple, points: int = 9) -> np.ndarray:
    t = np.linspace(0, 1, points)[:, None]
    return (1 - t) ** 2 * np.array(start) + 2 * t * (1 - t) * np.array(control) + t**2 * end


def _head_outline(identity: Identity, jaw_drop: float) -> np.ndarray:
    outline = _ellipse(0.0, _HEAD_Y, identity.head_width, identity.head_height, 40)
    return _jaw_shaped(identity, jaw_drop, outline)


def _jaw_shaped(identity: Identity, jaw_drop: float, outline: np.ndarray) -> np.ndarray:
    """Points of the head ellipse narrowed towards the chin and moved down by a dropped jaw."""
    chin = _HEAD_Y + identity.head_height
    below = np.clip((outline[:, 1] - 0.2) / (chin - 0.2), 0.0, 1.0)
    outline[:, 0] *= 1 - identity.jaw * 0.32 * below**2
    outline[:, 1] += jaw_drop * below
    return outline


def _hair_cap(identity: Identity, grow: float, lowest: float) -> np.ndarray:
    """The hair over the top of the head, down to `lowest` at the temples."""
    rx, ry = identity.head_width + grow, identity.head_height + grow
    # the arc of the (grown) head ellipse above `lowest`, then the hairline back across
    top = np.arcsin(np.clip((lowest - _HEAD_Y) / ry, -1.0, 1.0))
    angles = np.linspace(np.pi - top, 2 * np.pi + top, 24)
    arc = _curve(rx * np.cos(angles), _HEAD_Y + ry * np.sin(angles))
    hairline = _curve(
        np.linspace(arc[-1, 0], arc[0, 0], 9),
        identity.hairline + 0.12 * np.linspace(-1, 1, 9) ** 2,
    )
    return np.concatenate([arc, hairline])


def _draw_hair_behind(painter: _Painter, identity: Identity) -> None:
    if identity.hair_style == "long":
        w = identity.head_width + 0.16
        back = _ellipse(0.0, _HEAD_Y + 0.3, w, identity.head_height + 0.35, 28)
        painter.polygon(back, identity.hair, lift=-_HEAD_DEPTH)
    elif identity.hair_style == "curly":
        puff = _ellipse(0.0, _HEAD_Y - 0.15, identity.head_width + 0.3, identity.head_height + 0.1)
        painter.polygon(puff, identity.hair, lift=-_HEAD_DEPTH)


def _draw_hair_front(painter: _Painter, identity: Identity) -> None:
    if identity.hair_style == "bald":
        return
    painter.polygon(_hair_cap(identity, 0.04, identity.hairline + 0.2), identity.hair)
    if identity.hair_style == "fringe":
        xs = np.linspace(-0.75, 0.75, 11)
        jagged = identity.hairline + 0.22 + 0.05 * (np.arange(11) % 2)
        fringe = np.concatenate([_curve(xs, jagged), _curve(xs[::-1], np.full(11, -0.9))])
        painter.polygon(fringe, identity.hair, lift=0.02)


def _draw_head(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    shadow = _shade(identity.skin, 0.82)
    painter.polygon(
        _curve(np.array([-0.42, 0.42, 0.45, -0.45]), np.array([0.4, 0.4, 1.6, 1.6])),
        shadow,
        lift=-_HEAD_DEPTH,
    )
    for side in (-1, 1):
        ear = _ellipse(side * identity.head_width * 0.98, -0.12, 0.11, 0.2, 14)
        painter.polygon(ear, shadow, lift=-0.3)
    painter.polygon(_head_outline(identity, _jaw_drop(geometry)), identity.skin)
    if geometry.cheek_raise > 0.05:
        blush = _colour(np.array(identity.skin) * (1 - 0.07 * geometry.cheek_raise) + (6, 0, 0))
        lift = 0.07 * geometry.cheek_raise
        for side in (-1, 1):
            painter.polygon(_ellipse(side * 0.42, 0.1 - lift, 0.17, 0.11, 14), blush)


def _draw_folds(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    """Nasolabial folds: faint at rest, deep when smiling or sneering."""
    depth = 0.12 + 0.5 * max(geometry.cheek_raise, geometry.upper_lip_raise, 0.0)
    colour = _shade(identity.skin, 1 - 0.3 * min(depth, 1.0))
    corner = _mouth_corner_x(identity, geometry)
    for side in (-1, 1):
        fold = _bezier(
            (side * 0.15, 0.1),
            (side * (corner + 0.1), 0.26 - 0.05 * geometry.cheek_raise),
            (side * (corner + 0.06), _MOUTH_Y + 0.06),
            7,
        )
        painter.line(fold, colour, 0.014)


def _jaw_drop(geometry: Geometry) -> float:
    return 0.14 * max(geometry.mouth_open, 0.0)


def _eye_open_factor(openness: float) -> float:
    return max(0.04, 1 + openness)


@dataclass(frozen=True)
class _Lids:
    """One eye's lid curves over `u` in [-1, 1] (image left to right)."""

    u: np.ndarray
    xs: np.ndarray
    upper: np.ndarray
    lower: np.ndarray
    cx: float
    half_w: float
    half_h: float


def _eye_lids(identity: Identity, side: int, openness: float, cheek_raise: float) -> _Lids:
    cx, half_w = side * 0.36 * identity.eye_spacing, 0.16 * identity.eye_size
    half_h = 0.075 * identity.eye_size * _eye_open_factor(openness)
    u = np.linspace(-1, 1, 11)
    xs = cx + half_w * u
    upper = _EYE_Y - half_h * (1 - u**2) ** 0.8 - 0.01 * side * u  # outer corner slightly higher
    lower = _EYE_Y + half_h * (0.8 - 0.35 * max(cheek_raise, 0.0)) * (1 - u**2) ** 0.9
    return _Lids(u, xs, upper, lower, cx, half_w, half_h)


def _draw_eye(
    painter: _Painter, identity: Identity, side: int, openness: float, cheek_raise: float
) -> None:
    lids = _eye_lids(identity, side, openness, cheek_raise)
    u, xs, upper, lower = lids.u, lids.xs, lids.upper, lids.lower
    cx, half_w, half_h = lids.cx, lids.half_w, lids.half_h
    painter.polygon(_loop(xs, upper, lower), _SCLERA)
    iris_r = 0.062 * identity.eye_size
    for radius, colour in ((iris_r, identity.iris), (0.45 * iris_r, (15, 12, 12))):
        disc = _ellipse(cx, _EYE_Y + 0.1 * half_h, radius, radius, 16)
        # clip the disc between the lids: the lid shapes are functions of x
        u_disc = np.clip((disc[:, 0] - cx) / half_w, -1, 1)
        top = np.interp(u_disc, u, upper)
        bottom = np.interp(u_disc, u, lower)
        disc[:, 1] = np.clip(disc[:, 1], top, np.maximum(top, bottom))
        painter.polygon(disc, colour)
    lid = _shade(identity.hair, 0.6)
    painter.line(_curve(xs, upper - 0.006), lid, 0.022)
    painter.line(_curve(xs[2:-2], lower[2:-2] + 0.012), _shade(identity.skin, 0.78), 0.01)


def _brow_spine(identity: Identity, geometry: Geometry, side: int) -> np.ndarray:
    """The brow's centre line, 9 points from its inner end to its outer end."""
    raise_ = geometry.brow_raise_left if side < 0 else geometry.brow_raise_right
    centre = side * 0.36 * identity.eye_spacing
    squeeze = 0.04 * max(-geometry.brow_inner, 0.0)
    inner = (
        centre - side * (0.15 - squeeze),
        _BROW_Y - 0.16 * raise_ - 0.17 * geometry.brow_inner,
    )
    outer = (centre + side * 0.19, _BROW_Y - 0.15 * raise_ + 0.05 * geometry.brow_inner + 0.03)
    arch = 0.02 + 0.05 * identity.brow_arch
    middle = (centre + side * 0.03, _BROW_Y - arch - 0.17 * raise_ - 0.04 * geometry.brow_inner)
    return _bezier(inner, middle, outer)


def _draw_brows(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    colour = _shade(identity.hair, 0.6)
    for side in (-1, 1):
        spine = _brow_spine(identity, geometry, side)
        thickness = 0.05 * identity.brow_thickness * np.linspace(1.0, 0.45, len(spine))
        painter.polygon(
            _loop(spine[:, 0], spine[:, 1] - thickness, spine[:, 1] + thickness / 2), colour
        )
    lines = _shade(identity.skin, 0.75)
    frown = max(-geometry.brow_inner, 0.0)
    if frown > 0.15:  # vertical furrows between lowered brows
        for x in (-0.04, 0.04):
            painter.line(
                _curve(np.array([x, x * 1.3]), np.array([-0.42, -0.3])),
                _shade(identity.skin, 1 - 0.3 * frown),
                0.012,
            )
    lift = (geometry.brow_raise_left + geometry.brow_raise_right) / 2
    if lift > 0.25:  # forehead lines above raised brows
        for y in (-0.6, -0.68):
            xs = np.linspace(-0.3, 0.3, 7)
            painter.line(_curve(xs, y + 0.02 * np.cos(xs * 5)), lines, 0.008 + 0.008 * lift)


def _nose_tip_and_wing(identity: Identity, geometry: Geometry) -> tuple[float, float]:
    """y of the nose tip and half-width of the nostril wings (a wrinkled nose lifts and widens)."""
    wrinkle = max(geometry.nose_wrinkle, 0.0)
    tip = 0.13 * identity.nose_length - 0.03 * wrinkle
    wing = 0.1 * identity.nose_width * (1 + 0.15 * wrinkle)
    return tip, wing


def _draw_nose(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    line = _shade(identity.skin, 0.72)
    wrinkle = max(geometry.nose_wrinkle, 0.0)
    tip, wing = _nose_tip_and_wing(identity, geometry)
    painter.line(_bezier((0.06, -0.16), (0.09, 0.0), (0.07, tip - 0.03), 5), line, 0.012, 0.2)
    painter.line(
        _bezier((-wing, tip - 0.02), (0.0, tip + 0.07), (wing, tip - 0.02), 7), line, 0.016, 0.25
    )
    for side in (-1, 1):
        nostril = _ellipse(side * 0.045, tip + 0.015, 0.025, 0.013, 10)
        painter.polygon(nostril, _shade(identity.skin, 0.45), lift=0.22)
    if wrinkle > 0.2:
        crease = _shade(identity.skin, 1 - 0.35 * wrinkle)
        for y in (-0.13, -0.08, -0.03):
            painter.line(
                _curve(np.array([-0.06, 0.0, 0.06]), np.array([y, y - 0.015, y])),
                crease,
                0.01,
                0.15,
            )


def _mouth_corner_x(identity: Identity, geometry: Geometry) -> float:
    narrowing = 1 - 0.3 * max(geometry.mouth_round, 0.0)
    return 0.28 * identity.mouth_size * (1 + 0.35 * geometry.mouth_width) * narrowing


@dataclass(frozen=True)
class _Lips:
    """The lip curves over `u` in [-1, 1] (image left to right corner)."""

    u: np.ndarray
    xs: np.ndarray
    upper_inner: np.ndarray
    lower_inner: np.ndarray
    upper_outer: np.ndarray
    lower_outer: np.ndarray


def _lips(identity: Identity, geometry: Geometry) -> _Lips:
    half_w = _mouth_corner_x(identity, geometry)
    u = np.linspace(-1, 1, 15)
    xs = 0.09 * geometry.mouth_shift + half_w * u
    centre = (
        _MOUTH_Y
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
    return _Lips(u, xs, upper_inner, lower_inner, upper_outer, lower_outer)


def _draw_mouth(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    lips = _lips(identity, geometry)
    xs, upper_inner, lower_inner = lips.xs, lips.upper_inner, lips.lower_inner
    upper_outer, lower_outer = lips.upper_outer, lips.lower_outer
    painter.polygon(_loop(xs, upper_outer, lower_outer), identity.lip, lift=0.05)
    if (lower_inner - upper_inner).max() > 0.006:
        painter.polygon(_loop(xs, upper_inner, lower_inner), _MOUTH_INTERIOR, lift=0.05)
        teeth_bottom = np.minimum(upper_inner + 0.05, lower_inner)
        painter.polygon(_loop(xs, upper_inner, teeth_bottom), _TEETH, lift=0.05)
    painter.line(_curve(xs, upper_inner), _shade(identity.lip, 0.55), 0.012, lift=0.05)


def _loop(xs: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """The closed outline between two curves over the same xs."""
    return np.concatenate([_curve(xs, top), _curve(xs[::-1], bottom[::-1])])


def _draw_glasses(painter: _Painter, identity: Identity) -> None:
    if identity.glasses is None:
        return
    for side in (-1, 1):
        rim = _ellipse(side * 0.36 * identity.eye_spacing, _EYE_Y, 0.21, 0.14, 16)
        painter.line(np.concatenate([rim, rim[:1]]), identity.glasses, 0.02, lift=0.1)
    bridge = _curve(np.array([-0.15, 0.0, 0.15]), np.array([-0.24, -0.27, -0.24]))
    painter.line(bridge, identity.glasses, 0.02, lift=0.1)


def _draw_occluder(painter: _Painter, occluder: Occluder) -> None:
    cos_a, sin_a = np.cos(occluder.angle), np.sin(occluder.angle)
    rotation = np.array([[cos_a, sin_a], [-sin_a, cos_a]])
    centre = np.array([occluder.x, occluder.y])
    half_size = np.array([occluder.width, occluder.height]) / 2
    if occluder.kind == "bar":
        shape = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    else:  # a hand or a held object: a rounded blob, squarer for an object
        circle = _circle(20)
        shape = np.sign(circle) * np.abs(circle) ** (0.6 if occluder.kind == "object" else 0.9)
    painter.polygon((shape * half_size) @ rotation + centre, occluder.colour, lift=0.5)
    if occluder.kind == "hand":  # the gaps between the fingers
        crease = _shade(occluder.colour, 0.7)
        for k in (-1, 0, 1):
            finger_gap = np.array([[k / 3, -0.9], [k / 3, 0.2]]) * half_size
            painter.line(finger_gap @ rotation + centre, crease, 0.012, lift=0.5)


@lru_cache(maxsize=4)
def _light_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    return axis[None, :, None], axis[:, None, None]


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Fixed standard-normal noise; a frame takes a seeded window of it (cheaper than drawing)."""
    return np.random.default_rng(20240).standard_normal(1 << 18, dtype=np.float32)


def _noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    count = int(np.prod(shape))
    bank = _noise_bank()
    start = seed % (len(bank) - count)
    return bank[start : start + count].reshape(shape)


def _motion_smear(pixels: np.ndarray, length: int, angle: float) -> np.ndarray:
    step = np.array([np.cos(angle), np.sin(angle)])
    total = np.zeros_like(pixels)
    for k in range(length):
        dx, dy = np.round(step * (k - (length - 1) / 2)).astype(int)
        total += np.roll(pixels, (dy, dx), axis=(0, 1))
    return total / length


def _photometric(image: Image.Image, nuisance: Nuisance) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    if nuisance.motion_blur > 1:
        pixels = _motion_smear(pixels, nuisance.motion_blur, nuisance.motion_angle)
    grid_x, grid_y = _light_grid(image.width)
    # python floats keep the arithmetic in float32 (numpy scalars would promote it to float64)
    light_x = nuisance.light_strength * float(np.cos(nuisance.light_angle))
    light_y = nuisance.light_strength * float(np.sin(nuisance.light_angle))
    gain = (1 + grid_x * light_x + grid_y * light_y) * np.array(nuisance.colour_cast, np.float32)
    pixels = (pixels - 128) * nuisance.contrast + (128 + nuisance.brightness)
    pixels *= gain
    if nuisance.noise > 0:
        pixels += _noise(pixels.shape, nuisance.noise_seed) * nuisance.noise
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def render_face(
    identity: Identity, geometry: Geometry, nuisance: Nuisance, size: int = 112
) -> Image.Image:
    """One RGB image of `identity` making `geometry`, seen through `nuisance`."""
    canvas_size = size * SUPERSAMPLE
    margin = nuisance.background.width - canvas_size
    # the background pans a little with the face (the camera follows the person)
    left = int(np.clip(margin / 2 - 0.4 * nuisance.shift_x * canvas_size, 0, margin))
    top = int(np.clip(margin / 2 - 0.4 * nuisance.shift_y * canvas_size, 0, margin))
    canvas = nuisance.background.crop((left, top, left + canvas_size, top + canvas_size))
    painter = _Painter(canvas, identity, nuisance)
    _draw_hair_behind(painter, identity)
    _draw_head(painter, identity, geometry)
    _draw_hair_front(painter, identity)
    _draw_folds(painter, identity, geometry)
    for side, openness in ((-1, geometry.eye_open_left), (1, geometry.eye_open_right)):
        _draw_eye(painter, identity, side, openness, geometry.cheek_raise)
    _draw_brows(painter, identity, geometry)
    _draw_nose(painter, identity, geometry)
    _draw_mouth(painter, identity, geometry)
    _draw_glasses(painter, identity)
    if nuisance.occluder is not None:
        _draw_occluder(painter, nuisance.occluder)
    image = canvas.reduce(SUPERSAMPLE)
    if nuisance.blur > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(nuisance.blur))
    return _photometric(image, nuisance)


LANDMARKS = 68  # the iBUG 300-W layout
_NOSE_LIFT, _MOUTH_LIFT = 0.25, 0.05  # how far the nose tip and the lips stand off the face


def face_landmarks(
    identity: Identity, geometry: Geometry, nuisance: Nuisance, size: int = 112
) -> np.ndarray:
    """The 68 (x, y) landmarks of the face `render_face` draws, in pixels of its output.

    iBUG 300-W order: jaw 0-16, brows 17-26, nose bridge 27-30 and base 31-35, eyes 36-47
    (corner, two upper-lid points, corner, two lower-lid points each), outer lips 48-59, inner
    lips 60-67; every group runs from the image's left (the subject's right). The points lie on
    the drawn shapes and go through the same head pose, so they move with pose and expression.
    """
    parts = [
        (_jaw_points(identity, geometry), np.zeros(17)),
        (_brow_points(identity, geometry), np.zeros(10)),
        _nose_points(identity, geometry),
        (_eye_points(identity, geometry), np.zeros(12)),
        (_lip_points(identity, geometry), np.full(20, _MOUTH_LIFT)),
    ]
    points = np.concatenate([points for points, _ in parts])
    lift = np.concatenate([lift for _, lift in parts])
    projector = _Projector(size * SUPERSAMPLE, identity, nuisance)
    return projector.canvas_points(points, lift) / SUPERSAMPLE


def _jaw_points(identity: Identity, geometry: Geometry) -> np.ndarray:
    """17 points of the head outline from ear height on the left, round the chin, to the right."""
    angles = np.linspace(np.pi, 0.0, 17)
    radii, centre = np.array([identity.head_width, identity.head_height]), np.array([0.0, _HEAD_Y])
    ellipse = _curve(np.cos(angles), np.sin(angles)) * radii + centre
    return _jaw_shaped(identity, _jaw_drop(geometry), ellipse)


def _brow_points(identity: Identity, geometry: Geometry) -> np.ndarray:
    every_other = [0, 2, 4, 6, 8]
    left = _brow_spine(identity, geometry, -1)[every_other[::-1]]  # outer end first
    right = _brow_spine(identity, geometry, 1)[every_other]  # inner end first
    return np.concatenate([left, right])


def _nose_points(identity: Identity, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Bridge (4, from between the eyes to the tip) and base (5, wing to wing), with lifts."""
    tip, wing = _nose_tip_and_wing(identity, geometry)
    bridge = _curve(np.zeros(4), np.linspace(_EYE_Y, tip, 4))
    base = _bezier((-wing, tip - 0.02), (0.0, tip + 0.07), (wing, tip - 0.02), 5)
    lift = np.concatenate([np.linspace(0.1, _NOSE_LIFT, 4), np.full(5, _NOSE_LIFT)])
    return np.concatenate([bridge, base]), lift


def _eye_points(identity: Identity, geometry: Geometry) -> np.ndarray:
    corners_and_lids = np.array([-1.0, -1 / 3, 1 / 3, 1.0, 1 / 3, -1 / 3])
    on_upper = np.array([False, True, True, False, False, False])
    points = []
    for side, openness in ((-1, geometry.eye_open_left), (1, geometry.eye_open_right)):
        lids = _eye_lids(identity, side, openness, geometry.cheek_raise)
        xs = lids.cx + lids.half_w * corners_and_lids
        upper = np.interp(corners_and_lids, lids.u, lids.upper)
        lower = np.interp(corners_and_lids, lids.u, lids.lower)
        points.append(_curve(xs, np.where(on_upper, upper, lower)))
    return np.concatenate(points)


def _lip_points(identity: Identity, geometry: Geometry) -> np.ndarray:
    lips = _lips(identity, geometry)
    outer_upper, outer_lower = np.linspace(-1, 1, 7), np.linspace(2 / 3, -2 / 3, 5)
    inner_upper, inner_lower = np.linspace(-1, 1, 5), np.array([0.5, 0.0, -0.5])

    def along(u: np.ndarray, curve: np.ndarray) -> np.ndarray:
        return _curve(np.interp(u, lips.u, lips.xs), np.interp(u, lips.u, curve))

    return np.concatenate(
        [
            along(outer_upper, lips.upper_outer),
            along(outer_lower, lips.lower_outer),
            along(inner_upper, lips.upper_inner),
            along(inner_lower, lips.lower_inner),
        ]
    )

"""Drawing a face: the background, the head and its features, occluders, camera degradations.

A face is a stack of polygons and lines in face units (see `shapes`), drawn at twice the output
size and downsampled for anti-aliasing, then degraded by blur, lighting, colour cast and sensor
noise. Nothing here draws random numbers of its own except `sample_background` (from the
caller's generator) and the sensor noise (from `Nuisance.noise_seed`): the same inputs always
give the same pixels.
"""

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fercache.synth.face import Colour, Geometry, Identity, Nuisance, Occluder, shade, to_colour
from fercache.synth.shapes import (
    EYE_Y,
    HEAD_DEPTH,
    HEAD_Y,
    MOUTH_Y,
    SUPERSAMPLE,
    Projector,
    bezier,
    brow_spine,
    closed_outline,
    ellipse,
    eye_lids,
    jaw_drop_of,
    jaw_shaped,
    lip_curves,
    mouth_corner_x,
    nose_tip_and_wing,
    polyline,
    unit_circle,
)

_MOUTH_INTERIOR = (70, 25, 30)
_TEETH = (236, 232, 220)
_SCLERA = (236, 234, 228)


def sample_background(rng: np.random.Generator, size: int = 112) -> Image.Image:
    """An out-of-focus cluttered scene, larger than the image so that it can pan."""
    side = size + size // 2  # the margin lets the camera pan
    base = rng.uniform(40, 210, 3)
    image = Image.new("RGB", (side, side), to_colour(base))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 10)):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * side
        w, h = rng.uniform(0.1, 0.6, 2) * side
        colour = to_colour(base + rng.normal(0, 45, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 3.0)))
    return image.resize((side * SUPERSAMPLE, side * SUPERSAMPLE), Image.Resampling.BILINEAR)


class _Painter(Projector):
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


def _head_outline(identity: Identity, jaw_drop: float) -> np.ndarray:
    outline = ellipse(0.0, HEAD_Y, identity.head_width, identity.head_height, 40)
    return jaw_shaped(identity, jaw_drop, outline)


def _hair_cap(identity: Identity, grow: float, lowest: float) -> np.ndarray:
    """The hair over the top of the head, down to `lowest` at the temples."""
    rx, ry = identity.head_width + grow, identity.head_height + grow
    # the arc of the (grown) head ellipse above `lowest`, then the hairline back across
    top = np.arcsin(np.clip((lowest - HEAD_Y) / ry, -1.0, 1.0))
    angles = np.linspace(np.pi - top, 2 * np.pi + top, 24)
    arc = polyline(rx * np.cos(angles), HEAD_Y + ry * np.sin(angles))
    hairline = polyline(
        np.linspace(arc[-1, 0], arc[0, 0], 9),
        identity.hairline + 0.12 * np.linspace(-1, 1, 9) ** 2,
    )
    return np.concatenate([arc, hairline])


def _draw_hair_behind(painter: _Painter, identity: Identity) -> None:
    if identity.hair_style == "long":
        w = identity.head_width + 0.16
        back = ellipse(0.0, HEAD_Y + 0.3, w, identity.head_height + 0.35, 28)
        painter.polygon(back, identity.hair, lift=-HEAD_DEPTH)
    elif identity.hair_style == "curly":
        puff = ellipse(0.0, HEAD_Y - 0.15, identity.head_width + 0.3, identity.head_height + 0.1)
        painter.polygon(puff, identity.hair, lift=-HEAD_DEPTH)


def _draw_hair_front(painter: _Painter, identity: Identity) -> None:
    if identity.hair_style == "bald":
        return
    painter.polygon(_hair_cap(identity, 0.04, identity.hairline + 0.2), identity.hair)
    if identity.hair_style == "fringe":
        xs = np.linspace(-0.75, 0.75, 11)
        jagged = identity.hairline + 0.22 + 0.05 * (np.arange(11) % 2)
        fringe = np.concatenate([polyline(xs, jagged), polyline(xs[::-1], np.full(11, -0.9))])
        painter.polygon(fringe, identity.hair, lift=0.02)


def _draw_head(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    shadow = shade(identity.skin, 0.82)
    painter.polygon(
        polyline(np.array([-0.42, 0.42, 0.45, -0.45]), np.array([0.4, 0.4, 1.6, 1.6])),
        shadow,
        lift=-HEAD_DEPTH,
    )
    for side in (-1, 1):
        ear = ellipse(side * identity.head_width * 0.98, -0.12, 0.11, 0.2, 14)
        painter.polygon(ear, shadow, lift=-0.3)
    painter.polygon(_head_outline(identity, jaw_drop_of(geometry)), identity.skin)
    if geometry.cheek_raise > 0.05:
        blush = to_colour(np.array(identity.skin) * (1 - 0.07 * geometry.cheek_raise) + (6, 0, 0))
        lift = 0.07 * geometry.cheek_raise
        for side in (-1, 1):
            painter.polygon(ellipse(side * 0.42, 0.1 - lift, 0.17, 0.11, 14), blush)


def _draw_folds(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    """Nasolabial folds: faint at rest, deep when smiling or sneering."""
    depth = 0.12 + 0.5 * max(geometry.cheek_raise, geometry.upper_lip_raise, 0.0)
    colour = shade(identity.skin, 1 - 0.3 * min(depth, 1.0))
    corner = mouth_corner_x(identity, geometry)
    for side in (-1, 1):
        fold = bezier(
            (side * 0.15, 0.1),
            (side * (corner + 0.1), 0.26 - 0.05 * geometry.cheek_raise),
            (side * (corner + 0.06), MOUTH_Y + 0.06),
            7,
        )
        painter.line(fold, colour, 0.014)


def _draw_eye(
    painter: _Painter, identity: Identity, side: int, openness: float, cheek_raise: float
) -> None:
    lids = eye_lids(identity, side, openness, cheek_raise)
    u, xs, upper, lower = lids.u, lids.xs, lids.upper, lids.lower
    cx, half_w, half_h = lids.cx, lids.half_w, lids.half_h
    painter.polygon(closed_outline(xs, upper, lower), _SCLERA)
    iris_r = 0.062 * identity.eye_size
    for radius, colour in ((iris_r, identity.iris), (0.45 * iris_r, (15, 12, 12))):
        disc = ellipse(cx, EYE_Y + 0.1 * half_h, radius, radius, 16)
        # clip the disc between the lids: the lid shapes are functions of x
        u_disc = np.clip((disc[:, 0] - cx) / half_w, -1, 1)
        top = np.interp(u_disc, u, upper)
        bottom = np.interp(u_disc, u, lower)
        disc[:, 1] = np.clip(disc[:, 1], top, np.maximum(top, bottom))
        painter.polygon(disc, colour)
    lid = shade(identity.hair, 0.6)
    painter.line(polyline(xs, upper - 0.006), lid, 0.022)
    painter.line(polyline(xs[2:-2], lower[2:-2] + 0.012), shade(identity.skin, 0.78), 0.01)


def _draw_brows(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    colour = shade(identity.hair, 0.6)
    for side in (-1, 1):
        spine = brow_spine(identity, geometry, side)
        thickness = 0.05 * identity.brow_thickness * np.linspace(1.0, 0.45, len(spine))
        painter.polygon(
            closed_outline(spine[:, 0], spine[:, 1] - thickness, spine[:, 1] + thickness / 2),
            colour,
        )
    lines = shade(identity.skin, 0.75)
    frown = max(-geometry.brow_inner, 0.0)
    if frown > 0.15:  # vertical furrows between lowered brows
        for x in (-0.04, 0.04):
            painter.line(
                polyline(np.array([x, x * 1.3]), np.array([-0.42, -0.3])),
                shade(identity.skin, 1 - 0.3 * frown),
                0.012,
            )
    lift = (geometry.brow_raise_left + geometry.brow_raise_right) / 2
    if lift > 0.25:  # forehead lines above raised brows
        for y in (-0.6, -0.68):
            xs = np.linspace(-0.3, 0.3, 7)
            painter.line(polyline(xs, y + 0.02 * np.cos(xs * 5)), lines, 0.008 + 0.008 * lift)


def _draw_nose(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    line = shade(identity.skin, 0.72)
    wrinkle = max(geometry.nose_wrinkle, 0.0)
    tip, wing = nose_tip_and_wing(identity, geometry)
    painter.line(bezier((0.06, -0.16), (0.09, 0.0), (0.07, tip - 0.03), 5), line, 0.012, 0.2)
    painter.line(
        bezier((-wing, tip - 0.02), (0.0, tip + 0.07), (wing, tip - 0.02), 7), line, 0.016, 0.25
    )
    for side in (-1, 1):
        nostril = ellipse(side * 0.045, tip + 0.015, 0.025, 0.013, 10)
        painter.polygon(nostril, shade(identity.skin, 0.45), lift=0.22)
    if wrinkle > 0.2:
        crease = shade(identity.skin, 1 - 0.35 * wrinkle)
        for y in (-0.13, -0.08, -0.03):
            painter.line(
                polyline(np.array([-0.06, 0.0, 0.06]), np.array([y, y - 0.015, y])),
                crease,
                0.01,
                0.15,
            )


def _draw_mouth(painter: _Painter, identity: Identity, geometry: Geometry) -> None:
    lips = lip_curves(identity, geometry)
    xs, upper_inner, lower_inner = lips.xs, lips.upper_inner, lips.lower_inner
    upper_outer, lower_outer = lips.upper_outer, lips.lower_outer
    painter.polygon(closed_outline(xs, upper_outer, lower_outer), identity.lip, lift=0.05)
    if (lower_inner - upper_inner).max() > 0.006:
        painter.polygon(closed_outline(xs, upper_inner, lower_inner), _MOUTH_INTERIOR, lift=0.05)
        teeth_bottom = np.minimum(upper_inner + 0.05, lower_inner)
        painter.polygon(closed_outline(xs, upper_inner, teeth_bottom), _TEETH, lift=0.05)
    painter.line(polyline(xs, upper_inner), shade(identity.lip, 0.55), 0.012, lift=0.05)


def _draw_glasses(painter: _Painter, identity: Identity) -> None:
    if identity.glasses is None:
        return
    for side in (-1, 1):
        rim = ellipse(side * 0.36 * identity.eye_spacing, EYE_Y, 0.21, 0.14, 16)
        painter.line(np.concatenate([rim, rim[:1]]), identity.glasses, 0.02, lift=0.1)
    bridge = polyline(np.array([-0.15, 0.0, 0.15]), np.array([-0.24, -0.27, -0.24]))
    painter.line(bridge, identity.glasses, 0.02, lift=0.1)


def _draw_occluder(painter: _Painter, occluder: Occluder) -> None:
    cos_a, sin_a = np.cos(occluder.angle), np.sin(occluder.angle)
    rotation = np.array([[cos_a, sin_a], [-sin_a, cos_a]])
    centre = np.array([occluder.x, occluder.y])
    half_size = np.array([occluder.width, occluder.height]) / 2
    if occluder.kind == "bar":
        shape = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    else:  # a hand or a held object: a rounded blob, squarer for an object
        circle = unit_circle(20)
        shape = np.sign(circle) * np.abs(circle) ** (0.6 if occluder.kind == "object" else 0.9)
    painter.polygon((shape * half_size) @ rotation + centre, occluder.colour, lift=0.5)
    if occluder.kind == "hand":  # the gaps between the fingers
        crease = shade(occluder.colour, 0.7)
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

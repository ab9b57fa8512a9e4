"""The face model of the synthetic data: expression geometry, identities and nuisance.

`Geometry` holds facial action parameters (offsets from a relaxed face), `expression_geometry`
the face of each expression class at an intensity, `Identity` what stays the same in one person's
face, `Occluder` and `Nuisance` everything about one image that is not the person or their
expression. Nothing here draws random numbers of its own except `sample_identity` (from the
caller's generator): the same inputs always give the same face.
"""

from dataclasses import astuple, dataclass, fields, replace
from functools import lru_cache

import numpy as np
from PIL import Image

from fercache.data.tasks import EXPR_CLASSES

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
GEOMETRY_FIELD = {field.name: index for index, field in enumerate(fields(Geometry))}

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


@lru_cache(maxsize=len(EXPR_CLASSES) * N_VARIANTS)
def apex_array(label: int, variant: int) -> np.ndarray:
    """`expression_geometry` at apex (intensity 1) as an array, computed once."""
    return expression_geometry(label, 1.0, variant).as_array()


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


def to_colour(values: np.ndarray) -> Colour:
    clipped = np.clip(np.round(values), 0, 255).astype(int)
    return (int(clipped[0]), int(clipped[1]), int(clipped[2]))


def shade(colour: Colour, factor: float) -> Colour:
    return to_colour(np.array(colour, dtype=np.float64) * factor)


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
        skin=to_colour(skin),
        hair=to_colour(hair),
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
        lip=to_colour(lip),
        expressiveness=rng.uniform(0.85, 1.15),
        rest=Geometry(
            mouth_curve=rng.normal(0, 0.2),
            brow_inner=rng.normal(0, 0.15),
            brow_raise_left=brows_rest,
            brow_raise_right=brows_rest,
            eye_open_left=eyes_rest,
            eye_open_right=eyes_rest,
        ),
        glasses=to_colour(rng.uniform(10, 120, 3)) if rng.random() < 0.2 else None,
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

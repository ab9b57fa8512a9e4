"""Label numberings of the expression data sets that phase 1 reads, and their map onto ABAW's
8 classes (0 Neutral, 1 Anger, 2 Disgust, 3 Fear, 4 Happiness, 5 Sadness, 6 Surprise, 7 Other).

A number means nothing without its data set: AffectNet's 1 is Happy, ABAW's 1 is Anger. So a
source of numeric labels declares its numbering (`affectnet:train.csv`); class names (any case,
with the usual spellings: happy, angry, sad, surprised, ...) need none. Classes without an ABAW
counterpart (AffectNet's Contempt, None, Uncertain, No-face) map to None: left out and counted.
Each table follows its data set's paper (docs/pretrain.md lists them with the papers).
"""

from dataclasses import dataclass

from fercache.data.tasks import EXPR_CLASSES

SEPARATOR = ":"  # NUMBERING:SOURCE


@dataclass(frozen=True)
class Numbering:
    """One data set's numbering: `classes[number]` is the data set's own class name."""

    name: str  # the declaration: abaw, affectnet, ...
    dataset: str  # the data set, as its paper names it
    classes: dict[int, str]

    def mapping(self) -> dict[str, str | None]:
        """Number (as text) -> ABAW class name, None where the class has no ABAW counterpart."""
        return {
            str(number): _abaw_name(class_of_name(name)) for number, name in self.classes.items()
        }

    def span(self) -> str:
        return f"{min(self.classes)}-{max(self.classes)}"


_AFFECTNET = (
    "Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger",
    "Contempt", "None", "Uncertain", "No-face",
)  # fmt: skip
_SEVEN = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")  # ExpW, FER2013
_RAFDB = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")

NUMBERINGS: dict[str, Numbering] = {
    numbering.name: numbering
    for numbering in (
        Numbering("abaw", "Aff-Wild2 (ABAW)", dict(enumerate(EXPR_CLASSES))),
        Numbering("affectnet", "AffectNet", dict(enumerate(_AFFECTNET))),
        Numbering("expw", "ExpW", dict(enumerate(_SEVEN))),
        Numbering("rafdb", "RAF-DB (basic)", dict(enumerate(_RAFDB, start=1))),
        Numbering("fer2013", "FER2013", dict(enumerate(_SEVEN))),
    )
}

# class names any source may use without a declaration -> ABAW index (None: no ABAW class)
_BY_NAME: dict[str, int | None] = {
    **{name.lower(): index for index, name in enumerate(EXPR_CLASSES)},
    "angry": 1,
    "disgusted": 2,
    "fearful": 3,
    "happy": 4,
    "sad": 5,
    "surprised": 6,
    "contempt": None,
    "none": None,
    "uncertain": None,
    "no-face": None,
}
_UNMAPPED_NAMES = {"contempt": "Contempt", "none": "None", "uncertain": "Uncertain"}


def choices() -> str:
    """The declarations, for messages: 'abaw, affectnet, expw, rafdb, fer2013'."""
    return ", ".join(NUMBERINGS)


def split_declaration(source: object) -> tuple[Numbering | None, str]:
    """(numbering, the rest) of `NUMBERING:SOURCE`; (None, source) when the part before the
    first colon is not a known numbering (a plain path, even one with a colon in it)."""
    text = str(source)
    head, separator, rest = text.partition(SEPARATOR)
    if separator and head.strip().lower() in NUMBERINGS:
        return NUMBERINGS[head.strip().lower()], rest
    return None, text


def class_of_name(text: str) -> int | None:
    """ABAW index of a class name (any case); None for a known class without ABAW counterpart.
    KeyError when `text` names no class at all."""
    return _BY_NAME[_normal(text)]


def is_class_name(text: str) -> bool:
    return _normal(text) in _BY_NAME


def display_name(text: str) -> str:
    """A known class name as the tables spell it (Contempt, No-face, Happiness)."""
    key = _normal(text)
    index = _BY_NAME[key]
    if index is not None:
        return EXPR_CLASSES[index]
    return _UNMAPPED_NAMES.get(key, "No-face")


def is_number(text: str) -> bool:
    try:
        int(text.strip())
    except ValueError:
        return False
    return True


def _normal(text: str) -> str:
    return "-".join(text.strip().lower().replace("_", " ").replace("-", " ").split())


def _abaw_name(index: int | None) -> str | None:
    return None if index is None else EXPR_CLASSES[index]

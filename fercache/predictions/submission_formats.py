"""The ABAW submission formats, one object each, and their registry: `fercache submit --task NAME`
writes the format `SUBMISSION_FORMATS[NAME]`, and `read_submission` reads it back.

A submission is a text file: a header `image_location,<columns>`, then one row per required
frame, `<video>/<%05d>.jpg,<values>`:
- expr: the columns `Neutral,...,Other`, the value a label in 0..7 (the PRED's `labels`,
  voted or not);
- au: the columns `AU1,...,AU26`, 12 decisions `probability >= threshold` with the PRED's
  `au_thresholds` (0.5 unless tuned), each 0 or 1;
- va: the columns `valence,arousal`, both in [-1, 1] with six decimals.

A new format is a `SubmissionFormat` (its two functions in its own module, or here) and one line
in `SUBMISSION_FORMATS`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, VA_NAMES
from fercache.errors import FercacheError
from fercache.framewise.pred_file import VideoPredictions

# (a video's predictions, the rows to submit, the PRED's per-AU thresholds) -> each row's text
RowTexts = Callable[[VideoPredictions, np.ndarray, np.ndarray], list[str]]


@dataclass(frozen=True)
class SubmissionFormat:
    """One kind of submission: the PRED task it submits, its columns after image_location, how
    it writes the values of a video's rows (`texts`) and reads one row's back (`values`: None
    when the text does not fit)."""

    task: str  # expr, au or va
    columns: tuple[str, ...]
    description: str  # what a row holds, for `fercache submit --help`
    row_shape: str  # what follows the image location, for errors
    texts: RowTexts
    values: Callable[[str], object | None]
    dtype: type = np.float32  # of the values read back

    @property
    def header(self) -> str:
        return ",".join(["image_location", *self.columns])


def _labels(entry: VideoPredictions, index: np.ndarray, thresholds: np.ndarray) -> list[str]:
    return [str(label) for label in entry.labels[index]]


def _label(text: str) -> int | None:
    return int(text) if text in {str(c) for c in range(len(EXPR_CLASSES))} else None


def _decisions(entry: VideoPredictions, index: np.ndarray, thresholds: np.ndarray) -> list[str]:
    return [",".join(map(str, row)) for row in (entry.au[index] >= thresholds).astype(int)]


def _decision_row(text: str) -> list[int] | None:
    fields = text.split(",")
    ok = len(fields) == len(AU_NAMES) and all(field in ("0", "1") for field in fields)
    return [int(field) for field in fields] if ok else None


def _va(entry: VideoPredictions, index: np.ndarray, thresholds: np.ndarray) -> list[str]:
    return [f"{valence:.6f},{arousal:.6f}" for valence, arousal in entry.va[index]]


def _va_row(text: str) -> list[float] | None:
    try:
        values = [float(field) for field in text.split(",")]
    except ValueError:
        return None
    ok = len(values) == len(VA_NAMES) and all(-1 <= value <= 1 for value in values)
    return values if ok else None


SUBMISSION_FORMATS: dict[str, SubmissionFormat] = {
    "expr": SubmissionFormat(
        "expr", EXPR_CLASSES, "label 0-7", "<label 0-7>", _labels, _label, np.int64
    ),
    "au": SubmissionFormat(
        "au", AU_NAMES, "12 decisions at the PRED's thresholds", "<12 comma-separated 0/1>",
        _decisions, _decision_row, np.int64,
    ),
    "va": SubmissionFormat(
        "va", VA_NAMES, "valence,arousal", "<valence>,<arousal> in [-1, 1]", _va, _va_row
    ),
}  # fmt: skip


def submission_format(name: str) -> SubmissionFormat:
    """The registered format `name`; a FercacheError naming the registered ones otherwise."""
    if name not in SUBMISSION_FORMATS:
        raise FercacheError(f"unknown task '{name}': choose one of {', '.join(SUBMISSION_FORMATS)}")
    return SUBMISSION_FORMATS[name]

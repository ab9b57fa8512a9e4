"""The three Aff-Wild2 annotation tasks: their label vocabularies and invalid markers."""

from dataclasses import dataclass

import numpy as np

EXPR_CLASSES: tuple[str, ...] = (
    "Neutral",
    "Anger",
    "Disgust",
    "Fear",
    "Happiness",
    "Sadness",
    "Surprise",
    "Other",
)
AU_NAMES: tuple[str, ...] = (
    "AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26",
)  # fmt: skip
VA_NAMES: tuple[str, ...] = ("valence", "arousal")


@dataclass(frozen=True)
class Task:
    """One annotation task of Aff-Wild2.

    An annotation line holds `width` comma-separated values; `invalid` marks a value without a
    valid label; valid values lie in [low, high]. `header` is line 0 of the organisers' files.
    """

    name: str  # "expr", "au", "va"
    folder_prefix: str  # how the task's annotation folder starts in every ABAW edition
    header: str
    width: int
    dtype: type
    invalid: float
    low: float
    high: float

    def valid_mask(self, labels: np.ndarray) -> np.ndarray:
        """Boolean mask of valid values: per frame for EXPR, per frame and column for AU/VA."""
        return labels != self.invalid


EXPR = Task("expr", "EXPR", ",".join(EXPR_CLASSES), 1, np.int64, -1, 0, len(EXPR_CLASSES) - 1)
AU = Task("au", "AU", ",".join(AU_NAMES), len(AU_NAMES), np.int64, -1, 0, 1)
VA = Task("va", "VA", ",".join(VA_NAMES), len(VA_NAMES), np.float32, -5.0, -1.0, 1.0)
TASKS: dict[str, Task] = {task.name: task for task in (EXPR, AU, VA)}

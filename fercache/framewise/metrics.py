"""The ABAW metrics as plain functions on numpy arrays, shared by training and `evaluate`.

- EXPR: macro F1 over the 8 classes on every frame with a valid label (not `-1`), pooled over
  all videos (not a mean per video), plus per-class F1, precision, recall, support and the
  confusion matrix (rows: true class, columns: predicted), all from scikit-learn with
  `labels=range(8)` and `zero_division=0` (a class never predicted nor present scores 0, as in
  scikit-learn's default).
- AU: per AU, the binary F1 of `au >= threshold` on the frames where that AU's label is valid,
  and their mean over the 12 AUs; `tune_au_thresholds` picks the per-AU thresholds.
- VA: Lin's concordance correlation coefficient of valence and of arousal, each on the frames
  where its value is valid (not -5), and their mean.
- P = F1_EXPR + F1_AU + CCC_VA (Li et al.'s multi-task score, at most 3).

`pooled` pairs a PRED file's predictions with the annotations of its videos, frame by frame.
"""

from pathlib import Path

import numpy as np
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
)

from fercache.data.affwild2 import VideoLabels
from fercache.data.labels import row_valid
from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, VA_NAMES
from fercache.errors import FercacheError
from fercache.framewise.pred_file import AU_THRESHOLD, Predictions

CLASS_RANGE = list(range(len(EXPR_CLASSES)))
_PREDICTED = {"expr": "labels", "au": "au", "va": "va"}  # the PRED array scored per task


def expr_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """EXPR metrics over the frames whose true label is valid (`-1` frames are left out)."""
    valid = truth != -1
    truth, predicted = truth[valid], predicted[valid]
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=CLASS_RANGE, zero_division=0
    )
    return {
        "expr_f1": float(
            f1_score(truth, predicted, labels=CLASS_RANGE, average="macro", zero_division=0)
        ),
        "frames": int(valid.sum()),
        "per_class_f1": dict(zip(EXPR_CLASSES, f1.tolist(), strict=True)),
        "precision": dict(zip(EXPR_CLASSES, precision.tolist(), strict=True)),
        "recall": dict(zip(EXPR_CLASSES, recall.tolist(), strict=True)),
        "support": dict(zip(EXPR_CLASSES, support.tolist(), strict=True)),
        "confusion_matrix": confusion_matrix(truth, predicted, labels=CLASS_RANGE).tolist(),
    }


def au_metrics(
    truth: np.ndarray, probabilities: np.ndarray, thresholds: float | np.ndarray = AU_THRESHOLD
) -> dict:
    """Mean binary F1 over the AUs; each AU on the frames where its label is not -1, its
    prediction `probability >= threshold` (one threshold, or one per AU)."""
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=float), (len(AU_NAMES),))
    scores = {}
    for column, name in enumerate(AU_NAMES):
        valid = truth[:, column] != -1
        scores[name] = float(
            f1_score(
                truth[valid, column],
                probabilities[valid, column] >= thresholds[column],
                labels=[0, 1],
                average="binary",
                zero_division=0,
            )
        )
    return {
        "au_f1": float(np.mean(list(scores.values()))),
        "per_au_f1": scores,
        "au_thresholds": dict(zip(AU_NAMES, thresholds.tolist(), strict=True)),
    }


def tune_au_thresholds(truth: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per AU, the threshold with the highest F1 on the frames where its label is valid (the
    lowest such threshold on ties); 0.5 for an AU without a positive frame."""
    thresholds = np.full(len(AU_NAMES), AU_THRESHOLD)
    for column in range(len(AU_NAMES)):
        valid = truth[:, column] != -1
        labels = truth[valid, column]
        if not (labels == 1).any():
            continue
        precision, recall, candidates = precision_recall_curve(labels, probabilities[valid, column])
        both = precision + recall
        f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)
        # The curve's last point (recall 0) has no threshold; candidates ascend.
        thresholds[column] = candidates[int(np.argmax(f1[:-1]))]
    return thresholds


def concordance(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Lin's concordance correlation coefficient (population moments)."""
    mean_t, mean_p = truth.mean(), predicted.mean()
    covariance = ((truth - mean_t) * (predicted - mean_p)).mean()
    return float(2 * covariance / (truth.var() + predicted.var() + (mean_t - mean_p) ** 2))


def va_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Mean CCC of valence and arousal; each on the frames where its value is not -5."""
    scores = {}
    for column, name in enumerate(VA_NAMES):
        valid = truth[:, column] != -5
        scores[name] = concordance(
            truth[valid, column].astype(np.float64), predicted[valid, column].astype(np.float64)
        )
    return {"va_ccc": float(np.mean(list(scores.values()))), "per_dimension_ccc": scores}


def p_score(expr_f1: float, au_f1: float, va_ccc: float) -> float:
    """Li et al.'s multi-task score P = F1_EXPR + F1_AU + CCC_VA (at most 3)."""
    return expr_f1 + au_f1 + va_ccc


def pooled(
    pred: Path | str, predictions: Predictions, task: str, videos: list[VideoLabels]
) -> tuple[np.ndarray, np.ndarray]:
    """True labels and predictions (EXPR labels, AU probabilities or VA values) of `task` on
    every annotated frame that has a prediction, pooled over `videos`; FercacheError when a
    frame with a valid label has none."""
    truths, predicted = [], []
    for video in videos:
        rows = predictions.videos[video.video]
        frames = np.arange(1, len(video.labels) + 1)
        index = np.searchsorted(rows.frames, frames).clip(max=max(len(rows.frames) - 1, 0))
        found = rows.frames[index] == frames if len(rows.frames) else np.zeros(len(frames), bool)
        uncovered = frames[~found & row_valid(task, video.labels)]
        if len(uncovered):
            raise FercacheError(
                f"{pred}: video '{video.video}' has no prediction for {len(uncovered)} labelled "
                f"{task.upper()} frame(s), first {uncovered[0]}; predict every annotated frame"
            )
        truths.append(video.labels[found])
        predicted.append(getattr(rows, _PREDICTED[task])[index[found]])
    return np.concatenate(truths), np.concatenate(predicted)

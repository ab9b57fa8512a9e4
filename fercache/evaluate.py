"""The ABAW metrics of a PRED file against the annotations of its split.

- EXPR: macro F1 over the 8 classes on every frame with a valid label (not `-1`), pooled over
  all videos (not a mean per video), plus per-class F1, precision, recall, support and the
  confusion matrix (rows: true class, columns: predicted), all from scikit-learn with
  `labels=range(8)` and `zero_division=0` (a class never predicted nor present scores 0, as in
  scikit-learn's default). Every valid frame of every annotated video must have a prediction.
- AU (when the PRED holds `au`): mean over the 12 AUs of the binary F1 of `au >= threshold`
  on the frames where that AU's label is valid and a prediction exists.
- VA (when the PRED holds `va`): mean of the concordance correlation coefficients of valence
  and arousal on the frames where the value is valid (not -5) and a prediction exists.
"""

import json
from pathlib import Path

import numpy as np
from rich.table import Table
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from fercache.data.affwild2 import AffWild2, VideoLabels
from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, VA_NAMES
from fercache.errors import FercacheError
from fercache.predictions import Predictions

CLASS_RANGE = list(range(len(EXPR_CLASSES)))
AU_THRESHOLD = 0.5


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
    truth: np.ndarray, probabilities: np.ndarray, threshold: float = AU_THRESHOLD
) -> dict:
    """Mean binary F1 over the AUs; each AU on the frames where its label is not -1."""
    scores = {}
    for column, name in enumerate(AU_NAMES):
        valid = truth[:, column] != -1
        scores[name] = float(
            f1_score(
                truth[valid, column],
                probabilities[valid, column] >= threshold,
                labels=[0, 1],
                average="binary",
                zero_division=0,
            )
        )
    return {"au_f1": float(np.mean(list(scores.values()))), "per_au_f1": scores}


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


def evaluate(
    pred: Path,
    data: Path,
    split: str,
    annotations: Path | None = None,
    confusion_png: Path | None = None,
) -> dict:
    """All metrics of PRED `pred` against DATA's `split`; writes the confusion-matrix PNG."""
    predictions = Predictions.read(pred)
    if predictions.split != split:
        raise FercacheError(
            f"{pred}: holds {predictions.split} predictions, not {split}: evaluate it with "
            f"--split {predictions.split} or predict the {split} split"
        )
    tree = AffWild2(data, annotations=annotations)
    expr = tree.load("expr", split)
    _check_same_videos(pred, predictions, [video.video for video in expr], split)
    truth, predicted = _pooled_expr(pred, predictions, expr)
    if not (truth != -1).any():
        raise FercacheError(f"{data}: the EXPR {split} annotations hold no valid label to score")
    report = {
        "pred": str(pred),
        "split": split,
        "source": predictions.source,
        "smoothing": list(predictions.smoothing),
        "videos": len(expr),
        **expr_metrics(truth, predicted),
    }
    report.update(_optional_metrics(predictions, tree, split))
    png = confusion_png or Path(pred).with_name(f"{Path(pred).stem}-confusion.png")
    report["confusion_png"] = str(plot_confusion(np.array(report["confusion_matrix"]), png))
    return report


def _check_same_videos(pred: Path, predictions: Predictions, annotated: list[str], split: str):
    missing = sorted(set(annotated) - set(predictions.videos))
    extra = sorted(set(predictions.videos) - set(annotated))
    if missing or extra:
        problem = (
            f"no predictions for annotated video(s) {', '.join(missing[:5])}"
            if missing
            else f"video(s) {', '.join(extra[:5])} have no EXPR {split} annotation"
        )
        raise FercacheError(
            f"{pred}: {problem}; predict with the same data and split "
            f"(`fercache predict ... --split {split}`)"
        )


def _pooled_expr(
    pred: Path, predictions: Predictions, expr: list[VideoLabels]
) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted labels of every annotated frame, pooled over videos."""
    truths, predicted = [], []
    for video in expr:
        rows = predictions.videos[video.video]
        frames = np.arange(1, len(video.labels) + 1)
        index = np.searchsorted(rows.frames, frames).clip(max=max(len(rows.frames) - 1, 0))
        found = rows.frames[index] == frames if len(rows.frames) else np.zeros(len(frames), bool)
        uncovered = frames[~found & (video.labels != -1)]
        if len(uncovered):
            raise FercacheError(
                f"{pred}: video '{video.video}' has no prediction for {len(uncovered)} labelled "
                f"frame(s), first {uncovered[0]}; predict every annotated frame"
            )
        truths.append(video.labels[found])
        predicted.append(rows.labels[index[found]])
    return np.concatenate(truths), np.concatenate(predicted)


def _optional_metrics(predictions: Predictions, tree: AffWild2, split: str) -> dict:
    """AU and VA metrics for the predictions that carry them, on the annotated videos."""
    report = {}
    for name, scorer in (("au", au_metrics), ("va", va_metrics)):
        carried = [v for v, rows in predictions.videos.items() if getattr(rows, name) is not None]
        annotated = set(tree.annotated_videos(name, split)) & set(carried)
        if not annotated:
            continue
        truths, values = [], []
        for video in tree.load(name, split, sorted(annotated)):
            rows = predictions.videos[video.video]
            inside = rows.frames <= len(video.labels)
            truths.append(video.labels[rows.frames[inside] - 1])
            values.append(getattr(rows, name)[inside])
        report.update(scorer(np.concatenate(truths), np.concatenate(values)))
        report[f"{name}_videos"] = len(annotated)
    return report


def plot_confusion(matrix: np.ndarray, path: Path) -> Path:
    """Row-normalised confusion matrix (recall per true class) as a PNG; counts in the JSON."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    figure = Figure(figsize=(7, 6))
    axes = figure.subplots()
    display = ConfusionMatrixDisplay(normalised, display_labels=list(EXPR_CLASSES))
    display.plot(ax=axes, values_format=".2f", colorbar=True, xticks_rotation=45)
    axes.set_title("EXPR confusion (rows: true class, normalised)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return Path(path)


def write_report(report: dict, path: Path) -> Path:
    Path(path).write_text(json.dumps(report, indent=2))
    return Path(path)


def render(report: dict) -> Table:
    """The report as a table: per-class figures, then the summary scores."""
    table = Table(title=f"{report['pred']} on {report['split']} ({report['frames']:,} frames)")
    for column in ("class", "F1", "precision", "recall", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name in EXPR_CLASSES:
        table.add_row(
            name,
            f"{report['per_class_f1'][name]:.4f}",
            f"{report['precision'][name]:.4f}",
            f"{report['recall'][name]:.4f}",
            f"{report['support'][name]:,}",
        )
    table.add_section()
    table.add_row("EXPR macro F1", f"{report['expr_f1']:.4f}")
    for key, title in (("au_f1", "AU mean F1"), ("va_ccc", "VA mean CCC")):
        if key in report:
            table.add_row(title, f"{report[key]:.4f}")
    return table

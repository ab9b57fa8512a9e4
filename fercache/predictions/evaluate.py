"""The ABAW metrics of a PRED file against the annotations of its split.

Every task the PRED carries and the split annotates is scored, each on the videos annotated for
it; every frame with a valid label of an annotated video must have a prediction.

- EXPR: macro F1 over the 8 classes on every frame with a valid label (not `-1`), pooled over
  all videos (not a mean per video), plus per-class F1, precision, recall, support and the
  confusion matrix (rows: true class, columns: predicted), all from scikit-learn with
  `labels=range(8)` and `zero_division=0` (a class never predicted nor present scores 0, as in
  scikit-learn's default).
- AU: per AU, the binary F1 of `au >= threshold` on the frames where that AU's label is valid
  (the PRED's `au_thresholds`: 0.5 unless tuned), and their mean over the 12 AUs.
- VA: Lin's concordance correlation coefficient of valence and of arousal, each on the frames
  where its value is valid (not -5), and their mean.
- P = F1_EXPR + F1_AU + CCC_VA (Li et al.'s multi-task score, at most 3) when all three are
  scored.

The metric functions themselves live in `fercache.framewise.metrics` (training scores with them
too).
"""

import json
from pathlib import Path

import numpy as np
from rich.table import Table

from fercache.data.affwild2 import AffWild2, VideoLabels
from fercache.data.labels import row_valid
from fercache.data.tasks import EXPR_CLASSES
from fercache.errors import FercacheError
from fercache.framewise.metrics import au_metrics, expr_metrics, p_score, pooled, va_metrics
from fercache.framewise.pred_file import Predictions
from fercache.outputs import write_atomically, write_text_atomically

_SHOWN = 5  # video names quoted in an error


def evaluate(
    pred: Path,
    data: Path,
    split: str,
    annotations: Path | None = None,
    confusion_png: Path | None = None,
) -> dict:
    """All metrics of PRED `pred` against DATA's `split`; writes the EXPR confusion PNG."""
    predictions = Predictions.read(pred)
    if predictions.split != split:
        raise FercacheError(
            f"{pred}: holds {predictions.split} predictions, not {split}: evaluate it with "
            f"--split {predictions.split} or predict the {split} split"
        )
    tree = AffWild2(data, annotations=annotations)
    scored = [task for task in predictions.tasks if split in tree.splits(task)]
    if not scored:
        raise FercacheError(
            f"{annotations or data}: no {'/'.join(t.upper() for t in predictions.tasks)} "
            f"annotations for the {split} split, so {pred} cannot be scored; point --data "
            "(or --annotations) at the tree it was predicted from"
        )
    annotated = {task: tree.load(task, split) for task in scored}
    _check_same_videos(pred, predictions, annotated, split)
    report = {
        "pred": str(pred),
        "split": split,
        "source": predictions.source,
        "smoothing": list(predictions.smoothing),
        "tasks": scored,
    }
    if "expr" in scored:
        truth, predicted = pooled(pred, predictions, "expr", annotated["expr"])
        if not (truth != -1).any():
            raise FercacheError(f"{data}: the EXPR {split} annotations hold no valid label")
        report.update({"videos": len(annotated["expr"]), **expr_metrics(truth, predicted)})
        png = confusion_png or Path(pred).with_name(f"{Path(pred).stem}-confusion.png")
        report["confusion_png"] = str(plot_confusion(np.array(report["confusion_matrix"]), png))
    if "au" in scored:
        truth, probabilities = pooled(pred, predictions, "au", annotated["au"])
        report.update(au_metrics(truth, probabilities, np.array(predictions.au_thresholds)))
        report.update(_coverage("au", truth, annotated["au"]))
    if "va" in scored:
        truth, values = pooled(pred, predictions, "va", annotated["va"])
        report.update(va_metrics(truth, values))
        report.update(_coverage("va", truth, annotated["va"]))
    if len(scored) == 3:
        report["p"] = p_score(report["expr_f1"], report["au_f1"], report["va_ccc"])
    return report


def _coverage(task: str, truth: np.ndarray, videos: list[VideoLabels]) -> dict:
    return {f"{task}_videos": len(videos), f"{task}_frames": int(row_valid(task, truth).sum())}


def _check_same_videos(
    pred: Path, predictions: Predictions, annotated: dict[str, list[VideoLabels]], split: str
) -> None:
    """Every annotated video has predictions; every predicted video is annotated for a task."""
    names = {task: {video.video for video in videos} for task, videos in annotated.items()}
    for task, wanted in names.items():
        missing = sorted(wanted - set(predictions.videos))
        if missing:
            raise FercacheError(
                f"{pred}: no predictions for annotated video(s) {', '.join(missing[:_SHOWN])} "
                f"({task.upper()} {split}); predict with the same data and split "
                f"(`fercache predict ... --split {split}`)"
            )
    extra = sorted(set(predictions.videos) - set().union(*names.values()))
    if extra:
        raise FercacheError(
            f"{pred}: video(s) {', '.join(extra[:_SHOWN])} have no "
            f"{'/'.join(task.upper() for task in annotated)} {split} annotation; predict with the "
            f"same data and split (`fercache predict ... --split {split}`)"
        )


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
    kind = Path(path).suffix[1:] or None  # the temporary name has no suffix to tell the format
    return write_atomically(
        path, lambda tmp: figure.savefig(tmp, dpi=100, format=kind), "the confusion plot"
    )


def write_report(report: dict, path: Path) -> Path:
    return write_text_atomically(path, json.dumps(report, indent=2), "the evaluation report")


def render(report: dict) -> Table:
    """The report as a table: per-class, per-AU and per-dimension figures, then the scores."""
    frames = f" ({report['frames']:,} EXPR frames)" if "frames" in report else ""
    table = Table(title=f"{report['pred']} on {report['split']}{frames}")
    for column in ("name", "F1 (VA: CCC)", "precision", "recall", "support"):
        table.add_column(column, justify="left" if column == "name" else "right")
    if "expr_f1" in report:
        for name in EXPR_CLASSES:
            table.add_row(
                name,
                f"{report['per_class_f1'][name]:.4f}",
                f"{report['precision'][name]:.4f}",
                f"{report['recall'][name]:.4f}",
                f"{report['support'][name]:,}",
            )
        table.add_section()
    if "au_f1" in report:
        for name, f1 in report["per_au_f1"].items():
            table.add_row(f"{name} (threshold {report['au_thresholds'][name]:.2f})", f"{f1:.4f}")
        table.add_section()
    if "va_ccc" in report:
        for name, ccc in report["per_dimension_ccc"].items():
            table.add_row(name, f"{ccc:.4f}")
        table.add_section()
    scores = (
        ("expr_f1", "EXPR macro F1"),
        ("au_f1", "AU mean F1"),
        ("va_ccc", "VA mean CCC"),
        ("p", "P = F1 EXPR + F1 AU + CCC VA"),
    )
    for key, title in scores:
        if key in report:
            table.add_row(title, f"{report[key]:.4f}")
    return table

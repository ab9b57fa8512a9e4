"""`fercache predict`, `smooth`, `evaluate`, `submit` and `ensemble`: the stages of PRED files
(fercache.predictions)."""

from pathlib import Path
from typing import Annotated

import typer

from fercache.cli.shared import (
    ProgressOption,
    RegistryHelp,
    WeightsOption,
    console,
    error_console,
)

commands = typer.Typer()


@commands.command()
def predict(
    cache: Annotated[
        list[Path],
        typer.Option(
            help="Feature cache folder (repeat for a run trained on fused caches, same order)."
        ),
    ],
    split: Annotated[str, typer.Option(help="Split to predict: train, val or test.")],
    out: Annotated[Path, typer.Option(help="PRED file to write (HDF5; see docs/formats.md).")],
    run_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Temporal training run folder (not needed with --source student), or the "
            "--out folder of `train --folds`: the soft vote of its fold models."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Aff-Wild2 root: its annotations of the run's tasks list the frames to predict."
        ),
    ] = None,
    frames: Annotated[
        Path | None,
        typer.Option(
            help="Frame list ('<video>/00001.jpg' per line, e.g. the organisers' test list): "
            "predict exactly these frames. Required for --split test."
        ),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(help="Folder to search for annotation sets (default: DATA)."),
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            help="temporal (the run in RUN_DIR) or student (softmax of the logits stored in the "
            "cache: the per-frame baseline)."
        ),
    ] = "temporal",
    device: Annotated[str, typer.Option(help="Device of the temporal model: cpu or cuda.")] = "cpu",
    weights: WeightsOption = "best",
    tune_thresholds: Annotated[
        bool,
        typer.Option(
            "--tune-thresholds",
            help="With --split val and a run with an AU head: pick each AU's threshold for the "
            "best F1 on the validation annotations, store it in RUN_DIR/thresholds.json (later "
            "predicts with these weights use it) and in the PRED.",
        ),
    ] = False,
    progress: ProgressOption = True,
) -> None:
    """Per-frame predictions (EXPR, AU, VA: the run's tasks) for every frame that needs one."""
    from fercache.experiments.training import predict_with
    from fercache.predictions.predict import PredictOptions

    options = PredictOptions(
        split=split,
        data=data,
        frames=frames,
        annotations=annotations,
        source=source,
        device=device,
        weights=weights,
        tune_thresholds=tune_thresholds,
        progress=progress,
    )
    predicted = predict_with(run_dir, cache, out, options)
    for note in predicted.notes:
        error_console.print(f"[yellow]warning:[/] {note}", highlight=False)
    predictions = predicted.predictions
    filled = sum(int((~rows.has_image).sum()) for rows in predictions.videos.values())
    tasks = "/".join(task.upper() for task in predictions.tasks)
    console.print(
        f"wrote {out}: {tasks} for {len(predictions.videos)} videos, "
        f"{predictions.frame_count:,} frames ({filled:,} without features, filled from their "
        "nearest frames)"
    )
    if tune_thresholds:
        chosen = ", ".join(f"{value:.2f}" for value in predictions.au_thresholds)
        console.print(f"AU thresholds tuned on val and stored in {run_dir}: {chosen}")


@commands.command()
def smooth(
    pred: Annotated[Path, typer.Argument(help="PRED file to smooth (from `fercache predict`).")],
    out: Annotated[Path, typer.Option(help="PRED file to write with the voted labels.")],
    window: Annotated[
        int, typer.Option(min=1, max=2**31 - 1, help="Vote window in frames (the paper uses 30).")
    ] = 30,
    mode: Annotated[
        str,
        typer.Option(
            help="centered: each frame takes the most frequent label around it; block: windows "
            "tile the video and every frame takes its window's most frequent label."
        ),
    ] = "centered",
) -> None:
    """Sliding-window majority vote over each video's predicted labels (never across videos)."""
    from fercache.predictions.smooth import smooth_predictions

    smoothed = smooth_predictions(pred, out, window=window, mode=mode)
    console.print(
        f"wrote {out}: {smoothed.frame_count:,} frames voted, window {window}, mode {mode}"
    )


@commands.command()
def evaluate(
    pred: Annotated[Path, typer.Argument(help="PRED file to score (raw or smoothed).")],
    data: Annotated[Path, typer.Option(help="Aff-Wild2 root holding the split's annotations.")],
    split: Annotated[str, typer.Option(help="Split the PRED file holds: train or val.")] = "val",
    annotations: Annotated[
        Path | None,
        typer.Option(help="Folder to search for annotation sets (default: DATA)."),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Also write every figure (per class, AU and dimension; confusion)."
        ),
    ] = None,
    confusion: Annotated[
        Path | None,
        typer.Option(
            help="EXPR confusion-matrix PNG to write (default: PRED's name + -confusion.png)."
        ),
    ] = None,
) -> None:
    """EXPR macro-F1, AU mean F1, VA mean CCC (and P) over all valid frames, per label too."""
    from fercache.predictions.evaluate import evaluate as run_evaluate
    from fercache.predictions.evaluate import render, write_report

    report = run_evaluate(pred, data, split, annotations=annotations, confusion_png=confusion)
    console.print(render(report))
    if "confusion_png" in report:
        console.print(f"confusion matrix: {report['confusion_png']}")
    if json_out:
        console.print(f"report written to {write_report(report, json_out)}")


@commands.command(cls=RegistryHelp)
def submit(
    pred: Annotated[Path, typer.Argument(help="PRED file (usually smoothed) to submit.")],
    out: Annotated[Path, typer.Option(help="Submission text file to write.")],
    frames: Annotated[
        Path | None,
        typer.Option(
            help="The organisers' frame list: the submission then holds exactly these frames, "
            "and any one PRED lacks is an error. Default: every frame of PRED."
        ),
    ] = None,
    task: Annotated[
        str,
        typer.Option(
            help="The submission format, one of the registered ones: {submission-formats}; "
            "expr, au and va are the ABAW formats of those challenges."
        ),
    ] = "expr",
) -> None:
    """Write an ABAW submission file (EXPR, AU or VA), validated first (every frame once)."""
    from fercache.predictions.submit import write_submission

    rows = write_submission(pred, out, frames, task)
    console.print(f"wrote {out}: {task.upper()} for {rows:,} frames")


@commands.command()
def ensemble(
    preds: Annotated[
        list[Path],
        typer.Argument(
            metavar="PRED...",
            help="Raw PRED files (not smoothed) of the same split, videos and frames.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="PRED file to write with the soft vote.")],
    weights: Annotated[
        str | None,
        typer.Option(help="One weight per PRED, comma-separated, e.g. 1,2 (default: equal)."),
    ] = None,
) -> None:
    """Soft voting: average the inputs' probabilities (EXPR, AU) and VA values; label = arg-max."""
    from fercache.predictions.ensemble import ensemble as run_ensemble
    from fercache.predictions.ensemble import parse_weights

    voted = run_ensemble(preds, out, parse_weights(weights))
    for note in voted.notes:
        error_console.print(f"[yellow]warning:[/] {note}", highlight=False)
    shown = ", ".join(f"{weight:.3g}" for weight in voted.weights)
    console.print(
        f"wrote {out}: soft vote of {len(preds)} predictions (weights {shown}), "
        f"{voted.predictions.frame_count:,} frames"
    )

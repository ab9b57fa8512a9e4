"""`fercache demo` and `analyse`: the whole pipeline in one command, on a synthetic tree or on
video files (fercache.experiments)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fercache.cli.shared import (
    ProgressOption,
    RegistryHelp,
    WeightsOption,
    console,
    error_console,
)

commands = typer.Typer()


@commands.command(cls=RegistryHelp)
def demo(
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for the tree, runs, caches, predictions and report.md/report.png "
            "(missing, empty, or an earlier demo's folder, whose outputs are replaced)."
        ),
    ] = Path("demo-out"),
    seed: Annotated[
        int, typer.Option(help="Seed of the synthetic tree, phase 1 and the temporal model.")
    ] = 0,
    pretrain_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Phase-1 steps of each of the three students alike (the same budget); the "
            "default is sized for a 2-core CPU (results/demo.md: the measured time, and figures "
            "at other budgets).",
            show_default=False,
        ),
    ] = None,
    finetune_steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Of --pretrain-steps, the last ones fine-tune the SSL student on the labels "
            "(MPL's last stage; with --ssl-recipe mpl only); default 0: none.",
            show_default=False,
        ),
    ] = None,
    ssl_recipe: Annotated[
        str | None,
        typer.Option(
            help="The semi-supervised recipe of rows 2 and 3, one of the recipes that read "
            "unlabelled images: {ssl-recipes} (see `fercache pretrain --help`); default: the one "
            "that scored best on held-out training videos (results/ssl-variants.md).",
            show_default=False,
        ),
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """The whole pipeline on a synthetic tree, sized for a CPU (results/demo.md): the five rows of
    Yu et al.'s Table 1, each trained on the data that row ticks; prints the table."""
    from fercache.experiments.demo import DemoSettings, render_table, run_demo

    given = {
        "pretrain_steps": pretrain_steps,
        "ssl_finetune_steps": finetune_steps,
        "ssl_recipe": ssl_recipe,
    }
    settings = DemoSettings(**{key: value for key, value in given.items() if value is not None})
    result = run_demo(out, seed=seed, settings=settings, progress=progress)
    console.print(render_table(result.rows))
    console.print(f"report: {result.report}; chart: {result.chart}")


@commands.command()
def analyse(
    videos: Annotated[
        list[Path], typer.Argument(help="Video file(s) (MP4, AVI, ...) or folders of videos.")
    ],
    checkpoint: Annotated[
        Path,
        typer.Option(help="Student checkpoint (.safetensors from `fercache pretrain`, or .pt)."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for <video>.csv, <video>.png (and .annotated.mp4); the crops, cache "
            "and PRED files go to OUT/work. A rerun replaces a video's outputs."
        ),
    ],
    run: Annotated[
        Path | None,
        typer.Option(
            help="Temporal run folder trained on a cache of this checkpoint; default: the "
            "student's own per-frame softmax."
        ),
    ] = None,
    weights: WeightsOption = "best",
    window: Annotated[
        int,
        typer.Option(min=1, max=2**31 - 1, help="Vote window in frames for the smoothed label."),
    ] = 30,
    annotate: Annotated[
        bool,
        typer.Option(
            "--annotate", help="Also write OUT/<video>.annotated.mp4 with face boxes and labels."
        ),
    ] = False,
    size: Annotated[
        int, typer.Option(min=16, help="Side of the cropped face images in pixels.")
    ] = 112,
    subjects: Annotated[
        int,
        typer.Option(
            min=1, max=2, help="Faces to follow per video: 1, or 2 (<video>_left/_right)."
        ),
    ] = 1,
    device: Annotated[
        str, typer.Option(help="Device of face detection, extraction and the run: auto, cpu, cuda.")
    ] = "auto",
    batch: Annotated[
        int, typer.Option(min=1, help="Frames per batch in detection and extraction.")
    ] = 32,
    progress: ProgressOption = True,
) -> None:
    """Crop -> extract -> predict -> smooth on video files: per video a CSV of per-frame
    probabilities and labels, a timeline PNG and, with --annotate, an annotated MP4."""
    from fercache.experiments.analyse import AnalyseOptions
    from fercache.experiments.analyse import analyse as run_analyse

    options = AnalyseOptions(
        run=run,
        window=window,
        annotate=annotate,
        size=size,
        subjects=subjects,
        device=device,
        batch=batch,
        weights=weights,
        progress=progress,
    )
    report = run_analyse(videos, checkpoint, out, options)
    for path in report.written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    for name in report.skipped:
        console.print(f"[yellow]no face found in {name}: skipped[/]", highlight=False)
    for video, why in report.failed:
        error_console.print(
            f"[bold red]failed:[/] {escape(f'{video}: {why}')}", highlight=False, soft_wrap=True
        )
    if report.failed:
        raise typer.Exit(code=1)

"""The `fercache` command line. Each command parses options and calls one plain function."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from fercache import __version__
from fercache.errors import FercacheError

console = Console()
error_console = Console(stderr=True)


class FercacheGroup(TyperGroup):
    """Shows a FercacheError as one clean line on stderr with exit code 2, never a traceback."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except FercacheError as error:
            error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=error.exit_code) from error


app = typer.Typer(
    cls=FercacheGroup,
    help="Facial-expression recognition in video on a cached frozen-backbone feature store "
    "(Aff-Wild2 / ABAW). Stages talk through files; run any one alone.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show progress bars on long work.")
]


def _version(value: bool) -> None:
    if value:
        console.print(f"fercache {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Facial-expression recognition in video on a cached frozen-backbone feature store."""


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the synthetic Aff-Wild2 tree into.")],
    videos: Annotated[
        int,
        typer.Option(help="Number of annotated videos (a _left/_right pair counts as two)."),
    ] = 24,
    frames: Annotated[
        int, typer.Option(help="Mean frames per video (lengths vary around it, 30 fps).")
    ] = 500,
    seed: Annotated[
        int, typer.Option(help="Random seed: the same seed gives identical bytes.")
    ] = 0,
    labelled: Annotated[
        int, typer.Option(help="Images in the labelled still-image pool (pools/labelled.csv).")
    ] = 2000,
    unlabelled: Annotated[
        int, typer.Option(help="Images in the unlabelled face pool (pools/unlabelled/).")
    ] = 4000,
    workers: Annotated[
        int, typer.Option(help="Worker processes; 0 uses every core. Output does not depend on it.")
    ] = 0,
    force: Annotated[
        bool, typer.Option(help="Replace an earlier synthetic tree in OUT (never other folders).")
    ] = False,
    progress: ProgressOption = True,
) -> None:
    """Write a synthetic Aff-Wild2 tree: frames, EXPR/AU/VA annotations and phase-1 image pools."""
    from fercache.data.synthetic import SynthConfig, generate

    config = SynthConfig(
        videos=videos,
        frames=frames,
        seed=seed,
        labelled_pool=labelled,
        unlabelled_pool=unlabelled,
        workers=workers,
    )
    info = generate(out, config, progress=progress, force=force)
    total = sum(video["frames"] for video in info["videos"].values())
    console.print(f"wrote {len(info['videos'])} videos ({total:,} frames) and the pools to {out}")


@app.command()
def inspect(
    data: Annotated[Path, typer.Argument(help="Aff-Wild2 root: holds cropped_aligned/.")],
    annotations: Annotated[
        Path | None,
        typer.Option(
            help="Folder to search for annotation sets (default: DATA). Use it when several "
            "ABAW releases lie side by side."
        ),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the whole summary, every note included, as JSON."),
    ] = None,
    max_notes: Annotated[
        int, typer.Option(help="Notes on odd data to print (all go to --json).")
    ] = 20,
    progress: ProgressOption = True,
) -> None:
    """Tabulate splits, videos, frames, labels, frames without images and classes of a tree."""
    from fercache.inspect import inspect_dataset, render

    summary = inspect_dataset(data, annotations=annotations, progress=progress)
    console.print(render(summary, max_notes=max_notes))
    if json_out:
        json_out.write_text(json.dumps(summary.to_json(), indent=2))
        console.print(f"summary written to {json_out}")


def main() -> None:
    app()

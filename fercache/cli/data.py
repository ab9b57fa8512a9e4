"""`fercache synth`, `inspect` and `crop`: Aff-Wild2 trees, synthetic, summarised, or cropped
from videos (fercache.synth, fercache.data, fercache.video)."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fercache.cli.shared import ProgressOption, console, error_console
from fercache.outputs import write_text_atomically

commands = typer.Typer()


@commands.command()
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
    from fercache.synth import SynthConfig, generate

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


@commands.command()
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
    from fercache.data.inspect import inspect_dataset, render

    summary = inspect_dataset(data, annotations=annotations, progress=progress)
    console.print(render(summary, max_notes=max_notes))
    if json_out:
        write_text_atomically(json_out, json.dumps(summary.to_json(), indent=2), "the summary")
        console.print(f"summary written to {json_out}")


@commands.command()
def crop(
    sources: Annotated[
        list[Path], typer.Argument(help="Video files, or folders of videos, to crop.")
    ],
    out: Annotated[
        Path,
        typer.Option(help="Aff-Wild2 root to write: cropped_aligned/<video>/ and crop_records/."),
    ],
    size: Annotated[
        int, typer.Option(min=16, help="Side of the square aligned crops, pixels.")
    ] = 112,
    margin: Annotated[
        float,
        typer.Option(help="Extra context around the face: 0.2 shows the face 1/1.2 as large."),
    ] = 0.0,
    subjects: Annotated[
        int,
        typer.Option(
            min=1, max=2, help="Faces to follow: 1, or 2 for <video>_left / <video>_right."
        ),
    ] = 1,
    batch: Annotated[int, typer.Option(min=1, help="Frames per face-detector call.")] = 32,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
    ] = "auto",
    min_confidence: Annotated[
        float, typer.Option(help="Detector face probability below which a face is ignored.")
    ] = 0.9,
    progress: ProgressOption = True,
) -> None:
    """Detect, track and align faces in videos into the Aff-Wild2 cropped_aligned layout."""
    from rich.table import Table

    from fercache.video.crop import RECORDS_DIRNAME, CropOptions, crop_videos

    options = CropOptions(size, margin, subjects, batch, device, min_confidence, progress)
    report = crop_videos(sources, out, options)
    table = Table("video", "frames", "faces found", "missing", "time")
    for video in report.videos:
        table.add_row(
            video.name, str(video.frames), str(video.found), str(video.missing),
            f"{video.seconds:.1f} s",
        )  # fmt: skip
    if report.videos:
        console.print(table)
    for skipped in report.skipped:
        console.print(f"skipped {skipped}: already cropped (its record exists)")
    for video, why in report.failed:
        error_console.print(
            f"[bold red]failed:[/] {escape(f'{video}: {why}')}", highlight=False, soft_wrap=True
        )
    # a subject without any face gets no folder; a run where every video failed, no records
    folders = sum(video.found > 0 for video in report.videos)
    records = out / RECORDS_DIRNAME
    where = f"; records in {records}" if records.is_dir() else ""
    console.print(
        f"{folders} folder(s) written, {len(report.skipped)} video(s) skipped, "
        f"{len(report.failed)} failed{where}",
        highlight=False,
        soft_wrap=True,
    )
    if report.failed:
        raise typer.Exit(code=1)

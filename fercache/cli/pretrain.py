"""`fercache pretrain`: phase 1 (fercache.pretrain)."""

from pathlib import Path
from typing import Annotated

import typer

from fercache.cli.shared import (
    PrintConfigOption,
    ProgressOption,
    RegistryHelp,
    console,
    error_console,
)

commands = typer.Typer()


@commands.command(cls=RegistryHelp)
def pretrain(
    labelled: Annotated[
        list[Path],
        typer.Option(
            help="Labelled images (repeat to combine): an Aff-Wild2 root (EXPR train frames), "
            "a CSV with columns path,label, or a folder with one sub-folder per class. Numeric "
            "labels need their data set's numbering as a prefix, NUMBERING:SOURCE, NUMBERING one "
            "of {numberings} (e.g. affectnet:train.csv); class names "
            "(any case) need none. See docs/pretrain.md."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: config.yaml, sources.json, labels.json, last.pt, metrics.jsonl, "
            "problems.txt, student (and teacher) .safetensors + .json; see docs/formats.md."
        ),
    ],
    unlabelled: Annotated[
        list[Path] | None,
        typer.Option(
            help="Unlabelled face images (repeat to combine): a folder (searched recursively) "
            "or a list (.txt, one path a line; .csv with a path column). Read by recipes that "
            "learn from unlabelled images ({ssl-recipes})."
        ),
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="timm model name for teacher and student (default resnet50).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML settings file, e.g. configs/pretrain.yaml (default: built-in)."),
    ] = None,
    set_values: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override one setting, key=value (repeatable), e.g. --set mu=4."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Training steps (default from the config: 100000).")
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(help="How the network is trained, one of the registered recipes: {recipes}."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --out from its last.pt with its saved settings (--steps, "
            "eval_every, log_every, checkpoint_every and workers may change)."
        ),
    ] = False,
    init_checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Local weights (.safetensors/.pth) to start both networks from, e.g. ImageNet; "
            "a head of another class count is replaced."
        ),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Start both networks from timm's pretrained weights by name, through timm's "
            "loader and Hugging Face cache: a model name, a tagged one (e.g. resnet50.a1_in1k) "
            "or hf-hub:ORG/NAME; the EXPR head is new. Sets the backbone. Offline, use "
            "--init-checkpoint with the downloaded file instead."
        ),
    ] = None,
    per_class_cap: Annotated[
        int | None,
        typer.Option(
            help="At most N images per class of the extra labelled sources (not Aff-Wild2 "
            "roots), drawn with the seed; the rest join the unlabelled pool (Yu et al.: 8000). "
            "Setting per_class_cap; 0: no cap."
        ),
    ] = None,
    print_config: PrintConfigOption = False,
    progress: ProgressOption = True,
) -> None:
    """Phase 1: semi-supervised (Meta Pseudo Labels) pretraining of the frozen student."""
    from fercache.pretrain import pretrain as run_pretrain
    from fercache.pretrain import requested_config, settings_text

    settings = requested_config(
        out,
        config,
        set_values,
        resume=resume,
        pretrained=pretrained,
        init_checkpoint=init_checkpoint,
        backbone=backbone,
        steps=steps,
        recipe=recipe,
        per_class_cap=per_class_cap,
    )
    if print_config:
        typer.echo(settings_text(settings), nl=False)
        return
    report = run_pretrain(
        labelled,
        unlabelled or [],
        out,
        settings,
        resume=resume,
        init_checkpoint=init_checkpoint,
        pretrained=pretrained,
        progress=progress,
    )
    for problem in report.problems[:10]:
        error_console.print(f"[yellow]warning:[/] left out: {problem}", highlight=False)
    if len(report.problems) > 10:
        error_console.print(
            f"[yellow]warning:[/] {len(report.problems) - 10} more, all in {out}/problems.txt"
        )
    shown = ", ".join(f"{key} {value:.3f}" for key, value in report.evaluation.items())
    console.print(
        f"{report.steps} steps; wrote {out}/student.safetensors"
        + (f"; held-out: {shown}" if shown else "")
    )

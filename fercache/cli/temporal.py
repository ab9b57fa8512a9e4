"""`fercache train`, `sweep` and `runs`: phase 2, its runs and their comparison
(fercache.temporal, fercache.experiments)."""

import json
from pathlib import Path
from typing import Annotated

import typer

from fercache.cli.shared import PrintConfigOption, ProgressOption, RegistryHelp, console
from fercache.outputs import write_text_atomically

commands = typer.Typer()

# Options shared by `train` and `sweep` (a sweep trains many runs with the same base settings).
CachesArgument = Annotated[
    list[Path],
    typer.Argument(
        metavar="CACHE_DIR",
        help="Feature cache folder(s); several are fused by concatenating each frame's "
        "features in the order given.",
    ),
]
TrainDataOption = Annotated[
    Path, typer.Option("--data", help="Aff-Wild2 root: the labels are read from it.")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="YAML settings file, e.g. configs/temporal.yaml (default: built-in)."
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one setting, key=value (repeatable), e.g. layers=2 or, with its section "
        "of configs/temporal.yaml, model.layers=2. model=NAME chooses the temporal model, one "
        "of the registered ones: {temporal-models}.",
    ),
]
EpochsOption = Annotated[
    int | None, typer.Option("--epochs", help="Epochs (default from the config).")
]
SeedOption = Annotated[
    int | None,
    typer.Option(
        "--seed", min=0, max=2**63 - 1, help="Seed; on CPU the same seed gives identical metrics."
    ),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
]
MemoryBudgetOption = Annotated[
    str,
    typer.Option(
        "--memory-budget",
        help="Largest size of features to hold in RAM (e.g. 16G); above it windows are "
        "read from the HDF5 stores by worker processes. auto: half the RAM.",
    ),
]


@commands.command(cls=RegistryHelp)
def train(
    caches: CachesArgument,
    data: TrainDataOption,
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: config.yaml, model.json, best.safetensors, last.pt, "
            "metrics.jsonl, summary.json, curves.png. With --bagging: one bag-<k> run folder "
            "per model, ensemble-val.h5/.json and bagging.json. With --folds: one fold-<k> run "
            "folder per fold, folds.json and folds-summary.json."
        ),
    ],
    config: ConfigOption = None,
    set_values: SetOption = None,
    epochs: EpochsOption = None,
    seed: SeedOption = None,
    device: DeviceOption = "auto",
    resume: Annotated[
        bool,
        typer.Option(help="Continue the run in --out from last.pt with its saved settings."),
    ] = False,
    memory_budget: MemoryBudgetOption = "auto",
    bagging: Annotated[
        int | None,
        typer.Option(
            metavar="K",
            help="Train K models (seeds SEED, SEED+1, ...; each on its own --subsample of the "
            "training videos), soft-vote their validation predictions and evaluate the vote.",
        ),
    ] = None,
    subsample: Annotated[
        float | None,
        typer.Option(
            help="Fraction of the training videos each model uses, drawn with its seed (the "
            "subsample setting; the LSD paper bags 0.2). Default from the config: 1.0."
        ),
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(
            metavar="K",
            help="Subject-grouped K-fold cross-validation over the train and val videos: fold "
            "k trains on the other folds and picks its best epoch on its own; prints each "
            "fold's scores and their mean ± sd. Reruns reuse finished folds and resume the "
            "interrupted one (--resume changes nothing); not with --bagging.",
        ),
    ] = None,
    fold_seed: Annotated[
        int | None,
        typer.Option(help="Seed of the fold assignment (default: the run's seed)."),
    ] = None,
    groups: Annotated[
        Path | None,
        typer.Option(
            metavar="CSV",
            help="With --folds: CSV with columns video,subject joining the videos of one person "
            "into one fold (unlisted videos: their own subject; X_left/X_right always together).",
        ),
    ] = None,
    print_config: PrintConfigOption = False,
    progress: ProgressOption = True,
) -> None:
    """Train a temporal model (the transformer by default) on 64-frame clips of cached features
    (phase 2)."""
    from fercache.experiments.training import Models, train_into
    from fercache.temporal.loop import TrainRequest, resolved_config

    subsampled = () if subsample is None else (f"subsample={subsample}",)
    request = TrainRequest(
        config_file=config,
        overrides=(*(set_values or ()), *subsampled),
        epochs=epochs,
        seed=seed,
        memory_budget=memory_budget,
        device=device,
        resume=resume,
        progress=progress,
    )
    if print_config:
        from fercache.temporal.config import settings_text

        typer.echo(settings_text(resolved_config(out, request)), nl=False)
        return
    for shown in train_into(caches, data, out, request, Models(bagging, folds, fold_seed, groups)):
        console.print(shown)


@commands.command(cls=RegistryHelp)
def sweep(
    caches: CachesArgument,
    data: TrainDataOption,
    out: Annotated[Path, typer.Option(help="Sweep folder: one run folder per grid point.")],
    grid: Annotated[
        list[str],
        typer.Option(
            help="A setting and its values, key=v1,v2 (repeat: the points are every "
            "combination), e.g. --grid layers=2,4 --grid lr=1e-4,3e-4; model.layers works too."
        ),
    ],
    config: ConfigOption = None,
    set_values: SetOption = None,
    epochs: EpochsOption = None,
    seed: SeedOption = None,
    device: DeviceOption = "auto",
    memory_budget: MemoryBudgetOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """Train one run per grid point (finished ones skipped, so a killed sweep resumes)."""
    from fercache.experiments.runs_table import best_scores
    from fercache.experiments.sweep import sweep as run_sweep
    from fercache.temporal.loop import TrainRequest

    request = TrainRequest(
        config_file=config,
        overrides=tuple(set_values or ()),
        epochs=epochs,
        seed=seed,
        memory_budget=memory_budget,
        device=device,
        progress=progress,
    )
    for run in run_sweep(caches, data, out, grid, request):
        scores = ", ".join(f"{key} {value:.4f}" for key, value in best_scores(run.summary).items())
        console.print(f"{run.path}: {run.status}; {scores} (epoch {run.summary['best_epoch']})")
    console.print(f"compare the runs: fercache runs {out}")


@commands.command()
def runs(
    folder: Annotated[
        Path, typer.Argument(help="Folder holding training runs (e.g. a sweep's --out).")
    ],
    sort: Annotated[
        str | None,
        typer.Option(
            help="Column to sort on: scores descending, others ascending (default: the first "
            "score, best_val_f1)."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the table as JSON to this file.")
    ] = None,
) -> None:
    """One table of all runs: the settings that differ, epochs and best validation scores."""
    from fercache.experiments.runs_table import render
    from fercache.experiments.training import compare_runs

    table = compare_runs(folder, sort)
    console.print(render(table, f"{len(table.rows)} runs in {folder}"))
    if json_out:
        write_text_atomically(json_out, json.dumps(table.to_json(), indent=2), "the table")
        console.print(f"table written to {json_out}")

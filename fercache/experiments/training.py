"""A training folder holds one temporal run, K bagged runs (`fercache train --bagging K`,
`fercache.experiments.bagging`) or K subject-grouped folds (`--folds K`,
`fercache.experiments.folds`). `train_into` trains what the options ask for; `predict_with`
and `compare_runs` read what the folder holds: the commands `train`, `predict` and `runs` each
call one of them.
"""

from dataclasses import dataclass
from pathlib import Path

from rich.console import RenderableType

from fercache.errors import FercacheError
from fercache.experiments.bagging import render as render_bagging
from fercache.experiments.bagging import train_bagged
from fercache.experiments.folds import (
    is_folds_dir,
    predict_folds,
    train_folds,
    with_fold_means,
)
from fercache.experiments.folds import render as render_folds
from fercache.experiments.runs_table import RunsTable, runs_table
from fercache.framewise.pred_file import Predictions
from fercache.predictions.predict import PredictOptions, predict
from fercache.temporal.loop import TrainRequest, best_scores_text, train


@dataclass(frozen=True)
class Models:
    """How many temporal models `train_into` trains: one (the default), `bagging` of them on
    seeded subsamples, or one per fold of `folds` (assigned with `fold_seed`, default the
    run's seed, keeping the videos of each subject of `groups` together)."""

    bagging: int | None = None
    folds: int | None = None
    fold_seed: int | None = None
    groups: Path | None = None

    def check(self) -> None:
        """A FercacheError for the combinations `train` refuses."""
        if self.folds is None and (self.fold_seed is not None or self.groups is not None):
            raise FercacheError("--fold-seed and --groups go with --folds K")
        if self.folds is not None and self.bagging is not None:
            raise FercacheError(
                "--folds and --bagging: choose one (one model per fold, or K bagged models)"
            )


def train_into(
    caches: list[Path], data: Path, out: Path, request: TrainRequest, models: Models = Models()
) -> list[RenderableType]:
    """Train `models` into `out`; returns what to show of the outcome (nothing on the ranks of a
    torchrun other than 0 when several models were trained)."""
    models.check()
    if models.folds is not None:
        crossed = train_folds(
            caches, data, out, request, models.folds, models.fold_seed, models.groups
        )
        if crossed is None:
            return []
        return [render_folds(crossed), f"compare the folds: fercache runs {out}"]
    if models.bagging is not None:
        bagged = train_bagged(caches, data, out, request, models.bagging)
        return [] if bagged is None else [render_bagging(bagged)]
    summary = train(caches, data, out, request)
    return [f"{best_scores_text(summary)}; run in {out}"]


@dataclass(frozen=True)
class Predicted:
    """The predictions written, and notes on them for the user (a vote of fold models that saw
    the split, inputs that differ)."""

    predictions: Predictions
    notes: tuple[str, ...] = ()


def predict_with(
    run_dir: Path | None, caches: list[Path], out: Path, options: PredictOptions
) -> Predicted:
    """Predict with the run in `run_dir`, or with the soft vote of the fold models when it is the
    folder of `train --folds`; written to `out`."""
    if run_dir is not None and options.source == "temporal" and is_folds_dir(run_dir):
        voted = predict_folds(run_dir, caches, out, options)
        return Predicted(voted.predictions, tuple(voted.notes))
    return Predicted(predict(run_dir, caches, out, options))


def compare_runs(folder: Path, sort: str | None = None) -> RunsTable:
    """The table of the runs under `folder` (`runs_table`); for a folds folder with the folds'
    mean and sd under it."""
    return with_fold_means(runs_table(folder, sort), folder)

"""One table of the temporal training runs under a folder (a sweep, bagging, or any runs).

A run is a folder holding `config.yaml` (written when training starts), found at any depth;
pretraining runs (whose folders also hold `sources.json`) are left out. The
table shows each run's path relative to the folder, only the settings that differ between the
runs (a setting a run's config lacks shows as '-'; `epochs`, the epochs planned, among them),
the epochs done (`epochs_done`), the best epoch and every
numeric `best_*` score of its `summary.json`. A run without `summary.json` is marked unfinished
(with its epochs done, counted in `metrics.jsonl`, out of those planned) and has no scores. A
run whose `config.yaml` (not a mapping of known settings), `summary.json` or `metrics.jsonl`
cannot be read is marked "unreadable: FILE" and its settings are left out of the comparison.

Rows are sorted on one column: scores descending (best first), anything else ascending, empty
cells last, ties by run name. The default is the first score column. Footer rows, when set, come
last under a rule (for a `train --folds` folder: the folds' mean and sd, added by
`fercache.experiments.folds.with_fold_means`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from fercache.errors import FercacheError
from fercache.pretrain.loop import SOURCES_FILE as PRETRAIN_SOURCES
from fercache.resume import CONFIG_FILE, METRICS_FILE, read_config, read_metrics
from fercache.settings import typed_values
from fercache.temporal.config import TemporalConfig
from fercache.temporal.run_files import SUMMARY_FILE, read_summary

RUN = "run"
EPOCHS = "epochs"  # the setting (epochs planned), and a summary's epochs trained
EPOCHS_DONE = "epochs_done"  # the column of epochs trained: `epochs` may differ as a setting
BEST_EPOCH = "best_epoch"
STATUS = "status"


@dataclass(frozen=True)
class RunsTable:
    """Rows (column -> value, None for an empty cell) in display order."""

    columns: list[str]
    scores: list[str]
    rows: list[dict[str, Any]]
    footer: list[dict[str, Any]] = field(default_factory=list)  # e.g. the folds' mean, sd

    def to_json(self) -> dict:
        footer = {"footer": self.footer} if self.footer else {}
        return {"columns": self.columns, "rows": self.rows, **footer}


def runs_table(root: Path, sort: str | None = None) -> RunsTable:
    """Every run under `root`, sorted on column `sort` (default: the first score)."""
    root = Path(root)
    run_dirs = sorted(
        path.parent
        for path in root.rglob(CONFIG_FILE)
        if not (path.parent / PRETRAIN_SOURCES).is_file()
    )
    if not run_dirs:
        raise FercacheError(
            f"{root}: no training runs found (folders holding {CONFIG_FILE}); give the --out "
            "folder of `fercache train`, `fercache sweep` or `fercache train --bagging`"
        )
    runs = [read_run(run_dir) for run_dir in run_dirs]
    # an unreadable run's blank settings would make every setting look different
    differing = _differing_keys([run.config for run in runs if not run.unreadable])
    scores = _score_names([run.summary for run in runs if run.summary])
    rows = [_row(run, root, differing, scores) for run in runs]
    columns = [RUN, *differing, EPOCHS_DONE, BEST_EPOCH, *scores, STATUS]
    return RunsTable(columns, scores, _sorted(rows, sort or (scores or [RUN])[0], columns, scores))


def _differing_keys(configs: list[dict]) -> list[str]:
    """Settings whose value is not the same in every config, in first-seen order."""
    keys = list(dict.fromkeys(key for config in configs for key in config))
    return [key for key in keys if len({json.dumps(config.get(key)) for config in configs}) > 1]


def best_scores(summary: dict) -> dict[str, float]:
    """A run summary's numeric `best_*` figures except `best_epoch` (e.g. best_val_f1)."""
    return {
        key: value
        for key, value in summary.items()
        if key.startswith("best_")
        and key != BEST_EPOCH
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def _score_names(summaries: list[dict]) -> list[str]:
    return list(dict.fromkeys(name for summary in summaries for name in best_scores(summary)))


@dataclass(frozen=True)
class RunFiles:
    """What a run folder's files say; `unreadable` names the first one that cannot be read
    (then the fields it would give are empty)."""

    path: Path
    config: dict[str, Any]
    summary: dict | None
    epochs_done: int | None
    unreadable: str = ""


def read_run(run_dir: Path) -> RunFiles:
    """The run's settings, summary and epochs done. A `config.yaml` that is not a mapping of
    known temporal settings counts as unreadable, like a damaged summary or metrics file."""
    try:
        config = read_config(run_dir)
        typed_values(TemporalConfig, config, "temporal")
    except FercacheError:
        return RunFiles(run_dir, {}, None, None, CONFIG_FILE)
    try:
        summary = read_summary(run_dir)
    except FercacheError:
        return RunFiles(run_dir, config, None, None, SUMMARY_FILE)
    if summary is not None:
        return RunFiles(run_dir, config, summary, summary[EPOCHS])
    try:
        return RunFiles(run_dir, config, None, len(read_metrics(run_dir)))
    except FercacheError:
        return RunFiles(run_dir, config, None, None, METRICS_FILE)


def _row(run: RunFiles, root: Path, differing: list[str], scores: list[str]) -> dict[str, Any]:
    summary, done = run.summary, run.epochs_done
    if run.unreadable:
        status = f"unreadable: {run.unreadable}"
    elif summary:
        status = "finished"
    else:
        status = f"unfinished ({done}/{run.config.get(EPOCHS)} epochs)"
    return {
        RUN: str(run.path.relative_to(root)),
        **{key: run.config.get(key) for key in differing},
        EPOCHS_DONE: done,
        BEST_EPOCH: summary.get(BEST_EPOCH) if summary else None,
        **{name: summary.get(name) if summary else None for name in scores},
        STATUS: status,
    }


def _sorted(rows: list[dict], key: str, columns: list[str], scores: list[str]) -> list[dict]:
    if key not in columns:
        raise FercacheError(f"--sort '{key}': not a column; choose one of {', '.join(columns)}")
    descending = key in scores
    by_name = sorted(rows, key=lambda row: row[RUN])
    present = [row for row in by_name if row[key] is not None]
    empty = [row for row in by_name if row[key] is None]
    return sorted(present, key=lambda row: row[key], reverse=descending) + empty


def render(table: RunsTable, title: str) -> Table:
    shown = Table(title=title)
    for column in table.columns:
        justify = "right" if column in table.scores else "left"
        shown.add_column(column, justify=justify, overflow="fold")  # wrap, never cut names
    for row in table.rows:
        shown.add_row(*(_cell(row[column], column in table.scores) for column in table.columns))
    if table.footer:
        shown.add_section()
    for row in table.footer:  # cells it lacks stay blank
        cells = (
            _cell(row[column], column in table.scores) if column in row else ""
            for column in table.columns
        )
        shown.add_row(*cells)
    return shown


def _cell(value: Any, score: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if score else str(value)

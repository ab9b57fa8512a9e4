"""One table of the temporal training runs under a folder (a sweep, bagging, or any runs).

A run is a folder holding `config.yaml` (written when training starts), found at any depth;
pretraining runs (whose folders also hold `sources.json`) are left out. The
table shows each run's path relative to the folder, only the settings that differ between the
runs (a setting a run's config lacks shows as '-'), the epochs done, the best epoch and every
numeric `best_*` score of its `summary.json`. A run without `summary.json` is marked unfinished
(with its epochs done, counted in `metrics.jsonl`, out of those planned) and has no scores.

Rows are sorted on one column: scores descending (best first), anything else ascending, empty
cells last, ties by run name. The default is the first score column.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from fercache.errors import FercacheError
from fercache.pretrain.loop import SOURCES_FILE as PRETRAIN_SOURCES
from fercache.runfolder import CONFIG_FILE, read_config, read_metrics
from fercache.temporal.rundir import read_summary

RUN = "run"
EPOCHS = "epochs"
BEST_EPOCH = "best_epoch"
STATUS = "status"


@dataclass(frozen=True)
class RunsTable:
    """Rows (column -> value, None for an empty cell) in display order."""

    columns: list[str]
    scores: list[str]
    rows: list[dict[str, Any]]

    def to_json(self) -> dict:
        return {"columns": self.columns, "rows": self.rows}


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
    configs = {run_dir: read_config(run_dir) for run_dir in run_dirs}
    summaries = {run_dir: read_summary(run_dir) for run_dir in run_dirs}
    differing = _differing_keys(list(configs.values()))
    scores = _score_names([summary for summary in summaries.values() if summary])
    rows = [
        _row(run_dir, root, configs[run_dir], summaries[run_dir], differing, scores)
        for run_dir in run_dirs
    ]
    columns = [RUN, *differing, EPOCHS, BEST_EPOCH, *scores, STATUS]
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


def _row(
    run_dir: Path,
    root: Path,
    config: dict,
    summary: dict | None,
    differing: list[str],
    scores: list[str],
) -> dict[str, Any]:
    done = summary[EPOCHS] if summary else len(read_metrics(run_dir))
    return {
        RUN: str(run_dir.relative_to(root)),
        **{key: config.get(key) for key in differing},
        EPOCHS: done,
        BEST_EPOCH: summary.get(BEST_EPOCH) if summary else None,
        **{name: summary.get(name) if summary else None for name in scores},
        STATUS: "finished" if summary else f"unfinished ({done}/{config.get(EPOCHS)} epochs)",
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
    return shown


def _cell(value: Any, score: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if score else str(value)

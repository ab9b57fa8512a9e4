"""Grid sweeps of temporal training runs: one run folder per point of a Cartesian product.

`--grid key=v1,v2` names a setting of `configs/temporal.yaml` and its values; several `--grid`
options multiply. A key is what `--set` accepts (`fercache.settings.setting_key`): the setting's
name (`layers`, `lr`), or `section.name` with its section of `configs/temporal.yaml` (`data.`,
`clips.`, `model.`, `optim.`, `loading.`; `model.layers` is `layers`). Every point is checked
(names and values) before the first run starts.

Each point trains into `OUT/<key>=<value>,...` (values as resolved, e.g. `layers=2,lr=0.0001`)
with the base settings (`--config`, `--set`, `--epochs`, ...) plus the point's. A point whose
folder holds `summary.json` is finished and skipped (after checking its saved settings are the
ones asked for), one with a checkpoint resumes from it: a killed sweep continues where it
stopped. Under torchrun, rank r takes points r, r + W, ... and trains each alone (no process
group) on its own device; without torchrun the points run one after the other.
"""

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fercache.distributed import torchrun_rank
from fercache.errors import FercacheError
from fercache.resume import holds_run
from fercache.settings import setting_key
from fercache.temporal.config import SECTIONS, load_config, resumed_config
from fercache.temporal.loop import TrainRequest, train
from fercache.temporal.run_files import read_summary

TORCHRUN_WORLD = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid: its folder, what happened to it, and its summary."""

    name: str
    path: Path
    status: str  # trained, resumed, finished earlier
    summary: dict


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`['model.layers=2,4', 'lr=1e-4,3e-4']` -> `{'layers': ['2', '4'], 'lr': [...]}`."""
    if not items:
        raise FercacheError("give at least one --grid key=value1,value2 (e.g. --grid layers=2,4)")
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        values = [value.strip() for value in text.split(",")]
        if not sep or not key.strip() or not all(values):
            raise FercacheError(
                f"--grid {item!r}: expected key=value1,value2,... (e.g. --grid layers=2,4)"
            )
        key = setting_key(key, SECTIONS)
        if key in grid:
            raise FercacheError(f"--grid {item!r}: '{key}' is already swept by another --grid")
        if len(set(values)) < len(values):
            raise FercacheError(f"--grid {item!r}: a value is repeated")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, the last key varying fastest."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def sweep(
    cache_dirs: list[Path], data: Path, out: Path, grid_items: list[str], request: TrainRequest
) -> list[SweepRun]:
    """Train every point of the grid this process owns into `out/<point name>`."""
    points = _named_points(grid_points(parse_grid(grid_items)), request)
    rank, world_size = torchrun_rank()
    runs = []
    for name, point_request in points[rank::world_size]:
        with _alone():
            summary, status = train_or_reuse(cache_dirs, data, Path(out) / name, point_request)
        runs.append(SweepRun(name, Path(out) / name, status, summary))
    return runs


def _named_points(
    points: list[dict[str, str]], request: TrainRequest
) -> list[tuple[str, TrainRequest]]:
    """Each point's folder name and request; resolving the settings checks every point now."""
    named = []
    for point in points:
        overrides = (*request.overrides, *(f"{key}={value}" for key, value in point.items()))
        config = load_config(
            request.config_file, list(overrides), epochs=request.epochs, seed=request.seed
        ).to_json()
        name = ",".join(f"{key}={config[key]}" for key in point)
        if "/" in name:
            raise FercacheError(f"--grid value in '{name}': a value may not contain '/'")
        named.append((name, replace(request, overrides=overrides)))
    names = [name for name, _ in named]
    if len(set(names)) < len(names):
        raise FercacheError(
            f"--grid: several points resolve to the same settings ({', '.join(names)}); "
            "give distinct values"
        )
    return named


@contextmanager
def _alone() -> Iterator[None]:
    """Hide torchrun's world from the trainer: this rank trains its own points by itself."""
    saved = {name: os.environ.pop(name, None) for name in TORCHRUN_WORLD}
    try:
        yield
    finally:
        os.environ.update({name: value for name, value in saved.items() if value is not None})


def train_or_reuse(
    cache_dirs: list[Path], data: Path, run_dir: Path, request: TrainRequest
) -> tuple[dict, str]:
    """The run's summary and how it was obtained: read back from a finished run (whose saved
    settings must be the ones asked for), resumed from an interrupted one, or trained."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if summary is not None:
        resumed_config(
            run_dir,
            request.config_file,
            list(request.overrides),
            epochs=request.epochs,
            seed=request.seed,
        )
        return summary, "finished earlier"
    resume = holds_run(run_dir)
    summary = train(cache_dirs, data, run_dir, replace(request, resume=resume))
    return summary, "resumed" if resume else "trained"

"""Settings of a temporal training run: defaults, a YAML file, `--set key=value` overrides.

`configs/temporal.yaml` documents every key and why its default was chosen, in sections
(`SECTIONS`): on the command line `model.layers` means `layers`. The resolved settings are
written to the run folder as `config.yaml` (`fercache.resume`), and `--resume` reads them
back from there, so a resumed run can never silently change its own recipe.
"""

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fercache.data.tasks import TASKS
from fercache.errors import FercacheError
from fercache.resume import CONFIG_FILE, config_text, read_config, resumed_settings
from fercache.resume import write_config as write_run_config
from fercache.settings import given_values, typed_values
from fercache.temporal.model import DEFAULT_MODEL
from fercache.temporal.registry import TEMPORAL_MODELS

CONFIG_HEADER = "resolved settings of this run (fercache train); --resume reads them back"
BALANCE_MODES = ("weights", "sampling", "none")
AU_POS_WEIGHTS = ("none", "inverse_frequency")
# The validation score of each task, and P = their sum over the trained tasks (Li et al.'s
# multi-task score F1_EXPR + F1_AU + CCC_VA when all three are trained).
SCORE_OF_TASK = {"expr": "expr_f1", "au": "au_f1", "va": "va_ccc"}
SCORES = (*SCORE_OF_TASK.values(), "p")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# The sections of configs/temporal.yaml and their keys, in the file's order: `--set` and
# `fercache sweep --grid` accept `section.key` for `key`.
SECTIONS = {
    "data": ("tasks", "train_split", "val_split", "select", "subsample"),
    "clips": ("clip_frames", "eval_stride", "smooth_window"),
    "model": ("model", "width", "layers", "heads", "ff_width", "dropout", "input_dropout"),
    "optim": (
        *("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "grad_clip"),
        *("balance", "loss_weights", "au_pos_weight", "amp"),
    ),
    "loading": ("workers", "eval_batch", "seed"),
}


@dataclass(frozen=True)
class TemporalConfig:
    """Every knob of a temporal run; `configs/temporal.yaml` justifies each default."""

    # What `--resume` may change: only what cannot change the numbers. Not `epochs`: the
    # learning rate follows a cosine over all epochs, so more epochs would change the schedule
    # of the epochs already trained (and restart a finished run's decayed rate).
    MAY_CHANGE_ON_RESUME: ClassVar[frozenset[str]] = frozenset({"workers"})

    tasks: tuple[str, ...] = ("expr",)
    train_split: str = "train"
    val_split: str = "val"
    select: str = "auto"
    subsample: float = 1.0
    clip_frames: int = 64
    eval_stride: int = 32
    smooth_window: int = 30
    model: str = DEFAULT_MODEL  # a registered temporal model (fercache.temporal.registry)
    width: int = 256
    layers: int = 4
    heads: int = 4
    ff_width: int = 1024
    dropout: float = 0.1
    input_dropout: float = 0.1
    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    balance: str = "weights"
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {task: 1.0 for task in SCORE_OF_TASK}
    )
    au_pos_weight: str = "none"
    amp: bool = True
    workers: int = 2
    eval_batch: int = 64
    seed: int = 0

    def validate(self) -> None:
        checks = [
            *self._task_checks(),
            *self._model_checks(),
            (0 < self.subsample <= 1, "subsample must lie in (0, 1]"),
            (self.clip_frames >= 2, "clip_frames must be at least 2"),
            (1 <= self.eval_stride <= self.clip_frames, "eval_stride must lie in [1, clip_frames]"),
            (self.smooth_window >= 1, "smooth_window must be at least 1"),
            (min(self.width, self.layers, self.heads, self.ff_width) >= 1, "sizes must be >= 1"),
            (0 <= self.dropout < 1 and 0 <= self.input_dropout < 1, "dropouts lie in [0, 1)"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1"),
            (
                0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf,
                "lr must be > 0, weight_decay >= 0, both finite",
            ),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must lie in [0, epochs]"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 turns clipping off)"),
            (self.balance in BALANCE_MODES, f"balance must be one of {', '.join(BALANCE_MODES)}"),
            (
                self.balance != "sampling" or "expr" in self.tasks,
                "balance=sampling draws windows by EXPR class: it needs expr in tasks",
            ),
            (
                self.au_pos_weight in AU_POS_WEIGHTS,
                f"au_pos_weight must be one of {', '.join(AU_POS_WEIGHTS)}",
            ),
            (self.workers >= 0 and self.eval_batch >= 1, "workers >= 0, eval_batch >= 1"),
            (0 <= self.seed < 2**63, "seed must lie in [0, 2^63)"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise FercacheError("temporal settings: " + "; ".join(problems))

    def _model_checks(self) -> list[tuple[bool, str]]:
        known = self.model in TEMPORAL_MODELS
        problems = TEMPORAL_MODELS[self.model].setting_problems(self) if known else []
        return [
            (known, f"model must be one of {', '.join(TEMPORAL_MODELS)}"),
            *((False, problem) for problem in problems),
        ]

    def _task_checks(self) -> list[tuple[bool, str]]:
        known = ", ".join(TASKS)
        weights = self.loss_weights
        return [
            (bool(self.tasks), f"tasks must list at least one of {known}"),
            (set(self.tasks) <= set(TASKS), f"tasks must be among {known}"),
            (len(set(self.tasks)) == len(self.tasks), "tasks must not repeat a task"),
            (set(weights) <= set(TASKS), f"loss_weights names tasks among {known}"),
            (all(weight >= 0 for weight in weights.values()), "loss_weights must be >= 0"),
            (
                sum(weights.get(task, 1.0) for task in self.tasks) > 0,
                "loss_weights of the trained tasks must not all be 0",
            ),
            (
                self.select in ("auto", *SCORES),
                f"select must be auto or one of {', '.join(SCORES)}",
            ),
            (
                self.select in ("auto", "p") or _task_of_score(self.select) in self.tasks,
                f"select={self.select} scores a task that is not in tasks {list(self.tasks)}",
            ),
            (self.select != "p" or len(self.tasks) > 1, "select=p needs several tasks"),
        ]

    @property
    def selected_score(self) -> str:
        """The validation score that chooses best.safetensors ("auto" resolved): the task's
        own score for one task, P for several."""
        if self.select != "auto":
            return self.select
        return SCORE_OF_TASK[self.tasks[0]] if len(self.tasks) == 1 else "p"

    @property
    def task_weights(self) -> dict[str, float]:
        """The loss weight of each trained task (1 for a task `loss_weights` does not name)."""
        return {task: self.loss_weights.get(task, 1.0) for task in self.tasks}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _task_of_score(score: str) -> str | None:
    return next((task for task, name in SCORE_OF_TASK.items() if name == score), None)


def memory_budget_bytes(budget: str) -> int:
    """'auto' (half the machine's RAM) or a size such as '16G', '512M', '2.5GiB' in bytes."""
    if str(budget).strip().lower() == "auto":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    match = _SIZE.match(str(budget))
    if not match:
        raise FercacheError(
            f"memory budget '{budget}': give 'auto' or a size such as 16G, 512M or 2.5GiB"
        )
    return int(float(match[1]) * _SIZE_UNITS[match[2].upper()])


def load_config(
    path: Path | None, overrides: list[str] | None = None, **options: Any
) -> TemporalConfig:
    """Defaults, then the YAML file, then `key=value` overrides, then non-None `options`."""
    return _apply(TemporalConfig(), given_values(path, overrides, options, SECTIONS))


def resumed_config(
    run_dir: Path, path: Path | None, overrides: list[str] | None = None, **options: Any
) -> TemporalConfig:
    """The run's saved settings; anything given now that would change them is an error,
    except for the keys of `TemporalConfig.MAY_CHANGE_ON_RESUME` (`resume.resumed_settings`)."""
    saved_path = Path(run_dir) / CONFIG_FILE
    values = read_config(run_dir)
    try:
        saved = _apply(TemporalConfig(), values)
    except FercacheError as error:
        raise FercacheError(
            f"{saved_path}: {error}. The run was written by another version of fercache: "
            "train into a new --out."
        ) from error
    given = _apply(saved, given_values(path, overrides, options, SECTIONS))
    settings = resumed_settings(
        saved.to_json(), given.to_json(), TemporalConfig.MAY_CHANGE_ON_RESUME, saved_path
    )
    return _apply(TemporalConfig(), settings)


def write_config(config: TemporalConfig, run_dir: Path) -> Path:
    """The resolved settings into the run folder's `config.yaml`."""
    return write_run_config(run_dir, config.to_json(), CONFIG_HEADER)


def settings_text(config: TemporalConfig) -> str:
    """What `write_config` writes (`fercache train --print-config`)."""
    return config_text(config.to_json(), CONFIG_HEADER)


def _apply(base: TemporalConfig, values: dict[str, Any]) -> TemporalConfig:
    config = dataclasses.replace(base, **typed_values(TemporalConfig, values, "temporal"))
    config.validate()
    return config

"""Settings of a pretraining run: defaults, `configs/pretrain.yaml`, `--set key=value` overrides."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fercache.errors import FercacheError
from fercache.settings import given_values, typed_values

RECIPES = ("mpl", "supervised")


@dataclass(frozen=True)
class PretrainConfig:
    """Every knob of phase 1; `configs/pretrain.yaml` documents each one.

    Defaults follow seed 001 §4.2 (ResNet-50, lr 1e-2 / 1e-3 with cosine decay, batch 32,
    100 k steps, 256 px resized and cropped to 224) where it states them, and Meta Pseudo
    Labels / UDA practice where it does not.
    """

    recipe: str = "mpl"
    backbone: str = "resnet50"
    image_size: int | None = None  # None: the backbone's own timm input size
    resize_ratio: float = 256 / 224  # resize to image_size * ratio, then crop image_size
    steps: int = 100_000
    batch_size: int = 32
    mu: int = 2
    teacher_lr: float = 1e-2
    student_lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    temperature: float = 0.7
    threshold: float = 0.6
    lambda_u: float = 1.0
    uda_steps: int = 5000
    feedback_sign: int = 1
    ema_decay: float = 0.0
    randaugment: str = "rand-m9-mstd0.5-inc1-mmax9"
    erasing_prob: float = 0.25
    holdout_fraction: float = 0.1
    eval_every: int = 1000
    log_every: int = 50
    checkpoint_every: int = 1000
    workers: int = 4
    amp: bool = True
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}"),
            (self.steps >= 1, "steps must be at least 1"),
            (self.batch_size >= 1 and self.mu >= 1, "batch_size and mu must be at least 1"),
            (self.feedback_sign in (1, -1), "feedback_sign must be 1 or -1"),
            (0 <= self.threshold <= 1, "threshold must lie in [0, 1]"),
            (self.temperature > 0, "temperature must be positive"),
            (0 <= self.ema_decay < 1, "ema_decay must lie in [0, 1) (0 turns EMA off)"),
            (0 < self.holdout_fraction < 1, "holdout_fraction must lie in (0, 1)"),
            (self.image_size is None or self.image_size >= 16, "image_size must be >= 16"),
            (
                min(self.eval_every, self.log_every, self.checkpoint_every) >= 1,
                "eval_every, log_every and checkpoint_every must be at least 1",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise FercacheError("pretrain settings: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(
    path: Path | None,
    overrides: list[str] | None = None,
    base: PretrainConfig | None = None,
    **options: Any,
) -> PretrainConfig:
    """`base` (default: the defaults), then the YAML file, then `key=value` overrides, then
    non-None `options`."""
    values: dict[str, Any] = base.to_json() if base else {}
    values.update(given_values(path, overrides, options))
    config = PretrainConfig(**typed_values(PretrainConfig, values, "pretrain"))
    config.validate()
    return config

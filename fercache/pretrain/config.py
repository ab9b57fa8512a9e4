"""Settings of a pretraining run: defaults, `configs/pretrain.yaml`, `--set key=value` overrides."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fercache.errors import FercacheError

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
    if path is not None:
        values.update(_read_yaml(Path(path)))
    for item in overrides or []:
        key, value = _parse_override(item)
        values[key] = value
    values.update({key: value for key, value in options.items() if value is not None})
    config = PretrainConfig(**_typed(values, source=str(path or "--set")))
    config.validate()
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FercacheError(f"{path}: no such config file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise FercacheError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise FercacheError(f"{path}: expected a mapping of setting: value")
    return loaded


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise FercacheError(f"--set {item!r}: expected key=value, e.g. --set mu=4")
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise FercacheError(f"--set {item!r}: value is not valid YAML ({error})") from error


def _typed(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check names and coerce numbers (YAML reads `1e-2` as text, `32` where 32.0 is meant)."""
    fields = {field.name: field for field in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise FercacheError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(fields)}"
        )
    typed: dict[str, Any] = {}
    for key, value in values.items():
        default = fields[key].default
        try:
            typed[key] = _coerce(value, default)
        except (TypeError, ValueError):
            raise FercacheError(
                f"{source}: setting {key}={value!r} should be like {default!r}"
            ) from None
    return typed


def _coerce(value: Any, default: Any) -> Any:
    if value is None or default is None:
        return None if value is None else int(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if isinstance(default, int) and not isinstance(value, bool):
        if float(value) != int(float(value)):
            raise ValueError(value)
        return int(float(value))
    return type(default)(value)

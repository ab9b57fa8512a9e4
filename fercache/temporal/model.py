"""What every temporal model shares: its settings (`ModelConfig`, the run's `model.json`) and
its frame: per-frame features → input LayerNorm (fused caches differ in scale), dropout, a
linear projection to `width` → the model's own encoder along time → a final LayerNorm and one
linear per-frame head per trained task, side by side on the shared encoding: EXPR 8 class
logits, AU 12 logits (one sigmoid each), VA 2 values squashed by tanh into [-1, 1].

A model is a `TemporalModel` subclass that builds and runs its encoder (`transformer`,
`tcn`); `fercache.temporal.registry` names them.
"""

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, TASKS, VA_NAMES
from fercache.errors import FercacheError

# What each task's head outputs, in order.
OUTPUTS: dict[str, tuple[str, ...]] = {"expr": EXPR_CLASSES, "au": AU_NAMES, "va": VA_NAMES}
DEFAULT_MODEL = "transformer"  # the model of runs whose model.json names none


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (written to the run's `model.json`)."""

    feature_dim: int
    tasks: tuple[str, ...]
    clip_frames: int
    width: int
    layers: int
    heads: int  # the transformer's attention heads
    ff_width: int  # the transformer's feed-forward width
    dropout: float
    input_dropout: float
    model: str = DEFAULT_MODEL  # the registered name (fercache.temporal.registry)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict, source: Path) -> "ModelConfig":
        names = [field.name for field in dataclasses.fields(cls) if field.name != "model"]
        missing = [name for name in names if name not in values]
        if missing:
            raise FercacheError(
                f"{source}: model config lacks {', '.join(missing)}; it was not written by "
                "this version of `fercache train` (retrain, or use a matching fercache)"
            )
        unknown = [task for task in values["tasks"] if task not in TASKS]
        if unknown:
            raise FercacheError(f"{source}: unknown task(s) {', '.join(unknown)} in 'tasks'")
        return cls(
            **{name: values[name] for name in names if name != "tasks"},
            tasks=tuple(values["tasks"]),
            model=str(values.get("model", DEFAULT_MODEL)),
        )


class TemporalModel(nn.Module, ABC):
    """The frame every model shares (see the module); a subclass builds its encoder, which
    maps (B, T, width) to (B, T, width) and never lets padding rows change the others."""

    description: ClassVar[str] = ""  # one line for `--help` and the docs

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.input_norm = nn.LayerNorm(config.feature_dim)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.project = nn.Linear(config.feature_dim, config.width)
        self.encoder = self.build_encoder(config)
        self.norm = nn.LayerNorm(config.width)
        self.heads = nn.ModuleDict(
            {task: nn.Linear(config.width, len(OUTPUTS[task])) for task in config.tasks}
        )

    @classmethod
    def setting_problems(cls, config) -> list[str]:
        """What is wrong with the settings for this model (`config` has ModelConfig's sizes)."""
        return []

    @abstractmethod
    def build_encoder(self, config: ModelConfig) -> nn.Module:
        """The encoder along time (assigned to `self.encoder`)."""

    @abstractmethod
    def encode(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """(B, T, width) projected features, (B, T) bool padding (True = pad) → (B, T, width)."""

    def forward(
        self, features: torch.Tensor, padding: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """(B, T, D) features, (B, T) bool padding (True = pad) → per task (B, T, outputs):
        EXPR and AU logits, VA values in [-1, 1]; T ≤ clip."""
        x = self.project(self.input_dropout(self.input_norm(features.float())))
        encoded = self.norm(self.encode(x, padding))
        outputs = {task: head(encoded) for task, head in self.heads.items()}
        if "va" in outputs:
            outputs["va"] = torch.tanh(outputs["va"])
        return outputs

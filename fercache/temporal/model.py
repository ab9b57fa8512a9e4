"""The temporal model: per-frame features → transformer encoder along time → per-frame outputs.

Input LayerNorm (fused caches differ in scale), dropout, a linear projection to `width`,
fixed sinusoidal positions, a pre-norm `torch.nn.TransformerEncoder` with a key padding mask
(padding rows are never attended to), a final LayerNorm and one linear per-frame head per
trained task, side by side on the shared encoding: EXPR 8 class logits, AU 12 logits (one
sigmoid each), VA 2 values squashed by tanh into [-1, 1].
"""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, TASKS, VA_NAMES
from fercache.errors import FercacheError

# What each task's head outputs, in order.
OUTPUTS: dict[str, tuple[str, ...]] = {"expr": EXPR_CLASSES, "au": AU_NAMES, "va": VA_NAMES}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (written to the run's `model.json`)."""

    feature_dim: int
    tasks: tuple[str, ...]
    clip_frames: int
    width: int
    layers: int
    heads: int
    ff_width: int
    dropout: float
    input_dropout: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict, source: Path) -> "ModelConfig":
        names = [field.name for field in dataclasses.fields(cls)]
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
        )


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """(length, width) fixed positions of "Attention is all you need"."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: width // 2])
    return table


class TemporalTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.input_norm = nn.LayerNorm(config.feature_dim)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.project = nn.Linear(config.feature_dim, config.width)
        self.register_buffer(
            "positions", sinusoidal_positions(config.clip_frames, config.width), persistent=False
        )
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            config.ff_width,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.heads = nn.ModuleDict(
            {task: nn.Linear(config.width, len(OUTPUTS[task])) for task in config.tasks}
        )

    def forward(
        self, features: torch.Tensor, padding: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """(B, T, D) features, (B, T) bool padding (True = pad) → per task (B, T, outputs):
        EXPR and AU logits, VA values in [-1, 1]; T ≤ clip."""
        x = self.project(self.input_dropout(self.input_norm(features.float())))
        x = x + self.positions[: x.shape[1]]
        encoded = self.norm(self.encoder(x, src_key_padding_mask=padding))
        outputs = {task: head(encoded) for task, head in self.heads.items()}
        if "va" in outputs:
            outputs["va"] = torch.tanh(outputs["va"])
        return outputs

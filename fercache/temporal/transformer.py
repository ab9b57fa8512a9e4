"""`transformer`: fixed sinusoidal positions and a pre-norm `torch.nn.TransformerEncoder` with
a key padding mask (padding rows are never attended to), as in Yu et al.'s temporal encoder."""

import math

import torch
from torch import nn

from fercache.temporal.model import ModelConfig, TemporalModel


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """(length, width) fixed positions of "Attention is all you need"."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: width // 2])
    return table


class TemporalTransformer(TemporalModel):
    description = "self-attention over the clip (width, layers, heads, ff_width)"

    @classmethod
    def setting_problems(cls, config) -> list[str]:
        uneven = config.heads >= 1 and config.width % config.heads
        return ["width must be a multiple of heads"] if uneven else []

    def build_encoder(self, config: ModelConfig) -> nn.Module:
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
        return nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)

    def encode(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        x = x + self.positions[: x.shape[1]]
        return self.encoder(x, src_key_padding_mask=padding)

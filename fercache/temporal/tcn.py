"""`tcn`: a dilated temporal convolution network, one stage of Farha and Gall's MS-TCN.

`layers` dilated residual layers of `width` channels; layer i convolves with kernel 3 at
dilation 2^i (no causal shift: a frame sees as far ahead as behind), then ReLU, a 1 x 1
convolution, dropout and the residual. The receptive field is 2^(layers + 1) - 1 frames: 31
at 4 layers, 63 at 5 (a 64-frame clip). Padding rows are zeroed before and after every layer
(MS-TCN's mask), so they never change a real frame's output. `heads` and `ff_width` are the
transformer's and unused here.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fercache.temporal.model import ModelConfig, TemporalModel

KERNEL = 3


class DilatedResidualLayer(nn.Module):
    def __init__(self, width: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.dilated = nn.Conv1d(width, width, KERNEL, padding=dilation, dilation=dilation)
        self.pointwise = nn.Conv1d(width, width, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, width, T) → (B, width, T); `keep` (B, 1, T) is 0 at padding rows."""
        return (x + self.dropout(self.pointwise(F.relu(self.dilated(x))))) * keep


class TemporalConvNet(TemporalModel):
    description = "dilated temporal convolutions, MS-TCN style (width, layers)"

    def build_encoder(self, config: ModelConfig) -> nn.Module:
        return nn.ModuleList(
            DilatedResidualLayer(config.width, 2**index, config.dropout)
            for index in range(config.layers)
        )

    def encode(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        keep = torch.ones_like(x[:, :, :1]) if padding is None else (~padding)[..., None].to(x)
        keep = keep.transpose(1, 2)
        hidden = x.transpose(1, 2) * keep
        for layer in self.encoder:
            hidden = layer(hidden, keep)
        return hidden.transpose(1, 2)

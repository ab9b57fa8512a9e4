"""One optimisation step on a batch of clips, and the masked, class-weighted loss it uses."""

import math
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from fercache.temporal.clips import ClipBatch


def inverse_frequency(counts: np.ndarray) -> np.ndarray:
    """Per-class weights ∝ 1 / frames of the class, mean 1 over the training frames; 0 for a
    class without frames (it has nothing to weigh)."""
    present = counts > 0
    weights = np.zeros(len(counts))
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted mean cross-entropy over rows with a label >= 0; -1 rows and padding add zero.

    `torch.where` (not a multiplication) drops masked rows, so even non-finite logits there
    cannot reach the loss. A batch without any labelled row gives 0 (with zero gradients).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    valid = flat_labels >= 0
    safe_labels = flat_labels.clamp(min=0)
    losses = nn.functional.cross_entropy(flat_logits, safe_labels, reduction="none")
    row_weights = torch.where(valid, weights[safe_labels], torch.zeros_like(losses))
    weighted = torch.where(valid, losses * row_weights, torch.zeros_like(losses))
    return weighted.sum() / row_weights.sum().clamp(min=torch.finfo(torch.float32).tiny)


def warmup_cosine(progress: float, warmup: float, total: float) -> float:
    """Learning-rate factor after `progress` epochs (fractional): linear warm-up, cosine to 0."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / max(total - warmup, 1e-9))))


def autocast_for(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bfloat16 autocast on CUDA (no loss scaling needed); nothing on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: ClipBatch,
    weights: torch.Tensor,
    device: torch.device,
    *,
    grad_clip: float,
    amp: bool,
) -> torch.Tensor:
    """Forward, masked loss, backward, clipping, optimizer step; returns the detached loss
    (left on the device: reading it every step would wait for the GPU)."""
    features = batch.features.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    padding = batch.padding.to(device, non_blocking=True)
    with autocast_for(device, amp):
        logits = model(features, padding)
    loss = masked_cross_entropy(logits, labels, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()

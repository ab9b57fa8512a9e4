"""One optimisation step on a batch of clips, and the masked per-task losses it minimises.

Each task's loss is averaged over the rows (AU: the row and AU pairs) whose label of that task
is valid, so a row labelled for AU but not EXPR adds to the AU loss only; padding rows carry
invalid labels everywhere. The step minimises Σ weight_task · loss_task over the trained tasks:
- EXPR: class-weighted cross-entropy, ignoring -1;
- AU: binary cross-entropy on the 12 logits, ignoring -1, optionally with per-AU positive
  weights;
- VA: 1 - CCC per dimension over the batch's valid rows (not -5), averaged over valence and
  arousal (Li et al.'s EMMA loss). A dimension with fewer than 2 valid rows adds nothing.
Masked rows are removed with `torch.where` before any arithmetic, so whatever a masked row's
output holds (even NaN) reaches neither a loss nor a gradient.
"""

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fercache.data.tasks import AU, VA
from fercache.temporal.clips import ClipBatch

_CCC_EPSILON = 1e-8  # keeps 1 - CCC finite when both series are constant and equal


def inverse_frequency(counts: np.ndarray) -> np.ndarray:
    """Per-class weights ∝ 1 / frames of the class, mean 1 over the training frames; 0 for a
    class without frames (it has nothing to weigh)."""
    present = counts > 0
    weights = np.zeros(len(counts))
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def positive_weights(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Per AU: negatives / positives of the training frames, so that an AU's positive frames
    weigh as much in its BCE as its negative ones; 1 where either count is 0."""
    weights = np.ones(len(positives))
    both = (positives > 0) & (negatives > 0)
    weights[both] = negatives[both] / positives[both]
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


def masked_binary_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean binary cross-entropy over the (row, AU) pairs labelled 0 or 1; -1 pairs add zero.

    `pos_weight` (one per AU) multiplies the loss of positive labels, as in torch's
    `binary_cross_entropy_with_logits`. No valid pair gives 0 (with zero gradients)."""
    valid = labels != AU.invalid
    safe_logits = torch.where(valid, logits.float(), torch.zeros_like(logits, dtype=torch.float32))
    targets = torch.where(valid, labels, torch.zeros_like(labels)).float()
    losses = nn.functional.binary_cross_entropy_with_logits(
        safe_logits, targets, pos_weight=pos_weight, reduction="none"
    )
    return torch.where(valid, losses, torch.zeros_like(losses)).sum() / valid.sum().clamp(min=1)


def concordance_loss(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the dimensions (last axis) of 1 - CCC over the rows whose value is not -5.

    CCC uses population moments, as `fercache.framewise.metrics.concordance`; 0 for a perfect
    prediction, at most 2. A dimension with fewer than 2 valid rows is left out; none left gives
    0."""
    width = predicted.shape[-1]
    valid = (labels != VA.invalid).reshape(-1, width)
    zeros = torch.zeros(valid.shape, device=predicted.device)
    values = torch.where(valid, predicted.reshape(-1, width).float(), zeros)
    truth = torch.where(valid, labels.reshape(-1, width).float(), zeros)
    count = valid.sum(dim=0).clamp(min=1)
    mean_values, mean_truth = values.sum(dim=0) / count, truth.sum(dim=0) / count
    spread_values = torch.where(valid, values - mean_values, zeros)
    spread_truth = torch.where(valid, truth - mean_truth, zeros)
    covariance = (spread_values * spread_truth).sum(dim=0) / count
    denominator = (
        spread_values.square().sum(dim=0) / count
        + spread_truth.square().sum(dim=0) / count
        + (mean_values - mean_truth).square()
    )
    ccc = 2 * covariance / (denominator + _CCC_EPSILON)
    scored = valid.sum(dim=0) >= 2
    losses = torch.where(scored, 1 - ccc, torch.zeros_like(ccc))
    return losses.sum() / scored.sum().clamp(min=1)


@dataclass(frozen=True)
class Objective:
    """What a step minimises: Σ `weights[task]` · loss of task, over the trained tasks.

    `class_weights`: EXPR per-class weights (on the device), needed when EXPR is trained;
    `au_pos_weight`: per-AU positive weights, or None for plain BCE."""

    weights: dict[str, float]
    class_weights: torch.Tensor | None = None
    au_pos_weight: torch.Tensor | None = None

    def losses(
        self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Each trained task's masked loss, and their weighted sum under "total"."""
        losses = {}
        for task in self.weights:
            if task == "expr":
                losses[task] = masked_cross_entropy(
                    outputs[task], targets[task], self.class_weights
                )
            elif task == "au":
                losses[task] = masked_binary_cross_entropy(
                    outputs[task], targets[task], self.au_pos_weight
                )
            else:
                losses[task] = concordance_loss(outputs[task], targets[task])
        losses["total"] = sum(self.weights[task] * losses[task] for task in self.weights)
        return losses


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
    objective: Objective,
    device: torch.device,
    *,
    grad_clip: float,
    amp: bool,
) -> dict[str, torch.Tensor]:
    """Forward, masked losses, backward, clipping, optimizer step; returns the detached losses
    per task and "total" (left on the device: reading them every step would wait for the GPU)."""
    features = batch.features.to(device, non_blocking=True)
    targets = {task: values.to(device, non_blocking=True) for task, values in batch.targets.items()}
    padding = batch.padding.to(device, non_blocking=True)
    with autocast_for(device, amp):
        outputs = model(features, padding)
    losses = objective.losses(outputs, targets)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {name: loss.detach() for name, loss in losses.items()}

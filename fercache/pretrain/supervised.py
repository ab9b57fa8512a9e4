"""The supervised baseline of Yu et al. (Table 1, first row): the student alone, cross-entropy on
class-balanced labelled batches, SGD with warm-up + cosine."""

import torch
import torch.nn.functional as F
from torch import nn

from fercache.pretrain.config import PretrainConfig
from fercache.pretrain.recipe_base import (
    Autocast,
    Metrics,
    ModelFactory,
    OneNetwork,
    StepBatch,
    optimizer_for,
)


class Supervised(OneNetwork):
    description = "the baseline: labelled data only, same schedule"

    def network(self, create: ModelFactory) -> nn.Module:
        return create(self.config.seed)

    def make_optimizer(self, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
        return optimizer_for(model, self.config.student_lr, self.config)

    def train_step(self, batch: StepBatch, step: int, autocast: Autocast) -> Metrics:
        return fit_labels(self.model, self.optimizer, batch, autocast, self.config)


def fit_labels(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: StepBatch,
    autocast: Autocast,
    config: PretrainConfig,
) -> dict[str, torch.Tensor]:
    """One supervised step on the batch's labelled images, with the run's label smoothing."""
    return supervised_step(
        model, optimizer, batch.images, batch.labels, autocast, config.label_smoothing
    )


def supervised_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    autocast: Autocast,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Cross-entropy on the class-balanced labelled batch, one optimizer step."""
    with autocast():
        logits = model(images).float()
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"student_supervised": loss.detach()}

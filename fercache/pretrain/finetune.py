"""What the recipes of Li et al. and the LSD paper (cotex, emma, multitask-landmarks) share: one
trained module, AdamW with timm's layer-wise learning-rate decay, and a step that owns its loss.

The pretraining run (loop.py) and `OneNetwork` keep everything else: loaders, the warm-up +
cosine schedule, logging, held-out evaluation, checkpoints, resume, DDP and export. A recipe's
module called plainly returns expression logits (what evaluation and extraction use); called
with `train_outputs=True` it returns what the recipe's loss needs, so the step always goes
through the DDP wrapper.
"""

from abc import abstractmethod
from pathlib import Path

import numpy as np
import torch
from timm.models import is_model_in_modules
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from fercache.pretrain.recipe_base import Autocast, Metrics, OneNetwork, StepBatch
from fercache.pretrain.views import LabelledDataset

_MAE_BATCH = 256  # MAE's rule: lr = base lr * global batch / 256


class FineTune(OneNetwork):
    """A recipe of Li et al. or the LSD paper: its module, its loss, what it exports."""

    @abstractmethod
    def trained_parts(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """The timm networks (layer-decayed) and the extra heads (full learning rate)."""

    @abstractmethod
    def losses(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor | None,
        autocast: Autocast,
    ) -> dict[str, torch.Tensor]:
        """The loss to minimise under "loss", and its parts for the metrics."""

    @abstractmethod
    def export_part(self, model: nn.Module) -> nn.Module:
        """The part of `model` that `fercache extract` builds from the exported model config."""

    def exported(self) -> dict[str, nn.Module]:
        return {"student": self.export_part(self.final_student())}

    def timm_options(self) -> dict:
        """Keyword arguments of `timm.create_model`: stochastic depth, and the image size a ViT
        is built for when `image_size` is set (its position embeddings depend on it)."""
        options: dict = {"drop_path_rate": self.config.drop_path} if self.config.drop_path else {}
        if self.config.image_size and is_model_in_modules(
            self.config.backbone, ["vision_transformer"]
        ):
            options["img_size"] = self.config.image_size
        return options

    def export_keys(self) -> dict:
        options = self.timm_options()
        return {"model_kwargs": {"img_size": options["img_size"]}} if "img_size" in options else {}

    def make_optimizer(self, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
        """AdamW; each timm network's layers get lr * layer_decay ** (depth from the top)."""
        config = self.config
        lr = config.finetune_lr * config.batch_size * world_size / _MAE_BATCH
        networks, heads = self.trained_parts(model)
        groups = [
            {**group, "lr": lr * group.pop("lr_scale")}
            for network in networks
            for group in param_groups_layer_decay(
                network,
                config.finetune_weight_decay,
                no_weight_decay_list=_no_weight_decay(network),
                layer_decay=config.layer_decay,
            )
        ]
        groups += [
            {**group, "lr": lr}
            for head in heads
            for group in param_groups_weight_decay(head, config.finetune_weight_decay)
        ]
        # the first group carries the full rate: the run logs its lr as lr_student
        return torch.optim.AdamW(sorted(groups, key=lambda group: -group["lr"]), lr=lr)

    def dataset(
        self, paths: list[Path], labels: np.ndarray, targets: np.ndarray | None, view: T.Compose
    ) -> Dataset:
        if targets is None:
            return LabelledDataset(paths, labels, view)
        return TargetDataset(paths, labels, targets, view)

    def train_step(self, batch: StepBatch, step: int, autocast: Autocast) -> Metrics:
        """One AdamW step on the recipe's loss (gradient norm clipped to `grad_clip`)."""
        losses = self.losses(self.model, batch.images, batch.labels, batch.targets, autocast)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.config.grad_clip > 0:
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
        self.optimizer.step()
        return {key: value.detach() for key, value in losses.items()}


def _no_weight_decay(network: nn.Module) -> set[str]:
    """Parameters timm exempts from weight decay (position embeddings, class token...)."""
    return set(network.no_weight_decay()) if hasattr(network, "no_weight_decay") else set()


class TargetDataset(LabelledDataset):
    """(view, label, targets, unreadable paths) per item. A stand-in image's targets are NaN
    (they belong to another image); `per_pixel` divides (x, y) pairs by the image's width and
    height, so landmarks do not depend on the image's size."""

    def __init__(
        self,
        paths: list[Path],
        labels: np.ndarray,
        targets: np.ndarray,
        view: T.Compose,
        per_pixel: bool = False,
    ) -> None:
        super().__init__(paths, labels, view)
        self.targets = np.asarray(targets, np.float32)
        self.per_pixel = per_pixel

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, str]:
        image, failed = self._open(index)
        targets = np.full_like(self.targets[index], np.nan) if failed else self.targets[index]
        if self.per_pixel:
            targets = (targets.reshape(-1, 2) / np.array(image.size, np.float32)).ravel()
        return self.view(image), int(self.labels[index]), torch.from_numpy(targets.copy()), failed


def pooled_and_logits(
    network: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm network's pooled features (what extraction stores) and its head's logits."""
    pooled = network.forward_head(network.forward_features(images), pre_logits=True)
    return pooled, network.get_classifier()(pooled)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `valid`; 0 (still joined to the graph) where none is."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1)

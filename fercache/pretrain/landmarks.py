"""Multi-task expression + landmarks (the LSD paper §2): the backbone's expression head trained with
class-weighted cross-entropy beside an auxiliary head regressing the 68 facial landmarks (MSE).
Landmarks are regressed in fractions of the image's width and height. As in the LSD paper, the
training view only jitters colour (no crop, no flip), so the landmarks stay where they are.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from fercache.data.layout import LANDMARKS
from fercache.errors import FercacheError
from fercache.pretrain.config import PretrainConfig
from fercache.pretrain.finetune import (
    FineTune,
    TargetDataset,
    masked_mean,
    pooled_and_logits,
)
from fercache.pretrain.recipe_base import NUM_CLASSES, Autocast, ModelFactory
from fercache.pretrain.sources import LabelledImages, attach_landmarks, read_labelled
from fercache.pretrain.views import Views


class LandmarkNet(nn.Module):
    """A timm network (its head classifies expressions) and a landmark head on the same
    pooled features."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.pretrained_cfg = backbone.pretrained_cfg  # what timm's resolve_data_config reads
        self.landmark_head = nn.Linear(int(backbone.num_features), 2 * LANDMARKS)

    def forward(
        self, images: torch.Tensor, train_outputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """EXPR logits; with `train_outputs`, also the landmarks (x0, y0, ... y67)."""
        pooled, expr = pooled_and_logits(self.backbone, images)
        return (expr, self.landmark_head(pooled)) if train_outputs else expr


class MultitaskLandmarks(FineTune):
    description = "expression + landmark heads, the LSD paper; needs --set landmarks=CSV"
    balanced = False  # the class weights of the cross-entropy correct the imbalance instead

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__(config)
        self.class_weights = torch.ones(NUM_CLASSES)  # set from the training labels by dataset

    def check(self) -> None:
        super().check()
        if not self.config.landmarks:
            raise FercacheError(
                "pretrain settings: recipe multitask-landmarks needs landmarks=PATH "
                "(a CSV: path, x0, y0, ... y67)"
            )

    def read(self, sources: list[Path]) -> LabelledImages:
        return attach_landmarks(read_labelled(sources), Path(self.config.landmarks))

    def network(self, create: ModelFactory) -> nn.Module:
        return LandmarkNet(create(self.config.seed, **self.timm_options()))

    def trained_parts(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        return [model.backbone], [model.landmark_head]

    def training_view(self, views: Views) -> T.Compose:
        return T.Compose([T.ColorJitter(0.4, 0.4, 0.4), views.evaluation])

    def dataset(
        self, paths: list[Path], labels: np.ndarray, targets: np.ndarray | None, view: T.Compose
    ) -> Dataset:
        # the cross-entropy's class weights come from the training split: sklearn's
        # "balanced" n / (classes · count) for the classes present
        present = np.unique(labels)
        weights = np.ones(NUM_CLASSES, np.float32)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
        self.class_weights = torch.from_numpy(weights)
        return TargetDataset(paths, labels, targets, view, per_pixel=True)

    def losses(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor | None,
        autocast: Autocast,
    ) -> dict[str, torch.Tensor]:
        with autocast():
            expr, landmarks = (output.float() for output in model(images, train_outputs=True))
        weights = self.class_weights.to(expr.device)
        expr_ce = F.cross_entropy(expr, labels, weight=weights)
        squared = (landmarks - targets.nan_to_num(0.0)) ** 2
        landmark_mse = masked_mean(squared, ~targets.isnan())
        return {
            "loss": expr_ce + self.config.landmark_weight * landmark_mse,
            "expr_ce": expr_ce,
            "landmark_mse": landmark_mse,
        }

    def export_part(self, model: nn.Module) -> nn.Module:
        return model.backbone

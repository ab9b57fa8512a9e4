"""Multi-task expression + landmarks (the LSD paper §2): the backbone's expression head trained with
class-weighted cross-entropy beside an auxiliary head regressing the 68 facial landmarks (MSE).
Landmarks are regressed in fractions of the image's width and height. As in the LSD paper, the
training view only jitters colour (no crop, no flip), so the landmarks stay where they are.
The landmarks of the labelled images are read from a CSV (`attach_landmarks`).
"""

import csv
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
from fercache.pretrain.sources import LabelledImages, Problem, read_labelled
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


def attach_landmarks(images: LabelledImages, path: Path) -> LabelledImages:
    """`images` with their 68 landmarks from the CSV at `path` as targets (136 values in pixels
    of the image; NaN for an image without a row, which then trains the expression head only).
    Rows naming a missing image or holding a value that is not a number are reported."""
    path = Path(path)
    by_image, problems = _read_landmarks(path)
    targets = [by_image.get(image.resolve()) for image in images.paths]
    missing = [image for image, found in zip(images.paths, targets, strict=True) if found is None]
    if len(missing) == len(images.paths):
        raise FercacheError(
            f"{path}: no row names a labelled image (the first is {images.paths[0]}); "
            "paths in the CSV are relative to its folder"
        )
    if missing:
        problems.append(
            Problem(
                str(path),
                f"{len(missing)} labelled images have no landmarks here (the first is "
                f"{missing[0]}); they train the expression head only",
            )
        )
    no_landmarks = np.full(2 * LANDMARKS, np.nan, np.float32)
    return LabelledImages(
        images.paths,
        images.labels,
        images.problems + problems,
        [no_landmarks if found is None else found for found in targets],
        images.videos,
        images.sources,
    )


def _read_landmarks(path: Path) -> tuple[dict[Path, np.ndarray], list[Problem]]:
    """Landmarks by resolved image path, and the rows left out."""
    if not path.is_file():
        raise FercacheError(f"{path}: no such landmarks CSV; set landmarks=PATH")
    columns = 1 + 2 * LANDMARKS
    found: dict[Path, np.ndarray] = {}
    problems: list[Problem] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        if len(header) != columns or header[0] != "path":
            raise FercacheError(
                f"{path}: needs a header of {columns} columns, path then x0, y0, ... x67, y67 "
                f"(68 points in iBUG order); it has {len(header)} starting with {header[:1]}"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            image = path.parent / row[0].strip()
            try:
                values = np.array(row[1:], dtype=np.float32)
            except ValueError:
                problems.append(Problem(where, "a coordinate is not a number"))
                continue
            if len(row) != columns:
                problems.append(Problem(where, f"{len(row)} values where the header has {columns}"))
            elif not image.is_file():
                problems.append(Problem(where, f"image {image} does not exist"))
            else:
                found[image.resolve()] = values
    return found, problems

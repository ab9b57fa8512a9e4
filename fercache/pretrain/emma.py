"""EMMA (Li et al. §3.2): one backbone with an EXPR head (8 classes, cross-entropy) and an AU
head (12 units, binary cross-entropy); a VA head on the concatenated EXPR and AU scores (and,
optionally, a second frozen model's EXPR scores) trained with 1 - CCC per dimension. The VA
head's input is detached: VA trains its head only, never the backbone (the paper's remedy for
VA overfitting). Invalid labels (EXPR -1, AU -1, VA -5) count for nothing.

Its labelled sources are Aff-Wild2 roots: their train frames with EXPR, AU and VA labels
(`read_multitask`).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fercache.backbone.network import Backbone, DataConfig, load_backbone, preprocess
from fercache.data.affwild2 import IMAGES_DIRNAME, AffWild2, VideoLabels, frame_filename
from fercache.data.numbering import NUMBERINGS
from fercache.data.tasks import AU, AU_NAMES, EXPR, VA, VA_NAMES, Task
from fercache.errors import FercacheError
from fercache.pretrain.finetune import (
    FineTune,
    masked_mean,
    pooled_and_logits,
)
from fercache.pretrain.recipe_base import NUM_CLASSES, Autocast, ModelFactory
from fercache.pretrain.sources import LabelledImages, SourceLabels, summarised
from fercache.pretrain.views import data_config_of

AU_COUNT, VA_COUNT = len(AU_NAMES), len(VA_NAMES)
VA_HIDDEN = 64  # Li et al.: "a two-layer fully connected layer", width not stated: ours


def concordance(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Lin's concordance correlation coefficient (population moments), differentiable."""
    mean_p, mean_t = predicted.mean(), truth.mean()
    covariance = ((predicted - mean_p) * (truth - mean_t)).mean()
    spread = predicted.var(unbiased=False) + truth.var(unbiased=False) + (mean_p - mean_t) ** 2
    return 2 * covariance / spread.clamp(min=1e-8)


def ccc_loss(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Σ over valence and arousal of 1 - CCC on the frames whose value is valid (not NaN). A
    dimension with fewer than two valid frames adds nothing. (Li et al. eq. 4 writes
    1 - (CCC_A + CCC_V): the same gradient.)"""
    total = predicted.sum() * 0  # joined to the graph even when nothing is valid
    for dimension in range(predicted.shape[1]):
        valid = ~truth[:, dimension].isnan()
        if int(valid.sum()) >= 2:
            total = total + 1 - concordance(predicted[valid, dimension], truth[valid, dimension])
    return total


class EmmaNet(nn.Module):
    """The backbone (a timm network whose head is the EXPR head), the AU and VA heads, and the
    optional frozen reference whose EXPR logits join the VA head's input."""

    def __init__(
        self, backbone: nn.Module, data_config: DataConfig, reference: Backbone | None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pretrained_cfg = backbone.pretrained_cfg  # what timm's resolve_data_config reads
        self.au_head = nn.Linear(int(backbone.num_features), AU_COUNT)
        scores = NUM_CLASSES + AU_COUNT + (reference.num_classes if reference else 0)
        self.va_head = nn.Sequential(
            nn.Linear(scores, VA_HIDDEN), nn.ReLU(), nn.Linear(VA_HIDDEN, VA_COUNT), nn.Tanh()
        )
        self.reference = reference.model if reference else None
        self.reference_config = reference.data_config if reference else None
        # to undo our normalisation before the reference applies its own
        self.register_buffer("mean", torch.tensor(data_config.mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(data_config.std).view(1, 3, 1, 1), False)

    def train(self, mode: bool = True) -> "EmmaNet":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen: no dropout, no batch-norm statistics updates
        return self

    def forward(
        self, images: torch.Tensor, train_outputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EXPR logits; with `train_outputs`, also AU logits and VA predictions."""
        pooled, expr = pooled_and_logits(self.backbone, images)
        if not train_outputs:
            return expr
        au = self.au_head(pooled)
        scores = [expr, au]
        if self.reference is not None:
            scores.append(self._reference_scores(images))
        # stop-gradient: the VA loss reaches the VA head only
        return expr, au, self.va_head(torch.cat(scores, dim=1).detach())

    @torch.no_grad()
    def _reference_scores(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images * self.std + self.mean).clamp(0, 1) * 255
        return self.reference(preprocess(pixels, self.reference_config)).float()


class Emma(FineTune):
    description = "EXPR + AU heads, VA head on their scores; --labelled must be Aff-Wild2 roots"
    balanced = False  # frames without an EXPR label (AU or VA only) must be drawn too

    def read(self, sources: list[Path]) -> LabelledImages:
        return read_multitask(sources)

    def network(self, create: ModelFactory) -> nn.Module:
        backbone = create(self.config.seed, **self.timm_options())
        reference = _load_reference(self.config.emma_reference)
        return EmmaNet(backbone, data_config_of(backbone, self.config.image_size), reference)

    def trained_parts(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        return [model.backbone], [model.au_head, model.va_head]

    def losses(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor | None,
        autocast: Autocast,
    ) -> dict[str, torch.Tensor]:
        with autocast():
            expr, au, va = (output.float() for output in model(images, train_outputs=True))
        au_truth, va_truth = targets[:, :AU_COUNT], targets[:, AU_COUNT:]
        per_frame_ce = F.cross_entropy(expr, labels.clamp(min=0), reduction="none")
        expr_ce = masked_mean(per_frame_ce, labels >= 0)
        per_unit_bce = F.binary_cross_entropy_with_logits(
            au, au_truth.nan_to_num(0.0), reduction="none"
        )
        au_bce = masked_mean(per_unit_bce, ~au_truth.isnan())
        va_loss = ccc_loss(va, va_truth)
        return {
            "loss": expr_ce + au_bce + va_loss,
            "expr_ce": expr_ce,
            "au_bce": au_bce,
            "va_ccc_loss": va_loss,
        }

    def export_part(self, model: nn.Module) -> nn.Module:
        return model.backbone


def _load_reference(checkpoint: str) -> Backbone | None:
    if not checkpoint:
        return None
    # headless weights load here so that the refusal below names what emma needs
    reference = load_backbone(None, Path(checkpoint), allow_missing_head=True)
    if reference.num_classes == 0:
        raise FercacheError(
            f"{checkpoint}: emma_reference must predict expressions, but this model has no "
            "classifier head; give a student exported by fercache pretrain"
        )
    return reference


def read_multitask(sources: list[Path]) -> LabelledImages:
    """Train frames of Aff-Wild2 roots with EXPR, AU and VA labels (EMMA): label = EXPR class or
    -1; targets = 12 AU values then valence, arousal, NaN where a task has no valid value."""
    if not sources:
        raise FercacheError("no labelled source: pass --labelled at least once")
    combined = LabelledImages()
    for source in map(Path, sources):
        if not (source.is_dir() and (source / IMAGES_DIRNAME).is_dir()):
            raise FercacheError(
                f"{source}: recipe emma reads EXPR, AU and VA labels from an Aff-Wild2 root "
                f"(a folder holding {IMAGES_DIRNAME}/ and the annotation sets); give one"
            )
        images = _read_affwild2_multitask(source)
        if not images.paths:
            raise FercacheError(f"{source}: no train frame with an image and a valid label")
        images.sources = [SourceLabels(str(source), "abaw", NUMBERINGS["abaw"].mapping(), {})]
        combined.extend(summarised(images))
    return combined


def _read_affwild2_multitask(root: Path) -> LabelledImages:
    data = AffWild2(root)
    missing = [
        task.name.upper() for task in (EXPR, AU, VA) if "train" not in data.splits(task.name)
    ]
    if missing:
        raise FercacheError(
            f"{root}: recipe emma needs train annotations of EXPR, AU and VA, but there are none "
            f"for {', '.join(missing)} (expected folders like AU_Detection_Challenge/Train_Set/)"
        )
    per_task = {
        task.name: {video.video: video for video in data.load(task.name, "train")}
        for task in (EXPR, AU, VA)
    }
    images = LabelledImages()
    for name in sorted(set().union(*per_task.values())):
        frames, _ = data.image_frames(name)
        expr = _task_values(per_task["expr"].get(name), frames, EXPR)
        targets = np.concatenate(
            [
                _task_values(per_task["au"].get(name), frames, AU),
                _task_values(per_task["va"].get(name), frames, VA),
            ],
            axis=1,
        )
        useful = (expr[:, 0] >= 0) | ~np.isnan(targets).all(axis=1)
        folder = data.images / name
        images.paths += [folder / frame_filename(int(frame)) for frame in frames[useful]]
        images.labels += [int(label) for label in np.nan_to_num(expr[useful, 0], nan=-1)]
        images.targets += list(targets[useful])
        images.videos += [str(folder)] * int(useful.sum())
    return images


def _task_values(video: VideoLabels | None, frames: np.ndarray, task: Task) -> np.ndarray:
    """(frames, task width) labels of one task at `frames` as floats; NaN where invalid or not
    annotated (no file of this task for the video, or the file ends before the frame)."""
    aligned = np.full((len(frames), task.width), np.nan, np.float32)
    if video is None:
        return aligned
    values = video.labels.reshape(len(video.labels), task.width).astype(np.float32)
    annotated = frames <= len(values)
    aligned[annotated] = values[frames[annotated] - 1]
    aligned[aligned == task.invalid] = np.nan
    return aligned

"""Image views (weak, strong, evaluation) and the datasets that serve them.

Sizes and normalisation come from timm's data config of the backbone (overridable image size);
resizing is bilinear, as `fercache extract` resizes frames, and the evaluation view is exactly
what extraction feeds the network: the whole image resized to the input size. An image that
cannot be decoded is replaced by the next one of the same class (or the next one, unlabelled)
and its path is returned with the batch, so the run reports it instead of stopping.
"""

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import rand_augment_transform, resolve_data_config
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset
from torchvision import transforms as T

from fercache.backbone.network import DataConfig
from fercache.errors import FercacheError
from fercache.readers import UNREADABLE_IMAGE

INTERPOLATION = "bilinear"
_MAX_SUBSTITUTES = 16  # unreadable images skipped in a row before giving up on one item
_LEVEL_MAX = 10.0  # timm's default upper bound of a RandAugment magnitude


def data_config_of(model: torch.nn.Module, image_size: int | None) -> DataConfig:
    timm_config = resolve_data_config({}, model=model)
    size = image_size or int(timm_config["input_size"][-1])
    return DataConfig(
        input_size=(3, size, size),
        mean=tuple(float(v) for v in timm_config["mean"]),
        std=tuple(float(v) for v in timm_config["std"]),
        interpolation=INTERPOLATION,
    )


@dataclass(frozen=True)
class Views:
    weak: T.Compose
    strong: T.Compose
    evaluation: T.Compose


def build_views(
    config: DataConfig,
    resize_ratio: float,
    randaugment: str,
    erasing_prob: float,
    *,
    grayscale_prob: float = 0.0,
) -> Views:
    """Weak: resize, random crop, flip, colour jitter, grey with `grayscale_prob`. Strong:
    resize, random crop, flip, timm RandAugment, random erasing. Evaluation: resize to the
    input size, as extraction does."""
    size = config.input_size[-1]
    bilinear = T.InterpolationMode.BILINEAR
    resized = T.Resize(round(size * resize_ratio), interpolation=bilinear)
    to_tensor = [T.ToTensor(), T.Normalize(config.mean, config.std)]
    geometry = [resized, T.RandomCrop(size), T.RandomHorizontalFlip()]
    strong = [
        *geometry,
        strong_augment(randaugment, size, config.mean),
        *to_tensor,
        RandomErasing(probability=erasing_prob, mode="pixel", device="cpu"),
    ]
    # grey only when asked: RandomGrayscale draws from torch's generator even at p = 0
    grey = [T.RandomGrayscale(grayscale_prob)] if grayscale_prob > 0 else []
    return Views(
        weak=T.Compose([*geometry, T.ColorJitter(0.4, 0.4, 0.4), *grey, *to_tensor]),
        strong=T.Compose(strong),
        evaluation=T.Compose([T.Resize((size, size), interpolation=bilinear), *to_tensor]),
    )


def strong_augment(spec: str, size: int, mean: tuple[float, float, float]) -> RandAugment:
    """timm's RandAugment from its config string, e.g. `rand-m9-mstd0.5-inc1-mmax9`."""
    hparams = {
        "translate_const": int(size * 0.45),
        "img_mean": tuple(round(255 * v) for v in mean),
        "interpolation": Image.BILINEAR,
    }
    try:
        augment = rand_augment_transform(spec, hparams)
    except (AssertionError, ValueError, KeyError) as error:
        raise FercacheError(
            f"randaugment '{spec}' is not a timm RandAugment string like "
            f"'rand-m9-mstd0.5-inc1-mmax9' ({error or 'unknown section'})"
        ) from None
    _check_posterize(augment, spec)
    return augment


def _check_posterize(augment: RandAugment, spec: str) -> None:
    """Reject settings whose Posterize can keep 0 bits: Pillow >= 11 raises on those, which
    would stop a run at a random step. (timm's own default `rand-m9-mstd0.5-inc1` can.)"""
    for op in augment.ops:
        if not op.name.startswith("Posterize"):
            continue
        upper = op.magnitude_max or _LEVEL_MAX
        if op.magnitude_std == float("inf"):
            magnitudes = [0.0, min(op.magnitude, upper)]
        elif op.magnitude_std > 0:
            magnitudes = [0.0, upper]
        else:
            magnitudes = [max(0.0, min(op.magnitude, upper))]
        bits = [op.level_fn(magnitude, op.hparams)[0] for magnitude in magnitudes]
        if min(bits) < 1:
            raise FercacheError(
                f"randaugment '{spec}': its {op.name} can keep {min(bits)} bits, which Pillow "
                "rejects; with -inc1 add -mmax9 (e.g. rand-m9-mstd0.5-inc1-mmax9)"
            )


class _RobustImages(Dataset):
    """Opens images by index; an unreadable one is swapped for a stand-in (see `_stand_ins`)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def _stand_ins(self, index: int) -> np.ndarray:
        return (index + np.arange(1, _MAX_SUBSTITUTES + 1)) % len(self.paths)

    def _open(self, index: int) -> tuple[Image.Image, str]:
        """The image (or a stand-in) and the unreadable paths met on the way, '|'-joined."""
        failed: list[str] = []
        for candidate in [index, *self._stand_ins(index)]:
            path = self.paths[int(candidate)]
            try:
                with Image.open(path) as image:
                    return image.convert("RGB"), "|".join(failed)
            except UNREADABLE_IMAGE:
                failed.append(str(path))
        raise FercacheError(
            f"{len(failed)} unreadable images in a row, starting at {failed[0]}: "
            "is the source folder damaged?"
        )


class LabelledDataset(_RobustImages):
    """(view, label, unreadable paths) per item; stand-ins share the item's class."""

    def __init__(self, paths: list[Path], labels: np.ndarray, view: T.Compose):
        super().__init__(paths)
        self.labels = np.asarray(labels)
        self.view = view

    def _stand_ins(self, index: int) -> np.ndarray:
        same = np.flatnonzero(self.labels == self.labels[index])
        start = int(np.searchsorted(same, index))
        return same[(start + np.arange(1, _MAX_SUBSTITUTES + 1)) % len(same)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        image, failed = self._open(index)
        return self.view(image), int(self.labels[index]), failed


class UnlabelledDataset(_RobustImages):
    """(weak view, strong view, unreadable paths) per item: two views of one image."""

    def __init__(self, paths: list[Path], views: Views):
        super().__init__(paths)
        self.views = views

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image, failed = self._open(index)
        return self.views.weak(image), self.views.strong(image), failed


class SeededViews(Dataset):
    """`dataset`'s items by (index, seed) (`sampling.SeededBatches`): the generators the views
    draw from are seeded with the item's seed first (torchvision's transforms draw from torch,
    timm's RandAugment from Python's `random` and NumPy's global generator), so the views are
    the same whatever process makes them and whatever it made before."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, int]) -> tuple:
        index, seed = item
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]

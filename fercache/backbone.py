"""Build a frozen timm backbone from a name and an optional checkpoint file.

Accepted checkpoints: fercache's own phase-1 files (`student.safetensors` with its model config
in the safetensors metadata key `fercache_model` or in a sidecar `student.json`), a plain
PyTorch state dict (`.pt`/`.pth`/`.bin`, read with `weights_only=True`, optionally wrapped in
`{"state_dict": ...}` or `{"model": ...}`, `module.` prefixes from DDP stripped) and plain
safetensors. The classifier's width, when the checkpoint has one, sets `num_classes`; the
weights must match the architecture exactly, or nothing is built.

A model config may add `model_kwargs` (passed to `timm.create_model`, e.g. the `img_size` a ViT
was trained at) and `views: 2`: two networks of the backbone's architecture (state keys
`views.0.*`, `views.1.*`) extracted as one `ViewPair`, features concatenated, logits summed.

`preprocess` turns uint8 frames into the backbone's input on the device (resize, normalise).
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from timm.data import resolve_data_config
from torch import nn

from fercache.errors import FercacheError

DEFAULT_BACKBONE = "resnet50"
MODEL_METADATA_KEY = "fercache_model"
WRAPPER_KEYS = ("state_dict", "model", "student")


@dataclass(frozen=True)
class DataConfig:
    """How frames must be prepared for the backbone: size (C, H, W), normalisation, resize."""

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


INTERPOLATIONS = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def resize_mode(name: str) -> str:
    """The torch resize mode for a data config's interpolation name."""
    # timm configs may name PIL filters torch cannot resize with on the device (e.g. lanczos);
    # bicubic is the closest, and the store records what was really used.
    return INTERPOLATIONS.get(name, "bicubic")


def preprocess(images: torch.Tensor | list[torch.Tensor], config: DataConfig) -> torch.Tensor:
    """uint8 frames (B, 3, h, w) on the device -> normalised float (B, 3, H, W), channels_last."""
    if isinstance(images, list):
        return torch.cat([preprocess(image[None], config) for image in images])
    size = tuple(config.input_size[1:])
    batch = images.float().div_(255)
    if tuple(batch.shape[-2:]) != size:
        mode = resize_mode(config.interpolation)
        batch = F.interpolate(
            batch,
            size=size,
            mode=mode,
            antialias=mode != "nearest",
            **({} if mode == "nearest" else {"align_corners": False}),
        )
    mean = torch.tensor(config.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=batch.device).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)


class ViewPair(nn.Module):
    """Two networks of one architecture used as one backbone: their pooled features are
    concatenated and their logits summed (the inference rule of masked CoTEX, Li et al.)."""

    def __init__(self, views: list[nn.Module]) -> None:
        super().__init__()
        self.views = nn.ModuleList(views)
        self.num_features = sum(int(view.num_features) for view in views)
        self.pretrained_cfg = views[0].pretrained_cfg  # what timm's resolve_data_config reads

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The views' pooled features side by side, (B, sum of their widths)."""
        return torch.cat(
            [
                view.forward_head(view.forward_features(images), pre_logits=True)
                for view in self.views
            ],
            dim=1,
        )

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.summed_logits(features)

    def get_classifier(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.summed_logits

    def summed_logits(self, features: torch.Tensor) -> torch.Tensor:
        widths = [int(view.num_features) for view in self.views]
        chunks = features.split(widths, dim=1)
        return sum(
            view.get_classifier()(chunk) for view, chunk in zip(self.views, chunks, strict=True)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.summed_logits(self.forward_features(images))


@dataclass
class Backbone:
    """A built backbone in eval mode, with what identifies it."""

    model: torch.nn.Module
    name: str
    num_classes: int
    feature_dim: int
    data_config: DataConfig
    checkpoint: str
    checkpoint_sha256: str


def load_backbone(
    name: str | None,
    checkpoint: Path | None,
    init_seed: int = 0,
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Backbone:
    """The backbone `name` (default: the checkpoint's own, else resnet50) with its weights.

    Without a checkpoint the weights are a seeded random init, so results are reproducible.
    Data config precedence: explicit arguments, then the checkpoint's model config, then timm's.
    """
    state, saved_config, digest = _read_checkpoint(checkpoint) if checkpoint else ({}, {}, "")
    name = _choose_name(name, saved_config, checkpoint)
    views = int(saved_config.get("views", 1))
    num_classes = _classifier_width(name, state, "views.0." if views > 1 else "")
    torch.manual_seed(init_seed)
    model = _create(name, num_classes, saved_config.get("model_kwargs") or {}, views)
    if checkpoint:
        _load_weights(model, state, checkpoint, name)
    model.eval().requires_grad_(False)
    timm_config = resolve_data_config(model=model)
    data_config = DataConfig(
        input_size=_input_size(input_size, saved_config, timm_config),
        mean=tuple(float(v) for v in mean or saved_config.get("mean") or timm_config["mean"]),
        std=tuple(float(v) for v in std or saved_config.get("std") or timm_config["std"]),
        interpolation=str(saved_config.get("interpolation") or timm_config["interpolation"]),
    )
    return Backbone(
        model=model,
        name=name,
        num_classes=num_classes,
        feature_dim=int(model.num_features),
        data_config=data_config,
        checkpoint=checkpoint.name if checkpoint else "",
        checkpoint_sha256=digest,
    )


def _input_size(
    override: int | None, saved_config: dict, timm_config: dict
) -> tuple[int, int, int]:
    if override:
        return (3, override, override)
    return tuple(int(v) for v in saved_config.get("input_size") or timm_config["input_size"])


def _choose_name(name: str | None, saved_config: dict, checkpoint: Path | None) -> str:
    saved = saved_config.get("backbone")
    if name and saved and name != saved:
        raise FercacheError(
            f"{checkpoint}: this checkpoint is a '{saved}' but --backbone says '{name}'; "
            "drop --backbone or give the matching name"
        )
    return name or saved or DEFAULT_BACKBONE


def _create(name: str, num_classes: int, model_kwargs: dict, views: int = 1) -> nn.Module:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise FercacheError(f"unknown backbone '{name}': not a timm model name.{hint}")
    networks = [
        timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
        for _ in range(views)
    ]
    return ViewPair(networks) if views > 1 else networks[0]


def _classifier_width(name: str, state: dict[str, torch.Tensor], prefix: str = "") -> int:
    """Classes of the checkpoint's head (0 without one), found via timm's classifier name."""
    if not state or not timm.is_model(name):
        return 0
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or "head"
    if isinstance(classifier, list | tuple):
        classifier = classifier[0]
    weight = state.get(f"{prefix}{classifier}.weight")
    return int(weight.shape[0]) if weight is not None else 0


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """State dict, saved model config ({} if none) and SHA-256 of the file."""
    path = Path(path)
    if not path.is_file():
        raise FercacheError(f"{path}: no such checkpoint file")
    digest = _sha256(path)
    if path.suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
        saved_config = json.loads(metadata.get(MODEL_METADATA_KEY, "{}"))
    else:
        state = _read_torch(path)
        saved_config = {}
    sidecar = path.with_suffix(".json")
    if not saved_config and sidecar.is_file():
        saved_config = json.loads(sidecar.read_text())
    return _strip_prefix(state, "module."), saved_config, digest


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            # safe_open handles are not dicts, so `.keys()` is needed here.
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            return tensors, handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise FercacheError(f"{path}: not a readable safetensors file ({error})") from error


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or damaged files
        raise FercacheError(
            f"{path}: not a loadable PyTorch checkpoint ({type(error).__name__}: {error}). "
            "Expected a state dict saved with torch.save, or a .safetensors file."
        ) from error
    for key in WRAPPER_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise FercacheError(f"{path}: holds no state dict (a dict of parameter tensors)")
    return loaded


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(key.startswith(prefix) for key in state):
        return {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def _load_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing or unexpected or wrong_shape:
        raise FercacheError(
            f"{path}: does not match backbone '{name}': "
            + "; ".join(
                f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for label, keys in (
                    ("missing keys", missing),
                    ("unexpected keys", unexpected),
                    ("wrong shapes", wrong_shape),
                )
                if keys
            )
            + ". Pass the --backbone it was trained with."
        )
    model.load_state_dict(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

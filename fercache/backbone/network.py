"""Build a frozen timm backbone from a name and an optional checkpoint file.

Accepted checkpoints: fercache's own phase-1 files (`student.safetensors` with its model config
in the safetensors metadata key `fercache_model` or in a sidecar `student.json`; an export whose
config says role "teacher" is refused), a plain
PyTorch state dict (`.pt`/`.pth`/`.bin`, read with `weights_only=True`, nested wrappers and
`module.`/`encoder.`/`backbone.`/`visual.` prefixes handled: `fercache.backbone.weights`) and plain
safetensors. The classifier's width, when the checkpoint has one, sets `num_classes`; the
weights must match the architecture exactly, or nothing is built. Weights without the head
(MAE, DINO) load only with `allow_missing_head`, as a network without classifier.
`pretrained` instead builds timm's pretrained weights by name (`fercache.backbone.weights`).

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

from fercache.backbone.weights import (
    expected_keys,
    mismatch_report,
    pretrained_model,
    read_torch_state,
    select_weights,
)
from fercache.errors import FercacheError
from fercache.readers import read_json_object

DEFAULT_BACKBONE = "resnet50"
MODEL_METADATA_KEY = "fercache_model"
# The model config's key naming the network a `fercache pretrain` export holds: "student" (the
# frozen network of phase 2) or "teacher" (what taught it; refused here). Older exports and
# other weights have none.
ROLE_KEY = "role"
# What weights that do not fit the backbone ask of `extract`'s user (a caller without these
# options gives its own `advice`)
BACKBONE_ADVICE = "Pass the --backbone it was trained with."


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
    pretrained: str = ""  # timm's pretrained name, when the weights are timm's
    weights_source: str = ""  # where timm took them from: hf-hub:<id>, a URL, or file


def load_backbone(
    name: str | None,
    checkpoint: Path | None,
    init_seed: int = 0,
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    *,
    pretrained: str | None = None,
    allow_missing_head: bool = False,
    advice: str | None = None,
) -> Backbone:
    """The backbone `name` (default: the checkpoint's own, else resnet50) with its weights.

    Without a checkpoint the weights are a seeded random init, so results are reproducible.
    With `pretrained` they are timm's pretrained weights of that name (tag or hf-hub: included),
    read from `checkpoint` when given (timm's file override), else from timm's cache.
    Data config precedence: explicit arguments, then the checkpoint's model config, then timm's.
    `advice` ends the error when the weights do not fit (default: `extract`'s options).
    """
    if pretrained:
        return _pretrained_backbone(pretrained, name, checkpoint, init_seed, input_size, mean, std)
    state, saved_config, digest = _read_checkpoint(checkpoint) if checkpoint else ({}, {}, "")
    if saved_config.get(ROLE_KEY) == "teacher":
        raise FercacheError(
            f"{checkpoint}: the teacher that `fercache pretrain` exported (its model config "
            "says role 'teacher'); the frozen network is the student: pass the student's export, "
            "student.safetensors of the same run"
        )
    name = _choose_name(name, saved_config, checkpoint)
    views = int(saved_config.get("views", 1))
    model_kwargs = saved_config.get("model_kwargs") or {}
    if checkpoint and views == 1:
        _check_name(name)
        state, _ = select_weights(state, set(expected_keys(name, 0, model_kwargs)))
    num_classes = _classifier_width(name, state, "views.0." if views > 1 else "")
    # strict: weights without the head load only when asked to, or when made without one
    headless_by_design = saved_config.get("num_classes", -1) == 0
    allowed = allow_missing_head or headless_by_design
    if checkpoint and views == 1 and num_classes == 0 and not allowed:
        _refuse_missing_head(name, model_kwargs, state, checkpoint, advice)
    torch.manual_seed(init_seed)
    model = _create(name, num_classes, model_kwargs, views)
    if checkpoint:
        _load_weights(model, state, checkpoint, name, advice or BACKBONE_ADVICE)
    return _finish(
        model, name, num_classes, checkpoint, digest, saved_config, input_size, mean, std
    )


def _pretrained_backbone(
    pretrained: str,
    name: str | None,
    checkpoint: Path | None,
    init_seed: int,
    input_size: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> Backbone:
    torch.manual_seed(init_seed)
    model, architecture, source = pretrained_model(pretrained, checkpoint)
    if name and name != architecture:
        raise FercacheError(
            f"--pretrained '{pretrained}' is a '{architecture}' but --backbone says '{name}'; "
            "drop --backbone or give the matching name"
        )
    digest = _sha256(Path(checkpoint)) if checkpoint else ""
    backbone = _finish(
        model,
        architecture,
        int(getattr(model, "num_classes", 0) or 0),
        checkpoint,
        digest,
        {},
        input_size,
        mean,
        std,
    )
    backbone.pretrained, backbone.weights_source = pretrained, source
    return backbone


def _refuse_missing_head(
    name: str,
    model_kwargs: dict,
    state: dict[str, torch.Tensor],
    path: Path,
    advice: str | None,
) -> None:
    """Strict by default: weights without the classifier need --allow-missing-head."""
    full = expected_keys(name, None, model_kwargs)
    head = set(full) - set(expected_keys(name, 0, model_kwargs))
    report = mismatch_report(full, state)
    if head and report:
        headless = head <= set(full) - set(state) and not set(state) - set(full)
        own = (
            "These weights have no classifier head (MAE/DINO-style): pass "
            "--allow-missing-head to extract their pooled features (no logits)."
            if headless
            else BACKBONE_ADVICE
        )
        raise FercacheError(f"{path}: does not match backbone '{name}': {report}. {advice or own}")


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise FercacheError(f"unknown backbone '{name}': not a timm model name.{hint}")


def _finish(
    model: nn.Module,
    name: str,
    num_classes: int,
    checkpoint: Path | None,
    digest: str,
    saved_config: dict,
    input_size: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> Backbone:
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
    _check_name(name)
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
        saved_config = read_json_object(
            sidecar, "model config", f"delete it, or export {path.name} again with its config"
        )
    return state, saved_config, digest


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            # safe_open handles are not dicts, so `.keys()` is needed here.
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            return tensors, handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise FercacheError(
            f"{path}: not a readable safetensors file ({error}); it is damaged: give another "
            "checkpoint, or export it again (`fercache pretrain` writes student.safetensors)"
        ) from error


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    return read_torch_state(path)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (.safetensors, or a torch.save state dict, nested or
    not); FercacheError naming the file when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise FercacheError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    return _read_torch(path)


def _load_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str, advice: str
) -> None:
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    report = mismatch_report(expected, state)
    if report:
        raise FercacheError(f"{path}: does not match backbone '{name}': {report}. {advice}")
    model.load_state_dict(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

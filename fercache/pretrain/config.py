"""Settings of a pretraining run: defaults, `configs/pretrain.yaml`, `--set key=value` overrides."""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fercache.backbone.weights import pretrained_architecture
from fercache.errors import FercacheError
from fercache.resume import CONFIG_FILE, config_text, read_config, resumed_settings
from fercache.settings import given_values, typed_values

COTEX_EXPORTS = ("both", "first")
OPTIMIZERS = ("sgd", "adamw")
CONFIG_HEADER = "resolved settings of this run (fercache pretrain); --resume reads them back"


@dataclass(frozen=True)
class PretrainConfig:
    """Every knob of phase 1; `configs/pretrain.yaml` documents each one.

    Defaults follow Yu et al. §4.2 (ResNet-50, lr 1e-2 / 1e-3 with cosine decay, batch 32,
    100 k steps, 256 px resized and cropped to 224) where it states them, and Meta Pseudo
    Labels / UDA practice where it does not. The `finetune_*` block and what follows it set
    the recipes of Li et al. and the LSD paper (cotex, emma, multitask-landmarks), from Li et
    al. Table 3 where it states them.
    """

    # how long and how often: a resumed run may change them (steps rescales the cosine)
    MAY_CHANGE_ON_RESUME: ClassVar[frozenset[str]] = frozenset(
        {"steps", "eval_every", "log_every", "checkpoint_every", "workers"}
    )

    recipe: str = "mpl"
    backbone: str = "resnet50"
    image_size: int | None = None  # None: the backbone's own timm input size
    resize_ratio: float = 256 / 224  # resize to image_size * ratio, then crop image_size
    steps: int = 100_000
    batch_size: int = 32
    mu: int = 2
    teacher_lr: float = 1e-2
    student_lr: float = 1e-3
    optimizer: str = "sgd"  # sgd (Yu et al., MPL) | adamw (the short CPU budgets of the demo)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    label_smoothing: float = 0.0  # of every cross-entropy against given labels
    temperature: float = 0.7
    threshold: float = 0.95
    distribution_alignment: bool = False  # mpl: ReMixMatch's alignment of the pseudo labels
    lambda_u: float = 1.0
    uda_steps: int = 5000
    feedback_sign: int = 1
    student_wait_steps: int = 0  # the student's lr stays 0 while the teacher warms up
    student_finetune_steps: int = 0  # mpl: the last N steps train the student alone on labels
    student_finetune_lr: float = 1e-3  # their peak lr (cosine from it to 0 over those steps)
    ema_decay: float = 0.0
    other_from_videos_only: bool = True  # with video frames among the labelled sources
    per_class_cap: int = 0  # still images per class kept labelled, the rest unlabelled; 0: all
    randaugment: str = "rand-m9-mstd0.5-inc1-mmax9"
    erasing_prob: float = 0.25
    grayscale_prob: float = 0.0  # weak view: share of images turned grey (kept as 3 channels)
    holdout_fraction: float = 0.1
    eval_every: int = 1000
    log_every: int = 50
    checkpoint_every: int = 1000
    workers: int = 4
    amp: bool = True
    seed: int = 0
    # the recipes of Li et al. and the LSD paper: AdamW with layer-wise lr decay, warm-up
    # (warmup_steps) + cosine
    finetune_lr: float = 5e-4  # base lr, scaled by the global batch / 256 (MAE practice)
    finetune_weight_decay: float = 0.05
    layer_decay: float = 0.65
    grad_clip: float = 0.05  # max gradient norm; 0 turns clipping off
    drop_path: float = 0.1
    mask_ratio: float = 0.75  # cotex: share of patch tokens each view drops
    js_weight: float = 1.0  # cotex: lambda of the Jensen-Shannon term
    cotex_export: str = (
        "both"  # cotex: the student is both views (features concatenated) or the first
    )
    emma_reference: str = ""  # emma: a frozen checkpoint whose EXPR logits also feed the VA head
    landmarks: str = ""  # multitask-landmarks: CSV of path + 136 columns (x0, y0, ... x67, y67)
    landmark_weight: float = 1.0  # multitask-landmarks: weight of the landmark MSE

    def validate(self) -> None:
        """Checks that hold whatever the recipe; each recipe checks its own (Recipe.check)."""
        non_finite = [
            key
            for key, value in self.to_json().items()
            if isinstance(value, float) and not math.isfinite(value)
        ]
        checks = [
            (not non_finite, f"{', '.join(non_finite)} must be finite"),
            (self.steps >= 1, "steps must be at least 1"),
            (self.batch_size >= 1 and self.mu >= 1, "batch_size and mu must be at least 1"),
            (self.feedback_sign in (1, -1), "feedback_sign must be 1 or -1"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)"),
            (
                0 <= self.student_wait_steps < self.steps,
                "student_wait_steps must lie in [0, steps)",
            ),
            (
                0 <= self.student_finetune_steps < self.steps - self.student_wait_steps,
                "student_finetune_steps must lie in [0, steps - student_wait_steps): "
                "at least one Meta Pseudo Labels step must remain",
            ),
            (
                min(self.student_lr, self.teacher_lr, self.student_finetune_lr) > 0,
                "student_lr, teacher_lr and student_finetune_lr must be positive",
            ),
            (0 <= self.threshold <= 1, "threshold must lie in [0, 1]"),
            (self.temperature > 0, "temperature must be positive"),
            (0 <= self.grayscale_prob <= 1, "grayscale_prob must lie in [0, 1]"),
            (0 <= self.ema_decay < 1, "ema_decay must lie in [0, 1) (0 turns EMA off)"),
            (0 < self.holdout_fraction < 1, "holdout_fraction must lie in (0, 1)"),
            (self.per_class_cap >= 0, "per_class_cap must be >= 0 (0 keeps every image)"),
            (self.image_size is None or self.image_size >= 16, "image_size must be >= 16"),
            (
                min(self.eval_every, self.log_every, self.checkpoint_every) >= 1,
                "eval_every, log_every and checkpoint_every must be at least 1",
            ),
            *self._finetune_checks(),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise FercacheError("pretrain settings: " + "; ".join(problems))

    def _finetune_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.finetune_lr > 0, "finetune_lr must be positive"),
            (
                min(self.finetune_weight_decay, self.grad_clip, self.landmark_weight) >= 0,
                "finetune_weight_decay, grad_clip and landmark_weight must be >= 0",
            ),
            (0 < self.layer_decay <= 1, "layer_decay must lie in (0, 1] (1 turns it off)"),
            (0 <= self.drop_path < 1, "drop_path must lie in [0, 1)"),
            (0 <= self.mask_ratio < 1, "mask_ratio must lie in [0, 1)"),
            (self.js_weight >= 0, "js_weight must be >= 0"),
            (
                self.cotex_export in COTEX_EXPORTS,
                f"cotex_export must be one of {', '.join(COTEX_EXPORTS)}",
            ),
        ]

    @property
    def mpl_steps(self) -> int:
        """Steps of teacher/student training; the student fine-tunes alone after them."""
        return self.steps - self.student_finetune_steps

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(
    path: Path | None,
    overrides: list[str] | None = None,
    base: PretrainConfig | None = None,
    **options: Any,
) -> PretrainConfig:
    """`base` (default: the defaults), then the YAML file, then `key=value` overrides, then
    non-None `options`."""
    values: dict[str, Any] = base.to_json() if base else {}
    values.update(given_values(path, overrides, options))
    config = PretrainConfig(**typed_values(PretrainConfig, values, "pretrain"))
    config.validate()
    return config


def resumed_config(
    run_dir: Path, path: Path | None, overrides: list[str] | None = None, **options: Any
) -> PretrainConfig:
    """The settings of the run in `run_dir` (its `config.yaml`), with what is given now; only
    the keys of `PretrainConfig.MAY_CHANGE_ON_RESUME` may differ (`resume.resumed_settings`)."""
    saved_path = Path(run_dir) / CONFIG_FILE
    values = read_config(run_dir)
    try:
        saved = PretrainConfig(**typed_values(PretrainConfig, values, "pretrain"))
        saved.validate()
    except FercacheError as error:
        raise FercacheError(
            f"{saved_path}: {error}. The run was written by another version of fercache: "
            "pretrain into a new --out."
        ) from error
    given = load_config(path, overrides, saved, **options)
    settings = resumed_settings(
        saved.to_json(), given.to_json(), PretrainConfig.MAY_CHANGE_ON_RESUME, saved_path
    )
    return PretrainConfig(**settings)


def requested_config(
    run_dir: Path,
    path: Path | None,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    pretrained: str | None = None,
    init_checkpoint: Path | None = None,
    **options: Any,
) -> PretrainConfig:
    """The settings `fercache pretrain` runs with: `load_config`'s, or with `resume` the saved
    ones of the run in `run_dir` (`resumed_config`). `pretrained` (timm's weights by name) sets
    the backbone, which `options["backbone"]` may repeat but not contradict."""
    if pretrained:
        options["backbone"] = _pretrained_backbone(
            pretrained, options.get("backbone"), init_checkpoint
        )
    if resume:
        return resumed_config(run_dir, path, overrides, **options)
    return load_config(path, overrides, **options)


def _pretrained_backbone(pretrained: str, backbone: str | None, init: Path | None) -> str:
    """The architecture `--pretrained` names, which --backbone may repeat but not contradict."""
    if init is not None:
        raise FercacheError(
            f"{init}: --init-checkpoint and --pretrained both name the initial weights; give one"
        )
    architecture = pretrained_architecture(
        pretrained, "--init-checkpoint FILE instead of --pretrained"
    )
    if backbone and backbone != architecture:
        raise FercacheError(
            f"--pretrained '{pretrained}' is a '{architecture}' but --backbone says '{backbone}'; "
            "drop --backbone or give the matching name"
        )
    return architecture


def settings_text(config: PretrainConfig) -> str:
    """What the run folder's `config.yaml` holds (`fercache pretrain --print-config`)."""
    return config_text(config.to_json(), CONFIG_HEADER)

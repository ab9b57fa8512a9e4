"""What a pretraining recipe is to the run (loop.py): it reads its labelled sources, builds its
networks with their optimizers and learning-rate schedules, takes one training step, and names
the networks that are scored, exported and checkpointed. The run keeps everything else:
loaders, the held-out split, logging, evaluation, checkpoint files, resume, DDP set-up, export.

A new recipe is one module with a `Recipe` subclass and one line in `registry.RECIPES`.
`OneNetwork` is the common case: one trained network, one optimizer, warm-up + cosine over the
run's steps, and the exponential moving average of its weights when `ema_decay` > 0.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import timm
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torchvision import transforms as T

from fercache.backbone.network import read_weights
from fercache.backbone.weights import expected_keys, pretrained_model, select_weights
from fercache.data.tasks import EXPR_CLASSES
from fercache.distributed import Ranks
from fercache.errors import FercacheError
from fercache.pretrain.config import PretrainConfig
from fercache.pretrain.sampling import BalancedBatchSampler, UniformBatches
from fercache.pretrain.sources import LabelledImages, read_labelled
from fercache.pretrain.views import LabelledDataset, Views
from fercache.readers import first_line

NUM_CLASSES = len(EXPR_CLASSES)
Autocast = Callable[[], AbstractContextManager]
ModelFactory = Callable[..., nn.Module]  # (seed, **timm options) -> timm model, EXPR head
Metrics = dict[str, torch.Tensor]  # detached 0-dim tensors, by name


@dataclass(frozen=True)
class StepBatch:
    """One step's images, on the training device."""

    images: torch.Tensor  # (B, 3, H, W), the labelled batch
    labels: torch.Tensor  # (B,)
    targets: torch.Tensor | None  # (B, K) a recipe's extra targets (AU/VA, landmarks)
    weak: torch.Tensor | None = None  # (μB, 3, H, W) unlabelled images, weak view
    strong: torch.Tensor | None = None  # (μB, 3, H, W) the same images, strong view


class Recipe(ABC):
    """One pretraining recipe. Subclasses set the class flags and implement the abstract
    methods; the data methods have defaults (class-balanced batches of the weak view)."""

    balanced: ClassVar[bool] = True  # class-balanced batches; False: uniform with replacement
    uses_unlabelled: ClassVar[bool] = False  # the run reads the unlabelled sources for it
    description: ClassVar[str] = (
        ""  # what it trains, in a few words, for `fercache pretrain --help`
    )

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config
        self.schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
        self.ema: ModelEmaV3 | None = None
        self.check()

    def check(self) -> None:
        """Refuse settings this recipe cannot honour (a FercacheError saying which)."""
        if self.config.student_finetune_steps:
            raise FercacheError(
                "pretrain settings: student_finetune_steps applies to a teacher-student recipe "
                f"(mpl), not to {self.config.recipe}"
            )

    # -- data ---------------------------------------------------------------------------------

    def read(self, sources: list[Path]) -> LabelledImages:
        return read_labelled(sources)

    def training_view(self, views: Views) -> T.Compose:
        return views.weak

    def dataset(
        self, paths: list[Path], labels: np.ndarray, targets: np.ndarray | None, view: T.Compose
    ) -> Dataset:
        return LabelledDataset(paths, labels, view)

    def training_data(
        self,
        paths: list[Path],
        labels: np.ndarray,
        targets: np.ndarray | None,
        views: Views,
        seed: int,
        start: int,
    ) -> tuple[Dataset, BalancedBatchSampler | UniformBatches]:
        """The dataset and its endless batches of indices from batch `start` on (a resumed
        run's step)."""
        dataset = self.dataset(paths, labels, targets, self.training_view(views))
        batch = self.config.batch_size
        if self.balanced:
            return dataset, BalancedBatchSampler(labels, NUM_CLASSES, batch, seed, start)
        return dataset, UniformBatches(len(paths), batch, seed, start)

    def evaluates_after(self, step: int) -> bool:
        """Whether the held-out images are scored after `step` steps besides every
        `eval_every` (a recipe's stage ends there)."""
        return False

    def draws_unlabelled(self, step: int) -> bool:
        """Whether step `step` needs an unlabelled batch (only asked if `uses_unlabelled`)."""
        return self.uses_unlabelled

    # -- training -----------------------------------------------------------------------------

    @abstractmethod
    def build(self, create: ModelFactory, ranks: Ranks) -> None:
        """Networks (from `create(seed, **timm options)`), optimizers and schedules, placed on
        `ranks.device` (DDP-wrapped under torchrun)."""

    @abstractmethod
    def train_step(self, batch: StepBatch, step: int, autocast: Autocast) -> Metrics:
        """The optimizer steps of one training step; its metrics as detached 0-dim tensors
        (logging them then needs no device sync)."""

    def step(self, batch: StepBatch, step: int, autocast: Autocast) -> Metrics:
        """`train_step`, then every schedule advances and the average follows the student."""
        metrics = self.train_step(batch, step, autocast)
        for scheduler in self.schedulers:
            scheduler.step()
        if self.ema is not None:
            self.ema.update(self.student(), step=step)
        return metrics

    @abstractmethod
    def student(self) -> nn.Module:
        """The trained student as built (unwrapped): its data config is the run's."""

    def final_student(self) -> nn.Module:
        """What is scored and exported as the student: its average when `ema_decay` > 0."""
        return self.ema.module if self.ema is not None else self.student()

    def evaluated(self) -> dict[str, nn.Module]:
        """The networks scored on the held-out images, by the prefix of their figures."""
        return {"student": self.final_student()}

    def exported(self) -> dict[str, nn.Module]:
        """The networks written as `<name>.safetensors` for `fercache extract`."""
        return {"student": self.final_student()}

    def export_keys(self) -> dict:
        """Keys the exported model config needs beyond the common ones (see
        fercache.backbone.network)."""
        return {}

    @abstractmethod
    def learning_rates(self) -> dict[str, float]:
        """The current learning rate of each optimizer (logged as `lr_<name>`)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the run's counters: weights, optimizer and
        schedule states, the average."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def _schedule(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> None:
        self.schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizer, factor))

    def _average(self, model: nn.Module, device: torch.device) -> None:
        if self.config.ema_decay > 0:
            self.ema = ModelEmaV3(model.to(device), decay=self.config.ema_decay)

    def _common_state(self) -> dict:
        state: dict = {"schedulers": [scheduler.state_dict() for scheduler in self.schedulers]}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def _load_common_state(self, state: dict) -> None:
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])


class OneNetwork(Recipe):
    """One trained network and its optimizer, warm-up + cosine over the run's steps."""

    model: nn.Module  # as placed: DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer

    @abstractmethod
    def network(self, create: ModelFactory) -> nn.Module:
        """The trained module, from timm networks made by `create(seed, **timm options)`."""

    @abstractmethod
    def make_optimizer(self, model: nn.Module, world_size: int) -> torch.optim.Optimizer: ...

    def build(self, create: ModelFactory, ranks: Ranks) -> None:
        model = self.network(create)
        self.optimizer = self.make_optimizer(model, ranks.world_size)
        config = self.config
        self._schedule(
            self.optimizer, partial(warmup_cosine, warmup=config.warmup_steps, total=config.steps)
        )
        self._average(model, ranks.device)
        self.model = placed(model, ranks)

    def student(self) -> nn.Module:
        return unwrap(self.model)

    def learning_rates(self) -> dict[str, float]:
        return {"student": self.optimizer.param_groups[0]["lr"]}

    def state_dict(self) -> dict:
        return {
            "student": self.student().state_dict(),
            "student_optimizer": self.optimizer.state_dict(),
            **self._common_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student().load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["student_optimizer"])
        self._load_common_state(state)


def create_network(
    backbone: str,
    init_checkpoint: Path | None,
    seed: int,
    *,
    pretrained: str | None = None,
    **timm_options: object,
) -> nn.Module:
    """A timm network with an EXPR head, its initial weights drawn from `seed`, or loaded
    from `init_checkpoint` (a local file, through timm's pretrained path), or timm's pretrained
    weights `pretrained` by name (tag or hf-hub: included; the head is drawn from `seed`)."""
    if not timm.is_model(backbone):
        raise FercacheError(f"unknown backbone '{backbone}': not a timm model name")
    torch.manual_seed(seed)
    if pretrained:
        if init_checkpoint is not None:
            raise FercacheError(
                f"{init_checkpoint}: --init-checkpoint and --pretrained both name the initial "
                "weights; give one"
            )
        model, architecture, _ = pretrained_model(
            pretrained,
            None,
            "--init-checkpoint FILE instead of --pretrained",
            num_classes=NUM_CLASSES,
            **timm_options,
        )
        if architecture != backbone:
            raise FercacheError(
                f"--pretrained '{pretrained}' is a '{architecture}' but the run's backbone is "
                f"'{backbone}'; drop the backbone setting or give the matching name"
            )
        return model
    if init_checkpoint is None:
        return timm.create_model(
            backbone, pretrained=False, num_classes=NUM_CLASSES, **timm_options
        )
    if not Path(init_checkpoint).is_file():
        raise FercacheError(f"{init_checkpoint}: no such checkpoint file")
    _check_initial_weights(Path(init_checkpoint), backbone, timm_options)
    # timm loads a local file through the pretrained path and re-initialises a head whose
    # class count differs (an ImageNet head has 1000)
    try:
        return timm.create_model(
            backbone,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(init_checkpoint)},
            num_classes=NUM_CLASSES,
            **timm_options,
        )
    except RuntimeError as error:  # weights of the backbone's keys but other shapes
        raise FercacheError(
            f"{init_checkpoint}: does not fit backbone '{backbone}' ({first_line(error)}); give "
            "weights of that backbone, or set the backbone they were trained with"
        ) from error


def _check_initial_weights(path: Path, backbone: str, timm_options: dict) -> None:
    """A damaged file, or one without a single weight of `backbone` (which timm's loader would
    silently skip, leaving a random network), fails here, naming the file."""
    expected = set(expected_keys(backbone, NUM_CLASSES, dict(timm_options)))
    state, _ = select_weights(read_weights(path), expected)
    if not expected & set(state):
        raise FercacheError(
            f"{path}: holds no weights of backbone '{backbone}' (none of its keys); give "
            "weights of that backbone, or set the backbone they were trained with"
        )


def optimizer_for(model: nn.Module, lr: float, config: PretrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer: SGD with momentum and Nesterov (Yu et al. §4.2), or AdamW (fast
    progress on the short budgets of the demo), with the run's weight decay."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from 1 to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def placed(model: nn.Module, ranks: Ranks) -> nn.Module:
    """`model` on the run's device in train mode, DDP-wrapped under torchrun."""
    model = model.to(ranks.device).train()
    if ranks.world_size == 1:
        return model
    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model

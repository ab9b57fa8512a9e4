"""The training run: caches + annotation tree → clips → epochs → checkpoints and metrics.

Runs single-process or under torchrun (DistributedDataParallel; gloo on CPU, NCCL on GPU):
every rank draws the same epoch plan and trains on its own disjoint share of the windows;
validation splits the videos over the ranks and gathers every prediction before scoring.
Rank 0 writes every file.

Determinism: each epoch's random streams (window phases and order, dropout) derive from
(seed, epoch, rank), so a run resumed from the checkpoint of epoch e replays epoch e + 1 exactly
as an uninterrupted run does; on CPU the same seed gives bit-identical metrics.
"""

from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import f1_score
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from fercache.data.affwild2 import AffWild2
from fercache.data.tasks import EXPR_CLASSES
from fercache.distributed import Ranks, distributed
from fercache.errors import FercacheError
from fercache.progress import progress_bar
from fercache.smooth import majority_vote
from fercache.temporal.clips import ClipBatches, balanced_windows, rank_share, training_windows
from fercache.temporal.config import (
    TemporalConfig,
    load_config,
    memory_budget_bytes,
    resumed_config,
    write_config,
)
from fercache.temporal.features import CacheSet, LazyFeatures, MemoryFeatures, open_features
from fercache.temporal.inference import FINAL_WEIGHTS, window_logits
from fercache.temporal.labels import class_counts, read_split, row_labels
from fercache.temporal.model import ModelConfig, TemporalTransformer
from fercache.temporal.rundir import (
    SUMMARY_FILE,
    holds_run,
    plot_curves,
    read_last,
    write_best,
    write_json,
    write_last,
    write_metrics,
    write_weights,
)
from fercache.temporal.step import inverse_frequency, train_step, warmup_cosine

CLASSES_OF_TASK = {"expr": list(EXPR_CLASSES)}


@dataclass(frozen=True)
class TrainRequest:
    """What the command line asks for besides the inputs (see `fercache train --help`)."""

    config_file: Path | None = None
    overrides: tuple[str, ...] = ()
    epochs: int | None = None
    seed: int | None = None
    memory_budget: str = "auto"
    device: str = "auto"
    resume: bool = False
    progress: bool = True


@dataclass
class RunData:
    """Features of the training videos (first) and validation videos, with per-row labels."""

    source: MemoryFeatures | LazyFeatures
    labels: list[np.ndarray]
    train_count: int
    classes: list[str]

    @property
    def train_labels(self) -> list[np.ndarray]:
        return self.labels[: self.train_count]

    @property
    def val_indices(self) -> range:
        return range(self.train_count, len(self.labels))


@dataclass(frozen=True)
class Training:
    """The network and what updates it."""

    model: TemporalTransformer  # the plain module: validated and saved
    stepped: torch.nn.Module  # what the steps run: DDP-wrapped under torchrun, else `model`
    optimizer: torch.optim.Optimizer
    loss_weights: torch.Tensor  # per class, on the device
    sampling_weights: np.ndarray  # per class, for class-balanced window sampling


@dataclass
class RunState:
    """What survives a restart besides the weights and optimizer."""

    epochs_done: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def train(cache_dirs: list[Path], data: Path, out: Path, request: TrainRequest) -> dict:
    """Train a temporal model into `out`; returns the run's summary (also `summary.json`)."""
    out = Path(out)
    with distributed(request.device) as ranks:
        config = _resolve_config(out, request)
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_config(config, out)
        ranks.barrier()
        return _run(cache_dirs, Path(data), out, config, request, ranks)


def _resolve_config(out: Path, request: TrainRequest) -> TemporalConfig:
    options = {"epochs": request.epochs, "seed": request.seed}
    if request.resume:
        return resumed_config(out, request.config_file, list(request.overrides), **options)
    if holds_run(out):
        raise FercacheError(
            f"{out}: already holds a training run; pass --resume to continue it, or choose "
            "another --out"
        )
    return load_config(request.config_file, list(request.overrides), **options)


def _run(
    cache_dirs: list[Path],
    data: Path,
    out: Path,
    config: TemporalConfig,
    request: TrainRequest,
    ranks: Ranks,
) -> dict:
    caches = CacheSet.open(cache_dirs)
    model_config = _model_config(config, caches)
    checkpoint = read_last(out) if request.resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, model_config, caches, out)
    run_data = _load_data(caches, data, config, request, ranks)
    counts = class_counts(run_data.train_labels, model_config.num_classes)
    inverse = inverse_frequency(counts)
    loss_weights = inverse if config.balance == "weights" else np.ones(len(counts))

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = TemporalTransformer(model_config).to(ranks.device)
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.lr)
    state = RunState()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = RunState(**checkpoint["state"])
    training = Training(
        model,
        DistributedDataParallel(model) if ranks.world_size > 1 else model,
        optimizer,
        torch.tensor(loss_weights, dtype=torch.float32, device=ranks.device),
        inverse,
    )
    details = _model_details(model_config, config, caches, run_data.classes)

    for epoch in range(state.epochs_done, config.epochs):
        record = {"epoch": epoch + 1}
        record.update(_train_epoch(training, run_data, config, ranks, epoch, request.progress))
        validation_started = perf_counter()
        record.update(_validate(model, run_data, config, ranks))
        record["timing"]["val_seconds"] = perf_counter() - validation_started
        state.history.append(record)
        state.epochs_done = epoch + 1
        improved = record["val_f1"] > state.best_f1
        if improved:
            state.best_f1, state.best_epoch = record["val_f1"], epoch + 1
        if ranks.is_main:
            _save_epoch(out, training, state, details, improved)
        ranks.barrier()

    summary = _summary(state, run_data, counts, caches, data, details)
    if ranks.is_main:
        write_weights(out / FINAL_WEIGHTS, model.state_dict())
        write_json(out / SUMMARY_FILE, summary)
        plot_curves(out, state.history)
    return summary


def _model_config(config: TemporalConfig, caches: CacheSet) -> ModelConfig:
    return ModelConfig(
        feature_dim=caches.feature_dim,
        num_classes=len(CLASSES_OF_TASK[config.task]),
        clip_frames=config.clip_frames,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        ff_width=config.ff_width,
        dropout=config.dropout,
        input_dropout=config.input_dropout,
    )


def _check_resumable(checkpoint: dict, model_config: ModelConfig, caches: CacheSet, out: Path):
    saved = checkpoint["model_config"]
    if saved["feature_dim"] != model_config.feature_dim:
        raise FercacheError(
            f"{out}: the run was trained on {saved['feature_dim']}-dim features "
            f"(caches {checkpoint['cache_fingerprints']}) but the caches given now give "
            f"{model_config.feature_dim} ({', '.join(str(c.root) for c in caches.caches)}). "
            "Resume with the same CACHE_DIRs in the same order, or train into a new --out."
        )
    if checkpoint["cache_fingerprints"] != caches.fingerprints:
        raise FercacheError(
            f"{out}: the run was trained on caches {checkpoint['cache_fingerprints']} but the "
            f"caches given now are {caches.fingerprints} (other backbone or weights). Resume "
            "with the same CACHE_DIRs, or train into a new --out."
        )


def _load_data(
    caches: CacheSet, data: Path, config: TemporalConfig, request: TrainRequest, ranks: Ranks
) -> RunData:
    tree = AffWild2(data)
    splits = [
        read_split(tree, config.task, split) for split in (config.train_split, config.val_split)
    ]
    for split in splits:
        caches.require(split.names, f"{config.task.upper()} {split.split}")
    videos = [video for split in splits for video in split.videos]
    budget = memory_budget_bytes(request.memory_budget)
    source = open_features(
        caches, [video.video for video in videos], budget, request.progress and ranks.is_main
    )
    labels = [row_labels(video, source.frames(index)) for index, video in enumerate(videos)]
    return RunData(source, labels, len(splits[0].videos), CLASSES_OF_TASK[config.task])


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only: decaying LayerNorm gains and biases pulls them towards 0 for nothing.
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": matrices, "weight_decay": weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]


def _model_details(
    model_config: ModelConfig, config: TemporalConfig, caches: CacheSet, classes: list[str]
) -> dict:
    return {
        **model_config.to_json(),
        "task": config.task,
        "classes": classes,
        "eval_stride": config.eval_stride,
        "smooth_window": config.smooth_window,
        "caches": caches.describe(),
    }


def _epoch_generators(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The epoch's window plan (same on every rank) and, seeded as a side effect, dropout."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
    return np.random.default_rng([seed, epoch])


def _train_epoch(
    training: Training,
    run_data: RunData,
    config: TemporalConfig,
    ranks: Ranks,
    epoch: int,
    progress: bool,
) -> dict:
    rng = _epoch_generators(config.seed, epoch, ranks.rank)
    labelled = [labels >= 0 for labels in run_data.train_labels]
    windows = training_windows(labelled, config.clip_frames, rng)
    if config.balance == "sampling":
        windows = balanced_windows(windows, run_data.train_labels, training.sampling_weights, rng)
    share = rank_share(windows, ranks.rank, ranks.world_size, config.batch_size)
    batches = ClipBatches(
        run_data.source, run_data.labels, share, config.clip_frames, config.batch_size
    )
    lazy = isinstance(run_data.source, LazyFeatures)
    loader = DataLoader(
        batches,
        batch_size=None,
        num_workers=config.workers if lazy else 0,  # in memory, slicing here is cheapest
        pin_memory=ranks.device.type == "cuda",
    )
    training.model.train()
    loss_sum = torch.zeros((), device=ranks.device)
    waited, started = 0.0, perf_counter()
    steps = len(batches)
    with progress_bar(
        f"epoch {epoch + 1}/{config.epochs}", steps, progress and ranks.is_main
    ) as advance:
        iterator = iter(loader)
        for step in range(steps):
            before = perf_counter()
            batch = next(iterator)
            waited += perf_counter() - before
            progress_in_epochs = epoch + (step + 1) / steps
            factor = warmup_cosine(progress_in_epochs, config.warmup_epochs, config.epochs)
            for group in training.optimizer.param_groups:
                group["lr"] = config.lr * factor
            loss_sum += train_step(
                training.stepped,
                training.optimizer,
                batch,
                training.loss_weights,
                ranks.device,
                grad_clip=config.grad_clip,
                amp=config.amp,
            )
            advance()
    if ranks.world_size > 1:
        dist.all_reduce(loss_sum)
    seconds = perf_counter() - started
    return {
        "train_loss": float(loss_sum) / max(steps * ranks.world_size, 1),
        "lr": training.optimizer.param_groups[0]["lr"],
        "train_windows": len(windows),
        "timing": {
            "train_seconds": seconds,
            "windows_per_second": len(windows) / seconds,
            "data_wait_share": waited / seconds,
        },
    }


def _validate(
    model: TemporalTransformer, run_data: RunData, config: TemporalConfig, ranks: Ranks
) -> dict:
    model.eval()
    mine = {
        index: window_logits(
            model,
            run_data.source.whole(index),
            clip=config.clip_frames,
            stride=config.eval_stride,
            device=ranks.device,
            batch_size=config.eval_batch,
            amp=config.amp,
        )
        for index in run_data.val_indices[ranks.rank :: ranks.world_size]
        if run_data.source.rows(index) > 0
    }
    logits = _gather(mine, ranks)
    order = [index for index in run_data.val_indices if index in logits]
    scores = np.concatenate([logits[index] for index in order])
    labels = np.concatenate([run_data.labels[index] for index in order])
    probabilities = torch.softmax(torch.from_numpy(scores), dim=1).numpy()
    predicted = probabilities.argmax(axis=1)
    lengths = np.array([len(logits[index]) for index in order])
    smoothed = majority_vote(predicted, probabilities, config.smooth_window, "centered", lengths)
    valid = labels >= 0
    classes = list(range(len(run_data.classes)))
    per_class = f1_score(
        labels[valid], predicted[valid], labels=classes, average=None, zero_division=0
    )
    return {
        "val_f1": float(per_class.mean()),
        "val_f1_smoothed": float(
            f1_score(
                labels[valid], smoothed[valid], labels=classes, average="macro", zero_division=0
            )
        ),
        "val_class_f1": dict(zip(run_data.classes, per_class.round(6).tolist(), strict=True)),
        "val_frames": int(valid.sum()),
    }


def _gather(mine: dict[int, np.ndarray], ranks: Ranks) -> dict[int, np.ndarray]:
    if ranks.world_size == 1:
        return mine
    shares: list[dict | None] = [None] * ranks.world_size
    dist.all_gather_object(shares, mine)
    return {index: value for share in shares for index, value in share.items()}


def _save_epoch(
    out: Path, training: Training, state: RunState, details: dict, improved: bool
) -> None:
    # Order matters for a kill at any point: best first, then the checkpoint that resumes,
    # then metrics rewritten from the checkpointed history.
    model = training.model
    if improved:
        best = {**details, "epoch": state.best_epoch, "val_f1": state.best_f1}
        write_best(out, model.state_dict(), best)
    write_last(
        out,
        {
            "model": model.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "state": vars(state),
            "model_config": model.config.to_json(),
            "cache_fingerprints": [cache["fingerprint"] for cache in details["caches"]],
        },
    )
    write_metrics(out, state.history)


def _summary(
    state: RunState,
    run_data: RunData,
    counts: np.ndarray,
    caches: CacheSet,
    data: Path,
    details: dict,
) -> dict:
    best = state.history[state.best_epoch - 1]
    return {
        "best_epoch": state.best_epoch,
        "best_val_f1": best["val_f1"],
        "best_val_f1_smoothed": best["val_f1_smoothed"],
        "best_val_class_f1": best["val_class_f1"],
        "last_epoch": state.history[-1],
        "epochs": state.epochs_done,
        "train_videos": run_data.train_count,
        "val_videos": len(run_data.val_indices),
        "train_class_frames": dict(zip(run_data.classes, counts.tolist(), strict=True)),
        "features_in_memory": isinstance(run_data.source, MemoryFeatures),
        "feature_dim": details["feature_dim"],
        "caches": details["caches"],
        "data": str(data),
        "train_seconds": sum(record["timing"]["train_seconds"] for record in state.history),
    }

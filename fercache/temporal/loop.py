"""The training run: caches + annotation tree → clips → epochs → checkpoints and metrics.

A run trains one or more tasks (`tasks`: EXPR, AU, VA) with one head each on a shared encoder.
A row joins the training windows when it is valid for at least one trained task; every task's
loss is masked to its own valid rows (`fercache.temporal.step`). Each epoch is validated on
every trained task (`fercache.temporal.validation`); the `select` score picks best.safetensors.

Runs single-process or under torchrun (DistributedDataParallel; gloo on CPU, NCCL on GPU):
every rank draws the same epoch plan and trains on its own disjoint share of the windows;
validation splits the videos over the ranks and gathers every prediction before scoring.
Rank 0 writes every file.

Determinism: each epoch's random streams (window phases and order, dropout) derive from
(seed, epoch, rank), so a run resumed from the checkpoint of epoch e replays epoch e + 1 exactly
as an uninterrupted run does; on CPU the same seed gives bit-identical metrics.
"""

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from fercache.data.affwild2 import AffWild2
from fercache.data.labels import (
    SplitLabels,
    class_counts,
    positive_counts,
    read_split,
    row_targets,
    row_valid,
)
from fercache.data.tasks import EXPR_CLASSES
from fercache.distributed import Ranks, distributed
from fercache.errors import FercacheError
from fercache.outputs import output_folder, remove_dead_leftovers
from fercache.progress import progress_bar, progress_line
from fercache.readers import read_json_object, unreadable
from fercache.resume import (
    holds_run,
    read_checkpoint,
    write_checkpoint,
    write_metrics,
    writing_run,
)
from fercache.temporal.clips import (
    ClipBatches,
    RowTargets,
    balanced_windows,
    rank_share,
    training_windows,
)
from fercache.temporal.config import (
    TemporalConfig,
    load_config,
    memory_budget_bytes,
    resumed_config,
    write_config,
)
from fercache.temporal.features import CacheSet, LazyFeatures, MemoryFeatures, open_features
from fercache.temporal.model import OUTPUTS, ModelConfig, TemporalModel
from fercache.temporal.registry import build_model
from fercache.temporal.run_files import (
    FINAL_WEIGHTS,
    SUMMARY_FILE,
    VIDEOS_FILE,
    plot_curves,
    write_best,
    write_json,
    write_weights,
)
from fercache.temporal.step import (
    Objective,
    inverse_frequency,
    positive_weights,
    train_step,
    warmup_cosine,
)
from fercache.temporal.subsample import subsample_videos
from fercache.temporal.validation import RECORD_KEY, validate

# What `_save_epoch` puts in last.pt (a phase-1 checkpoint lacks them).
CHECKPOINT_KEYS = ("model", "optimizer", "state", "model_config", "cache_fingerprints")


@dataclass(frozen=True)
class VideoSelection:
    """Explicit training and validation videos (e.g. one cross-validation fold), taken from the
    videos the train and val splits annotate instead of the splits themselves. `name` says
    in errors which selection it is (e.g. 'fold 2')."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    name: str = "selected"


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
    videos: VideoSelection | None = None  # None: the config's train_split and val_split


@dataclass
class RunData:
    """Features of the training videos (first) and validation videos, with each trained
    task's labels per row."""

    source: MemoryFeatures | LazyFeatures
    labels: list[RowTargets]
    train_count: int

    def train_labels(self, task: str) -> list[np.ndarray]:
        return [targets[task] for targets in self.labels[: self.train_count]]

    @property
    def val_indices(self) -> range:
        return range(self.train_count, len(self.labels))


@dataclass(frozen=True)
class Training:
    """The network and what updates it."""

    model: TemporalModel  # the plain module: validated and saved
    stepped: torch.nn.Module  # what the steps run: DDP-wrapped under torchrun, else `model`
    optimizer: torch.optim.Optimizer
    objective: Objective  # per-task losses and their weights, on the device
    sampling_weights: np.ndarray | None  # EXPR per class, for class-balanced window sampling


@dataclass
class RunState:
    """What survives a restart besides the weights and optimizer."""

    epochs_done: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def train(cache_dirs: list[Path], data: Path, out: Path, request: TrainRequest) -> dict:
    """Train a temporal model into `out`; returns the run's summary (also `summary.json`)."""
    out = Path(out)
    request = _with_recorded_videos(out, request)
    # Held before the folder is looked at: whether it holds a run, and its checkpoint, are
    # then those no other process is changing.
    with distributed(request.device) as ranks, writing_run(out, ranks.is_main):
        config = _resolve_config(out, request)
        return _run(cache_dirs, Path(data), out, config, request, ranks)


def _with_recorded_videos(out: Path, request: TrainRequest) -> TrainRequest:
    """A resumed run of explicit videos (a fold) resumes with the videos its folder records,
    even when resumed directly (`fercache train --resume --out FOLDS_DIR/fold-<k>`)."""
    path = out / VIDEOS_FILE
    if not request.resume or request.videos is not None or not path.is_file():
        return request
    remedy = f"resume it through `fercache train --folds K --out {out.parent}`"
    recorded = read_json_object(path, "list of the run's videos", remedy)
    try:
        selection = VideoSelection(
            tuple(map(str, recorded["train"])),
            tuple(map(str, recorded["val"])),
            str(recorded["name"]),
        )
    except (KeyError, TypeError) as error:
        raise unreadable(path, "list of the run's videos", f"no {error}", remedy) from error
    return replace(request, videos=selection)


def resolved_config(out: Path, request: TrainRequest) -> TemporalConfig:
    """The settings `train` runs with: the request's, or with `resume` the run's saved ones
    (which the request may not change)."""
    options = {"epochs": request.epochs, "seed": request.seed}
    if request.resume:
        return resumed_config(out, request.config_file, list(request.overrides), **options)
    return load_config(request.config_file, list(request.overrides), **options)


def _resolve_config(out: Path, request: TrainRequest) -> TemporalConfig:
    if not request.resume and holds_run(out):
        raise FercacheError(
            f"{out}: already holds a training run; pass --resume to continue it, or choose "
            "another --out"
        )
    return resolved_config(out, request)


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
    checkpoint = read_checkpoint(out, CHECKPOINT_KEYS) if request.resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, model_config, caches, out)
    run_data = _load_data(caches, data, config, request, ranks)
    objective, sampling_weights = _objective(run_data, config, ranks.device)
    if ranks.is_main:  # only once every input was read: unreadable inputs leave no run folder
        output_folder(out)
        remove_dead_leftovers(out)  # weights and checkpoints of a killed run, half-written
        write_config(config, out)
        if request.videos is not None:
            write_json(out / VIDEOS_FILE, asdict(request.videos))
    ranks.barrier()

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(model_config).to(ranks.device)
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
        objective,
        sampling_weights,
    )
    details = _model_details(model_config, config, caches)
    selected = RECORD_KEY[config.selected_score]

    for epoch in range(state.epochs_done, config.epochs):
        epoch_started = perf_counter()
        record = {"epoch": epoch + 1}
        record.update(_train_epoch(training, run_data, config, ranks, epoch, request.progress))
        _check_finite(record, state, config, out)
        validation_started = perf_counter()
        record.update(
            validate(model, run_data.source, run_data.labels, run_data.val_indices, config, ranks)
        )
        record["timing"]["val_seconds"] = perf_counter() - validation_started
        state.history.append(record)
        state.epochs_done = epoch + 1
        # A NaN score never improves, but the first epoch always gives best weights.
        improved = record[selected] > state.best_score or state.best_epoch == 0
        if improved:
            state.best_score, state.best_epoch = record[selected], epoch + 1
        if ranks.is_main:
            _save_epoch(out, training, state, details, improved)
        line = epoch_line(record, config, improved, perf_counter() - epoch_started)
        progress_line(line, request.progress and ranks.is_main)
        ranks.barrier()

    summary = _summary(state, run_data, config, caches, data, details)
    if ranks.is_main:
        write_weights(out / FINAL_WEIGHTS, model.state_dict())
        write_json(out / SUMMARY_FILE, summary)
        plot_curves(out, state.history)
    return summary


def _check_finite(record: dict, state: RunState, config: TemporalConfig, out: Path) -> None:
    """A diverged epoch (loss inf or NaN: the weights are no longer numbers) is an error, and
    nothing of it is saved: best weights, last.pt and metrics stay those of the last good one."""
    loss = record[_loss_key("total")]
    if math.isfinite(loss):
        return
    kept = (
        f"{out} keeps epoch {state.epochs_done}, the last that trained"
        if state.epochs_done
        else f"no epoch finished, so {out} holds no weights"
    )
    raise FercacheError(
        f"training diverged in epoch {record['epoch']}: loss {loss} ({kept}). Check the caches "
        f"for inf or NaN features, or train into a new --out with a lower lr (now {config.lr:g})"
    )


def _model_config(config: TemporalConfig, caches: CacheSet) -> ModelConfig:
    return ModelConfig(
        feature_dim=caches.feature_dim,
        tasks=config.tasks,
        clip_frames=config.clip_frames,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        ff_width=config.ff_width,
        dropout=config.dropout,
        input_dropout=config.input_dropout,
        model=config.model,
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
        read_split(tree, config.tasks, split) for split in (config.train_split, config.val_split)
    ]
    if request.videos is not None:
        splits = _selected(splits, request.videos)
    splits[0] = subsample_videos(splits[0], config.subsample, config.seed)
    for split in splits:
        caches.require(split.names, f"{_tasks_text(config.tasks)} {split.split}")
    videos = [video for split in splits for video in split.videos]
    budget = memory_budget_bytes(request.memory_budget)
    source = open_features(
        caches, [video.video for video in videos], budget, request.progress and ranks.is_main
    )
    labels = [
        row_targets(video, config.tasks, source.frames(index)) for index, video in enumerate(videos)
    ]
    run_data = RunData(source, labels, len(splits[0].videos))
    _check_labelled(run_data, data, config.tasks, (splits[0].split, splits[1].split))
    return run_data


def _selected(splits: list[SplitLabels], selection: VideoSelection) -> list[SplitLabels]:
    """The selection's training and validation videos, out of both splits' annotated ones."""
    annotated = {video.video: video for split in splits for video in split.videos}
    selected = []
    for part, names in (("training", selection.train), ("validation", selection.val)):
        unknown = sorted(set(names) - set(annotated))
        if unknown:
            raise FercacheError(
                f"{selection.name} {part} video(s) {', '.join(unknown[:5])} are not annotated "
                f"for {_tasks_text(splits[0].tasks)} in the {splits[0].split} or "
                f"{splits[1].split} split; check the data or plan the selection again"
            )
        chosen = [annotated[name] for name in sorted(names)]
        selected.append(SplitLabels(splits[0].tasks, f"{selection.name} {part}", chosen))
    return selected


def _tasks_text(tasks: tuple[str, ...]) -> str:
    return "/".join(task.upper() for task in tasks)


def _check_labelled(
    run_data: RunData, data: Path, tasks: tuple[str, ...], split_names: tuple[str, str]
) -> None:
    """Every trained task needs valid labels on cached rows of both splits."""
    parts = {
        split_names[0]: run_data.labels[: run_data.train_count],
        split_names[1]: run_data.labels[run_data.train_count :],
    }
    for task in tasks:
        for split, videos in parts.items():
            if not any(row_valid(task, targets[task]).any() for targets in videos):
                raise FercacheError(
                    f"{data}: the {task.upper()} {split} annotations hold no valid label on a "
                    f"frame with features; annotate that split or drop {task} from tasks "
                    f"(--set tasks=[...])"
                )


def _objective(
    run_data: RunData, config: TemporalConfig, device: torch.device
) -> tuple[Objective, np.ndarray | None]:
    """The losses to minimise, and the EXPR class weights of balanced sampling (or None)."""
    class_weights = sampling_weights = pos_weight = None
    if "expr" in config.tasks:
        counts = class_counts(run_data.train_labels("expr"), len(EXPR_CLASSES))
        sampling_weights = inverse_frequency(counts)
        chosen = sampling_weights if config.balance == "weights" else np.ones(len(counts))
        class_weights = torch.tensor(chosen, dtype=torch.float32, device=device)
    if "au" in config.tasks and config.au_pos_weight == "inverse_frequency":
        weights = positive_weights(*positive_counts(run_data.train_labels("au")))
        pos_weight = torch.tensor(weights, dtype=torch.float32, device=device)
    return Objective(config.task_weights, class_weights, pos_weight), sampling_weights


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only: decaying LayerNorm gains and biases pulls them towards 0 for nothing.
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": matrices, "weight_decay": weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]


def _model_details(model_config: ModelConfig, config: TemporalConfig, caches: CacheSet) -> dict:
    return {
        **model_config.to_json(),
        "outputs": {task: list(OUTPUTS[task]) for task in config.tasks},
        "selected_by": config.selected_score,
        "eval_stride": config.eval_stride,
        "smooth_window": config.smooth_window,
        "caches": caches.describe(),
    }


def _epoch_generators(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The epoch's window plan (same on every rank) and, seeded as a side effect, dropout."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
    return np.random.default_rng([seed, epoch])


def _labelled_rows(targets: RowTargets) -> np.ndarray:
    """Per row: valid for at least one trained task."""
    return np.logical_or.reduce([row_valid(task, labels) for task, labels in targets.items()])


def _train_epoch(
    training: Training,
    run_data: RunData,
    config: TemporalConfig,
    ranks: Ranks,
    epoch: int,
    progress: bool,
) -> dict:
    rng = _epoch_generators(config.seed, epoch, ranks.rank)
    labelled = [_labelled_rows(targets) for targets in run_data.labels[: run_data.train_count]]
    windows = training_windows(labelled, config.clip_frames, rng)
    if config.balance == "sampling":
        expr = run_data.train_labels("expr")
        windows = balanced_windows(windows, expr, training.sampling_weights, rng)
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
    loss_sums = {name: torch.zeros((), device=ranks.device) for name in ("total", *config.tasks)}
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
            losses = train_step(
                training.stepped,
                training.optimizer,
                batch,
                training.objective,
                ranks.device,
                grad_clip=config.grad_clip,
                amp=config.amp,
            )
            for name, loss in losses.items():
                loss_sums[name] += loss
            advance()
    if ranks.world_size > 1:
        for total in loss_sums.values():
            dist.all_reduce(total)
    seconds = perf_counter() - started
    steps_done = max(steps * ranks.world_size, 1)
    # One task's loss equals the total: per-task figures only when several are trained.
    shown = ("total", *config.tasks) if len(config.tasks) > 1 else ("total",)
    return {
        **{_loss_key(name): float(loss_sums[name]) / steps_done for name in shown},
        "lr": training.optimizer.param_groups[0]["lr"],
        "train_windows": len(windows),
        "timing": {
            "train_seconds": seconds,
            "windows_per_second": len(windows) / seconds,
            "data_wait_share": waited / seconds,
        },
    }


def epoch_line(record: dict, config: TemporalConfig, improved: bool, seconds: float) -> str:
    """The epoch's progress line, e.g. `epoch 3/20  loss 1.8460 (expr 1.2340, au 0.6120)  val
    expr_f1 0.4120 (smoothed 0.4301)  au_f1 0.3810  p 0.7930  * best  12.3 s`: the training
    losses (each task's when several are trained), the validation scores, `* best` when the
    selected score improved, and the epoch's wall time."""
    loss = f"loss {record['train_loss']:.4f}"
    if len(config.tasks) > 1:
        task_losses = [f"{task} {record[_loss_key(task)]:.4f}" for task in config.tasks]
        loss += f" ({', '.join(task_losses)})"
    scores = []
    for score, key in RECORD_KEY.items():
        if key in record:
            scores.append(f"{score} {record[key]:.4f}")
            if key == "val_f1":
                scores[-1] += f" (smoothed {record['val_f1_smoothed']:.4f})"
    best = "  * best" if improved else ""
    return (
        f"epoch {record['epoch']}/{config.epochs}  {loss}  val {'  '.join(scores)}{best}  "
        f"{seconds:.1f} s"
    )


def _loss_key(name: str) -> str:
    return "train_loss" if name == "total" else f"train_loss_{name}"


def _save_epoch(
    out: Path, training: Training, state: RunState, details: dict, improved: bool
) -> None:
    # Order matters for a kill at any point: best first, then the checkpoint that resumes,
    # then metrics rewritten from the checkpointed history.
    model = training.model
    if improved:
        best = {**details, "epoch": state.best_epoch, "score": state.best_score}
        write_best(out, model.state_dict(), best)
    write_checkpoint(
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
    config: TemporalConfig,
    caches: CacheSet,
    data: Path,
    details: dict,
) -> dict:
    """The run at its end; `best_val_*` are the best epoch's validation scores (the numeric
    ones are what tables of runs compare), `selected_by` the score that chose it."""
    best = state.history[state.best_epoch - 1]
    summary = {
        "tasks": list(config.tasks),
        "selected_by": config.selected_score,
        "best_epoch": state.best_epoch,
        **{
            f"best_{key}": value
            for key, value in best.items()
            if key.startswith("val_") and not key.endswith("_frames")
        },
        "last_epoch": state.history[-1],
        "epochs": state.epochs_done,
        "train_videos": run_data.train_count,
        "val_videos": len(run_data.val_indices),
        "train_frames": {
            task: int(sum(row_valid(task, labels).sum() for labels in run_data.train_labels(task)))
            for task in config.tasks
        },
    }
    if "expr" in config.tasks:
        counts = class_counts(run_data.train_labels("expr"), len(EXPR_CLASSES))
        summary["train_class_frames"] = dict(zip(EXPR_CLASSES, counts.tolist(), strict=True))
    return {
        **summary,
        "features_in_memory": isinstance(run_data.source, MemoryFeatures),
        "feature_dim": details["feature_dim"],
        "caches": details["caches"],
        "data": str(data),
        "train_seconds": sum(record["timing"]["train_seconds"] for record in state.history),
    }


def best_scores_text(summary: dict) -> str:
    """One line of the best epoch's validation scores, e.g. for the command line."""
    shown = (
        ("best_val_f1", "EXPR macro-F1"),
        ("best_val_f1_smoothed", "smoothed"),
        ("best_val_au_f1", "AU mean F1"),
        ("best_val_va_ccc", "VA mean CCC"),
        ("best_val_p", "P"),
    )
    scores = ", ".join(f"{name} {summary[key]:.4f}" for key, name in shown if key in summary)
    return (
        f"best validation epoch {summary['best_epoch']} (chosen by {summary['selected_by']}): "
        f"{scores}"
    )

"""The pretraining run: sources → balanced / unlabelled loaders → steps → metrics, checkpoints,
exported student (and teacher). Runs single-process or under torchrun (DDP; gloo on CPU, NCCL
on GPU); rank 0 writes every file."""

import contextlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from sklearn.metrics import accuracy_score, f1_score
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler

from fercache.backbone import DataConfig
from fercache.data.tasks import EXPR_CLASSES
from fercache.distributed import Ranks, distributed
from fercache.errors import FercacheError
from fercache.outputs import write_atomically
from fercache.pretrain.config import PretrainConfig
from fercache.pretrain.export import export_model, model_config
from fercache.pretrain.finetune import Recipe
from fercache.pretrain.mpl import (
    Autocast,
    DistributionAlignment,
    MplBatch,
    MplSettings,
    mpl_step,
    supervised_step,
)
from fercache.pretrain.recipes import export_keys, recipe_for
from fercache.pretrain.sampling import BalancedBatchSampler, holdout_split
from fercache.pretrain.sources import (
    Problem,
    other_from_videos_only,
    read_labelled,
    read_unlabelled,
)
from fercache.pretrain.views import (
    LabelledDataset,
    UnlabelledDataset,
    Views,
    build_views,
    data_config_of,
)
from fercache.progress import progress_bar

NUM_CLASSES = len(EXPR_CLASSES)
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
PROBLEMS_FILE = "problems.txt"
CONFIG_FILE = "config.json"
_EVAL_BATCH = 128


@dataclass
class Models:
    student: nn.Module  # DDP-wrapped under torchrun
    teacher: nn.Module | None  # None for the supervised recipe
    student_optimizer: torch.optim.Optimizer
    teacher_optimizer: torch.optim.Optimizer | None
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    ema: ModelEmaV3 | None
    recipe: Recipe | None = None  # cotex, emma, multitask-landmarks: their own step
    alignment: DistributionAlignment | None = None  # mpl: of the teacher's pseudo labels


@dataclass
class Progress:
    """Counters that survive a restart (besides the weights), and the metrics of the steps
    since the last log line, summed as device tensors so that logging needs no sync per step."""

    step: int = 0
    feedback_sum: float = 0.0
    feedback_count: int = 0
    unreadable: int = 0
    window: dict[str, torch.Tensor] = field(default_factory=dict)
    window_steps: int = 0


@dataclass
class PretrainReport:
    """What a call of `pretrain` did."""

    out: Path
    steps: int  # the run's step count when the call ended
    evaluation: dict[str, float]  # held-out figures of the last evaluation (empty if none ran)
    problems: list[str]  # entries left out and unreadable images met, each naming its file


def pretrain(
    labelled: list[Path],
    unlabelled: list[Path],
    out: Path,
    config: PretrainConfig,
    *,
    resume: bool = False,
    init_checkpoint: Path | None = None,
    progress: bool = True,
) -> PretrainReport:
    """Train (or continue) a phase-1 run in `out` up to `config.steps` steps."""
    out = Path(out)
    _check_resumable(out, config, resume)
    with distributed() as ranks:
        return _run(labelled, unlabelled, out, config, ranks, resume, init_checkpoint, progress)


def saved_settings(out: Path) -> PretrainConfig:
    """The settings a run in `out` was started with (what `--resume` continues with)."""
    saved = Path(out) / CONFIG_FILE
    if not saved.is_file():
        raise FercacheError(f"{out}: no {CONFIG_FILE}, so no run to resume there")
    return PretrainConfig(**json.loads(saved.read_text())["settings"])


def _check_resumable(out: Path, config: PretrainConfig, resume: bool) -> None:
    """A resumed run keeps its saved settings (only `steps` may change); a new run needs a
    folder without one."""
    if not resume:
        if (out / STATE_FILE).is_file():
            raise FercacheError(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out"
            )
        return
    if not (out / STATE_FILE).is_file():
        raise FercacheError(f"{out}: nothing to resume (no {STATE_FILE}); drop --resume")
    saved = saved_settings(out).to_json()
    changed = [
        f"{key} {saved[key]!r} -> {value!r}"
        for key, value in config.to_json().items()
        if key != "steps" and saved[key] != value
    ]
    if changed:
        raise FercacheError(
            f"{out}: a resumed run keeps its settings (only steps may change); "
            f"these differ: {', '.join(changed)}"
        )


def _run(
    labelled: list[Path],
    unlabelled: list[Path],
    out: Path,
    config: PretrainConfig,
    ranks: Ranks,
    resume: bool,
    init_checkpoint: Path | None,
    progress: bool,
) -> PretrainReport:
    recipe = recipe_for(config)
    labelled_images = recipe.read(labelled) if recipe else read_labelled(labelled)
    if config.other_from_videos_only:
        labelled_images = other_from_videos_only(labelled_images)
    # the baseline never looks at unlabelled images
    unlabelled_images = read_unlabelled(unlabelled) if config.recipe == "mpl" else None
    labels = np.asarray(labelled_images.labels)
    train_index, held_index = holdout_split(
        labels, labelled_images.videos, config.holdout_fraction, config.seed
    )
    held_index = held_index[labels[held_index] >= 0]  # frames without EXPR (EMMA): not scored

    create = partial(_create_model, config.backbone, init_checkpoint)
    student = recipe.build(create) if recipe else create(config.seed)
    teacher = (
        _create_model(config.backbone, init_checkpoint, config.seed + 1)
        if config.recipe == "mpl"
        else None
    )
    data_config = data_config_of(student, config.image_size)
    views = build_views(data_config, config.resize_ratio, config.randaugment, config.erasing_prob)
    models = _build_training(student, teacher, config, ranks, recipe)
    state = Progress()
    problems: list[Problem] = []
    if resume:
        state = _load_state(out / STATE_FILE, models)
        if ranks.is_main:
            _trim_metrics(out / METRICS_FILE, state.step)
    else:
        problems = labelled_images.problems + (
            unlabelled_images.problems if unlabelled_images else []
        )
        if ranks.is_main:
            _start_run_dir(out, config, labelled, unlabelled, data_config)
            _report_problems(out, problems)
    ranks.barrier()

    stream_seed = [config.seed, ranks.rank, state.step]  # a resumed run draws a fresh stream
    _seed_host_random(stream_seed)
    labelled_paths = [labelled_images.paths[i] for i in train_index]
    targets = np.asarray(labelled_images.targets)[train_index] if labelled_images.targets else None
    labelled_batches = _labelled_batches(
        labelled_paths, labels[train_index], views, config, stream_seed, ranks, recipe, targets
    )
    unlabelled_batches = (
        _unlabelled_batches(unlabelled_images.paths, views, config, stream_seed, ranks)
        if unlabelled_images
        else None
    )
    held_out = _evaluation_loader(
        [labelled_images.paths[i] for i in held_index], labels[held_index], views, config.workers
    )
    autocast = _autocast(ranks.device, config.amp)
    settings = MplSettings(
        config.temperature,
        config.threshold,
        config.lambda_u,
        config.uda_steps,
        config.feedback_sign,
    )
    last_eval: dict[str, float] = {}
    run = partial(_one_step, models, settings, autocast, ranks.device)
    with progress_bar("pretraining", config.steps, progress and ranks.is_main) as advance:
        advance(state.step)
        while state.step < config.steps:
            # after the MPL steps the student fine-tunes alone: no unlabelled batch is drawn
            with_unlabelled = unlabelled_batches is not None and state.step < config.mpl_steps
            metrics, unreadable = run(
                next(labelled_batches),
                next(unlabelled_batches) if with_unlabelled else None,
                state.step,
            )
            state.step += 1
            _accumulate(state, metrics)
            if unreadable:
                met = [Problem(path, "unreadable image, replaced") for path in unreadable]
                problems += met
                state.unreadable += len(met)
                if ranks.is_main:
                    _report_problems(out, met)
            evaluation = _maybe_log_and_save(
                out, config, models, state, held_out, autocast, ranks, data_config
            )
            last_eval = evaluation or last_eval
            advance()
    return PretrainReport(out, state.step, last_eval, [str(problem) for problem in problems])


def _seed_host_random(stream_seed: list[int]) -> None:
    """With workers=0 the views are drawn in this process, and timm's RandAugment draws from
    Python's `random` and NumPy's global generator (loader workers are seeded by torch):
    seeded here, a run repeats exactly whatever `workers` is."""
    seed = int(np.random.SeedSequence([*stream_seed, 2]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)


def _one_step(
    models: Models,
    settings: MplSettings,
    autocast: Autocast,
    device: torch.device,
    labelled_batch: tuple,
    unlabelled_batch: tuple | None,
    step: int,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    images, labels, *extra, failed = labelled_batch  # extra: a recipe's targets
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if models.recipe is not None:
        metrics = models.recipe.step(
            models.student, models.student_optimizer, images, labels, extra, autocast
        )
    elif unlabelled_batch is None:  # the baseline, or the MPL student's fine-tuning
        metrics = supervised_step(
            models.student, models.student_optimizer, images, labels, autocast
        )
    else:
        weak, strong, failed_unlabelled = unlabelled_batch
        failed = [*failed, *failed_unlabelled]
        batch = MplBatch(
            images, labels, weak.to(device, non_blocking=True), strong.to(device, non_blocking=True)
        )
        metrics = mpl_step(
            models.teacher,
            models.student,
            models.teacher_optimizer,
            models.student_optimizer,
            batch,
            settings,
            step,
            autocast,
            models.alignment,
        )
    for scheduler in models.schedulers:
        scheduler.step()
    if models.ema is not None:
        models.ema.update(_unwrap(models.student), step=step)
    return metrics, [path for joined in failed if joined for path in joined.split("|")]


def _create_model(
    backbone: str, init_checkpoint: Path | None, seed: int, **timm_options: object
) -> nn.Module:
    if not timm.is_model(backbone):
        raise FercacheError(f"unknown backbone '{backbone}': not a timm model name")
    torch.manual_seed(seed)
    if init_checkpoint is None:
        return timm.create_model(
            backbone, pretrained=False, num_classes=NUM_CLASSES, **timm_options
        )
    if not Path(init_checkpoint).is_file():
        raise FercacheError(f"{init_checkpoint}: no such checkpoint file")
    # timm loads a local file through the pretrained path and re-initialises a head whose
    # class count differs (an ImageNet head has 1000)
    return timm.create_model(
        backbone,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(init_checkpoint)},
        num_classes=NUM_CLASSES,
        **timm_options,
    )


def _build_training(
    student: nn.Module,
    teacher: nn.Module | None,
    config: PretrainConfig,
    ranks: Ranks,
    recipe: Recipe | None,
) -> Models:
    student_optimizer = (
        recipe.optimizer(student, ranks.world_size)
        if recipe
        else _optimizer(student, config.student_lr, config)
    )
    teacher_optimizer = _optimizer(teacher, config.teacher_lr, config) if teacher else None
    # the teacher's cosine ends with the MPL steps: it does not learn while the student fine-tunes
    teacher_factor = partial(_warmup_cosine, warmup=config.warmup_steps, total=config.mpl_steps)
    student_factor = (
        partial(_mpl_student_lr_factor, config=config)
        if teacher
        else partial(_warmup_cosine, warmup=config.warmup_steps, total=config.steps)
    )
    ema = (
        ModelEmaV3(student.to(ranks.device), decay=config.ema_decay)
        if config.ema_decay > 0
        else None
    )
    return Models(
        student=_placed(student, ranks),
        teacher=_placed(teacher, ranks) if teacher else None,
        student_optimizer=student_optimizer,
        teacher_optimizer=teacher_optimizer,
        schedulers=[
            torch.optim.lr_scheduler.LambdaLR(opt, factor)
            for opt, factor in (
                (student_optimizer, student_factor),
                (teacher_optimizer, teacher_factor),
            )
            if opt is not None
        ],
        ema=ema,
        recipe=recipe,
        alignment=(
            DistributionAlignment(NUM_CLASSES).to(ranks.device)
            if teacher and config.distribution_alignment
            else None
        ),
    )


def _optimizer(model: nn.Module, lr: float, config: PretrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _mpl_student_lr_factor(step: int, config: PretrainConfig) -> float:
    """The MPL student's lr / student_lr: 0 for `student_wait_steps` (Face2Exp / MPL practice:
    the teacher's pseudo labels mean nothing yet), warm-up and cosine over the MPL steps left,
    then a fresh cosine from `student_finetune_lr` over the fine-tuning steps (MPL's last
    stage: the student meets the labels themselves)."""
    wait, mpl_steps = config.student_wait_steps, config.mpl_steps
    if step < wait:
        return 0.0
    if step >= mpl_steps and config.student_finetune_steps > 0:
        finetune_scale = config.student_finetune_lr / config.student_lr
        return finetune_scale * _warmup_cosine(step - mpl_steps, 0, config.student_finetune_steps)
    return _warmup_cosine(step - wait, config.warmup_steps, mpl_steps - wait)


def _placed(model: nn.Module, ranks: Ranks) -> nn.Module:
    model = model.to(ranks.device).train()
    if ranks.world_size == 1:
        return model
    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _autocast(device: torch.device, enabled: bool) -> Autocast:
    if device.type == "cuda" and enabled:
        # bfloat16 needs no loss scaling, which keeps f = old - new free of scaler effects
        return partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _loader_options(config: PretrainConfig, ranks: Ranks) -> dict:
    workers = config.workers
    return {
        "num_workers": workers,
        "pin_memory": ranks.device.type == "cuda",
        "persistent_workers": workers > 0,
    }


def _labelled_batches(
    paths: list[Path],
    labels: np.ndarray,
    views: Views,
    config: PretrainConfig,
    stream_seed: list[int],
    ranks: Ranks,
    recipe: Recipe | None,
    targets: np.ndarray | None,
) -> Iterator:
    seed = int(np.random.SeedSequence(stream_seed).generate_state(1)[0])
    if recipe is None:
        sampler = BalancedBatchSampler(labels, NUM_CLASSES, config.batch_size, seed)
        dataset = LabelledDataset(paths, labels, views.weak)
    else:
        dataset, sampler = recipe.training_data(paths, labels, targets, views, seed)
    return iter(DataLoader(dataset, batch_sampler=sampler, **_loader_options(config, ranks)))


def _unlabelled_batches(
    paths: list[Path],
    views: Views,
    config: PretrainConfig,
    stream_seed: list[int],
    ranks: Ranks,
) -> Iterator:
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([*stream_seed, 1]).generate_state(1)[0])
    )
    # with replacement and a practically endless length: the loader never runs dry
    sampler = RandomSampler(range(len(paths)), True, 2**62, generator=generator)
    loader = DataLoader(
        UnlabelledDataset(paths, views),
        batch_size=config.mu * config.batch_size,
        sampler=sampler,
        drop_last=True,
        **_loader_options(config, ranks),
    )
    return iter(loader)


def _evaluation_loader(
    paths: list[Path], labels: np.ndarray, views: Views, workers: int
) -> DataLoader:
    dataset = LabelledDataset(paths, labels, views.evaluation)
    return DataLoader(dataset, batch_size=_EVAL_BATCH, num_workers=workers)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, autocast: Autocast
) -> dict[str, float]:
    """Accuracy and macro-F1 over the 8 classes (sklearn, ABAW definition) on `loader`."""
    was_training = model.training
    model.eval()
    predictions, truths = [], []
    for images, labels, _ in loader:
        with autocast():
            logits = model(images.to(device))
        predictions.append(logits.argmax(dim=1).cpu())
        truths.append(labels)
    model.train(was_training)
    predicted, truth = torch.cat(predictions).numpy(), torch.cat(truths).numpy()
    f1 = f1_score(truth, predicted, average="macro", labels=range(NUM_CLASSES), zero_division=0)
    return {"accuracy": float(accuracy_score(truth, predicted)), "f1": float(f1)}


def _accumulate(state: Progress, metrics: dict[str, torch.Tensor]) -> None:
    for key, value in metrics.items():
        state.window[key] = state.window[key] + value if key in state.window else value
    state.window_steps += 1


def _maybe_log_and_save(
    out: Path,
    config: PretrainConfig,
    models: Models,
    state: Progress,
    held_out: DataLoader,
    autocast: Autocast,
    ranks: Ranks,
    data_config: DataConfig,
) -> dict | None:
    """Log every `log_every`, evaluate every `eval_every`, checkpoint every
    `checkpoint_every` steps, and all three at the last step. A checkpoint step is also
    logged, so the saved feedback mean counts every step before it. The last MPL step before
    the student's fine-tuning is evaluated too: what MPL alone gave."""
    last = state.step == config.steps
    checkpoint = last or state.step % config.checkpoint_every == 0
    mpl_end = config.student_finetune_steps > 0 and state.step == config.mpl_steps
    evaluation = None
    if ranks.is_main and (last or mpl_end or state.step % config.eval_every == 0):
        evaluation = _evaluate_models(models, held_out, ranks.device, autocast)
    if ranks.is_main and (checkpoint or evaluation or state.step % config.log_every == 0):
        _append_metrics(out, config, models, state, evaluation)
    if ranks.is_main and checkpoint:
        _save_state(out / STATE_FILE, models, state, config)
        _export(out, config, models, data_config)
    if checkpoint:
        ranks.barrier()
    return evaluation


def _final_student(models: Models) -> nn.Module:
    return models.ema.module if models.ema is not None else _unwrap(models.student)


def _evaluate_models(
    models: Models, held_out: DataLoader, device: torch.device, autocast: Autocast
) -> dict[str, float]:
    figures = {
        f"student_{key}": value
        for key, value in evaluate(_final_student(models), held_out, device, autocast).items()
    }
    if models.teacher is not None:
        teacher = evaluate(_unwrap(models.teacher), held_out, device, autocast)
        figures |= {f"teacher_{key}": value for key, value in teacher.items()}
    return figures


def _append_metrics(
    out: Path,
    config: PretrainConfig,
    models: Models,
    state: Progress,
    evaluation: dict | None,
) -> None:
    window = {key: float(value) for key, value in state.window.items()}
    if "feedback" in window:
        state.feedback_sum += window["feedback"]
        state.feedback_count += state.window_steps
    record: dict = {"step": state.step, "recipe": config.recipe}
    record |= {key: value / state.window_steps for key, value in window.items()}
    if state.feedback_count:
        record["feedback_running_mean"] = state.feedback_sum / state.feedback_count
    record["lr_student"] = models.student_optimizer.param_groups[0]["lr"]
    if models.teacher_optimizer is not None:
        record["lr_teacher"] = models.teacher_optimizer.param_groups[0]["lr"]
    record["unreadable_images"] = state.unreadable
    if evaluation:
        record |= {f"heldout_{key}": value for key, value in evaluation.items()}
    with open(out / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    state.window, state.window_steps = {}, 0


def _start_run_dir(
    out: Path,
    config: PretrainConfig,
    labelled: list[Path],
    unlabelled: list[Path],
    data_config: DataConfig,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in (METRICS_FILE, PROBLEMS_FILE):
        (out / name).unlink(missing_ok=True)
    record = {
        "settings": config.to_json(),
        "labelled": [str(path) for path in labelled],
        "unlabelled": [str(path) for path in unlabelled],
        "model": model_config(config.backbone, data_config, config.recipe, **export_keys(config)),
    }
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _report_problems(out: Path, problems: list[Problem]) -> None:
    if problems:
        with open(out / PROBLEMS_FILE, "a") as handle:
            handle.writelines(f"{problem}\n" for problem in problems)


def _export(out: Path, config: PretrainConfig, models: Models, data_config: DataConfig) -> None:
    described = model_config(config.backbone, data_config, config.recipe, **export_keys(config))
    student = _final_student(models)
    exported = models.recipe.exported(student) if models.recipe else student
    export_model(exported, described, out / "student.safetensors")
    if models.teacher is not None:
        export_model(_unwrap(models.teacher), described, out / "teacher.safetensors")


def _save_state(path: Path, models: Models, state: Progress, config: PretrainConfig) -> None:
    saved = {
        "student": _unwrap(models.student).state_dict(),
        "student_optimizer": models.student_optimizer.state_dict(),
        "schedulers": [scheduler.state_dict() for scheduler in models.schedulers],
        "progress": [state.step, state.feedback_sum, state.feedback_count, state.unreadable],
        "settings": config.to_json(),
    }
    if models.teacher is not None:
        saved["teacher"] = _unwrap(models.teacher).state_dict()
        saved["teacher_optimizer"] = models.teacher_optimizer.state_dict()
    if models.ema is not None:
        saved["ema"] = models.ema.module.state_dict()
    if models.alignment is not None:
        saved["alignment"] = models.alignment.state_dict()
    write_atomically(path, lambda tmp: torch.save(saved, tmp), "the training state")


def _load_state(path: Path, models: Models) -> Progress:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    _unwrap(models.student).load_state_dict(saved["student"])
    models.student_optimizer.load_state_dict(saved["student_optimizer"])
    if models.teacher is not None:
        _unwrap(models.teacher).load_state_dict(saved["teacher"])
        models.teacher_optimizer.load_state_dict(saved["teacher_optimizer"])
    if models.ema is not None:
        models.ema.module.load_state_dict(saved["ema"])
    if models.alignment is not None:
        models.alignment.load_state_dict(saved["alignment"])
    for scheduler, scheduler_state in zip(models.schedulers, saved["schedulers"], strict=True):
        scheduler.load_state_dict(scheduler_state)
    step, feedback_sum, feedback_count, unreadable = saved["progress"]
    return Progress(int(step), float(feedback_sum), int(feedback_count), int(unreadable))


def _trim_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint: they are about to be logged again."""
    if path.is_file():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        path.write_text("".join(f"{line}\n" for line in kept))

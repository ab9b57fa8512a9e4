"""The pretraining run: sources → balanced / unlabelled loaders → steps → metrics, checkpoints,
exported student (and teacher). Runs single-process or under torchrun (DDP; gloo on CPU, NCCL
on GPU); rank 0 writes every file."""

import contextlib
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fercache.backbone.network import ROLE_KEY, DataConfig
from fercache.data.tasks import EXPR_CLASSES
from fercache.distributed import Ranks, distributed
from fercache.errors import FercacheError
from fercache.outputs import remove_dead_leftovers, write_text_atomically
from fercache.pretrain.config import CONFIG_HEADER, PretrainConfig, resumed_config
from fercache.pretrain.export import export_model, model_config
from fercache.pretrain.recipe_base import Autocast, Recipe, StepBatch, create_network
from fercache.pretrain.registry import recipe_for
from fercache.pretrain.sampling import (
    SeededBatches,
    UniformBatches,
    check_every_class,
    holdout_split,
)
from fercache.pretrain.sources import (
    LabelledImages,
    Problem,
    UnlabelledImages,
    labels_summary,
    other_from_videos_only,
    per_class_cap,
    read_unlabelled,
    summary_lines,
)
from fercache.pretrain.views import (
    LabelledDataset,
    SeededViews,
    UnlabelledDataset,
    Views,
    build_views,
    data_config_of,
)
from fercache.progress import progress_bar, progress_line
from fercache.resume import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    holds_run,
    read_checkpoint,
    resumed_settings,
    write_checkpoint,
    write_config,
    write_metrics,
    writing_run,
)

NUM_CLASSES = len(EXPR_CLASSES)
PROBLEMS_FILE = "problems.txt"  # sources left out and unreadable images, one per line
SOURCES_FILE = "sources.json"  # the labelled and unlabelled sources the run was given
LABELS_FILE = "labels.json"  # each source's numbering and class counts, the per-class cap
_EVAL_BATCH = 128
_NO_STEP = 2**62  # `_earliest`: no diverged step


@dataclass
class Progress:
    """Counters that survive a restart (besides the weights), and the metrics of the steps
    since the last log line, summed as device tensors so that logging needs no sync per step
    (and whether each step's were finite)."""

    step: int = 0
    feedback_sum: float = 0.0
    feedback_count: int = 0
    unreadable: int = 0
    window: dict[str, torch.Tensor] = field(default_factory=dict)
    window_steps: int = 0
    finite: list[torch.Tensor] = field(default_factory=list)  # per step since the last line
    checkpointed: int = 0  # the step of the last checkpoint written or resumed from
    history: list[dict] = field(default_factory=list)  # the records of metrics.jsonl
    problems: list[str] = field(default_factory=list)  # the lines of problems.txt
    logged: dict[str, float] = field(default_factory=dict)  # the last log window's means
    evaluated_at: float = field(default_factory=time.monotonic)


@dataclass
class PretrainReport:
    """What a call of `pretrain` did."""

    out: Path
    steps: int  # the run's step count when the call ended
    evaluation: dict[str, float]  # held-out figures of the last evaluation (empty if none ran)
    problems: list[str]  # entries left out and unreadable images met, each naming its file
    labels: dict = field(default_factory=dict)  # what labels.json holds


def pretrain(
    labelled: list[Path],
    unlabelled: list[Path],
    out: Path,
    config: PretrainConfig,
    *,
    resume: bool = False,
    init_checkpoint: Path | None = None,
    pretrained: str | None = None,
    progress: bool = True,
) -> PretrainReport:
    """Train (or continue) a phase-1 run in `out` up to `config.steps` steps."""
    out = Path(out)
    recipe = recipe_for(config)
    _check_resumable(out, config, resume)
    with distributed() as ranks, writing_run(out, ranks.is_main):
        return _run(
            recipe,
            labelled,
            unlabelled,
            out,
            config,
            ranks,
            resume,
            init_checkpoint,
            progress,
            pretrained=pretrained,
        )


def _check_resumable(out: Path, config: PretrainConfig, resume: bool) -> None:
    """A new run needs a folder without one; a resumed run keeps its saved settings but for
    those `PretrainConfig.MAY_CHANGE_ON_RESUME` names."""
    if not resume:
        if holds_run(out):
            raise FercacheError(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out"
            )
        return
    if not holds_run(out):
        raise FercacheError(
            f"{out / CHECKPOINT_FILE}: missing, so {out} holds no run to resume; drop --resume"
        )
    saved = resumed_config(out, None)
    resumed_settings(
        saved.to_json(), config.to_json(), PretrainConfig.MAY_CHANGE_ON_RESUME, out / CONFIG_FILE
    )


def _run(
    recipe: Recipe,
    labelled: list[Path],
    unlabelled: list[Path],
    out: Path,
    config: PretrainConfig,
    ranks: Ranks,
    resume: bool,
    init_checkpoint: Path | None,
    progress: bool,
    pretrained: str | None = None,
) -> PretrainReport:
    labelled_images, unlabelled_images, summary = _read_sources(
        recipe, labelled, unlabelled, config
    )
    labels = np.asarray(labelled_images.labels)
    train_index, held_index = holdout_split(
        labels, labelled_images.videos, config.holdout_fraction, config.seed
    )
    held_index = held_index[labels[held_index] >= 0]  # frames without EXPR (EMMA): not scored
    if recipe.balanced:  # before any file of the run is written
        sources = ", ".join(map(str, labelled))
        check_every_class(labels[train_index], NUM_CLASSES, f"the training images of {sources}")

    recipe.build(
        partial(create_network, config.backbone, init_checkpoint, pretrained=pretrained), ranks
    )
    data_config = data_config_of(recipe.student(), config.image_size)
    views = _views(config, data_config)
    state = _load_state(out, recipe) if resume else _new_state(labelled_images, unlabelled_images)
    if ranks.is_main:
        _start_run_dir(out, config, labelled, unlabelled, state)
        _write_label_summary(out, summary, progress)
    ranks.barrier()

    # each rank its own streams; a resumed run takes them up at its step (docs: "Resume")
    stream_seed = [config.seed, ranks.rank]
    labelled_batches = _labelled_batches(
        recipe, labelled_images, train_index, views, config, stream_seed, ranks, state.step
    )
    unlabelled_drawn = sum(map(recipe.draws_unlabelled, range(state.step)))
    unlabelled_batches = (
        _unlabelled_batches(
            unlabelled_images.paths, views, config, stream_seed, ranks, unlabelled_drawn
        )
        if unlabelled_images
        else None
    )
    held_out = _evaluation_loader(
        [labelled_images.paths[i] for i in held_index], labels[held_index], views, config.workers
    )
    autocast = _autocast(ranks.device, config.amp)
    last_eval: dict[str, float] = {}
    with progress_bar("pretraining", config.steps, progress and ranks.is_main) as advance:
        advance(state.step)
        while state.step < config.steps:
            with_unlabelled = unlabelled_batches is not None and recipe.draws_unlabelled(state.step)
            labelled_batch = next(labelled_batches)
            unlabelled_batch = next(unlabelled_batches) if with_unlabelled else None
            # the step's own draws (dropout, drop-path, token masks) from (seed, rank, step)
            # alone: a resumed run repeats them, and the views' seeding cannot shift them
            torch.manual_seed(_seed_of([*stream_seed, 2, state.step]))
            metrics, unreadable = _one_step(
                recipe, ranks.device, autocast, labelled_batch, unlabelled_batch, state.step
            )
            state.step += 1
            _accumulate(state, metrics)
            if unreadable:
                _note_unreadable(out, state, unreadable, ranks.is_main)
            evaluation = _maybe_log_and_save(
                out, config, recipe, state, held_out, autocast, ranks, data_config
            )
            if evaluation:
                last_eval = evaluation
                progress_line(_evaluation_line(state, config.steps, last_eval), progress)
            advance()
    return PretrainReport(out, state.step, last_eval, state.problems, summary)


def _read_sources(
    recipe: Recipe, labelled: list[Path], unlabelled: list[Path], config: PretrainConfig
) -> tuple[LabelledImages, UnlabelledImages | None, dict]:
    """The labelled images the run uses (Other from the videos only, capped per class), its
    unlabelled images (`_unlabelled_pool`) and what `labels.json` holds."""
    labelled_images = recipe.read(labelled)
    if config.other_from_videos_only:
        labelled_images = other_from_videos_only(labelled_images)
    labelled_images, over_cap = per_class_cap(labelled_images, config.per_class_cap, config.seed)
    unlabelled_images = _unlabelled_pool(recipe, unlabelled, labelled_images, over_cap)
    summary = labels_summary(
        labelled_images, over_cap, config.per_class_cap, recipe.uses_unlabelled
    )
    return labelled_images, unlabelled_images, summary


def _views(config: PretrainConfig, data_config: DataConfig) -> Views:
    return build_views(
        data_config,
        config.resize_ratio,
        config.randaugment,
        config.erasing_prob,
        grayscale_prob=config.grayscale_prob,
    )


def _new_state(labelled: LabelledImages, unlabelled: UnlabelledImages | None) -> Progress:
    """A new run's progress: the sources' problems are its first."""
    state = Progress()
    sources_problems = labelled.problems + (unlabelled.problems if unlabelled else [])
    state.problems = [str(problem) for problem in sources_problems]
    return state


def _write_label_summary(out: Path, summary: dict, progress: bool) -> None:
    """`labels.json`, and its lines printed."""
    text = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    write_text_atomically(out / LABELS_FILE, text, "the label summary")
    for line in summary_lines(summary):
        progress_line(line, progress)


def _note_unreadable(out: Path, state: Progress, unreadable: list[str], is_main: bool) -> None:
    """Count the images a step could not read and list them in `problems.txt`."""
    met = [Problem(path, "unreadable image, replaced") for path in unreadable]
    state.problems += [str(problem) for problem in met]
    state.unreadable += len(met)
    if is_main:
        _write_problems(out, state.problems)


def _unlabelled_pool(
    recipe: Recipe, sources: list[Path], labelled: LabelledImages, over_cap: LabelledImages
) -> UnlabelledImages | None:
    """The unlabelled images of a recipe that reads them: its sources, and the labelled still
    images over `per_class_cap` (Yu et al. §4.1), which suffice without a source. A recipe
    without unlabelled images leaves the latter out (one problem counts them)."""
    over = len(over_cap.paths)
    if not recipe.uses_unlabelled:
        if over:
            note = f"{over} still images over per_class_cap left out: the recipe reads no "
            labelled.problems.append(Problem("labelled sources", note + "unlabelled images"))
        return None
    pool = read_unlabelled(sources) if sources or not over else UnlabelledImages()
    if over:
        note = f"{over} still images over per_class_cap joined the unlabelled images"
        labelled.problems.append(Problem("labelled sources", note))
        pool.paths += over_cap.paths
    return pool


def _evaluation_line(state: Progress, total: int, evaluation: dict[str, float]) -> str:
    """One line per held-out evaluation: the step, the figures of the last log window, the
    held-out scores, and the time since the previous evaluation."""
    now = time.monotonic()
    seconds, state.evaluated_at = now - state.evaluated_at, now
    losses = "  ".join(f"{key} {value:.3f}" for key, value in state.logged.items())
    scores = "  ".join(f"{key} {value:.3f}" for key, value in evaluation.items())
    return f"step {state.step}/{total}  {losses}  held-out {scores}  {seconds:.1f} s"


def _seed_of(entropy: list[int]) -> int:
    """A seed of the stream `entropy` names: (seed, rank), then which stream (and step)."""
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _one_step(
    recipe: Recipe,
    device: torch.device,
    autocast: Autocast,
    labelled_batch: tuple,
    unlabelled_batch: tuple | None,
    step: int,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    images, labels, *extra, failed = labelled_batch  # extra: a recipe's targets
    weak = strong = None
    if unlabelled_batch is not None:
        weak, strong, failed_unlabelled = unlabelled_batch
        failed = [*failed, *failed_unlabelled]
        weak, strong = weak.to(device, non_blocking=True), strong.to(device, non_blocking=True)
    batch = StepBatch(
        images.to(device, non_blocking=True),
        labels.to(device, non_blocking=True),
        extra[0].to(device, non_blocking=True) if extra else None,
        weak,
        strong,
    )
    metrics = recipe.step(batch, step, autocast)
    return metrics, [path for joined in failed if joined for path in joined.split("|")]


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
    recipe: Recipe,
    images: LabelledImages,
    index: np.ndarray,
    views: Views,
    config: PretrainConfig,
    stream_seed: list[int],
    ranks: Ranks,
    start: int,
) -> Iterator:
    """The training batches of the labelled images at `index`, drawn as the recipe draws them,
    from batch `start` on."""
    paths = [images.paths[i] for i in index]
    targets = np.asarray(images.targets)[index] if images.targets else None
    dataset, batches = recipe.training_data(
        paths, np.asarray(images.labels)[index], targets, views, _seed_of(stream_seed), start
    )
    return _batches(dataset, batches, _seed_of([*stream_seed, 3]), start, config, ranks)


def _unlabelled_batches(
    paths: list[Path],
    views: Views,
    config: PretrainConfig,
    stream_seed: list[int],
    ranks: Ranks,
    start: int,
) -> Iterator:
    """The unlabelled batches (uniform, with replacement) from batch `start` on."""
    size = config.mu * config.batch_size
    batches = UniformBatches(len(paths), size, _seed_of([*stream_seed, 1]), start)
    dataset = UnlabelledDataset(paths, views)
    return _batches(dataset, batches, _seed_of([*stream_seed, 4]), start, config, ranks)


def _batches(
    dataset: Dataset,
    batches: Iterable[list[int]],
    view_seed: int,
    start: int,
    config: PretrainConfig,
    ranks: Ranks,
) -> Iterator:
    """The loaded batches of `dataset` at the indices `batches` gives (its batch `start` on),
    each image's views drawn from its own seed (`SeededBatches`)."""
    seeded = SeededBatches(batches, view_seed, start)
    options = _loader_options(config, ranks)
    return iter(DataLoader(SeededViews(dataset), batch_sampler=seeded, **options))


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
    state.finite.append(torch.stack([value.float() for value in metrics.values()]).isfinite().all())


def _maybe_log_and_save(
    out: Path,
    config: PretrainConfig,
    recipe: Recipe,
    state: Progress,
    held_out: DataLoader,
    autocast: Autocast,
    ranks: Ranks,
    data_config: DataConfig,
) -> dict | None:
    """Log every `log_every`, evaluate every `eval_every`, checkpoint every
    `checkpoint_every` steps, and all three at the last step. A checkpoint step is also
    logged, so the saved feedback mean counts every step before it. The recipe may ask for
    more evaluations (the end of a stage). A diverged run stops before any of it."""
    last = state.step == config.steps
    checkpoint = last or state.step % config.checkpoint_every == 0
    evaluates = last or recipe.evaluates_after(state.step) or state.step % config.eval_every == 0
    if not (checkpoint or evaluates or state.step % config.log_every == 0):
        return None
    _stop_if_diverged(out, recipe, state, ranks)
    evaluation = None
    if ranks.is_main:
        if evaluates:
            evaluation = _evaluate_networks(recipe, held_out, ranks.device, autocast)
        _log_metrics(out, config, recipe, state, evaluation)
        if checkpoint:
            _save_state(out, recipe, state)
            _export(out, config, recipe, data_config)
    state.window, state.window_steps, state.finite = {}, 0, []
    if checkpoint:
        state.checkpointed = state.step
        ranks.barrier()
    return evaluation


def _stop_if_diverged(out: Path, recipe: Recipe, state: Progress, ranks: Ranks) -> None:
    """A FercacheError when a loss of a step since the last log line was inf or NaN, or the
    weights are no longer finite (a finite loss can take them there), naming the first such
    step and what the folder keeps: nothing of a diverged step is logged, scored or saved.
    Every process checks its own losses and all stop at the same step (the weights are the
    same on every process)."""
    finite = torch.stack(state.finite).tolist()  # one device sync per log line
    first = state.step - len(finite) + 1
    step = _earliest([first + i for i, ok in enumerate(finite) if not ok], ranks)
    if step is not None:
        sums = {key: float(value) for key, value in state.window.items()}
        losses = [f"{key} {value}" for key, value in sums.items() if not math.isfinite(value)]
        more = f" and {len(losses) - 1} more" if len(losses) > 1 else ""
        when = f"at step {step}"
        what = f"loss {losses[0]}{more}" if losses else "a loss of another process was inf or NaN"
    else:
        networks = [name for name, net in recipe.exported().items() if not _finite_weights(net)]
        if not networks:
            return
        when = f"by step {state.step}"  # weights are checked at log lines only
        what = f"the weights of the {' and '.join(networks)} are not finite"
    kept = (
        f"{out} keeps its last checkpoint, step {state.checkpointed} (last.pt and the exported "
        "weights)"
        if state.checkpointed
        else f"{out} holds no weights (no checkpoint was written)"
    )
    raise FercacheError(
        f"pretraining diverged {when}: {what}; {kept}. Lower the learning rates and pretrain "
        "into a new --out (--resume would diverge again)"
    )


def _earliest(steps: list[int], ranks: Ranks) -> int | None:
    """The first of `steps` over every process (None: none has one)."""
    first = steps[0] if steps else _NO_STEP
    if ranks.world_size > 1:
        shared = torch.tensor(first, device=ranks.device)
        dist.all_reduce(shared, op=dist.ReduceOp.MIN)
        first = int(shared.item())
    return None if first == _NO_STEP else first


def _finite_weights(network: nn.Module) -> bool:
    tensors = [t for t in network.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def _evaluate_networks(
    recipe: Recipe, held_out: DataLoader, device: torch.device, autocast: Autocast
) -> dict[str, float]:
    return {
        f"{name}_{key}": value
        for name, network in recipe.evaluated().items()
        for key, value in evaluate(network, held_out, device, autocast).items()
    }


def _log_metrics(
    out: Path,
    config: PretrainConfig,
    recipe: Recipe,
    state: Progress,
    evaluation: dict | None,
) -> None:
    window = {key: float(value) for key, value in state.window.items()}
    if "feedback" in window:
        state.feedback_sum += window["feedback"]
        state.feedback_count += state.window_steps
    record: dict = {"step": state.step, "recipe": config.recipe}
    state.logged = {key: value / state.window_steps for key, value in window.items()}
    record |= state.logged
    if state.feedback_count:
        record["feedback_running_mean"] = state.feedback_sum / state.feedback_count
    record |= {f"lr_{name}": lr for name, lr in recipe.learning_rates().items()}
    record["unreadable_images"] = state.unreadable
    if evaluation:
        record |= {f"heldout_{key}": value for key, value in evaluation.items()}
    state.history.append(record)
    write_metrics(out, state.history)


def _start_run_dir(
    out: Path, config: PretrainConfig, labelled: list[Path], unlabelled: list[Path], state: Progress
) -> None:
    """The run folder as the checkpoint has it: settings, sources, metrics, problems (a resumed
    run drops what was logged after its checkpoint: it is about to be logged again)."""
    remove_dead_leftovers(out)  # checkpoints and weights a killed run left half-written
    write_config(out, config.to_json(), CONFIG_HEADER)
    sources = {
        "labelled": [str(path) for path in labelled],
        "unlabelled": [str(path) for path in unlabelled],
    }
    write_text_atomically(out / SOURCES_FILE, json.dumps(sources, indent=2) + "\n", "sources")
    write_metrics(out, state.history)
    _write_problems(out, state.problems)


def _write_problems(out: Path, problems: list[str]) -> None:
    text = "".join(f"{problem}\n" for problem in problems)
    write_text_atomically(out / PROBLEMS_FILE, text, "the list of problems")


def _export(out: Path, config: PretrainConfig, recipe: Recipe, data_config: DataConfig) -> None:
    described = model_config(config.backbone, data_config, config.recipe, **recipe.export_keys())
    for name, network in recipe.exported().items():
        # the role lets a loader refuse a teacher passed where the student is meant
        export_model(network, described | {ROLE_KEY: name}, out / f"{name}.safetensors")


def _save_state(out: Path, recipe: Recipe, state: Progress) -> None:
    write_checkpoint(
        out,
        {
            "recipe": recipe.state_dict(),
            "progress": [state.step, state.feedback_sum, state.feedback_count, state.unreadable],
            "history": state.history,
            "problems": state.problems,
        },
    )


def _load_state(out: Path, recipe: Recipe) -> Progress:
    saved = read_checkpoint(out, ("recipe", "progress", "history", "problems"))
    try:
        recipe.load_state_dict(saved["recipe"])
        step, feedback_sum, feedback_count, unreadable = saved["progress"]
        history, problems = list(saved["history"]), list(saved["problems"])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise FercacheError(
            f"{out / CHECKPOINT_FILE}: not a checkpoint of this run's recipe and backbone "
            f"({str(error).splitlines()[0]}); start the run again without --resume"
        ) from error
    return Progress(
        int(step),
        float(feedback_sum),
        int(feedback_count),
        int(unreadable),
        history=history,
        problems=problems,
        checkpointed=int(step),
    )

"""`fercache demo`: the whole pipeline end to end on a synthetic tree, small enough for a CPU.

Synthetic tree → three phase-1 students, each trained on the data its row of Yu et al.'s
Table 1 ticks (supervised on the video frames; + Meta Pseudo Labels on the unlabelled faces;
+ the labelled still images) → extraction of each into a cache → temporal training on the last
cache → predict → smooth (window 30) → evaluate. Every stage calls the same plain function its
command calls, with the same settings the report lists as shell commands, so any row can be
rerun alone. The result is the analogue of that table on the synthetic validation split
(identities never seen in training).
"""

import json
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from itertools import pairwise
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fercache.errors import FercacheError
from fercache.experiments.references import SOURCES, hog_available, hog_references
from fercache.features.extract import ExtractOptions, extract
from fercache.outputs import write_atomically, write_text_atomically
from fercache.predictions.evaluate import evaluate, write_report
from fercache.predictions.predict import PredictOptions, predict
from fercache.predictions.smooth import smooth_predictions
from fercache.pretrain import load_config, pretrain
from fercache.pretrain.registry import RECIPES
from fercache.resume import read_metrics
from fercache.synth import SynthConfig, generate
from fercache.temporal.loop import TrainRequest, train
from fercache.temporal.run_files import read_summary

MARKER = "demo.json"
REFERENCES_FILE = "references.json"  # HOG + logistic regression per labelled source ({} without)
REFERENCES_MISSING = (
    "reference learners skipped: HOG needs scikit-image (pip install scikit-image; make "
    "installs it)"
)
OWN_FOLDERS = ("runs", "cache", "pred")  # what an earlier demo wrote besides data/ (synth --force)

# Yu et al., Table 1: Aff-Wild2 validation macro-F1 % of each row
PAPER_ROWS = (
    ("Baseline: supervised on the video frames, per frame", 23.00),
    ("SSL: + unlabelled faces ({ssl_recipe}), per frame", 39.96),
    ("+ labelled still images, per frame", 40.57),
    ("+ temporal encoder", 42.77),
    ("+ post-processing (window-30 vote)", 44.43),
)


def paper_rows(ssl_recipe: str) -> tuple[tuple[str, float], ...]:
    """PAPER_ROWS with row 2 naming the semi-supervised recipe that made it."""
    return tuple((name.format(ssl_recipe=ssl_recipe), f1) for name, f1 in PAPER_ROWS)


def ssl_recipes() -> list[str]:
    """The registered recipes that learn from the unlabelled faces: any of them can be row 2's."""
    return [name for name, recipe in RECIPES.items() if recipe.uses_unlabelled]


@dataclass(frozen=True)
class PhaseOneRun:
    """One phase-1 student: its run and cache folder name, and the data it learns from."""

    name: str
    unlabelled_faces: bool  # semi-supervised (DemoSettings.ssl_recipe) or supervised
    still_images: bool  # the labelled still-image pool beside the video frames

    def recipe(self, settings: "DemoSettings") -> str:
        return settings.ssl_recipe if self.unlabelled_faces else "supervised"


PHASE_ONE = (
    PhaseOneRun("baseline", unlabelled_faces=False, still_images=False),
    PhaseOneRun("ssl", unlabelled_faces=True, still_images=False),
    PhaseOneRun("ssl-extra", unlabelled_faces=True, still_images=True),
)
# the PRED file (and its evaluation JSON) of each row under OUT/pred/
ROW_FILES = (*(run.name for run in PHASE_ONE), "temporal", "temporal-smoothed")


@dataclass(frozen=True)
class DemoSettings:
    """Every size of the demo in one place; the default is sized for 2 CPU cores (results/demo.md
    gives the measured time and the ablations behind each value).
    """

    # 27 training and 13 validation videos: with 16 (11 and 5) the baseline's validation F1
    # spread over seeds was several times the gains the table looks for (results/demo.md)
    videos: int = 40
    frames: int = 300
    labelled_pool: int = 800
    unlabelled_pool: int = 3000
    # timm's smallest ResNet: a phase-1 step costs far less than resnet10t's at 48 px, which is
    # what lets three students train within the demo's budget (results/demo.md)
    backbone: str = "test_resnet"
    image_size: int = 48
    # One phase-1 recipe for every row, as the paper's rows share their ResNet-50's schedule:
    # AdamW with warm-up + cosine (one-cycle), label smoothing and batch 64 learn in a few
    # hundred steps where the paper's SGD schedule (100 k steps, configs/pretrain.yaml) does
    # not (results/synthetic.md, results/demo.md)
    pretrain_steps: int = 300  # the same budget for every student
    optimizer: str = "adamw"
    # every network's peak lr (the baseline, teachers and students); chosen on the training
    # videos' frames scored by the still-image learner, never the validation people
    # (results/demo.md)
    pretrain_lr: float = 0.01
    batch_size: int = 64  # labelled images per step, class-balanced
    warmup_fraction: float = 0.3  # of the steps, the lr's linear warm-up (one-cycle's share)
    label_smoothing: float = 0.1
    weight_decay: float = 0.05
    # half the labelled images grey: with a few dozen labelled people, colour tells who as much
    # as what; chosen on the training videos' frames, people the still images do not show
    # (results/synthetic.md)
    grayscale_prob: float = 0.5
    # row 2's semi-supervised recipe: the variant that scored best on held-out training
    # videos, never the validation people (results/ssl-variants.md)
    ssl_recipe: str = "pseudo-label"
    mu: int = 1  # unlabelled images per labelled one: cheaper semi-supervised steps
    # the confidence a pseudo label needs: below the 0.9125 that label smoothing 0.1 lets a
    # network reach (FixMatch's 0.95 would mask every unlabelled image; results/demo.md)
    ssl_threshold: float = 0.9
    # Of pretrain_steps, the SSL students' last ones fine-tuned on the labels at pretrain_lr
    # (MPL's last stage); 0: none
    ssl_finetune_steps: int = 0
    temporal_epochs: int = 15
    # a small encoder with heavy input dropout: a few dozen training videos (people) are few
    # for a transformer to learn time from rather than who is in the video; lr 3e-4 (the
    # trainer's default) was chosen over 1e-3 on held-out *training* videos (results/demo.md)
    temporal_overrides: tuple[str, ...] = (
        "width=128",
        "layers=2",
        "ff_width=512",
        "batch_size=8",
        "lr=0.0003",
        "input_dropout=0.5",
        "dropout=0.3",
    )
    window: int = 30
    workers: int = 1  # DataLoader processes: one beside the main process on 2 cores

    def __post_init__(self) -> None:
        if self.ssl_recipe not in ssl_recipes():
            raise FercacheError(
                f"the demo's SSL recipe '{self.ssl_recipe}' is none of {', '.join(ssl_recipes())}"
            )
        if self.ssl_finetune_steps and self.ssl_recipe != "mpl":
            raise FercacheError(
                "the SSL student's fine-tuning steps are Meta Pseudo Labels' last stage: they "
                f"need the mpl recipe, not {self.ssl_recipe}"
            )
        if not 0 <= self.ssl_finetune_steps < self.pretrain_steps:
            raise FercacheError(
                f"the SSL student's fine-tuning steps ({self.ssl_finetune_steps}) must be fewer "
                f"than the phase-1 steps ({self.pretrain_steps}): at least one MPL step remains"
            )

    @classmethod
    def small(cls) -> "DemoSettings":
        """A reduced run for the test suite (well under a minute)."""
        return cls(
            videos=6,
            frames=96,
            labelled_pool=80,
            unlabelled_pool=64,
            image_size=32,
            pretrain_steps=4,
            batch_size=16,
            temporal_epochs=2,
            workers=0,
        )

    def synth_config(self, seed: int) -> SynthConfig:
        """The demo's synthetic tree at `seed`."""
        return SynthConfig(
            videos=self.videos,
            frames=self.frames,
            seed=seed,
            labelled_pool=self.labelled_pool,
            unlabelled_pool=self.unlabelled_pool,
        )

    def pretrain_overrides(self, recipe: str) -> tuple[str, ...]:
        """The `--set` values of one phase-1 run. A semi-supervised run ramps its unlabelled
        term in over all its steps and drops random erasing: at 48 px an erased third of a face
        leaves next to nothing to learn a pseudo label from."""
        steps = self.pretrain_steps
        return (
            f"image_size={self.image_size}",
            f"optimizer={self.optimizer}",
            f"batch_size={self.batch_size}",
            f"warmup_steps={round(self.warmup_fraction * steps)}",
            f"label_smoothing={self.label_smoothing}",
            f"weight_decay={self.weight_decay}",
            f"grayscale_prob={self.grayscale_prob}",
            f"student_lr={self.pretrain_lr}",
            *(self._ssl_overrides(recipe) if recipe != "supervised" else ()),
            f"eval_every={steps}",
            f"log_every={max(1, steps // 10)}",
            f"checkpoint_every={steps}",
            f"workers={self.workers}",
        )

    def _ssl_overrides(self, recipe: str) -> tuple[str, ...]:
        mpl_steps = self.pretrain_steps - self.ssl_finetune_steps
        mpl = (f"teacher_lr={self.pretrain_lr}",) if recipe == "mpl" else ()
        finetuning = (
            (
                f"student_finetune_steps={self.ssl_finetune_steps}",
                f"student_finetune_lr={self.pretrain_lr}",
            )
            if self.ssl_finetune_steps and recipe == "mpl"
            else ()
        )
        return (
            *mpl,
            f"mu={self.mu}",
            f"threshold={self.ssl_threshold}",
            f"uda_steps={mpl_steps}",
            "erasing_prob=0",
            *finetuning,
        )


@dataclass(frozen=True)
class Row:
    """One line of the table: what it measures, the paper's figure and this run's."""

    name: str
    paper_f1: float
    f1: float
    pred: Path
    commands: tuple[str, ...]


@dataclass(frozen=True)
class DemoResult:
    rows: tuple[Row, ...]
    report: Path
    chart: Path
    seconds: dict[str, float]
    # HOG + logistic regression on each labelled source (fercache.experiments.references); empty
    # without scikit-image
    references: dict[str, float] = field(default_factory=dict)


@dataclass
class _Stages:
    """Runs and times the stages, announcing each on the console."""

    console: Console
    seconds: dict[str, float] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)

    def run(self, name: str, command: str, work: Callable[[], object]) -> None:
        self.console.rule(f"[bold]{name}")
        self.console.print(f"$ {command}", highlight=False, soft_wrap=True)
        self.commands.append(command)
        started = time.perf_counter()
        work()
        self.seconds[name] = round(time.perf_counter() - started, 1)


def run_demo(
    out: Path, seed: int = 0, settings: DemoSettings = DemoSettings(), progress: bool = True
) -> DemoResult:
    """Run every stage into `out` and write `out/report.md` and `out/report.png`."""
    out = Path(out)
    _prepare(out)
    marker = json.dumps({"seed": seed, "settings": asdict(settings)}, indent=2)
    write_text_atomically(out / MARKER, marker, "the demo marker")
    stages = _Stages(Console(quiet=not progress))
    data = out / "data"
    _synthesize(stages, data, seed, settings, progress)
    references = _references(stages, data)
    text = json.dumps(references, indent=2) + "\n"
    write_text_atomically(out / REFERENCES_FILE, text, "the reference figures")
    caches = {run.name: _phase_one(stages, out, run, seed, settings, progress) for run in PHASE_ONE}
    temporal = _temporal(stages, out, caches[PHASE_ONE[-1].name], seed, settings, progress)
    rows = _rows(stages, out, caches, temporal, settings, progress)
    report, chart = write_demo_report(out, rows, seed, settings, stages, references)
    return DemoResult(rows, report, chart, stages.seconds, references)


def _prepare(out: Path) -> None:
    """`out` must be missing, empty, or an earlier demo's folder (whose outputs are replaced)."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FercacheError(
                f"{out} is not empty and holds no earlier demo ({MARKER}): choose another "
                "--out (or DEMO_DIR=... for make demo), or delete that folder yourself"
            )
        for name in OWN_FOLDERS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _command(*parts: object) -> str:
    return "fercache " + " ".join(shlex.quote(str(part)) for part in parts)


def _sets(overrides: tuple[str, ...]) -> list[str]:
    return [item for value in overrides for item in ("--set", value)]


def _synthesize(
    stages: _Stages, data: Path, seed: int, settings: DemoSettings, progress: bool
) -> None:
    config = settings.synth_config(seed)
    command = _command(
        "synth",
        data,
        "--videos",
        settings.videos,
        "--frames",
        settings.frames,
        "--labelled",
        settings.labelled_pool,
        "--unlabelled",
        settings.unlabelled_pool,
        "--seed",
        seed,
        "--force",
    )
    stages.run("synthetic tree", command, lambda: generate(data, config, progress, force=True))


def _references(stages: _Stages, data: Path) -> dict[str, float]:
    """HOG + logistic regression on the tree's labelled sources, scored on every labelled
    validation frame (the frames the rows are scored on)."""
    if not hog_available():
        stages.console.print(REFERENCES_MISSING)
        return {}
    figures: dict[str, float] = {}
    code = "from fercache.experiments.references import hog_references; "
    code += f"print(hog_references({str(data)!r}, None))"
    command = f"python -c {shlex.quote(code)}"
    stages.run("reference learners", command, lambda: figures.update(hog_references(data, None)))
    return figures


def _phase_one(
    stages: _Stages,
    out: Path,
    phase: PhaseOneRun,
    seed: int,
    settings: DemoSettings,
    progress: bool,
) -> Path:
    """Pretrain one student, then extract its cache; return the cache folder."""
    name, recipe = phase.name, phase.recipe(settings)
    data, run, cache = out / "data", out / "runs" / name, out / "cache" / name
    # Yu et al.'s rows: Aff-Wild2 training frames, + unlabelled faces, + labelled still images
    labelled = [data, *([data / "pools" / "labelled.csv"] if phase.still_images else [])]
    unlabelled = [data / "pools" / "unlabelled"] if phase.unlabelled_faces else []
    overrides = (*settings.pretrain_overrides(recipe), f"seed={seed}")
    config = load_config(
        None,
        list(overrides),
        backbone=settings.backbone,
        steps=settings.pretrain_steps,
        recipe=recipe,
    )
    command = _command(
        "pretrain",
        "--recipe",
        recipe,
        "--labelled",
        *labelled,
        *(["--unlabelled", *unlabelled] if unlabelled else []),
        "--out",
        run,
        "--backbone",
        settings.backbone,
        "--steps",
        settings.pretrain_steps,
        *_sets(overrides),
    )
    stages.run(
        f"pretrain {name} ({recipe})",
        command,
        lambda: pretrain(labelled, unlabelled, run, config, progress=progress),
    )
    checkpoint = run / "student.safetensors"
    options = ExtractOptions(checkpoint=checkpoint, workers=settings.workers, progress=progress)
    command = _command(
        "extract", data, "--checkpoint", checkpoint, "--out", cache, "--workers", settings.workers
    )
    stages.run(f"extract {name}", command, lambda: extract(data, cache, options))
    return cache


def _temporal(
    stages: _Stages, out: Path, cache: Path, seed: int, settings: DemoSettings, progress: bool
) -> Path:
    data, run = out / "data", out / "runs" / "temporal"
    request = TrainRequest(
        overrides=settings.temporal_overrides,
        epochs=settings.temporal_epochs,
        seed=seed,
        device="cpu",
        progress=progress,
    )
    command = _command(
        "train",
        cache,
        "--data",
        data,
        "--out",
        run,
        "--epochs",
        settings.temporal_epochs,
        "--seed",
        seed,
        "--device",
        "cpu",
        *_sets(settings.temporal_overrides),
    )
    stages.run(
        f"temporal training ({cache.name} cache)",
        command,
        lambda: train([cache], data, run, request),
    )
    return run


def _rows(
    stages: _Stages,
    out: Path,
    caches: dict[str, Path],
    temporal: Path,
    settings: DemoSettings,
    progress: bool,
) -> tuple[Row, ...]:
    """Predict, smooth and evaluate: one PRED file and one evaluation per table row."""
    data, pred = out / "data", out / "pred"
    pred.mkdir(parents=True, exist_ok=True)
    student = PredictOptions(split="val", data=data, source="student", progress=progress)
    on_val = ("--data", data, "--split", "val")
    makes: list[tuple[Path, str, Callable[[], object]]] = [
        (
            path := pred / f"{name}.h5",
            _command("predict", "--source", "student", "--cache", cache, *on_val, "--out", path),
            partial(predict, None, [cache], path, student),
        )
        for name, cache in caches.items()
    ]
    features = caches[PHASE_ONE[-1].name]
    temporal_pred, smoothed = (pred / f"{stem}.h5" for stem in ROW_FILES[-2:])
    makes.append(
        (
            temporal_pred,
            _command(
                "predict",
                temporal,
                "--cache",
                features,
                "--weights",
                "final",
                *on_val,
                "--out",
                temporal_pred,
            ),
            partial(
                predict,
                temporal,
                [features],
                temporal_pred,
                replace(student, source="temporal", weights="final"),
            ),
        )
    )
    makes.append(
        (
            smoothed,
            _command("smooth", temporal_pred, "--out", smoothed, "--window", settings.window),
            partial(smooth_predictions, temporal_pred, smoothed, window=settings.window),
        )
    )
    rows = []
    named = paper_rows(settings.ssl_recipe)
    for (name, paper_f1), (path, command, make) in zip(named, makes, strict=True):
        stages.run(f"{command.split()[1]} {path.stem}", command, make)
        rows.append(_scored(stages, name, paper_f1, path, data, command))
    return tuple(rows)


def _scored(
    stages: _Stages, name: str, paper_f1: float, pred: Path, data: Path, made_by: str
) -> Row:
    json_path = pred.with_suffix(".json")
    command = _command("evaluate", pred, "--data", data, "--split", "val", "--json", json_path)
    reports: list[dict] = []
    stages.run(
        f"evaluate {pred.stem}", command, lambda: reports.append(evaluate(pred, data, "val"))
    )
    write_report(reports[0], json_path)
    f1 = round(100 * reports[0]["expr_f1"], 2)
    return Row(name, paper_f1, f1, pred, (made_by, command))


def _reference_lines(references: dict[str, float]) -> list[str]:
    """The reference learners' figures on the same validation frames, beside the table."""
    if not references:
        return [f"Reference learners: not computed ({REFERENCES_MISSING.split(': ', 1)[1]})."]
    described = {
        "frames": "the training videos' frames (row 1's data)",
        "still": "the labelled still images alone (row 3's extra data)",
    }
    return [
        "Reference on the same validation frames, HOG (9 orientations, 6 px cells, grey at "
        "48 px) + logistic regression trained on:",
        "",
        *(f"- {described[source]}: {references[source]:.2f}" for source in SOURCES),
    ]


def _readings(rows: tuple[Row, ...]) -> list[str]:
    """One honest sentence per row after the first: does it improve on the previous one?"""
    lines = []
    for before, row in pairwise(rows):
        change = row.f1 - before.f1
        verdict = "improves on" if change > 0 else "does **not** improve on"
        lines.append(
            f"- {row.name} {verdict} the previous row: {before.f1:.2f} → {row.f1:.2f} "
            f"({change:+.2f} points; Yu et al. {before.paper_f1:.2f} → {row.paper_f1:.2f})."
        )
    return lines


def _run_notes(out: Path, settings: DemoSettings) -> list[str]:
    """What the runs' own files say about the budget and the one choice made on val."""
    summary = read_summary(out / "runs" / "temporal")
    return [
        f"- The CPU budget is tiny next to the paper's: {settings.pretrain_steps} phase-1 steps "
        f"of {settings.backbone} at {settings.image_size} px for each student, against 100 k "
        "steps of ResNet-50 at 224 px.",
        *(_ssl_note(out, run.name) for run in PHASE_ONE if run.unlabelled_faces),
        "- Nothing was tuned on the validation split except the vote window, which is the "
        f"paper's ({settings.window}). The temporal rows use the weights of the last epoch "
        f"({settings.temporal_epochs}, `final.safetensors`), not the trainer's best validation "
        f"epoch (it was epoch {summary['best_epoch']}, validation macro-F1 "
        f"{100 * summary['best_val_f1']:.2f} %, which would be an optimistic figure).",
    ]


def _ssl_note(out: Path, name: str) -> str:
    """One semi-supervised run's last step and last evaluation, from its metrics.jsonl (the
    last step is always evaluated)."""
    records = read_metrics(out / "runs" / name)
    last_unlabelled = [record for record in records if "mask_ratio" in record][-1]
    last = records[-1]
    feedback = (
        f" and the feedback averaged {last_unlabelled['feedback_running_mean']:+.4f}"
        if "feedback_running_mean" in last_unlabelled
        else ""
    )
    scores = " and ".join(
        f"the {network}'s macro-F1 {last[f'heldout_{network}_f1']:.3f}"
        for network in ("teacher", "student")
        if f"heldout_{network}_f1" in last
    )
    return (
        f"- `{name}` ({last['recipe']}): at the last step the pseudo labels were confident on "
        f"{100 * last_unlabelled['mask_ratio']:.0f} % of the unlabelled images{feedback}; on "
        f"the held-out labelled images {scores}."
    )


def render_table(rows: tuple[Row, ...]) -> Table:
    """The table for the terminal."""
    table = Table(title="validation macro-F1 (%)")
    for column in ("row", "Yu et al. (Aff-Wild2)", "this run (synthetic)"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row in rows:
        table.add_row(row.name, f"{row.paper_f1:.2f}", f"{row.f1:.2f}")
    return table


def write_demo_report(
    out: Path,
    rows: tuple[Row, ...],
    seed: int,
    settings: DemoSettings,
    stages: _Stages,
    references: dict[str, float],
) -> tuple[Path, Path]:
    """Write `out/report.md` (table, readings, commands, timings) and `out/report.png`."""
    chart = plot_rows(rows, out / "report.png")
    table = [
        "| row | Yu et al. (Aff-Wild2 val F1 %) | this run (synthetic val F1 %) |",
        "|---|---|---|",
    ]
    table += [f"| {row.name} | {row.paper_f1:.2f} | {row.f1:.2f} |" for row in rows]
    commands = [
        f"{index}. {row.name}\n\n   ```sh\n"
        + "".join(f"   {command}\n" for command in row.commands)
        + "   ```"
        for index, row in enumerate(rows, 1)
    ]
    seconds = stages.seconds
    timings = [f"| {name} | {value:.1f} |" for name, value in seconds.items()]
    text = "\n".join(
        [
            f"# fercache demo (seed {seed})",
            "",
            "Validation macro-F1 over the 8 EXPR classes, pooled over every labelled frame of the "
            "synthetic Validation_Set (identities never seen in training), each figure read from "
            "the row's `fercache evaluate --json` file.",
            "",
            *table,
            "",
            f"![validation macro-F1]({chart.name})",
            "",
            *_reference_lines(references),
            "",
            "## Reading",
            "",
            *_readings(rows),
            *_run_notes(out, settings),
            "",
            "## Commands (rerun any row)",
            "",
            "Every stage, in the order run, as the command that calls the same function with "
            "the same settings:",
            "",
            "```sh",
            *stages.commands,
            "```",
            "",
            "Per row, the prediction and its evaluation:",
            "",
            *commands,
            "",
            "## Wall time per stage (s)",
            "",
            "| stage | s |",
            "|---|---|",
            *timings,
            f"| total | {sum(seconds.values()):.1f} |",
            "",
            "## Settings",
            "",
            "```json",
            json.dumps(asdict(settings), indent=2),
            "```",
            "",
        ]
    )
    report = out / "report.md"
    write_text_atomically(report, text, "the report")
    return report, chart


def plot_rows(rows: tuple[Row, ...], path: Path) -> Path:
    """Grouped bars: the paper's Aff-Wild2 figure and this run's synthetic one per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    positions = np.arange(len(rows))
    figure, axes = plt.subplots(figsize=(9, 4.5))
    paper_bars = axes.bar(
        positions - 0.2, [r.paper_f1 for r in rows], 0.4, label="Yu et al. (Aff-Wild2)"
    )
    run_bars = axes.bar(positions + 0.2, [r.f1 for r in rows], 0.4, label="this run (synthetic)")
    for bars in (paper_bars, run_bars):
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(positions, [r.name.replace(" (", "\n(") for r in rows], fontsize=8)
    axes.set_ylabel("validation macro-F1 (%)")
    axes.legend()
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"), "the chart")
    plt.close(figure)
    return path

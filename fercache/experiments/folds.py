"""Subject-grouped k-fold cross-validation (`fercache train --folds K`), as recent ABAW EXPR
entries report it: K models over the union of the training and validation videos.

The videos are those the train and val splits (`train_split`, `val_split`) annotate for the
run's tasks. They are split by subject, never within one: `X_left` and `X_right` (two people
of one video, same scene) stay together, and a groups CSV (`video,subject`) joins the videos
one person appears in; a subject is a set of videos joined by either rule. The subjects are
shuffled with the fold seed, then dealt largest first (in labelled frames: frames with an image
and a valid label of a trained task) into the fold holding the fewest labelled frames (then the
fewest subjects), so the folds are as balanced as the grouping allows. With subjects of distinct
sizes the seed changes only the order of equally sized ones.

`FOLDS_DIR/folds.json` records the plan: K, the seed, the groups file (and its SHA-256), and per
fold its held-out videos, subjects and labelled frames. A later run on the same folder reads the
videos back from it (K, seed and groups must be the same), so a fold always resumes with its
own videos. Fold k trains into `FOLDS_DIR/fold-<k>` (a normal run folder) on the other folds'
videos, and its validation set, which picks its best epoch, is its own held-out fold. Finished
folds are reused and an interrupted one resumes (`fercache.experiments.sweep.train_or_reuse`).
`FOLDS_DIR/folds-summary.json` holds every fold's best scores (the `best_*` of its summary.json)
with their mean and sample standard deviation over the folds. Under torchrun every fold trains
data-parallel over the ranks and rank 0 writes the files.

`predict_folds` soft-votes the K fold models (`fercache.predictions.ensemble`): each predicts the
split with its weights into `FOLDS_DIR/fold-<k>/<split>.h5`, and their mean is the output.
"""

import csv
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.table import Table

from fercache.data.affwild2 import AffWild2
from fercache.data.labels import read_split, row_valid
from fercache.distributed import torchrun_rank
from fercache.errors import FercacheError
from fercache.experiments.runs_table import RUN, RunsTable, best_scores
from fercache.experiments.sweep import train_or_reuse
from fercache.predictions.ensemble import Ensemble, ensemble
from fercache.predictions.predict import PredictOptions, predict
from fercache.readers import read_json_object, unreadable
from fercache.temporal.config import TemporalConfig, load_config
from fercache.temporal.loop import TrainRequest, VideoSelection
from fercache.temporal.run_files import read_summary, write_json

PLAN = "folds.json"
SUMMARY = "folds-summary.json"
SIDES = ("_left", "_right")  # two people of one video: always in the same fold
GROUP_COLUMNS = ("video", "subject")


@dataclass(frozen=True)
class Fold:
    """One fold's held-out videos and subjects, and their labelled frames."""

    videos: tuple[str, ...]
    subjects: tuple[str, ...]
    labelled_frames: int

    def to_json(self, index: int) -> dict:
        return {
            "fold": index,
            "run": fold_name(index),
            "videos": list(self.videos),
            "subjects": list(self.subjects),
            "labelled_frames": self.labelled_frames,
        }


def fold_name(index: int) -> str:
    return f"fold-{index}"


def train_folds(
    cache_dirs: list[Path],
    data: Path,
    out: Path,
    request: TrainRequest,
    folds: int,
    fold_seed: int | None = None,
    groups: Path | None = None,
) -> dict | None:
    """Train the `folds` fold models into `out/fold-<k>`; the summary (also
    `folds-summary.json`), or None on ranks other than 0 under torchrun."""
    config = load_config(
        request.config_file, list(request.overrides), epochs=request.epochs, seed=request.seed
    )
    out = Path(out)
    seed = config.seed if fold_seed is None else fold_seed
    plan = _planned(out, data, config, folds, seed, groups)
    rank = torchrun_rank()[0]
    if rank == 0 and not (out / PLAN).is_file():
        write_json(out / PLAN, plan)
    held_out = [fold["videos"] for fold in plan["folds"]]
    runs = []
    for index, fold in enumerate(plan["folds"]):
        others = tuple(video for k, videos in enumerate(held_out) if k != index for video in videos)
        selection = VideoSelection(others, tuple(fold["videos"]), f"fold {index}")
        run_dir = out / fold["run"]
        summary, _ = train_or_reuse(cache_dirs, data, run_dir, replace(request, videos=selection))
        runs.append(_fold_figures(fold, summary))
    if rank != 0:
        return None
    scores = list(best_scores(runs[0]))
    summary = {
        "folds": folds,
        "seed": seed,
        "plan": str(out / PLAN),
        "runs": runs,
        **mean_and_sd(runs, scores),
    }
    write_json(out / SUMMARY, summary)
    return summary


def _fold_figures(fold: dict, summary: dict) -> dict:
    return {
        "fold": fold["fold"],
        "run": fold["run"],
        "held_out_videos": len(fold["videos"]),
        "held_out_subjects": len(fold["subjects"]),
        "labelled_frames": fold["labelled_frames"],
        "best_epoch": summary["best_epoch"],
        **best_scores(summary),
    }


def mean_and_sd(runs: list[dict], scores: list[str]) -> dict[str, dict[str, float | None]]:
    """Each score's mean and sample standard deviation over the runs (sd None for one run)."""
    values = {score: np.array([run[score] for run in runs], dtype=np.float64) for score in scores}
    return {
        "mean": {score: float(value.mean()) for score, value in values.items()},
        "sd": {
            score: float(value.std(ddof=1)) if len(value) > 1 else None
            for score, value in values.items()
        },
    }


# --- the plan ------------------------------------------------------------------------------


def _planned(
    out: Path, data: Path, config: TemporalConfig, folds: int, seed: int, groups: Path | None
) -> dict:
    """The plan recorded in `out/folds.json` if there is one (it must be for the same K, seed
    and groups), else a new one."""
    if folds < 2:
        raise FercacheError(f"--folds {folds}: cross-validation needs at least 2 folds")
    groups_hash = _sha256(groups) if groups is not None else None
    recorded = read_plan(out) if (out / PLAN).is_file() else None
    if recorded is not None:
        asked = {"k": folds, "seed": seed, "groups_sha256": groups_hash}
        changed = [key for key, value in asked.items() if recorded.get(key) != value]
        if changed:
            raise FercacheError(
                f"{out / PLAN}: planned with --folds {recorded['k']} --fold-seed "
                f"{recorded['seed']} and groups {recorded['groups'] or 'none'}; this run differs "
                f"in {', '.join(changed)}. Rerun with those options, or choose another --out"
            )
        return recorded
    frames = labelled_frames(data, config)
    units = subjects(list(frames), read_groups(groups, frames) if groups is not None else {})
    if len(units) < 2:
        raise FercacheError(
            f"--folds {folds}: {data} has one subject ({len(frames)} videos annotated for "
            f"{'/'.join(config.tasks).upper()} in {config.train_split} and {config.val_split}"
            "), and cross-validation holds out whole subjects; train without --folds"
        )
    if folds > len(units):
        raise FercacheError(
            f"--folds {folds}: {data} has {len(units)} subjects ({len(frames)} videos annotated "
            f"for {'/'.join(config.tasks).upper()} in {config.train_split} and "
            f"{config.val_split}); choose --folds {len(units)} or fewer"
        )
    planned = split_folds(frames, units, folds, seed)
    return {
        "k": folds,
        "seed": seed,
        "groups": str(groups) if groups is not None else None,
        "groups_sha256": groups_hash,
        "tasks": list(config.tasks),
        "splits": [config.train_split, config.val_split],
        "folds": [fold.to_json(index) for index, fold in enumerate(planned)],
    }


def read_plan(folds_dir: Path) -> dict:
    """`folds_dir/folds.json`; a FercacheError naming it when it is missing or unreadable."""
    path = Path(folds_dir) / PLAN
    remedy = "train the folds again into a new folder (`fercache train --folds K --out NEW`)"
    plan = read_json_object(path, "fold plan", remedy)
    if not isinstance(plan.get("folds"), list) or not all(
        isinstance(fold, dict) and {"run", "videos"} <= set(fold) for fold in plan["folds"]
    ):
        raise unreadable(path, "fold plan", "no list of folds with their run and videos", remedy)
    return plan


def labelled_frames(data: Path, config: TemporalConfig) -> dict[str, int]:
    """Per video annotated for a trained task in the train or val split: its frames with an
    image and a valid label of at least one trained task."""
    tree = AffWild2(data)
    frames = {}
    for split in (config.train_split, config.val_split):
        for video in read_split(tree, config.tasks, split).videos:
            masks = [row_valid(task, labels.image_labels) for task, labels in video.labels.items()]
            frames[video.video] = int(np.logical_or.reduce(masks).sum())
    if not frames:
        raise FercacheError(
            f"{data}: no video is annotated for {'/'.join(config.tasks).upper()} in "
            f"{config.train_split} or {config.val_split}; nothing to cross-validate"
        )
    return dict(sorted(frames.items()))


def read_groups(path: Path, videos: dict[str, int] | list[str]) -> dict[str, str]:
    """{video: subject} of the groups CSV (columns video,subject); every video must be one of
    `videos`."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            rows, columns = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise FercacheError(f"{path}: cannot read the groups CSV ({error})") from None
    if not rows or not set(GROUP_COLUMNS) <= set(columns):
        raise FercacheError(
            f"{path}: a groups CSV needs a header 'video,subject' and one row per video"
        )
    groups: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        video, subject = (str(row[column] or "").strip() for column in GROUP_COLUMNS)
        if not video or not subject:
            raise FercacheError(f"{path}, line {line}: give both a video and a subject")
        if groups.setdefault(video, subject) != subject:
            raise FercacheError(
                f"{path}, line {line}: video '{video}' is given two subjects "
                f"('{groups[video]}' and '{subject}'); keep one"
            )
    unknown = sorted(set(groups) - set(videos))
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise FercacheError(
            f"{path}: names video(s) not annotated in the train or val split: {shown}; "
            "fix the names (as in cropped_aligned/) or drop those rows"
        )
    return groups


def subject_of(video: str) -> str:
    """The video's name without its `_left` / `_right` suffix."""
    for side in SIDES:
        if video.endswith(side):
            return video[: -len(side)]
    return video


def subjects(videos: list[str], groups: dict[str, str]) -> dict[str, list[str]]:
    """{subject: its videos}: videos are joined when they share a name up to `_left`/`_right`
    or a subject of `groups`; a subject is named by its group names and unlisted video names."""
    parent = {video: video for video in videos}

    def root(video: str) -> str:
        while parent[video] != video:
            parent[video] = parent[parent[video]]
            video = parent[video]
        return video

    first_of: dict[tuple[str, str], str] = {}  # joining key -> the first video that has it
    for video in videos:
        keys = [("video", subject_of(video))]
        if video in groups:
            keys.append(("group", groups[video]))
        for key in keys:
            parent[root(video)] = root(first_of.setdefault(key, video))
    members: dict[str, list[str]] = {}
    for video in videos:
        members.setdefault(root(video), []).append(video)
    named = {}
    for joined in members.values():
        names = {groups.get(video, subject_of(video)) for video in joined}
        named["+".join(sorted(names))] = sorted(joined)
    return dict(sorted(named.items()))


def split_folds(
    frames: dict[str, int], units: dict[str, list[str]], folds: int, seed: int
) -> list[Fold]:
    """Deal the subjects into `folds` folds: shuffled with `seed`, then largest first into the
    fold with the fewest labelled frames (then the fewest subjects, then the lowest index)."""
    names = list(units)
    order = np.random.default_rng(seed).permutation(len(names))
    size = {name: sum(frames[video] for video in units[name]) for name in names}
    dealt = sorted((names[index] for index in order), key=lambda name: -size[name])  # stable
    members: list[list[str]] = [[] for _ in range(folds)]
    loads = [0] * folds
    for name in dealt:
        target = min(range(folds), key=lambda k: (loads[k], len(members[k]), k))
        members[target].append(name)
        loads[target] += size[name]
    return [
        Fold(
            tuple(sorted(video for name in chosen for video in units[name])),
            tuple(sorted(chosen)),
            load,
        )
        for chosen, load in zip(members, loads, strict=True)
    ]


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise FercacheError(f"{path}: cannot read the groups CSV ({error.strerror})") from None


# --- showing and predicting ----------------------------------------------------------------


def render(summary: dict) -> Table:
    """Each fold's held-out set and best scores (on that set), then their mean and sd."""
    scores = list(summary["mean"])
    table = Table(
        title=f"cross-validation: {summary['folds']} folds (fold seed {summary['seed']}), "
        "best scores on each held-out fold"
    )
    held_out = ("videos", "subjects", "frames")
    for column in (
        "fold",
        *held_out,
        "epoch",
        *(name.removeprefix("best_val_") for name in scores),
    ):
        table.add_column(column, justify="left" if column == "fold" else "right")
    for run in summary["runs"]:
        table.add_row(
            run["run"],
            str(run["held_out_videos"]),
            str(run["held_out_subjects"]),
            f"{run['labelled_frames']:,}",
            str(run["best_epoch"]),
            *(f"{run[score]:.4f}" for score in scores),
        )
    table.add_section()
    for figure in ("mean", "sd"):
        shown = (f"{summary[figure][score]:.4f}" for score in scores)
        table.add_row(figure, *[""] * (len(held_out) + 1), *shown)
    return table


def is_folds_dir(path: Path) -> bool:
    return (Path(path) / PLAN).is_file()


def with_fold_means(table: RunsTable, folder: Path) -> RunsTable:
    """The runs table of a folds folder with footer rows: each score's mean and sd over the
    finished folds (other folders: the table unchanged)."""
    if not is_folds_dir(folder):
        return table
    finished = [row for row in table.rows if all(row[score] is not None for score in table.scores)]
    if not finished:
        return table
    spread = mean_and_sd(finished, table.scores)
    try:
        planned = len(read_plan(folder)["folds"])
        counted = "" if len(finished) == planned else f" ({len(finished)}/{planned} folds)"
    except FercacheError:  # the table is still worth showing
        counted = f" ({len(finished)} folds; {PLAN} unreadable)"
    footer = [
        {RUN: f"mean{counted}", **spread["mean"]},
        {RUN: "sd", **spread["sd"]},
    ]
    return replace(table, footer=footer)


def predict_folds(
    folds_dir: Path, caches: list[Path], out: Path, options: PredictOptions
) -> Ensemble:
    """Soft vote of the K fold models' predictions of `options.split`, written to `out`."""
    folds_dir = Path(folds_dir)
    if options.tune_thresholds:
        raise FercacheError(
            f"--tune-thresholds: {folds_dir} holds cross-validation folds, whose models trained "
            "on the val videos; tune thresholds on one run's validation split instead"
        )
    plan = read_plan(folds_dir)
    suffix = "" if options.weights == "best" else f"-{options.weights}"
    preds = []
    for fold in plan["folds"]:
        run_dir = folds_dir / fold["run"]
        if read_summary(run_dir) is None:
            raise FercacheError(
                f"{run_dir}: this fold has not finished training; rerun `fercache train ... "
                f"--folds {plan['k']} --out {folds_dir}` to finish it, then predict"
            )
        pred = run_dir / f"{options.split}{suffix}.h5"
        predict(run_dir, caches, pred, options)
        preds.append(pred)
    voted = ensemble(preds, out)
    if options.split in plan.get("splits", ()):
        note = (
            f"every fold model but one trained on {options.split} videos: this vote is no "
            f"held-out estimate (the cross-validated scores are in {folds_dir / SUMMARY})"
        )
        voted = replace(voted, notes=(*voted.notes, note))
    return voted

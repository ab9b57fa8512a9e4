"""`fercache inspect`: what an Aff-Wild2 tree holds, split by split, and what is odd about it."""

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Group
from rich.table import Table

from fercache.data.affwild2 import AffWild2, Note, VideoLabels
from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, TASKS, VA_NAMES
from fercache.progress import progress_bar


@dataclass(frozen=True)
class SplitSummary:
    """Counts for one task and split. Frames are annotated frames (annotation lines)."""

    task: str
    split: str
    videos: int
    frames: int
    frames_without_image: int
    labelled: int
    labelled_without_image: int
    invalid: int
    images_without_annotation: int
    # EXPR: frames per class; AU: positive frames per AU; VA: mean valence and arousal
    distribution: dict[str, float]
    video_names: list[str] = field(default_factory=list)  # the videos annotated, sorted


@dataclass
class DatasetSummary:
    root: str
    image_folders: int
    images: int
    unannotated_videos: list[str]
    subjects: list[str]  # `<video>_left` / `<video>_right` folders
    splits: list[SplitSummary] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def split(self, task: str, split: str) -> SplitSummary:
        return next(s for s in self.splits if (s.task, s.split) == (task, split))

    def note_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(note.kind for note in self.notes).items()))

    def to_json(self) -> dict:
        data = asdict(self)
        data["notes"] = [
            {"kind": n.kind, "path": str(n.path), "message": n.message} for n in self.notes
        ]
        data["note_counts"] = self.note_counts()
        return data


def summarize(dataset: AffWild2, progress: bool = True) -> DatasetSummary:
    """Read every annotation of every task and split of `dataset` and count what is there."""
    videos = dataset.videos()
    loads = [(task, split) for task in TASKS for split in dataset.splits(task)]
    annotated: set[str] = set()
    summary = DatasetSummary(
        root=str(dataset.root),
        image_folders=len(videos),
        images=0,
        unannotated_videos=[],
        subjects=[v for v in videos if v.endswith(("_left", "_right"))],
        notes=list(dataset.notes),
    )
    total = sum(len(dataset.annotated_videos(task, split)) for task, split in loads)
    with progress_bar("Reading annotations", total, progress) as advance:
        for task, split in loads:
            entries = []
            for video in dataset.annotated_videos(task, split):
                entries += dataset.load(task, split, [video])
                advance()
            summary.splits.append(_summarize_split(task, split, entries))
            summary.notes += [note for entry in entries for note in entry.notes]
            annotated.update(entry.video for entry in entries)
    summary.images = sum(len(dataset.image_frames(video)[0]) for video in videos)
    summary.unannotated_videos = sorted(set(videos) - annotated)
    summary.notes = list(dict.fromkeys(summary.notes))  # image-folder notes repeat per task
    return summary


def _summarize_split(task: str, split: str, entries: list[VideoLabels]) -> SplitSummary:
    valid = [entry.frame_valid for entry in entries]
    labels = [entry.labels for entry in entries]
    return SplitSummary(
        task=task,
        split=split,
        videos=len(entries),
        frames=sum(len(v) for v in valid),
        frames_without_image=sum(len(e.frames_without_image) for e in entries),
        labelled=int(sum(v.sum() for v in valid)),
        labelled_without_image=sum(len(e.labelled_frames_without_image) for e in entries),
        invalid=int(sum((~v).sum() for v in valid)),
        images_without_annotation=sum(int((e.image_frames > len(e.labels)).sum()) for e in entries),
        distribution=_distribution(task, labels, valid),
        video_names=sorted(entry.video for entry in entries),
    )


def _distribution(task: str, labels: list[np.ndarray], valid: list[np.ndarray]) -> dict:
    if not labels:
        return {}
    kept = np.concatenate([lab[ok] for lab, ok in zip(labels, valid, strict=True)])
    if task == "expr":
        counts = np.bincount(kept, minlength=len(EXPR_CLASSES))
        return {name: int(n) for name, n in zip(EXPR_CLASSES, counts, strict=True)}
    if task == "au":
        return {name: int(n) for name, n in zip(AU_NAMES, kept.sum(axis=0), strict=True)}
    means = kept.mean(axis=0) if len(kept) else np.zeros(len(VA_NAMES))
    return {f"mean {name}": round(float(m), 4) for name, m in zip(VA_NAMES, means, strict=True)}


# table header -> SplitSummary field, in display order
_COUNT_COLUMNS = {
    "videos": "videos",
    "frames": "frames",
    "no image": "frames_without_image",
    "labelled": "labelled",
    "labelled, no image": "labelled_without_image",
    "invalid": "invalid",
    "images past annotation": "images_without_annotation",
}


def render(summary: DatasetSummary, max_notes: int = 20) -> Group:
    """Rich tables: splits, EXPR class distribution, each split's videos, and the notes on
    odd data."""
    title = f"{summary.root}: {summary.image_folders} image folders, {summary.images:,} images"
    splits = Table(title=title)
    splits.add_column("task")
    splits.add_column("split")
    for header in _COUNT_COLUMNS:
        splits.add_column(header, justify="right")
    for s in summary.splits:
        counts = (f"{getattr(s, name):,}" for name in _COUNT_COLUMNS.values())
        splits.add_row(s.task.upper(), s.split, *counts)
    parts: list = [splits, _expr_table(summary), _videos_table(summary)]
    lines = []
    if summary.subjects:
        lines.append(f"two-subject videos (_left/_right): {', '.join(summary.subjects)}")
    if summary.unannotated_videos:
        lines.append(
            f"{len(summary.unannotated_videos)} image folder(s) with no annotation in any task "
            f"(test videos?): {', '.join(summary.unannotated_videos[:5])}"
        )
    counts = summary.note_counts()
    if counts:
        lines.append("notes: " + ", ".join(f"{kind} x{n}" for kind, n in counts.items()))
        lines += [f"  {note}" for note in summary.notes[:max_notes]]
        if len(summary.notes) > max_notes:
            lines.append(f"  ... {len(summary.notes) - max_notes} more (see --json)")
    return Group(*parts, *lines)


def _expr_table(summary: DatasetSummary) -> Table:
    table = Table(title="EXPR class distribution (labelled frames)")
    table.add_column("split")
    for name in EXPR_CLASSES:
        table.add_column(name, justify="right")
    for s in summary.splits:
        if s.task == "expr":
            total = max(sum(s.distribution.values()), 1)
            table.add_row(
                s.split,
                *(f"{n:,} ({100 * n / total:.1f}%)" for n in s.distribution.values()),
            )
    return table


def _videos_table(summary: DatasetSummary) -> Table:
    """One row per split and list of videos: the tasks of a split that annotate the same
    videos share a row; the names wrap inside their column."""
    table = Table(title="Videos per split")
    table.add_column("split")
    table.add_column("tasks")
    table.add_column("videos", justify="right")
    table.add_column("names", overflow="fold")
    rows: dict[str, dict[tuple[str, ...], list[str]]] = {}
    for s in summary.splits:
        rows.setdefault(s.split, {}).setdefault(tuple(s.video_names), []).append(s.task.upper())
    for split, lists in rows.items():
        for names, tasks in lists.items():
            table.add_row(split, "/".join(tasks), f"{len(names):,}", ", ".join(names))
    return table


def inspect_dataset(root: Path, annotations: Path | None = None, progress: bool = True):
    """Open the tree at `root` and summarise it (the function behind `fercache inspect`)."""
    return summarize(AffWild2(root, annotations=annotations), progress=progress)

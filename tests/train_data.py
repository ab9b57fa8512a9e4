"""Small label trees and feature caches for the temporal trainer's tests, built in milliseconds.

The tree has the Aff-Wild2 layout with empty image files (the reader looks only at names) and
EXPR annotations in segments of 20-120 frames with `-1` stretches and frames without images.
Each cached feature is a noisy view of its segment's class prototype, and about half the frames
are occluded (bursts of pure noise): a per-frame classifier can only guess there, while a
temporal model can read the class from the neighbouring frames.

`write_label_cache` serves multi-task tests on any tree (e.g. the generator's, with EXPR, AU and
VA annotations): its features are a noisy random projection of each frame's labels.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fercache.data.affwild2 import AffWild2, VideoLabels
from fercache.data.tasks import AU_NAMES, EXPR, TASKS, VA_NAMES
from fercache.features.store import Provenance, write_manifest, write_store

CLASSES = 8
# the smallest temporal model the trainer builds: `--set` values for tests that train one
TINY_TEMPORAL = ("width=16", "layers=1", "heads=2", "ff_width=32", "batch_size=8", "workers=0")
ANNOTATIONS = "Annotations/EXPR_Recognition_Challenge"
SPLIT_FOLDERS = {"train": "Train_Set", "val": "Validation_Set"}


@dataclass(frozen=True)
class TreeSpec:
    train_videos: int = 6
    val_videos: int = 3
    frames: int = 300
    seed: int = 0


def write_tree(root: Path, spec: TreeSpec) -> dict[str, np.ndarray]:
    """Write the label tree; return every video's labels (index i = frame i + 1)."""
    rng = np.random.default_rng([spec.seed, 1])
    labels_of: dict[str, np.ndarray] = {}
    for split, count in (("train", spec.train_videos), ("val", spec.val_videos)):
        folder = root / ANNOTATIONS / SPLIT_FOLDERS[split]
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(count):
            video = f"{split}{number:02d}"
            labels = _segment_labels(rng, int(spec.frames * rng.uniform(0.7, 1.3)))
            lines = [EXPR.header, *(str(label) for label in labels)]
            (folder / f"{video}.txt").write_text("\n".join(lines) + "\n")
            images = root / "cropped_aligned" / video
            images.mkdir(parents=True)
            for frame in _frames_with_images(rng, len(labels)):
                (images / f"{frame:05d}.jpg").touch()
            labels_of[video] = labels
    return labels_of


def _segment_labels(rng: np.random.Generator, frames: int) -> np.ndarray:
    labels = []
    while len(labels) < frames:
        label = -1 if rng.random() < 0.08 else int(rng.integers(0, CLASSES))
        labels += [label] * int(rng.integers(20, 120))
    return np.array(labels[:frames], np.int64)


def _frames_with_images(rng: np.random.Generator, frames: int) -> np.ndarray:
    """All frames but a few scattered ones without a face (no image)."""
    return np.flatnonzero(rng.random(frames) > 0.03) + 1


def fake_provenance(
    backbone: str, feature_dim: int, num_classes: int, init_seed: int = 0
) -> Provenance:
    """The provenance of stores written by tests without a real backbone."""
    return Provenance(
        backbone=backbone,
        checkpoint="",
        checkpoint_sha256="",
        init_seed=init_seed,
        input_size=(3, 112, 112),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
        dtype="float16",
        feature_dim=feature_dim,
        num_classes=num_classes,
    )


def write_cache(
    cache_dir: Path,
    root: Path,
    labels_of: dict[str, np.ndarray],
    *,
    dim: int = 16,
    seed: int = 0,
    videos: list[str] | None = None,
    signal: float = 1.0,
    occluded: float = 0.5,
) -> Path:
    """One store per video (rows = frames with images) plus the manifest."""
    rng = np.random.default_rng([seed, 2])
    prototypes = rng.normal(size=(CLASSES, dim))
    provenance = fake_provenance("synthetic-prototypes", dim, num_classes=0, init_seed=seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    for video in sorted(videos if videos is not None else labels_of):
        frames = np.array(sorted(int(p.stem) for p in (root / "cropped_aligned" / video).iterdir()))
        labels = labels_of[video][frames - 1]
        features = _noisy_views(rng, prototypes, labels, signal, occluded)
        write_store(cache_dir, video, frames, features, None, provenance)
        entries[video] = {"rows": len(frames), "skipped": 0}
    write_manifest(cache_dir, provenance, entries)
    return cache_dir


def _noisy_views(
    rng: np.random.Generator,
    prototypes: np.ndarray,
    labels: np.ndarray,
    signal: float,
    occluded: float,
) -> np.ndarray:
    shown = prototypes[np.maximum(labels, 0)] * signal
    shown[labels < 0] = prototypes[rng.integers(0, CLASSES)] * signal  # unlabelled: anything
    hidden = np.zeros(len(labels), bool)
    while hidden.mean() < occluded:  # occlusion bursts of 2-12 frames
        start = int(rng.integers(0, len(labels)))
        hidden[start : start + int(rng.integers(2, 13))] = True
    shown[hidden] = 0.0
    return (shown + rng.normal(size=shown.shape)).astype(np.float16)


def write_label_cache(
    cache_dir: Path, root: Path, *, dim: int = 32, noise: float = 0.5, seed: int = 0
) -> Path:
    """One store per video annotated for any task in any split of the tree at `root` (rows =
    frames with images): a fixed random projection of the frame's EXPR one-hot, AU values and
    VA values (an invalid label projects zeros) plus Gaussian noise of sd `noise`."""
    rng = np.random.default_rng([seed, 3])
    tree = AffWild2(root)
    annotated: dict[str, dict[str, VideoLabels]] = {}
    for task in TASKS:
        for split in tree.splits(task):
            for video in tree.load(task, split):
                annotated.setdefault(video.video, {})[task] = video
    projection = rng.normal(size=(CLASSES + len(AU_NAMES) + len(VA_NAMES), dim))
    provenance = fake_provenance("synthetic-label-projection", dim, num_classes=0, init_seed=seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, by_task in sorted(annotated.items()):
        frames = next(iter(by_task.values())).image_frames
        shown = np.concatenate([_label_parts(by_task, task, len(frames)) for task in TASKS], 1)
        features = shown @ projection + noise * rng.normal(size=(len(frames), dim))
        write_store(cache_dir, name, frames, features.astype(np.float16), None, provenance)
        entries[name] = {"rows": len(frames), "skipped": 0}
    write_manifest(cache_dir, provenance, entries)
    return cache_dir


def _label_parts(by_task: dict[str, VideoLabels], task: str, rows: int) -> np.ndarray:
    """(rows, width) encoding of one task's labels of the image frames; zeros where invalid."""
    width = {"expr": CLASSES, "au": len(AU_NAMES), "va": len(VA_NAMES)}[task]
    parts = np.zeros((rows, width))
    if task not in by_task:
        return parts
    labels = by_task[task].image_labels
    if task == "expr":
        valid = labels >= 0
        parts[np.flatnonzero(valid), labels[valid]] = 1.0
    else:
        parts = np.where(labels == TASKS[task].invalid, 0.0, labels)
    return parts

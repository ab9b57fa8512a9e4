"""Labels of the cached rows, read from the annotation tree at load time (never copied).

A run trains one or more tasks (EXPR, AU, VA). A split's videos are those annotated for at
least one of them; a video lacking a task's annotation file simply has no valid label of that
task. A cache row is a frame with an image; its label of a task is the annotation's line for
that frame, or the task's invalid value (EXPR/AU -1, VA -5) when the annotation ends before the
frame or the video has no annotation of the task. Frames with a label but no image have no
features and no row.
"""

from dataclasses import dataclass

import numpy as np

from fercache.data.affwild2 import AffWild2, VideoLabels
from fercache.data.tasks import AU, TASKS


@dataclass(frozen=True)
class VideoTargets:
    """One video's annotations of the trained tasks it has (task name -> labels)."""

    video: str
    labels: dict[str, VideoLabels]


@dataclass(frozen=True)
class SplitLabels:
    """The videos of one split annotated for at least one of `tasks`, sorted by name."""

    tasks: tuple[str, ...]
    split: str
    videos: list[VideoTargets]

    @property
    def names(self) -> list[str]:
        return [video.video for video in self.videos]


def read_split(data: AffWild2, tasks: tuple[str, ...], split: str) -> SplitLabels:
    """Every task's annotations of `split`, grouped per video."""
    per_video: dict[str, dict[str, VideoLabels]] = {}
    for task in tasks:
        for video in data.load(task, split):
            per_video.setdefault(video.video, {})[task] = video
    videos = [VideoTargets(name, per_video[name]) for name in sorted(per_video)]
    return SplitLabels(tuple(tasks), split, videos)


def row_labels(video: VideoLabels, frames: np.ndarray) -> np.ndarray:
    """The label of each cache row (frame numbers `frames`, 1-based); invalid past the end."""
    labels = np.full((len(frames), *video.labels.shape[1:]), video.task.invalid, video.task.dtype)
    annotated = frames <= len(video.labels)
    labels[annotated] = video.labels[frames[annotated] - 1]
    return labels


def row_targets(
    video: VideoTargets, tasks: tuple[str, ...], frames: np.ndarray
) -> dict[str, np.ndarray]:
    """Each task's labels of the cache rows `frames`; all invalid for a task the video lacks."""
    targets = {}
    for task in tasks:
        if task in video.labels:
            targets[task] = row_labels(video.labels[task], frames)
        else:
            spec = TASKS[task]
            shape = (len(frames),) if spec.width == 1 else (len(frames), spec.width)
            targets[task] = np.full(shape, spec.invalid, spec.dtype)
    return targets


def row_valid(task: str, labels: np.ndarray) -> np.ndarray:
    """Per row: True when any value of the task's label is valid (AU/VA mask per column)."""
    valid = TASKS[task].valid_mask(labels)
    return valid if valid.ndim == 1 else valid.any(axis=1)


def class_counts(labels: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Frames per class over all videos (invalid labels, negative, are left out)."""
    valid = [label[label >= 0] for label in labels]
    return np.bincount(np.concatenate([np.zeros(0, np.int64), *valid]), minlength=num_classes)


def positive_counts(labels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per AU: frames labelled 1 and frames labelled 0 (-1 left out), over all videos."""
    stacked = np.concatenate([np.zeros((0, AU.width), np.int64), *labels])
    return (stacked == 1).sum(axis=0), (stacked == 0).sum(axis=0)

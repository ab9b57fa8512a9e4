"""Labels of the cached rows, read from the annotation tree at load time (never copied).

A cache row is a frame with an image; its label is the annotation's line for that frame, or the
task's invalid value when the annotation ends before the frame. Works for any task (EXPR gives
(T,), AU and VA give (T, k)); frames with a label but no image have no features and no row.
"""

from dataclasses import dataclass

import numpy as np

from fercache.data.affwild2 import AffWild2, VideoLabels
from fercache.data.tasks import TASKS, Task


@dataclass(frozen=True)
class SplitLabels:
    """The annotated videos of one task and split, sorted by name."""

    task: Task
    split: str
    videos: list[VideoLabels]

    @property
    def names(self) -> list[str]:
        return [video.video for video in self.videos]


def read_split(data: AffWild2, task: str, split: str) -> SplitLabels:
    return SplitLabels(TASKS[task], split, data.load(task, split))


def row_labels(video: VideoLabels, frames: np.ndarray) -> np.ndarray:
    """The label of each cache row (frame numbers `frames`, 1-based); invalid past the end."""
    labels = np.full((len(frames), *video.labels.shape[1:]), video.task.invalid, video.task.dtype)
    annotated = frames <= len(video.labels)
    labels[annotated] = video.labels[frames[annotated] - 1]
    return labels


def class_counts(labels: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Frames per class over all videos (invalid labels, negative, are left out)."""
    valid = [label[label >= 0] for label in labels]
    return np.bincount(np.concatenate([np.zeros(0, np.int64), *valid]), minlength=num_classes)

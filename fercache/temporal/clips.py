"""Which 64-frame windows a run reads, and how a batch of them is cut from the features.

A window is a row `(video, start, stop)` of an int64 array: rows `start..stop-1` of one video,
never more than `clip` rows and never crossing into another video.

- Training: every epoch tiles each video with `clip`-row windows at a random phase, so every
  labelled row (valid for at least one trained task) falls in exactly one window per epoch; the
  tail is never dropped (a window cut short by the video's end or start is padded), and windows
  without a labelled row are skipped. With class-balanced sampling the epoch instead draws as
  many windows with replacement, each with probability proportional to the mean EXPR class
  weight of its EXPR-labelled rows (1, the mean weight of a training frame, when it has none).
- Evaluation: windows of `clip` rows every `stride` rows plus one flush with the end, so every
  row is covered (a video shorter than `clip` is one padded window); outputs are averaged.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fercache.data.tasks import TASKS
from fercache.temporal.features import LazyFeatures, MemoryFeatures

# Per video: task name -> labels of its rows ((rows,) for EXPR, (rows, k) for AU and VA).
RowTargets = dict[str, np.ndarray]


def training_windows(labelled: list[np.ndarray], clip: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch's windows over videos whose rows are marked `labelled` (bool), shuffled."""
    windows = []
    for video, marks in enumerate(labelled):
        phase = int(rng.integers(0, clip))  # drawn for every video: streams stay aligned
        rows = len(marks)
        starts = np.arange(phase - clip if phase else 0, rows, clip)
        lows, highs = np.maximum(starts, 0), np.minimum(starts + clip, rows)
        labelled_before = np.concatenate([[0], np.cumsum(marks)])
        keep = labelled_before[highs] > labelled_before[lows]
        windows.append(np.stack([np.full(keep.sum(), video), lows[keep], highs[keep]], axis=1))
    plan = np.concatenate(windows) if windows else np.zeros((0, 3), np.int64)
    return plan[rng.permutation(len(plan))].astype(np.int64)


def balanced_windows(
    windows: np.ndarray,
    labels: list[np.ndarray],
    class_weights: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """As many windows, drawn with replacement in proportion to their mean class weight
    (`labels`: EXPR labels per video; a window without any counts as weight 1)."""
    scores = np.ones(len(windows))
    for position, (video, start, stop) in enumerate(windows):
        window_labels = labels[video][start:stop]
        if (window_labels >= 0).any():
            scores[position] = class_weights[window_labels[window_labels >= 0]].mean()
    return windows[rng.choice(len(windows), size=len(windows), p=scores / scores.sum())]


def evaluation_starts(rows: int, clip: int, stride: int) -> np.ndarray:
    """Start rows of the overlapping windows that cover all `rows` rows."""
    if rows <= clip:
        return np.zeros(1, np.int64)
    starts = np.arange(0, rows - clip + 1, stride)
    return starts if starts[-1] == rows - clip else np.append(starts, rows - clip)


def rank_share(windows: np.ndarray, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Rank `rank`'s disjoint share; every rank gets as many batches (DDP steps in lockstep).

    Missing places are filled with empty windows (start == stop): all padding, zero loss.
    """
    per_rank = math.ceil(len(windows) / world_size / batch_size) * batch_size
    filled = np.zeros((per_rank * world_size, 3), np.int64)
    filled[: len(windows)] = windows
    return filled[rank::world_size]


@dataclass
class ClipBatch:
    """`features` (B, clip, D) float16; `targets` per task: EXPR (B, clip) int64, AU
    (B, clip, 12) int64, VA (B, clip, 2) float32, the task's invalid value where a row has no
    label or is padding; `padding` (B, clip) bool, True where a row is padding."""

    features: torch.Tensor
    targets: dict[str, torch.Tensor]
    padding: torch.Tensor

    def pin_memory(self) -> "ClipBatch":
        pinned = {task: values.pin_memory() for task, values in self.targets.items()}
        return ClipBatch(self.features.pin_memory(), pinned, self.padding)


def assemble(
    source: MemoryFeatures | LazyFeatures,
    labels: list[RowTargets],
    windows: np.ndarray,
    clip: int,
) -> ClipBatch:
    """Cut a batch of windows: one copy of each window into a preallocated array."""
    features = np.empty((len(windows), clip, source.feature_dim), np.float16)
    # Padding rows carry each task's invalid label, so the losses ignore them.
    targets = {
        task: np.full((len(windows), clip, *rows.shape[1:]), TASKS[task].invalid, rows.dtype)
        for task, rows in labels[0].items()
    }
    padding = np.ones((len(windows), clip), bool)
    for position, (video, start, stop) in enumerate(windows.tolist()):
        length = stop - start
        features[position, :length] = source.window(video, start, stop)
        features[position, length:] = 0
        for task, values in targets.items():
            values[position, :length] = labels[video][task][start:stop]
        # An empty filler window keeps its rows visible to attention (masking every key of a
        # row gives NaN); its labels are all invalid, so it still adds nothing to the loss.
        padding[position, : length if length else clip] = False
    return ClipBatch(
        torch.from_numpy(features),
        {task: torch.from_numpy(values) for task, values in targets.items()},
        torch.from_numpy(padding),
    )


class ClipBatches(Dataset):
    """Item i is batch i of a window plan (use with `DataLoader(batch_size=None)`)."""

    def __init__(
        self,
        source: MemoryFeatures | LazyFeatures,
        labels: list[RowTargets],
        windows: np.ndarray,
        clip: int,
        batch_size: int,
    ) -> None:
        self.source = source
        self.labels = labels
        self.windows = windows
        self.clip = clip
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    def __getitem__(self, index: int) -> ClipBatch:
        rows = self.windows[index * self.batch_size : (index + 1) * self.batch_size]
        return assemble(self.source, self.labels, rows, self.clip)

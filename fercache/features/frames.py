"""The frames `extract` reads: the videos to extract (`VideoJob`), each frame decoded at native
size (`FrameDataset`), drawn in batches across video boundaries of the videos this process
claims as the loader reaches them (`ClaimedBatches`), and stacked (`collate_frames`).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from fercache.data.affwild2 import frame_filename
from fercache.readers import UNREADABLE_IMAGE


@dataclass
class VideoJob:
    """One video to extract: its frame numbers that have images, and their files."""

    video: str
    frames: np.ndarray
    folder: Path

    def path(self, frame: int) -> Path:
        return self.folder / frame_filename(frame)


class FrameDataset(Dataset):
    """Every frame of the given videos, in order, decoded to uint8 CHW at native size.

    An unreadable file yields an empty image and the reason, so one bad JPEG costs one row,
    not the run.
    """

    def __init__(self, jobs: list[VideoJob]) -> None:
        self.paths = [job.path(frame) for job in jobs for frame in job.frames]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert("RGB"))
            return index, torch.from_numpy(pixels).permute(2, 0, 1), ""
        except UNREADABLE_IMAGE as error:
            reason = getattr(error, "strerror", None) or str(error)
            return index, torch.empty(0, dtype=torch.uint8), f"{path}: {reason}"


class ClaimedBatches(Sampler[list[int]]):
    """FrameDataset indices in batches of `batch_size`, across video boundaries, of the videos
    `take` accepts; it is asked for each video when the first batch reaching it is drawn.

    The DataLoader draws batches in the main process, a few ahead of the forward pass, so
    videos are claimed in order as the run reaches them.
    """

    def __init__(
        self, jobs: list[VideoJob], batch_size: int, take: Callable[[VideoJob], bool]
    ) -> None:
        self.jobs, self.batch_size, self.take = jobs, batch_size, take

    def __iter__(self):
        batch: list[int] = []
        start = 0
        for job in self.jobs:
            if self.take(job):
                for index in range(start, start + len(job.frames)):
                    batch.append(index)
                    if len(batch) == self.batch_size:
                        yield batch
                        batch = []
            start += len(job.frames)
        if batch:
            yield batch


def collate_frames(items: list[tuple[int, torch.Tensor, str]]) -> dict:
    """Stack the decoded frames (a list when sizes differ) and keep the failures apart."""
    good = [(index, image) for index, image, reason in items if not reason]
    images = [image for _, image in good]
    same_size = len({image.shape for image in images}) <= 1
    return {
        "index": torch.tensor([index for index, _ in good], dtype=torch.long),
        "images": torch.stack(images) if images and same_size else images,
        "failed": [(index, reason) for index, _, reason in items if reason],
    }

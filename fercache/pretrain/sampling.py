"""The batches a run draws (class-balanced, or uniform), each item with the seed its views are
drawn from, and the held-out split used for evaluation.

Every stream starts at a batch number: a run resumed at step k draws from batch k on exactly
what the uninterrupted run drew there (docs/pretrain.md, "Resume").
"""

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from fercache.data.tasks import EXPR_CLASSES
from fercache.errors import FercacheError


def check_every_class(
    labels: np.ndarray, num_classes: int, where: str = "the labelled images"
) -> None:
    """A FercacheError naming each class no label in `labels` has (by name and number):
    class-balanced batches need images of every class."""
    missing = [c for c in range(num_classes) if not np.any(np.asarray(labels) == c)]
    if missing:
        names = ", ".join(f"{EXPR_CLASSES[c]} ({c})" for c in missing)
        raise FercacheError(
            f"class-balanced batches need every class, but {where} hold no image of {names}: "
            "add a source that has them"
        )


class BalancedBatchSampler:
    """Endless batches with the same number of images of every class (Yu et al. §3.2.1).

    Each class is walked through in its own reshuffled order, so a rare class repeats only
    after all its images were used. When `batch_size` is not a multiple of the number of
    classes, the left-over places go to classes drawn at random, so counts differ by at most 1.
    The stream starts at batch `start`: each batch depends on all before it, so those are drawn
    and dropped (index lists only, no image is read).
    """

    def __init__(
        self, labels: np.ndarray, num_classes: int, batch_size: int, seed: int, start: int = 0
    ):
        labels = np.asarray(labels)
        check_every_class(labels, num_classes)
        self.by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self._order = [self.rng.permutation(indices) for indices in self.by_class]
        self._position = [0] * num_classes
        for _ in range(start):
            self.next_batch()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> list[int]:
        num_classes = len(self.by_class)
        counts = np.full(num_classes, self.batch_size // num_classes)
        extra = self.rng.choice(num_classes, self.batch_size % num_classes, replace=False)
        counts[extra] += 1
        batch = [index for c in range(num_classes) for index in self._take(c, counts[c])]
        return [int(index) for index in self.rng.permutation(batch)]

    def _take(self, cls: int, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            if self._position[cls] == len(self._order[cls]):
                self._order[cls] = self.rng.permutation(self.by_class[cls])
                self._position[cls] = 0
            taken.append(self._order[cls][self._position[cls]])
            self._position[cls] += 1
        return taken


class UniformBatches:
    """Endless batches of indices below `size`, drawn uniformly with replacement (the loader
    never runs dry); batch k depends on (`seed`, k) alone, so the stream starts at batch `start`
    at no cost."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0):
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        for number in itertools.count(self.start):
            rng = np.random.default_rng([self.seed, number])
            yield rng.integers(self.size, size=self.batch_size).tolist()


class SeededBatches:
    """`batches` (the stream from batch `start` on) with each index paired with the seed its
    views are drawn from (`views.SeededViews`): a function of (`seed`, batch number, place in
    the batch) alone, so an image's augmentation depends neither on the loader process that
    makes it nor on what that process made before, nor on where the run was resumed."""

    def __init__(self, batches: Iterable[list[int]], seed: int, start: int = 0):
        self.batches, self.seed, self.start = batches, seed, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for number, batch in enumerate(self.batches, start=self.start):
            seeds = np.random.SeedSequence([self.seed, number]).generate_state(len(batch))
            yield [(int(index), int(seed)) for index, seed in zip(batch, seeds, strict=True)]


def holdout_split(
    labels: np.ndarray, videos: list[str | None], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out) of the labelled images.

    Still images (`videos[i]` None): `fraction` of every class held out, at least one image of
    each class with two or more, so the held-out F1 covers every class. Video frames: whole
    videos are held out, about `fraction` of the frames: frames of one video are near-duplicates
    of each other, so holding out single frames would score the network on the people and
    moments it trained on. A video is kept for training when holding it out would leave a class
    without training images, and at least one video always stays.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_still = np.array([video is None for video in videos], dtype=bool)
    held = [_still_holdout(labels, is_still, fraction, rng)]
    held.append(_video_holdout(labels, videos, is_still, fraction, rng, held[0]))
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def _still_holdout(
    labels: np.ndarray, is_still: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    held: list[np.ndarray] = [np.empty(0, dtype=int)]
    for cls in np.unique(labels[is_still]):
        indices = rng.permutation(np.flatnonzero(is_still & (labels == cls)))
        count = max(1, round(fraction * len(indices))) if len(indices) >= 2 else 0
        held.append(indices[:count])
    return np.concatenate(held)


def _video_holdout(
    labels: np.ndarray,
    videos: list[str | None],
    is_still: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    held_stills: np.ndarray,
) -> np.ndarray:
    """Whole videos, in a seeded order, until `fraction` of the video frames is held out."""
    frames = np.flatnonzero(~is_still)
    if not len(frames):
        return frames
    names, video_of = np.unique([videos[i] for i in frames], return_inverse=True)
    classes = np.unique(labels, return_inverse=True)[1]  # -1 (no EXPR label) counts as one
    width = classes.max() + 1
    per_video = np.zeros((len(names), width), dtype=int)
    np.add.at(per_video, (video_of, classes[frames]), 1)
    training = np.bincount(classes, minlength=width) - np.bincount(
        classes[held_stills], minlength=width
    )
    taken: list[int] = []
    for video in rng.permutation(len(names)):
        if per_video[taken].sum() >= fraction * len(frames) or len(taken) == len(names) - 1:
            break
        left = training - per_video[video]
        if np.all((left > 0) | (training == 0)):  # every class it trains on stays
            taken.append(int(video))
            training = left
    return frames[np.isin(video_of, taken)]


def cap_per_class(
    labels: np.ndarray, capped: np.ndarray, cap: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, rest): of the images where `capped` is true, at most `cap` of each class,
    drawn at random with `seed` (Yu et al. §4.1: 8,000 per class of AffectNet + ExpW, the rest
    unlabelled); every other image is kept. `cap` 0 keeps everything."""
    labels = np.asarray(labels)
    capped = np.asarray(capped, dtype=bool)
    rng = np.random.default_rng([seed, 19])
    rest: list[np.ndarray] = [np.empty(0, dtype=int)]
    for cls in np.unique(labels[capped]) if cap > 0 else []:
        indices = np.flatnonzero(capped & (labels == cls))
        if len(indices) > cap:
            rest.append(rng.permutation(indices)[cap:])
    left = np.sort(np.concatenate(rest))
    return np.setdiff1d(np.arange(len(labels)), left), left

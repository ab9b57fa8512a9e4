"""Per-frame features of one or more caches, fused per video and aligned on frame numbers.

Several caches (e.g. two backbones) are fused the way ABAW teams fuse them: their features of
the same frame are concatenated along the feature axis. Rule for frame sets: every cache must
hold exactly the same frames of a video (they were extracted from the same image folders); a
mismatch is an error naming the video and both caches, never silently intersected or filled.

Two ways to serve windows to the trainer, chosen by `--memory-budget`:
- `MemoryFeatures`: every needed video read once into RAM as float16; a window is a slice.
- `LazyFeatures`: windows read from the HDF5 stores through handles opened lazily in the
  process that reads (each DataLoader worker opens its own after the fork) and kept open.
"""

import os
import resource
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from fercache.errors import FercacheError
from fercache.progress import progress_bar
from fercache.store import FeatureCache, open_store, store_handle

FEATURE_DTYPE = np.float16
_LISTED = 5  # names or frames quoted in an error before "…"


@dataclass(frozen=True)
class FusedVideo:
    """One video's fused features: `frames` int32 1-based ascending, `features` (T, D_total)."""

    frames: np.ndarray
    features: np.ndarray


@dataclass(frozen=True)
class CacheSet:
    """The caches a run reads, in the order their features are concatenated."""

    caches: tuple[FeatureCache, ...]

    @classmethod
    def open(cls, cache_dirs: Sequence[Path]) -> "CacheSet":
        if not cache_dirs:
            raise FercacheError("no feature cache given; pass at least one CACHE_DIR")
        return cls(tuple(FeatureCache.open(Path(directory)) for directory in cache_dirs))

    @property
    def feature_dim(self) -> int:
        return sum(cache.feature_dim for cache in self.caches)

    @property
    def fingerprints(self) -> list[str]:
        return [str(cache.provenance["fingerprint"]) for cache in self.caches]

    def describe(self) -> list[dict]:
        """What a run records about its inputs (model.json), so predict can check them."""
        return [
            {
                "path": str(cache.root),
                "fingerprint": str(cache.provenance["fingerprint"]),
                "backbone": cache.provenance.get("backbone"),
                "feature_dim": cache.feature_dim,
            }
            for cache in self.caches
        ]

    def require(self, videos: Sequence[str], purpose: str) -> None:
        """A FercacheError listing every video of `purpose` that some cache lacks."""
        for cache in self.caches:
            missing = [video for video in videos if video not in cache.manifest["videos"]]
            if missing:
                shown = ", ".join(missing[:_LISTED]) + (" …" if len(missing) > _LISTED else "")
                raise FercacheError(
                    f"{cache.root}: no features for {len(missing)} video(s) of {purpose}: "
                    f"{shown}. Extract them (`fercache extract DATA --out {cache.root}` resumes "
                    "and adds the missing videos)."
                )

    def rows(self, video: str) -> int:
        return int(self.caches[0].manifest["videos"][video]["rows"])

    def bytes_in_memory(self, videos: Sequence[str]) -> int:
        return sum(self.rows(video) for video in videos) * self.feature_dim * 2

    def frames(self, video: str) -> np.ndarray:
        """The video's frame numbers, checked to be identical in every cache."""
        first: np.ndarray | None = None
        for cache in self.caches:
            with open_store(cache.path(video)) as store:
                frames = store["frames"][:].astype(np.int32)
            if first is None:
                first = frames
            elif not np.array_equal(first, frames):
                raise FercacheError(_mismatch(video, self.caches[0], first, cache, frames))
        return first

    def read(self, video: str) -> FusedVideo:
        frames = self.frames(video)
        parts = []
        for cache in self.caches:
            with open_store(cache.path(video)) as store:
                parts.append(store["features"][:].astype(FEATURE_DTYPE, copy=False))
        return FusedVideo(frames, np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])


def _mismatch(
    video: str, cache_a: FeatureCache, frames_a: np.ndarray, cache_b: FeatureCache, frames_b
) -> str:
    only_a = np.setdiff1d(frames_a, frames_b)[:_LISTED].tolist()
    only_b = np.setdiff1d(frames_b, frames_a)[:_LISTED].tolist()
    return (
        f"video '{video}': the caches hold different frames ({cache_a.root}: {len(frames_a)} "
        f"rows, frames only there {only_a}; {cache_b.root}: {len(frames_b)} rows, frames only "
        f"there {only_b}). Fused caches must come from the same image folders: re-extract the "
        "video into both caches (`fercache extract --force --videos VIDEO`)."
    )


def load_fused_features(cache_dirs: list[Path], videos: list[str]) -> dict[str, FusedVideo]:
    """Every video's features from all caches, concatenated along dim 1 (see module doc)."""
    caches = CacheSet.open(cache_dirs)
    caches.require(videos, "the requested videos")
    return {video: caches.read(video) for video in videos}


class MemoryFeatures:
    """All needed videos in RAM (float16); windows are slices."""

    def __init__(self, videos: list[FusedVideo]) -> None:
        self.videos = videos
        self.feature_dim = videos[0].features.shape[1] if videos else 0

    @classmethod
    def load(cls, caches: CacheSet, names: Sequence[str], progress: bool) -> "MemoryFeatures":
        fused = []
        with progress_bar("loading features", len(names), enabled=progress) as advance:
            for name in names:
                fused.append(caches.read(name))
                advance()
        return cls(fused)

    def frames(self, index: int) -> np.ndarray:
        return self.videos[index].frames

    def rows(self, index: int) -> int:
        return len(self.videos[index].frames)

    def window(self, index: int, start: int, stop: int) -> np.ndarray:
        return self.videos[index].features[start:stop]

    def whole(self, index: int) -> np.ndarray:
        return self.videos[index].features


@dataclass
class LazyFeatures:
    """Windows read from the HDF5 stores; handles open on first use in the reading process."""

    caches: CacheSet
    names: list[str]
    frame_numbers: list[np.ndarray]
    _handles: dict[tuple[int, int], h5py.File] = field(default_factory=dict, repr=False)
    _owner_pid: int = field(default=-1, repr=False)

    @classmethod
    def open(cls, caches: CacheSet, names: Sequence[str], progress: bool) -> "LazyFeatures":
        frames = []
        with progress_bar("checking frames", len(names), enabled=progress) as advance:
            for name in names:
                frames.append(caches.frames(name))
                advance()
        return cls(caches, list(names), frames)

    @property
    def feature_dim(self) -> int:
        return self.caches.feature_dim

    def frames(self, index: int) -> np.ndarray:
        return self.frame_numbers[index]

    def rows(self, index: int) -> int:
        return len(self.frame_numbers[index])

    def window(self, index: int, start: int, stop: int) -> np.ndarray:
        parts = [
            store["features"][start:stop].astype(FEATURE_DTYPE, copy=False)
            for store in self._stores(index)
        ]
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def whole(self, index: int) -> np.ndarray:
        return self.window(index, 0, self.rows(index))

    def _stores(self, index: int) -> Iterator[h5py.File]:
        # h5py handles must not cross a fork: a worker that inherits them opens its own.
        if self._owner_pid != os.getpid():
            self._handles = {}
            self._owner_pid = os.getpid()
        for position, cache in enumerate(self.caches.caches):
            key = (index, position)
            if key not in self._handles:
                if len(self._handles) >= _open_store_limit():
                    self._handles.pop(next(iter(self._handles))).close()  # the oldest
                self._handles[key] = store_handle(cache.path(self.names[index]))
            yield self._handles[key]

    def __getstate__(self) -> dict:
        # Sent to spawned workers without open handles; they reopen on first use.
        return {**self.__dict__, "_handles": {}, "_owner_pid": -1}


def _open_store_limit() -> int:
    """Stores one process keeps open: half its open-file limit, the rest for everything else."""
    return max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)


def open_features(
    caches: CacheSet, names: Sequence[str], budget_bytes: int, progress: bool
) -> MemoryFeatures | LazyFeatures:
    """In memory when the fused float16 features fit the budget, else lazily from HDF5."""
    if caches.bytes_in_memory(names) <= budget_bytes:
        return MemoryFeatures.load(caches, names, progress)
    return LazyFeatures.open(caches, names, progress)

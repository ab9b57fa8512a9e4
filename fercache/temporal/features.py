"""Per-frame features of one or more caches, fused per video and aligned on frame numbers.

Several caches (e.g. two backbones, or a visual cache and imported audio features) are fused
the way ABAW teams fuse them: their features of the same frame are concatenated along the
feature axis, in the order the caches are given.

Rule for frame sets. The fused rows are the frames of the first extracted cache (of the first
cache when every cache is imported), less the frames any imported cache records missing:
- every other extracted cache must hold exactly those frames (they were extracted from the same
  image folders);
- an imported cache (`fercache import-features`: its stores list `missing_frames`) must hold
  each of them or record it missing; its rows for frames the extracted caches do not have (no
  face image) are not used;
- a frame an imported cache records missing is left out of the fused rows: to training it is a
  frame without features, and `predict` fills it from the nearest frames, as it fills frames
  without an image.
Any other difference is an error naming the video and both caches, never silently intersected
or filled. Each cache keeps the store rows of the fused frames (`FusedRows.rows`), so a window
of fused rows maps to each store's rows, in memory and lazily.

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
from fercache.features.store import FeatureCache, missing_frames, store_handle
from fercache.progress import progress_bar

FEATURE_DTYPE = np.float16
_LISTED = 5  # names or frames quoted in an error before "…"


@dataclass(frozen=True)
class FusedVideo:
    """One video's fused features: `frames` int32 1-based ascending, `features` (T, D_total)."""

    frames: np.ndarray
    features: np.ndarray


@dataclass(frozen=True)
class FusedRows:
    """A video's fused frames (int32, 1-based, ascending) and, per cache, the store rows that
    hold them (None: the store's rows are exactly those frames, in order)."""

    frames: np.ndarray
    rows: tuple[np.ndarray | None, ...]

    def window(self, position: int, start: int, stop: int) -> slice | np.ndarray:
        """Cache `position`'s store rows of fused rows start..stop."""
        rows = self.rows[position]
        return slice(start, stop) if rows is None else rows[start:stop]


@dataclass(frozen=True)
class _StoreFrames:
    """One cache's frames of a video: its rows, and the frames it records missing (None for an
    extracted store)."""

    cache: FeatureCache
    frames: np.ndarray
    missing: np.ndarray | None

    @classmethod
    def of(cls, cache: FeatureCache, store: h5py.File) -> "_StoreFrames":
        return cls(cache, store["frames"][:].astype(np.int32), missing_frames(store))

    @property
    def imported(self) -> bool:
        return self.missing is not None


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
                "source_kind": cache.provenance.get("source_kind", ""),  # imported: npy, csv, ...
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
        """The video's fused frame numbers (see the module's rule for frame sets)."""
        return self.layout(video).frames

    def layout(self, video: str) -> FusedRows:
        """The video's fused frames and each cache's rows of them, by the module's rule."""
        return _fuse(video, [_store_frames(cache, video) for cache in self.caches])

    def read(self, video: str) -> FusedVideo:
        """The video's fused features, each store opened once."""
        stores, features = [], []
        for cache in self.caches:
            with cache.open_store(video) as store:
                stores.append(_StoreFrames.of(cache, store))
                features.append(store["features"][:].astype(FEATURE_DTYPE, copy=False))
        layout = _fuse(video, stores)
        parts = [
            part if rows is None else part[rows]
            for part, rows in zip(features, layout.rows, strict=True)
        ]
        return FusedVideo(
            layout.frames, np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        )


def _store_frames(cache: FeatureCache, video: str) -> _StoreFrames:
    with cache.open_store(video) as store:
        return _StoreFrames.of(cache, store)


def _fuse(video: str, stores: list[_StoreFrames]) -> FusedRows:
    """The fused frames of one video's stores and each store's rows of them (module's rule)."""
    reference = next((store for store in stores if not store.imported), stores[0])
    dropped = [store.missing for store in stores if store.imported]
    fused = reference.frames
    if dropped:
        fused = np.setdiff1d(fused, np.concatenate(dropped)).astype(np.int32)
    rows = []
    for store in stores:
        if store.imported and store is not reference:
            known = np.union1d(store.frames, store.missing)
            if not np.isin(reference.frames, known).all():
                raise FercacheError(_mismatch(video, reference, store))
        elif not np.array_equal(store.frames, reference.frames):
            raise FercacheError(_mismatch(video, reference, store))
        same = np.array_equal(store.frames, fused)
        rows.append(None if same else np.searchsorted(store.frames, fused))
    return FusedRows(fused, tuple(rows))


def _mismatch(video: str, a: _StoreFrames, b: _StoreFrames) -> str:
    only_a = np.setdiff1d(a.frames, b.frames)
    if b.imported:
        only_a = np.setdiff1d(only_a, b.missing)
        return (
            f"video '{video}': {b.cache.root} (imported) neither holds nor records missing "
            f"{len(only_a)} frame(s) of {a.cache.root}, e.g. {only_a[:_LISTED].tolist()}. "
            "Import the video again against the same Aff-Wild2 tree (`fercache import-features "
            "... --data DATA --force`)."
        )
    only_b = np.setdiff1d(b.frames, a.frames)[:_LISTED].tolist()
    return (
        f"video '{video}': the caches hold different frames ({a.cache.root}: {len(a.frames)} "
        f"rows, frames only there {only_a[:_LISTED].tolist()}; {b.cache.root}: {len(b.frames)} "
        f"rows, frames only there {only_b}). Fused caches must come from the same image "
        "folders: re-extract the video into both caches (`fercache extract --force --videos "
        "VIDEO`)."
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
    layouts: list[FusedRows]
    _handles: dict[tuple[int, int], h5py.File] = field(default_factory=dict, repr=False)
    _owner_pid: int = field(default=-1, repr=False)

    @classmethod
    def open(cls, caches: CacheSet, names: Sequence[str], progress: bool) -> "LazyFeatures":
        layouts = []
        with progress_bar("checking frames", len(names), enabled=progress) as advance:
            for name in names:
                layouts.append(caches.layout(name))
                advance()
        return cls(caches, list(names), layouts)

    @property
    def feature_dim(self) -> int:
        return self.caches.feature_dim

    def frames(self, index: int) -> np.ndarray:
        return self.layouts[index].frames

    def rows(self, index: int) -> int:
        return len(self.layouts[index].frames)

    def window(self, index: int, start: int, stop: int) -> np.ndarray:
        layout = self.layouts[index]
        parts = [
            _read_rows(store["features"], layout.window(position, start, stop))
            for position, store in enumerate(self._stores(index))
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
                # each store was checked against its cache's manifest by `open` (`layout`)
                self._handles[key] = store_handle(cache.path(self.names[index]))
            yield self._handles[key]

    def __getstate__(self) -> dict:
        # Sent to spawned workers without open handles; they reopen on first use.
        return {**self.__dict__, "_handles": {}, "_owner_pid": -1}


def _read_rows(features: h5py.Dataset, rows: slice | np.ndarray) -> np.ndarray:
    """Rows of a store's features as float16: one contiguous read, then numpy picks the rows
    (h5py's own fancy indexing is slow)."""
    if isinstance(rows, slice):
        return features[rows].astype(FEATURE_DTYPE, copy=False)
    if len(rows) == 0:
        return np.empty((0, features.shape[1]), FEATURE_DTYPE)
    block = features[int(rows[0]) : int(rows[-1]) + 1].astype(FEATURE_DTYPE, copy=False)
    return block[rows - rows[0]]


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

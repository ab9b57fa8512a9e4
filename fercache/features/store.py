"""The feature store: one HDF5 file per video, plus a JSON manifest per cache folder.

Schema of `<video>.h5` (format 1), readable with plain h5py or `h5dump`:

- `features`  (N, D) float16 or float32: pooled pre-logits of the frozen backbone (or the
  readout the attributes `layer`, `pool`, `tta` name: `fercache.backbone.readout`), one row per
  frame that has an image, in increasing frame order; chunked (64, D) so a 64-frame window
  costs one or two chunk reads.
- `frames`    (N,) int32: the 1-based frame number of each row (row i is `{frames[i]:05d}.jpg`).
- `logits`    (N, C) float32, only when the backbone has a classifier head (C classes) and
  the features are not an intermediate layer's.
- attributes: `format_version`, `fercache_version`, `video`, `backbone`, `checkpoint`
  (file name), `checkpoint_sha256` ("" for random init), `init_seed`, `input_size` (C, H, W),
  `mean`, `std`, `interpolation`, `dtype`, `feature_dim`, `num_classes`, `fingerprint`
  (hash of what determines the numbers), `skipped_frames` (frame numbers whose image could not
  be decoded), `skipped_reasons` (JSON list of "file: reason"), and `complete` = 1, set last.
- imported stores (`fercache import-features`, `fercache.features.importing`) carry the import
  fields of the provenance and `missing_frames`: the video's frames the source does not cover (they
  have no row); an extracted store has no `missing_frames` attribute (`missing_frames()` gives
  None).
  Audio stores (`fercache audio`, `fercache.features.audio`) are laid out as imported ones.

A store is written under `.<video>.h5.tmp-<pid>` and renamed when complete
(`fercache.outputs.write_atomically`, as every file fercache writes), so a file under a final
name is always whole. `manifest.json` lists the videos, their row counts and the provenance; it
is written after every store exists.

`provenance.json` records the settings a cache is written with, created exclusively by its first
writer before any store (`prepare_cache`): a writer with other settings is refused even while
the first still runs, and each store and manifest is checked against the record just before it
is renamed into place. Readers (`FeatureCache`) refuse a store whose fingerprint is not the
manifest's.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import h5py
import numpy as np

from fercache import __version__
from fercache.errors import FercacheError
from fercache.outputs import TMP_MARK as TEMPORARY
from fercache.outputs import (
    create_text_exclusively,
    hdf5_image,
    write_made_atomically,
    write_text_atomically,
)
from fercache.readers import first_line, read_json_object, unreadable

FORMAT_VERSION = 1
CHUNK_FRAMES = 64
MANIFEST_NAME = "manifest.json"
PROVENANCE_NAME = "provenance.json"  # the settings of a cache, recorded before its first store
STORE_SUFFIX = ".h5"
TMP_MARK = STORE_SUFFIX + TEMPORARY  # what `write_atomically` names a store being written
MISSING_FRAMES = "missing_frames"  # imported stores: the attribute of frames without a row


@dataclass(frozen=True)
class Provenance:
    """What produced the numbers in a store. Equal fingerprints mean interchangeable stores."""

    backbone: str  # the timm model that computed the features; "" for an imported cache
    checkpoint: str
    checkpoint_sha256: str
    init_seed: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    dtype: str
    feature_dim: int
    num_classes: int
    # Added after format 1's first stores: each counts in the fingerprint only when it differs
    # from its default, so a store written before it existed keeps its fingerprint.
    pretrained: str = ""  # timm's pretrained name the weights came from (tag included)
    weights_source: str = ""  # where timm found them: hub id, URL or local file
    layer: int = -1  # the block the features come from; -1: the network's pooled output
    pool: str = ""  # how a token model's tokens are pooled; "": the network's own head pooling
    tta: str = ""  # test-time augmentation averaged into each frame's features ("flip")
    # Imported caches (`fercache.features.importing`): where the features came from and how they
    # were aligned to the frames. `source` (a path) is left out of the fingerprint like
    # `checkpoint`.
    source: str = ""  # the imported file or folder
    source_kind: str = ""  # npy, npz, hdf5 or csv
    source_key: str = ""  # the array read from each .npz
    source_sha256: str = ""  # the source files, and each video's frame count and fps
    rate: float = 0.0  # samples per second of an array source
    time_column: str = ""  # the CSV column placing each row: seconds, or 1-based frames
    fps: float = 0.0  # frames per second given; 0: each video's own (store attribute video_fps)
    align: str = ""  # nearest, linear, or frame (a CSV frame column)
    # Audio caches (`fercache.features.audio`): the speech encoder's input rate and how a sound
    # track is cut into forward passes; `pretrained`, `weights_source`, `checkpoint_sha256`,
    # `layer`, `pool`, `rate` and `align` name the encoder and the readout.
    sample_rate: int = 0  # samples per second the encoder reads
    chunk: float = 0.0  # seconds of rows kept from each forward pass
    overlap: float = 0.0  # seconds of context on each side of a chunk, computed and dropped

    @property
    def fingerprint(self) -> str:
        # The checkpoint's file name is left out: the same weights under another name give the
        # same features. The fercache version is recorded but left out too, for the same reason.
        determining = asdict(self)
        for name, default in _EXTENSION_DEFAULTS.items():
            if determining[name] == default:
                determining.pop(name)
        determining.pop("checkpoint")
        determining.pop("source", None)
        if self.checkpoint_sha256:
            determining.pop("init_seed")
        determining["format_version"] = FORMAT_VERSION
        text = json.dumps(determining, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_attrs(cls, attrs: h5py.AttributeManager | dict) -> "Provenance":
        return cls(
            backbone=str(attrs["backbone"]),
            checkpoint=str(attrs["checkpoint"]),
            checkpoint_sha256=str(attrs["checkpoint_sha256"]),
            init_seed=int(attrs["init_seed"]),
            input_size=tuple(int(v) for v in attrs["input_size"]),
            mean=tuple(float(v) for v in attrs["mean"]),
            std=tuple(float(v) for v in attrs["std"]),
            interpolation=str(attrs["interpolation"]),
            dtype=str(attrs["dtype"]),
            feature_dim=int(attrs["feature_dim"]),
            num_classes=int(attrs["num_classes"]),
            **{
                name: type(default)(attrs[name])
                for name, default in _EXTENSION_DEFAULTS.items()
                if name in attrs
            },
        )


# the fields with a default: those added after the first stores of format 1
_EXTENSION_DEFAULTS = {
    item.name: item.default for item in fields(Provenance) if item.default is not MISSING
}


@dataclass
class VideoFeatures:
    """One video's store, read into memory."""

    video: str
    frames: np.ndarray
    features: np.ndarray
    logits: np.ndarray | None
    provenance: Provenance
    skipped_frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    missing_frames: np.ndarray | None = None  # imported stores: frames the source lacks


def store_path(cache_dir: Path, video: str) -> Path:
    return Path(cache_dir) / f"{video}{STORE_SUFFIX}"


def write_store(
    cache_dir: Path,
    video: str,
    frames: np.ndarray,
    features: np.ndarray,
    logits: np.ndarray | None,
    provenance: Provenance,
    skipped: Iterable[tuple[int, str]] = (),
    missing: np.ndarray | None = None,
    details: Mapping[str, object] | None = None,
) -> Path:
    """Write one video's store atomically; on any failure no file is left under either name.

    `missing` (imported stores only) is written as `missing_frames`; `details` are further
    attributes of the store (an import's `video_fps`, `video_frames`, `source_video`).
    """
    skipped = sorted(skipped)

    def fill(store: h5py.File) -> None:
        _write_datasets(store, frames, features, logits, provenance.dtype)
        attrs = store.attrs
        for key, value in provenance.to_json().items():
            attrs[key] = value
        attrs["format_version"] = FORMAT_VERSION
        attrs["fercache_version"] = __version__
        attrs["video"] = video
        attrs["skipped_frames"] = np.array([f for f, _ in skipped], dtype=np.int32)
        attrs["skipped_reasons"] = json.dumps([reason for _, reason in skipped])
        if missing is not None:
            attrs[MISSING_FRAMES] = np.asarray(missing, dtype=np.int32)
        for key, value in (details or {}).items():
            attrs[key] = value
        attrs["complete"] = 1

    return write_made_atomically(
        store_path(cache_dir, video),
        lambda: hdf5_image(fill),
        "the feature store",
        "free disk space or choose another --out; finished stores are kept and a rerun resumes",
        publish=_if_recorded(cache_dir, provenance),
    )


def _write_datasets(
    store: h5py.File,
    frames: np.ndarray,
    features: np.ndarray,
    logits: np.ndarray | None,
    dtype: str,
) -> None:
    rows = len(frames)
    chunk_rows = max(1, min(CHUNK_FRAMES, rows))
    store.create_dataset(
        "features",
        data=np.asarray(features, dtype=dtype),
        chunks=(chunk_rows, features.shape[1]) if rows else None,
    )
    store.create_dataset("frames", data=np.asarray(frames, dtype=np.int32))
    if logits is not None:
        store.create_dataset("logits", data=np.asarray(logits, dtype=np.float32))


def missing_frames(store: h5py.File) -> np.ndarray | None:
    """An imported store's frames without a row (int32), or None for an extracted store."""
    if MISSING_FRAMES not in store.attrs:
        return None
    return np.asarray(store.attrs[MISSING_FRAMES], dtype=np.int32).reshape(-1)


REWRITE_STORE = "rerun `fercache extract` on its cache (it recomputes damaged stores)"
REWRITE_MANIFEST = (
    "delete it and rerun `fercache extract DATA --out CACHE_DIR` (finished stores are kept)"
)


@contextmanager
def open_store(path: Path) -> Iterator[h5py.File]:
    """A feature store opened for reading: the one way fercache opens a store.

    Any failure to open or read it (missing, truncated, garbage, another program's HDF5 without
    the datasets) becomes a FercacheError naming the file and the command that rewrites it.
    """
    store = store_handle(path)
    try:
        with store:
            yield store
    except (OSError, KeyError, ValueError) as error:
        raise _unreadable(path, error) from error


def store_handle(path: Path) -> h5py.File:
    """An open read handle on a store, for readers that keep it open (close it yourself)."""
    path = Path(path)
    if not path.is_file():
        raise FercacheError(f"{path}: feature store missing; {REWRITE_STORE}")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> FercacheError:
    return unreadable(path, "feature store", first_line(error), REWRITE_STORE)


def store_state(path: Path) -> tuple[str, Provenance | None]:
    """('complete', provenance), ('incomplete', None) or ('missing', None) for a store path."""
    if not path.exists():
        return "missing", None
    try:
        with h5py.File(path, "r") as store:
            if int(store.attrs.get("complete", 0)) != 1:
                return "incomplete", None
            return "complete", Provenance.from_attrs(store.attrs)
    except (OSError, KeyError):
        return "incomplete", None


def read_store(path: Path) -> VideoFeatures:
    """Read a whole store into memory; a clear error for anything that is not a complete store."""
    path = Path(path)
    with open_store(path) as store:
        if int(store.attrs.get("complete", 0)) != 1:
            raise FercacheError(f"{path}: incomplete feature store; {REWRITE_STORE}")
        return VideoFeatures(
            video=str(store.attrs["video"]),
            frames=store["frames"][:],
            features=store["features"][:],
            logits=store["logits"][:] if "logits" in store else None,
            provenance=Provenance.from_attrs(store.attrs),
            skipped_frames=np.asarray(store.attrs["skipped_frames"], dtype=np.int32),
            missing_frames=missing_frames(store),
        )


def write_manifest(
    cache_dir: Path,
    provenance: Provenance,
    videos: dict[str, dict],
    without_images: Iterable[str] = (),
) -> Path:
    """Write `manifest.json` atomically: provenance plus {video: {rows, skipped}} for all stores,
    and the videos whose image folder held no frame (`without_images`: they have no store)."""
    path = Path(cache_dir) / MANIFEST_NAME
    manifest = {
        "format_version": FORMAT_VERSION,
        "fercache_version": __version__,
        "provenance": provenance.to_json(),
        "total_rows": sum(entry["rows"] for entry in videos.values()),
        "videos": dict(sorted(videos.items())),
        **({"without_images": sorted(without_images)} if without_images else {}),
    }
    return write_text_atomically(
        path,
        json.dumps(manifest, indent=2),
        "the cache manifest",
        publish=_if_recorded(cache_dir, provenance),
    )


def read_manifest(cache_dir: Path) -> dict:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.exists():
        raise FercacheError(
            f"{path}: no manifest; {cache_dir} is not a finished feature cache. "
            "Run `fercache extract DATA --out CACHE_DIR` first (it resumes)."
        )
    manifest = read_json_object(path, "cache manifest", REWRITE_MANIFEST)
    provenance, videos = manifest.get("provenance"), manifest.get("videos")
    if not (
        isinstance(provenance, dict)
        and {"fingerprint", "feature_dim", "num_classes"} <= set(provenance)
        and isinstance(videos, dict)
        and all(isinstance(entry, dict) and "rows" in entry for entry in videos.values())
    ):
        raise unreadable(
            path, "cache manifest", "no provenance and videos as extract writes", REWRITE_MANIFEST
        )
    return manifest


def describe(provenance: dict) -> str:
    """What made a cache, in a few words, for errors that compare two caches."""
    if provenance.get("source_kind") == "audio":  # made by `fercache audio`
        readout = "mean of layers" if provenance["layer"] < 0 else f"layer {provenance['layer']}"
        return (
            f"audio by {provenance['pretrained'] or provenance['checkpoint']} [{readout}, "
            f"chunk {provenance['chunk']:g} s, align {provenance['align']}, "
            f"fingerprint {provenance['fingerprint']}]"
        )
    if provenance.get("source_kind"):  # made by `fercache import-features`
        place = f"rate {provenance['rate']:g}" if provenance["rate"] else provenance["time_column"]
        return (
            f"imported {provenance['source_kind']} from {provenance['source']} [{place}, "
            f"align {provenance['align']}, fingerprint {provenance['fingerprint']}]"
        )
    weights = (
        " ".join(filter(None, [provenance.get("pretrained"), provenance["checkpoint"]]))
        or f"random init (seed {provenance['init_seed']})"
    )
    size = "x".join(str(v) for v in provenance["input_size"][1:])
    readout = [
        f"{key} {provenance[key]}"
        for key, default in (("layer", -1), ("pool", ""), ("tta", ""))
        if provenance.get(key, default) != default
    ]
    details = ", ".join([weights, size, provenance["dtype"], *readout])
    return f"{provenance['backbone']} [{details}]"


def prepare_cache(cache_dir: Path, provenance: Provenance, force: bool) -> None:
    """Make `cache_dir` a cache of `provenance` before a writer (extract, import-features,
    audio) writes a store into it; a FercacheError when it is another's, unless `force`.

    The first writer records its settings in `provenance.json`, created exclusively: of several
    writers starting on one new cache at once, exactly one records them, and the others go on
    only with the same settings (then they share the work). With `force` a writer's settings
    replace the recorded ones, and a writer still running with those stops at its next store
    (`write_store` checks the record). A cache written before the record existed is its
    manifest's or, without one, its stores'.
    """
    root = Path(cache_dir)
    check_manifest(root, provenance, force)
    recorded = recorded_provenance(root)
    if recorded is None:
        if not force and not (root / MANIFEST_NAME).exists():
            _check_unrecorded_stores(root, provenance)
        text = json.dumps(provenance.to_json(), indent=2)
        if create_text_exclusively(root / PROVENANCE_NAME, text, "the cache's settings"):
            return
        recorded = recorded_provenance(root)  # another writer recorded them first
    if recorded["fingerprint"] == provenance.fingerprint:
        return
    if not force:
        raise FercacheError(
            f"{root}: holds features of {describe(recorded)} (fingerprint "
            f"{recorded['fingerprint']}, recorded in {PROVENANCE_NAME} by its first writer), not "
            f"of this run's {describe(provenance.to_json())} (fingerprint "
            f"{provenance.fingerprint}): {_differences(recorded, provenance)}. Use another --out, "
            "or the cache's settings to add to it (--force replaces them)."
        )
    write_text_atomically(
        root / PROVENANCE_NAME, json.dumps(provenance.to_json(), indent=2), "the cache's settings"
    )


def recorded_provenance(cache_dir: Path) -> dict | None:
    """The provenance `provenance.json` records (with its fingerprint); None when it is absent."""
    path = Path(cache_dir) / PROVENANCE_NAME
    if not path.exists():
        return None
    remedy = f"delete it; the next writer of {Path(cache_dir)} records its settings again"
    recorded = read_json_object(path, "record of the cache's settings", remedy)
    if not isinstance(recorded.get("fingerprint"), str):
        raise unreadable(path, "record of the cache's settings", "no fingerprint", remedy)
    return recorded


def _differences(recorded: dict, provenance: Provenance) -> str:
    """`key cache's value, this run's value` for every field of `provenance` that differs."""
    given = json.loads(json.dumps(provenance.to_json()))  # tuples as the record's lists
    changed = [
        f"{key} {json.dumps(recorded.get(key))} there, {json.dumps(value)} here"
        for key, value in given.items()
        if key != "fingerprint" and recorded.get(key) != value
    ]
    return "; ".join(changed) or "the format differs"


def _check_unrecorded_stores(root: Path, provenance: Provenance) -> None:
    """A store of other features in a cache without a record or a manifest (one a run of an
    earlier fercache version was killed in) is an error."""
    for path in sorted(root.glob(f"*{STORE_SUFFIX}")):
        state, found = store_state(path)
        if state == "complete" and found.fingerprint != provenance.fingerprint:
            raise other_store(path, found, provenance)


def _if_recorded(cache_dir: Path, provenance: Provenance) -> Callable[[Path, Path], None]:
    """`write_atomically`'s last step for a file of a cache of `provenance`: renamed into place
    only while the cache records `provenance` (a cache without a record takes anything)."""

    def publish(tmp: Path, path: Path) -> None:
        recorded = recorded_provenance(cache_dir)
        if recorded is not None and recorded["fingerprint"] != provenance.fingerprint:
            raise FercacheError(
                f"{path}: not written: {Path(cache_dir)} records features of "
                f"{describe(recorded)} (fingerprint {recorded['fingerprint']}) now, not of this "
                f"run's (fingerprint {provenance.fingerprint}): another run replaced its settings "
                "(--force). Use another --out, or the cache's settings."
            )
        os.replace(tmp, path)

    return publish


def check_manifest(cache_dir: Path, provenance: Provenance, force: bool) -> None:
    """A FercacheError unless the cache in `cache_dir` is new, forced, or of `provenance`."""
    path = Path(cache_dir) / MANIFEST_NAME
    if force or not path.exists():
        return
    recorded = read_manifest(cache_dir)["provenance"]
    if recorded["fingerprint"] != provenance.fingerprint:
        raise FercacheError(
            f"{path}: this cache holds features of {describe(recorded)}, not of "
            f"{describe(provenance.to_json())}. Use another --out, or --force to replace them."
        )


def other_store(path: Path, found: Provenance, provenance: Provenance) -> FercacheError:
    """The error for a complete store of other features where one of `provenance` should go."""
    return FercacheError(
        f"{path}: a store of {describe(found.to_json())} already lies here, not of "
        f"{describe(provenance.to_json())}. Use another --out, or --force to replace it."
    )


@dataclass(frozen=True)
class FeatureCache:
    """A finished cache folder: its manifest, and its stores by video name."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, cache_dir: Path) -> "FeatureCache":
        root = Path(cache_dir)
        if not root.is_dir():
            raise FercacheError(f"{root}: no such feature cache folder")
        return cls(root, read_manifest(root))

    @property
    def videos(self) -> list[str]:
        return list(self.manifest["videos"])

    @property
    def provenance(self) -> dict:
        return self.manifest["provenance"]

    @property
    def feature_dim(self) -> int:
        return int(self.provenance["feature_dim"])

    @property
    def num_classes(self) -> int:
        return int(self.provenance["num_classes"])

    def path(self, video: str) -> Path:
        if video in self.manifest.get("without_images", ()):
            raise FercacheError(
                f"{self.root}: video '{video}' has no features: its image folder held no frame "
                "named 00001.jpg, 00002.jpg, ... when the cache was extracted; put its face "
                "crops there (`fercache crop`) and run `fercache extract` again (it resumes)"
            )
        if video not in self.manifest["videos"]:
            raise FercacheError(
                f"{self.root}: no features for video '{video}'; extract it "
                f"(`fercache extract DATA --out {self.root} --videos {video}`)"
            )
        return store_path(self.root, video)

    def load(self, video: str) -> VideoFeatures:
        path = self.path(video)
        features = read_store(path)
        self._check_fingerprint(path, features.provenance)
        return features

    @contextmanager
    def open_store(self, video: str) -> Iterator[h5py.File]:
        """The video's store opened for reading (`open_store`), refused when its features are
        not those the manifest lists: every reader of a cache opens its stores here."""
        path = self.path(video)
        with open_store(path) as store:
            self._check_fingerprint(path, Provenance.from_attrs(store.attrs))
            yield store

    def _check_fingerprint(self, path: Path, found: Provenance) -> None:
        # A store copied in from another cache, or left by a writer of other settings, would
        # otherwise be read as this cache's features.
        expected = self.provenance["fingerprint"]
        if found.fingerprint == expected:
            return
        raise FercacheError(
            f"{path}: holds features of {describe(found.to_json())} (fingerprint "
            f"{found.fingerprint}), not of its cache's (fingerprint {expected}, "
            f"{self.root / MANIFEST_NAME}): it was copied from another cache or written with "
            f"other settings. Rerun {_writer(self.provenance, self.root)} with the cache's "
            "settings: it writes the store again."
        )


def _writer(provenance: dict, root: Path) -> str:
    """The command that wrote a cache of `provenance`, for advice."""
    if provenance.get("source_kind") == "audio":
        return f"`fercache audio VIDEOS --data DATA --out {root}`"
    if provenance.get("source_kind"):
        return f"`fercache import-features SRC --data DATA --out {root}`"
    return f"`fercache extract DATA --out {root}`"

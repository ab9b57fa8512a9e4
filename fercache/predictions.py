"""The PRED file: per-frame predictions of one split, written by `predict`, read by `smooth`,
`evaluate` and `submit`.

One HDF5 file (format 1), readable with plain h5py or `h5dump`:

- root attributes: `format` = "fercache-predictions", `format_version`, `fercache_version`,
  `split` (train, val or test), `source` (what produced the numbers, e.g.
  "student logits of cache/x (fingerprint ...)"), `classes` (JSON list of the 8 EXPR class
  names, in Aff-Wild2 order) and `smoothing` (JSON list of the votes applied, oldest first,
  each {"window": w, "mode": m}; [] for raw predictions).
- one group `videos/<video>` per video, rows in increasing frame order:
  - `frames`        (N,) int32: 1-based frame numbers (row i is `<video>/{frames[i]:05d}.jpg`);
  - `probabilities` (N, 8) float32: EXPR class probabilities;
  - `labels`        (N,) int16: the predicted class (the arg-max of `probabilities` until a
    vote replaces it);
  - `has_image`     (N,) bool: False where the frame had no features and its probabilities
    came from its nearest frames (see `fercache.predict`);
  - optional `au`   (N, 12) float32: AU probabilities (AU1 … AU26 in Aff-Wild2 order);
  - optional `va`   (N, 2) float32: valence and arousal in [-1, 1].

The file is written under a temporary name and renamed when complete.
"""

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from fercache import __version__
from fercache.data.affwild2 import SPLITS
from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, VA_NAMES
from fercache.errors import FercacheError

FORMAT = "fercache-predictions"
FORMAT_VERSION = 1
_OPTIONAL = {"au": len(AU_NAMES), "va": len(VA_NAMES)}


@dataclass(frozen=True)
class VideoPredictions:
    """One video's rows of a PRED file (see the module doc for each array)."""

    frames: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray
    has_image: np.ndarray
    au: np.ndarray | None = None
    va: np.ndarray | None = None

    @classmethod
    def from_probabilities(
        cls,
        frames: np.ndarray,
        probabilities: np.ndarray,
        has_image: np.ndarray | None = None,
        au: np.ndarray | None = None,
        va: np.ndarray | None = None,
    ) -> "VideoPredictions":
        """Rows labelled with the arg-max class; every frame has an image unless told."""
        probabilities = np.asarray(probabilities, dtype=np.float32)
        return cls(
            frames=np.asarray(frames, dtype=np.int32),
            probabilities=probabilities,
            labels=probabilities.argmax(axis=1).astype(np.int64),
            has_image=np.ones(len(frames), bool) if has_image is None else np.asarray(has_image),
            au=None if au is None else np.asarray(au, dtype=np.float32),
            va=None if va is None else np.asarray(va, dtype=np.float32),
        )

    def problem(self) -> str | None:
        """What is wrong with these rows, or None."""
        rows = len(self.frames)
        shapes = {
            "probabilities": (self.probabilities.shape, (rows, len(EXPR_CLASSES))),
            "labels": (self.labels.shape, (rows,)),
            "has_image": (self.has_image.shape, (rows,)),
            **{
                name: (getattr(self, name).shape, (rows, width))
                for name, width in _OPTIONAL.items()
                if getattr(self, name) is not None
            },
        }
        for name, (shape, expected) in shapes.items():
            if shape != expected:
                return f"'{name}' has shape {shape}, expected {expected}"
        if rows and (self.frames[0] < 1 or (np.diff(self.frames) <= 0).any()):
            return "frame numbers must be 1-based and strictly increasing"
        if not np.isfinite(self.probabilities).all() or (self.probabilities < 0).any():
            return "probabilities must be finite and non-negative"
        if rows and (self.labels.min() < 0 or self.labels.max() >= len(EXPR_CLASSES)):
            return f"labels must lie in [0, {len(EXPR_CLASSES)})"
        return None


@dataclass(frozen=True)
class Predictions:
    """A whole PRED file in memory: videos in file order."""

    split: str
    source: str
    videos: dict[str, VideoPredictions]
    smoothing: tuple[dict, ...] = ()
    classes: tuple[str, ...] = EXPR_CLASSES

    def validate(self, path: Path | str = "predictions") -> None:
        """Raise FercacheError naming `path` (and the video) for anything off-format."""
        if self.split not in SPLITS:
            raise FercacheError(f"{path}: split '{self.split}' is not one of {', '.join(SPLITS)}")
        if tuple(self.classes) != EXPR_CLASSES:
            raise FercacheError(
                f"{path}: classes {list(self.classes)} are not the Aff-Wild2 EXPR classes "
                f"{list(EXPR_CLASSES)} in that order"
            )
        for video, rows in self.videos.items():
            problem = rows.problem()
            if problem:
                raise FercacheError(f"{path}: video '{video}': {problem}")

    @property
    def frame_count(self) -> int:
        return sum(len(rows.frames) for rows in self.videos.values())

    def with_labels(self, labels: dict[str, np.ndarray], smoothing: dict) -> "Predictions":
        """The same predictions with new labels per video and one more smoothing step."""
        videos = {
            video: replace(rows, labels=np.asarray(labels[video], dtype=np.int64))
            for video, rows in self.videos.items()
        }
        return replace(self, videos=videos, smoothing=(*self.smoothing, smoothing))

    def write(self, path: Path) -> Path:
        """Validate, then write atomically to `path`."""
        path = Path(path)
        self.validate(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with h5py.File(tmp, "w") as handle:
                self._write_into(handle)
            os.replace(tmp, path)
        except OSError as error:
            raise FercacheError(
                f"{path}: could not write predictions ({error.strerror or error}); "
                "check the folder exists and has space"
            ) from error
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def _write_into(self, handle: h5py.File) -> None:
        attrs = handle.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["fercache_version"] = __version__
        attrs["split"] = self.split
        attrs["source"] = self.source
        attrs["classes"] = json.dumps(list(self.classes))
        attrs["smoothing"] = json.dumps(list(self.smoothing))
        group = handle.create_group("videos")
        for video, rows in self.videos.items():
            entry = group.create_group(video)
            entry["frames"] = rows.frames.astype(np.int32)
            entry["probabilities"] = rows.probabilities.astype(np.float32)
            entry["labels"] = rows.labels.astype(np.int16)
            entry["has_image"] = rows.has_image.astype(bool)
            for name in _OPTIONAL:
                if getattr(rows, name) is not None:
                    entry[name] = getattr(rows, name).astype(np.float32)

    @classmethod
    def read(cls, path: Path) -> "Predictions":
        """Read and validate a PRED file; FercacheError naming it when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FercacheError(
                f"{path}: no such predictions file; write one with `fercache predict`"
            )
        try:
            with h5py.File(path, "r") as handle:
                predictions = cls._read_from(path, handle)
        except (OSError, KeyError, ValueError) as error:
            raise FercacheError(
                f"{path}: not a readable fercache predictions file ({error}); "
                "rewrite it with `fercache predict`"
            ) from error
        predictions.validate(path)
        return predictions

    @classmethod
    def _read_from(cls, path: Path, handle: h5py.File) -> "Predictions":
        attrs = handle.attrs
        if attrs.get("format") != FORMAT or int(attrs.get("format_version", 0)) != FORMAT_VERSION:
            raise FercacheError(
                f"{path}: not a fercache predictions file of format {FORMAT_VERSION}; "
                "rewrite it with `fercache predict`"
            )
        videos = {}
        for video, entry in handle["videos"].items():
            videos[video] = VideoPredictions(
                frames=entry["frames"][:],
                probabilities=entry["probabilities"][:],
                labels=entry["labels"][:].astype(np.int64),
                has_image=entry["has_image"][:],
                **{name: entry[name][:] if name in entry else None for name in _OPTIONAL},
            )
        return cls(
            split=str(attrs["split"]),
            source=str(attrs["source"]),
            videos=videos,
            smoothing=tuple(json.loads(attrs["smoothing"])),
            classes=tuple(json.loads(attrs["classes"])),
        )

"""The PRED file: per-frame predictions of one split, written by `predict`, read by `smooth`,
`evaluate` and `submit`.

One HDF5 file (format 1), readable with plain h5py or `h5dump`:

- root attributes: `format` = "fercache-predictions", `format_version`, `fercache_version`,
  `split` (train, val or test), `source` (what produced the numbers, e.g.
  "student logits of cache/x (fingerprint ...)"), `classes` (JSON list of the 8 EXPR class
  names, in Aff-Wild2 order), `smoothing` (JSON list of the votes applied, oldest first,
  each {"window": w, "mode": m}; [] for raw predictions) and `au_thresholds` (JSON list of the
  12 per-AU decision thresholds that evaluate and submit apply to `au`: 0.5 unless tuned on
  the validation split; a file without it means 0.5).
- one group `videos/<video>` per video, rows in increasing frame order:
  - `frames`        (N,) int32: 1-based frame numbers (row i is `<video>/{frames[i]:05d}.jpg`);
  - `has_image`     (N,) bool: False where the frame had no features and its predictions
    came from its nearest frames (see `fercache.predictions.predict`);
  - `probabilities` (N, 8) float32: EXPR class probabilities;
  - `labels`        (N,) int16: the predicted EXPR class (the arg-max of `probabilities` until
    a vote replaces it);
  - `au`            (N, 12) float32: AU probabilities in [0, 1] (AU1 … AU26, Aff-Wild2 order);
  - `va`            (N, 2) float32: valence and arousal in [-1, 1].
  Each task's arrays are optional (`probabilities` and `labels` together make EXPR), but every
  video carries the same tasks and at least one: a run trained without EXPR writes no
  `probabilities`/`labels`, and a student's predictions carry only EXPR.

The file is written under a temporary name and renamed when complete.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from fercache import __version__
from fercache.data.affwild2 import SPLITS
from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, VA_NAMES
from fercache.errors import FercacheError
from fercache.outputs import hdf5_image, write_made_atomically
from fercache.readers import first_line

FORMAT = "fercache-predictions"
FORMAT_VERSION = 1
AU_THRESHOLD = 0.5  # the ABAW decision threshold of every AU, unless tuned
_OPTIONAL = {"au": len(AU_NAMES), "va": len(VA_NAMES)}
_RANGES = {"probabilities": (0.0, np.inf), "au": (0.0, 1.0), "va": (-1.0, 1.0)}


@dataclass(frozen=True)
class VideoPredictions:
    """One video's rows of a PRED file (see the module doc for each array)."""

    frames: np.ndarray
    probabilities: np.ndarray | None
    labels: np.ndarray | None
    has_image: np.ndarray
    au: np.ndarray | None = None
    va: np.ndarray | None = None

    @classmethod
    def from_probabilities(
        cls,
        frames: np.ndarray,
        probabilities: np.ndarray | None,
        has_image: np.ndarray | None = None,
        au: np.ndarray | None = None,
        va: np.ndarray | None = None,
    ) -> "VideoPredictions":
        """Rows labelled with the arg-max EXPR class (no labels without `probabilities`);
        every frame has an image unless told."""
        if probabilities is not None:
            probabilities = np.asarray(probabilities, dtype=np.float32)
        return cls(
            frames=np.asarray(frames, dtype=np.int32),
            probabilities=probabilities,
            labels=None if probabilities is None else probabilities.argmax(axis=1).astype(np.int64),
            has_image=np.ones(len(frames), bool) if has_image is None else np.asarray(has_image),
            au=None if au is None else np.asarray(au, dtype=np.float32),
            va=None if va is None else np.asarray(va, dtype=np.float32),
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks these rows predict, in EXPR, AU, VA order."""
        carried = {"expr": self.probabilities, "au": self.au, "va": self.va}
        return tuple(task for task, values in carried.items() if values is not None)

    def problem(self) -> str | None:
        """What is wrong with these rows, or None."""
        rows = len(self.frames)
        if not self.tasks:
            return "no predictions: it needs EXPR 'probabilities', 'au' or 'va'"
        if (self.probabilities is None) != (self.labels is None):
            return "EXPR 'probabilities' and 'labels' come together"
        widths = {"probabilities": len(EXPR_CLASSES), **_OPTIONAL}
        shapes = {
            "labels": (rows,),
            "has_image": (rows,),
            **{name: (rows, width) for name, width in widths.items()},
        }
        for name, expected in shapes.items():
            values = getattr(self, name)
            if values is not None and values.shape != expected:
                return f"'{name}' has shape {values.shape}, expected {expected}"
        if rows and (self.frames[0] < 1 or (np.diff(self.frames) <= 0).any()):
            return "frame numbers must be 1-based and strictly increasing"
        for name, (low, high) in _RANGES.items():
            values = getattr(self, name)
            if values is not None and not (
                np.isfinite(values).all() and (values >= low).all() and (values <= high).all()
            ):
                return f"'{name}' must be finite and lie in [{low:g}, {high:g}]"
        labels = self.labels
        if labels is not None and rows and (labels.min() < 0 or labels.max() >= len(EXPR_CLASSES)):
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
    au_thresholds: tuple[float, ...] = (AU_THRESHOLD,) * len(AU_NAMES)

    def validate(self, path: Path | str = "predictions") -> None:
        """Raise FercacheError naming `path` (and the video) for anything off-format."""
        if not self.videos:
            raise FercacheError(
                f"{path}: holds no video (nothing was predicted); predict a split or frame "
                "list that names videos"
            )
        if self.split not in SPLITS:
            raise FercacheError(f"{path}: split '{self.split}' is not one of {', '.join(SPLITS)}")
        if tuple(self.classes) != EXPR_CLASSES:
            raise FercacheError(
                f"{path}: classes {list(self.classes)} are not the Aff-Wild2 EXPR classes "
                f"{list(EXPR_CLASSES)} in that order"
            )
        thresholds = np.asarray(self.au_thresholds, dtype=float)
        if (
            thresholds.shape != (len(AU_NAMES),)
            or not ((thresholds >= 0) & (thresholds <= 1)).all()
        ):
            raise FercacheError(
                f"{path}: au_thresholds must be {len(AU_NAMES)} values in [0, 1], "
                f"not {list(self.au_thresholds)}"
            )
        for video, rows in self.videos.items():
            problem = rows.problem()
            if problem:
                raise FercacheError(f"{path}: video '{video}': {problem}")
            if rows.tasks != self.tasks:
                raise FercacheError(
                    f"{path}: video '{video}' predicts {list(rows.tasks)} but the first video "
                    f"predicts {list(self.tasks)}; every video must carry the same tasks"
                )

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks every video predicts (EXPR, AU, VA order); () for a file without videos."""
        return next(iter(self.videos.values())).tasks if self.videos else ()

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
        return write_made_atomically(path, lambda: hdf5_image(self._write_into), "predictions")

    def _write_into(self, handle: h5py.File) -> None:
        attrs = handle.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["fercache_version"] = __version__
        attrs["split"] = self.split
        attrs["source"] = self.source
        attrs["classes"] = json.dumps(list(self.classes))
        attrs["smoothing"] = json.dumps(list(self.smoothing))
        attrs["au_thresholds"] = json.dumps([float(value) for value in self.au_thresholds])
        group = handle.create_group("videos")
        for video, rows in self.videos.items():
            entry = group.create_group(video)
            entry["frames"] = rows.frames.astype(np.int32)
            entry["has_image"] = rows.has_image.astype(bool)
            if rows.probabilities is not None:
                entry["probabilities"] = rows.probabilities.astype(np.float32)
                entry["labels"] = rows.labels.astype(np.int16)
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
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise FercacheError(
                f"{path}: not a readable fercache predictions file ({first_line(error)}); "
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
                probabilities=entry["probabilities"][:] if "probabilities" in entry else None,
                labels=entry["labels"][:].astype(np.int64) if "labels" in entry else None,
                has_image=entry["has_image"][:],
                **{name: entry[name][:] if name in entry else None for name in _OPTIONAL},
            )
        thresholds = json.loads(attrs.get("au_thresholds", "null"))
        return cls(
            split=str(attrs["split"]),
            source=str(attrs["source"]),
            videos=videos,
            smoothing=tuple(json.loads(attrs["smoothing"])),
            classes=tuple(json.loads(attrs["classes"])),
            au_thresholds=(AU_THRESHOLD,) * len(AU_NAMES)
            if thresholds is None
            else tuple(thresholds),
        )

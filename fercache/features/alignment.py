"""Features of other sources aligned to the frames of a tree's videos and written as a feature
cache: what `fercache import-features` (`fercache.features.importing`) and `fercache audio`
(`fercache.features.audio`) share. It holds the videos a source feeds and their frame counts,
the alignment of samples to frames, and the writing of the stores and the manifest.

A video's frames are 1..N, frame f at (f - 1) / fps seconds. N is the larger of the video's
longest annotation file (any task, any split) and its last image in `cropped_aligned/`: every
frame an extracted cache has a row for, and every frame `predict` predicts. Sample i of an
array lies at i / rate seconds; a CSV row at its time column's value (strictly increasing). A
source's period is 1 / rate, or the median step of its time column.

Which frames are covered (get a row):
- `nearest`: frame f takes the sample nearest in time (the earlier one on a tie); covered when
  that sample is valid and at most half a period from the frame.
- `linear`: a frame at a sample's time takes that sample; a frame between samples j and j + 1
  takes their linear interpolation (`np.interp`); covered when the samples it uses are valid
  and, between two, they are at most `GAP_PERIODS` periods apart (a longer step is a gap). No
  extrapolation: frames before the first sample or after the last are not covered.
- a CSV frame column: frame f takes the row of frame f; covered when that row exists and is
  valid (the alignment option does not apply; provenance records `align` = "frame").
A frame that is not covered gets no row, never zeros: the store lists it in the attribute
`missing_frames` and the manifest counts it per video (`missing`).

Span check: the source's length (its last sample's time plus one period, or its last frame)
must lie within `SPAN_TOLERANCE` of the video's (N / fps seconds, or N frames), else the video
is refused: a wrong `--rate` or `--fps`, or another video's file. Inside it, frames the source
does not reach are missing.

An Aff-Wild2 source named X whose tree has no video X but `X_left` / `X_right` (two subjects
in one video) feeds both subjects, each aligned to its own N.

The cache is a normal one (`fercache.features.store`): one store per video, written atomically
(`write_aligned`), and `manifest.json` last (`finish_cache`).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fercache.data.affwild2 import AffWild2
from fercache.data.tasks import TASKS
from fercache.errors import FercacheError
from fercache.features.store import (
    TMP_MARK,
    Provenance,
    missing_frames,
    open_store,
    store_path,
    store_state,
    write_manifest,
    write_store,
)

ALIGNMENTS = ("nearest", "linear")
SUBJECTS = ("_left", "_right")
SPAN_TOLERANCE = 0.1  # share of the video's length the source's length may differ by
GAP_PERIODS = 1.5  # a step between two samples longer than this many periods is a gap
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True, kw_only=True)
class CacheOptions:
    """How a cache of features aligned to frames is written (`import-features`, `audio`)."""

    align: str = "nearest"
    dtype: str = "float16"
    force: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.align not in ALIGNMENTS:
            raise FercacheError(f"--align must be {' or '.join(ALIGNMENTS)}, not '{self.align}'")
        if self.dtype not in ("float16", "float32"):
            raise FercacheError(f"--dtype must be float16 or float32, not '{self.dtype}'")


@dataclass(frozen=True)
class Samples:
    """One source video: `values` (T, D) float64, `valid` (T,), and the place of each sample:
    `times` (seconds, increasing) or `frames` (1-based, increasing)."""

    values: np.ndarray
    valid: np.ndarray
    times: np.ndarray | None = None
    frames: np.ndarray | None = None
    columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """One store to write: a video of DATA, fed by the source video `source`."""

    video: str
    source: str
    frames: int  # N
    fps: float  # 0.0 when unknown (a CSV frame column needs none)
    rate: float  # samples per second of an array source; 0.0 for a CSV


# --- the videos ------------------------------------------------------------------------------


def tree_videos(tree: AffWild2, lengths: dict[str, int], name: str, path: Path) -> list[str]:
    """The videos of the tree the source `name` (the file `path`) feeds: `name`, else
    `name_left` and `name_right`; an error when there is none or one has no frames. `lengths`
    are `video_lengths` of (at least) those names."""
    videos = [name] if name in lengths else [f"{name}{s}" for s in SUBJECTS]
    videos = [video for video in videos if video in lengths]
    if not videos:
        raise FercacheError(
            f"video '{name}' ({path}): not a video of {tree.root} (no image folder or "
            f"annotation named {name}, {name}_left or {name}_right); check the file name or "
            "--data"
        )
    for video in videos:
        if lengths[video] == 0:
            raise FercacheError(
                f"video '{video}': no frames in {tree.root} (empty image folder and no "
                "annotation); nothing to align its features to"
            )
    return videos


def subject_names(names: Iterable[str]) -> set[str]:
    """Every tree video the sources `names` may feed: each name, and its `_left` / `_right`."""
    return {f"{name}{suffix}" for name in names for suffix in ("", *SUBJECTS)}


def video_lengths(tree: AffWild2, wanted: Iterable[str]) -> dict[str, int]:
    """N of every video of `wanted` the tree holds: the larger of its longest annotation file
    (any task, any split) and its last image frame; 0 when it has neither."""
    wanted = set(wanted)
    lengths: dict[str, int] = {}
    for video in wanted & set(tree.videos()):
        frames, _ = tree.image_frames(video)
        lengths[video] = int(frames[-1]) if len(frames) else 0
    for task in TASKS:
        for split in tree.splits(task):
            named = [video for video in tree.annotated_videos(task, split) if video in wanted]
            for labels in tree.load(task, split, named) if named else []:
                lengths[labels.video] = max(lengths.get(labels.video, 0), len(labels.labels))
    return lengths


# --- alignment -------------------------------------------------------------------------------


def align_to_frames(
    samples: Samples, target: Target, align: str, check_span: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(covered (N,) bool per frame 1..N, the covered frames' features (rows, D) float64), after
    the span check (left out with `check_span` False: a sound track read from the video itself
    may be shorter than the video). The rules are the module's."""
    if samples.frames is not None:
        if check_span:
            _check_span(float(samples.frames[-1]), target.frames, "frames", target)
        return _by_frame(samples, target.frames)
    times, period = _times_and_period(samples, target)
    if check_span:
        _check_span(times[-1] + period, target.frames / target.fps, "seconds", target)
    frame_times = np.arange(target.frames) / target.fps
    if align == "nearest":
        return _nearest(samples, times, period, frame_times)
    return _linear(samples, times, period, frame_times)


def sample_times(count: int, rate: float) -> np.ndarray:
    """The times (seconds) of an array's samples: sample i at i / rate."""
    return np.arange(count) / rate


def _times_and_period(samples: Samples, target: Target) -> tuple[np.ndarray, float]:
    if samples.times is not None:
        steps = np.diff(samples.times)
        return samples.times, float(np.median(steps)) if len(steps) else 1 / target.fps
    return sample_times(len(samples.values), target.rate), 1 / target.rate


def _check_span(source_length: float, video_length: float, unit: str, target: Target) -> None:
    if abs(source_length - video_length) > SPAN_TOLERANCE * video_length:
        at = f" at {target.fps:g} fps" if unit == "seconds" else ""
        raise FercacheError(
            f"video '{target.video}': the source spans {source_length:.6g} {unit} but the video "
            f"has {target.frames} frames{at} ({video_length:.6g} {unit}), more than "
            f"{SPAN_TOLERANCE:.0%} apart; check --rate / --fps, or that the file of "
            f"'{target.source}' belongs to this video"
        )


def _by_frame(samples: Samples, frames: int) -> tuple[np.ndarray, np.ndarray]:
    inside = samples.frames <= frames
    rows = samples.frames[inside] - 1
    covered = np.zeros(frames, bool)
    covered[rows[samples.valid[inside]]] = True
    source_row = np.full(frames, -1)
    source_row[rows] = np.flatnonzero(inside)
    return covered, samples.values[source_row[covered]]


def _nearest(
    samples: Samples, times: np.ndarray, period: float, frame_times: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    last = len(times) - 1
    after = np.searchsorted(times, frame_times).clip(max=last)
    before = (after - 1).clip(min=0)
    to_before = np.abs(frame_times - times[before])
    to_after = np.abs(times[after] - frame_times)
    nearest = np.where(to_before <= to_after, before, after)
    distance = np.minimum(to_before, to_after)
    # a hair over half a period, so a frame exactly midway is not lost to rounding
    covered = samples.valid[nearest] & (distance <= period / 2 * (1 + 1e-9))
    return covered, samples.values[nearest[covered]]


def _linear(
    samples: Samples, times: np.ndarray, period: float, frame_times: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    count = len(times)
    left = np.searchsorted(times, frame_times, side="right") - 1  # times[left] <= t
    inside = left >= 0
    left = left.clip(min=0)
    right = (left + 1).clip(max=count - 1)
    exact = inside & (times[left] == frame_times)
    between = inside & ~exact & (left + 1 < count)
    close = times[right] - times[left] <= GAP_PERIODS * period
    valid = samples.valid
    covered = (exact & valid[left]) | (between & valid[left] & valid[right] & close)
    values = np.empty((len(frame_times), samples.values.shape[1]))
    on_sample = covered & exact
    values[on_sample] = samples.values[left[on_sample]]
    interpolated = covered & ~exact
    for column in range(samples.values.shape[1]):
        values[interpolated, column] = np.interp(
            frame_times[interpolated], times, samples.values[:, column]
        )
    return covered, values[covered]


# --- the cache -------------------------------------------------------------------------------


def imageless_provenance(dtype: str, feature_dim: int, **fields) -> Provenance:
    """The provenance of features not made from the face images (imported, audio): no backbone
    of fercache's (`source_kind` tells what made them), no image size, normalisation or
    classifier; `fields` sets the others (or a checkpoint and its hash)."""
    unused = {
        "checkpoint": "",
        "checkpoint_sha256": "",
        "init_seed": 0,
        "input_size": (0, 0, 0),
        "mean": (),
        "std": (),
        "interpolation": "",
        "num_classes": 0,
    }
    return Provenance("", dtype=dtype, feature_dim=feature_dim, **{**unused, **fields})


def needs_work(out: Path, video: str, provenance: Provenance, force: bool) -> bool:
    """Whether `video`'s store in OUT is to be written: missing, incomplete or --force; and a
    store of other features, which `prepare_cache` found to be no more than a stray in a cache
    of `provenance` (copied in, say)."""
    state, found = store_state(store_path(out, video))
    return state != "complete" or force or found.fingerprint != provenance.fingerprint


def write_aligned(
    out: Path,
    target: Target,
    covered: np.ndarray,
    values: np.ndarray,
    provenance: Provenance,
    details: dict | None = None,
) -> dict:
    """Write `target`'s store of the covered frames' rows (`align_to_frames`), the others
    recorded missing; return its manifest line. A killed run's temporary file goes first."""
    for leftover in Path(out).glob(f".{target.video}{TMP_MARK}*"):
        leftover.unlink(missing_ok=True)
    missing = np.flatnonzero(~covered).astype(np.int32) + 1
    _check_range(values, provenance.dtype, target)
    write_store(
        out,
        target.video,
        frames=np.flatnonzero(covered).astype(np.int32) + 1,
        features=values,
        logits=None,
        provenance=provenance,
        missing=missing,
        details={
            "video_fps": target.fps,
            "video_frames": target.frames,
            "source_video": target.source,
            **(details or {}),
        },
    )
    return _entry(int(covered.sum()), len(missing), target.frames, target.fps)


def _check_range(values: np.ndarray, dtype: str, target: Target) -> None:
    if dtype == "float16" and len(values) and np.abs(values).max() > FLOAT16_MAX:
        raise FercacheError(
            f"video '{target.source}': features up to {np.abs(values).max():.4g} overflow "
            f"float16 (largest {FLOAT16_MAX:g}), the type the trainer reads; scale them"
        )


def finish_cache(
    out: Path, provenance: Provenance, entries: dict[str, dict]
) -> tuple[int, int, Path]:
    """Write the manifest of the stores `entries` lists (their `write_aligned` lines); return
    their rows, their missing frames and the manifest's path."""
    rows = sum(entry["rows"] for entry in entries.values())
    missing = sum(entry["missing"] for entry in entries.values())
    return rows, missing, write_manifest(out, provenance, entries)


def stored_entry(path: Path) -> dict:
    """The manifest's line of a store an earlier run wrote (`write_aligned`)."""
    with open_store(path) as store:
        rows = int(store["frames"].shape[0])
        missing = missing_frames(store)
        frames, fps = int(store.attrs["video_frames"]), float(store.attrs["video_fps"])
    return _entry(rows, 0 if missing is None else len(missing), frames, fps)


def _entry(rows: int, missing: int, frames: int, fps: float) -> dict:
    """The manifest's line of one store: rows, missing frames, N and fps."""
    return {"rows": rows, "skipped": 0, "missing": missing, "frames": frames, "fps": fps}

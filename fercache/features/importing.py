"""`fercache import-features`: per-frame features another tool made (wav2vec 2.0, HuBERT or
Whisper audio embeddings, OpenFace CSVs, ...) aligned to each video's frames and written as a
feature cache that `train`, `predict` and `sweep` fuse with extracted caches.

Sources (SRC), one array per video:
- a folder of `<video>.npy` (T, D) or `<video>.npz` (its one array, or the one named `key`);
- one HDF5 file (`.h5`, `.hdf5`) holding one dataset (T, D) per video, named after the video;
- a folder of `<video>.csv`: a header line, then one row per sample. The row's place is a frame
  column (1-based frame numbers, mapping 1:1 to the video's frames; default `frame`) or a time
  column (seconds; default `timestamp`, then `time`). Features are the numeric columns other
  than the index and the known meta columns (`META_COLUMNS`: OpenFace's `frame`, `face_id`,
  `timestamp`, `confidence`, `success`); a row with `success` 0 is a sample without features.
A 1-D array is one feature per sample (T, 1). A sample is valid when all its features are
finite (and its `success` is not 0).

A video's frames are 1..N, frame f at (f - 1) / fps seconds. N is the larger of the video's
longest annotation file (any task, any split) and its last image in `cropped_aligned/`: every
frame an extracted cache has a row for, and every frame `predict` predicts. fps is `--fps`, or
each video file's own (`--video-dir`, read with PyAV). Sample i of an array lies at i / rate
seconds; a CSV row at its time column's value (strictly increasing). A source's period is
1 / rate, or the median step of its time column.

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
in one video) feeds both subjects, each aligned to its own N; the video file is looked up as X
(then as the subject's name) in `--video-dir`.

The cache is a normal one (`fercache.features.store`): one store per video, written atomically, and
`manifest.json` last. Its provenance has no backbone ("") and names the source (path, kind,
npz key, rate or time column, fps, alignment) and `source_sha256`, a hash of the source files'
names and contents and of each video's N and fps: any change gives another fingerprint. A
rerun skips the stores already written with the same fingerprint.
"""

import csv
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from fercache.data.affwild2 import AffWild2
from fercache.data.tasks import TASKS
from fercache.errors import FercacheError
from fercache.features.store import (
    TMP_MARK,
    Provenance,
    check_manifest,
    missing_frames,
    open_store,
    other_store,
    store_path,
    store_state,
    write_manifest,
    write_store,
)
from fercache.progress import progress_bar
from fercache.readers import first_line
from fercache.video.crop import VIDEO_SUFFIXES
from fercache.video.pyav import frame_rate

ALIGNMENTS = ("nearest", "linear")
FRAME_ALIGN = "frame"  # `align` of a cache placed by a CSV frame column
KINDS = ("npy", "npz", "hdf5", "csv")
HDF5_SUFFIXES = (".h5", ".hdf5")
FRAME_COLUMN = "frame"
TIME_COLUMNS = ("timestamp", "time")  # looked for in this order when none is named
META_COLUMNS = frozenset({"frame", "face_id", "timestamp", "confidence", "success"})
SUCCESS_COLUMN = "success"
SUBJECTS = ("_left", "_right")
SPAN_TOLERANCE = 0.1  # share of the video's length the source's length may differ by
GAP_PERIODS = 1.5  # a step between two samples longer than this many periods is a gap
FLOAT16_MAX = float(np.finfo(np.float16).max)
_HASH_BLOCK = 1 << 20


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


@dataclass(frozen=True, kw_only=True)
class ImportOptions(CacheOptions):
    """What `fercache import-features` takes besides SRC, --out and --data."""

    rate: float | None = None
    fps: float | None = None
    video_dir: Path | None = None
    key: str | None = None
    time_column: str | None = None
    frame_column: str | None = None


@dataclass
class ImportReport:
    """What a run did."""

    imported: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    rows: int = 0
    missing: int = 0
    manifest: Path | None = None


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


@dataclass(frozen=True)
class Source:
    """The files of SRC, by source video name, and how they are read."""

    root: Path
    kind: str
    files: dict[str, Path]  # for hdf5: every name maps to the one file
    index_column: str = ""  # CSV: the time or frame column
    by_frame: bool = False  # CSV: the index column holds frame numbers

    def read(self, name: str, key: str | None) -> Samples:
        path = self.files[name]
        if self.kind == "csv":
            return _read_csv(path, name, self.index_column, self.by_frame)
        return _array_samples(_read_array(self, name, key), name, path)


def import_features(
    source: Path, out: Path, data: Path, options: ImportOptions = ImportOptions()
) -> ImportReport:
    """Align SRC's per-video arrays to DATA's frames and write them as the cache OUT."""
    _check_options(options)
    opened = _open_source(Path(source), options)
    tree = AffWild2(data)
    targets = _targets(tree, opened, options)
    first = opened.read(next(iter(opened.files)), options.key)
    provenance = _provenance(opened, targets, first, options)
    out = Path(out)
    check_manifest(out, provenance, options.force)
    out.mkdir(parents=True, exist_ok=True)
    report = ImportReport()
    entries: dict[str, dict] = {}
    todo = [
        target for target in targets if needs_work(out, target.video, provenance, options.force)
    ]
    for target in targets:
        if target not in todo:
            report.resumed.append(target.video)
            entries[target.video] = stored_entry(store_path(out, target.video))
    with progress_bar("importing videos", len(todo), enabled=options.progress) as advance:
        last: dict[str, Samples] = {}  # X_left and X_right read X once
        for target in todo:
            if target.source not in last:
                last = {target.source: opened.read(target.source, options.key)}
            samples = last[target.source]
            _check_same_features(samples, first, target, opened.root)
            covered, values = align_to_frames(samples, target, options.align)
            entries[target.video] = write_aligned(out, target, covered, values, provenance)
            report.imported.append(target.video)
            advance()
    report.rows, report.missing, report.manifest = finish_cache(out, provenance, entries)
    return report


def _check_options(options: ImportOptions) -> None:
    options.check()
    for name, value in (("--rate", options.rate), ("--fps", options.fps)):
        if value is not None and not value > 0:
            raise FercacheError(f"{name} {value}: give a positive number of samples per second")
    if options.fps is not None and options.video_dir is not None:
        raise FercacheError("give either --fps or --video-dir, not both")
    if options.time_column and options.frame_column:
        raise FercacheError("give either --time-column or --frame-column, not both")


# --- the source -----------------------------------------------------------------------------


def _open_source(root: Path, options: ImportOptions) -> Source:
    if root.is_file() and root.suffix.lower() in HDF5_SUFFIXES:
        source = Source(root, "hdf5", {name: root for name in _hdf5_names(root)})
    elif root.is_dir():
        source = _folder_source(root)
    else:
        raise FercacheError(
            f"{root}: not a folder of <video>.npy / .npz / .csv files nor an HDF5 file "
            f"({', '.join(HDF5_SUFFIXES)}) of one dataset per video"
        )
    if source.kind == "csv":
        if options.rate is not None:
            raise FercacheError(
                f"{root}: --rate is for array sources; CSV rows are placed by their time or "
                "frame column (--time-column, --frame-column)"
            )
        source = _with_index_column(source, options)
    else:
        if options.rate is None:
            raise FercacheError(
                f"{root}: give the arrays' sample rate with --rate HZ (sample i lies at i/rate "
                "seconds; 50 for wav2vec 2.0, HuBERT and Whisper features)"
            )
        if options.time_column or options.frame_column:
            raise FercacheError(f"{root}: --time-column and --frame-column are for CSV sources")
    if options.key is not None and source.kind != "npz":
        raise FercacheError(f"{root}: --key names an array of .npz files; this is {source.kind}")
    return source


def _hdf5_names(path: Path) -> list[str]:
    try:
        with h5py.File(path, "r") as handle:
            names = sorted(name for name, item in handle.items() if isinstance(item, h5py.Dataset))
    except OSError as error:
        raise FercacheError(f"{path}: not a readable HDF5 file ({error})") from error
    if not names:
        raise FercacheError(f"{path}: empty source: no dataset (one per video) at its top level")
    return names


def _folder_source(root: Path) -> Source:
    by_kind: dict[str, dict[str, Path]] = {}
    for path in sorted(root.iterdir()):
        kind = path.suffix.lower().lstrip(".")
        if path.is_file() and not path.name.startswith(".") and kind in ("npy", "npz", "csv"):
            by_kind.setdefault(kind, {})[path.stem] = path
    if not by_kind:
        raise FercacheError(f"{root}: empty source: no <video>.npy, .npz or .csv file in it")
    if len(by_kind) > 1:
        raise FercacheError(
            f"{root}: holds {' and '.join(f'.{kind}' for kind in sorted(by_kind))} files; "
            "import one kind per cache (move the others into another folder)"
        )
    ((kind, files),) = by_kind.items()
    return Source(root, kind, files)


def _with_index_column(source: Source, options: ImportOptions) -> Source:
    """The CSV column placing each row, chosen once for every file: the one named, else
    `frame`, else the first of TIME_COLUMNS the first file has."""
    first_name, first_path = next(iter(source.files.items()))
    if options.frame_column or options.time_column:
        column = options.frame_column or options.time_column
        return Source(source.root, "csv", source.files, column, bool(options.frame_column))
    header = _csv_header(first_path)
    if FRAME_COLUMN in header:
        return Source(source.root, "csv", source.files, FRAME_COLUMN, True)
    for column in TIME_COLUMNS:
        if column in header:
            return Source(source.root, "csv", source.files, column, False)
    raise FercacheError(_no_index_column(first_name, first_path))


def _no_index_column(video: str, path: Path) -> str:
    return (
        f"video '{video}' ({path}): no time or frame column (looked for "
        f"{', '.join([FRAME_COLUMN, *TIME_COLUMNS])}); name it with --time-column (seconds) or "
        "--frame-column (1-based frames)"
    )


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [name.strip() for name in next(csv.reader(handle), [])]
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise FercacheError(f"{path}: unreadable CSV header ({first_line(error)})") from error


def _read_array(source: Source, name: str, key: str | None) -> np.ndarray:
    path = source.files[name]
    try:
        if source.kind == "hdf5":
            with h5py.File(path, "r") as handle:
                return np.asarray(handle[name][()])
        if source.kind == "npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if key is None and len(keys) != 1:
                raise FercacheError(
                    f"video '{name}' ({path}): {len(keys)} arrays ({', '.join(keys) or 'none'}); "
                    "name the one to import with --key"
                )
            chosen = keys[0] if key is None else key
            if chosen not in keys:
                raise FercacheError(
                    f"video '{name}' ({path}): no array '{chosen}' (it holds {', '.join(keys)}); "
                    "fix --key"
                )
            return archive[chosen]
    except (OSError, ValueError) as error:
        raise FercacheError(f"video '{name}' ({path}): unreadable array ({error})") from error


def _array_samples(array: np.ndarray, name: str, path: Path) -> Samples:
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise FercacheError(
            f"video '{name}' ({path}): a {array.dtype} array of shape {array.shape}; expected "
            "numbers of shape (T, D): one row per sample"
        )
    values = array.astype(np.float64)
    _check_not_empty(values, name, path)
    return Samples(values, np.isfinite(values).all(axis=1))


def _check_not_empty(values: np.ndarray, name: str, path: Path) -> None:
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise FercacheError(
            f"video '{name}' ({path}): empty source ({values.shape[0]} samples of "
            f"{values.shape[1]} features); remove the file or make its features again"
        )


def _read_csv(path: Path, name: str, index_column: str, by_frame: bool) -> Samples:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [column.strip() for column in next(reader, [])]
        first = next((row for row in reader if row), None)
    if index_column not in header:
        raise FercacheError(_no_index_column(name, path))
    if first is None:
        raise FercacheError(f"video '{name}' ({path}): empty source (no row after the header)")
    # the first row tells the numeric columns (an empty cell counts as a number)
    numeric = [i for i, cell in enumerate(first[: len(header)]) if _is_number(cell)]
    names = [header[i] for i in numeric]
    if index_column not in names:
        raise FercacheError(f"video '{name}' ({path}): the column '{index_column}' is not numbers")
    features = [column for column in names if column not in META_COLUMNS | {index_column}]
    if not features:
        raise FercacheError(
            f"video '{name}' ({path}): no numeric feature column besides "
            f"'{index_column}' and the meta columns ({', '.join(sorted(META_COLUMNS))})"
        )
    table = dict(zip(names, _numeric_table(path, name, header, numeric).T, strict=True))
    values = np.stack([table[column] for column in features], axis=1)
    valid = np.isfinite(values).all(axis=1)
    if SUCCESS_COLUMN in table:
        valid &= table[SUCCESS_COLUMN] != 0
    place = table[index_column]
    if not (np.isfinite(place).all() and (np.diff(place) > 0).all()):
        raise FercacheError(
            f"video '{name}' ({path}): the column '{index_column}' is not strictly increasing "
            "(several faces per frame? keep one face_id per file)"
        )
    if by_frame:
        if (place != np.round(place)).any() or place[0] < 1:
            raise FercacheError(
                f"video '{name}' ({path}): the frame column '{index_column}' must hold 1-based "
                "frame numbers; for times in seconds use --time-column"
            )
        return Samples(values, valid, frames=place.astype(np.int64), columns=tuple(features))
    return Samples(values, valid, times=place, columns=tuple(features))


def _is_number(cell: str) -> bool:
    try:
        float(cell.strip() or "nan")
    except ValueError:
        return False
    return True


def _numeric_table(path: Path, name: str, header: list[str], numeric: list[int]) -> np.ndarray:
    """The numeric columns of every row, float64 (an empty cell is NaN): numpy's fast reader,
    or, when it fails (empty cells, a stray word), row by row to name the line at fault."""
    try:
        return np.loadtxt(
            path, delimiter=",", skiprows=1, usecols=numeric, ndmin=2, encoding="utf-8-sig"
        )
    except ValueError:
        pass
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        next(reader)
        for line, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise FercacheError(
                    f"video '{name}' ({path}:{line}): {len(row)} fields, the header has "
                    f"{len(header)}"
                )
            cells = [row[i].strip() or "nan" for i in numeric]
            bad = [
                header[i] for i, cell in zip(numeric, cells, strict=True) if not _is_number(cell)
            ]
            if bad:
                raise FercacheError(
                    f"video '{name}' ({path}:{line}): column '{bad[0]}' is not a number here"
                )
            rows.append(np.array(cells, dtype=np.float64))
    return np.array(rows).reshape(len(rows), len(numeric))


# --- the videos ------------------------------------------------------------------------------


def _targets(tree: AffWild2, source: Source, options: ImportOptions) -> list[Target]:
    """The stores to write, in source order; every source video must name a video of DATA."""
    lengths = video_lengths(tree, subject_names(source.files))
    targets = []
    for name in source.files:
        for video in tree_videos(tree, lengths, name, source.files[name]):
            fps = _fps(name, video, source, options)
            rate = float(options.rate or 0.0)
            targets.append(Target(video, name, lengths[video], fps, rate))
    return targets


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


def _fps(name: str, video: str, source: Source, options: ImportOptions) -> float:
    if options.fps is not None:
        return float(options.fps)
    if options.video_dir is None:
        if source.kind == "csv" and source.by_frame:
            return 0.0  # frames map 1:1: no time involved
        raise FercacheError(
            f"video '{video}': placing samples in time needs the video's frame rate; give "
            "--fps (e.g. 30) or --video-dir with the video files"
        )
    return video_file_fps(options.video_dir, [name, video])


def video_file_fps(folder: Path, names: list[str]) -> float:
    """The average frame rate of the first `folder/<name>.<video suffix>` found, read with PyAV."""
    candidates = [
        path
        for name in names
        for path in sorted(Path(folder).glob(f"{name}.*"))
        if path.suffix.lower() in VIDEO_SUFFIXES
    ]
    if not candidates:
        suffixes = "|".join(sorted(suffix.lstrip(".") for suffix in VIDEO_SUFFIXES))
        raise FercacheError(
            f"video '{names[-1]}': no video file {names[0]}.<{suffixes}> in {folder}; add it "
            "or give --fps"
        )
    path = candidates[0]
    rate = frame_rate(path)
    if not rate:
        raise FercacheError(f"video '{names[-1]}' ({path}): no frame rate recorded; give --fps")
    return rate


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


# --- checks, provenance, manifest -------------------------------------------------------------


def _check_same_features(samples: Samples, first: Samples, target: Target, root: Path) -> None:
    width, expected = samples.values.shape[1], first.values.shape[1]
    if width != expected or samples.columns != first.columns:
        what = f"{width} features" + (f" ({', '.join(samples.columns)})" if samples.columns else "")
        raise FercacheError(
            f"video '{target.source}': {what}, but the first video of {root} has {expected}"
            + (f" ({', '.join(first.columns)})" if first.columns else "")
            + "; every video of a source must have the same features"
        )


def _check_range(values: np.ndarray, dtype: str, target: Target) -> None:
    if dtype == "float16" and len(values) and np.abs(values).max() > FLOAT16_MAX:
        raise FercacheError(
            f"video '{target.source}': features up to {np.abs(values).max():.4g} overflow "
            f"float16 (largest {FLOAT16_MAX:g}), the type the trainer reads; scale them"
        )


def _provenance(
    source: Source, targets: list[Target], first: Samples, options: ImportOptions
) -> Provenance:
    return imageless_provenance(
        options.dtype,
        int(first.values.shape[1]),
        source=str(source.root.resolve()),
        source_kind=source.kind,
        source_key=options.key or "",
        source_sha256=_inputs_hash(source, targets),
        rate=float(options.rate or 0.0),
        time_column=source.index_column,
        fps=float(options.fps or 0.0),
        align=FRAME_ALIGN if source.by_frame else options.align,
    )


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


def _inputs_hash(source: Source, targets: list[Target]) -> str:
    digest = hashlib.sha256()
    for path in sorted(set(source.files.values())):
        digest.update(f"{path.name}\0".encode())
        with open(path, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
    for target in sorted(targets, key=lambda target: target.video):
        digest.update(f"\0{target.video}:{target.frames}:{target.fps!r}".encode())
    return digest.hexdigest()


def needs_work(out: Path, video: str, provenance: Provenance, force: bool) -> bool:
    """Whether `video`'s store in OUT is to be written: missing, incomplete or --force; a
    complete store of other features is an error."""
    path = store_path(out, video)
    state, found = store_state(path)
    if state != "complete" or force:
        return True
    if found.fingerprint == provenance.fingerprint:
        return False
    raise other_store(path, found, provenance)


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

"""`fercache import-features`: per-frame features another tool made (wav2vec 2.0, HuBERT or
Whisper audio embeddings, OpenFace CSVs, ...) aligned to each video's frames and written as a
feature cache that `train`, `predict` and `sweep` fuse with extracted caches.

The sources (SRC) and how they are read: `fercache.features.foreign`. The frames of a video,
the alignment rules, the span check and the writing of the stores: `fercache.features.alignment`.

fps is `--fps`, or each video file's own (`--video-dir`, read with PyAV); a source X feeding
`X_left` and `X_right` has its video file looked up as X (then as the subject's name) in
`--video-dir`. A CSV placed by its frame column needs no fps.

The cache's provenance has no backbone ("") and names the source (path, kind, npz key, rate or
time column, fps, alignment) and `source_sha256`, a hash of the source files' names and
contents and of each video's N and fps: any change gives another fingerprint. A rerun skips
the stores already written with the same fingerprint.
"""

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from fercache.data.affwild2 import AffWild2
from fercache.errors import FercacheError
from fercache.features.alignment import (
    SPAN_TOLERANCE,
    CacheOptions,
    Samples,
    Target,
    align_to_frames,
    finish_cache,
    imageless_provenance,
    needs_work,
    stored_entry,
    subject_names,
    tree_videos,
    video_lengths,
    write_aligned,
)
from fercache.features.foreign import Source, open_source, with_index_column
from fercache.features.store import Provenance, prepare_cache, store_path
from fercache.outputs import output_folder
from fercache.progress import progress_bar
from fercache.video.crop import VIDEO_SUFFIXES
from fercache.video.pyav import frame_rate

FRAME_ALIGN = "frame"  # `align` of a cache placed by a CSV frame column
_HASH_BLOCK = 1 << 20


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


def import_features(
    source: Path, out: Path, data: Path, options: ImportOptions = ImportOptions()
) -> ImportReport:
    """Align SRC's per-video arrays to DATA's frames and write them as the cache OUT."""
    _check_options(options)
    opened = _open_source(Path(source), options)
    tree = AffWild2(data)
    targets = _targets(tree, opened, options)
    first_name = next(iter(opened.files))
    first = opened.read(first_name, options.key, _most_rows(targets, first_name))
    provenance = _provenance(opened, targets, first, options)
    out = Path(out)
    output_folder(out)
    prepare_cache(out, provenance, options.force)
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
                rows = _most_rows(targets, target.source)
                last = {target.source: opened.read(target.source, options.key, rows)}
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


# --- the source ------------------------------------------------------------------------------


def _open_source(root: Path, options: ImportOptions) -> Source:
    """SRC, its CSV index column chosen; the options that do not fit its kind refused."""
    source = open_source(root)
    if source.kind == "csv":
        if options.rate is not None:
            raise FercacheError(
                f"{root}: --rate is for array sources; CSV rows are placed by their time or "
                "frame column (--time-column, --frame-column)"
            )
        source = with_index_column(source, options.frame_column, options.time_column)
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


# --- checks, provenance ----------------------------------------------------------------------


def _most_rows(targets: list[Target], source: str) -> int:
    """The most samples an array of `source` may hold: more would fail the span check against
    every video it feeds (`SPAN_TOLERANCE`), so it is refused before it is read."""
    return max(
        math.ceil(target.frames / target.fps * target.rate * (1 + SPAN_TOLERANCE)) + 1
        if target.rate
        else 0
        for target in targets
        if target.source == source
    )


def _check_same_features(samples: Samples, first: Samples, target: Target, root: Path) -> None:
    width, expected = samples.values.shape[1], first.values.shape[1]
    if width != expected or samples.columns != first.columns:
        what = f"{width} features" + (f" ({', '.join(samples.columns)})" if samples.columns else "")
        raise FercacheError(
            f"video '{target.source}': {what}, but the first video of {root} has {expected}"
            + (f" ({', '.join(first.columns)})" if first.columns else "")
            + "; every video of a source must have the same features"
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

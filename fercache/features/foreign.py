"""The foreign sources `fercache import-features` reads (SRC): per-frame features another tool
made (wav2vec 2.0, HuBERT or Whisper audio embeddings, OpenFace CSVs, ...), one array per video,
each read as `Samples` that `fercache.features.alignment` aligns to the video's frames.

Sources, one array per video:
- a folder of `<video>.npy` (T, D) or `<video>.npz` (its one array, or the one named `key`);
- one HDF5 file (`.h5`, `.hdf5`) holding one dataset (T, D) per video, named after the video;
- a folder of `<video>.csv`: a header line, then one row per sample. The row's place is a frame
  column (1-based frame numbers, mapping 1:1 to the video's frames; default `frame`) or a time
  column (seconds; default `timestamp`, then `time`). Features are the numeric columns other
  than the index and the known meta columns (`META_COLUMNS`: OpenFace's `frame`, `face_id`,
  `timestamp`, `confidence`, `success`); a row with `success` 0 is a sample without features.
A 1-D array is one feature per sample (T, 1). A sample is valid when all its features are
finite (and its `success` is not 0).

An array's declared shape is checked before it is read: more samples than the video can use
(`Source.read`'s `most_rows`) or more than `MAX_FEATURES` features is refused, not allocated.
An HDF5 source's datasets must hold their data in the file itself: external and soft links
into other files, external storage and virtual datasets are refused, since the fingerprint
hashes the source file's bytes and would not see the other files change.
"""

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import h5py
import numpy as np

from fercache.errors import FercacheError
from fercache.features.alignment import Samples
from fercache.readers import first_line

HDF5_SUFFIXES = (".h5", ".hdf5")
FRAME_COLUMN = "frame"
TIME_COLUMNS = ("timestamp", "time")  # looked for in this order when none is named
META_COLUMNS = frozenset({"frame", "face_id", "timestamp", "confidence", "success"})
SUCCESS_COLUMN = "success"
MAX_FEATURES = 1 << 16  # per sample; far above any embedding, far below an absurd header


@dataclass(frozen=True)
class Source:
    """The files of SRC, by source video name, and how they are read."""

    root: Path
    kind: str
    files: dict[str, Path]  # for hdf5: every name maps to the one file
    index_column: str = ""  # CSV: the time or frame column
    by_frame: bool = False  # CSV: the index column holds frame numbers

    def read(self, name: str, key: str | None, most_rows: int) -> Samples:
        """The samples of source video `name`; an array declaring more than `most_rows` rows
        is refused before it is read."""
        path = self.files[name]
        if self.kind == "csv":
            return _read_csv(path, name, self.index_column, self.by_frame)
        return _array_samples(_read_array(self, name, key, most_rows), name, path)


def open_source(root: Path) -> Source:
    """The source at `root`: an HDF5 file, or a folder of one kind of files (its CSV files'
    index column not chosen yet: `with_index_column`)."""
    if root.is_file() and root.suffix.lower() in HDF5_SUFFIXES:
        return Source(root, "hdf5", {name: root for name in _hdf5_names(root)})
    if root.is_dir():
        return _folder_source(root)
    raise FercacheError(
        f"{root}: not a folder of <video>.npy / .npz / .csv files nor an HDF5 file "
        f"({', '.join(HDF5_SUFFIXES)}) of one dataset per video"
    )


def _hdf5_names(path: Path) -> list[str]:
    try:
        with h5py.File(path, "r") as handle:
            names = sorted(name for name in handle if _hdf5_dataset(handle, path, name))
    except OSError as error:
        raise FercacheError(f"{path}: not a readable HDF5 file ({error})") from error
    if not names:
        raise FercacheError(f"{path}: empty source: no dataset (one per video) at its top level")
    return names


def _hdf5_dataset(handle: h5py.File, path: Path, name: str) -> h5py.Dataset | None:
    """The top-level dataset `name` of the source (None for a group); FercacheError when its
    data lies outside the file."""
    link = handle.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise _outside(path, name, f"an external link to {link.filename}:{link.path}")
    item = handle.get(name)
    if item is None:  # a soft link to nothing
        raise _outside(path, name, f"a soft link to {link.path}, which is missing")
    if Path(item.file.filename).resolve() != path.resolve():
        raise _outside(path, name, f"a link into {item.file.filename}")
    if not isinstance(item, h5py.Dataset):
        return None
    if item.is_virtual:
        raise _outside(path, name, "a virtual dataset, mapped from other files")
    if item.external:
        files = ", ".join(str(entry[0]) for entry in item.external)
        raise _outside(path, name, f"a dataset stored in external files ({files})")
    return item


def _outside(path: Path, name: str, what: str) -> FercacheError:
    return FercacheError(
        f"{path}: dataset '{name}' is {what}; fercache reads only data stored in the source "
        "file itself (copy it in, e.g. with h5copy)"
    )


def _check_declared(
    path: Path, name: str, what: str, shape: tuple[int, ...], most_rows: int
) -> None:
    """Refuse a declared shape that cannot be a video's features before it is allocated."""
    width = int(np.prod(shape[1:], dtype=np.float64)) if len(shape) > 1 else 1
    if len(shape) in (1, 2) and shape[0] <= most_rows and width <= MAX_FEATURES:
        return
    raise FercacheError(
        f"video '{name}' ({path}): {what} declares shape {tuple(shape)}; a video's features "
        f"are (T, D) with T at most {most_rows} here (the video's length at --rate, with the "
        f"span tolerance) and D at most {MAX_FEATURES}: it is damaged or not this video's"
    )


def _npy_shape(handle: IO[bytes]) -> tuple[int, ...]:
    """The shape an .npy stream's header declares, read without its data."""
    version = np.lib.format.read_magic(handle)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
        version, np.lib.format.read_array_header_2_0
    )
    return tuple(read_header(handle)[0])


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


def with_index_column(source: Source, frame_column: str | None, time_column: str | None) -> Source:
    """The CSV column placing each row, chosen once for every file: the one named, else
    `frame`, else the first of TIME_COLUMNS the first file has."""
    first_name, first_path = next(iter(source.files.items()))
    if frame_column or time_column:
        column = frame_column or time_column
        return Source(source.root, "csv", source.files, column, bool(frame_column))
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


def _read_array(source: Source, name: str, key: str | None, most_rows: int) -> np.ndarray:
    path = source.files[name]
    try:
        if source.kind == "hdf5":
            with h5py.File(path, "r") as handle:
                dataset = _hdf5_dataset(handle, path, name)
                _check_declared(path, name, f"dataset '{name}'", dataset.shape, most_rows)
                return np.asarray(dataset[()])
        if source.kind == "npy":
            with open(path, "rb") as handle:
                _check_declared(path, name, "the array", _npy_shape(handle), most_rows)
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
            with archive.zip.open(f"{chosen}.npy") as member:
                _check_declared(path, name, f"array '{chosen}'", _npy_shape(member), most_rows)
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

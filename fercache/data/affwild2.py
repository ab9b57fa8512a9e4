"""Reading an Aff-Wild2 tree: image folders and EXPR / AU / VA annotation files.

Layout (any ABAW edition):

    DATA/cropped_aligned/<video>/00001.jpg ...          frame i <-> f"{i:05d}.jpg", 1-based
    DATA/<anything>/<TASK>_<anything>/<Split>_Set/<video>.txt

`<TASK>` is EXPR, AU or VA (`EXPR_Set`, `EXPR_Classification_Challenge`,
`EXPR_Recognition_Challenge`, ... all match); `<Split>` is Train, Training, Validation or Test.
An annotation file's line 0 is a header and line i is the label of frame i; a video with two
subjects has `<video>_left` / `<video>_right` annotation files and image folders.

Labels are read here at train/evaluation time and never copied into a cache. Every mismatch
between an annotation file and its image folder is handled by a documented rule and reported
as a `Note`; a malformed line raises `FercacheError` naming the file and line.
"""

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fercache.data.tasks import TASKS, Task
from fercache.errors import FercacheError

IMAGES_DIRNAME = "cropped_aligned"
_FRAME_NAME = re.compile(r"^(\d{5})\.jpg$")
_SPLIT_NAMES = {
    "train": re.compile(r"^train(ing)?_?set$", re.IGNORECASE),
    "val": re.compile(r"^valid(ation)?_?set$", re.IGNORECASE),
    "test": re.compile(r"^test_?set$", re.IGNORECASE),
}
SPLITS: tuple[str, ...] = tuple(_SPLIT_NAMES)
_ANNOTATION_SEARCH_DEPTH = 4  # DATA/<release>/<task set>/<split>: deep enough for every edition
_MAX_LISTED = 3  # names quoted in a note before "and N more"


def frame_filename(frame: int) -> str:
    """Image file name of 1-based frame number `frame`."""
    return f"{frame:05d}.jpg"


@dataclass(frozen=True)
class Note:
    """A mismatch found in the data and how it was handled. `kind` groups notes in reports."""

    kind: str
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class VideoLabels:
    """One annotation file aligned with its image folder.

    `labels[i - 1]` is the label of frame i, for every annotated frame (with or without an
    image); `image_frames` are the 1-based frames that have an image, ascending. Images beyond
    the end of the annotation get the task's invalid label.
    """

    video: str
    task: Task
    split: str
    path: Path
    labels: np.ndarray
    image_frames: np.ndarray
    notes: tuple[Note, ...] = ()

    @property
    def frame_valid(self) -> np.ndarray:
        """Per annotated frame: True when every value of its label is valid."""
        valid = self.task.valid_mask(self.labels)
        return valid if valid.ndim == 1 else valid.all(axis=1)

    @property
    def image_labels(self) -> np.ndarray:
        """Labels aligned with `image_frames` (invalid for images past the annotation's end)."""
        aligned = np.full(
            (len(self.image_frames), *self.labels.shape[1:]), self.task.invalid, self.task.dtype
        )
        annotated = self.image_frames <= len(self.labels)
        aligned[annotated] = self.labels[self.image_frames[annotated] - 1]
        return aligned

    @property
    def frames_without_image(self) -> np.ndarray:
        """Annotated frames (1-based) that have no image: the face was not found."""
        return np.setdiff1d(np.arange(1, len(self.labels) + 1), self.image_frames)

    @property
    def labelled_frames_without_image(self) -> np.ndarray:
        """Frames with a valid label but no image: they need a prediction but have no features."""
        missing = self.frames_without_image
        return missing[self.frame_valid[missing - 1]]


@dataclass
class AffWild2:
    """An Aff-Wild2-shaped tree.

    `root` holds `cropped_aligned/` (or pass `images`); annotation folders are found anywhere
    below `root` (or below `annotations`, which wins when several releases lie side by side).
    Folder listings are read once per instance.
    """

    root: Path
    images: Path | None = None
    annotations: Path | None = None
    notes: list[Note] = field(default_factory=list, init=False)
    _annotation_files: dict[tuple[str, str], dict[str, Path]] = field(
        default_factory=dict, init=False, repr=False
    )
    _image_frames: dict[str, tuple[np.ndarray, tuple[Note, ...]]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise FercacheError(f"{self.root}: no such directory; give the Aff-Wild2 root folder")
        self.images = Path(self.images) if self.images else self.root / IMAGES_DIRNAME
        if not self.images.is_dir():
            raise FercacheError(
                f"{self.images}: no image folder. The Aff-Wild2 root must hold "
                f"'{IMAGES_DIRNAME}/<video>/00001.jpg ...'; pass the images folder explicitly "
                "if it is named differently."
            )
        search_root = Path(self.annotations) if self.annotations else self.root
        for (task, split), folder in _find_annotation_folders(search_root, self.images).items():
            self._annotation_files[task, split] = self._list_annotation_folder(folder)

    def videos(self) -> list[str]:
        """Names of all image folders (videos or subjects), sorted."""
        with os.scandir(self.images) as entries:
            return sorted(entry.name for entry in entries if entry.is_dir())

    def splits(self, task: str) -> list[str]:
        """Splits that have annotations for `task`, in train/val/test order."""
        return [split for split in SPLITS if (task, split) in self._annotation_files]

    def annotated_videos(self, task: str, split: str) -> list[str]:
        """Videos with an annotation file for `task` in `split`, sorted."""
        return sorted(self._annotation_files.get((task, split), {}))

    def image_frames(self, video: str) -> tuple[np.ndarray, tuple[Note, ...]]:
        """1-based frame numbers that have an image in `video`'s folder, and what was odd."""
        if video not in self._image_frames:
            self._image_frames[video] = _scan_image_folder(self.images / video)
        return self._image_frames[video]

    def load(self, task: str, split: str, videos: Iterable[str] | None = None) -> list[VideoLabels]:
        """Labels of `task` in `split` aligned with the images, one entry per annotation file."""
        spec = _task(task)
        files = self._annotation_files.get((spec.name, split))
        if files is None:
            found = ", ".join(f"{t}/{s}" for t, s in sorted(self._annotation_files)) or "none"
            raise FercacheError(
                f"{self.annotations or self.root}: no {spec.folder_prefix} annotations for split "
                f"'{split}' (found: {found}). Expected a folder like "
                f"'{spec.folder_prefix}_Recognition_Challenge/Train_Set/'."
            )
        names = sorted(files) if videos is None else list(videos)
        unknown = [name for name in names if name not in files]
        if unknown:
            raise FercacheError(
                f"no {spec.name.upper()} {split} annotation for: {', '.join(unknown[:5])}"
            )
        return [self._load_video(spec, split, name, files[name]) for name in names]

    def _load_video(self, task: Task, split: str, video: str, path: Path) -> VideoLabels:
        labels, notes = read_annotation(path, task)
        frames, image_notes = self.image_frames(video)
        notes += [*image_notes, *_alignment_notes(path, len(labels), frames)]
        return VideoLabels(video, task, split, path, labels, frames, tuple(notes))

    def _list_annotation_folder(self, folder: Path) -> dict[str, Path]:
        files: dict[str, Path] = {}
        stray: list[str] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.endswith(".txt"):
                    files[entry.name[: -len(".txt")]] = Path(entry.path)
                elif not entry.name.startswith("."):
                    stray.append(entry.name)
        if stray:
            self.notes.append(Note("stray_files", folder, f"ignored {_listing(stray)}"))
        return files


def _task(name: str) -> Task:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise FercacheError(f"unknown task '{name}': choose one of {', '.join(TASKS)}") from None


def _find_annotation_folders(root: Path, images: Path) -> dict[tuple[str, str], Path]:
    """(task, split) -> folder, searching below `root` but never inside the image folder."""
    found: dict[tuple[str, str], Path] = {}
    pending = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        with os.scandir(folder) as entries:
            children = sorted(
                Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")
            )
        for child in children:
            if child == images:
                continue
            task, split = _task_of(folder.name), _split_of(child.name)
            if task and split:
                if (task, split) in found:
                    raise FercacheError(
                        f"two {task.upper()} {split} annotation folders: {found[task, split]} and "
                        f"{child}. Point fercache at one release with the annotations option."
                    )
                found[task, split] = child
            elif depth + 1 < _ANNOTATION_SEARCH_DEPTH:
                pending.append((child, depth + 1))
    return found


def _task_of(folder_name: str) -> str | None:
    prefix = folder_name.split("_", 1)[0].upper()
    matches = [t.name for t in TASKS.values() if t.folder_prefix == prefix]
    return matches[0] if matches and "_" in folder_name else None


def _split_of(folder_name: str) -> str | None:
    return next((s for s, pattern in _SPLIT_NAMES.items() if pattern.match(folder_name)), None)


def _scan_image_folder(folder: Path) -> tuple[np.ndarray, tuple[Note, ...]]:
    if not folder.is_dir():
        return np.empty(0, np.int64), (Note("no_image_folder", folder, "no image folder"),)
    frames: list[int] = []
    stray: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _FRAME_NAME.match(entry.name)
            if match and int(match[1]) > 0 and entry.is_file():
                frames.append(int(match[1]))
            elif not entry.name.startswith("."):
                stray.append(entry.name)
    notes = (Note("stray_files", folder, f"ignored {_listing(stray)}"),) if stray else ()
    return np.sort(np.array(frames, dtype=np.int64)), notes


def _listing(names: list[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{len(names)} file(s) that are not frames or annotations: {shown}{more}"


def _alignment_notes(path: Path, annotated: int, frames: np.ndarray) -> list[Note]:
    notes = []
    last_image = int(frames[-1]) if len(frames) else 0
    if last_image > annotated:
        beyond = int((frames > annotated).sum())
        notes.append(
            Note(
                "images_beyond_annotation",
                path,
                f"annotation covers frames 1-{annotated} but {beyond} image(s) lie beyond "
                f"(up to frame {last_image}); they get no label",
            )
        )
    elif 0 < last_image < annotated:
        notes.append(
            Note(
                "annotation_longer",
                path,
                f"{annotated - last_image} annotated frame(s) after the last image "
                f"(frame {last_image}); they have labels but no image",
            )
        )
    return notes


def read_annotation(path: Path, task: Task) -> tuple[np.ndarray, list[Note]]:
    """Parse one annotation file: labels of frames 1..N (row i-1 is frame i) and notes.

    Line endings may be LF or CRLF, a UTF-8 BOM is dropped and trailing blank lines are
    ignored (each reported). A blank line inside the labels, a missing header, a non-numeric
    or out-of-range value raises FercacheError naming the file and line.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise FercacheError(f"{path}: not a UTF-8 text annotation file ({error})") from None
    notes: list[Note] = []
    if "\r\n" in text:
        notes.append(Note("crlf", path, "CRLF line endings"))
    lines = text.splitlines()
    trailing = 0
    while lines and not lines[-1].strip():
        lines.pop()
        trailing += 1
    if trailing:
        notes.append(
            Note("trailing_blank_lines", path, f"ignored {trailing} trailing blank line(s)")
        )
    if not lines:
        raise FercacheError(f"{path}: empty annotation file; expected the header '{task.header}'")
    if _looks_like_labels(lines[0], task):
        raise FercacheError(
            f"{path}:1: '{lines[0].strip()}' is a label, not a header. Aff-Wild2 files start with "
            f"the header line '{task.header}'; add it, or frame numbers shift by one."
        )
    return _parse_labels(path, lines[1:], task), notes


def _looks_like_labels(line: str, task: Task) -> bool:
    try:
        return len([float(value) for value in line.split(",")]) == task.width
    except ValueError:
        return False


def _parse_labels(path: Path, lines: list[str], task: Task) -> np.ndarray:
    if not lines:
        return np.empty((0,) if task.width == 1 else (0, task.width), task.dtype)
    try:  # fast path: numpy converts every value at once; errors are located below
        values = np.array([line.split(",") for line in lines], dtype=np.float64)
    except ValueError:
        values = np.empty((0, 0))
    if values.shape != (len(lines), task.width):
        raise FercacheError(_first_malformed(path, lines, task))
    integral = np.issubdtype(task.dtype, np.integer)
    bad = ~((values == task.invalid) | ((values >= task.low) & (values <= task.high)))
    if integral:
        bad |= values != np.round(values)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        kind = "integers" if integral else "numbers"
        raise FercacheError(
            f"{path}:{row + 2}: bad label '{lines[row].strip()}' (frame {row + 1}): "
            f"{task.name.upper()} values are {kind} in [{task.low:g}, {task.high:g}], "
            f"or {task.invalid:g} for no label"
        )
    labels = values.astype(task.dtype)
    return labels[:, 0] if task.width == 1 else labels


def _first_malformed(path: Path, lines: list[str], task: Task) -> str:
    """The error message for the first line that is not `task.width` numbers."""
    for row, line in enumerate(lines):
        fields = line.split(",")
        try:
            numbers = [float(value) for value in fields]
        except ValueError:
            numbers = []
        if len(numbers) != task.width:
            what = "a blank line" if not line.strip() else f"'{line.strip()}'"
            return (
                f"{path}:{row + 2}: {what} for frame {row + 1}; expected {task.width} "
                f"comma-separated number(s) ({task.header})"
            )
    return f"{path}: labels could not be read as {task.width} number(s) per line"

"""Image sources of phase 1: labelled (Aff-Wild2 train frames, CSV lists, folder per class)
and unlabelled (a folder or a list of face crops).

The multi-task recipes add per-image targets: EXPR + AU + VA frames of Aff-Wild2 roots (EMMA)
and 68 landmarks from a CSV (multitask-landmarks); a target without a valid value is NaN.

Problems in the data (labels outside 0-7, files that are listed but missing, folders that name
no class) are collected as `Problem`s naming the file and line, and the offending entries are
left out, so that a run never stops half-way for them. A source that yields nothing usable, or
cannot be recognised at all, is an error before training starts.
"""

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fercache.data.affwild2 import IMAGES_DIRNAME, AffWild2, VideoLabels, frame_filename
from fercache.data.layout import LANDMARKS
from fercache.data.tasks import AU, EXPR, EXPR_CLASSES, VA, Task
from fercache.errors import FercacheError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LIST_SUFFIXES = (".txt", ".lst", ".list")
_CLASS_BY_NAME = {name.lower(): index for index, name in enumerate(EXPR_CLASSES)}


@dataclass(frozen=True)
class Problem:
    """One entry left out of a source, and why."""

    where: str  # "file" or "file:line"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class LabelledImages:
    """Image paths with their expression class (0-7; -1 in multi-task sources where a frame has
    other labels only), the video each image is a frame of (None for a still image), per-image
    targets of the multi-task recipes (empty otherwise), and what was left out on the way."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    videos: list[str | None] = field(default_factory=list)

    def extend(self, other: "LabelledImages") -> None:
        self.paths += other.paths
        self.labels += other.labels
        self.problems += other.problems
        self.targets += other.targets
        self.videos += other.videos


@dataclass
class UnlabelledImages:
    paths: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def read_labelled(sources: list[Path]) -> LabelledImages:
    """All labelled sources combined, in the order given."""
    if not sources:
        raise FercacheError("no labelled source: pass --labelled at least once")
    combined = LabelledImages()
    for source in sources:
        images = _read_labelled_source(Path(source))
        if not images.paths:
            reasons = "; ".join(str(problem) for problem in images.problems[:3])
            raise FercacheError(
                f"{source}: no usable labelled image" + (f" ({reasons})" if reasons else "")
            )
        combined.extend(images)
    return combined


def other_from_videos_only(images: LabelledImages) -> LabelledImages:
    """`images` without the still images labelled Other when video frames are among them.

    Yu et al. take "Other" from the Aff-Wild2 frames only when they add AffectNet/ExpW images:
    those sets have no such class, and what a still-image set files under a catch-all class is
    not what Aff-Wild2's annotators meant by Other. Without video frames nothing is left out
    (a still-image source is then the only source of every class). One problem per run counts
    what was left out.
    """
    if all(video is None for video in images.videos):
        return images
    other = EXPR_CLASSES.index("Other")
    keep = [
        not (video is None and label == other)
        for video, label in zip(images.videos, images.labels, strict=True)
    ]
    dropped = len(keep) - sum(keep)
    if not dropped:
        return images
    note = Problem(
        "labelled sources",
        f"{dropped} still images labelled Other left out: Other comes from the video frames "
        "only (set other_from_videos_only=false to keep them)",
    )
    return LabelledImages(
        _kept(images.paths, keep),
        _kept(images.labels, keep),
        [*images.problems, note],
        _kept(images.targets, keep) if images.targets else [],
        _kept(images.videos, keep),
    )


def _kept(values: list, keep: list[bool]) -> list:
    return [value for value, kept in zip(values, keep, strict=True) if kept]


def read_multitask(sources: list[Path]) -> LabelledImages:
    """Train frames of Aff-Wild2 roots with EXPR, AU and VA labels (EMMA): label = EXPR class or
    -1; targets = 12 AU values then valence, arousal, NaN where a task has no valid value."""
    if not sources:
        raise FercacheError("no labelled source: pass --labelled at least once")
    combined = LabelledImages()
    for source in map(Path, sources):
        if not (source.is_dir() and (source / IMAGES_DIRNAME).is_dir()):
            raise FercacheError(
                f"{source}: recipe emma reads EXPR, AU and VA labels from an Aff-Wild2 root "
                f"(a folder holding {IMAGES_DIRNAME}/ and the annotation sets); give one"
            )
        images = _read_affwild2_multitask(source)
        if not images.paths:
            raise FercacheError(f"{source}: no train frame with an image and a valid label")
        combined.extend(images)
    return combined


def _read_affwild2_multitask(root: Path) -> LabelledImages:
    data = AffWild2(root)
    missing = [
        task.name.upper() for task in (EXPR, AU, VA) if "train" not in data.splits(task.name)
    ]
    if missing:
        raise FercacheError(
            f"{root}: recipe emma needs train annotations of EXPR, AU and VA, but there are none "
            f"for {', '.join(missing)} (expected folders like AU_Detection_Challenge/Train_Set/)"
        )
    per_task = {
        task.name: {video.video: video for video in data.load(task.name, "train")}
        for task in (EXPR, AU, VA)
    }
    images = LabelledImages()
    for name in sorted(set().union(*per_task.values())):
        frames, _ = data.image_frames(name)
        expr = _task_values(per_task["expr"].get(name), frames, EXPR)
        targets = np.concatenate(
            [
                _task_values(per_task["au"].get(name), frames, AU),
                _task_values(per_task["va"].get(name), frames, VA),
            ],
            axis=1,
        )
        useful = (expr[:, 0] >= 0) | ~np.isnan(targets).all(axis=1)
        folder = data.images / name
        images.paths += [folder / frame_filename(int(frame)) for frame in frames[useful]]
        images.labels += [int(label) for label in np.nan_to_num(expr[useful, 0], nan=-1)]
        images.targets += list(targets[useful])
        images.videos += [str(folder)] * int(useful.sum())
    return images


def _task_values(video: VideoLabels | None, frames: np.ndarray, task: Task) -> np.ndarray:
    """(frames, task width) labels of one task at `frames` as floats; NaN where invalid or not
    annotated (no file of this task for the video, or the file ends before the frame)."""
    aligned = np.full((len(frames), task.width), np.nan, np.float32)
    if video is None:
        return aligned
    values = video.labels.reshape(len(video.labels), task.width).astype(np.float32)
    annotated = frames <= len(values)
    aligned[annotated] = values[frames[annotated] - 1]
    aligned[aligned == task.invalid] = np.nan
    return aligned


def attach_landmarks(images: LabelledImages, path: Path) -> LabelledImages:
    """`images` with their 68 landmarks from the CSV at `path` as targets (136 values in pixels
    of the image; NaN for an image without a row, which then trains the expression head only).
    Rows naming a missing image or holding a value that is not a number are reported."""
    path = Path(path)
    by_image, problems = _read_landmarks(path)
    targets = [by_image.get(image.resolve()) for image in images.paths]
    missing = [image for image, found in zip(images.paths, targets, strict=True) if found is None]
    if len(missing) == len(images.paths):
        raise FercacheError(
            f"{path}: no row names a labelled image (the first is {images.paths[0]}); "
            "paths in the CSV are relative to its folder"
        )
    if missing:
        problems.append(
            Problem(
                str(path),
                f"{len(missing)} labelled images have no landmarks here (the first is "
                f"{missing[0]}); they train the expression head only",
            )
        )
    no_landmarks = np.full(2 * LANDMARKS, np.nan, np.float32)
    return LabelledImages(
        images.paths,
        images.labels,
        images.problems + problems,
        [no_landmarks if found is None else found for found in targets],
        images.videos,
    )


def _read_landmarks(path: Path) -> tuple[dict[Path, np.ndarray], list[Problem]]:
    """Landmarks by resolved image path, and the rows left out."""
    if not path.is_file():
        raise FercacheError(f"{path}: no such landmarks CSV; set landmarks=PATH")
    columns = 1 + 2 * LANDMARKS
    found: dict[Path, np.ndarray] = {}
    problems: list[Problem] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        if len(header) != columns or header[0] != "path":
            raise FercacheError(
                f"{path}: needs a header of {columns} columns, path then x0, y0, ... x67, y67 "
                f"(68 points in iBUG order); it has {len(header)} starting with {header[:1]}"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            image = path.parent / row[0].strip()
            try:
                values = np.array(row[1:], dtype=np.float32)
            except ValueError:
                problems.append(Problem(where, "a coordinate is not a number"))
                continue
            if len(row) != columns:
                problems.append(Problem(where, f"{len(row)} values where the header has {columns}"))
            elif not image.is_file():
                problems.append(Problem(where, f"image {image} does not exist"))
            else:
                found[image.resolve()] = values
    return found, problems


def read_unlabelled(sources: list[Path]) -> UnlabelledImages:
    """Every image of the unlabelled folders (searched recursively) and lists, combined."""
    if not sources:
        raise FercacheError("no unlabelled source: pass --unlabelled at least once")
    combined = UnlabelledImages()
    for source in map(Path, sources):
        if source.is_dir():
            paths, problems = sorted(_images_below(source)), []
        elif source.is_file():
            paths, problems = _read_path_list(source)
        else:
            raise FercacheError(f"{source}: no such folder or image list")
        if not paths:
            raise FercacheError(f"{source}: holds no image ({', '.join(IMAGE_SUFFIXES)})")
        combined.paths += paths
        combined.problems += problems
    return combined


def _read_labelled_source(source: Path) -> LabelledImages:
    if source.is_file() and source.suffix.lower() == ".csv":
        return _read_labelled_csv(source)
    if source.is_dir() and (source / IMAGES_DIRNAME).is_dir():
        return affwild2_frames(source)
    if source.is_dir():
        return _read_class_folders(source)
    if not source.exists():
        raise FercacheError(f"{source}: no such file or folder")
    raise FercacheError(
        f"{source}: not a labelled source. Give an Aff-Wild2 root (holding {IMAGES_DIRNAME}/), "
        "a CSV file with columns path,label, or a folder with one sub-folder per class"
    )


def affwild2_frames(root: Path, split: str = "train") -> LabelledImages:
    """Frames of an EXPR split that have an image and a valid label."""
    data = AffWild2(root)
    images = LabelledImages()
    for video in data.load("expr", split):
        valid = video.image_labels != video.task.invalid
        folder = data.images / video.video
        for frame, label in zip(video.image_frames[valid], video.image_labels[valid], strict=True):
            images.paths.append(folder / frame_filename(int(frame)))
            images.labels.append(int(label))
            images.videos.append(str(folder))
    return images


def _read_labelled_csv(path: Path) -> LabelledImages:
    """`path,label` rows; paths relative to the CSV's folder; label 0-7 or a class name."""
    images = LabelledImages()
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip().lower() for name in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise FercacheError(f"{path}: needs a header with columns path,label (got {columns})")
        reader.fieldnames = columns
        for row in reader:
            where = f"{path}:{reader.line_num}"
            label = _parse_label(row.get("label"))
            image = path.parent / (row.get("path") or "").strip()
            if label is None:
                images.problems.append(Problem(where, f"label {row.get('label')!r} is not 0-7"))
            elif not image.is_file():
                images.problems.append(Problem(where, f"image {image} does not exist"))
            else:
                images.paths.append(image)
                images.labels.append(label)
                images.videos.append(None)
    return images


def _read_class_folders(root: Path) -> LabelledImages:
    """`root/<class>/*.jpg` where <class> is 0-7 or an EXPR class name (any case)."""
    images = LabelledImages()
    for folder in sorted(entry for entry in root.iterdir() if entry.is_dir()):
        label = _parse_label(folder.name)
        if label is None:
            images.problems.append(
                Problem(str(folder), "folder name is not a class (0-7 or an EXPR class name)")
            )
            continue
        for image in sorted(_images_below(folder)):
            images.paths.append(image)
            images.labels.append(label)
            images.videos.append(None)
    return images


def _read_path_list(path: Path) -> tuple[list[Path], list[Problem]]:
    """One path per line (a CSV's `path` column when the file is a .csv), relative to the list."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [(row.get("path") or "").strip() for row in csv.DictReader(handle)]
        first_line = 2
    elif path.suffix.lower() in LIST_SUFFIXES:
        rows = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        first_line = 1
    else:
        raise FercacheError(
            f"{path}: not an unlabelled source: give a folder of images, a .txt list of paths "
            "or a .csv with a path column"
        )
    paths: list[Path] = []
    problems: list[Problem] = []
    for line, name in enumerate(rows, start=first_line):
        if not name:
            continue
        image = path.parent / name
        if image.is_file():
            paths.append(image)
        else:
            problems.append(Problem(f"{path}:{line}", f"image {image} does not exist"))
    return paths, problems


def _parse_label(text: str | None) -> int | None:
    text = (text or "").strip()
    if text.lower() in _CLASS_BY_NAME:
        return _CLASS_BY_NAME[text.lower()]
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 <= value < len(EXPR_CLASSES) else None


def _images_below(folder: Path) -> list[Path]:
    found: list[Path] = []
    for directory, _, names in os.walk(folder):
        found += [Path(directory, name) for name in names if name.lower().endswith(IMAGE_SUFFIXES)]
    return found

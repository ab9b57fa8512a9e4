"""Image sources of phase 1: labelled (Aff-Wild2 train frames, CSV lists, folder per class)
and unlabelled (a folder or a list of face crops).

The multi-task recipes add per-image targets (`LabelledImages.targets`), read in their own
modules: EXPR + AU + VA frames of Aff-Wild2 roots (`fercache.pretrain.emma`) and 68 landmarks
from a CSV (`fercache.pretrain.landmarks`); a target without a valid value is NaN.

Numeric labels are read in the numbering the source declares (`affectnet:train.csv`,
`fercache.data.numbering`); a source of numeric labels that declares none is refused, and
classes without an ABAW counterpart are left out and counted (`SourceLabels`).

Problems in the data (labels outside the numbering, files that are listed but missing,
folders that name no class) are collected as `Problem`s naming the file and line, and the
offending entries are left out, so that a run never stops half-way for them. A source that
yields nothing usable, or cannot be recognised at all, is an error before training starts.
"""

import csv
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fercache.data.affwild2 import IMAGES_DIRNAME, AffWild2, frame_filename
from fercache.data.numbering import (
    NUMBERINGS,
    Numbering,
    choices,
    class_of_name,
    display_name,
    is_class_name,
    is_number,
    split_declaration,
)
from fercache.data.tasks import EXPR_CLASSES
from fercache.errors import FercacheError
from fercache.pretrain.sampling import cap_per_class

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class Problem:
    """One entry left out of a source, and why."""

    where: str  # "file" or "file:line"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class SourceLabels:
    """What one labelled source's labels became: the numbering read (`names` for class-name
    labels), its map onto ABAW classes, the images per ABAW class, and the images of classes
    without an ABAW counterpart, which were left out."""

    source: str  # as given, declaration included
    numbering: str
    mapping: dict[str, str | None]  # source label -> ABAW class (None: left out)
    counts: dict[str, int]  # ABAW class -> images read
    left_out: dict[str, int] = field(default_factory=dict)  # source class -> images

    def to_json(self) -> dict:
        return asdict(self)


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
    sources: list[SourceLabels] = field(default_factory=list)  # per source, in order

    def extend(self, other: "LabelledImages") -> None:
        self.paths += other.paths
        self.labels += other.labels
        self.problems += other.problems
        self.targets += other.targets
        self.videos += other.videos
        self.sources += other.sources

    def subset(self, keep: list[bool], problems: list[Problem]) -> "LabelledImages":
        """The images where `keep` is true, with `problems` added."""
        return LabelledImages(
            _kept(self.paths, keep),
            _kept(self.labels, keep),
            [*self.problems, *problems],
            _kept(self.targets, keep) if self.targets else [],
            _kept(self.videos, keep),
            self.sources,
        )


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
    return images.subset(keep, [note])


def _kept(values: list, keep: list[bool]) -> list:
    return [value for value, kept in zip(values, keep, strict=True) if kept]


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


def _read_labelled_source(given: Path) -> LabelledImages:
    numbering, rest = split_declaration(given)
    source = Path(rest)
    if source.is_file() and source.suffix.lower() == ".csv":
        return summarised(_read_labelled_csv(source, _Labels(str(given), numbering)))
    if source.is_dir() and (source / IMAGES_DIRNAME).is_dir():
        if numbering not in (None, NUMBERINGS["abaw"]):
            raise FercacheError(
                f"{given}: an Aff-Wild2 root is numbered abaw; drop the {numbering.name}: prefix"
            )
        images = affwild2_frames(source)
        images.sources = [SourceLabels(str(given), "abaw", NUMBERINGS["abaw"].mapping(), {})]
        return summarised(images)
    if source.is_dir():
        return summarised(_read_class_folders(source, _Labels(str(given), numbering)))
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


class _Labels:
    """Reads one source's labels into ABAW classes: a class name (any case), or a number of the
    source's declared numbering; counts what has no ABAW counterpart."""

    def __init__(self, source: str, numbering: Numbering | None) -> None:
        self.source, self.numbering = source, numbering
        self.left_out: Counter[str] = Counter()

    def read(self, text: str | None, where: str, images: int = 1) -> tuple[int | None, str | None]:
        """(ABAW class, None), or (None, why) for a label that is left out (why is None for a
        class without ABAW counterpart: its `images` are counted); a number without a declared
        numbering is an error."""
        text = (text or "").strip()
        if is_class_name(text):
            name = text
        elif is_number(text) and self.numbering is None:
            raise FercacheError(
                f"{where}: label {text!r} is a number, but the source declares no numbering: "
                f"give it as NUMBERING:{self.source} with NUMBERING one of {choices()} "
                "(docs/pretrain.md), or label by class name"
            )
        elif is_number(text) and int(text) in self.numbering.classes:
            name = self.numbering.classes[int(text)]
        else:
            if self.numbering is None:
                return None, f"label {text!r} is not a class name"
            numbering = f"{self.numbering.dataset} numbering ({self.numbering.span()})"
            return None, f"label {text!r} is neither a class name nor in the {numbering}"
        label = class_of_name(name)
        if label is None:
            if images:
                self.left_out[display_name(name)] += images
            return None, None
        return label, None

    def summary(self, images: LabelledImages) -> None:
        """`images.sources` and a problem counting the classes left out."""
        if self.numbering is not None:
            numbering, mapping = self.numbering.name, self.numbering.mapping()
        else:
            numbering, mapping = "names", {}
        images.sources = [
            SourceLabels(self.source, numbering, mapping, {}, dict(sorted(self.left_out.items())))
        ]
        if self.left_out:
            counted = ", ".join(f"{count} {name}" for name, count in sorted(self.left_out.items()))
            images.problems.append(
                Problem(self.source, f"left out, no ABAW class: {counted} images")
            )


def summarised(images: LabelledImages) -> LabelledImages:
    """`images` with the per-class counts of its source filled in."""
    counts = Counter(images.labels)
    for source in images.sources:
        source.counts = {name: counts[index] for index, name in enumerate(EXPR_CLASSES)}
    return images


def _read_labelled_csv(path: Path, labels: "_Labels") -> LabelledImages:
    """`path,label` rows; paths relative to the CSV's folder; a label is a class name or a
    number of the declared numbering."""
    images = LabelledImages()
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip().lower() for name in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise FercacheError(f"{path}: needs a header with columns path,label (got {columns})")
        reader.fieldnames = columns
        for row in reader:
            where = f"{path}:{reader.line_num}"
            label, why = labels.read(row.get("label"), where)
            image = path.parent / (row.get("path") or "").strip()
            if label is None:
                if why:
                    images.problems.append(Problem(where, why))
            elif not image.is_file():
                images.problems.append(Problem(where, f"image {image} does not exist"))
            else:
                images.paths.append(image)
                images.labels.append(label)
                images.videos.append(None)
    labels.summary(images)
    return images


def _read_class_folders(root: Path, labels: "_Labels") -> LabelledImages:
    """`root/<class>/*.jpg` where <class> is a class name (any case) or a number of the
    declared numbering; the images of a class without ABAW counterpart are counted."""
    images = LabelledImages()
    for folder in sorted(entry for entry in root.iterdir() if entry.is_dir()):
        found = sorted(_images_below(folder))
        label, why = labels.read(folder.name, str(folder), len(found))
        if why:
            images.problems.append(Problem(str(folder), f"folder name: {why}"))
        if label is None:
            continue
        for image in found:
            images.paths.append(image)
            images.labels.append(label)
            images.videos.append(None)
    labels.summary(images)
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


def _images_below(folder: Path) -> list[Path]:
    found: list[Path] = []
    for directory, _, names in os.walk(folder):
        found += [Path(directory, name) for name in names if name.lower().endswith(IMAGE_SUFFIXES)]
    return found


def per_class_cap(
    images: LabelledImages, cap: int, seed: int
) -> tuple[LabelledImages, LabelledImages]:
    """(kept, over the cap): at most `cap` still images of each class (the extra labelled
    sources, merged; Aff-Wild2 frames are never capped), drawn with `seed`. The images over the
    cap are for the unlabelled pool (Yu et al. §4.1)."""
    still = np.array([video is None for video in images.videos], dtype=bool)
    kept, _ = cap_per_class(np.asarray(images.labels), still, cap, seed)
    keep = np.zeros(len(images.paths), dtype=bool)
    keep[kept] = True
    if keep.all():
        return images, LabelledImages()
    over = images.subset((~keep).tolist(), [])
    return images.subset(keep.tolist(), []), LabelledImages(over.paths, over.labels)


def class_counts(labels: list[int]) -> dict[str, int]:
    counts = Counter(labels)
    return {name: counts[index] for index, name in enumerate(EXPR_CLASSES)}


def labels_summary(
    images: LabelledImages, over_cap: LabelledImages, cap: int, to_unlabelled: bool
) -> dict:
    """What `labels.json` holds: per source its numbering, map and counts; the images per class
    the run uses (before the held-out split); those over `per_class_cap` and where they went."""
    return {
        "sources": [source.to_json() for source in images.sources],
        "labelled": class_counts([label for label in images.labels if label >= 0]),
        "per_class_cap": cap,
        "over_cap": class_counts(over_cap.labels),
        "over_cap_to": "unlabelled" if to_unlabelled else "left out",
    }


def summary_lines(summary: dict) -> list[str]:
    """The label summary as printed when a run starts."""
    lines = []
    for source in summary["sources"]:
        mapping = ", ".join(
            f"{number}→{name or 'left out'}" for number, name in source["mapping"].items()
        )
        read = "class names" if source["numbering"] == "names" else source["numbering"]
        lines.append(
            f"labels {source['source']}: {read}" + (f" ({mapping})" if mapping else "") + "; "
            + _counted(source["counts"])
            + (f"; left out: {_counted(source['left_out'])}" if source["left_out"] else "")
        )  # fmt: skip
    over = sum(summary["over_cap"].values())
    cap = f" (per_class_cap {summary['per_class_cap']}: {over} more {summary['over_cap_to']})"
    lines.append(f"labels used: {_counted(summary['labelled'])}" + (cap if over else ""))
    return lines


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())

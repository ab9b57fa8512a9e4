"""`fercache crop`: videos -> `DATA/cropped_aligned/<video>/%05d.jpg`, the organisers' layout.

Every video is decoded with PyAV (`fercache.video.pyav`), its frames go through facenet-pytorch's
MTCNN in batches (boxes, confidences, five landmarks), one face per subject is followed through the
video by tracking, and each found face is aligned onto a five-point template by a least-squares
similarity transform (Umeyama) and written as a JPEG under its 1-based frame number. Frames
without the subject's face are left out and listed, with the reason, in the video's record
`DATA/crop_records/<video>.json`, which is also the completion marker: a video with a record
is skipped on a rerun. A video's folders are written under a temporary name outside
`cropped_aligned/` and renamed into place when the video is complete. See docs/crop.md.
"""

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fercache.data.affwild2 import IMAGES_DIRNAME, frame_filename
from fercache.errors import FercacheError
from fercache.outputs import write_text_atomically
from fercache.progress import progress_bar
from fercache.readers import read_json_object
from fercache.video.pyav import open_video, require

RECORDS_DIRNAME = "crop_records"
PARTIAL_DIRNAME = ".crop-partial"  # folders of videos being cropped, renamed into place
RECORD_FORMAT = "fercache-crop"
RECORD_VERSION = 1
INSTALL_HINT = "fercache crop needs PyAV and facenet-pytorch: pip install 'fercache[video]'"
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}

# Five-point template for a 112 x 112 crop (left eye, right eye, nose tip, left and right mouth
# corner, in image coordinates: "left" is the image's left). It is the ArcFace template made
# left-right symmetric about x = 56 with the eyes level: the eyes land on one image row.
TEMPLATE_112 = np.array(
    [[38.38, 51.60], [73.62, 51.60], [56.00, 71.74], [41.41, 92.28], [70.59, 92.28]],
    dtype=np.float64,
)
# The fit weighs the eyes most, so they land on their template positions (level) and the nose
# and mouth, whose place varies more between people, only steady the scale and rotation.
LANDMARK_WEIGHTS = np.array([1.0, 1.0, 0.2, 0.2, 0.2])
MAX_JUMP = 1.0  # a detection continues a track if its centre moved < MAX_JUMP box sizes
MAX_SCALE_CHANGE = 2.0  # ... and its size changed by less than this factor
REACQUIRE_AFTER = 15  # frames a track may go unmatched before it is started anew
MISSING_NO_FACE = "no face"
MISSING_TRACK_LOST = "track lost"


@dataclass(frozen=True)
class CropOptions:
    size: int = 112  # side of the square crops, pixels
    margin: float = 0.0  # extra context around the template face: 0.2 = the face 1/1.2 as big
    subjects: int = 1  # 1, or 2 for <video>_left / <video>_right
    batch: int = 32  # frames per MTCNN call
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...
    min_confidence: float = 0.9  # MTCNN face probability below which a detection is ignored
    progress: bool = True


@dataclass
class VideoCrop:
    name: str  # as written under cropped_aligned/ (with _left / _right for two subjects)
    frames: int  # frames decoded from the source video
    found: int  # frames written
    missing: int  # frames left out
    fps: float
    boxes: dict[int, tuple[float, float, float, float]]  # frame -> x1, y1, x2, y2 (source px)
    reasons: dict[int, str] = field(default_factory=dict)  # missing frame -> why
    seconds: float = 0.0  # time the source video took (shared by _left / _right)
    source: str = ""


@dataclass
class CropReport:
    videos: list[VideoCrop]  # cropped by this call
    skipped: list[str]  # source videos already complete (a record exists)
    failed: list[tuple[str, str]]  # (source video, why): reported and skipped


def template(size: int = 112, margin: float = 0.0) -> np.ndarray:
    """Target positions of the five landmarks in a `size` crop with `margin` extra context."""
    if size < 16:
        raise FercacheError(f"--size {size}: crops must be at least 16 pixels")
    if not 0.0 <= margin < 5.0:
        raise FercacheError(f"--margin {margin}: give a fraction between 0 and 5 (0.2 = 20 %)")
    centre = 56.0
    points = centre + (TEMPLATE_112 - centre) / (1.0 + margin)
    return points * (size / 112.0)


def similarity(
    source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Weighted least-squares similarity (rotation, uniform scale, translation) mapping `source`
    points onto `target` points (Umeyama 1991); a 2 x 3 matrix: target ~ M @ [x, y, 1]."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    w = np.ones(len(source)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean_s, mean_t = w @ source, w @ target
    s, t = source - mean_s, target - mean_t
    covariance = (t * w[:, None]).T @ s
    u, singular, vt = np.linalg.svd(covariance)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    variance = float(w @ (s**2).sum(1))
    scale = (singular * d).sum() / variance if variance > 0 else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_t - matrix[:, :2] @ mean_s
    return matrix


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N x 2) mapped by a 2 x 3 affine matrix."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align(image: Image.Image, landmarks: np.ndarray, size: int, target: np.ndarray) -> Image.Image:
    """The `size` x `size` crop of `image` with `landmarks` moved onto `target`."""
    matrix = similarity(landmarks, target, LANDMARK_WEIGHTS)
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]  # output px -> input px
    return image.transform(
        (size, size), Image.Transform.AFFINE, tuple(inverse.ravel()), Image.Resampling.BILINEAR
    )


def video_sources(sources: list[Path]) -> list[Path]:
    """Video files named, or found directly inside the folders named, in a stable order."""
    videos: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            videos += sorted(
                p
                for p in source.iterdir()
                if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")
            )
        elif source.is_file():
            videos.append(source)
        else:
            raise FercacheError(f"{source}: no such video file or folder")
    stems = [v.stem for v in videos]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise FercacheError(
            f"several videos are named {', '.join(clashes)}: their crops would share a folder; "
            "crop them into different --out folders"
        )
    return videos


def record_path(out: Path, video: str) -> Path:
    return Path(out) / RECORDS_DIRNAME / f"{video}.json"


def read_crop_record(out: Path, video: str) -> list[VideoCrop]:
    """The crops of source video `video` (its stem) recorded under `out`, one per subject."""
    path = record_path(out, video)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FercacheError(f"{path}: no readable crop record ({error})") from error
    return [
        VideoCrop(
            name=subject["name"],
            frames=record["frames"],
            found=subject["found"],
            missing=len(subject["missing"]),
            fps=record["fps"],
            boxes={int(k): tuple(v) for k, v in subject["boxes"].items()},
            reasons={int(k): v for k, v in subject["missing"].items()},
            seconds=record.get("seconds", 0.0),
            source=record.get("source", ""),
        )
        for subject in record["subjects"]
    ]


def _detector_class():
    """facenet-pytorch's MTCNN, once the video extra (PyAV too) is known to be installed."""
    require(INSTALL_HINT)
    try:
        from facenet_pytorch import MTCNN
    except ImportError as error:
        raise FercacheError(INSTALL_HINT) from error
    return MTCNN


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FercacheError(f"--device {name}: no CUDA device here; use --device auto or cpu")
    return device


def subject_names(video: str, subjects: int) -> list[str]:
    if subjects == 1:
        return [video]
    if subjects == 2:
        return [f"{video}_left", f"{video}_right"]
    raise FercacheError(f"--subjects {subjects}: give 1 or 2")


class Tracker:
    """Follows `subjects` faces through a video: each frame's detections continue the tracks
    by centre distance (in track-box sizes) and size change; two subjects start as left and
    right and keep their names while they move. A track unmatched for REACQUIRE_AFTER frames
    starts anew on the largest free face (for two subjects, one on its side of the other)."""

    def __init__(self, subjects: int):
        self.subjects = subjects
        self.boxes: list[np.ndarray | None] = [None] * subjects
        self.unmatched = [0] * subjects

    @staticmethod
    def _distance(track: np.ndarray, box: np.ndarray) -> float | None:
        tw, th = track[2] - track[0], track[3] - track[1]
        bw, bh = box[2] - box[0], box[3] - box[1]
        ratio = max(bw * bh, 1e-6) / max(tw * th, 1e-6)
        if not 1 / MAX_SCALE_CHANGE**2 <= ratio <= MAX_SCALE_CHANGE**2:
            return None
        centre = (track[:2] + track[2:]) / 2
        other = (box[:2] + box[2:]) / 2
        distance = float(np.linalg.norm(centre - other)) / max(tw, th, 1e-6)
        return distance if distance < MAX_JUMP else None

    def step(self, boxes: np.ndarray) -> list[int | None]:
        """Index into `boxes` of each subject's face in this frame, or None."""
        chosen: list[int | None] = [None] * self.subjects
        if len(boxes) == 0:
            self._age(chosen)
            return chosen
        if all(box is None for box in self.boxes):
            if len(boxes) < self.subjects:
                return chosen
            largest = np.argsort(-_areas(boxes))[: self.subjects]
            ordered = sorted(largest, key=lambda i: boxes[i][0] + boxes[i][2])
            for subject, index in enumerate(ordered):
                chosen[subject] = int(index)
                self.boxes[subject] = boxes[index]
            self.unmatched = [0] * self.subjects
            return chosen
        pairs = []
        for subject, track in enumerate(self.boxes):
            if track is None:
                continue
            for index, box in enumerate(boxes):
                distance = self._distance(track, box)
                if distance is not None:
                    pairs.append((distance, subject, index))
        taken: set[int] = set()
        for _, subject, index in sorted(pairs):
            if chosen[subject] is None and index not in taken:
                chosen[subject] = index
                taken.add(index)
        for subject in range(self.subjects):
            stale = self.boxes[subject] is None or self.unmatched[subject] >= REACQUIRE_AFTER
            if chosen[subject] is None and stale:
                free = [
                    i
                    for i in range(len(boxes))
                    if i not in taken and self._side_ok(subject, boxes[i], chosen, boxes)
                ]
                if free:
                    index = max(free, key=lambda i: _areas(boxes[i : i + 1])[0])
                    chosen[subject] = index
                    taken.add(index)
        for subject, index in enumerate(chosen):
            if index is not None:
                self.boxes[subject] = boxes[index]
        self._age(chosen)
        return chosen

    def _side_ok(self, subject: int, box: np.ndarray, chosen, boxes) -> bool:
        if self.subjects == 1:
            return True
        other = 1 - subject
        reference = boxes[chosen[other]] if chosen[other] is not None else self.boxes[other]
        if reference is None:
            return True
        centre = (box[0] + box[2]) / 2
        other_centre = (reference[0] + reference[2]) / 2
        return centre < other_centre if subject == 0 else centre > other_centre

    def _age(self, chosen: list[int | None]) -> None:
        for subject, index in enumerate(chosen):
            self.unmatched[subject] = 0 if index is not None else self.unmatched[subject] + 1


def _areas(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _partial_folders(out: Path, names: list[str]) -> list[Path]:
    """Fresh folders, one per subject, to crop into outside `cropped_aligned/`; an earlier
    run's leftovers of these subjects go first."""
    partial = out / PARTIAL_DIRNAME
    if partial.is_dir():
        for name in names:
            for stale in partial.glob(f"{name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
    folders = [partial / f"{name}.tmp-{os.getpid()}" for name in names]
    for folder in folders:
        folder.mkdir(parents=True)
    return folders


def _remove_folders(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _move_into_place(images: Path, names: list[str], partial: list[Path]) -> None:
    """Rename each subject's partial folder to `images/<name>`, replacing what is there."""
    for name, folder in zip(names, partial, strict=True):
        final = images / name
        if final.exists():  # a crop killed between its renames and its record, or older output
            shutil.rmtree(final)
        if any(folder.iterdir()):
            images.mkdir(parents=True, exist_ok=True)
            os.replace(folder, final)
        else:  # no face at all: no empty folder for inspect and extract to trip over
            folder.rmdir()


class _VideoCropper:
    """One video's crop in progress: its frames' faces detected batch by batch, each subject
    followed by a `Tracker` and its aligned crops written into its partial folder; per subject
    the boxes of the frames written and the reasons of the frames left out."""

    def __init__(self, options: CropOptions, detector, partial: list[Path]) -> None:
        self.options, self.detector, self.partial = options, detector, partial
        self.target = template(options.size, options.margin)
        self.tracker = Tracker(options.subjects)
        self.boxes: list[dict[int, list[float]]] = [{} for _ in partial]
        self.missing: list[dict[int, str]] = [{} for _ in partial]
        self.frames = 0  # decoded so far

    def crop(self, batch: list[np.ndarray]) -> None:
        """Detect the faces of the next frames, follow the subjects and write their crops."""
        found, probs, landmarks = self.detector.detect(batch, landmarks=True)
        for offset, frame in enumerate(batch):
            number = self.frames + offset + 1
            keep = _confident(found[offset], probs[offset], self.options.min_confidence)
            frame_boxes = found[offset][keep] if keep.size else np.zeros((0, 4))
            chosen = self.tracker.step(frame_boxes)
            image = None
            for subject, index in enumerate(chosen):
                if index is None:
                    why = MISSING_NO_FACE if len(frame_boxes) == 0 else MISSING_TRACK_LOST
                    self.missing[subject][number] = why
                    continue
                if image is None:
                    image = Image.fromarray(frame)
                points = landmarks[offset][keep][index]
                crop = align(image, points, self.options.size, self.target)
                crop.save(self.partial[subject] / frame_filename(number), quality=95)
                self.boxes[subject][number] = [round(float(v), 2) for v in frame_boxes[index]]
        self.frames += len(batch)

    def record(self, video: Path, fps: float, names: list[str], seconds: float) -> dict:
        """The video's crop record (`read_crop_record` reads it back)."""
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "source": str(video),
            "fps": fps,
            "frames": self.frames,
            "size": self.options.size,
            "margin": self.options.margin,
            "template": np.round(self.target, 3).tolist(),
            "min_confidence": self.options.min_confidence,
            "seconds": round(seconds, 2),
            "subjects": [
                {
                    "name": name,
                    "found": len(self.boxes[i]),
                    "missing": {str(k): v for k, v in sorted(self.missing[i].items())},
                    "boxes": {str(k): v for k, v in sorted(self.boxes[i].items())},
                }
                for i, name in enumerate(names)
            ],
        }


def _batches(frames: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """`frames` in lists of `size` (the last one shorter)."""
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _crop_frames(video: Path, cropper: _VideoCropper, options: CropOptions) -> float:
    """Decode every frame of `video` and crop it, `options.batch` at a time; the video's fps."""
    with open_video(video, INSTALL_HINT) as opened:
        fps = opened.fps
        with progress_bar(video.stem, opened.frames, options.progress) as advance:
            for batch in _batches(opened.rgb_frames(), options.batch):
                cropper.crop(batch)
                advance(len(batch))
    return fps


def crop_video(video: Path, out: Path, options: CropOptions, detector) -> dict:
    """Crop one source video into `out`'s images; its record, to be written last as the
    completion mark. A FercacheError is the video's own (it cannot be decoded); an OSError is
    `out`'s (a full disk), and no partial folder is left."""
    started = time.monotonic()
    names = subject_names(video.stem, options.subjects)
    partial = _partial_folders(out, names)
    cropper = _VideoCropper(options, detector, partial)
    try:
        fps = _crop_frames(video, cropper, options)
        if cropper.frames == 0:
            raise FercacheError(f"{video}: no frames could be decoded")
        _move_into_place(out / IMAGES_DIRNAME, names, partial)
    except BaseException:
        _remove_folders(partial)  # those not moved into place yet
        raise
    return cropper.record(video, fps, names, time.monotonic() - started)


def _confident(boxes, probs, min_confidence: float) -> np.ndarray:
    if boxes is None:
        return np.zeros(0, dtype=int)
    return np.flatnonzero(np.asarray(probs, dtype=np.float64) >= min_confidence)


def check_out_folder(out: Path) -> None:
    """A FercacheError when `out`, or the nearest of its parents that exists, is a file or
    cannot be written (a read-only file system, no permission): said before any work, not as
    each video's first write fails. Nothing is created, so a refusal later leaves no folder."""
    out = Path(out)
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    where = "it" if existing == out else existing
    if not existing.is_dir():
        raise FercacheError(
            f"--out {out}: {where} is a file, not a folder; give a new or existing folder"
        )
    # access() says EROFS on a read-only file system even to root, who ignores file modes
    if not os.access(existing, os.W_OK):
        raise FercacheError(
            f"--out {out}: {where} cannot be written (a read-only file system, or no "
            "permission); give a folder you can write into"
        )


def check_earlier_crops(videos: list[Path], out: Path, options: CropOptions) -> None:
    """A FercacheError when a video of `videos` has a record in `out` made with another
    --size, --margin, --subjects or --min-confidence: a video with a record is not cropped
    again, so its crops would silently differ from what was asked."""
    for video in videos:
        path = record_path(out, video.stem)
        if not path.is_file():
            continue
        record = read_json_object(path, "crop record", "delete it to crop the video again")
        subjects = record.get("subjects", [])
        made = {
            "--size": (options.size, record.get("size")),
            "--margin": (options.margin, record.get("margin")),
            "--subjects": (options.subjects, len(subjects)),
            "--min-confidence": (options.min_confidence, record.get("min_confidence")),
        }
        differ = [f"{flag} {had}" for flag, (asked, had) in made.items() if asked != had]
        if differ:
            folders = [str(out / IMAGES_DIRNAME / subject.get("name", "?")) for subject in subjects]
            raise FercacheError(
                f"{path}: {video.name} was cropped with {', '.join(differ)}, not as asked now; "
                f"give another --out, or delete this record and {', '.join(folders)} to crop "
                "it again"
            )


def _reason(video: Path, error: FercacheError) -> str:
    """The error's message without the video's name in front: the report pairs them."""
    return str(error).removeprefix(f"{video}: ")


def _unreadable(video: Path) -> str | None:
    """Why `video` cannot be cropped (an empty file, not a video FFmpeg reads, no frame), found
    before the detector loads; None when its first frame decodes."""
    try:
        with open_video(video, INSTALL_HINT) as opened:
            if next(opened.rgb_frames(), None) is None:
                return "no frames could be decoded"
    except FercacheError as error:
        return _reason(video, error)
    return None


def crop_videos(sources: list[Path], out: Path, options: CropOptions) -> CropReport:
    """Crop every video of `sources` (files, or folders of videos) into `out`'s Aff-Wild2
    layout. Videos with a record are skipped; a video that cannot be read is reported in
    `failed` (before the detector loads, when its first frame already fails) and the others
    are done."""
    subject_names("x", options.subjects)
    template(options.size, options.margin)
    if options.batch < 1:
        raise FercacheError(f"--batch {options.batch}: give at least 1")
    out = Path(out)
    check_out_folder(out)
    videos = video_sources(sources)
    check_earlier_crops(videos, out, options)
    MTCNN = _detector_class()
    report = CropReport(videos=[], skipped=[], failed=[])
    todo = []
    for video in videos:
        if record_path(out, video.stem).is_file():
            report.skipped.append(str(video))
        elif why := _unreadable(video):
            report.failed.append((str(video), why))
        else:
            todo.append(video)
    if not todo:
        return report
    detector = MTCNN(keep_all=True, device=_device(options.device))
    # a write that fails (a full disk) ends the run: every later video would fail the same way
    kept = (
        "the videos cropped before are kept; make room (or give another --out) and run the "
        "command again: it skips them"
    )
    try:
        for video in todo:
            try:
                record = crop_video(video, out, options, detector)
            except FercacheError as error:  # a video PyAV cannot decode past its first frame
                report.failed.append((str(video), _reason(video, error)))
                continue
            except OSError as error:
                raise FercacheError(
                    f"{out}: could not write the crops of {video} ({error.strerror or error}); "
                    f"{kept}"
                ) from error
            path = record_path(out, video.stem)
            write_text_atomically(path, json.dumps(record), "the crop record", kept)
            report.videos += read_crop_record(out, video.stem)
    finally:
        with suppress(OSError):  # left when another crop is writing into `out` at the same time
            (out / PARTIAL_DIRNAME).rmdir()
    return report

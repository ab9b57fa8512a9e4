"""ABAW submission files (EXPR) and the organisers' frame lists.

A submission is a text file: the header
`image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other`, then one row
`<video>/<%05d>.jpg,<label>` per required frame, label in 0..7.

A frame list names the frames that need a prediction (for the test split, the organisers give
one): one `<video>/<frame>.jpg` per line, optionally followed by a comma and anything else (so
the organisers' example submission file, and any submission, is itself a frame list); an
optional first line starting with `image_location`; blank lines are ignored.
"""

import os
import re
from pathlib import Path

import numpy as np

from fercache.data.tasks import EXPR_CLASSES
from fercache.errors import FercacheError
from fercache.predictions import Predictions

HEADER = ",".join(["image_location", *EXPR_CLASSES])
_LOCATION = re.compile(r"^(?P<video>[^/\s]+)/(?P<frame>\d+)\.jpg$")
_SHOWN = 3  # frames quoted in an error before "and N more"


def read_frame_list(path: Path) -> dict[str, np.ndarray]:
    """{video: 1-based frames, ascending} in order of first appearance; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FercacheError(f"{path}: no such frame list")
    frames: dict[str, list[int]] = {}
    for number, location, _ in _rows(path):
        match = _LOCATION.match(location)
        if not match or int(match["frame"]) < 1:
            raise FercacheError(
                f"{path}:{number}: '{location}' is not an image location like "
                "'video1/00001.jpg' (1-based frame number)"
            )
        frames.setdefault(match["video"], []).append(int(match["frame"]))
    listed = {video: np.array(sorted(values), dtype=np.int32) for video, values in frames.items()}
    for video, values in listed.items():
        repeated = values[1:][np.diff(values) == 0]
        if len(repeated):
            raise FercacheError(f"{path}: {video}/{repeated[0]:05d}.jpg is listed more than once")
    return listed


def _rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, image location, rest of the line) of every non-blank, non-header line."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.lower().startswith("image_location")):
            continue
        location, _, rest = line.strip().partition(",")
        rows.append((number, location.strip(), rest.strip()))
    return rows


def submission_rows(
    predictions: Predictions, required: dict[str, np.ndarray], source: Path | str
) -> list[str]:
    """One row per required frame, in `required` order; FercacheError naming what is missing."""
    rows = []
    for video, frames in required.items():
        entry = predictions.videos.get(video)
        if entry is None:
            raise FercacheError(
                f"{source}: video '{video}' is required but the predictions have none; rerun "
                "`fercache predict` with the same frame list"
            )
        index = np.searchsorted(entry.frames, frames).clip(max=len(entry.frames) - 1)
        missing = frames[entry.frames[index] != frames] if len(entry.frames) else frames
        if len(missing):
            raise FercacheError(
                f"{source}: no prediction for {len(missing)} required frame(s) of '{video}' "
                f"({_frames_text(video, missing)}); rerun `fercache predict` with --frames"
            )
        labels = entry.labels[index]
        rows.extend(
            f"{video}/{frame:05d}.jpg,{label}" for frame, label in zip(frames, labels, strict=True)
        )
    return rows


def _frames_text(video: str, frames: np.ndarray) -> str:
    shown = ", ".join(f"{video}/{frame:05d}.jpg" for frame in frames[:_SHOWN])
    return shown + (f" and {len(frames) - _SHOWN} more" if len(frames) > _SHOWN else "")


def write_submission(pred: Path, out: Path, frames: Path | None = None) -> int:
    """Write the EXPR submission for PRED's frames (or exactly those of frame list `frames`);
    validated before writing. Returns the number of rows."""
    predictions = Predictions.read(pred)
    required = (
        read_frame_list(frames)
        if frames
        else {video: rows.frames for video, rows in predictions.videos.items()}
    )
    source = f"{pred} against frame list {frames}" if frames else pred
    rows = submission_rows(predictions, required, source)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("\n".join([HEADER, *rows]) + "\n", newline="\n")
        os.replace(tmp, out)
    except OSError as error:
        raise FercacheError(f"{out}: could not write the submission ({error.strerror})") from error
    finally:
        tmp.unlink(missing_ok=True)
    return len(rows)


def read_submission(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{video: (frames, labels)} of an EXPR submission file, checked line by line."""
    path = Path(path)
    first = path.read_text(encoding="utf-8-sig").split("\n", 1)[0].strip()
    if first != HEADER:
        raise FercacheError(f"{path}:1: header must be '{HEADER}', not '{first}'")
    labels: dict[str, dict[int, int]] = {}
    for number, location, rest in _rows(path):
        match = _LOCATION.match(location)
        if not match or rest not in {str(c) for c in range(len(EXPR_CLASSES))}:
            raise FercacheError(
                f"{path}:{number}: expected '<video>/<frame>.jpg,<label 0-7>', "
                f"not '{location},{rest}'"
            )
        video_labels = labels.setdefault(match["video"], {})
        if int(match["frame"]) in video_labels:
            raise FercacheError(f"{path}:{number}: {location} appears more than once")
        video_labels[int(match["frame"])] = int(rest)
    return {
        video: (
            np.array(sorted(values), dtype=np.int32),
            np.array([values[f] for f in sorted(values)], dtype=np.int64),
        )
        for video, values in labels.items()
    }

"""ABAW submission files (EXPR, AU, VA): written from a PRED file, and read back. Each kind is a
format of `fercache.predictions.submission_formats`, which says what its rows hold.

A frame list (`fercache.data.framelist`) names the frames that need a prediction; without one,
the submission has a row for every frame the PRED file predicts.
"""

from pathlib import Path

import numpy as np

from fercache.data.framelist import (
    LOCATION,
    frame_number,
    listed_rows,
    location_field,
    read_frame_list,
)
from fercache.errors import FercacheError
from fercache.framewise.pred_file import Predictions
from fercache.outputs import write_text_atomically
from fercache.predictions.submission_formats import SubmissionFormat, submission_format
from fercache.readers import read_text

_SHOWN = 3  # frames quoted in an error before "and N more"


def submission_rows(
    predictions: Predictions,
    required: dict[str, np.ndarray],
    source: Path | str,
    kind: SubmissionFormat,
) -> list[str]:
    """One row per required frame, in `required` order; FercacheError naming what is missing."""
    if kind.task not in predictions.tasks:
        raise FercacheError(
            f"{source}: holds no {kind.task.upper()} predictions (it has "
            f"{', '.join(t.upper() for t in predictions.tasks)}); submit one of those with "
            "--task, or predict with a run trained on the task"
        )
    thresholds = np.asarray(predictions.au_thresholds)
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
        texts = kind.texts(entry, index, thresholds)
        rows.extend(
            f"{location_field(video, frame)},{text}"
            for frame, text in zip(frames, texts, strict=True)
        )
    return rows


def _frames_text(video: str, frames: np.ndarray) -> str:
    shown = ", ".join(f"{video}/{frame:05d}.jpg" for frame in frames[:_SHOWN])
    return shown + (f" and {len(frames) - _SHOWN} more" if len(frames) > _SHOWN else "")


def write_submission(pred: Path, out: Path, frames: Path | None = None, task: str = "expr") -> int:
    """Write the submission of format `task` for PRED's frames (or exactly those of frame list
    `frames`); validated before writing. Returns the number of rows."""
    kind = submission_format(task)
    predictions = Predictions.read(pred)
    required = (
        read_frame_list(frames)
        if frames
        else {video: rows.frames for video, rows in predictions.videos.items()}
    )
    source = f"{pred} against frame list {frames}" if frames else pred
    rows = submission_rows(predictions, required, source, kind)
    write_text_atomically(out, "\n".join([kind.header, *rows]) + "\n", "the submission")
    return len(rows)


def read_submission(path: Path, task: str = "expr") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{video: (frames, values)} of a submission file of format `task`, checked line by line:
    values as the format reads them back (EXPR labels (N,), AU decisions (N, 12), VA values
    (N, 2))."""
    kind = submission_format(task)
    path = Path(path)
    remedy = "write it again with `fercache submit`"
    text = read_text(path, "submission", remedy, encoding="utf-8-sig")
    first = text.split("\n", 1)[0].strip()
    if first != kind.header:
        raise FercacheError(f"{path}:1: header must be '{kind.header}', not '{first}'")
    parsed: dict[str, dict[int, list[float]]] = {}
    for number, location, rest in listed_rows(path):
        match = LOCATION.match(location)
        values = kind.values(rest)
        if not match or values is None:
            raise FercacheError(
                f"{path}:{number}: expected '<video>/<frame>.jpg,{kind.row_shape}', "
                f"not '{location},{rest}'"
            )
        video_values = parsed.setdefault(match["video"], {})
        frame = frame_number(path, number, match)
        if frame in video_values:
            raise FercacheError(f"{path}:{number}: {location} appears more than once")
        video_values[frame] = values
    read = {}
    for video, values in parsed.items():
        frames = sorted(values)
        rows = [values[frame] for frame in frames]
        read[video] = (np.array(frames, dtype=np.int32), np.array(rows, dtype=kind.dtype))
    return read

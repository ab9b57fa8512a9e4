"""ABAW submission files (EXPR, AU, VA): written from a PRED file, and read back.

A submission is a text file: a header, then one row per required frame:
- EXPR: `image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other`, rows
  `<video>/<%05d>.jpg,<label>` with the label in 0..7 (the PRED's `labels`, voted or not);
- AU: `image_location,AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26`, rows
  `<video>/<%05d>.jpg,0,1,...`: 12 decisions `probability >= threshold` with the PRED's
  `au_thresholds` (0.5 unless tuned);
- VA: `image_location,valence,arousal`, rows `<video>/<%05d>.jpg,<valence>,<arousal>` with six
  decimals, both in [-1, 1].

A frame list (`fercache.data.framelist`) names the frames that need a prediction; without one,
the submission has a row for every frame the PRED file predicts.
"""

from pathlib import Path

import numpy as np

from fercache.data.framelist import LOCATION, listed_rows, read_frame_list
from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, VA_NAMES
from fercache.errors import FercacheError
from fercache.framewise.pred_file import Predictions, VideoPredictions
from fercache.outputs import write_text_atomically
from fercache.readers import read_text

HEADER = ",".join(["image_location", *EXPR_CLASSES])
HEADERS = {
    "expr": HEADER,
    "au": ",".join(["image_location", *AU_NAMES]),
    "va": ",".join(["image_location", *VA_NAMES]),
}
_SHOWN = 3  # frames quoted in an error before "and N more"
_ROW_SHAPES = {
    "expr": "<label 0-7>",
    "au": "<12 comma-separated 0/1>",
    "va": "<valence>,<arousal> in [-1, 1]",
}


def submission_rows(
    predictions: Predictions,
    required: dict[str, np.ndarray],
    source: Path | str,
    task: str = "expr",
) -> list[str]:
    """One row per required frame, in `required` order; FercacheError naming what is missing."""
    if task not in predictions.tasks:
        raise FercacheError(
            f"{source}: holds no {task.upper()} predictions (it has "
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
        texts = _row_texts(entry, task, thresholds, index)
        rows.extend(
            f"{video}/{frame:05d}.jpg,{text}" for frame, text in zip(frames, texts, strict=True)
        )
    return rows


def _row_texts(
    entry: VideoPredictions, task: str, thresholds: np.ndarray, index: np.ndarray
) -> list[str]:
    """What follows the image location on the rows `index` of the video, as text."""
    if task == "expr":
        return [str(label) for label in entry.labels[index]]
    if task == "au":
        decisions = (entry.au[index] >= thresholds).astype(int)
        return [",".join(map(str, row)) for row in decisions]
    return [f"{valence:.6f},{arousal:.6f}" for valence, arousal in entry.va[index]]


def _frames_text(video: str, frames: np.ndarray) -> str:
    shown = ", ".join(f"{video}/{frame:05d}.jpg" for frame in frames[:_SHOWN])
    return shown + (f" and {len(frames) - _SHOWN} more" if len(frames) > _SHOWN else "")


def write_submission(pred: Path, out: Path, frames: Path | None = None, task: str = "expr") -> int:
    """Write the `task` submission for PRED's frames (or exactly those of frame list
    `frames`); validated before writing. Returns the number of rows."""
    if task not in HEADERS:
        raise FercacheError(f"unknown task '{task}': choose one of {', '.join(HEADERS)}")
    predictions = Predictions.read(pred)
    required = (
        read_frame_list(frames)
        if frames
        else {video: rows.frames for video, rows in predictions.videos.items()}
    )
    source = f"{pred} against frame list {frames}" if frames else pred
    rows = submission_rows(predictions, required, source, task)
    write_text_atomically(out, "\n".join([HEADERS[task], *rows]) + "\n", "the submission")
    return len(rows)


def read_submission(path: Path, task: str = "expr") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{video: (frames, values)} of a `task` submission file, checked line by line: values are
    EXPR labels (N,), AU decisions (N, 12) or VA values (N, 2)."""
    path = Path(path)
    remedy = "write it again with `fercache submit`"
    text = read_text(path, "submission", remedy, encoding="utf-8-sig")
    first = text.split("\n", 1)[0].strip()
    if first != HEADERS[task]:
        raise FercacheError(f"{path}:1: header must be '{HEADERS[task]}', not '{first}'")
    parsed: dict[str, dict[int, list[float]]] = {}
    for number, location, rest in listed_rows(path):
        match = LOCATION.match(location)
        values = _row_values(rest, task)
        if not match or values is None:
            raise FercacheError(
                f"{path}:{number}: expected '<video>/<frame>.jpg,{_ROW_SHAPES[task]}', "
                f"not '{location},{rest}'"
            )
        video_values = parsed.setdefault(match["video"], {})
        if int(match["frame"]) in video_values:
            raise FercacheError(f"{path}:{number}: {location} appears more than once")
        video_values[int(match["frame"])] = values
    dtype = np.float32 if task == "va" else np.int64
    read = {}
    for video, values in parsed.items():
        frames = sorted(values)
        array = np.array([values[frame] for frame in frames], dtype=dtype)
        read[video] = (np.array(frames, dtype=np.int32), array[:, 0] if task == "expr" else array)
    return read


def _row_values(text: str, task: str) -> list[float] | None:
    """The numbers after the image location, or None when they do not fit `task`."""
    fields = text.split(",")
    if task == "expr":
        allowed = {str(c) for c in range(len(EXPR_CLASSES))}
        return [int(text)] if text in allowed else None
    if task == "au":
        ok = len(fields) == len(AU_NAMES) and all(field in ("0", "1") for field in fields)
        return [int(field) for field in fields] if ok else None
    try:
        values = [float(field) for field in fields]
    except ValueError:
        return None
    ok = len(values) == len(VA_NAMES) and all(-1 <= value <= 1 for value in values)
    return values if ok else None

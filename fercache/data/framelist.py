"""The organisers' frame lists: which frames of which videos need a prediction.

A frame list names the frames that need a prediction (for the test split, the organisers give
one): one `<video>/<frame>.jpg` per line, optionally followed by a comma and anything else (so
the organisers' example submission file, and any submission, is itself a frame list); an
optional first line starting with `image_location`; blank lines are ignored. Rows are read as
CSV: a video name holding a comma is quoted (`"talk, take 2/00001.jpg",3`), as `submit` writes it.
"""

import csv
import re
from pathlib import Path

import numpy as np

from fercache.errors import FercacheError
from fercache.readers import read_text

# `<video>/<frame>.jpg`; a video name may hold spaces and commas (a CSV field then quotes it)
LOCATION = re.compile(r"^(?P<video>[^/\s](?:[^/]*[^/\s])?)/(?P<frame>\d+)\.jpg$")
# PRED files and feature stores hold frame numbers as int32
MAX_FRAME = 2**31 - 1


def location_field(video: str, frame: int) -> str:
    """`video/frame.jpg` as the first field of a CSV row: quoted as CSV quotes (when the name
    holds a comma or a quote), so `listed_rows` reads the name back whole."""
    location = f"{video}/{frame:05d}.jpg"
    if "," in location or '"' in location:
        return '"' + location.replace('"', '""') + '"'
    return location


def frame_number(path: Path, line: int, match: re.Match[str]) -> int:
    """The frame number of a matched `LOCATION`, refused past what the files store (int32)."""
    frame = int(match["frame"])
    if frame > MAX_FRAME:
        raise FercacheError(
            f"{path}:{line}: '{match[0]}': frame number {frame} is out of range; frames are "
            f"numbered from 1 to {MAX_FRAME}"
        )
    return frame


def read_frame_list(path: Path) -> dict[str, np.ndarray]:
    """{video: 1-based frames, ascending} in order of first appearance; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FercacheError(f"{path}: no such frame list")
    frames: dict[str, list[int]] = {}
    for number, location, _ in listed_rows(path):
        match = LOCATION.match(location)
        if not match or int(match["frame"]) < 1:
            raise FercacheError(
                f"{path}:{number}: '{location}' is not an image location like "
                "'video1/00001.jpg' (1-based frame number)"
            )
        frames.setdefault(match["video"], []).append(frame_number(path, number, match))
    if not frames:
        raise FercacheError(f"{path}: lists no frames; give one '<video>/<frame>.jpg' per line")
    listed = {video: np.array(sorted(values), dtype=np.int32) for video, values in frames.items()}
    for video, values in listed.items():
        repeated = values[1:][np.diff(values) == 0]
        if len(repeated):
            raise FercacheError(f"{path}: {video}/{repeated[0]:05d}.jpg is listed more than once")
    return listed


def listed_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, image location, rest of the line) of every non-blank, non-header line of a
    frame list or submission file."""
    remedy = "give a text file with one '<video>/<frame>.jpg' per line"
    lines = read_text(path, "frame list", remedy, encoding="utf-8-sig").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.lower().startswith("image_location")):
            continue
        try:
            fields = next(csv.reader([line.strip()], strict=True))
        except csv.Error as error:
            raise FercacheError(f"{path}:{number}: not a CSV row ({error}): '{line}'") from error
        rows.append((number, fields[0].strip(), ",".join(fields[1:]).strip()))
    return rows

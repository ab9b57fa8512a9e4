"""The safe readers: how fercache reads a file that may be damaged, and says it cannot: one line
naming the file, what it is, what is wrong with it and the command that writes it again.

`unreadable` is that line; `read_text` and `read_json` read a text or JSON file through it, so a
missing, empty, non-UTF-8 or malformed file never ends in a traceback. Each kind of file keeps
its own reader in its own module (the feature store in `features.store`, the PRED file in
`framewise.pred_file`, a run's resume files in `resume`, ...); those readers word their
failures with this module.
"""

import json
from pathlib import Path

from PIL import Image

from fercache.errors import FercacheError

LONGEST_REASON = 160  # characters of a library's message quoted in an error
# What PIL raises for an image file it cannot decode: OSError (not an image, truncated),
# ValueError, and DecompressionBombError for a header declaring more pixels than PIL allows
# (a few bytes that would take gigabytes to decode). Every reader of frames and still images
# catches all three and skips or replaces that one image.
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)


def first_line(error: BaseException) -> str:
    """The first sentence of an exception's first line (its type name when it has none): torch
    follows its reason with sentences of advice that do not apply to a damaged file."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    sentence = lines[0].split(". ")[0]
    return sentence if len(sentence) <= LONGEST_REASON else sentence[:LONGEST_REASON] + "..."


def unreadable(path: Path, what: str, why: str, remedy: str) -> FercacheError:
    """`<path>: unreadable <what> (<why>); <remedy>` as the error to raise."""
    return FercacheError(f"{path}: unreadable {what} ({why}); {remedy}")


def read_text(path: Path, what: str, remedy: str, *, encoding: str = "utf-8") -> str:
    """The text of `path`; FercacheError when it is missing, not a file or not `encoding`."""
    path = Path(path)
    if not path.is_file():
        raise unreadable(path, what, "missing", remedy)
    try:
        return path.read_bytes().decode(encoding)
    except UnicodeDecodeError as error:
        why = f"not {encoding.upper().removesuffix('-SIG')} text: {first_line(error)}"
        raise unreadable(path, what, why, remedy) from error
    except OSError as error:
        raise unreadable(path, what, first_line(error), remedy) from error


def read_json(path: Path, what: str, remedy: str) -> object:
    """The JSON value in `path`; FercacheError when it is missing, empty or not JSON."""
    text = read_text(path, what, remedy)
    if not text.strip():
        raise unreadable(path, what, "empty file", remedy)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise unreadable(path, what, f"not JSON: {first_line(error)}", remedy) from error


def read_json_object(path: Path, what: str, remedy: str) -> dict:
    """`read_json` of a file that must hold a JSON object."""
    value = read_json(path, what, remedy)
    if not isinstance(value, dict):
        raise unreadable(path, what, f"holds a JSON {_json_type(value)}, not an object", remedy)
    return value


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")

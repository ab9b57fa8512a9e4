"""Writing a result or run file (predictions, reports, plots, submissions, weights, checkpoints):
its folder is created, it appears complete or not at all, and a failure names the file instead
of a stack trace."""

import os
from collections.abc import Callable
from pathlib import Path

from fercache.errors import FercacheError


def write_atomically(path: Path, write: Callable[[Path], object], what: str) -> Path:
    """Create `path`'s folder, call `write` on a temporary name beside it, rename it to `path`.

    A killed process or a full disk leaves no half-written `path` (and no temporary file after
    an error); any OSError becomes a FercacheError naming `path` and `what` was being written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise FercacheError(
            f"{path}: could not write {what} ({error.strerror or error}); "
            "check the folder is writable and has space"
        ) from error
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: Path, text: str, what: str) -> Path:
    """`write_atomically` for a text file (JSON, JSON lines, CSV), with Unix line ends."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, newline="\n"), what)

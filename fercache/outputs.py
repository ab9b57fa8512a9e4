"""Writing a result or run file (predictions, reports, plots, submissions, weights, checkpoints,
feature stores, manifests): its folder is created, it appears complete or not at all, and a
failure names the file instead of a stack trace. Every file fercache writes goes through
`write_atomically`; a command writing many files into one folder first checks it can
(`output_folder`)."""

import glob
import io
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import h5py

from fercache.errors import FercacheError

TMP_MARK = ".tmp-"  # `.<name>.tmp-<pid>`: the temporary name of a file being written
WRITE_ADVICE = (
    "nothing was written under that name; check the folder is writable and has space, then run "
    "the command again"
)


def temporary_name(path: Path) -> Path:
    """The name `path` is written under before it is renamed: hidden, and not ending in
    `path`'s suffix, so no `*.h5` or `*.json` glob ever sees a half-written file."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_dead_leftovers(folder: Path, name: str = "") -> list[Path]:
    """Delete the temporary files (`temporary_name`) in `folder` that processes no longer
    running left when they were killed mid-write, only those of the file `name` when given; a
    live process's are kept. Returns what was deleted."""
    removed = []
    pattern = f".{glob.escape(name)}{TMP_MARK}*" if name else f".*{TMP_MARK}*"
    for path in Path(folder).glob(pattern):
        pid = path.name.rpartition(TMP_MARK)[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            with suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def write_atomically(
    path: Path,
    write: Callable[[Path], object],
    what: str,
    advice: str = WRITE_ADVICE,
    publish: Callable[[Path, Path], object] = os.replace,
) -> Path:
    """Create `path`'s folder, call `write` on a temporary name beside it, flush it to disk,
    rename it to `path` (`publish(tmp, path)`: a caller may check something first, or link
    instead of renaming).

    A killed process, a power cut or a full disk leaves no half-written `path` (and no
    temporary file after an error or an interrupt; what a killed writer of `path` left is
    deleted by the next one: `remove_dead_leftovers`); any OSError becomes a FercacheError naming
    `path`, what was being written and `advice`. The temporary name does not end in `path`'s
    suffix (`temporary_name`): a writer that picks its format from the name (matplotlib's
    `savefig`) must be given the format.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(path.parent, path.name)
        write(tmp)
        _flush_to_disk(tmp)
        publish(tmp, path)
    except OSError as error:
        raise FercacheError(
            f"{path}: could not write {what} ({error.strerror or error}); {advice}"
        ) from error
    finally:
        with suppress(OSError):  # e.g. no folder to remove it from: the error above says why
            tmp.unlink(missing_ok=True)
    return path


def write_made_atomically(
    path: Path,
    make: Callable[[], bytes | memoryview],
    what: str,
    advice: str = WRITE_ADVICE,
    publish: Callable[[Path, Path], object] = os.replace,
) -> Path:
    """`write_atomically` of a file a library makes in memory (`make`): for HDF5, torch and
    safetensors, which fail on a full disk otherwise than with an OSError. h5py raises
    RuntimeError, and a flush that failed leaves the file open inside HDF5, which then crashes
    the process as it exits (exit 139); torch.save raises RuntimeError and safetensors
    SafetensorError. Here only Python's own write meets the disk."""
    return write_atomically(path, lambda tmp: tmp.write_bytes(make()), what, advice, publish)


def hdf5_image(fill: Callable[[h5py.File], None]) -> memoryview:
    """The bytes of a new HDF5 file that `fill` writes, made in memory (`write_made_atomically`)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        fill(handle)
    return buffer.getbuffer()


def output_folder(folder: Path, option: str = "--out") -> Path:
    """Create `folder` (the `option` of a command that writes many files there) and check that a
    file can be written in it, before any work: a read-only file system, a file of that name or
    a full disk is one line naming the folder, not a traceback once the work is done."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FercacheError(
            f"{folder}: {option} names a file, not a folder; choose another {option}"
        )
    probe = temporary_name(folder / "write-check")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"fercache")
    except OSError as error:
        raise FercacheError(
            f"{folder}: cannot write into this folder ({error.strerror or error}); choose another "
            f"{option}, or make it writable"
        ) from error
    finally:
        with suppress(OSError):
            probe.unlink(missing_ok=True)
    return folder


def write_text_atomically(
    path: Path,
    text: str,
    what: str,
    advice: str = WRITE_ADVICE,
    publish: Callable[[Path, Path], object] = os.replace,
) -> Path:
    """`write_atomically` for a text file (JSON, JSON lines, YAML, CSV), with Unix line ends."""
    return write_atomically(
        path, lambda tmp: tmp.write_text(text, newline="\n"), what, advice, publish
    )


def create_text_exclusively(path: Path, text: str, what: str) -> bool:
    """Write `path` whole unless it exists: False, and nothing written, when it does. Of several
    processes creating it at once exactly one succeeds, and nobody reads it half-written: the
    text is written under a temporary name and hard-linked to `path`, which fails if it exists.
    Where the filesystem has no hard links (exFAT, some network shares) `path` is created with
    O_EXCL and then written: still exactly one succeeds, but a reader may catch it empty."""
    created = True

    def link(tmp: Path, path: Path) -> None:
        nonlocal created
        try:
            os.link(tmp, path)
        except FileExistsError:
            created = False
        except OSError:  # no hard links here
            try:
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                created = False
                return
            with os.fdopen(handle, "wb") as file, open(tmp, "rb") as written:
                file.write(written.read())
                file.flush()
                os.fsync(file.fileno())

    write_text_atomically(path, text, what, publish=link)
    return created


def _flush_to_disk(path: Path) -> None:
    # Without it a power cut soon after the rename can leave `path` empty on some filesystems.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())

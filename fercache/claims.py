"""Claims: which process is computing which item of a shared folder, so that several processes
started on one folder share the work instead of each doing all of it.

A claim is the file `FOLDER/.<item>.claim`, created with O_CREAT|O_EXCL (only one process can
create it) and holding its holder's pid, host name, start time and a random token. Its holder
touches it at least every `REFRESH_SECONDS` while it works and deletes it when the item is
done or it fails (`Claims` releases everything it holds on exit). A claim is abandoned, and any
process may take it over, when its pid is no longer alive on this host (`os.kill(pid, 0)`) or,
whatever the host, when it has not been touched for `STALE_SECONDS`: a killed process never
leaves an item stuck, and a process on another host sharing the folder (NFS) keeps its claims
as long as it keeps touching them.

Taking over renames the abandoned claim to a name private to the taker, checks that it renamed
the claim it judged abandoned (its token), deletes it and creates its own claim with
O_CREAT|O_EXCL again. Two processes racing for one abandoned claim: at most one wins, except in
a window of microseconds where both may compute the item; items must be written atomically so
that the worst case is one item computed twice, never a lost or torn one.
"""

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from fercache.outputs import process_alive

CLAIM_SUFFIX = ".claim"
# A claim is touched at least this often by its holder while it works...
REFRESH_SECONDS = 30.0
# ...so one untouched this long belongs to a process that died or hung, on any host. Far above
# the refresh interval: a holder busy with one long step (a batch, a store write) keeps it.
STALE_SECONDS = 600.0
HOST = socket.gethostname()
# No claim of this process is older than this: a claim naming this process's pid but made
# before it is an earlier process's whose pid was reused (after a reboot), not ours.
PROCESS_STARTED = time.time()


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, as its file says; `touched` is the file's modification time."""

    pid: int
    host: str
    started: float
    token: str
    touched: float

    def __str__(self) -> str:
        return f"pid {self.pid}" + ("" if self.host == HOST else f" on {self.host}")

    @property
    def abandoned(self) -> bool:
        if time.time() - self.touched > STALE_SECONDS:
            return True
        if self.host != HOST or self.pid <= 0:
            return False
        if self.pid == os.getpid():
            return self.started < PROCESS_STARTED
        return not process_alive(self.pid)


def claim_path(folder: Path, item: str) -> Path:
    return Path(folder) / f".{item}{CLAIM_SUFFIX}"


def read_holder(path: Path) -> Holder | None:
    """The claim's holder; None when there is no claim. A claim caught between its creation and
    its contents reads as held by pid 0 on this host: live until it goes stale."""
    try:
        touched = path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        return Holder(
            int(record["pid"]), str(record["host"]), float(record["started"]),
            str(record["token"]), touched,
        )  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return Holder(0, HOST, touched, "", touched)


class Claims:
    """The claims this process holds in one folder. Thread-safe: a writer thread releases the
    items it finishes while the main thread takes the next ones. As a context manager it
    releases whatever it still holds on exit, an error's included."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.token = secrets.token_hex(8)
        self.started = time.time()
        self.held: set[str] = set()
        self.lock = threading.Lock()
        self.refreshed = time.monotonic()

    def __enter__(self) -> "Claims":
        return self

    def __exit__(self, *error) -> None:
        self.release_all()

    def take(self, item: str) -> bool:
        """Claim `item`: True when this process holds it now (it already did, the claim was
        free, or it was abandoned and is taken over); False when a live process holds it."""
        with self.lock:
            if item in self.held:
                return True
        path = claim_path(self.folder, item)
        if not self._create(path):
            holder = read_holder(path)
            if holder is not None and not holder.abandoned:
                return False
            if holder is not None and not self._remove_abandoned(path, holder):
                return False
            if not self._create(path):  # another process took it over first
                return False
        with self.lock:
            self.held.add(item)
        return True

    def holder(self, item: str) -> Holder | None:
        """The live process other than this one holding `item`, if any."""
        holder = read_holder(claim_path(self.folder, item))
        if holder is None or holder.token == self.token or holder.abandoned:
            return None
        return holder

    def release(self, item: str) -> None:
        """Delete the claim on `item`, unless another process has taken it over meanwhile."""
        with self.lock:
            self.held.discard(item)
        path = claim_path(self.folder, item)
        holder = read_holder(path)
        if holder is not None and holder.token == self.token:
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        with self.lock:
            items = list(self.held)
        for item in items:
            self.release(item)

    def refresh(self) -> None:
        """Touch the held claims, at most every REFRESH_SECONDS: they stay visibly alive."""
        if time.monotonic() - self.refreshed < REFRESH_SECONDS:
            return
        self.refreshed = time.monotonic()
        with self.lock:
            items = list(self.held)
        for item in items:
            with suppress(FileNotFoundError):
                os.utime(claim_path(self.folder, item))

    @contextmanager
    def kept_alive(self) -> Iterator[None]:
        """Touch the held claims from a background thread while the body runs: for a holder
        whose single steps may outlast `STALE_SECONDS` (a training epoch, its validation)."""
        stop = threading.Event()

        def touch() -> None:
            while not stop.wait(REFRESH_SECONDS):
                self.refresh()

        thread = threading.Thread(target=touch, name="fercache-claims", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _create(self, path: Path) -> bool:
        record = {"pid": os.getpid(), "host": HOST, "started": self.started, "token": self.token}
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as claim:
            json.dump(record, claim)
        return True

    def _remove_abandoned(self, path: Path, judged: Holder) -> bool:
        """Delete the abandoned claim `judged`; False when it turns out to be another one."""
        private = path.with_name(f"{path.name}.takeover-{os.getpid()}-{self.token}")
        try:
            os.rename(path, private)
        except FileNotFoundError:  # released, or taken over by another process: create again
            return True
        taken = read_holder(private)
        if taken is not None and taken.token != judged.token:
            # A fresh claim made between our reading and our renaming: give it back.
            with suppress(OSError):  # a newer claim exists already, or no hard links here
                os.link(private, path)
            private.unlink(missing_ok=True)
            return False
        private.unlink(missing_ok=True)
        return True

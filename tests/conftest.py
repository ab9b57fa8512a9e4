"""Shared fixtures: one small synthetic Aff-Wild2 tree per test session; one torch thread; a
disk that fills up (faked, or a real small file system)."""

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fercache.synth import SynthConfig, generate

SMALL_TREE = SynthConfig(videos=8, frames=120, seed=3, labelled_pool=200, unlabelled_pool=200)


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory) -> Path:
    """A small generated tree (read-only for tests: copy it before changing anything)."""
    root = tmp_path_factory.mktemp("synthetic") / "tree"
    generate(root, SMALL_TREE, progress=False)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): intra-op
    threads gain nothing there, and on a busy 2-core machine they spin against each other (a 4x
    slowdown measured). Restored for the modules after the one that asked."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def full_disk_after(monkeypatch):
    """`full_disk_after(owner, "name", calls)`: from its call `calls` + 1 on, the writer
    `owner.name` fails as on a full disk (ENOSPC). `monkeypatch.undo()` frees the disk."""

    def install(owner: object, name: str, calls: int) -> None:
        real, made = getattr(owner, name), []

        def writer(*args, **kwargs):
            made.append(args)
            if len(made) > calls:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, writer)

    return install


@pytest.fixture
def small_disk(tmp_path_factory):
    """`small_disk(kilobytes, read_only=False)`: an empty folder that is a tmpfs of that size (a
    real full disk, or a read-only file system, which root cannot write either), unmounted after
    the test; `small_disk.grow(folder, kilobytes)` frees space. Mounting needs root, as CI
    runs: the test is skipped, with the reason, otherwise."""
    mounted: list[Path] = []

    def mount(kilobytes: int, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small file system (tmpfs) needs root, as CI runs")
        folder = tmp_path_factory.mktemp("disk")
        options = f"size={kilobytes}k" + (",ro" if read_only else "")
        done = _mount("-t", "tmpfs", "-o", options, "tmpfs", folder)
        if done.returncode != 0:
            pytest.skip(f"could not mount a tmpfs: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    def grow(folder: Path, kilobytes: int) -> None:
        assert _mount("-o", f"remount,size={kilobytes}k", folder).returncode == 0

    mount.grow = grow
    yield mount
    for folder in mounted:
        # lazily: a process that failed on it may still hold a file open there
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def _mount(*arguments: object) -> subprocess.CompletedProcess:
    command = ["mount", *map(str, arguments)]
    return subprocess.run(command, capture_output=True, text=True, check=False)

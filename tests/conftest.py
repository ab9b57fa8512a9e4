"""Shared fixtures: one small synthetic Aff-Wild2 tree per test session; one torch thread; a
disk that fills up."""

import errno
import os
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

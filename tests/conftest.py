"""Shared fixtures: one small synthetic Aff-Wild2 tree per test session."""

from pathlib import Path

import pytest

from fercache.data.synthetic import SynthConfig, generate

SMALL_TREE = SynthConfig(videos=8, frames=120, seed=3, labelled_pool=200, unlabelled_pool=200)


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory) -> Path:
    """A small generated tree (read-only for tests: copy it before changing anything)."""
    root = tmp_path_factory.mktemp("synthetic") / "tree"
    generate(root, SMALL_TREE, progress=False)
    return root

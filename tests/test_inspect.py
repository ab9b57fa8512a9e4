"""`fercache inspect` on a synthetic tree reports exactly the quirks the generator planted."""

import json

import numpy as np
import pytest

from fercache.inspect import inspect_dataset


@pytest.fixture(scope="module")
def planted_and_found(synthetic_tree):
    planted = json.loads((synthetic_tree / "synth.json").read_text())
    return planted, inspect_dataset(synthetic_tree, progress=False)


@pytest.mark.parametrize("split", ["train", "val"])
def test_split_counts_match_what_was_planted(planted_and_found, split):
    planted, found = planted_and_found
    videos = [v for v in planted["videos"].values() if v["split"] == split]

    expr = found.split("expr", split)
    assert expr.videos == len(videos)
    assert expr.frames == sum(v["frames"] for v in videos)
    assert expr.frames_without_image == sum(v["frames_without_image"] for v in videos)
    assert expr.invalid == sum(v["expr_invalid"] for v in videos) > 0
    planted_classes = np.sum([v["expr_counts"] for v in videos], axis=0)
    assert list(expr.distribution.values()) == planted_classes.tolist()
    assert all(n > 0 for n in planted_classes), "every class is present in every split"
    assert found.split("au", split).invalid == sum(v["au_invalid"] for v in videos)
    assert found.split("va", split).invalid == sum(v["va_invalid"] for v in videos)


def test_quirks_are_reported(planted_and_found):
    planted, found = planted_and_found
    assert found.subjects == sorted(planted["left_right_pair"])
    assert found.unannotated_videos == []
    assert found.images == sum(v["images"] for v in planted["videos"].values())
    trailing = [n for n, v in planted["videos"].items() if v["trailing_frames_without_image"]]
    assert trailing, "the generator plants annotation files longer than the image folder"
    longer = {note.path.stem for note in found.notes if note.kind == "annotation_longer"}
    assert longer == set(trailing)
    assert found.note_counts()["annotation_longer"] == 3 * len(trailing)  # EXPR, AU and VA files

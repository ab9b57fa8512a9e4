"""`fercache inspect` on a synthetic tree reports exactly the quirks the generator planted."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fercache.cli import app
from fercache.data.inspect import inspect_dataset
from tests.test_affwild2 import AU_HEADER, EXPR_HEADER, write_annotation, write_images

runner = CliRunner()


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


def videos_table(output: str) -> list[tuple[str, str, list[str]]]:
    """(split, tasks, names) of each row of the "Videos per split" table; a row's names may
    wrap onto the lines below it."""
    lines = output[output.index("Videos per split") :].splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("┡")) + 1 :]
    rows: list[list[str]] = []
    for line in body[: next(i for i, line in enumerate(body) if line.startswith("└"))]:
        split, tasks, _, names = (cell.strip() for cell in line.split("│")[1:5])
        if split:
            rows.append([split, tasks, names])
        else:
            rows[-1][2] += names
    return [(split, tasks, [n.strip() for n in names.split(",")]) for split, tasks, names in rows]


def test_each_splits_videos_are_listed_in_the_table_and_the_json(synthetic_tree, tmp_path):
    planted = json.loads((synthetic_tree / "synth.json").read_text())["videos"]
    wanted = {
        split: sorted(name for name, video in planted.items() if video["split"] == split)
        for split in ("train", "val")
    }
    out = tmp_path / "summary.json"

    result = runner.invoke(
        app, ["inspect", str(synthetic_tree), "--json", str(out), "--no-progress"]
    )

    assert result.exit_code == 0, result.output
    assert videos_table(result.output) == [
        ("train", "EXPR/AU/VA", wanted["train"]),
        ("val", "EXPR/AU/VA", wanted["val"]),
    ]
    summary = json.loads(out.read_text())
    listed = {(s["task"], s["split"]): s["video_names"] for s in summary["splits"]}
    assert listed == {
        (task, split): wanted[split] for task in ("expr", "au", "va") for split in wanted
    }


def test_tasks_annotating_different_videos_get_rows_of_their_own(tmp_path):
    for video in ("b", "a", "c"):
        write_annotation(tmp_path, f"{EXPR_HEADER}\n0\n", video)
        write_images(tmp_path, video, [1])
    write_annotation(
        tmp_path, f"{AU_HEADER}\n{','.join(['0'] * 12)}\n", "c", "AU_Detection_Challenge"
    )
    write_annotation(tmp_path, f"{EXPR_HEADER}\n1\n", "d", split="Validation_Set")
    write_images(tmp_path, "d", [1])
    out = tmp_path / "summary.json"

    result = runner.invoke(app, ["inspect", str(tmp_path), "--json", str(out), "--no-progress"])

    assert result.exit_code == 0, result.output
    assert videos_table(result.output) == [
        ("train", "EXPR", ["a", "b", "c"]),
        ("train", "AU", ["c"]),
        ("val", "EXPR", ["d"]),
    ]
    summary = json.loads(out.read_text())
    assert [(s["task"], s["split"], s["video_names"]) for s in summary["splits"]] == [
        ("expr", "train", ["a", "b", "c"]),
        ("expr", "val", ["d"]),
        ("au", "train", ["c"]),
    ]

"""Label numberings of other data sets (AffectNet, ExpW, RAF-DB, FER2013) read into ABAW's
classes, classes without counterpart counted, undeclared numbers refused; the per-class cap of
Yu et al. §4.1 (the rest of the extra labelled images become unlabelled)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fercache.cli import app
from fercache.data.numbering import NUMBERINGS, Numbering, split_declaration
from fercache.data.tasks import EXPR_CLASSES
from fercache.errors import FercacheError
from fercache.pretrain.loop import _unlabelled_pool
from fercache.pretrain.sampling import cap_per_class
from fercache.pretrain.sources import LabelledImages, per_class_cap, read_labelled

runner = CliRunner()
ABAW = {name: index for index, name in enumerate(EXPR_CLASSES)}
TINY = {"backbone": "resnet10t", "image_size": 32, "batch_size": 16, "mu": 1, "workers": 0}


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), (120, 60, 30)).save(path)
    return path


def _csv(folder: Path, labels: list[str]) -> Path:
    """A CSV whose image i is `img<i>.jpg`, labelled labels[i]."""
    rows = [f"{_image(folder / f'img{i}.jpg').name},{label}" for i, label in enumerate(labels)]
    path = folder / "train.csv"
    path.write_text("\n".join(["path,label", *rows]) + "\n")
    return path


def _by_image(images: LabelledImages) -> dict[str, str]:
    return {
        path.name: EXPR_CLASSES[label]
        for path, label in zip(images.paths, images.labels, strict=True)
    }


def test_an_affectnet_csv_reads_into_abaw_classes_and_counts_the_classes_it_lacks(tmp_path):
    path = _csv(tmp_path, [str(number) for number in range(11)] + ["7", "10"])
    images = read_labelled([f"affectnet:{path}"])

    # AffectNet: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger
    assert _by_image(images) == {
        "img0.jpg": "Neutral",
        "img1.jpg": "Happiness",
        "img2.jpg": "Sadness",
        "img3.jpg": "Surprise",
        "img4.jpg": "Fear",
        "img5.jpg": "Disgust",
        "img6.jpg": "Anger",
    }
    (source,) = images.sources
    assert source.numbering == "affectnet" and source.source == f"affectnet:{path}"
    assert source.left_out == {"Contempt": 2, "No-face": 2, "None": 1, "Uncertain": 1}
    assert source.mapping["1"] == "Happiness" and source.mapping["7"] is None
    assert source.counts == {name: int(name != "Other") for name in EXPR_CLASSES}
    (problem,) = [str(p) for p in images.problems]
    assert problem == (
        f"affectnet:{path}: left out, no ABAW class: 2 Contempt, 2 No-face, 1 None, 1 Uncertain "
        "images"
    )


def test_an_expw_csv_reads_into_abaw_classes(tmp_path):
    images = read_labelled([f"ExpW:{_csv(tmp_path, [str(n) for n in range(7)] + ['7'])}"])
    # ExpW: 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral
    assert _by_image(images) == {
        "img0.jpg": "Anger",
        "img1.jpg": "Disgust",
        "img2.jpg": "Fear",
        "img3.jpg": "Happiness",
        "img4.jpg": "Sadness",
        "img5.jpg": "Surprise",
        "img6.jpg": "Neutral",
    }
    assert "label '7' is neither a class name nor in the ExpW numbering (0-6)" in str(
        images.problems[0]
    )


def test_a_rafdb_class_folder_reads_into_abaw_classes(tmp_path):
    for number in range(1, 8):
        _image(tmp_path / "raf" / str(number) / f"face{number}.jpg")
    images = read_labelled([f"rafdb:{tmp_path / 'raf'}"])
    # RAF-DB basic: 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral
    assert _by_image(images) == {
        "face1.jpg": "Surprise",
        "face2.jpg": "Fear",
        "face3.jpg": "Disgust",
        "face4.jpg": "Happiness",
        "face5.jpg": "Sadness",
        "face6.jpg": "Anger",
        "face7.jpg": "Neutral",
    }


def test_fer2013_and_class_names_need_no_guessing(tmp_path):
    assert NUMBERINGS["fer2013"].mapping() == {
        "0": "Anger",
        "1": "Disgust",
        "2": "Fear",
        "3": "Happiness",
        "4": "Sadness",
        "5": "Surprise",
        "6": "Neutral",
    }
    names = ["happy", "ANGRY", "Surprised", "sadness", "contempt", "Other"]
    images = read_labelled([_csv(tmp_path, names)])
    assert list(_by_image(images).values()) == [
        "Happiness",
        "Anger",
        "Surprise",
        "Sadness",
        "Other",
    ]
    assert images.sources[0].numbering == "names"
    assert images.sources[0].left_out == {"Contempt": 1}


def test_a_declaration_is_taken_only_when_it_names_a_numbering():
    assert split_declaration("affectnet:data/train.csv") == (
        NUMBERINGS["affectnet"],
        "data/train.csv",
    )
    assert split_declaration("weird:name.csv") == (None, "weird:name.csv")
    assert split_declaration(Path("data/train.csv")) == (None, "data/train.csv")


def test_numbers_without_a_declared_numbering_are_refused(tmp_path, synthetic_tree):
    path = _csv(tmp_path / "csv", ["Neutral", "3"])
    _image(tmp_path / "folders" / "4" / "x.jpg")
    with pytest.raises(FercacheError, match="declares no numbering"):
        read_labelled([tmp_path / "folders"])

    result = runner.invoke(
        app, ["pretrain", f"--labelled={path}", f"--out={tmp_path / 'run'}", "--recipe=supervised"]
    )

    assert result.exit_code == 2
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith(f"error: {path}:3: label '3' is a number, but the source declares")
    assert "abaw, affectnet, expw, rafdb, fer2013" in line
    assert not (tmp_path / "run").exists()


def test_an_affwild2_root_is_numbered_abaw(synthetic_tree):
    assert read_labelled([f"abaw:{synthetic_tree}"]).sources[0].numbering == "abaw"
    with pytest.raises(FercacheError, match="an Aff-Wild2 root is numbered abaw"):
        read_labelled([f"affectnet:{synthetic_tree}"])


# --- the per-class cap ---------------------------------------------------------------------


def test_the_cap_keeps_exactly_n_per_class_of_the_still_images_drawn_by_seed():
    rng = np.random.default_rng(0)
    labels = rng.choice(8, 400, p=[0.3, 0.2, 0.01, 0.05, 0.2, 0.1, 0.1, 0.04])
    still = np.arange(400) >= 100  # the first 100 are video frames: never capped

    kept, rest = cap_per_class(labels, still, 12, seed=5)

    assert np.array_equal(np.sort(np.concatenate([kept, rest])), np.arange(400))
    assert set(range(100)) <= set(kept.tolist())
    for cls in range(8):
        available = int(np.sum(still & (labels == cls)))
        assert np.sum(still[kept] & (labels[kept] == cls)) == min(12, available)
        assert np.sum(labels[rest] == cls) == max(0, available - 12)
    again, _ = cap_per_class(labels, still, 12, seed=5)
    other, _ = cap_per_class(labels, still, 12, seed=6)
    assert np.array_equal(kept, again) and not np.array_equal(kept, other)
    assert len(cap_per_class(labels, still, 0, seed=5)[1]) == 0  # 0: no cap


def test_the_images_over_the_cap_join_the_unlabelled_pool(tmp_path):
    labels = [name for name in ("Happiness", "Fear") for _ in range(5)]
    images = read_labelled([_csv(tmp_path, labels)])
    kept, over = per_class_cap(images, 3, seed=0)
    assert sorted(EXPR_CLASSES[label] for label in kept.labels) == ["Fear"] * 3 + ["Happiness"] * 3
    assert len(over.paths) == 4 and not set(over.paths) & set(kept.paths)

    pool = _unlabelled_pool(SimpleNamespace(uses_unlabelled=True), [], kept, over)
    assert pool.paths == over.paths  # the over-cap images alone suffice
    assert "4 still images over per_class_cap joined the unlabelled images" in str(
        kept.problems[-1]
    )
    assert _unlabelled_pool(SimpleNamespace(uses_unlabelled=False), [], kept, over) is None
    assert "left out: the recipe reads no unlabelled images" in str(kept.problems[-1])


def test_a_run_prints_and_writes_the_mapping_and_the_counts(synthetic_tree, tmp_path):
    folder = tmp_path / "affectnet"
    path = _csv(folder, [str(number % 11) for number in range(44)])
    sets = [f"--set={key}={value}" for key, value in TINY.items()]
    run = tmp_path / "run"

    result = runner.invoke(
        app,
        [
            "pretrain",
            f"--labelled={synthetic_tree / 'pools' / 'labelled.csv'}",
            f"--labelled=affectnet:{path}",
            f"--out={run}",
            "--per-class-cap=6",
            "--steps=2",
            *sets,
        ],
    )

    assert result.exit_code == 0, result.output
    summary = json.loads((run / "labels.json").read_text())
    pool, affectnet = summary["sources"]
    assert pool["numbering"] == "names" and affectnet["numbering"] == "affectnet"
    assert affectnet["left_out"] == {"Contempt": 4, "No-face": 4, "None": 4, "Uncertain": 4}
    assert affectnet["counts"]["Happiness"] == 4 and affectnet["mapping"]["6"] == "Anger"
    merged = {name: pool["counts"][name] + affectnet["counts"][name] for name in EXPR_CLASSES}
    assert summary["labelled"] == {name: min(6, count) for name, count in merged.items()}
    assert summary["over_cap"] == {name: max(0, count - 6) for name, count in merged.items()}
    assert summary["per_class_cap"] == 6 and summary["over_cap_to"] == "unlabelled"
    printed = [line for line in result.output.splitlines() if line.startswith("labels ")]
    assert len(printed) == 3 and "1→Happiness" in printed[1] and "7→left out" in printed[1]
    assert printed[2].startswith("labels used: Neutral 6, Anger 6")
    assert "joined the unlabelled images" in (run / "problems.txt").read_text()


def test_a_toy_numbering_registered_from_a_test_reads_and_is_listed(tmp_path, monkeypatch):
    toy = Numbering("toy", "A toy data set", {1: "Happy", 2: "Angry", 3: "Contempt"})
    monkeypatch.setitem(NUMBERINGS, "toy", toy)
    path = _csv(tmp_path, ["1", "2", "3"])

    images = read_labelled([f"toy:{path}"])
    shown = runner.invoke(app, ["pretrain", "--help"]).output
    listed = " ".join(shown.replace("│", " ").split())  # the help, unwrapped

    assert _by_image(images) == {"img0.jpg": "Happiness", "img1.jpg": "Anger"}
    assert images.sources[0].numbering == "toy" and images.sources[0].left_out == {"Contempt": 1}
    assert "NUMBERING one of abaw, affectnet, expw, rafdb, fer2013, toy" in listed

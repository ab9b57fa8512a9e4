"""Metrics equal scikit-learn's (EXPR, AU per AU) and numpy's (CCC) on the same frames; pooled
over videos; P; AU threshold tuning; bad PRED files refused."""

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score
from typer.testing import CliRunner

from fercache.cli import app
from fercache.errors import FercacheError
from fercache.framewise.metrics import au_metrics, concordance, expr_metrics, tune_au_thresholds
from fercache.framewise.pred_file import Predictions, VideoPredictions
from fercache.predictions.evaluate import evaluate, render
from tests.test_affwild2 import AU_HEADER, EXPR_HEADER, write_annotation, write_images

runner = CliRunner()
LABELS = list(range(8))


def sklearn_reference(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """scikit-learn's own figures on the valid frames, with its default zero_division."""
    keep = truth != -1
    truth, predicted = truth[keep], predicted[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "expr_f1": f1_score(truth, predicted, average="macro", labels=LABELS),
            "f1": f1_score(truth, predicted, average=None, labels=LABELS),
            "precision": precision_score(truth, predicted, average=None, labels=LABELS),
            "recall": recall_score(truth, predicted, average=None, labels=LABELS),
            "confusion": confusion_matrix(truth, predicted, labels=LABELS),
        }


@st.composite
def label_pairs(draw):
    present = draw(st.sets(st.integers(0, 7), min_size=1, max_size=8))  # absent classes too
    size = draw(st.integers(1, 200))
    truth = draw(st.lists(st.sampled_from([-1, *sorted(present)]), min_size=size, max_size=size))
    predicted = draw(st.lists(st.integers(0, 7), min_size=size, max_size=size))
    truth = np.array(truth)
    truth[draw(st.integers(0, size - 1))] = sorted(present)[0]  # at least one valid frame
    return truth, np.array(predicted)


@settings(max_examples=100, deadline=None)
@given(pair=label_pairs())
def test_expr_metrics_equal_scikit_learn(pair):
    truth, predicted = pair
    ours = expr_metrics(truth, predicted)
    reference = sklearn_reference(truth, predicted)
    assert ours["expr_f1"] == reference["expr_f1"]
    assert list(ours["per_class_f1"].values()) == reference["f1"].tolist()
    assert list(ours["precision"].values()) == reference["precision"].tolist()
    assert list(ours["recall"].values()) == reference["recall"].tolist()
    assert ours["confusion_matrix"] == reference["confusion"].tolist()
    assert sum(ours["support"].values()) == ours["frames"] == int((truth != -1).sum())


def test_au_f1_per_au_on_valid_frames_and_ccc_by_its_definition():
    rng = np.random.default_rng(1)
    truth = rng.integers(-1, 2, size=(300, 12))
    probabilities = rng.random((300, 12))
    thresholds = rng.uniform(0.2, 0.8, 12)
    for passed, cut in ((0.5, np.full(12, 0.5)), (thresholds, thresholds)):
        ours = au_metrics(truth, probabilities, passed)
        expected = [
            f1_score(truth[truth[:, c] != -1, c], probabilities[truth[:, c] != -1, c] >= cut[c])
            for c in range(12)
        ]
        assert list(ours["per_au_f1"].values()) == expected  # sklearn's figure, AU by AU
        assert ours["au_f1"] == pytest.approx(np.mean(expected), abs=1e-12)

    x, y = rng.normal(size=500), rng.normal(size=500) * 0.5 + 0.3
    rho = np.corrcoef(x, y)[0, 1]
    expected_ccc = 2 * rho * x.std() * y.std() / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    assert concordance(x, y) == pytest.approx(expected_ccc, abs=1e-12)
    assert concordance(x, x) == pytest.approx(1.0)


def small_tree(root):
    """Two val videos: -1 frames, a frame without image, AU and VA labels for video 'a'."""
    val = "Validation_Set"
    expr = {"a": [0, 0, 4, -1, 4, 4], "b": [7, 7, -1, 3]}
    for video, labels in expr.items():
        write_annotation(root, "\n".join([EXPR_HEADER, *map(str, labels)]), video, split=val)
        write_images(root, video, [f for f in range(1, len(labels) + 1) if f != 2])
    au_rows = ["1,0,0,0,0,0,0,0,0,0,0,1", "0,1,0,0,0,0,0,0,0,0,0,1", "-1," * 11 + "-1"] * 2
    write_annotation(root, "\n".join([AU_HEADER, *au_rows]), "a", "AU_Detection_Challenge", val)
    va_rows = ["0.5,0.1", "-0.2,0.3", "-5,-5", "0.1,0.9", "0.0,-0.4", "-0.3,0.2"]
    write_annotation(
        root, "\n".join(["valence,arousal", *va_rows]), "a", "VA_Estimation_Challenge", val
    )
    return expr


def write_pred(path, expr, predicted, split="val", au=None, va=None, with_expr=True):
    """A PRED file of `expr`'s videos; `au` and `va` (of video 'a') are repeated for 'b'."""
    videos = {}
    for video, labels in expr.items():
        frames = np.arange(1, len(labels) + 1)
        videos[video] = VideoPredictions.from_probabilities(
            frames,
            np.eye(8, dtype=np.float32)[predicted[video]] if with_expr else None,
            au=None if au is None else np.resize(au, (len(frames), 12)),
            va=None if va is None else np.resize(va, (len(frames), 2)),
        )
    Predictions(split, "hand-written", videos).write(path)
    return path


def test_evaluate_pools_every_valid_frame_of_every_video(tmp_path):
    expr = small_tree(tmp_path)
    predicted = {"a": [0, 4, 4, 1, 4, 0], "b": [7, 3, 3, 3]}
    au = np.tile([[0.9, 0.1] + [0.2] * 9 + [0.6]], (6, 1))
    va = np.array([[0.4, 0.1], [0.0, 0.2], [0, 0], [0.2, 0.7], [0.1, -0.2], [-0.1, 0.1]])
    pred = write_pred(tmp_path / "pred.h5", expr, predicted, au=au, va=va)

    report = evaluate(pred, tmp_path, "val")

    truth = np.concatenate([expr["a"], expr["b"]])
    pooled = np.concatenate([predicted["a"], predicted["b"]])
    assert report["expr_f1"] == sklearn_reference(truth, pooled)["expr_f1"]
    assert report["frames"] == 8 and report["videos"] == 2
    assert report["support"]["Happiness"] == 3 and report["support"]["Disgust"] == 0
    au_truth = np.array([[1, 0] + [0] * 9 + [1], [0, 1] + [0] * 9 + [1], [-1] * 12] * 2)
    assert report["au_f1"] == au_metrics(au_truth, au)["au_f1"] and report["au_videos"] == 1
    va_truth = np.array([[0.5, 0.1], [-0.2, 0.3], [0.1, 0.9], [0.0, -0.4], [-0.3, 0.2]])
    va_kept = va[[0, 1, 3, 4, 5]]
    expected = np.mean([concordance(va_truth[:, d], va_kept[:, d]) for d in range(2)])
    assert report["va_ccc"] == pytest.approx(expected, abs=1e-6)
    assert report["tasks"] == ["expr", "au", "va"] and report["va_frames"] == 5
    assert report["p"] == report["expr_f1"] + report["au_f1"] + report["va_ccc"]
    assert (tmp_path / "pred-confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_predictions_without_expr_score_au_and_va_only(tmp_path):
    expr = small_tree(tmp_path)
    au = np.tile([[0.9, 0.1] + [0.2] * 9 + [0.6]], (6, 1))
    va = np.tile([[0.1, 0.2], [0.3, 0.1]], (3, 1))
    only_a = {"a": expr["a"]}  # 'b' has no AU or VA annotation
    pred = write_pred(tmp_path / "pred.h5", only_a, {}, au=au, va=va, with_expr=False)
    assert Predictions.read(pred).tasks == ("au", "va")

    report = evaluate(pred, tmp_path, "val")

    assert report["tasks"] == ["au", "va"] and {"au_f1", "va_ccc"} <= set(report)
    assert not {"expr_f1", "p", "confusion_png"} & set(report)
    assert not (tmp_path / "pred-confusion.png").exists()
    rendered = runner.invoke(app, ["evaluate", str(pred), "--data", str(tmp_path)])
    assert rendered.exit_code == 0, rendered.output
    assert "AU mean F1" in rendered.output and "EXPR macro F1" not in rendered.output
    assert render(report).row_count == 12 + 2 + 2  # per AU, per dimension, the two means


def test_tuned_thresholds_give_each_au_its_best_f1():
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, size=(120, 12))
    truth[rng.random((120, 12)) < 0.1] = -1
    probabilities = np.clip(0.3 * truth + rng.random((120, 12)) * 0.7, 0, 1)
    probabilities[:, 5] = rng.random(120)  # one AU the scores do not predict
    truth[:, 11] = np.where(truth[:, 11] == -1, -1, 0)  # one AU without a positive frame

    tuned = tune_au_thresholds(truth, probabilities)

    assert tuned[11] == 0.5
    scores = au_metrics(truth, probabilities, tuned)["per_au_f1"]
    for column, name in enumerate(scores):
        valid = truth[:, column] != -1
        candidates = np.unique(probabilities[valid, column])
        best = max(
            f1_score(truth[valid, column], probabilities[valid, column] >= t, zero_division=0)
            for t in candidates
        )
        assert scores[name] == pytest.approx(best if column != 11 else 0.0, abs=1e-12)
    assert (
        au_metrics(truth, probabilities, tuned)["au_f1"] > au_metrics(truth, probabilities)["au_f1"]
    )


def test_pred_of_another_split_is_refused_by_name(tmp_path):
    expr = small_tree(tmp_path)
    pred = write_pred(tmp_path / "train.h5", expr, {"a": [0] * 6, "b": [0] * 4}, split="train")

    result = runner.invoke(app, ["evaluate", str(pred), "--data", str(tmp_path)])

    assert result.exit_code == 2
    assert f"{pred}: holds train predictions, not val" in result.stderr


def test_missing_video_or_labelled_frame_is_refused(tmp_path):
    expr = small_tree(tmp_path)
    partial = write_pred(tmp_path / "partial.h5", {"a": expr["a"]}, {"a": [0] * 6})
    with pytest.raises(FercacheError, match=r"no predictions for annotated video.* b"):
        evaluate(partial, tmp_path, "val")
    short = {"a": expr["a"], "b": expr["b"][:2]}  # frames 3 (-1, fine) and 4 (Fear) missing
    pred = write_pred(tmp_path / "short.h5", short, {"a": [0] * 6, "b": [0] * 2})
    with pytest.raises(
        FercacheError, match="video 'b' has no prediction for 1 labelled EXPR frame"
    ):
        evaluate(pred, tmp_path, "val")


def test_predictions_of_tasks_the_split_does_not_annotate_are_refused(tmp_path):
    expr = {"c": [0, 1, 1]}
    write_annotation(tmp_path, "\n".join([EXPR_HEADER, "0", "1", "1"]), "c", split="Validation_Set")
    write_images(tmp_path, "c", [1, 2, 3])
    pred = write_pred(tmp_path / "va.h5", expr, {}, va=np.zeros((3, 2)), with_expr=False)
    with pytest.raises(FercacheError, match=r"no VA annotations for the val split.*va\.h5"):
        evaluate(pred, tmp_path, "val")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"probabilities": None, "labels": None}, "no predictions: it needs"),
        ({"labels": None}, "EXPR 'probabilities' and 'labels' come together"),
        ({"au": np.full((3, 12), 1.5, np.float32)}, r"'au' must be finite and lie in \[0, 1\]"),
        ({"va": np.full((3, 2), np.nan, np.float32)}, r"'va' must be finite and lie in \[-1, 1\]"),
        ({"au": np.zeros((3, 11), np.float32)}, r"'au' has shape \(3, 11\), expected \(3, 12\)"),
    ],
)
def test_malformed_predictions_are_refused_by_video(tmp_path, change, message):
    rows = VideoPredictions.from_probabilities(np.arange(1, 4), np.full((3, 8), 0.125))
    bad = Predictions("val", "hand-written", {"v": replace(rows, **change)})
    with pytest.raises(FercacheError, match=f"{tmp_path / 'x.h5'}: video 'v': {message}"):
        bad.write(tmp_path / "x.h5")


def test_videos_must_carry_the_same_tasks_and_thresholds_must_be_probabilities(tmp_path):
    plain = VideoPredictions.from_probabilities(np.arange(1, 4), np.full((3, 8), 0.125))
    with_au = replace(plain, au=np.zeros((3, 12), np.float32))
    mixed = Predictions("val", "hand-written", {"a": with_au, "b": plain})
    with pytest.raises(FercacheError, match=r"video 'b' predicts \['expr'\] but the first"):
        mixed.write(tmp_path / "x.h5")
    thresholds = replace(mixed, videos={"a": with_au}, au_thresholds=(0.5,) * 11 + (2.0,))
    with pytest.raises(FercacheError, match=r"au_thresholds must be 12 values in \[0, 1\]"):
        thresholds.write(tmp_path / "x.h5")


def test_result_files_land_in_new_folders_and_a_full_disk_names_the_file(
    tmp_path, monkeypatch, full_disk_after
):
    expr = small_tree(tmp_path)
    predicted = {"a": [0, 4, 4, 1, 4, 0], "b": [7, 3, 3, 3]}
    pred = write_pred(tmp_path / "new" / "pred.h5", expr, predicted)  # folder made on the way
    report_path = tmp_path / "reports" / "val" / "pred.json"
    png = tmp_path / "plots" / "confusion.png"

    command = ["evaluate", str(pred), "--data", str(tmp_path), "--json", str(report_path)]

    result = runner.invoke(app, [*command, "--confusion", str(png)])

    assert result.exit_code == 0, result.output
    assert (
        json.loads(report_path.read_text())["expr_f1"] == evaluate(pred, tmp_path, "val")["expr_f1"]
    )
    assert png.read_bytes().startswith(b"\x89PNG")
    written = report_path.read_text()

    full_disk_after(Path, "write_text", calls=0)
    result = runner.invoke(app, command)

    assert result.exit_code == 2
    assert f"{report_path}: could not write the evaluation report (No space left" in result.stderr
    monkeypatch.undo()
    assert report_path.read_text() == written  # the earlier report is intact
    assert sorted(path.name for path in report_path.parent.iterdir()) == ["pred.json"]

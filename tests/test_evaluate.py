"""Metrics equal scikit-learn's on the same frames; pooled over videos; bad PRED files refused."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score
from typer.testing import CliRunner

from fercache.cli import app
from fercache.errors import FercacheError
from fercache.evaluate import au_metrics, concordance, evaluate, expr_metrics
from fercache.predictions import Predictions, VideoPredictions
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
    ours = au_metrics(truth, probabilities)
    expected = [
        f1_score(truth[truth[:, c] != -1, c], probabilities[truth[:, c] != -1, c] >= 0.5)
        for c in range(12)
    ]
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


def write_pred(path, expr, predicted, split="val", au=None, va=None):
    videos = {}
    for video, labels in expr.items():
        probabilities = np.eye(8, dtype=np.float32)[predicted[video]]
        videos[video] = VideoPredictions.from_probabilities(
            np.arange(1, len(labels) + 1),
            probabilities,
            au=au if video == "a" else None,
            va=va if video == "a" else None,
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
    assert (tmp_path / "pred-confusion.png").read_bytes()[:4] == b"\x89PNG"


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
    with pytest.raises(FercacheError, match="video 'b' has no prediction for 1 labelled frame"):
        evaluate(pred, tmp_path, "val")

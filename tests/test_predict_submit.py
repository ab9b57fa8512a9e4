"""predict -> smooth -> evaluate -> submit on the synthetic tree, from a student cache whose
logits are a noisy view of the labels, and from temporal runs (EXPR; EXPR+AU+VA; AU alone);
frame lists, submissions in the three ABAW formats, AU threshold tuning and bad input."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fercache.cli import app
from fercache.data.affwild2 import AffWild2
from fercache.data.framelist import read_frame_list
from fercache.data.tasks import EXPR_CLASSES
from fercache.errors import FercacheError
from fercache.features.store import write_manifest, write_store
from fercache.framewise.pred_file import Predictions, VideoPredictions
from fercache.predictions.evaluate import evaluate
from fercache.predictions.predict import PredictOptions, fill_from_nearest, predict, softmax
from fercache.predictions.submission_formats import (
    SUBMISSION_FORMATS,
    SubmissionFormat,
    submission_format,
)
from fercache.predictions.submit import read_submission, write_submission
from fercache.resume import read_metrics
from fercache.temporal.features import load_fused_features
from fercache.temporal.inference import TemporalPredictor
from fercache.temporal.loop import TrainRequest, train
from tests.train_data import (
    TINY_TEMPORAL,
    TreeSpec,
    fake_provenance,
    write_cache,
    write_label_cache,
    write_tree,
)

runner = CliRunner()
FEATURE_DIM = 16
PROVENANCE = fake_provenance("synthetic-noisy-student", FEATURE_DIM, num_classes=8)


def write_student_cache(tree: Path, cache: Path, signal: float = 2.0, seed: int = 0) -> Path:
    """Stores for every annotated video: random features, logits = signal x one-hot(label) plus
    unit Gaussian noise on frames that have an image (random logits where the label is -1)."""
    rng = np.random.default_rng(seed)
    cache.mkdir(parents=True)
    data = AffWild2(tree)
    entries = {}
    for split in data.splits("expr"):
        for video in data.load("expr", split):
            frames = video.image_frames
            logits = rng.normal(size=(len(frames), 8)).astype(np.float32)
            labels = video.image_labels
            labelled = labels != -1
            logits[labelled, labels[labelled]] += signal
            features = rng.normal(size=(len(frames), FEATURE_DIM))
            write_store(cache, video.video, frames, features, logits, PROVENANCE)
            entries[video.video] = {"rows": len(frames), "skipped": 0}
    write_manifest(cache, PROVENANCE, entries)
    return cache


@pytest.fixture(scope="module")
def student_cache(synthetic_tree, tmp_path_factory) -> Path:
    return write_student_cache(synthetic_tree, tmp_path_factory.mktemp("cache") / "student")


def val_frame_list(tree: Path, path: Path, drop: int = 0) -> Path:
    """An organisers'-style list (header, one `video/00001.jpg,` row per annotated frame)."""
    rows = [
        f"{video.video}/{frame:05d}.jpg,"
        for video in AffWild2(tree).load("expr", "val")
        for frame in range(1, len(video.labels) + 1 - drop)
    ]
    path.write_text("\n".join([SUBMISSION_FORMATS["expr"].header, *rows]) + "\n")
    return path


def test_fill_from_nearest_takes_the_nearest_frame_and_averages_midway():
    have = np.array([2, 5, 9])
    values = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    needed = np.array([1, 2, 3, 4, 7, 8, 12])
    filled, has_image = fill_from_nearest(needed, have, values)
    np.testing.assert_allclose(
        filled, [[1, 0], [1, 0], [1, 0], [0, 1], [0.25, 0.75], [0.5, 0.5], [0.5, 0.5]]
    )
    assert has_image.tolist() == [False, True, False, False, False, False, False]
    uniform, none = fill_from_nearest(np.array([1, 2]), np.array([]), np.zeros((0, 4)))
    np.testing.assert_allclose(uniform, 0.25)
    assert not none.any()


def test_student_predictions_cover_every_annotated_frame(synthetic_tree, student_cache, tmp_path):
    options = PredictOptions(split="val", data=synthetic_tree, source="student", progress=False)

    predictions = predict(None, [student_cache], tmp_path / "raw.h5", options)

    read = Predictions.read(tmp_path / "raw.h5")
    assert read.split == "val" and "student logits" in read.source
    for video in AffWild2(synthetic_tree).load("expr", "val"):
        rows = read.videos[video.video]
        np.testing.assert_array_equal(rows.frames, np.arange(1, len(video.labels) + 1))
        np.testing.assert_array_equal(rows.has_image, np.isin(rows.frames, video.image_frames))
        annotated = video.image_frames <= len(video.labels)
        stored = softmax(_store_logits(student_cache, video.video))[annotated]
        np.testing.assert_allclose(rows.probabilities[rows.has_image], stored, rtol=1e-6)
        np.testing.assert_array_equal(rows.labels, rows.probabilities.argmax(axis=1))
        assert (~rows.has_image).any()
    assert predictions.frame_count == read.frame_count


def test_a_split_without_annotated_videos_is_refused_and_an_empty_pred_never_written(
    synthetic_tree, student_cache, tmp_path
):
    annotations = tmp_path / "annotations"
    for path in (synthetic_tree / "Annotations").rglob("*"):  # the folders, not one file
        if path.is_dir():
            (annotations / path.relative_to(synthetic_tree / "Annotations")).mkdir(parents=True)
    out = tmp_path / "raw.h5"
    result = runner.invoke(app, [
        "predict", "--source", "student", "--cache", str(student_cache), "--split", "val",
        "--data", str(synthetic_tree), "--annotations", str(annotations), "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "list no video, so there is nothing to predict" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(FercacheError, match=r"empty\.h5: holds no video"):
        Predictions("val", "student", {}).write(tmp_path / "empty.h5")


def _store_logits(cache: Path, video: str) -> np.ndarray:
    import h5py

    with h5py.File(cache / f"{video}.h5") as store:
        return store["logits"][:]


def test_predict_smooth_evaluate_submit_chain(synthetic_tree, student_cache, tmp_path):
    raw, smooth = tmp_path / "raw.h5", tmp_path / "smooth.h5"
    predict_args = ["--cache", str(student_cache), "--data", str(synthetic_tree), "--split", "val"]
    result = runner.invoke(
        app,
        ["predict", *predict_args, "--out", str(raw), "--source", "student", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["smooth", str(raw), "--out", str(smooth), "--window", "30"])
    assert result.exit_code == 0, result.output
    scores = {}
    for name, pred in (("raw", raw), ("smooth", smooth)):
        report = tmp_path / f"{name}.json"
        result = runner.invoke(
            app,
            ["evaluate", str(pred), "--data", str(synthetic_tree), "--json", str(report)],
        )
        assert result.exit_code == 0, result.output
        assert "EXPR macro F1" in result.output
        scores[name] = json.loads(report.read_text())
    assert 0.2 < scores["raw"]["expr_f1"] < 0.8
    assert scores["smooth"]["expr_f1"] > scores["raw"]["expr_f1"] + 0.1
    assert scores["smooth"]["smoothing"] == [{"window": 30, "mode": "centered"}]
    assert Path(scores["smooth"]["confusion_png"]).read_bytes()[:4] == b"\x89PNG"

    submission = tmp_path / "submission.txt"
    result = runner.invoke(app, ["submit", str(smooth), "--out", str(submission)])
    assert result.exit_code == 0, result.output
    lines = submission.read_text().splitlines()
    assert lines[0] == SUBMISSION_FORMATS["expr"].header
    smoothed = Predictions.read(smooth)
    assert len(lines) == 1 + smoothed.frame_count
    for video, (frames, labels) in read_submission(submission).items():
        np.testing.assert_array_equal(frames, smoothed.videos[video].frames)
        np.testing.assert_array_equal(labels, smoothed.videos[video].labels)


def test_test_split_frame_list_predicts_validates_and_round_trips(
    synthetic_tree, student_cache, tmp_path
):
    frame_list = val_frame_list(synthetic_tree, tmp_path / "test_frames.txt")
    options = PredictOptions(split="test", frames=frame_list, source="student", progress=False)
    pred = tmp_path / "test.h5"
    predictions = predict(None, [student_cache], pred, options)
    assert predictions.split == "test"

    rows = write_submission(pred, tmp_path / "submission.txt", frames=frame_list)

    listed = read_frame_list(frame_list)
    assert rows == sum(len(frames) for frames in listed.values())
    submitted = read_submission(tmp_path / "submission.txt")
    assert list(submitted) == list(listed)
    for video, (frames, labels) in submitted.items():
        np.testing.assert_array_equal(frames, listed[video])
        np.testing.assert_array_equal(labels, predictions.videos[video].labels)
    # A submission is itself a valid frame list.
    assert {v: f.tolist() for v, f in read_frame_list(tmp_path / "submission.txt").items()} == {
        v: f.tolist() for v, f in listed.items()
    }


def test_submission_missing_frames_is_refused(synthetic_tree, student_cache, tmp_path):
    short_list = val_frame_list(synthetic_tree, tmp_path / "short.txt", drop=3)
    full_list = val_frame_list(synthetic_tree, tmp_path / "full.txt")
    options = PredictOptions(split="test", frames=short_list, source="student", progress=False)
    predict(None, [student_cache], tmp_path / "short.h5", options)
    out = tmp_path / "submission.txt"

    result = runner.invoke(
        app, ["submit", str(tmp_path / "short.h5"), "--out", str(out), "--frames", str(full_list)]
    )

    assert result.exit_code == 2
    assert "no prediction for 3 required frame(s) of '21-30-1280x720'" in result.stderr
    assert "full.txt" in result.stderr and not out.exists()


def test_frame_list_naming_a_video_not_in_the_cache_is_an_error(student_cache, tmp_path):
    frame_list = tmp_path / "frames.txt"
    frame_list.write_text("video16/00001.jpg\nghost_video/00001.jpg\n")
    options = PredictOptions(split="test", frames=frame_list, source="student", progress=False)
    with pytest.raises(FercacheError, match=r"names video.*not in the feature cache.*ghost_video"):
        predict(None, [student_cache], tmp_path / "out.h5", options)
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("video1/1.jpg\nvideo1/00001.jpg\n", "video1/00001.jpg is listed more than once"),
        ("image_location,Neutral\nvideo1/00000.jpg\n", ":2: 'video1/00000.jpg' is not an"),
        ("video1/00001.png\n", ":1: 'video1/00001.png' is not an image location"),
        ("video1/00001.jpg\nvideo1/3000000000.jpg\n", ":2: 'video1/3000000000.jpg': frame"),
        ("video1/99999999999999999999.jpg\n", "frame number 99999999999999999999 is out of"),
    ],
)
def test_malformed_frame_lists_name_the_line(tmp_path, text, message):
    path = tmp_path / "frames.txt"
    path.write_text(text)
    with pytest.raises(FercacheError, match=re.escape(message)):
        read_frame_list(path)


def test_test_split_needs_a_frame_list_and_temporal_needs_a_run(student_cache, tmp_path):
    with pytest.raises(FercacheError, match="--frames FILE"):
        predict(None, [student_cache], tmp_path / "x.h5", PredictOptions(split="test"))
    frame_list = tmp_path / "frames.txt"
    frame_list.write_text("video16/00001.jpg\n")
    options = PredictOptions(split="test", frames=frame_list, progress=False)
    with pytest.raises(FercacheError, match="RUN_DIR"):
        predict(None, [student_cache], tmp_path / "x.h5", options)


@pytest.fixture(scope="module")
def temporal_run(tmp_path_factory) -> dict:
    """A one-epoch tiny temporal run (issue 4's trainer) on the trainer's test tree and cache."""
    root = tmp_path_factory.mktemp("temporal")
    labels = write_tree(root / "data", TreeSpec(train_videos=4, val_videos=2, frames=200))
    write_cache(root / "cache", root / "data", labels)
    tiny = ("width=16", "layers=1", "heads=2", "ff_width=32", "batch_size=8", "workers=0")
    request = TrainRequest(overrides=tiny, epochs=1, device="cpu", progress=False)
    train([root / "cache"], root / "data", root / "run", request)
    return {"root": root, "data": root / "data", "cache": root / "cache", "run": root / "run"}


def test_temporal_run_predicts_every_annotated_frame(temporal_run, tmp_path):
    pred = tmp_path / "temporal.h5"
    result = runner.invoke(
        app,
        [
            *("predict", str(temporal_run["run"]), "--cache", str(temporal_run["cache"])),
            *("--data", str(temporal_run["data"]), "--split", "val", "--out", str(pred)),
        ],
    )
    assert result.exit_code == 0, result.output

    predictions = Predictions.read(pred)
    assert predictions.source.startswith("temporal run")
    predictor = TemporalPredictor.load(temporal_run["run"])
    fused = load_fused_features([temporal_run["cache"]], list(predictions.videos))
    for video, rows in predictions.videos.items():
        expected = predictor.predict(fused[video].features)["expr"]
        np.testing.assert_array_equal(rows.frames[rows.has_image], fused[video].frames)
        np.testing.assert_allclose(rows.probabilities[rows.has_image], expected, atol=1e-6)
    report = evaluate(pred, temporal_run["data"], "val")
    assert 0 <= report["expr_f1"] <= 1 and report["videos"] == 2


def test_temporal_run_refuses_a_cache_it_was_not_trained_on(temporal_run, tmp_path):
    labels = {video: np.zeros(400, np.int64) for video in ("val00", "val01")}  # any labels
    other = write_cache(tmp_path / "other", temporal_run["data"], labels, seed=1)
    options = PredictOptions(split="val", data=temporal_run["data"], progress=False)
    with pytest.raises(FercacheError, match="trained on caches with fingerprints"):
        predict(temporal_run["run"], [other], tmp_path / "x.h5", options)


# --- AU and VA beside EXPR (issue 8) -----------------------------------------------------------

LEARNS = ("lr=1e-2", "batch_size=2", "dropout=0", "input_dropout=0", "warmup_epochs=0")


@pytest.fixture(scope="module")
def three_tasks(synthetic_tree, tmp_path_factory) -> dict:
    """A tiny EXPR+AU+VA run on the generator's tree, its cache a noisy view of the labels."""
    root = tmp_path_factory.mktemp("three-tasks")
    cache = write_label_cache(root / "cache", synthetic_tree)
    overrides = (*TINY_TEMPORAL, *LEARNS, "tasks=[expr,au,va]")
    request = TrainRequest(overrides=overrides, epochs=15, device="cpu", progress=False)
    summary = train([cache], synthetic_tree, root / "run", request)
    return {"cache": cache, "run": root / "run", "summary": summary}


def _predict_cli(run: Path, cache: Path, data: Path, out: Path, *extra: str) -> Predictions:
    result = runner.invoke(
        app,
        [*("predict", str(run), "--cache", str(cache), "--data", str(data)),
         *("--split", "val", "--out", str(out), "--no-progress", *extra)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return Predictions.read(out)


def test_a_three_task_model_trains_and_evaluate_reports_every_metric_and_p(
    synthetic_tree, three_tasks, tmp_path
):
    summary = three_tasks["summary"]
    assert summary["tasks"] == ["expr", "au", "va"] and summary["selected_by"] == "p"
    scores = (summary["best_val_f1"], summary["best_val_au_f1"], summary["best_val_va_ccc"])
    assert summary["best_val_p"] == pytest.approx(sum(scores), abs=1e-12)
    # Every head learnt from its own labels (one that learnt nothing scores ~0.2 and ~0).
    assert min(scores) > 0.5 and summary["best_val_va_ccc"] > 0.6, summary
    for record in read_metrics(three_tasks["run"]):  # the total is the weighted sum (all 1)
        parts = [record[f"train_loss_{task}"] for task in ("expr", "au", "va")]
        assert record["train_loss"] == pytest.approx(sum(parts), rel=1e-5)

    pred = tmp_path / "val.h5"
    predictions = _predict_cli(three_tasks["run"], three_tasks["cache"], synthetic_tree, pred)
    assert predictions.tasks == ("expr", "au", "va")
    for video in AffWild2(synthetic_tree).load("au", "val"):  # every annotated frame
        np.testing.assert_array_equal(
            predictions.videos[video.video].frames, np.arange(1, len(video.labels) + 1)
        )
    report_path = tmp_path / "report.json"
    result = runner.invoke(
        app, ["evaluate", str(pred), "--data", str(synthetic_tree), "--json", str(report_path)]
    )
    assert result.exit_code == 0, result.output
    assert "AU mean F1" in result.output and "VA mean CCC" in result.output
    assert "P = F1 EXPR + F1 AU + CCC VA" in result.output
    report = json.loads(report_path.read_text())
    assert report["tasks"] == ["expr", "au", "va"]
    assert report["p"] == report["expr_f1"] + report["au_f1"] + report["va_ccc"]
    assert len(report["per_au_f1"]) == 12 and set(report["per_dimension_ccc"]) == {
        "valence",
        "arousal",
    }
    assert report["au_f1"] > 0.5 and report["va_ccc"] > 0.6, report


def test_au_and_va_submissions_follow_the_abaw_formats(synthetic_tree, three_tasks, tmp_path):
    pred = tmp_path / "val.h5"
    predictions = _predict_cli(three_tasks["run"], three_tasks["cache"], synthetic_tree, pred)
    for task, header in (
        ("au", "image_location,AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"),
        ("va", "image_location,valence,arousal"),
    ):
        out = tmp_path / f"{task}.txt"
        result = runner.invoke(app, ["submit", str(pred), "--out", str(out), "--task", task])
        assert result.exit_code == 0, result.output
        assert out.read_text().splitlines()[0] == header
        submitted = read_submission(out, task)
        assert list(submitted) == list(predictions.videos)
        for video, (frames, values) in submitted.items():
            rows = predictions.videos[video]
            np.testing.assert_array_equal(frames, rows.frames)
            if task == "au":
                np.testing.assert_array_equal(values, rows.au >= 0.5)
            else:
                np.testing.assert_allclose(values, rows.va, atol=5e-7)


def test_tuned_thresholds_are_stored_with_the_run_and_used_by_later_predicts(
    synthetic_tree, three_tasks, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(three_tasks["run"], run)  # the shared run keeps the default thresholds
    cache, plain = three_tasks["cache"], tmp_path / "plain.h5"
    assert _predict_cli(run, cache, synthetic_tree, plain).au_thresholds == (0.5,) * 12

    tuned = _predict_cli(run, cache, synthetic_tree, tmp_path / "tuned.h5", "--tune-thresholds")

    stored = json.loads((run / "thresholds.json").read_text())
    assert list(stored) == ["best"] and tuned.au_thresholds == tuple(stored["best"].values())
    assert tuned.au_thresholds != (0.5,) * 12
    untuned = evaluate(plain, synthetic_tree, "val")["au_f1"]
    assert evaluate(tmp_path / "tuned.h5", synthetic_tree, "val")["au_f1"] >= untuned
    later = _predict_cli(run, cache, synthetic_tree, tmp_path / "later.h5")
    assert later.au_thresholds == tuned.au_thresholds
    final = _predict_cli(run, cache, synthetic_tree, tmp_path / "final.h5", "--weights", "final")
    assert final.au_thresholds == (0.5,) * 12  # tuned for the best weights only


def test_a_run_without_expr_predicts_and_scores_au_only(synthetic_tree, three_tasks, tmp_path):
    request = TrainRequest(
        overrides=(*TINY_TEMPORAL, "tasks=[au]"), epochs=1, device="cpu", progress=False
    )
    summary = train([three_tasks["cache"]], synthetic_tree, tmp_path / "au", request)
    assert summary["selected_by"] == "au_f1" and "best_val_f1" not in summary
    pred = tmp_path / "au.h5"
    predictions = _predict_cli(tmp_path / "au", three_tasks["cache"], synthetic_tree, pred)
    assert predictions.tasks == ("au",)
    assert all(rows.probabilities is None for rows in predictions.videos.values())
    report = evaluate(pred, synthetic_tree, "val")
    assert report["tasks"] == ["au"] and "expr_f1" not in report and "p" not in report

    result = runner.invoke(app, ["smooth", str(pred), "--out", str(tmp_path / "s.h5")])
    assert result.exit_code == 2 and "holds no EXPR predictions to vote on" in result.stderr
    result = runner.invoke(app, ["submit", str(pred), "--out", str(tmp_path / "s.txt")])
    assert result.exit_code == 2 and "holds no EXPR predictions (it has AU)" in result.stderr


def test_threshold_tuning_needs_an_au_head_and_the_validation_split(
    synthetic_tree, temporal_run, tmp_path
):
    options = PredictOptions(
        split="val", data=temporal_run["data"], tune_thresholds=True, progress=False
    )
    with pytest.raises(FercacheError, match=r"predicts \['expr'\], no AU"):
        predict(temporal_run["run"], [temporal_run["cache"]], tmp_path / "x.h5", options)
    with pytest.raises(FercacheError, match="--tune-thresholds picks AU thresholds on the val"):
        predict(temporal_run["run"], [temporal_run["cache"]], tmp_path / "x.h5",
                replace(options, split="train"))  # fmt: skip
    assert not (temporal_run["run"] / "thresholds.json").exists()


def test_a_run_from_before_the_task_heads_is_refused_clearly(temporal_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(temporal_run["run"], old)
    details = json.loads((old / "model.json").read_text())
    details.pop("tasks")
    (old / "model.json").write_text(json.dumps({**details, "num_classes": 8, "task": "expr"}))
    with pytest.raises(FercacheError, match=r"model.json: model config lacks tasks.*retrain"):
        TemporalPredictor.load(old)
    (old / "config.yaml").write_text("task: expr\nepochs: 1\n")
    request = TrainRequest(epochs=1, device="cpu", progress=False, resume=True)
    with pytest.raises(FercacheError, match=r"config.yaml: unknown temporal setting\(s\) task"):
        train([temporal_run["cache"]], temporal_run["data"], old, request)


@pytest.mark.parametrize("text", ["{not json", '{"best": {"AU1": 0.3}}', '["best"]'])
def test_an_unreadable_thresholds_file_is_named(temporal_run, tmp_path, text):
    run = tmp_path / "run"
    shutil.copytree(temporal_run["run"], run)
    (run / "thresholds.json").write_text(text)
    with pytest.raises(FercacheError, match=r"thresholds.json: unreadable AU thresholds.*delete"):
        TemporalPredictor.load(run)


# --- a new submission format is an object and a registry line -----------------------------------


def _probabilities(entry: VideoPredictions, index: np.ndarray, thresholds: np.ndarray) -> list[str]:
    return [",".join(f"{p:.4f}" for p in row) for row in entry.probabilities[index]]


def _probability_row(text: str) -> list[float] | None:
    values = [float(field) for field in text.split(",")]
    return values if len(values) == len(EXPR_CLASSES) else None


# A toy format from outside the package: the 8 EXPR probabilities of each frame.
EXPR_PROBABILITIES = SubmissionFormat(
    "expr", EXPR_CLASSES, "the 8 EXPR probabilities", "<8 probabilities>", _probabilities,
    _probability_row,
)  # fmt: skip


def test_a_toy_submission_format_registered_from_a_test_is_written_and_read_back(
    synthetic_tree, student_cache, tmp_path, monkeypatch
):
    monkeypatch.setitem(SUBMISSION_FORMATS, "expr-probabilities", EXPR_PROBABILITIES)
    options = PredictOptions(split="val", data=synthetic_tree, source="student", progress=False)
    predictions = predict(None, [student_cache], tmp_path / "val.h5", options)
    out = tmp_path / "probabilities.txt"

    shown = runner.invoke(app, ["submit", "--help"]).output
    listed = " ".join(shown.replace("│", " ").split())  # the help, unwrapped
    result = runner.invoke(
        app, ["submit", str(tmp_path / "val.h5"), "--out", str(out), "--task", "expr-probabilities"]
    )

    assert "expr-probabilities (the 8 EXPR probabilities)" in listed
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines()[0] == "image_location," + ",".join(EXPR_CLASSES)
    submitted = read_submission(out, "expr-probabilities")
    assert list(submitted) == list(predictions.videos)
    for video, (frames, values) in submitted.items():
        np.testing.assert_array_equal(frames, predictions.videos[video].frames)
        np.testing.assert_allclose(values, predictions.videos[video].probabilities, atol=5e-5)


def test_an_unknown_submission_format_is_refused_with_the_registered_names(tmp_path):
    with pytest.raises(FercacheError, match="unknown task 'csv': choose one of expr, au, va"):
        write_submission(tmp_path / "val.h5", tmp_path / "out.txt", task="csv")


@pytest.mark.parametrize("video", ["talk, take 2", 'say "cheese"', "two words"])
def test_video_names_with_commas_quotes_or_spaces_round_trip_through_a_submission(tmp_path, video):
    frames = np.arange(1, 6, dtype=np.int32)
    probabilities = np.eye(8, dtype=np.float32)[[0, 3, 3, 7, 1]]
    rows = VideoPredictions.from_probabilities(frames, probabilities, np.ones(5, bool))
    Predictions("test", "student", {video: rows}).write(tmp_path / "pred.h5")

    write_submission(tmp_path / "pred.h5", tmp_path / "submission.txt")

    read = read_submission(tmp_path / "submission.txt")
    assert list(read) == [video]
    np.testing.assert_array_equal(read[video][0], frames)
    np.testing.assert_array_equal(read[video][1], [0, 3, 3, 7, 1])
    listed = read_frame_list(tmp_path / "submission.txt")  # a submission is a frame list
    np.testing.assert_array_equal(listed[video], frames)


def test_a_submission_line_with_a_frame_number_past_int32_names_the_line(tmp_path):
    header = submission_format("expr").header
    (tmp_path / "sub.txt").write_text(f"{header}\nvideo1/00001.jpg,3\nvideo1/4294967297.jpg,3\n")
    with pytest.raises(FercacheError, match=r"sub.txt:3: .*frame number 4294967297 is out of"):
        read_submission(tmp_path / "sub.txt")

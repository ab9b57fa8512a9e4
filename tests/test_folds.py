"""Subject-grouped k-fold cross-validation: `fercache train --folds K`, `runs` and `predict` of
its folder."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fercache.cli import app
from fercache.data.tasks import TASKS
from fercache.errors import FercacheError
from fercache.experiments import folds
from fercache.experiments.runs_table import runs_table
from fercache.framewise.pred_file import Predictions
from fercache.predictions.predict import PredictOptions, predict
from fercache.temporal.config import load_config
from fercache.temporal.loop import TrainRequest, train
from tests.train_data import (
    ANNOTATIONS,
    TINY_TEMPORAL,
    TreeSpec,
    write_cache,
    write_label_cache,
    write_tree,
)

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
PAIR = {"train04": "duo_left", "train05": "duo_right"}  # two people of one video
SEED = 4


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """9 videos (6 train, 3 val) of 8 subjects: duo_left/duo_right share a video."""
    root = tmp_path_factory.mktemp("folds")
    data = root / "data"
    labels = write_tree(data, TreeSpec(train_videos=6, val_videos=3, frames=120))
    for old, new in PAIR.items():
        annotations = data / ANNOTATIONS / "Train_Set"
        (annotations / f"{old}.txt").rename(annotations / f"{new}.txt")
        (data / "cropped_aligned" / old).rename(data / "cropped_aligned" / new)
        labels[new] = labels.pop(old)
    write_cache(root / "cache", data, labels)
    return {"data": data, "cache": root / "cache", "root": root, "videos": sorted(labels)}


def _request() -> TrainRequest:
    return TrainRequest(overrides=TINY_TEMPORAL, epochs=1, seed=SEED, device="cpu", progress=False)


def _train_args(tree: dict, out: Path) -> list[str]:
    return [
        *("train", str(tree["cache"]), "--data", str(tree["data"]), "--out", str(out)),
        *("--epochs", "1", "--seed", str(SEED), "--device", "cpu", "--no-progress"),
        *(item for setting in TINY_TEMPORAL for item in ("--set", setting)),
    ]


@pytest.fixture(scope="module")
def crossed(tree) -> dict:
    """`fercache train --folds 3`, one epoch per fold."""
    out = tree["root"] / "cv"
    result = runner.invoke(app, [*_train_args(tree, out), "--folds", "3"])
    assert result.exit_code == 0, result.output
    return {
        "out": out,
        "output": result.output,
        "plan": json.loads((out / folds.PLAN).read_text()),
        "summary": json.loads((out / folds.SUMMARY).read_text()),
    }


def _fold_summary(out: Path, index: int) -> dict:
    return json.loads((out / f"fold-{index}" / "summary.json").read_text())


def test_three_folds_hold_out_disjoint_subjects_covering_every_video_once(crossed, tree):
    plan, out = crossed["plan"], crossed["out"]
    held_out = [set(fold["videos"]) for fold in plan["folds"]]
    assert (plan["k"], plan["seed"], len(held_out)) == (3, SEED, 3)
    assert sorted(video for videos in held_out for video in videos) == tree["videos"]
    assert sum(len(videos) for videos in held_out) == len(tree["videos"])  # disjoint
    assert [set(PAIR.values()) <= videos for videos in held_out].count(True) == 1
    assert "duo" in [subject for fold in plan["folds"] for subject in fold["subjects"]]
    config = load_config(None, list(TINY_TEMPORAL), epochs=1, seed=SEED)
    frames = folds.labelled_frames(tree["data"], config)
    loads = [fold["labelled_frames"] for fold in plan["folds"]]
    assert loads == [sum(frames[video] for video in videos) for videos in held_out]
    assert max(loads) - min(loads) <= max(frames.values()) + frames["duo_left"]
    for index, fold in enumerate(plan["folds"]):
        # Each fold trained on the other folds and validated on its own held-out videos only.
        summary = _fold_summary(out, index)
        assert summary["val_videos"] == len(fold["videos"])
        assert summary["train_videos"] == len(tree["videos"]) - len(fold["videos"])
        record = json.loads((out / fold["run"] / "metrics.jsonl").read_text().splitlines()[0])
        assert record["val_frames"] == fold["labelled_frames"]


def test_a_fold_resumed_directly_keeps_its_own_videos(crossed, tree, tmp_path):
    fold = crossed["plan"]["folds"][1]
    run_dir = tmp_path / fold["run"]
    shutil.copytree(crossed["out"] / fold["run"], run_dir)
    assert json.loads((run_dir / "videos.json").read_text())["val"] == sorted(fold["videos"])
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    resumed = dataclasses.replace(_request(), resume=True)
    summary = train([tree["cache"]], tree["data"], run_dir, resumed)
    # Resumed on the splits instead, it would count the train split's frames.
    assert summary["train_frames"] == _fold_summary(crossed["out"], 1)["train_frames"]
    assert summary["val_videos"] == len(fold["videos"])


def test_the_summary_holds_every_fold_and_the_mean_and_sd(crossed):
    summary, out = crossed["summary"], crossed["out"]
    scores = np.array([_fold_summary(out, k)["best_val_f1"] for k in range(3)])
    assert [run["best_val_f1"] for run in summary["runs"]] == scores.tolist()
    assert summary["mean"]["best_val_f1"] == pytest.approx(scores.mean())
    assert summary["sd"]["best_val_f1"] == pytest.approx(scores.std(ddof=1))
    assert set(summary["mean"]) == {"best_val_f1", "best_val_f1_smoothed"}
    output = crossed["output"]
    assert "cross-validation: 3 folds" in output
    assert f"{scores.mean():.4f}" in output.split("│ mean")[1].splitlines()[0]
    assert f"{scores.std(ddof=1):.4f}" in output.split("│ sd")[1].splitlines()[0]


def test_groups_keep_a_subjects_videos_together(tree, tmp_path):
    groups = tmp_path / "groups.csv"
    groups.write_text("video,subject\ntrain00,alice\nval00,alice\ntrain01,bob\nval01,bob\n")
    config = load_config(None, [], seed=SEED)
    frames = folds.labelled_frames(tree["data"], config)
    units = folds.subjects(list(frames), folds.read_groups(groups, frames))
    assert units["alice"] == ["train00", "val00"] and units["duo"] == ["duo_left", "duo_right"]
    assert len(units) == len(frames) - 3
    for seed in range(5):
        for fold in folds.split_folds(frames, units, 3, seed):
            for together in (["train00", "val00"], ["train01", "val01"], list(PAIR.values())):
                assert len(set(together) & set(fold.videos)) in (0, 2)
    # A person of a two-person video joins that video's other person too.
    groups.write_text("video,subject\ntrain00,carol\nduo_left,carol\n")
    units = folds.subjects(list(frames), folds.read_groups(groups, frames))
    assert units["carol+duo"] == ["duo_left", "duo_right", "train00"]


def test_a_killed_folds_run_resumes_where_it_stopped_with_the_same_folds_and_scores(
    crossed, tree, tmp_path, monkeypatch
):
    out, real = tmp_path / "cv", folds.train_or_reuse

    def killed_after_fold_0(cache_dirs, data, run_dir, request):
        if run_dir.name == "fold-1":
            raise KeyboardInterrupt  # as a kill while fold 1 starts
        return real(cache_dirs, data, run_dir, request)

    monkeypatch.setattr(folds, "train_or_reuse", killed_after_fold_0)
    with pytest.raises(KeyboardInterrupt):
        folds.train_folds([tree["cache"]], tree["data"], out, _request(), 3)
    assert not (out / folds.SUMMARY).exists()
    partial = folds.with_fold_means(runs_table(out), out)
    assert [row["run"] for row in partial.footer] == ["mean (1/3 folds)", "sd"]
    assert partial.footer[1]["best_val_f1"] is None  # no spread of one fold
    stamps = {path: path.stat().st_mtime_ns for path in (out / "fold-0").iterdir()}
    monkeypatch.undo()

    summary = folds.train_folds([tree["cache"]], tree["data"], out, _request(), 3)

    assert {path: path.stat().st_mtime_ns for path in (out / "fold-0").iterdir()} == stamps
    # Same seed: the same folds and, on CPU, the same scores as the CLI's run.
    assert json.loads((out / folds.PLAN).read_text()) == crossed["plan"]
    assert summary["runs"] == crossed["summary"]["runs"]
    assert summary["mean"] == crossed["summary"]["mean"]
    with pytest.raises(FercacheError, match=r"folds\.json.*differs in k"):
        folds.train_folds([tree["cache"]], tree["data"], out, _request(), 2)


def test_predict_of_a_folds_folder_is_the_mean_of_the_fold_models(crossed, tree, tmp_path):
    frame_list = tmp_path / "test.txt"
    frame_list.write_text(
        "".join(f"{video}/{n:05d}.jpg\n" for video in ("val00", "duo_left") for n in range(1, 91))
    )
    vote = tmp_path / "vote.h5"
    result = runner.invoke(
        app,
        [
            *("predict", str(crossed["out"]), "--cache", str(tree["cache"])),
            *("--split", "test", "--frames", str(frame_list), "--out", str(vote), "--no-progress"),
        ],
    )
    assert result.exit_code == 0, result.output
    options = PredictOptions(split="test", frames=frame_list, progress=False)
    alone = [
        predict(crossed["out"] / f"fold-{k}", [tree["cache"]], tmp_path / f"{k}.h5", options)
        for k in range(3)
    ]
    voted = Predictions.read(vote)
    assert sorted(voted.videos) == ["duo_left", "val00"]
    for video, rows in voted.videos.items():
        mean = np.mean([fold.videos[video].probabilities for fold in alone], axis=0)
        assert np.allclose(rows.probabilities, mean, atol=1e-6)
        assert not np.allclose(alone[0].videos[video].probabilities, mean, atol=1e-6)
    assert all((crossed["out"] / f"fold-{k}" / "test.h5").is_file() for k in range(3))


def test_runs_shows_the_folds_and_their_mean_and_sd(crossed, tmp_path):
    table = tmp_path / "table.json"
    result = runner.invoke(app, ["runs", str(crossed["out"]), "--json", str(table)])
    assert result.exit_code == 0, result.output
    shown = json.loads(table.read_text())
    assert sorted(row["run"] for row in shown["rows"]) == ["fold-0", "fold-1", "fold-2"]
    summary = crossed["summary"]
    mean, sd = summary["mean"]["best_val_f1"], summary["sd"]["best_val_f1"]
    mean_row, sd_row = shown["footer"]
    assert (mean_row.pop("run"), sd_row.pop("run")) == ("mean", "sd")
    assert mean_row == pytest.approx(summary["mean"]) and sd_row == pytest.approx(summary["sd"])
    assert f"{mean:.4f}" in result.output.split("│ mean")[1].splitlines()[0]
    assert f"{sd:.4f}" in result.output.split("│ sd")[1].splitlines()[0]


def _add_au_and_va(data: Path, labels: dict[str, np.ndarray]) -> None:
    """AU and VA annotations of every video beside its EXPR ones (random, -1 / -5 stretches)."""
    rng = np.random.default_rng(9)
    for video, expr in labels.items():
        split = "Train_Set" if video.startswith("train") else "Validation_Set"
        au = rng.integers(0, 2, size=(len(expr), 12))
        va = np.round(rng.uniform(-1, 1, size=(len(expr), 2)), 3)
        au[expr < 0], va[expr < 0] = -1, -5
        for task, values in (("AU_Detection_Challenge", au), ("VA_Estimation_Challenge", va)):
            folder = data / "Annotations" / task / split
            folder.mkdir(parents=True, exist_ok=True)
            header = TASKS["au" if task.startswith("AU") else "va"].header
            rows = [",".join(str(value) for value in row) for row in values]
            (folder / f"{video}.txt").write_text("\n".join([header, *rows]) + "\n")


def test_a_multi_task_run_reports_every_tasks_score_and_their_spread(tmp_path):
    data = tmp_path / "data"
    labels = write_tree(data, TreeSpec(train_videos=4, val_videos=2, frames=80, seed=2))
    _add_au_and_va(data, labels)
    write_label_cache(tmp_path / "cache", data)
    request = dataclasses.replace(_request(), overrides=(*TINY_TEMPORAL, "tasks=[expr,au,va]"))
    summary = folds.train_folds([tmp_path / "cache"], data, tmp_path / "cv", request, 2)
    scores = ["best_val_f1", "best_val_f1_smoothed", "best_val_au_f1", "best_val_va_ccc"]
    assert list(summary["mean"]) == [*scores, "best_val_p"]
    p = [_fold_summary(tmp_path / "cv", k)["best_val_p"] for k in range(2)]
    assert summary["mean"]["best_val_p"] == pytest.approx(np.mean(p))
    assert summary["sd"]["best_val_p"] == pytest.approx(np.std(p, ddof=1))
    for run in summary["runs"]:  # P sums the three tasks' scores of the fold's best epoch
        assert run["best_val_p"] == pytest.approx(
            run["best_val_f1"] + run["best_val_au_f1"] + run["best_val_va_ccc"]
        )


@pytest.mark.parametrize(
    ("extra", "groups", "message"),
    [
        (["--folds", "1"], None, "--folds 1: cross-validation needs at least 2 folds"),
        (["--folds", "9"], None, "has 8 subjects"),
        (["--folds", "3"], "video,subject\ntrain00,a\nnosuch,a\n", "not annotated in the train"),
        (["--folds", "3"], "name,person\ntrain00,a\n", "needs a header 'video,subject'"),
        (["--folds", "3", "--bagging", "2"], None, "--folds and --bagging"),
        (["--fold-seed", "3"], None, "--fold-seed and --groups go with --folds"),
    ],
)
def test_bad_fold_options_exit_2_with_one_line(tree, tmp_path, extra, groups, message):
    out = tmp_path / "cv"
    if groups is not None:
        (tmp_path / "groups.csv").write_text(groups)
        extra = [*extra, "--groups", str(tmp_path / "groups.csv")]
    result = runner.invoke(app, [*_train_args(tree, out), *extra])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_one_subject_is_refused_without_advising_one_fold(tree, tmp_path):
    groups = tmp_path / "groups.csv"
    groups.write_text("video,subject\n" + "".join(f"{video},a\n" for video in tree["videos"]))
    out = tmp_path / "cv"
    result = runner.invoke(app, [*_train_args(tree, out), "--folds", "2", "--groups", str(groups)])
    assert result.exit_code == 2 and "has one subject" in result.stderr, result.output
    assert "train without --folds" in result.stderr and "--folds 1" not in result.stderr
    assert not out.exists()

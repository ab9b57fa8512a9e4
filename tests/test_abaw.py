"""The audio-visual run of docs/abaw.md, command by command, on small generated videos whose
sound track carries the expression: `audio`, `train VISUAL AUDIO --folds 5`,
`predict FOLDS --split test`, `smooth`, `submit`.

The visual cache is the trainer tests' cheap one (a weak, half-occluded view of each frame's
class); the sound of each frame is a tone of its class's pitch in noise (noise alone on frames
without a valid label), encoded by a small random wav2vec 2.0. Two videos without annotations
play the test set.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fercache.cli import app
from fercache.experiments import folds
from fercache.synth.sound import ENCODER_RATE, save_speech_encoder, write_video
from tests.train_data import ANNOTATIONS, TINY_TEMPORAL, TreeSpec, write_cache, write_tree

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
FPS = 30
TEST_VIDEOS = ("val03", "val04")  # generated as validation videos, then their labels removed


def _sound(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each frame's 1/30 s: a tone at 300 + 200 * class Hz (none for -1) plus noise."""
    per_frame = ENCODER_RATE // FPS
    t = np.arange(len(labels) * per_frame) / ENCODER_RATE
    label = np.repeat(labels, per_frame)
    pitch = 300.0 + 200.0 * np.maximum(label, 0)
    sound = np.where(label >= 0, 0.4 * np.sin(2 * np.pi * pitch * t), 0.0)
    return sound + 0.1 * rng.normal(size=len(t))


def _invoke(*arguments: str) -> str:
    result = runner.invoke(app, list(arguments))
    assert result.exit_code == 0, result.output
    return result.output


def _train_folds(caches: list[Path], data: Path, out: Path) -> dict:
    settings = (*TINY_TEMPORAL, "lr=1e-2", "clip_frames=32", "batch_size=4", "warmup_epochs=0")
    _invoke(
        "train", *map(str, caches), "--data", str(data), "--out", str(out), "--folds", "5",
        "--epochs", "2", "--seed", "0", "--device", "cpu", "--no-progress",
        *(item for setting in settings for item in ("--set", setting)),
    )  # fmt: skip
    return json.loads((out / folds.SUMMARY).read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("abaw")
    data = root / "data"
    labels = write_tree(data, TreeSpec(train_videos=7, val_videos=5, frames=250, seed=2))
    for video in TEST_VIDEOS:
        (data / ANNOTATIONS / "Validation_Set" / f"{video}.txt").unlink()
    visual = write_cache(root / "visual", data, labels, dim=8, signal=0.1, occluded=0.5)
    rng = np.random.default_rng(0)
    for video, frames in labels.items():
        write_video(root / "videos" / f"{video}.mov", FPS, len(frames), _sound(frames, rng))
    encoder = save_speech_encoder(root / "encoder")

    audio = root / "audio"
    _invoke(
        "audio", str(root / "videos"), "--out", str(audio), "--data", str(data),
        "--model", str(encoder), "--device", "cpu", "--no-progress",
    )  # fmt: skip
    fused = _train_folds([visual, audio], data, root / "cv-fused")
    alone = _train_folds([visual], data, root / "cv-visual")

    frame_list = root / "test-frames.txt"
    listed = [
        f"{video}/{frame:05d}.jpg"
        for video in TEST_VIDEOS
        for frame in range(1, len(labels[video]) + 1)
    ]
    frame_list.write_text("image_location\n" + "\n".join(listed) + "\n")
    _invoke(
        "predict", str(root / "cv-fused"), "--cache", str(visual), "--cache", str(audio),
        "--split", "test", "--frames", str(frame_list), "--out", str(root / "test.h5"),
        "--no-progress",
    )  # fmt: skip
    _invoke("smooth", str(root / "test.h5"), "--out", str(root / "test-smoothed.h5"))
    submission = root / "submission.txt"
    _invoke(
        "submit", str(root / "test-smoothed.h5"), "--out", str(submission),
        "--frames", str(frame_list),
    )  # fmt: skip
    return {"fused": fused, "alone": alone, "listed": listed, "submission": submission}


def test_the_fused_five_fold_model_beats_the_visual_one_on_held_out_videos(run):
    fused, alone = run["fused"], run["alone"]
    assert len(fused["runs"]) == len(alone["runs"]) == 5
    # each fold's best epoch scored on its own held-out train and validation videos
    # over tree seeds 0-3 the fused folds score well above chance and the visual ones near it,
    # the gap always above this margin; this seed is fixed
    assert fused["mean"]["best_val_f1"] > alone["mean"]["best_val_f1"] + 0.15, (fused, alone)


def test_the_submission_lists_every_test_frame_once(run):
    lines = run["submission"].read_text().splitlines()
    assert lines[0].startswith("image_location,Neutral,Anger")
    rows = [line.split(",") for line in lines[1:]]
    assert sorted(row[0] for row in rows) == sorted(run["listed"])
    assert all(row[1] in {str(label) for label in range(8)} for row in rows)

"""The temporal trainer (issues 4 and 8): clips, per-task loss masking, the AU and VA losses,
learning, determinism, resume, DDP, run-folder files and clear errors. Caches are written
directly (no CNN) by tests/train_data.py."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from fercache.claims import HOST
from fercache.cli import app
from fercache.errors import FercacheError
from fercache.features.store import FeatureCache
from fercache.framewise.metrics import concordance
from fercache.resume import read_metrics
from fercache.temporal.clips import (
    ClipBatches,
    evaluation_starts,
    rank_share,
    training_windows,
)
from fercache.temporal.config import TemporalConfig, load_config, resumed_config, settings_text
from fercache.temporal.features import FusedVideo, MemoryFeatures, load_fused_features
from fercache.temporal.inference import TemporalPredictor
from fercache.temporal.loop import TrainRequest, epoch_line, train
from fercache.temporal.model import ModelConfig
from fercache.temporal.registry import TEMPORAL_MODELS
from fercache.temporal.step import (
    Objective,
    concordance_loss,
    masked_binary_cross_entropy,
    masked_cross_entropy,
)
from fercache.temporal.transformer import TemporalTransformer
from tests.train_data import TreeSpec, write_cache, write_tree

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY_MODEL = ("width=16", "layers=1", "heads=2", "ff_width=32", "batch_size=8", "workers=1")
RUN_FILES = {
    "config.yaml",
    "model.json",
    "best.safetensors",
    "final.safetensors",
    "last.pt",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """A small label tree and one 16-dim cache of it."""
    root = tmp_path_factory.mktemp("temporal")
    labels = write_tree(root / "data", TreeSpec(train_videos=6, val_videos=3, frames=250))
    write_cache(root / "cache", root / "data", labels)
    return {"root": root, "data": root / "data", "cache": root / "cache", "labels": labels}


def _request(*overrides: str, epochs: int = 2, **options) -> TrainRequest:
    return TrainRequest(
        overrides=TINY_MODEL + overrides, epochs=epochs, device="cpu", progress=False, **options
    )


def _without_timing(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "timing"} for record in records]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# --- clips ----------------------------------------------------------------------------------


def test_each_epoch_covers_every_labelled_row_exactly_once():
    rng = np.random.default_rng(0)
    lengths = [1, 5, 63, 64, 65, 130, 200, 0]
    labelled = [rng.random(length) > 0.3 for length in lengths]
    labelled[1][:] = False  # a video without a labelled row needs no window
    for epoch in range(5):
        windows = training_windows(labelled, 64, np.random.default_rng([1, epoch]))
        covered = [np.zeros(length, int) for length in lengths]
        for video, start, stop in windows:
            assert 0 <= start < stop <= lengths[video] and stop - start <= 64
            covered[video][start:stop] += 1
        for marks, counts in zip(labelled, covered, strict=True):
            assert (counts[marks] == 1).all()  # tails included, nothing twice
            assert (counts <= 1).all()


def test_evaluation_windows_cover_every_row():
    for rows in (1, 10, 64, 65, 100, 129, 1000):
        starts = evaluation_starts(rows, 64, 32)
        counts = np.zeros(rows, int)
        for start in starts:
            counts[start : start + 64] += 1
        assert (counts >= 1).all() and starts.max() + min(64, rows) == rows


def test_rank_shares_are_disjoint_and_equal_in_batches():
    windows = np.stack([np.zeros(21, int), np.arange(21), np.arange(21) + 1], axis=1)
    shares = [rank_share(windows, rank, 2, 4) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == 12
    real = np.concatenate([share[share[:, 2] > share[:, 1]] for share in shares])
    assert sorted(real[:, 1].tolist()) == list(range(21))


def test_unlabelled_rows_and_padding_add_zero_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lengths = (64, 40)
    source = MemoryFeatures(
        [
            FusedVideo(np.arange(1, n + 1), rng.normal(size=(n, 6)).astype(np.float16))
            for n in lengths
        ]
    )
    labels = [{"expr": rng.integers(0, 8, n)} for n in lengths]
    labels[0]["expr"][10:30] = -1
    batch = ClipBatches(source, labels, np.array([[0, 0, 64], [1, 0, 40]]), 64, 2)[0]
    assert batch.padding[1, 40:].all() and not batch.padding[1, :40].any()
    model = TemporalTransformer(ModelConfig(6, ("expr",), 64, 8, 1, 2, 16, 0.0, 0.0)).eval()
    weights = torch.linspace(0.5, 2.0, 8)
    truth = batch.targets["expr"]
    logits = model(batch.features, batch.padding)["expr"].detach().requires_grad_(True)
    loss = masked_cross_entropy(logits, truth, weights)

    # The same figure by hand over the labelled rows only.
    valid = truth >= 0
    per_row = torch.nn.functional.cross_entropy(logits[valid], truth[valid], reduction="none")
    row_weights = weights[truth[valid]]
    assert torch.allclose(loss, (per_row * row_weights).sum() / row_weights.sum())

    # No gradient reaches a -1 row or a padding row, whatever its logits.
    loss.backward()
    assert (logits.grad[~valid] == 0).all() and (logits.grad[valid] != 0).any()
    garbage = logits.detach().clone()
    garbage[~valid] = float("nan")
    assert torch.equal(masked_cross_entropy(garbage, truth, weights), loss.detach())

    # Whatever the padding rows hold, the real rows' outputs (and so the loss) do not change.
    scrambled = batch.features.clone()
    scrambled[1, 40:] = torch.randn(24, 6).half() * 100
    with torch.no_grad():
        again = masked_cross_entropy(model(scrambled, batch.padding)["expr"], truth, weights)
    assert torch.allclose(again, loss.detach(), atol=1e-6)


def test_va_loss_is_one_minus_the_numpy_ccc_and_minimised_by_a_perfect_prediction():
    rng = np.random.default_rng(2)
    truth = rng.uniform(-1, 1, size=(3, 40, 2)).astype(np.float32)
    truth[0, :7, 0] = -5  # valence invalid, arousal valid on the same rows
    truth[2, 30:, :] = -5
    predicted = np.tanh(truth + rng.normal(scale=0.5, size=truth.shape)).astype(np.float32)

    loss = concordance_loss(torch.from_numpy(predicted), torch.from_numpy(truth))

    flat_truth, flat_predicted = truth.reshape(-1, 2), predicted.reshape(-1, 2)
    valid = flat_truth != -5
    per_dimension = [
        concordance(flat_truth[valid[:, d], d], flat_predicted[valid[:, d], d]) for d in (0, 1)
    ]
    expected = np.mean([1 - ccc for ccc in per_dimension])
    assert float(loss) == pytest.approx(expected, abs=1e-5)

    # A perfect prediction scores 0, the minimum (|CCC| <= 1), with no gradient to follow;
    # anything else, even a perfectly correlated but shifted or scaled one, scores more.
    perfect = torch.from_numpy(np.where(truth == -5, 0.3, truth)).requires_grad_(True)
    best = concordance_loss(perfect, torch.from_numpy(truth))
    best.backward()
    assert float(best.detach()) == pytest.approx(0.0, abs=1e-6)
    assert perfect.grad.abs().max() < 1e-5
    for worse in (perfect * 0.5, perfect + 0.1, perfect + torch.randn(perfect.shape) * 0.05):
        assert float(concordance_loss(worse.detach(), torch.from_numpy(truth))) > 1e-3


def test_au_loss_is_the_mean_bce_over_valid_aus_with_positive_weights():
    rng = np.random.default_rng(3)
    labels = torch.from_numpy(rng.integers(-1, 2, size=(2, 30, 12)))
    logits = torch.randn(2, 30, 12)
    pos_weight = torch.linspace(0.5, 3.0, 12)
    valid = labels != -1
    for weight in (None, pos_weight):
        expected = torch.nn.functional.binary_cross_entropy_with_logits(
            logits[valid],
            labels[valid].float(),
            pos_weight=None if weight is None else weight.expand(2, 30, 12)[valid],
        )
        loss = masked_binary_cross_entropy(logits, labels, weight)
        assert torch.allclose(loss, expected, atol=1e-6)
    garbage = logits.clone()
    garbage[~valid] = float("nan")
    assert torch.equal(masked_binary_cross_entropy(garbage, labels, None),
                       masked_binary_cross_entropy(logits, labels, None))  # fmt: skip


def test_a_frame_without_expr_but_with_au_adds_only_to_the_au_loss():
    """Masking per task: a row's invalid EXPR label (and invalid VA) keeps it out of those
    losses, while its valid AU label still counts, and the total weighs each task."""
    torch.manual_seed(0)
    rows = 16
    targets = {
        "expr": torch.randint(0, 8, (1, rows)),
        "au": torch.randint(0, 2, (1, rows, 12)),
        "va": torch.rand(1, rows, 2) * 2 - 1,
    }
    row = 5
    targets["expr"][0, row] = -1
    targets["va"][0, row] = -5.0
    outputs = {
        "expr": torch.randn(1, rows, 8, requires_grad=True),
        "au": torch.randn(1, rows, 12, requires_grad=True),
        "va": torch.tanh(torch.randn(1, rows, 2)).requires_grad_(True),
    }
    objective = Objective({"expr": 1.0, "au": 0.5, "va": 2.0}, torch.ones(8))
    losses = objective.losses(outputs, targets)
    assert torch.allclose(losses["total"], losses["expr"] + 0.5 * losses["au"] + 2.0 * losses["va"])

    # Changing what the model says about that row moves the AU loss only.
    moved = {task: values.detach().clone() for task, values in outputs.items()}
    for task in moved:
        moved[task][0, row] = -moved[task][0, row] + 0.3
    again = objective.losses(moved, targets)
    assert torch.equal(again["expr"], losses["expr"]) and torch.equal(again["va"], losses["va"])
    assert not torch.allclose(again["au"], losses["au"])

    # And its gradient reaches the AU outputs of the row, nothing else of it.
    losses["total"].backward()
    assert (outputs["expr"].grad[0, row] == 0).all() and (outputs["va"].grad[0, row] == 0).all()
    assert (outputs["au"].grad[0, row] != 0).all()
    others = torch.arange(rows) != row
    assert all((outputs[task].grad[0, others] != 0).any() for task in ("expr", "va"))


# --- features -------------------------------------------------------------------------------


def test_fused_features_concatenate_caches_on_frame_numbers(small, tmp_path):
    second = write_cache(tmp_path / "second", small["data"], small["labels"], dim=5, seed=9)
    fused = load_fused_features([small["cache"], second], ["train00", "val01"])
    first = FeatureCache.open(small["cache"]).load("val01")
    other = FeatureCache.open(second).load("val01")
    video = fused["val01"]
    assert video.frames.dtype == np.int32 and video.features.dtype == np.float16
    assert video.features.shape == (len(first.frames), 21)
    assert np.array_equal(video.frames, first.frames)
    assert np.array_equal(video.features, np.concatenate([first.features, other.features], 1))


def test_mismatched_frame_sets_name_the_video_and_caches(small, tmp_path):
    data = tmp_path / "data"
    labels = write_tree(data, TreeSpec(train_videos=6, val_videos=3, frames=250))
    (data / "cropped_aligned" / "train02" / "00007.jpg").unlink(missing_ok=True)
    (data / "cropped_aligned" / "train02" / "00008.jpg").unlink(missing_ok=True)
    other = write_cache(tmp_path / "other", data, labels)
    with pytest.raises(FercacheError, match=r"video 'train02'.*different frames") as error:
        load_fused_features([small["cache"], other], ["train01", "train02"])
    assert str(other) in str(error.value) and str(small["cache"]) in str(error.value)


# --- training -------------------------------------------------------------------------------


# segments last 20 to 120 frames: the tcn's receptive field is 7 frames at 2 layers, 31 at 4
DEPTH = {"tcn": ("layers=4",)}


@pytest.mark.parametrize("model", sorted(TEMPORAL_MODELS))
def test_temporal_model_beats_a_per_frame_linear_classifier(model, tmp_path):
    labels = write_tree(tmp_path / "data", TreeSpec(train_videos=8, val_videos=4, seed=1))
    cache = write_cache(tmp_path / "cache", tmp_path / "data", labels, signal=1.0, occluded=0.5)
    request = TrainRequest(
        overrides=("width=32", "layers=2", "heads=4", "ff_width=64", "batch_size=8", "lr=2e-3",
                   "dropout=0", "input_dropout=0", f"model={model}", *DEPTH.get(model, ())),
        epochs=25,
        device="cpu",
        progress=False,
    )  # fmt: skip
    summary = train([cache], tmp_path / "data", tmp_path / "run", request)

    def rows(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        stores = [FeatureCache.open(cache).load(v) for v in sorted(labels) if v.startswith(prefix)]
        features = np.concatenate([store.features for store in stores]).astype(np.float32)
        targets = np.concatenate([labels[store.video][store.frames - 1] for store in stores])
        return features[targets >= 0], targets[targets >= 0]

    linear = LogisticRegression(max_iter=1000).fit(*rows("train"))
    features, targets = rows("val")
    linear_f1 = f1_score(targets, linear.predict(features), average="macro", labels=range(8))
    assert summary["best_val_f1"] > linear_f1 + 0.15, (summary["best_val_f1"], linear_f1)


def test_same_seed_gives_identical_metrics_and_a_complete_run_folder(small, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        train([small["cache"]], small["data"], run, _request("balance=sampling", epochs=3))
    assert {path.name for path in runs[0].iterdir()} == RUN_FILES
    first, second = (_without_timing(read_metrics(run)) for run in runs)
    assert first == second and len(first) == 3
    weights = [load_file(run / "best.safetensors") for run in runs]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    # The predictor computes exactly what validation scored (same windows, same averaging).
    predictor = TemporalPredictor.load(runs[0])
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert predictor.cache_fingerprints == [
        FeatureCache.open(small["cache"]).provenance["fingerprint"]
    ]
    fused = load_fused_features([small["cache"]], ["val00", "val01", "val02"])
    predicted, truth = [], []
    for name, video in fused.items():
        probabilities = predictor.predict(video.features)["expr"]
        assert probabilities.shape == (len(video.frames), 8)
        assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
        predicted.append(probabilities.argmax(axis=1))
        truth.append(small["labels"][name][video.frames - 1])
    predicted, truth = np.concatenate(predicted), np.concatenate(truth)
    valid = truth >= 0
    f1 = f1_score(truth[valid], predicted[valid], average="macro", labels=range(8), zero_division=0)
    assert f1 == pytest.approx(summary["best_val_f1"], abs=1e-9)

    # The final weights are the last epoch's: those the resume checkpoint holds.
    final = TemporalPredictor.load(runs[0], weights="final").model.state_dict()
    last_epoch = torch.load(runs[0] / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(final[name], last_epoch[name]) for name in final)


def test_lazy_hdf5_windows_train_exactly_like_in_memory(small, tmp_path):
    summaries = [
        train([small["cache"]], small["data"], tmp_path / name, _request(memory_budget=budget))
        for name, budget in (("memory", "auto"), ("lazy", "1K"))
    ]
    assert summaries[0]["features_in_memory"] and not summaries[1]["features_in_memory"]
    assert _without_timing(read_metrics(tmp_path / "memory")) == _without_timing(
        read_metrics(tmp_path / "lazy")
    )


def test_resume_after_sigkill_mid_epoch_ends_like_an_uninterrupted_run(small, tmp_path):
    overrides = ("batch_size=1",)  # many short steps: an epoch lasts long enough to be hit
    train([small["cache"]], small["data"], tmp_path / "whole", _request(*overrides, epochs=4))
    command = [sys.executable, "-m", "fercache", "train", str(small["cache"]),
               "--data", str(small["data"]), "--out", str(tmp_path / "killed"), "--epochs", "4",
               "--device", "cpu", "--no-progress"]  # fmt: skip
    for item in TINY_MODEL + overrides:
        command += ["--set", item]
    process = subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    epoch_seconds = json.loads(metrics.read_text().splitlines()[0])["timing"]["train_seconds"]
    time.sleep(epoch_seconds / 2)  # into the second epoch
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed, not finished
    assert 1 <= len(read_metrics(tmp_path / "killed")) < 4

    train(
        [small["cache"]],
        small["data"],
        tmp_path / "killed",
        _request(*overrides, epochs=4, resume=True),
    )
    assert _without_timing(read_metrics(tmp_path / "killed")) == _without_timing(
        read_metrics(tmp_path / "whole")
    )


def test_two_cpu_processes_under_torchrun_train_a_loadable_checkpoint(small, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "fercache", "train", str(small["cache"]),
               "--data", str(small["data"]), "--out", str(tmp_path / "ddp"), "--epochs", "2",
               "--device", "cpu", "--no-progress"]  # fmt: skip
    for item in TINY_MODEL:
        command += ["--set", item]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    predictor = TemporalPredictor.load(tmp_path / "ddp")
    features = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float16)
    assert predictor.predict(features)["expr"].shape == (100, 8)
    # Validation scored every rank's share: all labelled validation rows.
    cache = FeatureCache.open(small["cache"])
    expected = sum(
        int((small["labels"][v][cache.load(v).frames - 1] >= 0).sum())
        for v in ("val00", "val01", "val02")
    )
    assert all(record["val_frames"] == expected for record in read_metrics(tmp_path / "ddp"))


# --- configuration and errors ---------------------------------------------------------------


def test_a_diverged_run_is_an_error_and_keeps_nothing_of_the_bad_epoch(small, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(small["cache"], cache)
    with h5py.File(cache / "train00.h5", "r+") as store:  # as `extract --std 0,0,0` gives
        store["features"][:5] = np.nan
    with pytest.raises(FercacheError, match=r"training diverged in epoch 1: loss nan .*no epoch"):
        train([cache], small["data"], tmp_path / "run", _request())
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "run" / "best.safetensors").exists()
    with pytest.raises(FercacheError, match="lr must be > 0, weight_decay >= 0, both finite"):
        load_config(None, ["lr=inf"])


def test_a_run_removes_what_a_killed_run_left_half_written(small, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)  # fmt: skip
    leftover = tmp_path / "run" / f".best.safetensors.tmp-{int(finished.stdout)}"
    leftover.parent.mkdir()
    leftover.write_bytes(b"75 MB in real life")
    claim = tmp_path / "run" / ".run.claim"  # the killed run held the folder: taken over
    record = {"pid": int(finished.stdout), "host": HOST, "started": time.time(), "token": "dead"}
    claim.write_text(json.dumps(record))
    train([small["cache"]], small["data"], tmp_path / "run", _request(epochs=1))
    assert not leftover.exists() and (tmp_path / "run" / "best.safetensors").is_file()
    assert not claim.exists(), "the run's own claim outlived it"


def test_a_second_writer_of_a_run_folder_is_refused_while_the_first_runs(small, tmp_path):
    out, epochs = tmp_path / "run", 100_000  # the first writer is killed long before its end
    arguments = [str(small["cache"]), "--data", str(small["data"]), "--out", str(out),
                 "--epochs", str(epochs), "--device", "cpu", "--no-progress"]  # fmt: skip
    for item in TINY_MODEL:
        arguments += ["--set", item]
    first = subprocess.Popen(
        [sys.executable, "-m", "fercache", "train", *arguments], env=_env(), stderr=subprocess.PIPE
    )
    try:
        while not (out / "config.yaml").exists():
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.01)
        second = CliRunner().invoke(app, ["train", *arguments])  # a second new run
        assert second.exit_code == 2, second.output
        (line,) = second.stderr.strip().splitlines()
        assert line == (
            f"error: {out}: pid {first.pid} is writing a run into this folder; wait until it "
            "ends (`--resume` then continues the run), or choose another --out"
        )
        with pytest.raises(FercacheError, match=f"pid {first.pid} is writing a run"):
            train([small["cache"]], small["data"], out, _request(epochs=epochs, resume=True))
        assert first.poll() is None, "the writer refused to others must still be running"
    finally:
        first.kill()
        first.wait()


def test_config_file_holds_the_defaults():
    assert load_config(ROOT / "configs" / "temporal.yaml") == TemporalConfig()
    assert TemporalConfig().clip_frames == 64 and TemporalConfig().smooth_window == 30


def test_unknown_config_key_lists_the_valid_keys(small, tmp_path):
    result = CliRunner().invoke(
        app,
        ["train", str(small["cache"]), "--data", str(small["data"]), "--out", str(tmp_path / "r"),
         "--set", "layerz=2"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "unknown temporal setting(s) layerz" in result.output
    assert "valid keys: tasks" in result.output and "layers" in result.output


def test_missing_video_in_the_cache_is_named(small, tmp_path):
    partial = write_cache(
        tmp_path / "partial", small["data"], small["labels"], videos=["train00", "train01"]
    )
    with pytest.raises(FercacheError, match=r"no features for 4 video\(s\) of EXPR train: train02"):
        train([partial], small["data"], tmp_path / "run", _request())


def test_a_full_disk_at_a_checkpoint_names_it_and_keeps_the_finished_epoch(
    small, tmp_path, monkeypatch, full_disk_after
):
    run = tmp_path / "run"
    full_disk_after(torch, "save", calls=1)  # epoch 1's checkpoint is written, epoch 2's not
    message = re.escape(f"{run / 'last.pt'}: could not write the checkpoint (No space left")
    with pytest.raises(FercacheError, match=message):
        train([small["cache"]], small["data"], run, _request(epochs=2))
    monkeypatch.undo()

    assert torch.load(run / "last.pt", weights_only=False)["state"]["epochs_done"] == 1
    assert not [path.name for path in run.iterdir() if ".tmp-" in path.name]
    train([small["cache"]], small["data"], run, _request(epochs=2, resume=True))
    assert [record["epoch"] for record in read_metrics(run)] == [1, 2]


def test_resume_with_a_cache_of_another_feature_dim_is_refused(small, tmp_path):
    train([small["cache"]], small["data"], tmp_path / "run", _request(epochs=1))
    wider = write_cache(tmp_path / "wider", small["data"], small["labels"], dim=24)
    with pytest.raises(FercacheError, match=r"trained on 16-dim features .* give 24"):
        train([wider], small["data"], tmp_path / "run", _request(epochs=1, resume=True))


def test_resume_refuses_changed_settings_and_a_fresh_run_refuses_an_old_folder(small, tmp_path):
    run = tmp_path / "run"
    train([small["cache"]], small["data"], run, _request(epochs=1))
    with pytest.raises(FercacheError, match="change epochs 1 -> 3"):
        train([small["cache"]], small["data"], run, _request(epochs=3, resume=True))
    with pytest.raises(FercacheError, match=r"change layers 1 -> 2 \(only workers may change"):
        resumed_config(run, None, [*TINY_MODEL, "model.layers=2"], epochs=1)
    with pytest.raises(FercacheError, match="already holds a training run"):
        train([small["cache"]], small["data"], run, _request(epochs=1))
    # Only what cannot change the numbers may change (DataLoader processes).
    saved = load_config(None, list(TINY_MODEL), epochs=1)
    resumed = resumed_config(run, None, [*TINY_MODEL, "workers=0"], epochs=1)
    assert resumed == replace(saved, workers=0)

    # --print-config --resume shows the saved settings, as config.yaml holds them.
    command = ["train", str(small["cache"]), "--data", str(small["data"]), "--out", str(run)]
    result = CliRunner().invoke(app, [*command, "--resume", "--print-config"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (run / "config.yaml").read_text() == settings_text(saved)
    result = CliRunner().invoke(app, [*command, "--resume", "--print-config", "--epochs", "3"])
    assert result.exit_code == 2 and "change epochs 1 -> 3" in result.stderr


def test_print_config_shows_the_resolved_settings_and_trains_nothing(small, tmp_path):
    result = CliRunner().invoke(
        app,
        ["train", str(small["cache"]), "--data", str(small["data"]), "--out", str(tmp_path / "r"),
         "--set", "model.layers=2", "--set", "lr=1e-3", "--epochs", "7", "--print-config"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# resolved settings of this run")
    expected = load_config(None, ["layers=2", "lr=0.001"], epochs=7)
    assert result.stdout == settings_text(expected)
    assert not (tmp_path / "r").exists()
    printed = tmp_path / "printed.yaml"  # the printout is a config file
    printed.write_text(result.stdout)
    assert load_config(printed) == expected


def test_each_epoch_prints_one_line_when_progress_is_on(small, tmp_path):
    command = ["train", str(small["cache"]), "--data", str(small["data"]), "--epochs", "2",
               "--device", "cpu"]  # fmt: skip
    for item in TINY_MODEL:
        command += ["--set", item]
    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "shown")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if re.match(r"epoch \d/2  loss", line)]
    score = r"\d\.\d{4}"
    pattern = rf"epoch (\d)/2  loss {score}  val expr_f1 {score} \(smoothed {score}\)(  \* best)?  "
    matches = [re.fullmatch(pattern + r"\d+\.\d s", line) for line in lines]
    assert len(lines) == 2 and all(matches), lines
    assert [match[1] for match in matches] == ["1", "2"]
    assert matches[0][2] == "  * best"  # the first epoch always gives the best weights so far
    history = read_metrics(tmp_path / "shown")
    improved = history[1]["val_f1"] > history[0]["val_f1"]
    assert (matches[1][2] is not None) == improved
    assert (
        f"loss {history[1]['train_loss']:.4f}  val expr_f1 {history[1]['val_f1']:.4f}" in lines[1]
    )

    quiet = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "quiet"), "--no-progress"])
    assert quiet.exit_code == 0, quiet.output
    assert "epoch 1/2" not in quiet.output and "best validation epoch" in quiet.output


def test_the_epoch_line_shows_every_task_loss_and_score():
    config = load_config(None, ["tasks=[expr,au,va]"], epochs=20)
    record = {"epoch": 3, "train_loss": 2.5, "train_loss_expr": 1.25, "train_loss_au": 0.75,
              "train_loss_va": 0.5, "val_f1": 0.41, "val_f1_smoothed": 0.43, "val_au_f1": 0.38,
              "val_va_ccc": 0.2, "val_p": 0.99}  # fmt: skip
    assert epoch_line(record, config, False, 12.34) == (
        "epoch 3/20  loss 2.5000 (expr 1.2500, au 0.7500, va 0.5000)  val expr_f1 0.4100 "
        "(smoothed 0.4300)  au_f1 0.3800  va_ccc 0.2000  p 0.9900  12.3 s"
    )


def test_config_values_are_checked():
    with pytest.raises(FercacheError, match="width must be a multiple of heads"):
        replace(TemporalConfig(), width=10, heads=4).validate()
    with pytest.raises(FercacheError, match=r"setting lr='fast' should be like 0.0003"):
        load_config(None, ["lr=fast"])
    with pytest.raises(FercacheError, match=r"setting epochs=inf should be like 20"):
        load_config(None, ["epochs=.inf"])  # a whole number given infinity


def test_task_settings_resolve_and_bad_ones_are_named():
    config = load_config(None, ["tasks=[expr,au,va]", "loss_weights={au: 2}"])
    assert config.tasks == ("expr", "au", "va") and config.selected_score == "p"
    assert config.task_weights == {"expr": 1.0, "au": 2.0, "va": 1.0}
    assert load_config(None, ["tasks=va"]).selected_score == "va_ccc"
    assert load_config(None, ["tasks=[expr,va]", "select=expr_f1"]).selected_score == "expr_f1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tasks=[expr,landmarks]"], "tasks must be among expr, au, va"),
        (["tasks=[]"], "tasks must list at least one of expr, au, va"),
        (["tasks=[au,au]"], "tasks must not repeat a task"),
        (["loss_weights={exp: 1}"], "loss_weights names tasks among expr, au, va"),
        (["loss_weights={expr: -1}"], "loss_weights must be >= 0"),
        (["tasks=[au]", "loss_weights={au: 0}"], "loss_weights of the trained tasks must not"),
        (["loss_weights=2"], r"setting loss_weights=2 should be like \{'expr': 1.0"),
        (["tasks=[expr]", "select=va_ccc"], r"select=va_ccc scores a task that is not in tasks"),
        (["select=p"], "select=p needs several tasks"),
        (["select=best"], "select must be auto or one of expr_f1, au_f1, va_ccc, p"),
        (["tasks=[au]", "balance=sampling"], "balance=sampling draws windows by EXPR class"),
        (["au_pos_weight=yes"], "au_pos_weight must be one of none, inverse_frequency"),
    ],
)
def test_bad_task_settings_are_refused(overrides, message):
    with pytest.raises(FercacheError, match=message):
        load_config(None, overrides)


def test_a_task_the_tree_does_not_annotate_is_named(small, tmp_path):
    with pytest.raises(FercacheError, match=r"no AU annotations for split 'train'"):
        train([small["cache"]], small["data"], tmp_path / "run", _request("tasks=[expr,au]"))

"""Extraction: stores equal a direct forward pass, resume after a kill, bad input, torchrun."""

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from fercache.backbone import DataConfig, preprocess
from fercache.cli import app
from fercache.data.affwild2 import AffWild2
from fercache.errors import FercacheError
from fercache.extract import (
    ExtractOptions,
    VideoJob,
    _rank_share,
    collate_frames,
    extract,
)
from fercache.store import read_manifest, read_store

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "resnet18"
SIZE = 64  # small input keeps the CPU forward passes of these tests to a few seconds
runner = CliRunner()


def _options(**overrides) -> ExtractOptions:
    settings = dict(backbone=BACKBONE, input_size=SIZE, batch_size=48, workers=0, progress=False)
    return ExtractOptions(**{**settings, **overrides})


def _cli_args(data: Path, out: Path) -> list[str]:
    return [
        "extract", str(data), "--out", str(out), "--backbone", BACKBONE,
        "--input-size", str(SIZE), "--batch-size", "48", "--workers", "0", "--no-progress",
    ]  # fmt: skip


def _stores(cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    stored = {}
    for path in sorted(cache.glob("*.h5")):
        with h5py.File(path, "r") as store:
            attrs = {k: v for k, v in store.attrs.items() if k != "fercache_version"}
            stored[path.stem] = (store["frames"][:], store["features"][:], attrs)
    return stored


def _assert_same_caches(left: Path, right: Path) -> None:
    a, b = _stores(left), _stores(right)
    assert sorted(a) == sorted(b)
    for video in a:
        np.testing.assert_array_equal(a[video][0], b[video][0])
        np.testing.assert_array_equal(a[video][1], b[video][1])
        assert str(a[video][2]) == str(b[video][2])
    assert read_manifest(left)["videos"] == read_manifest(right)["videos"]


def _copy_tree(tree: Path, target: Path, videos: list[str] | None = None) -> Path:
    """A copy of the image folders (all or some videos) and the annotations."""
    shutil.copytree(tree, target, ignore=shutil.ignore_patterns("pools"))
    if videos is not None:
        for folder in (target / "cropped_aligned").iterdir():
            if folder.name not in videos:
                shutil.rmtree(folder)
    return target


@pytest.fixture(scope="module")
def reference_cache(synthetic_tree, tmp_path_factory) -> Path:
    """One uninterrupted single-process extraction of the whole small tree."""
    cache = tmp_path_factory.mktemp("reference") / "cache"
    report = extract(synthetic_tree, cache, _options())
    assert report.manifest == cache / "manifest.json"
    return cache


def _direct_forward(paths: list[Path]) -> np.ndarray:
    """Pooled features of timm's own forward on PIL-decoded images, preprocessed by hand."""
    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=0).eval()
    config = timm.data.resolve_data_config(model=model)
    pixels = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    batch = torch.nn.functional.interpolate(
        batch, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False
    )
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((batch - mean) / std).numpy()


def test_features_equal_a_direct_forward_row_for_row(synthetic_tree, reference_cache):
    dataset = AffWild2(synthetic_tree)
    missing_seen = 0
    for video in dataset.videos():
        store = read_store(reference_cache / f"{video}.h5")
        folder = dataset.images / video
        on_disk = sorted(int(p.stem) for p in folder.glob("*.jpg"))
        np.testing.assert_array_equal(store.frames, on_disk)
        missing_seen += int(store.frames[-1]) - len(store.frames)
        expected = _direct_forward([folder / f"{frame:05d}.jpg" for frame in store.frames])
        assert store.features.dtype == np.float16
        np.testing.assert_allclose(store.features, expected, rtol=2e-2, atol=2e-2)
        assert store.logits is None
        assert store.provenance.input_size == (3, SIZE, SIZE)
        assert store.provenance.interpolation == "bicubic"
    assert missing_seen > 0, "the synthetic tree should contain videos with missing frames"


def test_store_layout_and_manifest(synthetic_tree, reference_cache):
    manifest = read_manifest(reference_cache)
    videos = AffWild2(synthetic_tree).videos()
    assert sorted(manifest["videos"]) == sorted(videos)
    with h5py.File(reference_cache / f"{videos[0]}.h5", "r") as store:
        assert store["features"].chunks == (64, 512)
        assert store["frames"].dtype == np.int32
        assert store.attrs["complete"] == 1
        assert store.attrs["fingerprint"] == manifest["provenance"]["fingerprint"]
        assert manifest["videos"][videos[0]]["rows"] == store["frames"].shape[0]
    assert not list(reference_cache.glob(".*"))


def test_rerun_skips_finished_stores(synthetic_tree, reference_cache, tmp_path):
    cache = shutil.copytree(reference_cache, tmp_path / "cache")
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.h5")}
    report = extract(synthetic_tree, cache, _options())
    assert report.extracted == [] and sorted(report.resumed) == sorted(v[:-3] for v in before)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.h5")} == before


def test_other_provenance_is_an_error_unless_forced(synthetic_tree, reference_cache, tmp_path):
    cache = shutil.copytree(reference_cache, tmp_path / "cache")
    before = _stores(cache)
    with pytest.raises(FercacheError, match="--force"):
        extract(synthetic_tree, cache, _options(input_size=32))
    (cache / "manifest.json").unlink()  # a store alone is checked as well as the manifest
    with pytest.raises(FercacheError, match="already lies here"):
        extract(synthetic_tree, cache, _options(input_size=32))
    assert str(_stores(cache)) == str(before)
    video = AffWild2(synthetic_tree).videos()[0]
    extract(synthetic_tree, cache, _options(input_size=32, force=True, videos=(video,)))
    assert read_store(cache / f"{video}.h5").provenance.input_size == (3, 32, 32)


def test_killed_run_resumes_to_the_same_cache(synthetic_tree, reference_cache, tmp_path):
    cache = tmp_path / "cache"
    command = [sys.executable, str(ROOT / "cli.py"), *_cli_args(synthetic_tree, cache)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    # Kill at a random point once real work is under way: after a random number of stores.
    wanted = random.Random(os.getpid()).randint(1, len(_stores(reference_cache)) - 1)
    deadline = time.monotonic() + 120
    while len(list(cache.glob("*.h5"))) < wanted and process.poll() is None:
        assert time.monotonic() < deadline, "extraction made no progress"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cache / "manifest.json").exists()
    result = runner.invoke(app, _cli_args(synthetic_tree, cache))
    assert result.exit_code == 0, result.output
    assert "already done" in result.output
    _assert_same_caches(cache, reference_cache)
    assert not list(cache.glob(".*")), "temporary files were left behind"


def test_corrupt_jpeg_is_skipped_and_recorded(synthetic_tree, tmp_path):
    dataset = AffWild2(synthetic_tree)
    video, ruined = dataset.videos()[1:3]
    data = _copy_tree(synthetic_tree, tmp_path / "tree", [video, ruined])
    frames = sorted((data / "cropped_aligned" / video).glob("*.jpg"))
    truncated, garbage = frames[5], frames[40]
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage.write_bytes(b"not a jpeg at all")
    ruined_frames = sorted((data / "cropped_aligned" / ruined).glob("*.jpg"))
    for path in ruined_frames:
        path.write_bytes(b"")
    cache = tmp_path / "cache"
    result = runner.invoke(app, _cli_args(data, cache))
    assert result.exit_code == 0, result.output
    assert result.output.count("unreadable image skipped:") == 20
    assert f"{len(ruined_frames) + 2 - 20} more unreadable images skipped" in result.output
    nothing = read_store(cache / f"{ruined}.h5")  # a video of only bad files still gets a store
    assert nothing.features.shape == (0, 512) and len(nothing.skipped_frames) == len(ruined_frames)
    assert truncated.name in result.output and garbage.name in result.output
    store = read_store(cache / f"{video}.h5")
    bad = sorted(int(p.stem) for p in (truncated, garbage))
    np.testing.assert_array_equal(store.skipped_frames, bad)
    assert not set(bad) & set(store.frames.tolist())
    assert len(store.frames) == len(frames) - 2
    with h5py.File(cache / f"{video}.h5", "r") as handle:
        assert truncated.name in handle.attrs["skipped_reasons"]
    assert read_manifest(cache)["videos"][video]["skipped"] == 2


def test_empty_video_folder_is_reported_and_skipped(synthetic_tree, tmp_path):
    dataset = AffWild2(synthetic_tree)
    video = dataset.videos()[0]
    data = _copy_tree(synthetic_tree, tmp_path / "tree", [video])
    (data / "cropped_aligned" / "empty_video").mkdir()
    cache = tmp_path / "cache"
    result = runner.invoke(app, _cli_args(data, cache))
    assert result.exit_code == 0, result.output
    assert "empty_video: empty image folder, skipped" in result.output
    assert sorted(read_manifest(cache)["videos"]) == [video]


def test_mismatched_checkpoint_fails_before_any_file(synthetic_tree, tmp_path):
    checkpoint = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18", num_classes=8).state_dict(), checkpoint)
    cache = tmp_path / "cache"
    args = [a if a != BACKBONE else "resnet34" for a in _cli_args(synthetic_tree, cache)]
    result = runner.invoke(app, [*args, "--checkpoint", str(checkpoint)])
    assert result.exit_code == 2
    assert "missing keys" in result.output and "layer1.2.bn1.weight" in result.output
    assert "Traceback" not in result.output
    assert not cache.exists()


def test_checkpoint_with_head_stores_its_logits(synthetic_tree, tmp_path):
    model = timm.create_model(BACKBONE, num_classes=8).eval()
    checkpoint = tmp_path / "student.pt"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint
    )
    video = AffWild2(synthetic_tree).videos()[2]
    cache = tmp_path / "cache"
    extract(synthetic_tree, cache, _options(checkpoint=checkpoint, videos=(video,)))
    store = read_store(cache / f"{video}.h5")
    assert store.logits.shape == (len(store.frames), 8)
    assert store.provenance.checkpoint == "student.pt" and store.provenance.num_classes == 8
    with torch.no_grad():
        expected = model.fc(torch.from_numpy(store.features.astype(np.float32))).numpy()
    np.testing.assert_allclose(store.logits, expected, rtol=0.05, atol=0.05)


def test_full_disk_leaves_no_store_under_a_final_name(synthetic_tree, tmp_path, monkeypatch):
    videos = AffWild2(synthetic_tree).videos()[:3]
    cache = tmp_path / "cache"
    real_replace = os.replace
    replaced = []

    def disk_fills_after_first_store(source, target):
        if replaced:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replaced.append(target)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", disk_fills_after_first_store)
    with pytest.raises(FercacheError, match="No space left on device"):
        extract(synthetic_tree, cache, _options(videos=tuple(videos)))
    monkeypatch.undo()
    finished = [p.name for p in cache.glob("*.h5")]
    assert finished == [Path(replaced[0]).name]
    assert read_store(cache / finished[0]).features.shape[0] > 0
    assert not list(cache.glob(".*")) and not (cache / "manifest.json").exists()


def test_two_processes_under_torchrun_equal_one(synthetic_tree, reference_cache, tmp_path):
    cache = tmp_path / "cache"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "cli.py"), *_cli_args(synthetic_tree, cache),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_caches(cache, reference_cache)


def test_rank_shares_are_disjoint_complete_and_balanced():
    sizes = [500, 40, 300, 300, 20, 150, 150, 90, 60, 10]
    jobs = [VideoJob(f"v{i}", np.arange(1, n + 1), Path(".")) for i, n in enumerate(sizes)]
    for world in (1, 2, 3, 4):
        shares = [_rank_share(jobs, rank, world) for rank in range(world)]
        names = [job.video for share in shares for job in share]
        assert sorted(names) == sorted(job.video for job in jobs)  # each video exactly once
        loads = [sum(len(job.frames) for job in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes)


def test_frames_of_different_sizes_are_resized_each_on_its_own():
    config = DataConfig((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")
    gray = torch.full((3, 40, 40), 128, dtype=torch.uint8)
    small = torch.full((3, 20, 24), 255, dtype=torch.uint8)
    batch = collate_frames([(0, gray, ""), (1, torch.empty(0), "x.jpg: bad"), (2, small, "")])
    assert batch["index"].tolist() == [0, 2] and batch["failed"] == [(1, "x.jpg: bad")]
    pixels = preprocess(batch["images"], config)
    assert pixels.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(pixels[0].numpy(), (128 / 255 - 0.5) / 0.25, atol=1e-5)
    np.testing.assert_allclose(pixels[1].numpy(), (1 - 0.5) / 0.25, atol=1e-5)


def test_bad_options_are_clean_errors(synthetic_tree, tmp_path):
    cases = [
        (["--dtype", "int8"], "--dtype"),
        (["--videos", "nope"], "nope"),
        (["--mean", "1,2"], "--mean"),
        (["--backbone", "resnet_made_up"], "unknown backbone"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, [*_cli_args(synthetic_tree, tmp_path / "c"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "c").exists()

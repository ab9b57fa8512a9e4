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

from fercache.backbone.network import DataConfig, preprocess
from fercache.cli import app
from fercache.data.affwild2 import AffWild2
from fercache.errors import FercacheError
from fercache.features.extract import ExtractOptions, extract
from fercache.features.frames import VideoJob, collate_frames
from fercache.features.sharing import rank_share
from fercache.features.store import PROVENANCE_NAME, FeatureCache, read_manifest, read_store

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
    (cache / "manifest.json").unlink()  # as while its first extraction still runs
    with pytest.raises(FercacheError, match=r"holds features of .*\[3, 64, 64\] there"):
        extract(synthetic_tree, cache, _options(input_size=32))
    (cache / PROVENANCE_NAME).unlink()  # a store alone (of a version without the record)
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
    # train and predict, asking for its features, are told what is wrong, not "extract it"
    assert read_manifest(cache)["without_images"] == ["empty_video"]
    with pytest.raises(FercacheError, match=r"'empty_video' has no features: its image folder"):
        FeatureCache.open(cache).load("empty_video")


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
        shares = [rank_share(jobs, rank, world) for rank in range(world)]
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
        (["--std", "0,0,0"], "--std 0,0,0: every channel's std must be a positive number"),
        (["--std", "0.2,-1,0.2"], "must be a positive number"),
        (["--backbone", "resnet_made_up"], "unknown backbone"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, [*_cli_args(synthetic_tree, tmp_path / "c"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "c").exists()


# --layer, --pool, --tta: each readout equals timm's own computation on the same batch


VIT, CNN = "test_vit", "test_resnet"  # timm's tiny test models, random init


def _readout_store(data: Path, out: Path, backbone: str, video: str, **readout):
    size = None if backbone == VIT else SIZE  # the ViT's position embedding fixes 160 px
    settings = dict(backbone=backbone, input_size=size, dtype="float32", videos=(video,))
    extract(data, out, _options(**settings, **readout))
    return read_store(out / f"{video}.h5")


def _timm_model_and_batch(data: Path, store) -> tuple[torch.nn.Module, torch.Tensor]:
    """The random-init network as timm builds it, and the store's frames preprocessed by the
    extract module's own helper (`fercache.backbone.network.preprocess`)."""
    provenance = store.provenance
    torch.manual_seed(provenance.init_seed)
    model = timm.create_model(provenance.backbone, pretrained=False, num_classes=0).eval()
    config = DataConfig(
        provenance.input_size, provenance.mean, provenance.std, provenance.interpolation
    )
    folder = AffWild2(data).images / store.video
    pixels = np.stack(
        [np.asarray(Image.open(folder / f"{f:05d}.jpg").convert("RGB")) for f in store.frames]
    )
    return model, preprocess(torch.from_numpy(pixels).permute(0, 3, 1, 2), config)


def _vit_block_tokens(model: torch.nn.Module, batch: torch.Tensor, block: int) -> torch.Tensor:
    """A ViT's tokens after `block`, through its final norm, by hand from timm's modules."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(batch)))
    for layer in model.blocks[: block + 1]:
        tokens = layer(tokens)
    return model.norm(tokens)


def _close(stored: np.ndarray, expected: torch.Tensor) -> None:
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-3, atol=2e-4)


def test_vit_layer_pool_and_flip_equal_timm(synthetic_tree, tmp_path):
    video = AffWild2(synthetic_tree).videos()[0]
    stores = {
        name: _readout_store(synthetic_tree, tmp_path / name, VIT, video, **readout)
        for name, readout in {
            "default": {},
            "layer": {"layer": 2},
            "cls": {"pool": "cls"},
            "avg": {"pool": "avg"},
            "tokens-mean": {"pool": "tokens-mean"},
            "flip": {"tta": "flip"},
            "layer-mean-flip": {"layer": 4, "pool": "tokens-mean", "tta": "flip"},
        }.items()
    }
    model, batch = _timm_model_and_batch(synthetic_tree, stores["default"])
    assert isinstance(model.fc_norm, torch.nn.Identity) and not model.pool_include_prefix
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        final = model.forward_features(batch)
        mirrored = model.forward_features(batch.flip(3))
        _close(stores["default"].features, final[:, 0])  # timm's 'token' pooling
        _close(stores["layer"].features, _vit_block_tokens(model, batch, 2)[:, 0])
        _close(stores["cls"].features, final[:, 0])
        _close(stores["avg"].features, final[:, prefix:].mean(1))
        _close(stores["tokens-mean"].features, final[:, prefix:].mean(1))
        _close(stores["flip"].features, (model(batch) + model(batch.flip(3))) / 2)
        layer4 = [
            _vit_block_tokens(model, b, 4)[:, prefix:].mean(1) for b in (batch, batch.flip(3))
        ]
        _close(stores["layer-mean-flip"].features, (layer4[0] + layer4[1]) / 2)
        assert not torch.allclose(final, mirrored)  # the mirror is really another input
    recorded = {name: store.provenance for name, store in stores.items()}
    assert (recorded["layer"].layer, recorded["cls"].pool, recorded["flip"].tta) == (
        2,
        "cls",
        "flip",
    )
    assert recorded["layer-mean-flip"].feature_dim == 64
    fingerprints = {provenance.fingerprint for provenance in recorded.values()}
    assert len(fingerprints) == len(stores)  # every readout is another provenance
    manifest = read_manifest(tmp_path / "layer-mean-flip")["provenance"]
    assert (manifest["layer"], manifest["pool"], manifest["tta"]) == (4, "tokens-mean", "flip")


def test_cnn_layer_and_flip_equal_timm(synthetic_tree, tmp_path):
    video = AffWild2(synthetic_tree).videos()[1]
    default = _readout_store(synthetic_tree, tmp_path / "default", CNN, video)
    layer = _readout_store(synthetic_tree, tmp_path / "layer", CNN, video, layer=2)
    flip = _readout_store(synthetic_tree, tmp_path / "flip", CNN, video, tta="flip")
    stem = _readout_store(synthetic_tree, tmp_path / "stem", CNN, video, layer=0, tta="flip")
    model, batch = _timm_model_and_batch(synthetic_tree, default)
    with torch.no_grad():
        _close(default.features, model(batch))
        (maps,) = model.forward_intermediates(batch, indices=[2], intermediates_only=True)
        _close(layer.features, maps.mean(dim=(2, 3)))
        _close(flip.features, (model(batch) + model(batch.flip(3))) / 2)
        stems = [
            model.act1(model.bn1(model.conv1(b))).mean(dim=(2, 3)) for b in (batch, batch.flip(3))
        ]
        _close(stem.features, (stems[0] + stems[1]) / 2)
    assert (
        layer.provenance.feature_dim == model.feature_info[2]["num_chs"] == layer.features.shape[1]
    )
    assert stem.provenance.feature_dim == model.feature_info[0]["num_chs"]
    assert default.provenance.layer == -1 and default.provenance.tta == ""
    fingerprints = {s.provenance.fingerprint for s in (default, layer, flip, stem)}
    assert len(fingerprints) == 4
    with pytest.raises(FercacheError, match="tta flip"):  # a cache of another readout
        extract(synthetic_tree, tmp_path / "default", _options(backbone=CNN, tta="flip"))


def test_logits_follow_the_readout(synthetic_tree, tmp_path):
    """With a head: --tta flip averages the logits too and --pool keeps the network's own
    logits; --layer stores none (an intermediate block has no classifier)."""
    torch.manual_seed(1)
    model = timm.create_model(VIT, num_classes=8).eval()
    checkpoint = tmp_path / "vit.pt"
    torch.save(model.state_dict(), checkpoint)
    video = AffWild2(synthetic_tree).videos()[2]
    flip = _readout_store(
        synthetic_tree, tmp_path / "flip", VIT, video, checkpoint=checkpoint, tta="flip", pool="avg"
    )
    layer = _readout_store(
        synthetic_tree, tmp_path / "layer", VIT, video, checkpoint=checkpoint, layer=1
    )
    _, batch = _timm_model_and_batch(synthetic_tree, flip)
    with torch.no_grad():
        _close(flip.logits, (model(batch) + model(batch.flip(3))) / 2)
        tokens = [model.forward_features(b)[:, 1:].mean(1) for b in (batch, batch.flip(3))]
        _close(flip.features, (tokens[0] + tokens[1]) / 2)
    assert flip.provenance.num_classes == 8
    assert layer.logits is None and layer.provenance.num_classes == 0
    with h5py.File(tmp_path / "layer" / f"{video}.h5", "r") as store:
        assert "logits" not in store


def test_readout_refusals(synthetic_tree, tmp_path):
    from fercache.backbone.readout import Readout, check_readout

    no_class_token = timm.create_model(VIT, class_token=False, global_pool="avg")
    with pytest.raises(FercacheError, match="no class token"):
        check_readout(no_class_token, VIT, Readout(pool="cls"), 64)
    assert check_readout(no_class_token, VIT, Readout(pool="tokens-mean"), 64) == 64
    cases = [
        (CNN, ["--layer", "5"], "intermediates 0 to 4"),
        (CNN, ["--layer", "-1"], "--layer -1"),
        (CNN, ["--pool", "cls"], "not a token model"),
        (CNN, ["--pool", "avg"], "not a token model"),
        (VIT, ["--layer", "6"], "intermediates 0 to 5"),
        (VIT, ["--pool", "max"], "--pool takes avg, cls, tokens-mean"),
        (VIT, ["--tta", "rotate"], "--tta takes flip"),
    ]
    for backbone, extra, message in cases:
        args = [a if a != BACKBONE else backbone for a in _cli_args(synthetic_tree, tmp_path / "c")]
        if backbone == VIT:
            args = args[: args.index("--input-size")] + args[args.index("--input-size") + 2 :]
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "c").exists()


def test_default_readout_keeps_the_fingerprint_of_older_caches():
    import hashlib
    import json
    from dataclasses import asdict

    from fercache.features.store import FORMAT_VERSION, Provenance

    base = Provenance(
        "resnet18", "", "", 0, (3, 64, 64), (0.5,) * 3, (0.25,) * 3, "bicubic", "float16", 512, 0
    )
    older = asdict(base)  # the fingerprint as computed before the readout fields existed
    for name in ("pretrained", "weights_source", "layer", "pool", "tta"):
        older.pop(name)
    for name in ("source", "source_kind", "source_key", "source_sha256", "rate"):
        older.pop(name)  # the import fields, added later still
    for name in ("time_column", "fps", "align"):
        older.pop(name)
    for name in ("sample_rate", "chunk", "overlap"):
        older.pop(name)  # the audio fields, added later again
    older.pop("checkpoint")
    older["format_version"] = FORMAT_VERSION
    text = json.dumps(older, sort_keys=True, default=list)
    assert base.fingerprint == hashlib.sha256(text.encode()).hexdigest()[:16]
    changed = [Provenance(**{**asdict(base), **field}) for field in (
        {"layer": 3}, {"pool": "cls"}, {"pool": "avg"}, {"pool": "tokens-mean"}, {"tta": "flip"},
    )]  # fmt: skip
    assert len({base.fingerprint, *(p.fingerprint for p in changed)}) == 6

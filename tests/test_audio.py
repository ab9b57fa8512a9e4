"""`fercache audio`: stores equal a reference forward pass of the encoder on the resampled sound,
frame alignment at 25, 30 and 29.97 fps, silent, truncated and short sound tracks, resume after
a kill, and the errors without the extra or offline."""

import multiprocessing
import os
import shutil
import signal
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from huggingface_hub import constants
from transformers import AutoFeatureExtractor, AutoModel
from typer.testing import CliRunner

from fercache import outputs
from fercache.cli import app
from fercache.errors import FercacheError
from fercache.features import audio as audio_module
from fercache.features.audio import AudioOptions, compute_audio, model_files_sha256
from fercache.features.store import PROVENANCE_NAME, TMP_MARK, FeatureCache, read_manifest
from fercache.synth.sound import (
    ENCODER_RATE,
    ROW_RATE,
    save_speech_encoder,
    tone,
    write_frame_tree,
    write_video,
)

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> dict:
    """The tiny encoder's folder, and the model and feature extractor the test reads from it."""
    folder = save_speech_encoder(tmp_path_factory.mktemp("encoder") / "tiny-wav2vec2")
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    return {
        "folder": folder,
        "model": model,
        "extractor": AutoFeatureExtractor.from_pretrained(folder),
    }


def _options(encoder: dict, **overrides) -> AudioOptions:
    settings = {"model": str(encoder["folder"]), "dtype": "float32", "device": "cpu"}
    return AudioOptions(**{**settings, "progress": False, **overrides})


def _decoded(path: Path) -> np.ndarray:
    """The test's own read of a file's sound: PyAV's decoder and resampler, mono 16 kHz."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=ENCODER_RATE)
    with av.open(str(path)) as container:
        frames = [out for frame in container.decode(audio=0) for out in resampler.resample(frame)]
    frames += resampler.resample(None)
    return np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames])


def _reference(encoder: dict, samples: np.ndarray, layer: int | None = None) -> np.ndarray:
    """One forward pass of the encoder over `samples`: hidden state `layer`, or the mean."""
    inputs = encoder["extractor"](samples, sampling_rate=ENCODER_RATE, return_tensors="pt")
    with torch.inference_mode():
        states = encoder["model"](**inputs, output_hidden_states=True).hidden_states
    return (states[layer] if layer is not None else torch.stack(states).mean(0))[0].numpy()


def _nearest(rows: np.ndarray, frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(covered frames 1-based, their rows) by import-features' nearest rule: frame f at
    (f - 1) / fps takes the row nearest in time (the earlier on a tie) when it is at most half
    a row period away."""
    t = np.arange(frames) / fps
    s = np.arange(len(rows)) / ROW_RATE
    nearest = np.argmin(np.abs(t[:, None] - s[None, :]), axis=1)
    covered = np.abs(t - s[nearest]) <= 0.5 / ROW_RATE + 1e-12
    return np.flatnonzero(covered) + 1, rows[nearest[covered]]


# --- (a) the rows are the encoder's -----------------------------------------------------------


def test_rows_equal_a_forward_pass_of_the_encoder_on_the_resampled_sound(encoder, tmp_path):
    # 48 kHz stereo: PyAV down-mixes and resamples to the encoder's 16 kHz mono
    seconds, fps, frames = 1.5, 30, 45
    left, right = tone(seconds, 440, 48000), tone(seconds, 440, 48000, amplitude=0.3)
    video = write_video(
        tmp_path / "videos" / "clip.mov", fps, frames, np.stack([left, right]), 48000
    )
    data = write_frame_tree(tmp_path / "data", {"clip": frames})

    cache = tmp_path / "cache"
    report = compute_audio([video.parent], cache, data, _options(encoder))
    stored = FeatureCache.open(cache).load("clip")

    samples = _decoded(video)
    assert len(samples) == seconds * ENCODER_RATE
    ideal = tone(seconds, 440, ENCODER_RATE)
    assert np.corrcoef(samples[1600:-1600], ideal[1600:-1600])[0, 1] > 0.999  # the same sine
    rows = _reference(encoder, samples)  # one pass: the default chunk holds the whole track
    assert rows.shape == ((len(samples) - 400) // 320 + 1, 32)
    expected_frames, expected = _nearest(rows, frames, fps)
    assert np.array_equal(stored.frames, expected_frames)
    assert np.allclose(stored.features, expected, rtol=0, atol=1e-5)
    assert np.array_equal(
        stored.missing_frames, np.setdiff1d(np.arange(1, frames + 1), expected_frames)
    )
    assert report.computed == ["clip"] and report.audio_seconds == seconds

    provenance = FeatureCache.open(cache).provenance
    assert (provenance["backbone"], provenance["source_kind"]) == ("", "audio")
    assert provenance["checkpoint"] == "tiny-wav2vec2"
    assert provenance["checkpoint_sha256"] == model_files_sha256(encoder["folder"])
    assert provenance["weights_source"] == "file" and provenance["feature_dim"] == 32
    assert (provenance["layer"], provenance["pool"]) == (-1, "layers-mean")
    assert (provenance["sample_rate"], provenance["rate"]) == (ENCODER_RATE, ROW_RATE)
    assert (provenance["chunk"], provenance["overlap"], provenance["align"]) == (
        30.0,
        1.0,
        "nearest",
    )


def test_chunks_keep_their_centre_rows_of_a_pass_with_overlap(encoder, tmp_path):
    seconds, fps, frames = 2.0, 25, 50
    rng = np.random.default_rng(0)
    sound = tone(seconds, 300, ENCODER_RATE) + 0.1 * rng.normal(size=int(seconds * ENCODER_RATE))
    video = write_video(tmp_path / "clip.mov", fps, frames, sound)
    data = write_frame_tree(tmp_path / "data", {"clip": frames})

    options = _options(encoder, layer=1, chunk=0.5, overlap=0.2)
    compute_audio([video], tmp_path / "cache", data, options)
    stored = FeatureCache.open(tmp_path / "cache").load("clip")

    samples = _decoded(video)
    total = (len(samples) - 400) // 320 + 1
    rows = np.empty((total, 32), np.float32)
    for start in range(0, total, 25):  # 0.5 s of rows kept, 0.2 s (10 rows) of context
        stop = min(total, start + 25)
        first, last = max(0, start - 10), min(total, stop + 10)
        end = len(samples) if last == total else (last - 1) * 320 + 400  # the tail: last pass
        computed = _reference(encoder, samples[first * 320 : end], layer=1)
        rows[start:stop] = computed[start - first : stop - first]
    expected_frames, expected = _nearest(rows, frames, fps)
    assert np.array_equal(stored.frames, expected_frames)
    assert np.allclose(stored.features, expected, rtol=0, atol=1e-5)
    whole = _reference(encoder, samples, layer=1)
    assert not np.allclose(rows, whole, atol=1e-3)  # the chunks are passes of their own


# --- (b) frames by time ------------------------------------------------------------------------


def test_frames_are_aligned_by_time_at_25_30_and_29_97_fps(encoder, tmp_path):
    rates = {"pal": Fraction(25), "ntsc": Fraction(30), "drop": Fraction(30000, 1001)}
    frames = {name: int(1.2 * fps) for name, fps in rates.items()}
    for index, (name, fps) in enumerate(rates.items()):
        sound = tone(frames[name] / fps, 200 + 150 * index, ENCODER_RATE)
        write_video(tmp_path / "videos" / f"{name}.mov", fps, frames[name], sound)
    data = write_frame_tree(tmp_path / "data", frames)

    for align in ("nearest", "linear"):
        cache = tmp_path / align
        compute_audio([tmp_path / "videos"], cache, data, _options(encoder, align=align))
        manifest = read_manifest(cache)
        for name, fps in rates.items():
            stored = FeatureCache.open(cache).load(name)
            rows = _reference(encoder, _decoded(tmp_path / "videos" / f"{name}.mov"))
            assert manifest["videos"][name]["fps"] == float(fps)
            if align == "nearest":
                expected_frames, expected = _nearest(rows, frames[name], float(fps))
            else:  # np.interp between the rows around each frame; none after the last row
                t = np.arange(frames[name]) / float(fps)
                s = np.arange(len(rows)) / ROW_RATE
                expected_frames = np.flatnonzero(t <= s[-1]) + 1
                at = t[expected_frames - 1]
                expected = np.stack([np.interp(at, s, column) for column in rows.T], axis=1)
            assert np.array_equal(stored.frames, expected_frames), (align, name)
            assert np.allclose(stored.features, expected, rtol=0, atol=1e-5), (align, name)
            # 1.2 s of sound for 1.2 s of video: at most the last frame or two go uncovered
            assert len(stored.missing_frames) <= 2


# --- (c) silent, truncated and short sound tracks ----------------------------------------------


def test_silent_truncated_and_short_tracks_are_reported_or_missing_never_zero(encoder, tmp_path):
    fps, frames = 25, 50  # 2 s of video
    videos = tmp_path / "videos"
    write_video(videos / "whole.mov", fps, frames, tone(2.0, 330, ENCODER_RATE))
    write_video(videos / "silent.mov", fps, frames, None)
    write_video(videos / "short.mov", fps, frames, tone(0.8, 330, ENCODER_RATE))
    for name, suffix in (("cutmov", "mov"), ("cutmkv", "mkv")):
        whole = write_video(
            tmp_path / f"{name}.{suffix}", fps, frames, tone(2.0, 550, ENCODER_RATE)
        )
        content = whole.read_bytes()
        (videos / whole.name).write_bytes(content[: len(content) // 2])  # cut mid-file
    data = write_frame_tree(
        tmp_path / "data", dict.fromkeys(["whole", "silent", "short", "cutmov", "cutmkv"], frames)
    )

    cache = tmp_path / "cache"
    arguments = [str(videos), "--out", str(cache), "--data", str(data)]
    model = ["--model", str(encoder["folder"]), "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, ["audio", *arguments, *model])

    assert result.exit_code == 1, result.output  # a file failed; the others are done
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "cutmov.mov" in failed[0] and "unreadable" in failed[0]
    assert "silent.mov: no audio stream" in result.stderr
    manifest = read_manifest(cache)
    assert sorted(manifest["videos"]) == ["cutmkv", "short", "silent", "whole"]
    assert not (cache / "cutmov.h5").exists()

    loaded = {name: FeatureCache.open(cache).load(name) for name in manifest["videos"]}
    every = np.arange(1, frames + 1)
    assert len(loaded["silent"].frames) == 0 and np.array_equal(
        loaded["silent"].missing_frames, every
    )
    assert manifest["videos"]["silent"] == {
        "rows": 0,
        "skipped": 0,
        "missing": frames,
        "frames": frames,
        "fps": 25.0,
    }
    assert len(loaded["whole"].missing_frames) <= 1
    for name in ("short", "cutmkv"):  # a sound track of part of the video: the rest is missing
        rows = _reference(
            encoder, _decoded(videos / f"{name}.{'mov' if name == 'short' else 'mkv'}")
        )
        expected_frames, _ = _nearest(rows, frames, fps)
        assert np.array_equal(loaded[name].frames, expected_frames)
        assert np.array_equal(loaded[name].missing_frames, np.setdiff1d(every, expected_frames))
        assert 0 < len(expected_frames) < frames * 0.7
        assert manifest["videos"][name]["missing"] == frames - len(expected_frames)
    stored = np.concatenate([loaded[name].features for name in manifest["videos"]]).astype(
        np.float32
    )
    assert np.isfinite(stored).all() and (np.abs(stored).sum(axis=1) > 0).all()  # no zero rows


# --- (d) resume, a killed run, another provenance ----------------------------------------------


def _three_videos(root: Path) -> tuple[Path, Path]:
    for index, name in enumerate(("a", "b", "c")):
        write_video(
            root / "videos" / f"{name}.mov", 30, 36, tone(1.2, 250 + 100 * index, ENCODER_RATE)
        )
    return root / "videos", write_frame_tree(root / "data", dict.fromkeys(["a", "b", "c"], 36))


def _killed_before_the_second_rename(
    videos: Path, cache: Path, data: Path, options: AudioOptions
) -> None:
    """Runs in a forked child: SIGKILLs itself once the second store is on disk under its
    temporary name, before its rename (what a kill at that moment leaves)."""
    flushed = []
    real = outputs._flush_to_disk

    def flush(path: Path) -> None:
        real(path)
        if TMP_MARK in path.name:  # a store, not the cache's settings
            flushed.append(path)
        if len(flushed) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    outputs._flush_to_disk = flush
    compute_audio([videos], cache, data, options)


def test_a_killed_run_resumes_to_the_same_cache_and_a_rerun_skips_finished_videos(
    encoder, tmp_path
):
    videos, data = _three_videos(tmp_path)
    options = _options(encoder, dtype="float16")
    reference = tmp_path / "reference"
    compute_audio([videos], reference, data, options)

    cache = tmp_path / "cache"
    child = multiprocessing.get_context("fork").Process(
        target=_killed_before_the_second_rename, args=(videos, cache, data, options)
    )
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert sorted(path.name for path in cache.iterdir()) == [
        ".b.h5.tmp-" + str(child.pid),
        "a.h5",
        PROVENANCE_NAME,
    ]

    report = compute_audio([videos], cache, data, options)
    assert report.resumed == ["a"] and report.computed == ["b", "c"]
    assert sorted(path.name for path in cache.iterdir()) == [
        "a.h5",
        "b.h5",
        "c.h5",
        "manifest.json",
        PROVENANCE_NAME,
    ]
    assert read_manifest(cache) == read_manifest(reference)
    for name in ("a", "b", "c"):
        got, want = (FeatureCache.open(folder).load(name) for folder in (cache, reference))
        assert np.array_equal(got.frames, want.frames) and np.array_equal(
            got.features, want.features
        )
        assert np.array_equal(got.missing_frames, want.missing_frames)

    stamps = {path.name: path.stat().st_mtime_ns for path in cache.glob("*.h5")}
    again = compute_audio([videos], cache, data, options)
    assert again.computed == [] and again.resumed == ["a", "b", "c"]
    assert {path.name: path.stat().st_mtime_ns for path in cache.glob("*.h5")} == stamps
    with pytest.raises(FercacheError, match=r"layer 1.*--force"):
        compute_audio([videos], cache, data, _options(encoder, dtype="float16", layer=1))
    forced = compute_audio(
        [videos], cache, data, _options(encoder, dtype="float16", layer=1, force=True)
    )
    assert forced.computed == ["a", "b", "c"]
    assert FeatureCache.open(cache).provenance["layer"] == 1


def test_two_subjects_get_the_same_sound_each_on_its_own_frames(encoder, tmp_path):
    video = write_video(tmp_path / "duo.mov", 30, 45, tone(1.5, 400, ENCODER_RATE))
    data = write_frame_tree(tmp_path / "data", {"duo_left": 45, "duo_right": 30})
    compute_audio([video], tmp_path / "cache", data, _options(encoder))
    cache = FeatureCache.open(tmp_path / "cache")
    left, right = cache.load("duo_left"), cache.load("duo_right")
    assert sorted(cache.videos) == ["duo_left", "duo_right"]
    assert len(left.frames) + len(left.missing_frames) == 45
    assert len(right.frames) + len(right.missing_frames) == 30
    assert np.array_equal(left.features[: len(right.frames)], right.features)


# --- errors ------------------------------------------------------------------------------------


def test_without_the_extra_or_offline_one_line_says_what_to_do_before_any_folder(
    encoder, tmp_path, monkeypatch
):
    videos, data = _three_videos(tmp_path)
    out = tmp_path / "out"

    def run(model: str):
        arguments = [str(videos), "--out", str(out), "--data", str(data), "--model", model]
        return runner.invoke(app, ["audio", *arguments, "--no-progress"])

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run("nobody/no-such-encoder")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "nobody/no-such-encoder" in line and "save_pretrained" in line
    assert "HF_HUB_OFFLINE=1" in line and not out.exists()

    result = run(str(data))  # a folder, but no model's
    assert result.exit_code == 2 and "not a complete save_pretrained folder" in result.stderr
    assert not out.exists()

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    result = run(str(encoder["folder"]))
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "pip install 'fercache[audio,video]'" in line and not out.exists()


def test_bad_options_are_refused_before_any_folder(encoder, tmp_path):
    videos, data = _three_videos(tmp_path)
    for overrides, message in (
        ({"layer": 3}, "hidden states 0 to 2"),
        ({"layer": -1}, "--layer -1"),
        ({"chunk": 0.0}, "--chunk"),
        ({"align": "cubic"}, "--align"),
    ):
        with pytest.raises(FercacheError, match=message):
            compute_audio([videos], tmp_path / "out", data, _options(encoder, **overrides))
    (videos / "stranger.mov").write_bytes((videos / "a.mov").read_bytes())
    with pytest.raises(FercacheError, match=r"'stranger'.*not a video of"):
        compute_audio([videos], tmp_path / "out", data, _options(encoder))
    assert not (tmp_path / "out").exists()
    assert audio_module.INSTALL_HINT.endswith("pip install 'fercache[audio,video]'")


def test_audio_of_other_options_into_a_cache_being_written_is_refused(encoder, tmp_path):
    videos, data = _three_videos(tmp_path)
    compute_audio([videos], tmp_path / "first", data, _options(encoder))
    cache = tmp_path / "cache"  # a first run has recorded its settings, written no store yet
    cache.mkdir()
    shutil.copy(tmp_path / "first" / PROVENANCE_NAME, cache)
    with pytest.raises(FercacheError, match=r"^\S+/cache: holds features of .*float32.*float16"):
        compute_audio([videos], cache, data, _options(encoder, dtype="float16"))
    assert sorted(path.name for path in cache.iterdir()) == [PROVENANCE_NAME]

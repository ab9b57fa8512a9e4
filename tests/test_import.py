"""`fercache import-features`: alignment against reference rules, CSV sources, missing frames,
the errors, and fusion with extracted caches in train and predict."""

import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from fercache.cli import app
from fercache.errors import FercacheError
from fercache.experiments.runs_table import runs_table
from fercache.features.importing import ImportOptions, import_features
from fercache.features.store import PROVENANCE_NAME, FeatureCache, read_manifest
from fercache.predictions.predict import PredictOptions, predict
from fercache.temporal.features import CacheSet, LazyFeatures, MemoryFeatures
from fercache.temporal.loop import TrainRequest, train
from tests.train_data import TINY_TEMPORAL, TreeSpec, write_cache, write_tree

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
FPS, RATE = 30.0, 50.0


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """A label tree (EXPR, frames without images) and a weak visual cache of it."""
    root = tmp_path_factory.mktemp("import")
    labels = write_tree(root / "data", TreeSpec(train_videos=6, val_videos=3, frames=250, seed=4))
    visual = write_cache(root / "visual", root / "data", labels, dim=8, signal=0.1, occluded=0.5)
    return {"root": root, "data": root / "data", "labels": labels, "visual": visual}


def _samples(frames: int) -> int:
    """Samples at RATE covering `frames` frames at FPS."""
    return int(np.ceil(frames / FPS * RATE))


def _signal(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(size=(count, 3)), axis=0)


def _import(source: Path, out: Path, data: Path, **options) -> FeatureCache:
    import_features(source, out, data, ImportOptions(progress=False, **options))
    return FeatureCache.open(out)


# --- alignment ------------------------------------------------------------------------------


@pytest.mark.parametrize("align", ["linear", "nearest"])
def test_a_50_hz_signal_on_30_fps_frames_equals_the_reference_rule(tree, tmp_path, align):
    frames = len(tree["labels"]["train00"])
    signal = _signal(_samples(frames))
    (tmp_path / "src").mkdir()
    np.save(tmp_path / "src" / "train00.npy", signal)

    cache = _import(
        tmp_path / "src", tmp_path / "out", tree["data"], rate=RATE, fps=FPS, align=align,
        dtype="float32",
    )  # fmt: skip
    stored = cache.load("train00")

    t = np.arange(frames) / FPS  # frame f at (f - 1) / fps
    s = np.arange(len(signal)) / RATE  # sample i at i / rate
    if align == "linear":
        covered = t <= s[-1]
        reference = np.stack([np.interp(t, s, column) for column in signal.T], axis=1)
    else:
        nearest = np.argmin(np.abs(t[:, None] - s[None, :]), axis=1)  # ties: the earlier one
        covered = np.abs(t - s[nearest]) <= 0.5 / RATE
        reference = signal[nearest]
    assert covered.all()  # the signal spans the video
    assert np.array_equal(stored.frames, np.flatnonzero(covered) + 1)
    assert np.array_equal(stored.features, reference[covered].astype(np.float32))
    assert stored.missing_frames is not None and len(stored.missing_frames) == 0
    provenance = cache.provenance
    assert (provenance["backbone"], provenance["source_kind"]) == ("", "npy")
    assert (provenance["rate"], provenance["fps"], provenance["align"]) == (RATE, FPS, align)


def test_gaps_nan_samples_and_a_short_source_are_missing_never_zero(tree, tmp_path):
    frames = len(tree["labels"]["train01"])
    signal = _signal(_samples(frames) - 20)  # 0.4 s short: inside the tolerance
    signal[100:103] = np.nan
    (tmp_path / "src").mkdir()
    np.save(tmp_path / "src" / "train01.npy", signal)

    cache = _import(tmp_path / "src", tmp_path / "out", tree["data"], rate=RATE, fps=FPS)
    stored = cache.load("train01")

    t = np.arange(frames) / FPS
    nearest = np.rint(t * RATE).astype(int)  # no ties between 1/30 and 1/50 steps
    expected = (nearest < len(signal)) & np.isin(nearest, [100, 101, 102], invert=True)
    assert np.array_equal(stored.frames, np.flatnonzero(expected) + 1)
    assert np.array_equal(stored.missing_frames, np.flatnonzero(~expected) + 1)
    assert np.isfinite(stored.features.astype(np.float32)).all()
    entry = read_manifest(tmp_path / "out")["videos"]["train01"]
    assert entry == {
        "rows": int(expected.sum()), "skipped": 0, "missing": int((~expected).sum()),
        "frames": frames, "fps": FPS,
    }  # fmt: skip


def _openface_csv(path: Path, rows: list[list], time_only: bool = False) -> None:
    header = ["frame", " face_id", " timestamp", " confidence", " success", " AU01_r", " AU12_r"]
    if time_only:
        header = ["timestamp", "AU01_r", "AU12_r", "name"]
    lines = [",".join(header), *(",".join(str(value) for value in row) for row in rows)]
    path.write_text("\n".join(lines) + "\n")


def test_a_csv_frame_column_maps_one_to_one(tree, tmp_path):
    frames = len(tree["labels"]["train02"])
    rng = np.random.default_rng(1)
    values = rng.normal(size=(frames, 2)).round(4)
    rows = []
    for frame in range(1, frames - 9):  # the last 10 frames have no row
        if 50 <= frame < 60:
            continue  # a gap
        success = 0 if frame in (20, 21) else 1
        au01 = "nan" if frame == 30 else values[frame - 1, 0]
        rows.append([frame, 0, (frame - 1) / FPS, 0.9, success, au01, values[frame - 1, 1]])
    (tmp_path / "src").mkdir()
    _openface_csv(tmp_path / "src" / "train02.csv", rows)

    cache = _import(tmp_path / "src", tmp_path / "out", tree["data"], dtype="float32")
    stored = cache.load("train02")

    missing = [20, 21, 30, *range(50, 60), *range(frames - 9, frames + 1)]
    covered = np.setdiff1d(np.arange(1, frames + 1), missing)
    assert np.array_equal(stored.missing_frames, missing)
    assert np.array_equal(stored.frames, covered)
    assert np.array_equal(stored.features, values[covered - 1].astype(np.float32))
    assert cache.provenance["align"] == "frame" and cache.provenance["time_column"] == "frame"


@pytest.mark.parametrize("align", ["nearest", "linear"])
def test_a_csv_time_column_places_rows_in_time(tree, tmp_path, align):
    frames = len(tree["labels"]["train03"])
    rng = np.random.default_rng(2)
    values = rng.normal(size=(frames, 2)).round(4)
    kept = [f for f in range(1, frames + 1) if not 100 <= f < 120]  # a gap of 20 frames
    rows = [[(f - 1) / FPS, values[f - 1, 0], values[f - 1, 1], "x"] for f in kept]
    rows[5][1] = ""  # an empty cell: a sample without features
    (tmp_path / "src").mkdir()
    _openface_csv(tmp_path / "src" / "train03.csv", rows, time_only=True)

    cache = _import(
        tmp_path / "src", tmp_path / "out", tree["data"], fps=FPS, align=align, dtype="float32"
    )
    stored = cache.load("train03")

    covered = np.setdiff1d(kept, [kept[5]])
    assert np.array_equal(stored.frames, covered)
    assert np.array_equal(stored.missing_frames, [kept[5], *range(100, 120)])
    assert np.array_equal(stored.features, values[covered - 1].astype(np.float32))
    assert cache.provenance["time_column"] == "timestamp" and cache.feature_dim == 2


def _two_subjects(tmp_path: Path) -> Path:
    """A tree of the videos v_left (90 frames) and v_right (96), and `src/v.npy` for both."""
    data = tmp_path / "data"
    folder = data / "Annotations" / "EXPR_Recognition_Challenge" / "Train_Set"
    folder.mkdir(parents=True)
    for video, count in (("v_left", 90), ("v_right", 96)):
        (folder / f"{video}.txt").write_text("Neutral\n" + "0\n" * count)
        (data / "cropped_aligned" / video).mkdir(parents=True)
        (data / "cropped_aligned" / video / "00001.jpg").touch()
    (tmp_path / "src").mkdir()
    np.save(tmp_path / "src" / "v.npy", _signal(_samples(96)))
    return data


def test_a_source_of_two_subjects_feeds_left_and_right_and_a_rerun_resumes(tmp_path):
    data = _two_subjects(tmp_path)
    cache = _import(tmp_path / "src", tmp_path / "out", data, rate=RATE, fps=FPS)
    assert sorted(cache.videos) == ["v_left", "v_right"]
    assert len(cache.load("v_left").frames) == 90 and len(cache.load("v_right").frames) == 96
    written = (tmp_path / "out" / "v_left.h5").stat().st_mtime_ns
    report = import_features(
        tmp_path / "src", tmp_path / "out", data,
        ImportOptions(rate=RATE, fps=FPS, progress=False),
    )  # fmt: skip
    assert sorted(report.resumed) == ["v_left", "v_right"] and report.imported == []
    assert (tmp_path / "out" / "v_left.h5").stat().st_mtime_ns == written
    # another alignment is another cache: refused without --force
    with pytest.raises(FercacheError, match="--force"):
        import_features(
            tmp_path / "src", tmp_path / "out", data,
            ImportOptions(rate=RATE, fps=FPS, align="linear", progress=False),
        )  # fmt: skip


def test_an_import_of_other_options_into_a_cache_being_imported_is_refused(tmp_path):
    data = _two_subjects(tmp_path)
    _import(tmp_path / "src", tmp_path / "first", data, rate=RATE, fps=FPS)
    cache = tmp_path / "cache"  # a first import has recorded its settings, written no store yet
    cache.mkdir()
    shutil.copy(tmp_path / "first" / PROVENANCE_NAME, cache)
    with pytest.raises(FercacheError, match=r"^\S+/cache: holds features of imported npy .*"
                       r"align nearest.*: align \"nearest\" there, \"linear\" here"):  # fmt: skip
        _import(tmp_path / "src", cache, data, rate=RATE, fps=FPS, align="linear")
    assert sorted(path.name for path in cache.iterdir()) == [PROVENANCE_NAME]


def test_video_dir_gives_each_video_its_own_fps_and_without_pyav_a_clear_error(
    tmp_path, monkeypatch
):
    av = pytest.importorskip("av")
    data = tmp_path / "data"
    folder = data / "Annotations" / "EXPR_Recognition_Challenge" / "Train_Set"
    folder.mkdir(parents=True)
    (folder / "clip.txt").write_text("Neutral\n" + "0\n" * 50)
    (data / "cropped_aligned" / "clip").mkdir(parents=True)
    videos = tmp_path / "videos"
    videos.mkdir()
    with av.open(str(videos / "clip.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(5):
            image = np.zeros((32, 32, 3), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (tmp_path / "src").mkdir()
    np.save(tmp_path / "src" / "clip.npy", _signal(100))  # 2 s at 50 Hz: 50 frames at 25 fps

    options = ImportOptions(rate=RATE, video_dir=videos, progress=False)
    import_features(tmp_path / "src", tmp_path / "out", data, options)
    assert read_manifest(tmp_path / "out")["videos"]["clip"]["fps"] == 25.0
    with h5py.File(tmp_path / "out" / "clip.h5") as store:
        assert store.attrs["video_fps"] == 25.0 and len(store["frames"]) == 50

    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(FercacheError, match=r"pip install 'fercache\[video\]'"):
        import_features(tmp_path / "src", tmp_path / "again", data, options)


# --- errors ---------------------------------------------------------------------------------


def _bad_inputs(root: Path, frames: int) -> dict[str, tuple[list[str], str]]:
    """name -> (command-line arguments after SRC, the video the error must name)."""
    cases = {}

    def folder(name: str) -> Path:
        path = root / name
        path.mkdir()
        return path

    np.save(folder("unknown") / "nosuch.npy", np.zeros((10, 2)))
    cases["unknown"] = (["--rate", "50", "--fps", "30"], "nosuch")
    np.save(folder("rate") / "train00.npy", np.zeros((_samples(frames), 2)))
    cases["rate"] = (["--rate", "100", "--fps", "30"], "train00")
    _openface_csv(folder("notime") / "train00.csv", [])
    (root / "notime" / "train00.csv").write_text("a,b\n1,2\n")
    cases["notime"] = ([], "train00")
    (folder("nonumbers") / "train00.csv").write_text("frame,name\n1,x\n2,y\n")
    cases["nonumbers"] = ([], "train00")
    (folder("word") / "train00.csv").write_text("frame,a\n1,0.5\n2,abc\n")
    cases["word"] = ([], "train00")
    np.save(folder("widths") / "train00.npy", np.zeros((_samples(frames), 2)))
    np.save(root / "widths" / "train01.npy", np.zeros((_samples(frames), 3)))
    cases["widths"] = (["--rate", "50", "--fps", "30"], "train01")
    np.save(folder("empty") / "train00.npy", np.zeros((0, 4)))
    cases["empty"] = (["--rate", "50", "--fps", "30"], "train00")
    return cases


def test_each_bad_input_is_one_line_naming_the_video_and_exit_2(tree, tmp_path):
    frames = len(tree["labels"]["train00"])
    cases = _bad_inputs(tmp_path, frames)
    for name, (arguments, video) in cases.items():
        out = tmp_path / f"out-{name}"
        command = [str(tmp_path / name), "--out", str(out), "--data", str(tree["data"])]
        result = runner.invoke(app, ["import-features", *command, *arguments, "--no-progress"])
        assert result.exit_code == 2, (name, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"'{video}'" in lines[0], (name, result.stderr)
        assert "Traceback" not in result.output
        assert not (out / "manifest.json").exists()


# --- fusion, training, prediction -----------------------------------------------------------


def _one_hot_audio(tree: dict, folder: Path, noise: float, seed: int, gap: bool) -> Path:
    """Per video: the EXPR one-hot of the frame each 50 Hz sample falls in, plus noise; with
    `gap`, a second of samples made NaN (so those frames are missing)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for video, labels in tree["labels"].items():
        count = _samples(len(labels))
        frame = np.minimum((np.arange(count) / RATE * FPS).astype(int), len(labels) - 1)
        hot = np.zeros((count, 8))
        valid = labels[frame] >= 0
        hot[np.flatnonzero(valid), labels[frame][valid]] = 1.0
        signal = hot + noise * rng.normal(size=hot.shape)
        if gap:
            signal[100:150] = np.nan
        np.save(folder / f"{video}.npy", signal)
    return folder


def _request(epochs: int, memory_budget: str = "auto") -> TrainRequest:
    overrides = (*TINY_TEMPORAL, "lr=1e-2", "clip_frames=32")  # enough steps in a few epochs
    return TrainRequest(
        overrides=overrides, epochs=epochs, seed=0, device="cpu", progress=False,
        memory_budget=memory_budget,
    )  # fmt: skip


@pytest.fixture(scope="module")
def audio(tree) -> Path:
    """An imported cache with the labels' signal and a missing second in every video."""
    source = _one_hot_audio(tree, tree["root"] / "audio-src", noise=0.6, seed=5, gap=True)
    out = tree["root"] / "audio"
    import_features(source, out, tree["data"], ImportOptions(rate=RATE, fps=FPS, progress=False))
    return out


def test_fused_rows_leave_out_missing_frames_in_memory_and_lazily(tree, audio):
    caches = CacheSet.open([tree["visual"], audio])
    names = ["train00", "val01"]
    memory = MemoryFeatures.load(caches, names, progress=False)
    lazy = LazyFeatures.open(caches, names, progress=False)
    for index, name in enumerate(names):
        visual = FeatureCache.open(tree["visual"]).load(name)
        imported = FeatureCache.open(audio).load(name)
        expected = np.setdiff1d(visual.frames, imported.missing_frames)
        assert len(expected) < len(visual.frames)  # the gap removed some rows
        assert np.array_equal(memory.frames(index), expected)
        assert np.array_equal(lazy.frames(index), expected)
        rows = memory.whole(index)
        assert rows.shape == (len(expected), 16)
        at = np.searchsorted(visual.frames, expected)
        assert np.array_equal(rows[:, :8], visual.features[at])
        at = np.searchsorted(imported.frames, expected)
        assert np.array_equal(rows[:, 8:], imported.features[at].astype(np.float16))
        for start, stop in ((0, 64), (40, 130), (len(expected) - 5, len(expected))):
            assert np.array_equal(lazy.window(index, start, stop), rows[start:stop])
        # imported first: the same rows (the extracted cache's frames), columns swapped
        swapped = CacheSet.open([audio, tree["visual"]]).read(name)
        assert np.array_equal(swapped.frames, expected)
        assert np.array_equal(swapped.features, np.concatenate([rows[:, 8:], rows[:, :8]], 1))


def test_an_imported_cache_lacking_a_frame_it_does_not_record_is_refused(tree, audio, tmp_path):
    copy = tmp_path / "audio"
    copy.mkdir()
    for path in audio.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    with h5py.File(copy / "train00.h5", "a") as store:
        store.attrs["missing_frames"] = store.attrs["missing_frames"][1:]
    with pytest.raises(FercacheError, match=r"video 'train00'.*neither holds nor records"):
        CacheSet.open([tree["visual"], copy]).read("train00")


def test_training_on_a_visual_and_an_imported_cache_runs_and_predicts(tree, audio, tmp_path):
    run = tmp_path / "run"
    summary = train([tree["visual"], audio], tree["data"], run, _request(1, memory_budget="0M"))
    assert summary["feature_dim"] == 16 and not summary["features_in_memory"]
    model = json.loads((run / "model.json").read_text())
    caches = [(cache["backbone"], cache["source_kind"]) for cache in model["caches"]]
    assert caches == [("synthetic-prototypes", ""), ("", "npy")]
    assert [row["run"] for row in runs_table(run).rows] == ["."]

    options = PredictOptions(split="val", data=tree["data"], progress=False)
    predictions = predict(run, [tree["visual"], audio], tmp_path / "val.h5", options)
    for video, predicted in predictions.videos.items():
        labels = tree["labels"][video]
        assert np.array_equal(predicted.frames, np.arange(1, len(labels) + 1))
        imported = FeatureCache.open(audio).load(video)
        has_image = set(FeatureCache.open(tree["visual"]).load(video).frames.tolist())
        has_image -= set(imported.missing_frames.tolist())
        assert set(predicted.frames[predicted.has_image].tolist()) == has_image


def test_fusing_an_imported_cache_with_the_labels_signal_beats_the_visual_cache(tree, audio):
    root = tree["root"]
    visual = train([tree["visual"]], tree["data"], root / "visual-run", _request(8))
    fused = train([tree["visual"], audio], tree["data"], root / "fused-run", _request(8))
    # about 0.1 (chance) against 0.3-0.6 over tree and training seeds; these seeds are fixed
    assert fused["best_val_f1"] > visual["best_val_f1"] + 0.2, (visual, fused)

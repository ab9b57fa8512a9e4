"""`fercache analyse`: crop -> extract -> predict -> smooth on a video, then CSV, PNG and MP4."""

import csv
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage.data import astronaut
from typer.testing import CliRunner

from fercache.backbone.network import DataConfig
from fercache.cli import app
from fercache.data.tasks import AU_NAMES, EXPR, EXPR_CLASSES
from fercache.errors import FercacheError
from fercache.experiments import analyse as analyse_module
from fercache.experiments.analyse import AnalyseOptions, analyse
from fercache.features.extract import ExtractOptions, extract
from fercache.framewise.pred_file import Predictions, VideoPredictions
from fercache.predictions.smooth import smooth_predictions
from fercache.pretrain.export import export_model, model_config
from fercache.temporal.loop import TrainRequest, train
from fercache.video import crop as crop_module
from tests.holder import another_process_holding
from tests.train_data import ANNOTATIONS, TINY_TEMPORAL

FRAMES, FPS, SIDE, FACE = 36, 12, 160, (40, 20, 120, 110)  # face box of frame 1 (x0, y0, x1, y1)
NO_FACE = {5, 6, 7, 8, 20}  # frames the fake crop finds no face in
runner = CliRunner()


def _shift(frame: int) -> int:
    return (frame - 1) % 12  # the face moves right by a pixel a frame, then jumps back


def _box(frame: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = FACE
    return (x0 + _shift(frame), y0, x1 + _shift(frame), y1)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """A small MP4 of the astronaut's face moving a little."""
    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    photo = astronaut()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        for frame in range(1, FRAMES + 1):
            left = 150 - _shift(frame)
            image = photo[0:SIDE, left : left + SIDE]
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _export(path: Path, seed: int = 0, classes: int = len(EXPR_CLASSES)) -> Path:
    """A random-init resnet10t exported like `fercache pretrain` exports a student."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=classes).eval()
    data_config = DataConfig((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    return export_model(model, model_config("resnet10t", data_config, "supervised"), path)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A random-init EXPR student exported like `fercache pretrain` exports one."""
    return _export(tmp_path_factory.mktemp("student") / "student.safetensors")


class _FaceDetector:
    """MTCNN's `detect` contract without the network: the face of frame 1 (FACE) in every
    frame, with its five landmarks, so that the real crop stage runs in a moment."""

    def __init__(self, **_) -> None:
        pass

    def detect(self, batch, landmarks=True):
        points = np.array([[[65, 55], [95, 55], [80, 70], [68, 90], [92, 90]]], dtype=float)
        box, prob = np.array([FACE], dtype=float), np.array([0.99])
        return [box] * len(batch), [prob] * len(batch), [points] * len(batch)


@pytest.fixture
def fake_detector(monkeypatch) -> None:
    monkeypatch.setattr(crop_module, "_detector_class", lambda: _FaceDetector)


def _refuse_to_load(**_):
    raise AssertionError("the face detector was loaded")


def _no_crop(videos, data, options):
    raise AssertionError("the crop ran")


def _fake_crop(videos: list[Path], data: Path, options: AnalyseOptions):
    """`crop_videos`' contract without face detection: the known box, resized, on every frame
    but NO_FACE."""
    crops = []
    for video in videos:
        folder = data / "cropped_aligned" / video.stem
        folder.mkdir(parents=True, exist_ok=True)
        boxes = {}
        with av.open(str(video)) as container:
            for number, frame in enumerate(container.decode(video=0), start=1):
                if number in NO_FACE:
                    continue
                boxes[number] = _box(number)
                face = frame.to_image().crop(boxes[number]).resize((options.size,) * 2)
                face.save(folder / f"{number:05d}.jpg")
        crops.append(
            SimpleNamespace(
                name=video.stem,
                frames=number,
                found=len(boxes),
                missing=number - len(boxes),
                fps=float(FPS),
                boxes=boxes,
            )
        )
    return SimpleNamespace(videos=crops, failed=[], skipped=[])


def _options(**overrides) -> AnalyseOptions:
    settings = dict(size=48, batch=16, workers=0, device="cpu", window=5, progress=False)
    return AnalyseOptions(**{**settings, **overrides})


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_analyse_writes_a_csv_a_timeline_and_an_annotated_video(
    video, student, tmp_path, monkeypatch
):
    monkeypatch.setattr(analyse_module, "_crop", _fake_crop)
    out = tmp_path / "out"
    report = analyse([video], student, out, _options(annotate=True))

    rows = _rows(out / "clip.csv")
    assert [int(row["frame"]) for row in rows] == list(range(1, FRAMES + 1))
    assert float(rows[3]["time_s"]) == pytest.approx(3 / FPS, abs=1e-3)
    assert {int(row["frame"]) for row in rows if row["face_found"] == "0"} == NO_FACE
    probabilities = np.array([[float(row[f"p_{c}"]) for c in EXPR_CLASSES] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert [row["label"] for row in rows] == [EXPR_CLASSES[i] for i in probabilities.argmax(1)]
    assert not any(name.startswith(("au_", "valence")) for name in rows[0])

    smoothed = smooth_predictions(out / "work" / "predictions.h5", tmp_path / "mine.h5", 5)
    expected = [EXPR_CLASSES[i] for i in smoothed.videos["clip"].labels]
    assert [row["smoothed_label"] for row in rows] == expected
    assert Predictions.read(report.predictions).smoothing == ({"window": 5, "mode": "centered"},)

    with Image.open(out / "clip.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    with av.open(str(out / "clip.annotated.mp4")) as annotated:
        frames = list(annotated.decode(video=0))
    assert len(frames) == FRAMES and (frames[0].width, frames[0].height) == (SIDE, SIDE)
    assert set(report.written) == {
        out / "clip.csv",
        out / "clip.png",
        out / "clip.annotated.mp4",
    }
    assert not list(out.glob(".*tmp-*"))


def test_cli_analyse_and_its_errors(video, student, tmp_path, monkeypatch):
    monkeypatch.setattr(analyse_module, "_crop", _fake_crop)
    out = tmp_path / "out"
    args = ["analyse", str(video), "--checkpoint", str(student), "--out", str(out)]
    options = ["--size", "48", "--batch", "16", "--device", "cpu", "--window", "3", "--no-progress"]
    result = runner.invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    assert "clip.csv" in result.output and (out / "clip.png").is_file()
    assert not (out / "clip.annotated.mp4").exists()

    missing = runner.invoke(app, ["analyse", str(tmp_path / "nope.mp4"), *args[2:]])
    assert missing.exit_code == 2 and "no such video file" in missing.output
    assert "Traceback" not in missing.output

    for option, value in (("--window", "0"), ("--window", str(2**40)), ("--weights", "last")):
        refused = runner.invoke(app, [*args, option, value])
        assert refused.exit_code == 2, refused.output
        assert refused.stderr.startswith(f"error: Invalid value for '{option}'")
        assert len(refused.stderr.splitlines()) == 1


def test_real_crop_finds_the_face_and_a_rerun_reuses_it(video, student, tmp_path):
    crop = pytest.importorskip("fercache.video.crop")
    out = tmp_path / "out"
    analyse([video], student, out, _options(size=48))
    (found,) = crop.read_crop_record(out / "work" / "data", "clip")
    rows = _rows(out / "clip.csv")
    assert len(rows) == found.frames == FRAMES and found.found > FRAMES // 2
    faces = {int(row["frame"]) for row in rows if row["face_found"] == "1"}
    on_disk = {int(p.stem) for p in (out / "work/data/cropped_aligned/clip").glob("*.jpg")}
    assert faces == on_disk == set(found.boxes)

    report = analyse([video], student, out, _options(size=48, annotate=True))
    assert out / "clip.annotated.mp4" in report.written
    with av.open(str(out / "clip.annotated.mp4")) as annotated:
        assert sum(1 for _ in annotated.decode(video=0)) == FRAMES


def test_a_temporal_run_trained_on_the_students_cache(video, student, tmp_path, monkeypatch):
    """--run: predictions come from a temporal run trained on a cache of the same checkpoint."""
    tree = tmp_path / "tree"
    _fake_crop([video], tree, _options())
    images = tree / "cropped_aligned"
    shutil.copytree(images / "clip", images / "other")
    rng = np.random.default_rng(0)
    for split, name in (("Train_Set", "clip"), ("Validation_Set", "other")):
        folder = tree / ANNOTATIONS / split
        folder.mkdir(parents=True)
        labels = rng.integers(0, len(EXPR_CLASSES), FRAMES)
        (folder / f"{name}.txt").write_text("\n".join([EXPR.header, *map(str, labels)]) + "\n")
    cache = tmp_path / "cache"
    extract(tree, cache, ExtractOptions(checkpoint=student, workers=0, progress=False))
    run = tmp_path / "run"
    request = TrainRequest(overrides=TINY_TEMPORAL, epochs=1, device="cpu", progress=False)
    train([cache], tree, run, request)

    monkeypatch.setattr(analyse_module, "_crop", _fake_crop)
    out = tmp_path / "out"
    args = [str(video), "--checkpoint", str(student), "--out", str(out), "--run", str(run)]
    options = ["--weights", "final", "--size", "48", "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, ["analyse", *args, *options])
    assert result.exit_code == 0, result.output

    source = Predictions.read(out / "work" / "smoothed.h5").source
    assert source.startswith(f"temporal run {run} (final weights)")
    rows = _rows(out / "clip.csv")
    assert len(rows) == FRAMES and (out / "clip.png").is_file()
    probabilities = np.array([[float(row[f"p_{c}"]) for c in EXPR_CLASSES] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)

    # another student's features are not the run's: refused before the crop, in analyse's words
    monkeypatch.setattr(analyse_module, "_crop", _no_crop)
    other = _export(tmp_path / "other" / "student.safetensors", seed=1)
    with pytest.raises(FercacheError, match=f"--run {run}: trained on features") as refused:
        analyse([video], other, tmp_path / "out2", _options(run=run))
    assert "--backbone" not in str(refused.value) and "--cache" not in str(refused.value)
    assert not (tmp_path / "out2").exists()


def test_the_csv_has_au_and_va_columns_when_the_predictions_do():
    rows = VideoPredictions.from_probabilities(
        np.array([1, 2, 4]),
        np.full((3, 8), 1 / 8),
        np.array([True, False, True]),
        au=np.full((3, 12), 0.25),
        va=np.zeros((3, 2)),
    )
    text = analyse_module.table(rows, rows, fps=2.0)
    header, *lines = list(csv.reader(text.splitlines()))
    assert header[-14:] == [*(f"au_{name}" for name in AU_NAMES), "valence", "arousal"]
    assert [line[:3] for line in lines] == [
        ["1", "0.000", "1"],
        ["2", "0.500", "0"],
        ["4", "1.500", "1"],
    ]


def test_two_subjects_get_a_csv_each_and_share_the_annotated_video(
    video, student, tmp_path, monkeypatch
):
    def two_subjects(videos, data, options):
        report = _fake_crop(videos, data, options)
        (one,) = report.videos
        images = data / "cropped_aligned"
        (images / "clip").rename(images / "clip_left")
        shutil.copytree(images / "clip_left", images / "clip_right")
        report.videos = [
            SimpleNamespace(**{**vars(one), "name": f"clip_{side}"}) for side in ("left", "right")
        ]
        return report

    monkeypatch.setattr(analyse_module, "_crop", two_subjects)
    out = tmp_path / "out"
    report = analyse([video], student, out, _options(annotate=True, subjects=2))
    assert sorted(path.name for path in report.written) == [
        "clip.annotated.mp4",
        "clip_left.csv",
        "clip_left.png",
        "clip_right.csv",
        "clip_right.png",
    ]
    assert _rows(out / "clip_left.csv") == _rows(out / "clip_right.csv")


def test_a_broken_video_fails_on_stderr_and_a_rerun_replaces_all_outputs(
    video, student, tmp_path, fake_detector
):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(video, videos / "clip.mp4")
    (videos / "broken.mp4").write_text("not a video\n" * 50)
    out = tmp_path / "out"
    args = ["analyse", str(videos), "--checkpoint", str(student), "--out", str(out)]
    result = runner.invoke(app, [*args, "--size", "48", "--annotate", "--device", "cpu"])
    assert result.exit_code == 1, result.output  # as `crop` on the same folder
    assert result.stderr.splitlines() == [
        f"failed: {videos / 'broken.mp4'}: unreadable video (Invalid data found when "
        "processing input)"
    ]
    assert "broken.mp4" not in result.stdout and f"wrote {out / 'clip.csv'}" in result.stdout
    assert (out / "clip.annotated.mp4").is_file()

    # without --annotate the earlier annotated video would contradict the new CSV: it goes
    report = analyse([videos / "clip.mp4"], student, out, _options(window=3))
    assert sorted(path.name for path in report.written) == ["clip.csv", "clip.png"]
    assert sorted(path.name for path in out.iterdir()) == ["clip.csv", "clip.png", "work"]

    with pytest.raises(FercacheError, match="cropped with --size 48, not as asked") as refused:
        analyse([videos / "clip.mp4"], student, out, _options(size=64))
    assert "give another --out, or delete this record" in str(refused.value)


def test_unreadable_videos_and_a_file_as_out_are_said_before_any_work(
    video, student, tmp_path, monkeypatch
):
    monkeypatch.setattr(crop_module, "_detector_class", lambda: _refuse_to_load)
    empty, text = tmp_path / "empty.mp4", tmp_path / "text.mp4"
    empty.write_bytes(b"")
    text.write_text("a text file renamed .mp4\n" * 50)
    for bad, why in ((empty, "empty file, not a video"), (text, "unreadable video (Invalid")):
        out = tmp_path / f"out-{bad.stem}"
        result = runner.invoke(
            app, ["analyse", str(bad), "--checkpoint", str(student), "--out", str(out)]
        )
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(f"failed: {bad}: {why}")
        assert "no face" not in result.output

    taken = tmp_path / "taken"
    taken.write_text("")
    result = runner.invoke(
        app, ["analyse", str(video), "--checkpoint", str(tmp_path / "nope"), "--out", str(taken)]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: --out {taken}: it is a file, not a folder")


def test_the_checkpoint_is_checked_before_the_crop(video, student, tmp_path, monkeypatch):
    monkeypatch.setattr(analyse_module, "_crop", _no_crop)
    plain = tmp_path / "plain.pt"  # a resnet10t without its model config: taken for resnet50
    torch.save(timm.create_model("resnet10t", num_classes=8).state_dict(), plain)
    with pytest.raises(FercacheError, match="does not match backbone 'resnet50'") as refused:
        analyse([video], plain, tmp_path / "out", _options())
    advice = "analyse builds the network its model config names (resnet50 without one)"
    assert advice in str(refused.value) and "--backbone" not in str(refused.value)

    five = _export(tmp_path / "five.safetensors", classes=5)
    with pytest.raises(FercacheError, match="has 5 output classes, not the 8 EXPR classes"):
        analyse([video], five, tmp_path / "out", _options())

    run = tmp_path / "pretrain-run"  # `fercache pretrain --recipe mpl` exports both networks
    run.mkdir()
    for name in ("student", "teacher"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(student.with_suffix(suffix), run / f"{name}{suffix}")
    with pytest.raises(FercacheError, match="the teacher that `fercache pretrain` exported") as e:
        analyse([video], run / "teacher.safetensors", tmp_path / "out", _options())
    assert str(e.value).endswith(f"give --checkpoint {run / 'student.safetensors'}")
    assert not (tmp_path / "out").exists()


def test_the_timeline_is_titled_its_legend_runs_as_the_stack_and_no_face_is_marked():
    has_image = np.array([True, False, False, True, True, False])
    probabilities = np.tile(np.eye(8)[[0, 1, 2, 3, 4, 5]], 1).astype(np.float32)
    rows = VideoPredictions.from_probabilities(np.arange(1, 7), probabilities, has_image)
    figure = analyse_module.timeline_figure(rows, rows, 2.0, "clip: student s.safetensors")
    top, strip = figure.axes[:2]
    assert top.get_title() == "clip: student s.safetensors"
    legend = [text.get_text() for text in top.get_legend().get_texts()]
    assert legend == [*reversed(EXPR_CLASSES), "no face: filled from the nearest faces"]
    for axes in (top, strip):
        bands = [patch for patch in axes.patches if patch.get_hatch() == "//"]
        spans = sorted((band.get_x(), band.get_x() + band.get_width()) for band in bands)
        assert spans == [(0.5, 1.5), (2.5, 3.0)]  # frames 2-3 and 6, half a second each


def test_an_out_another_live_process_analyses_into_is_refused_before_the_crop(
    video, student, tmp_path, monkeypatch
):
    monkeypatch.setattr(analyse_module, "_crop", _no_crop)
    out = tmp_path / "out"
    out.mkdir()
    with another_process_holding(out) as pid:
        with pytest.raises(FercacheError, match=f"pid {pid} is writing an analysis"):
            analyse([video], student, out, _options())
        assert [path.name for path in out.iterdir()] == [".run.claim"]  # the holder's, alone


def use_the_test_detector() -> None:
    """The killed analysis's set-up (tests/killed_mid_write.py --setup): `_FaceDetector`."""
    crop_module._detector_class = lambda: _FaceDetector


def test_a_killed_analysis_reruns_to_whole_outputs_and_leaves_nothing_of_it(
    video, student, tmp_path, fake_detector
):
    out = tmp_path / "out"
    options = ["--size=48", "--batch=16", "--window=5", "--device=cpu", "--no-progress"]
    analysis = ["analyse", video, f"--checkpoint={student}", f"--out={out}", *options]
    # killed once the timeline PNG is written, before its rename: the CSV is written by then
    killer = ["-m", "tests.killed_mid_write", out / "clip.png"]
    setup = ["--setup", "tests.test_analyse:use_the_test_detector"]
    child = subprocess.run([sys.executable, *map(str, [*killer, *setup, *analysis])],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    (leftover,) = out.glob(".clip.png.tmp-*")
    assert sorted(path.name for path in out.iterdir()) == [
        leftover.name,
        ".run.claim",  # the dead process's hold
        "clip.csv",
        "work",
    ]

    report = analyse([video], student, out, _options())

    assert sorted(path.name for path in report.written) == ["clip.csv", "clip.png"]
    assert sorted(path.name for path in out.iterdir()) == ["clip.csv", "clip.png", "work"]

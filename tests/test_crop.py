"""`fercache crop`: videos made here with PyAV (a real face photograph moved about, blanked
frames, two faces, the generator's drawn faces), cropped, aligned, recorded and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fercache.cli import app
from fercache.errors import FercacheError
from fercache.video import crop as crop_module
from fercache.video.crop import (
    IMAGES_DIRNAME,
    INSTALL_HINT,
    LANDMARK_WEIGHTS,
    PARTIAL_DIRNAME,
    CropOptions,
    _device,
    align,
    apply,
    crop_videos,
    read_crop_record,
    record_path,
    similarity,
    template,
)

av = pytest.importorskip("av")
facenet = pytest.importorskip("facenet_pytorch")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
OPTIONS = CropOptions(progress=False, device="cpu", batch=16)
BLANK = range(20, 25)  # 0-based frames with the face painted over


def _face() -> np.ndarray:
    """The astronaut's head (a photograph shipped with scikit-image)."""
    return skimage_data.astronaut()[20:230, 140:310]


def _place(canvas: np.ndarray, patch: np.ndarray, left: int, top: int, height: int) -> None:
    width = round(height * patch.shape[1] / patch.shape[0])
    resized = np.asarray(Image.fromarray(patch).resize((width, height), Image.BILINEAR))
    canvas[top : top + height, left : left + width] = resized


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 25) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _astronaut_video(path: Path, frames: int = 40, blank=BLANK) -> Path:
    face, out = _face(), []
    for i in range(frames):
        canvas = np.full((176, 240, 3), 110, np.uint8)
        _place(
            canvas, face, left=20 + 2 * abs(i % 80 - 40), top=10 + i % 7, height=120 + (i % 10) * 3
        )
        if i in blank:
            canvas[:] = 110
        out.append(canvas)
    return _write_video(path, out)


def _two_face_video(path: Path, frames: int = 30) -> Path:
    face = _face()
    tinted = face.copy()
    tinted[..., 2] = (tinted[..., 2] * 0.3).astype(np.uint8)  # the left person: less blue
    out = []
    for i in range(frames):
        canvas = np.full((144, 256, 3), 110, np.uint8)
        shift = round(6 * np.sin(i / 4))
        _place(canvas, tinted, left=14 + shift, top=10, height=120)
        _place(canvas, face, left=138 - shift, top=12, height=120)
        out.append(canvas)
    return _write_video(path, out)


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> Path:
    return _astronaut_video(tmp_path_factory.mktemp("videos") / "astro.mp4")


@pytest.fixture(scope="module")
def cropped(astronaut, tmp_path_factory):
    out = tmp_path_factory.mktemp("crop")
    return out, crop_videos([astronaut], out, OPTIONS)


# the alignment itself


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = scale * points @ rotation.T + shift
    assert np.allclose(apply(similarity(points, moved), points), moved)


def test_template_has_level_eyes_and_margin_shrinks_the_face():
    points = template(112, 0.0)
    assert points[0, 1] == points[1, 1]
    assert np.isclose((points[0, 0] + points[1, 0]) / 2, 56)
    wide = template(224, 0.5)
    eye_gap = wide[1, 0] - wide[0, 0]
    assert np.isclose(eye_gap, 2 * (points[1, 0] - points[0, 0]) / 1.5)


def test_align_puts_marked_points_on_the_template():
    image = np.zeros((200, 300, 3), np.uint8)
    source = np.array([[100, 80], [150, 90], [120, 120], [105, 145], [145, 150]], float)
    for x, y in source[:2]:
        image[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = 255
    crop = np.asarray(align(Image.fromarray(image), source, 112, template()))
    expected = apply(similarity(source, template(), LANDMARK_WEIGHTS), source[:2])
    for x, y in expected:
        assert crop[round(y), round(x)].max() > 100


# a real face


def test_the_face_is_found_and_aligned(cropped):
    out, report = cropped
    assert report.failed == [] and report.skipped == []
    (video,) = report.videos
    assert video.name == "astro" and video.frames == 40 and video.fps == 25
    written = sorted(p.name for p in (out / IMAGES_DIRNAME / "astro").iterdir())
    assert written == [f"{f:05d}.jpg" for f in sorted(video.boxes)]
    shown = [f for f in range(1, 41) if f - 1 not in BLANK]
    assert sum(f in video.boxes for f in shown) >= 0.95 * len(shown)
    assert Image.open(out / IMAGES_DIRNAME / "astro" / written[0]).size == (112, 112)
    from facenet_pytorch import MTCNN

    detector = MTCNN(keep_all=True, device="cpu")
    target = template()
    frames = sorted(video.boxes)
    crops = [
        np.asarray(Image.open(out / IMAGES_DIRNAME / "astro" / f"{f:05d}.jpg")) for f in frames
    ]
    _, _, landmarks = detector.detect(crops, landmarks=True)
    for found in landmarks:
        eyes = found[0][:2]
        assert np.abs(eyes - target[:2]).max() < 3.0, (eyes, target[:2])


def test_blanked_frames_are_left_out_and_recorded(cropped):
    out, report = cropped
    (video,) = report.videos
    for frame in (f + 1 for f in BLANK):
        assert video.reasons[frame] == "no face"
        assert not (out / IMAGES_DIRNAME / "astro" / f"{frame:05d}.jpg").exists()
    record = json.loads(record_path(out, "astro").read_text())
    assert record["frames"] == 40 and record["fps"] == 25
    (subject,) = record["subjects"]
    assert subject["missing"]["21"] == "no face"
    assert subject["found"] == video.found == len(subject["boxes"])
    assert video.missing == 40 - video.found
    x1, y1, x2, y2 = video.boxes[1]
    assert 20 <= x1 < x2 <= 240 and 0 <= y1 < y2 <= 176  # source pixels


def test_inspect_and_extract_read_the_crops(cropped, tmp_path):
    out, _ = cropped
    result = runner.invoke(app, ["inspect", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 image folders" in result.output and "astro" in result.output
    result = runner.invoke(
        app,
        [
            "extract", str(out), "--out", str(tmp_path / "cache"), "--backbone", "test_resnet",
            "--input-size", "64", "--device", "cpu", "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "astro.h5").is_file()


def test_a_rerun_skips_finished_videos(cropped, astronaut):
    out, _ = cropped
    before = (out / IMAGES_DIRNAME / "astro" / "00001.jpg").stat().st_mtime_ns
    report = crop_videos([astronaut.parent], out, OPTIONS)
    assert report.skipped == [str(astronaut)] and report.videos == []
    assert (out / IMAGES_DIRNAME / "astro" / "00001.jpg").stat().st_mtime_ns == before
    assert read_crop_record(out, "astro")[0].found == len(
        list((out / IMAGES_DIRNAME / "astro").iterdir())
    )


# two people, the generator's faces


def test_two_subjects_keep_their_sides(tmp_path):
    video = _two_face_video(tmp_path / "pair.mp4")
    report = crop_videos(
        [video], tmp_path / "out", CropOptions(**{**OPTIONS.__dict__, "subjects": 2})
    )
    names = [v.name for v in report.videos]
    assert names == ["pair_left", "pair_right"]
    for crop in report.videos:
        assert crop.found >= 27
        folder = tmp_path / "out" / IMAGES_DIRNAME / crop.name
        for path in sorted(folder.iterdir()):
            pixels = np.asarray(Image.open(path)).astype(float)
            blue_share = pixels[..., 2].mean() / pixels.mean()
            assert (blue_share < 0.7) == (crop.name == "pair_left"), (path, blue_share)
    left, right = report.videos
    assert all(left.boxes[f][0] < right.boxes[f][0] for f in set(left.boxes) & set(right.boxes))


def test_one_person_is_followed_not_the_largest_face(tmp_path):
    face, frames = _face(), []
    for i in range(30):
        canvas = np.full((176, 256, 3), 110, np.uint8)
        _place(canvas, face, left=10 + i, top=40, height=90)
        if i >= 10:  # a larger face comes in on the right and stays
            _place(canvas, face, left=108, top=4, height=165)
        frames.append(canvas)
    video = _write_video(tmp_path / "crowd.mp4", frames)
    (crop,) = crop_videos([video], tmp_path / "out", OPTIONS).videos
    assert crop.found >= 28
    assert all(box[2] < 125 for box in crop.boxes.values())  # always the small face on the left


def test_the_generators_drawn_faces_run_through(synthetic_tree, tmp_path):
    folder = sorted(p for p in (synthetic_tree / IMAGES_DIRNAME).iterdir() if p.is_dir())[0]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))[:30]]
    frames = [np.asarray(Image.fromarray(f).resize((160, 160))) for f in frames]
    video = _write_video(tmp_path / "drawn.mp4", frames)
    report = crop_videos([video], tmp_path / "out", OPTIONS)
    (crop,) = report.videos
    assert crop.frames == 30 and crop.found + crop.missing == 30
    assert set(crop.reasons.values()) <= {"no face", "track lost"}
    # MTCNN finds no face in these drawings at the default confidence (seen: 0 of 30): every
    # frame is then recorded as missing and no empty folder is left for extract to trip over
    folder = tmp_path / "out" / IMAGES_DIRNAME / "drawn"
    assert folder.is_dir() == (crop.found > 0)
    assert len(list(folder.glob("*.jpg"))) == crop.found
    assert record_path(tmp_path / "out", "drawn").is_file()


# failures


def test_a_bad_video_is_reported_and_the_others_done(astronaut, tmp_path):
    bad = tmp_path / "videos" / "broken.mp4"
    bad.parent.mkdir()
    bad.write_bytes(b"not a video at all" * 100)
    good = _astronaut_video(tmp_path / "videos" / "good.mp4", frames=12, blank=())
    result = runner.invoke(app, ["crop", str(bad.parent), "--out", str(tmp_path / "out"),
                                 "--device", "cpu", "--no-progress"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "broken.mp4" in result.output and "good" in result.output
    assert (tmp_path / "out" / IMAGES_DIRNAME / "good" / "00001.jpg").is_file()
    assert not (tmp_path / "out" / IMAGES_DIRNAME / "broken").exists()
    assert not (tmp_path / "out" / PARTIAL_DIRNAME).exists()
    assert good.is_file()


def test_an_absent_cuda_device_is_refused_and_auto_falls_back(astronaut, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    options = CropOptions(**{**OPTIONS.__dict__, "device": "cuda"})
    with pytest.raises(FercacheError, match="no CUDA device"):
        crop_videos([astronaut], tmp_path, options)
    assert _device("auto").type == "cpu"


def test_without_the_video_extra_one_line_says_how_to_install(astronaut, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    result = runner.invoke(app, ["crop", str(astronaut), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert INSTALL_HINT in result.output and "Traceback" not in result.output
    assert "pip install 'fercache[video]'" in INSTALL_HINT


def test_a_killed_crop_leaves_no_partial_folder_and_the_rerun_completes(tmp_path):
    video = _astronaut_video(tmp_path / "long.mp4", frames=150, blank=())
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fercache", "crop", str(video), f"--out={out}",
               "--device=cpu", "--batch=4", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    partial = out / PARTIAL_DIRNAME
    while time.monotonic() < deadline and not list(partial.glob("long.tmp-*/00008.jpg")):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / IMAGES_DIRNAME / "long").exists()
    assert not record_path(out, "long").exists()

    report = crop_videos([video], out, OPTIONS)
    (crop,) = report.videos
    assert crop.frames == 150 and crop.found >= 140
    assert not partial.exists()  # the killed run's leftovers are gone
    assert len(list((out / IMAGES_DIRNAME / "long").iterdir())) == crop.found
    uninterrupted = tmp_path / "uninterrupted"
    crop_videos([video], uninterrupted, OPTIONS)
    assert _crop_files(out) == _crop_files(uninterrupted)  # as if never killed


def _crop_files(out: Path) -> dict:
    """Every crop's bytes and the record (but for its wall time), by path under `out`."""
    files = {p.relative_to(out): p.read_bytes() for p in (out / IMAGES_DIRNAME).rglob("*.jpg")}
    record = json.loads(record_path(out, "long").read_text())
    record.pop("seconds")
    return {**files, "record": record}


class _OneFaceDetector:
    """MTCNN's `detect` contract with one confident face in every frame, no network."""

    def __init__(self, **_) -> None:
        pass

    def detect(self, batch, landmarks=True):
        box = np.array([[4.0, 4.0, 28.0, 28.0]])
        points = np.array([[[10.0, 12.0], [22.0, 12.0], [16.0, 17.0], [11.0, 22.0], [21.0, 22.0]]])
        return [box] * len(batch), [np.array([0.99])] * len(batch), [points] * len(batch)


def _refuse_to_load(**_):
    raise AssertionError("the detector was loaded")


def _small_video(path: Path, frames: int = 4) -> Path:
    return _write_video(path, [np.full((32, 32, 3), 90 + 10 * i, np.uint8) for i in range(frames)])


def test_unreadable_videos_and_a_file_as_out_are_said_before_the_detector_loads(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(crop_module, "_detector_class", lambda: _refuse_to_load)
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "text.mp4").write_text("a text file, not a video\n" * 20)
    result = runner.invoke(app, ["crop", str(videos), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    failed = sorted(line for line in result.stderr.splitlines() if line.startswith("failed:"))
    assert failed == [
        f"failed: {videos / 'empty.mp4'}: empty file, not a video",
        f"failed: {videos / 'text.mp4'}: unreadable video (Invalid data found when processing "
        "input)",
    ]
    assert "records in" not in result.stdout  # none were written
    assert not (tmp_path / "out" / "crop_records").exists()

    taken = tmp_path / "taken"
    taken.write_text("")
    for out in (taken, taken / "sub"):
        result = runner.invoke(app, ["crop", str(videos), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert (
            result.stderr == f"error: --out {out}: {'it' if out == taken else taken} is a "
            "file, not a folder; give a new or existing folder\n"
        )


def test_the_summary_counts_the_folders_that_exist(tmp_path, monkeypatch):
    monkeypatch.setattr(crop_module, "_detector_class", lambda: _OneFaceDetector)
    video = _small_video(tmp_path / "solo.mp4")
    out = tmp_path / "out"
    two = ["crop", str(video), "--out", str(out), "--subjects", "2", "--no-progress"]
    result = runner.invoke(app, two)
    assert result.exit_code == 0, result.output
    # one face: the two subjects' tracks never start, no folder is written
    assert (
        f"0 folder(s) written, 0 video(s) skipped, 0 failed; records in {out / 'crop_records'}"
        in result.stdout
    )
    assert not (out / IMAGES_DIRNAME).exists()
    result = runner.invoke(app, ["crop", str(video), "--out", str(tmp_path / "one"),
                                 "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 folder(s) written" in result.stdout
    assert len(list((tmp_path / "one" / IMAGES_DIRNAME / "solo").glob("*.jpg"))) == 4


def test_a_rerun_with_other_settings_is_refused_not_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(crop_module, "_detector_class", lambda: _OneFaceDetector)
    video = _small_video(tmp_path / "solo.mp4")
    out = tmp_path / "out"
    crop_videos([video], out, OPTIONS)
    assert crop_videos([video], out, OPTIONS).skipped == [str(video)]
    other = CropOptions(**{**OPTIONS.__dict__, "size": 64, "subjects": 2})
    with pytest.raises(FercacheError) as refused:
        crop_videos([video], out, other)
    assert str(refused.value) == (
        f"{record_path(out, 'solo')}: solo.mp4 was cropped with --size 112, --subjects 1, not "
        f"as asked now; give another --out, or delete this record and "
        f"{out / IMAGES_DIRNAME / 'solo'} to crop it again"
    )


def _pages_kb(folder: Path) -> int:
    """What `folder`'s files take on a tmpfs, which gives each file whole 4 KB pages."""
    return sum(-(-path.stat().st_size // 4096) * 4 for path in folder.rglob("*") if path.is_file())


def test_a_full_disk_keeps_the_videos_cropped_before_and_the_rerun_skips_them(
    tmp_path, monkeypatch, small_disk
):
    monkeypatch.setattr(crop_module, "_detector_class", lambda: _OneFaceDetector)
    (tmp_path / "videos").mkdir()
    first, second = (_small_video(tmp_path / "videos" / f"{n}.mp4", 16) for n in ("a", "b"))
    crop_videos([first], tmp_path / "one", OPTIONS)
    one = _pages_kb(tmp_path / "one")
    disk = small_disk(one + one // 2)  # the first video's crops fit, not the second's
    out = disk / "out"

    result = runner.invoke(app, ["crop", str(tmp_path / "videos"), "--out", str(out),
                                 "--no-progress"])  # fmt: skip

    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert str(out) in line and "No space left on device" in line
    assert sorted(path.name for path in (out / IMAGES_DIRNAME).iterdir()) == ["a"]
    assert len(list((out / IMAGES_DIRNAME / "a").glob("*.jpg"))) == 16
    assert not (out / PARTIAL_DIRNAME).exists() or not any((out / PARTIAL_DIRNAME).iterdir())
    small_disk.grow(disk, 4 * one)
    report = crop_videos([first, second], out, OPTIONS)
    assert report.skipped == [str(first)] and [crop.frames for crop in report.videos] == [16]
    assert len(list((out / IMAGES_DIRNAME / "b").glob("*.jpg"))) == 16

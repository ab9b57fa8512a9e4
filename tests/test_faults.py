"""Every damaged artifact answers in one line. For each kind of file fercache writes or reads
(feature store, manifest, PRED file, run-folder files, phase-1 checkpoints, student weights,
frame lists, annotations), each damage (truncated to half, a few bytes of garbage, empty,
missing, another file's valid content) and each command that reads it: exit code 2, one line on
stderr naming the file, no traceback, and no output under its final name (a folder resumed in
place keeps its files). Where a recovery is defined (extract recomputes a damaged store) the
recovery is checked instead; `fercache runs` marks an unreadable run in its table.

Every artifact is built once for the module (one tiny extracted cache, one tiny sweep whose run
every reader is given, one PRED, one tiny phase-1 run) and copied per case before its damage.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fercache.cli import app
from fercache.data.tasks import EXPR_CLASSES
from fercache.features.store import MANIFEST_NAME, Provenance, read_manifest, read_store
from fercache.resume import CONFIG_FILE, METRICS_FILE
from fercache.temporal.inference import write_thresholds
from fercache.temporal.run_files import SUMMARY_FILE
from tests.train_data import ANNOTATIONS, SPLIT_FOLDERS, TINY_TEMPORAL, TreeSpec, write_tree

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
VIDEO = "val00"  # the video whose store and annotation file are damaged
NET = ("--backbone=test_resnet", "--input-size=32", "--device=cpu", "--workers=0")
PRETRAIN_SETS = (
    "recipe=supervised",
    "backbone=test_resnet",
    "image_size=32",
    "batch_size=8",
    "workers=0",
    "eval_every=2",
    "log_every=1",
    "checkpoint_every=2",
)
TRAIN_SETS = tuple(f"--set={value}" for value in TINY_TEMPORAL)
GARBAGE = b"\x89\xff\x00garbage\xfe"
LR = 0.001  # the built sweep's one point


def _cli(*arguments: object) -> list[str]:
    return [str(argument) for argument in arguments]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """tree/ (4 videos, real 8x8 JPEGs), cache/ (extracted by a random test_resnet), sweep/
    (one point: one epoch of the tiny temporal model), run/ (a copy of that point, with
    thresholds.json), val.h5, frames.csv (a submission: a frame list), labelled.csv and p1/
    (two phase-1 steps on it: last.pt, student.safetensors)."""
    base = tmp_path_factory.mktemp("built")
    write_tree(base / "tree", TreeSpec(train_videos=2, val_videos=2, frames=40))
    jpeg = base / "face.jpg"
    Image.new("RGB", (8, 8), (200, 120, 90)).save(jpeg)
    for image in (base / "tree" / "cropped_aligned").rglob("*.jpg"):
        shutil.copyfile(jpeg, image)
    steps = [
        _extract(base, "cache", *NET),
        _sweep(base, LR),
        _predict(base, f"--data={base / 'tree'}", out=base / "val.h5"),
        ["submit", base / "val.h5", f"--out={base / 'frames.csv'}"],
    ]
    rows = []
    for label in range(len(EXPR_CLASSES)):
        for copy in range(4):
            image = base / "stills" / f"{label}-{copy}.jpg"
            image.parent.mkdir(exist_ok=True)
            Image.new("RGB", (8, 8), (30 * label, 40 * copy, 90)).save(image)
            rows.append(f"{image},{label}")
    (base / "labelled.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    steps.append(_pretrain(base, "p1", "--steps=2"))
    for step in steps:
        result = runner.invoke(app, _cli(*step))
        assert result.exit_code == 0, (step, result.output)
        if step[0] == "sweep":  # its one point is the run every reader is given
            shutil.copytree(base / "sweep" / f"lr={LR}", base / "run")
    write_thresholds(base / "run", "best", np.full(12, 0.4))
    shutil.copyfile(ROOT / "configs" / "temporal.yaml", base / "temporal.yaml")
    return base


# --- the damages -----------------------------------------------------------------------------


def _truncated(path: Path, built: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path, built: Path) -> None:
    path.write_bytes(GARBAGE)


def _empty(path: Path, built: Path) -> None:
    path.write_bytes(b"")


def _missing(path: Path, built: Path) -> None:
    path.unlink()


def _content(data: bytes) -> Callable[[Path, Path], None]:
    return lambda path, built: path.write_bytes(data)


def _copy_of(relative: str) -> Callable[[Path, Path], None]:
    return lambda path, built: shutil.copyfile(built / relative, path)


def _other_extraction(path: Path, built: Path) -> None:
    """The store as an extraction at another input size would have written it, copied in: whole,
    but not of the features the manifest lists."""
    with h5py.File(path, "r+") as store:
        store.attrs["input_size"] = [3, 48, 48]
        store.attrs["fingerprint"] = Provenance.from_attrs(store.attrs).fingerprint


COMMON = {"truncated": _truncated, "garbage": _garbage, "empty": _empty, "missing": _missing}
# the damages of a line-based text file (cut short, it is still a valid one)
TEXT = {"garbage": _garbage, "empty": _empty}
STORE = f"cache/{VIDEO}.h5"
ANNOTATION = f"tree/{ANNOTATIONS}/{SPLIT_FOLDERS['val']}/{VIDEO}.txt"


@dataclass(frozen=True)
class Artifact:
    """A file of the built workspace, its damages, and the top-level items a case copies."""

    path: str
    damages: dict[str, Callable[[Path, Path], None]]
    copies: tuple[str, ...] = ()


ARTIFACTS = {
    "store": Artifact(
        STORE,
        {**COMMON, "pred-hdf5": _copy_of("val.h5"), "other-extraction": _other_extraction},
        ("cache",),
    ),
    "manifest": Artifact(
        "cache/manifest.json",
        {**COMMON, "json-list": _content(b"[]"), "json-object": _content(b"{}")},
        ("cache",),
    ),
    "pred": Artifact("val.h5", {**COMMON, "store-hdf5": _copy_of(STORE)}, ("val.h5",)),
    "model.json": Artifact(
        "run/model.json",
        {
            **COMMON,
            "open-brace": _content(b"{"),
            "json-list": _content(b"[]"),
            "json-wrong-values": _content(b'{"feature_dim": "many", "tasks": 3}'),
        },
        ("run",),
    ),
    "best.safetensors": Artifact(
        "run/best.safetensors",
        {**COMMON, "another-model": _copy_of("p1/student.safetensors")},
        ("run",),
    ),
    "final.safetensors": Artifact("run/final.safetensors", COMMON, ("run",)),
    # without thresholds.json a run decides AUs at 0.5: not a damage
    "thresholds.json": Artifact(
        "run/thresholds.json",
        {
            "truncated": _truncated,
            **TEXT,
            "json-list": _content(b"[]"),
            "json-wrong-values": _content(b'{"best": [1, 2]}'),
        },
        ("run",),
    ),
    "run-config": Artifact(
        "run/config.yaml",
        {
            **COMMON,
            "yaml-text": _content(b"just some words\n"),
            "yaml-list": _content(b"- lr\n- epochs\n"),
            "yaml-unknown-keys": _content(b"colour: blue\nshape: round\n"),
        },
        ("run",),
    ),
    "run-checkpoint": Artifact(
        "run/last.pt", {**COMMON, "phase-1-checkpoint": _copy_of("p1/last.pt")}, ("run",)
    ),
    # a run without summary.json is unfinished, and a sweep resumes it: not a damage
    "summary.json": Artifact(
        f"sweep/lr={LR}/summary.json",
        {
            "truncated": _truncated,
            **TEXT,
            "json-list": _content(b"[]"),
            "json-wrong-values": _content(b'{"epochs": "x"}'),
        },
        ("sweep",),
    ),
    "p1-config": Artifact(
        "p1/config.yaml",
        {**COMMON, "yaml-text": _content(b"just some words\n"), "yaml-list": _content(b"- a\n")},
        ("p1",),
    ),
    "p1-checkpoint": Artifact(
        "p1/last.pt", {**COMMON, "phase-2-checkpoint": _copy_of("run/last.pt")}, ("p1",)
    ),
    "student": Artifact(
        "p1/student.safetensors",
        {**COMMON, "temporal-weights": _copy_of("run/best.safetensors")},
        ("p1",),
    ),
    "frame-list": Artifact(
        "frames.csv", {**TEXT, "missing": _missing, "hdf5": _copy_of("val.h5")}, ("frames.csv",)
    ),
    "annotation": Artifact(
        ANNOTATION,
        {**TEXT, "au-lines": _content(b"AU1,AU2\n0,1,0\n1,1,1\n")},
        ("tree",),
    ),
    # an empty or shortened settings file is a valid one (the defaults fill it in)
    "settings-file": Artifact(
        "temporal.yaml",
        {"garbage": _garbage, "missing": _missing, "yaml-list": _content(b"- lr\n")},
        ("temporal.yaml",),
    ),
}


# --- the commands ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """`arguments(w)` in workspace `w`; `outputs(w)`: what must not exist after a failure;
    `kept(w)`: folders whose files must stay as they were."""

    arguments: Callable[[Path], list]
    outputs: Callable[[Path], list[Path]] = lambda w: []
    kept: Callable[[Path], list[Path]] = lambda w: []
    copies: tuple[str, ...] = ()


def _train(w: Path, out: str, *extra: str) -> list:
    common = ["--epochs=1", "--device=cpu", "--no-progress", *TRAIN_SETS, *extra]
    return ["train", w / "cache", f"--data={w / 'tree'}", f"--out={w / out}", *common]


def _sweep(w: Path, lr: float) -> list:
    common = [f"--grid=lr={lr}", "--epochs=1", "--device=cpu", "--no-progress", *TRAIN_SETS]
    return ["sweep", w / "cache", f"--data={w / 'tree'}", f"--out={w / 'sweep'}", *common]


def _predict(w: Path, *extra: str, out: Path | None = None) -> list:
    common = ["--split=val", f"--out={out or w / 'out.h5'}", "--no-progress", *extra]
    return ["predict", w / "run", f"--cache={w / 'cache'}", *common]


def _pretrain(w: Path, out: str, *extra: str) -> list:
    sets = [f"--set={value}" for value in PRETRAIN_SETS]
    common = [f"--out={w / out}", "--no-progress", *sets, *extra]
    return ["pretrain", f"--labelled=abaw:{w / 'labelled.csv'}", *common]


def _extract(w: Path, out: str, *extra: str) -> list:
    return ["extract", w / "tree", f"--out={w / out}", "--no-progress", *extra]


STUDENT = "p1/student.safetensors"
OUT_H5 = lambda w: [w / "out.h5"]  # noqa: E731
COMMANDS = {
    "train": Command(lambda w: _train(w, "new"), lambda w: [w / "new"]),
    "train --config": Command(
        lambda w: _train(w, "new", f"--config={w / 'temporal.yaml'}"), lambda w: [w / "new"]
    ),
    "train --resume": Command(
        lambda w: _train(w, "run", "--resume"), kept=lambda w: [w / "run"], copies=("run",)
    ),
    "sweep": Command(
        lambda w: _sweep(w, 0.002),
        lambda w: [w / "sweep" / "lr=0.002" / CONFIG_FILE],
        copies=("sweep",),
    ),
    "sweep (finished point)": Command(
        lambda w: _sweep(w, LR), kept=lambda w: [w / "sweep"], copies=("sweep",)
    ),
    "predict": Command(lambda w: _predict(w, f"--data={w / 'tree'}"), OUT_H5),
    "predict --weights final": Command(
        lambda w: _predict(w, f"--data={w / 'tree'}", "--weights=final"), OUT_H5
    ),
    "predict --frames": Command(lambda w: _predict(w, f"--frames={w / 'frames.csv'}"), OUT_H5),
    "smooth": Command(lambda w: ["smooth", w / "val.h5", f"--out={w / 'out.h5'}"], OUT_H5),
    "evaluate": Command(
        lambda w: [
            *["evaluate", w / "val.h5", f"--data={w / 'tree'}"],
            *[f"--json={w / 'out.json'}", f"--confusion={w / 'out.png'}"],
        ],
        lambda w: [w / "out.json", w / "out.png"],
    ),
    "submit": Command(
        lambda w: ["submit", w / "val.h5", f"--out={w / 'out.csv'}"], lambda w: [w / "out.csv"]
    ),
    "submit --frames": Command(
        lambda w: [
            "submit",
            w / "val.h5",
            f"--out={w / 'out.csv'}",
            f"--frames={w / 'frames.csv'}",
        ],
        lambda w: [w / "out.csv"],
    ),
    "ensemble": Command(
        lambda w: ["ensemble", w / "val.h5", w / "val.h5", f"--out={w / 'out.h5'}"], OUT_H5
    ),
    "pretrain --resume": Command(
        lambda w: _pretrain(w, "p1", "--resume", "--steps=4"),
        kept=lambda w: [w / "p1"],
        copies=("p1",),
    ),
    "pretrain --init-checkpoint": Command(
        lambda w: _pretrain(w, "new", f"--init-checkpoint={w / STUDENT}", "--steps=2"),
        lambda w: [w / "new"],
    ),
    "extract": Command(lambda w: _extract(w, "cache", *NET), kept=lambda w: [w / "cache"]),
    "extract --checkpoint": Command(
        lambda w: _extract(w, "new", "--device=cpu", "--workers=0", f"--checkpoint={w / STUDENT}"),
        lambda w: [w / "new"],
    ),
    "convert": Command(
        lambda w: ["convert", w / "p1" / "last.pt", f"--out={w / 'out.safetensors'}"],
        lambda w: [w / "out.safetensors"],
    ),
    "inspect": Command(lambda w: ["inspect", w / "tree"]),
}

READERS = {
    "store": ["train", "sweep", "predict"],
    "manifest": ["train", "sweep", "predict", "extract"],
    "pred": ["smooth", "evaluate", "submit", "ensemble"],
    "model.json": ["predict"],
    "best.safetensors": ["predict"],
    "final.safetensors": ["predict --weights final"],
    "thresholds.json": ["predict"],
    "run-config": ["train --resume"],
    "run-checkpoint": ["train --resume"],
    "summary.json": ["sweep (finished point)"],
    "p1-config": ["pretrain --resume"],
    "p1-checkpoint": ["pretrain --resume", "convert"],
    "student": ["extract --checkpoint", "pretrain --init-checkpoint"],
    "frame-list": ["predict --frames", "submit --frames"],
    "annotation": ["train", "predict", "evaluate", "inspect"],
    "settings-file": ["train --config"],
}
# Damages some reader does not see as one.
NOT_DAMAGE = {
    ("p1-checkpoint", "phase-2-checkpoint", "convert"),  # convert reads any torch file's tensors
    ("manifest", "missing", "extract"),  # extract writes the manifest of the stores it has
}
# Four cases of the issue's table, by name (the fifth, `runs` on a config.yaml of garbage that
# still parses as YAML, is the first of RUNS_DAMAGES).
ISSUE = {
    ("store", "truncated", "train"): "issue-truncated-store-train",
    ("best.safetensors", "truncated", "predict"): "issue-truncated-best-predict",
    ("model.json", "open-brace", "predict"): "issue-open-brace-model-json-predict",
    ("p1-checkpoint", "truncated", "pretrain --resume"): "issue-truncated-state-resume",
}


def _cases() -> list:
    cases = []
    for kind, artifact in ARTIFACTS.items():
        for damage in artifact.damages:
            for command in READERS[kind]:
                if (kind, damage, command) in NOT_DAMAGE:
                    continue
                name = ISSUE.get((kind, damage, command), f"{kind}-{damage}-{command}")
                cases.append(pytest.param(kind, damage, command, id=name.replace(" ", "")))
    return cases


def _workspace(built: Path, tmp_path: Path, copies: set[str]) -> Path:
    """The built artifacts under `tmp_path`: those in `copies` copied, the rest linked."""
    for item in built.iterdir():
        target = tmp_path / item.name
        if item.name not in copies:
            target.symlink_to(item)
        elif item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copyfile(item, target)
    return tmp_path


def _files(folder: Path, leaving_out: Path) -> dict[Path, int]:
    """Each file under `folder` but `leaving_out`, and when it was last written."""
    return {
        path: path.stat().st_mtime_ns
        for path in folder.rglob("*")
        if path.is_file() and path != leaving_out
    }


@pytest.mark.parametrize(("kind", "damage", "command"), _cases())
def test_a_damaged_file_gives_one_line_naming_it(built, tmp_path, kind, damage, command):
    artifact, reader = ARTIFACTS[kind], COMMANDS[command]
    w = _workspace(built, tmp_path, {*artifact.copies, *reader.copies})
    damaged = w / artifact.path
    artifact.damages[damage](damaged, built)
    kept = {folder: _files(folder, damaged) for folder in reader.kept(w)}

    result = runner.invoke(app, _cli(*reader.arguments(w)))

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no other exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(damaged) in lines[0], result.stderr
    assert not [path for path in reader.outputs(w) if os.path.lexists(path)]
    for folder, files in kept.items():
        assert _files(folder, damaged) == files


@pytest.mark.parametrize("damage", ARTIFACTS["store"].damages)
def test_extract_recomputes_a_damaged_store(built, tmp_path, damage):
    w = _workspace(built, tmp_path, {"cache"})
    ARTIFACTS["store"].damages[damage](w / STORE, built)

    result = runner.invoke(app, _cli("extract", w / "tree", f"--out={w / 'cache'}", *NET))

    assert result.exit_code == 0, result.output
    assert "extracted 1 videos" in result.output
    recomputed, original = read_store(w / STORE), read_store(built / STORE)
    np.testing.assert_array_equal(recomputed.frames, original.frames)
    np.testing.assert_allclose(recomputed.features, original.features, atol=1e-3)


def test_extract_writes_a_missing_manifest_again(built, tmp_path):
    w = _workspace(built, tmp_path, {"cache"})
    (w / "cache" / MANIFEST_NAME).unlink()

    result = runner.invoke(app, _cli(*_extract(w, "cache", *NET)))

    assert result.exit_code == 0, result.output
    assert "extracted 0 videos" in result.output
    written, original = read_manifest(w / "cache"), read_manifest(built / "cache")
    assert written["videos"] == original["videos"]
    assert written["provenance"] == original["provenance"]


# file damaged in the third of three runs (the first two differ in lr only)
RUNS_DAMAGES = {
    "issue-yaml-garbage-config": (CONFIG_FILE, _content(b"just some words, still YAML\n")),
    "config-unknown-keys": (CONFIG_FILE, _content(b"colour: blue\nshape: round\n")),
    "config-list": (CONFIG_FILE, _content(b"- lr\n- epochs\n")),
    "config-garbage": (CONFIG_FILE, _garbage),
    "config-empty": (CONFIG_FILE, _empty),
    "summary-truncated": (SUMMARY_FILE, _truncated),
    "summary-garbage": (SUMMARY_FILE, _garbage),
    "summary-list": (SUMMARY_FILE, _content(b"[]")),
    "metrics-garbage": (METRICS_FILE, _garbage),  # read for an unfinished run's epochs
}


@pytest.mark.parametrize("name", RUNS_DAMAGES)
def test_runs_marks_an_unreadable_run_and_compares_the_readable_ones(built, tmp_path, name):
    folder = tmp_path / "runs"
    for run in ("a", "b", "c"):
        shutil.copytree(built / "run", folder / run)
    config = folder / "b" / CONFIG_FILE
    config.write_text(config.read_text().replace(f"\nlr: {LR}\n", "\nlr: 0.002\n"))
    damaged, damage = RUNS_DAMAGES[name]
    if damaged == METRICS_FILE:
        (folder / "c" / SUMMARY_FILE).unlink()
    damage(folder / "c" / damaged, built)

    result = runner.invoke(app, _cli("runs", folder, f"--json={tmp_path / 'runs.json'}"))

    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "runs.json").read_text())
    columns = table["columns"]
    assert columns[: columns.index("epochs_done")] == ["run", "lr"]  # the one setting that differs
    status = {row["run"]: row["status"] for row in table["rows"]}
    assert status == {"a": "finished", "b": "finished", "c": f"unreadable: {damaged}"}


# --- outputs that cannot be written, links, huge declared shapes, decompression bombs ----------
# Each command that writes a folder or a file, given a read-only one (a tmpfs mounted `ro`: root
# ignores file modes), an --out that is a file, or a real full disk (a small tmpfs), answers in
# one line naming it, exit code 2; a full disk keeps what was finished and no temporary file.
# Sources whose data lies outside the file, or whose declared shape is absurd, and frames that are
# decompression bombs, are refused or skipped as other damage is.

RATE = ("--rate=30", "--fps=30")  # an array source of one row per frame


def _frames_of(w: Path, video: str) -> int:
    split = "val" if video.startswith("val") else "train"
    text = (w / f"tree/{ANNOTATIONS}/{SPLIT_FOLDERS[split]}/{video}.txt").read_text()
    return len(text.splitlines()) - 1


def _videos(w: Path) -> list[str]:
    return sorted(path.name for path in (w / "tree" / "cropped_aligned").iterdir())


def _npy_source(w: Path) -> Path:
    """src/<video>.npy: (N, 4) per video of the tree."""
    for video in _videos(w):
        (w / "src").mkdir(exist_ok=True)
        np.save(w / "src" / f"{video}.npy", np.ones((_frames_of(w, video), 4), np.float32))
    return w / "src"


def _import(w: Path, source: Path, out: Path) -> list:
    return ["import-features", source, f"--out={out}", f"--data={w / 'tree'}", *RATE]


def _face_video(w: Path) -> Path:
    """videos/VIDEO.mov: a face (the astronaut photograph, moving a little) for each of VIDEO's
    frames at 30 fps, and a tone as its sound track."""
    from skimage.data import astronaut

    from fercache.synth.sound import tone
    from fercache.video.pyav import write_video_with_sound

    face = Image.fromarray(astronaut()[:256, 96:352]).resize((96, 96))
    frames = []
    for index in range(_frames_of(w, VIDEO)):
        canvas = Image.new("RGB", (128, 112), (110, 110, 110))
        canvas.paste(face, (4 + index % 16, 8))
        frames.append(np.asarray(canvas))
    path = w / "videos" / f"{VIDEO}.mov"
    path.parent.mkdir()
    sound = tone(len(frames) / 30, 440, 16000)[None]
    write_video_with_sound(path, 30, frames, sound, 16000)
    return path


def _audio(w: Path, out: Path, encoder: Path) -> list:
    common = ["--device=cpu", "--dtype=float32", "--no-progress"]
    arguments = [_face_video(w).parent, f"--out={out}", f"--data={w / 'tree'}", *common]
    return ["audio", *arguments, f"--model={encoder}"]


def _encoder(w: Path) -> Path:
    from fercache.synth.sound import save_speech_encoder

    return save_speech_encoder(w / "encoder")


def _crop(w: Path, out: Path) -> list:
    return ["crop", _face_video(w), f"--out={out}", "--device=cpu", "--no-progress"]


def _analyse(w: Path, out: Path) -> list:
    common = ["--device=cpu", "--size=32", "--no-progress"]
    return ["analyse", _face_video(w), f"--checkpoint={w / STUDENT}", f"--out={out}", *common]


# command: (its arguments given where it writes, and the file it writes: "" for a folder)
WRITERS: dict[str, tuple[Callable[[Path, Path], list], str]] = {
    "extract": (lambda w, out: _extract(w, str(out), *NET), ""),
    "import-features": (lambda w, out: _import(w, _npy_source(w), out), ""),
    "train": (lambda w, out: _train(w, str(out)), ""),
    "sweep": (lambda w, out: [*_sweep(w, LR)[:3], f"--out={out}", *_sweep(w, LR)[4:]], ""),
    "pretrain": (lambda w, out: _pretrain(w, str(out), "--steps=2"), ""),
    "synth": (lambda w, out: ["synth", out, "--videos=4", "--frames=64"], ""),
    "predict": (lambda w, out: _predict(w, f"--data={w / 'tree'}", out=out), "out.h5"),
    "smooth": (lambda w, out: ["smooth", w / "val.h5", f"--out={out}"], "out.h5"),
    "ensemble": (lambda w, out: ["ensemble", w / "val.h5", w / "val.h5", f"--out={out}"], "out.h5"),
    "submit": (lambda w, out: ["submit", w / "val.h5", f"--out={out}"], "out.csv"),
    "evaluate": (
        lambda w, out: ["evaluate", w / "val.h5", f"--data={w / 'tree'}", f"--json={out}"],
        "out.json",
    ),
    "convert": (
        lambda w, out: ["convert", w / "run" / "last.pt", f"--out={out}"],
        "out.safetensors",
    ),
    # refused before the encoder or the face detector loads: no model is needed
    "audio": (lambda w, out: _audio(w, out, w / "no-encoder"), ""),
    "crop": (_crop, ""),
    "analyse": (_analyse, ""),
}


def _one_line_naming(result, *names: object) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no other exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(str(name) in lines[0] for name in names), result.stderr
    return lines[0]


@pytest.mark.parametrize("place", ["read-only", "a-file"])
@pytest.mark.parametrize("command", WRITERS)
def test_an_output_that_cannot_be_written_gives_one_line_before_any_work(
    built, tmp_path, small_disk, command, place
):
    w = _workspace(built, tmp_path, set())
    arguments, written = WRITERS[command]
    if place == "read-only":
        where = small_disk(64, read_only=True)
        out = where / (written or "out")
    else:
        where = w / "a-file"
        where.write_text("a file, not a folder\n")
        out = where / written if written else where

    _one_line_naming(runner.invoke(app, _cli(*arguments(w, out))), where)
    assert where.is_file() or not any(where.iterdir())


# command: (arguments given its output folder, the disk's kilobytes or the built item whose size
# fills the disk halfway)
FULL_DISK = {
    "import-features": (lambda w, out: _import(w, _npy_source(w), out / "cache"), 8),
    "predict": (lambda w, out: _predict(w, f"--data={w / 'tree'}", out=out / "out.h5"), "val.h5"),
    "smooth": (lambda w, out: ["smooth", w / "val.h5", f"--out={out / 'out.h5'}"], "val.h5"),
    "ensemble": (
        lambda w, out: ["ensemble", w / "val.h5", w / "val.h5", f"--out={out / 'out.h5'}"],
        "val.h5",
    ),
    "train": (lambda w, out: _train(w, str(out / "run")), "run"),
    "sweep": (
        lambda w, out: [*_sweep(w, LR)[:3], f"--out={out / 'sweep'}", *_sweep(w, LR)[4:]],
        "sweep",
    ),
    # files of a few kilobytes: the disk is full before the command starts
    "submit": (lambda w, out: ["submit", w / "val.h5", f"--out={out / 'out.csv'}"], 0),
    "evaluate": (
        lambda w, out: [
            "evaluate",
            w / "val.h5",
            f"--data={w / 'tree'}",
            f"--json={out / 'o.json'}",
        ],
        0,
    ),
    "pretrain": (lambda w, out: _pretrain(w, str(out / "p1"), "--steps=2"), "p1"),
    "convert": (
        lambda w, out: ["convert", w / "run" / "last.pt", f"--out={out / 'out.safetensors'}"],
        "run/best.safetensors",
    ),
    "audio": (lambda w, out: _audio(w, out / "cache", _encoder(w)), 8),
    "crop": (lambda w, out: _crop(w, out / "crops"), 32),
    # full during the crop (a 4 KB page per crop on a tmpfs); the later writes are extract's,
    # predict's and smooth's, each tested above, and write_atomically's
    "analyse": (lambda w, out: _analyse(w, out / "analysed"), 64),
    "synth": (
        lambda w, out: ["synth", out / "tree", "--videos=4", "--frames=64", "--workers=1"],
        64,
    ),
}
# HDF5 writers crashed the process (exit 139) on a full disk: run in a process of their own
IN_A_PROCESS = {"import-features", "predict", "smooth", "ensemble"}


def _size_kb(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) // 1024


def _in_a_process(arguments: list) -> SimpleNamespace:
    done = subprocess.run(
        [sys.executable, "-m", "fercache", *_cli(*arguments)], capture_output=True, text=True
    )
    return SimpleNamespace(
        exit_code=done.returncode,
        exception=SystemExit(done.returncode),
        stderr=done.stderr,
        output=done.stdout + done.stderr,
    )


def _fill(disk: Path) -> None:
    """Write into `disk` until it has no space left."""
    filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(filler, b"x" * 4096)
    finally:
        os.close(filler)


@pytest.mark.parametrize("command", FULL_DISK)
def test_a_full_disk_gives_one_line_and_leaves_no_temporary_file(
    built, tmp_path, small_disk, command
):
    w = _workspace(built, tmp_path, set())
    arguments, sized_as = FULL_DISK[command]
    half = sized_as if isinstance(sized_as, int) else _size_kb(built / sized_as) // 2
    disk = small_disk(max(8, half))
    if half == 0:
        _fill(disk)
    invoke = _in_a_process if command in IN_A_PROCESS else lambda a: runner.invoke(app, _cli(*a))

    line = _one_line_naming(invoke(arguments(w, disk)), disk, "No space left on device")

    assert "Traceback" not in line
    assert not [path for path in disk.rglob("*") if ".tmp-" in path.name]


def test_extract_on_a_full_disk_keeps_the_finished_stores_and_resumes(built, tmp_path, small_disk):
    w = _workspace(built, tmp_path, set())
    largest = max(_size_kb(store) for store in (built / "cache").glob("*.h5"))
    disk = small_disk(largest + 24)  # one store and the claims fit, not four
    arguments = _cli(*_extract(w, str(disk / "cache"), *NET))

    result = _in_a_process(arguments)

    _one_line_naming(result, disk / "cache", "No space left on device", "a rerun resumes")
    kept = sorted((disk / "cache").glob("*.h5"))
    assert 1 <= len(kept) < 4, kept
    for store in kept:
        original = read_store(built / "cache" / store.name)
        np.testing.assert_array_equal(read_store(store).frames, original.frames)
    assert not [path for path in (disk / "cache").iterdir() if ".tmp-" in path.name]
    small_disk.grow(disk, 4 * largest + 64)
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert f"{len(kept)} already done" in result.output


# the commands that write one file: a kill mid-write leaves nothing under its name
ONE_FILE_WRITERS = [command for command, (_, written) in WRITERS.items() if written]


def _killed_as_it_writes(arguments: list, out: Path) -> int:
    """Run the command in a process of its own (tests/killed_mid_write.py), SIGKILLed once
    `out`'s temporary file is written and flushed; the process's pid."""
    command = [sys.executable, "-m", "tests.killed_mid_write", out, *arguments]
    child = subprocess.run(_cli(*command), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    (pid,) = {path.name.rpartition(".tmp-")[2] for path in out.parent.glob(f".{out.name}.tmp-*")}
    return int(pid)


@pytest.mark.parametrize("command", ONE_FILE_WRITERS)
def test_a_kill_mid_write_leaves_no_file_and_the_rerun_writes_it_and_clears_the_leftover(
    built, tmp_path, command
):
    w = _workspace(built, tmp_path, set())
    arguments, written = WRITERS[command]
    out = tmp_path / "out" / written
    pid = _killed_as_it_writes(arguments(w, out), out)
    assert [path.name for path in out.parent.iterdir()] == [f".{written}.tmp-{pid}"]

    result = runner.invoke(app, _cli(*arguments(w, out)))

    assert result.exit_code == 0, result.output
    assert [path.name for path in out.parent.iterdir()] == [written]


def test_a_killed_import_keeps_its_finished_stores_and_the_rerun_completes_the_cache(
    built, tmp_path
):
    w = _workspace(built, tmp_path, set())
    source = _npy_source(w)
    reference, cache = tmp_path / "import-reference", tmp_path / "imported"
    assert runner.invoke(app, _cli(*_import(w, source, reference))).exit_code == 0
    stores = sorted(path.name for path in reference.glob("*.h5"))
    killed_at = cache / stores[-1]  # as its store is written: the others are finished
    _killed_as_it_writes(_import(w, source, cache), killed_at)
    assert sorted(path.name for path in cache.glob("*.h5")) == stores[:-1]

    result = runner.invoke(app, _cli(*_import(w, source, cache)))

    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in cache.glob("*.h5")) == stores
    for name in stores:
        np.testing.assert_array_equal(
            read_store(cache / name).features, read_store(reference / name).features
        )
    assert not [path for path in cache.iterdir() if ".tmp-" in path.name]


def test_a_killed_synth_leaves_no_mark_of_a_whole_tree_and_the_rerun_says_to_delete_it(
    tmp_path,
):
    tree = tmp_path / "tree"
    arguments = ["synth", tree, "--videos=4", "--frames=64", "--workers=1"]
    _killed_as_it_writes(arguments, tree / "synth.json")
    assert not (tree / "synth.json").exists() and any(tree.iterdir())

    line = _one_line_naming(runner.invoke(app, _cli(*arguments)), tree, "synth.json")

    assert "delete the folder" in line


def _bomb(path: Path) -> None:
    """A valid 8x8 JPEG whose header declares 40000 x 40000 pixels."""
    Image.new("RGB", (8, 8), (200, 120, 90)).save(path, format="JPEG")
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\xc0") + 5  # the frame header: length, precision, height, width
    data[start : start + 4] = (40000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_frame_is_skipped_and_reported(built, tmp_path):
    w = _workspace(built, tmp_path, {"tree"})
    frame = sorted((w / "tree" / "cropped_aligned" / VIDEO).iterdir())[2]
    _bomb(frame)

    result = runner.invoke(app, _cli(*_extract(w, "new", *NET)))

    assert result.exit_code == 0, result.output
    assert str(frame) in result.stderr.replace("\n", "") and "decompression bomb" in result.stderr
    store = read_store(w / "new" / f"{VIDEO}.h5")
    assert int(frame.stem) in store.skipped_frames.tolist()
    assert int(frame.stem) not in store.frames.tolist()


def test_pretrain_replaces_a_decompression_bomb_in_its_pool_and_lists_it(built, tmp_path):
    w = _workspace(built, tmp_path, {"labelled.csv"})
    bomb = w / "bomb.jpg"
    _bomb(bomb)
    rows = (w / "labelled.csv").read_text().splitlines()
    (w / "labelled.csv").write_text("\n".join([*rows, f"{bomb},0"]) + "\n")

    result = runner.invoke(app, _cli(*_pretrain(w, "p1-new", "--steps=2", "--set=batch_size=40")))

    assert result.exit_code == 0, result.output
    assert str(bomb) in (w / "p1-new" / "problems.txt").read_text()


HUGE = (10**12, 4)


def _huge_npy(handle) -> None:
    header = {"descr": "<f4", "fortran_order": False, "shape": HUGE}
    np.lib.format.write_array_header_1_0(handle, header)


def _huge_source(w: Path, kind: str) -> Path:
    """A source of every video of the tree whose VIDEO declares shape HUGE: its file."""
    if kind == "hdf5":
        with h5py.File(w / "src.h5", "w") as handle:
            for video in _videos(w):
                handle[video] = np.ones((_frames_of(w, video), 4), np.float32)
            del handle[VIDEO]
            handle.create_dataset(VIDEO, shape=HUGE, dtype="<f4", chunks=(1024, 4))
        return w / "src.h5"
    source = _npy_source(w)
    if kind == "npy":
        with open(source / f"{VIDEO}.npy", "wb") as handle:
            _huge_npy(handle)
        return source / f"{VIDEO}.npy"
    for path in source.glob("*.npy"):
        if path.stem == VIDEO:
            archive = zipfile.ZipFile(path.with_suffix(".npz"), "w")
            with archive, archive.open("features.npy", "w") as member:
                _huge_npy(member)
        else:
            np.savez(path.with_suffix(".npz"), features=np.load(path))
        path.unlink()
    return source / f"{VIDEO}.npz"


@pytest.mark.parametrize("kind", ["hdf5", "npy", "npz"])
def test_import_refuses_a_huge_declared_shape_before_reading_it(built, tmp_path, kind):
    w = _workspace(built, tmp_path, set())
    damaged = _huge_source(w, kind)
    source = damaged if kind == "hdf5" else damaged.parent

    result = runner.invoke(app, _cli(*_import(w, source, w / "imported")))

    _one_line_naming(result, damaged, f"'{VIDEO}'", str(HUGE))


def _linked(w: Path, kind: str) -> None:
    """src.h5 holding every video of the tree, VIDEO's data lying in another file as `kind`."""
    rows = _frames_of(w, VIDEO)
    with h5py.File(w / "other.h5", "w") as other:
        other["x"] = np.ones((rows, 4), np.float32)
    with h5py.File(w / "src.h5", "w") as handle:
        for video in _videos(w):
            if video != VIDEO:
                handle[video] = np.ones((_frames_of(w, video), 4), np.float32)
        if kind == "external-link":
            handle[VIDEO] = h5py.ExternalLink(str(w / "other.h5"), "x")
        elif kind == "soft-link-out":
            handle["group/outside"] = h5py.ExternalLink(str(w / "other.h5"), "/")
            handle[VIDEO] = h5py.SoftLink("/group/outside/x")
        elif kind == "external-storage":
            (w / "raw.bin").write_bytes(np.ones((rows, 4), "<f4").tobytes())
            storage = [(str(w / "raw.bin"), 0, rows * 16)]
            handle.create_dataset(VIDEO, shape=(rows, 4), dtype="<f4", external=storage)
        else:
            layout = h5py.VirtualLayout(shape=(rows, 4), dtype="<f4")
            layout[:] = h5py.VirtualSource(str(w / "other.h5"), "x", shape=(rows, 4))
            handle.create_virtual_dataset(VIDEO, layout)


@pytest.mark.parametrize("kind", ["external-link", "soft-link-out", "external-storage", "virtual"])
def test_import_refuses_a_dataset_whose_data_lies_outside_the_source_file(built, tmp_path, kind):
    w = _workspace(built, tmp_path, set())
    _linked(w, kind)

    result = runner.invoke(app, _cli(*_import(w, w / "src.h5", w / "imported")))

    _one_line_naming(result, w / "src.h5", f"'{VIDEO}'")
    assert not (w / "imported").exists()

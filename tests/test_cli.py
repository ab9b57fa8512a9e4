"""The command line: help text for everything, clean errors, and `inspect` end to end."""

import json

import pytest
import typer
from typer.testing import CliRunner

from fercache.cli import app
from fercache.cli.shared import REGISTRIES
from tests.test_affwild2 import EXPR_HEADER, write_annotation, write_images

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)
INTERRUPTED = (
    "interrupted: what was finished is kept (every file fercache writes is whole or absent); "
    "run the same command again to go on from there (train and pretrain: add --resume)"
)


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_and_argument_has_help(name):
    command = typer.main.get_command(app).commands[name]
    assert command.help, f"{name} has no description"
    undocumented = [p.name for p in command.params if not getattr(p, "help", None)]
    assert undocumented == [], f"{name}: parameters without help: {undocumented}"
    # 100 columns: at 80, rich cuts option names over ~18 characters in a command with many
    # options (`extract --allow-missing-head`); the flags are documented all the same
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    # a help text that names a registry ({recipes}, ...) shows its entries
    assert not [placeholder for placeholder in REGISTRIES if placeholder in result.output]
    for param in command.params:
        for flag in getattr(param, "opts", []):
            if flag.startswith("--"):
                assert flag in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("fercache ")


def test_domain_error_is_one_clean_line_with_exit_code_2(tmp_path):
    write_annotation(tmp_path, f"{EXPR_HEADER}\n1\nseven\n", "video1")
    write_images(tmp_path, "video1", [1, 2])

    result = runner.invoke(app, ["inspect", str(tmp_path), "--no-progress"])

    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "video1.txt:3: 'seven' for frame 2" in result.stderr


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["extract", "DIR", "--out", "DIR/c", "--batch-size", "0"], "--batch-size"),
        (["extract", "DIR", "--out", "DIR/c", "--batch-size", "-1"], "--batch-size"),
        (["extract", "DIR", "--out", "DIR/c", "--workers", "-1"], "--workers"),
        (["extract", "DIR", "--out", "DIR/c", "--input-size", "-8"], "--input-size"),
        (["extract", "DIR", "--out", "DIR/c", "--input-size", "0"], "--input-size"),
        (["extract", "DIR", "--out", "DIR/c", "--input-size", "20000"], "--input-size"),
        (["train", "DIR", "--data", "DIR", "--out", "DIR/r", "--seed", str(2**63)], "--seed"),
        (["smooth", "DIR/p.h5", "--out", "DIR/q.h5", "--window", str(2**63)], "--window"),
    ],
)
def test_out_of_range_numbers_are_refused_by_the_option_in_one_line(tmp_path, arguments, option):
    result = runner.invoke(app, [part.replace("DIR", str(tmp_path)) for part in arguments])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and f"'{option}'" in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_a_negative_seed_setting_is_refused():
    from fercache.errors import FercacheError
    from fercache.temporal.config import load_config

    with pytest.raises(FercacheError, match=r"seed must lie in \[0, 2\^63\)"):
        load_config(None, ["seed=-1"])


def test_ctrl_c_is_one_line_saying_what_was_kept_and_how_to_go_on(tmp_path, monkeypatch):
    from fercache.data import inspect

    def interrupted(*arguments, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect, "inspect_dataset", interrupted)
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == [INTERRUPTED]


# each writing command: the module attribute its CLI function calls, and arguments that reach
# that call (nothing is read: the call is interrupted at its entry)
WRITERS = {
    "extract": ("fercache.features.extract.extract", ["DATA", "--out=OUT"]),
    "import-features": (
        "fercache.features.importing.import_features",
        ["SOURCE", "--out=OUT", "--data=DATA"],
    ),
    "audio": (
        "fercache.features.audio.compute_audio",
        ["VIDEOS", "--out=OUT", "--data=DATA", "--model=M"],
    ),
    "train": ("fercache.experiments.training.train_into", ["CACHE", "--data=DATA", "--out=OUT"]),
    "sweep": (
        "fercache.experiments.sweep.sweep",
        ["CACHE", "--data=DATA", "--out=OUT", "--grid", "lr=0.001"],
    ),
    "predict": (
        "fercache.experiments.training.predict_with",
        ["RUN", "--cache=CACHE", "--data=DATA", "--split=val", "--out=OUT.h5"],
    ),
    "smooth": ("fercache.predictions.smooth.smooth_predictions", ["PRED.h5", "--out=OUT.h5"]),
    "ensemble": ("fercache.predictions.ensemble.ensemble", ["A.h5", "B.h5", "--out=OUT.h5"]),
    "submit": ("fercache.predictions.submit.write_submission", ["PRED.h5", "--out=OUT.csv"]),
    "evaluate": ("fercache.predictions.evaluate.evaluate", ["PRED.h5", "--data=DATA"]),
    "pretrain": ("fercache.pretrain.pretrain", ["--labelled=POOL", "--out=OUT"]),
    "convert": ("fercache.backbone.weights.convert_checkpoint", ["IN.pt", "--out=OUT.safetensors"]),
    "crop": ("fercache.video.crop.crop_videos", ["VIDEOS", "--out=OUT"]),
    "analyse": ("fercache.experiments.analyse.analyse", ["V.mp4", "--checkpoint=S", "--out=OUT"]),
    "synth": ("fercache.synth.generate", ["OUT"]),
}


@pytest.mark.parametrize("command", WRITERS)
def test_ctrl_c_in_each_writing_command_is_exit_130_and_the_one_line(
    tmp_path, monkeypatch, command
):
    target, arguments = WRITERS[command]
    called = []

    def interrupted(*given, **options):
        called.append(command)
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [command, *arguments])
    assert called == [command], result.output
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == [INTERRUPTED]


def test_inspect_tabulates_a_tree_and_writes_json(tmp_path):
    write_annotation(tmp_path, f"{EXPR_HEADER}\n0\n4\n4\n-1\n", "a_left")
    write_annotation(tmp_path, f"{EXPR_HEADER}\n7\n7\n", "a_right")
    write_annotation(tmp_path, f"{EXPR_HEADER}\n3\n3\n", "b", split="Validation_Set")
    write_images(tmp_path, "a_left", [1, 2])
    write_images(tmp_path, "a_right", [1, 2])
    write_images(tmp_path, "b", [2])
    write_images(tmp_path, "test_video", [1, 2, 3])
    out = tmp_path / "summary.json"

    result = runner.invoke(app, ["inspect", str(tmp_path), "--json", str(out), "--no-progress"])

    assert result.exit_code == 0, result.output
    assert "a_left, a_right" in result.output
    assert "test_video" in result.output
    summary = json.loads(out.read_text())
    train = next(s for s in summary["splits"] if s["split"] == "train")
    assert train["videos"] == 2 and train["frames"] == 6
    assert train["labelled"] == 5 and train["invalid"] == 1
    assert train["frames_without_image"] == 2 and train["labelled_without_image"] == 1
    assert train["distribution"]["Happiness"] == 2 and train["distribution"]["Other"] == 2
    val = next(s for s in summary["splits"] if s["split"] == "val")
    assert val["labelled_without_image"] == 1 and val["distribution"]["Fear"] == 2
    assert summary["unannotated_videos"] == ["test_video"]
    assert summary["note_counts"] == {"annotation_longer": 1}
    assert summary["images"] == 8

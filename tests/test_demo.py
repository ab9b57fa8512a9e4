"""`fercache demo` at a reduced size: every row is produced, and its figure is what
`fercache evaluate --json` says for the row's prediction file."""

import json
import re
from dataclasses import replace

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from fercache.cli import app
from fercache.errors import FercacheError
from fercache.experiments.demo import (
    DemoSettings,
    _reference_lines,
    _references,
    _Stages,
    paper_rows,
    run_demo,
)
from fercache.experiments.references import hog_logistic, labelled_source, validation_sample
from fercache.experiments.runs_table import runs_table

runner = CliRunner()
TINY = DemoSettings.small()
FINE_TUNING_ALL_STEPS = ["--pretrain-steps", "50", "--finetune-steps", "50"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out, seed=1, settings=TINY, progress=False)


def test_every_row_is_produced_by_its_command(demo):
    out, result = demo
    assert [row.name for row in result.rows] == [name for name, _ in paper_rows(TINY.ssl_recipe)]
    made_by = [*["predict --source student"] * 3, "predict ", "smooth "]
    for row, command in zip(result.rows, made_by, strict=True):
        assert row.pred.is_file() and row.pred.parent == out / "pred"
        assert row.commands[0].startswith(f"fercache {command}")
        assert row.commands[1].startswith(f"fercache evaluate {row.pred} ")
    assert (out / "runs" / "temporal" / "best.safetensors").is_file()
    assert result.chart.is_file() and result.chart.stat().st_size > 0


def test_report_numbers_equal_evaluate_json(demo, tmp_path):
    out, result = demo
    report = result.report.read_text()
    table = dict(re.findall(r"^\| (.+?) \| [\d.]+ \| ([\d.]+) \|$", report, re.MULTILINE))
    assert list(table) == [name for name, _ in paper_rows(TINY.ssl_recipe)]
    for row in result.rows:
        written = tmp_path / f"{row.pred.stem}.json"
        invoked = runner.invoke(
            app,
            ["evaluate", str(row.pred), "--data", str(out / "data"), "--json", str(written)],
        )
        assert invoked.exit_code == 0, invoked.output
        expected = round(100 * json.loads(written.read_text())["expr_f1"], 2)
        assert float(table[row.name]) == expected == row.f1


def test_each_student_trains_on_the_data_its_row_ticks(demo):
    """Yu et al.'s Table 1: the baseline on the video frames alone; SSL adds the unlabelled
    faces; the third row adds the labelled still images, whose Other images are left out; the
    temporal encoder trains on that third student's cache."""
    out, _ = demo
    data = out / "data"

    def sources(name):
        record = json.loads((out / "runs" / name / "sources.json").read_text())
        return record["labelled"], record["unlabelled"]

    assert sources("baseline") == ([str(data)], [])
    assert sources("ssl") == ([str(data)], [str(data / "pools" / "unlabelled")])
    assert sources("ssl-extra") == (
        [str(data), str(data / "pools" / "labelled.csv")],
        [str(data / "pools" / "unlabelled")],
    )
    assert "labelled Other left out" in (out / "runs" / "ssl-extra" / "problems.txt").read_text()
    trained_on = json.loads((out / "runs" / "temporal" / "summary.json").read_text())
    assert str(out / "cache" / "ssl-extra") in json.dumps(trained_on)


def test_runs_lists_the_temporal_run_and_leaves_the_pretraining_runs_out(demo):
    out, _ = demo
    assert (out / "runs" / "ssl" / "config.yaml").is_file()  # pretraining runs hold one too
    assert [row["run"] for row in runs_table(out / "runs").rows] == ["temporal"]


def test_the_runs_use_the_documented_phase_one_settings(demo):
    """Every row shares one recipe (optimizer, peak lr, batch, warm-up, label smoothing, steps);
    only the semi-supervised runs have unlabelled views and the SSL recipe's settings."""
    out, _ = demo

    def settings(name):
        return yaml.safe_load((out / "runs" / name / "config.yaml").read_text())

    baseline, ssl = settings("baseline"), settings("ssl")
    assert settings("ssl-extra") == ssl
    assert baseline["recipe"] == "supervised" and ssl["recipe"] == TINY.ssl_recipe
    shared = ("optimizer", "student_lr", "batch_size", "warmup_steps", "label_smoothing", "steps")
    assert {key: baseline[key] for key in shared} == {key: ssl[key] for key in shared}
    assert baseline["optimizer"] == TINY.optimizer and baseline["student_lr"] == TINY.pretrain_lr
    assert baseline["warmup_steps"] == round(TINY.warmup_fraction * TINY.pretrain_steps)
    assert ssl["mu"] == TINY.mu and ssl["uda_steps"] == TINY.pretrain_steps
    assert ssl["erasing_prob"] == 0 and baseline["student_finetune_steps"] == 0


def test_an_mpl_row_uses_one_rate_and_its_fine_tuning_steps():
    mpl = replace(TINY, ssl_recipe="mpl", ssl_finetune_steps=2)
    settings = dict(item.split("=") for item in mpl.pretrain_overrides("mpl"))
    assert settings["teacher_lr"] == settings["student_lr"] == str(mpl.pretrain_lr)
    assert settings["student_finetune_steps"] == "2" and settings["uda_steps"] == "2"
    assert "teacher_lr" not in dict(item.split("=") for item in TINY.pretrain_overrides("fixmatch"))


def test_the_command_refuses_fine_tuning_that_leaves_no_mpl_step(tmp_path):
    invoked = runner.invoke(
        app,
        ["demo", "--out", str(tmp_path / "d"), "--ssl-recipe", "mpl", *FINE_TUNING_ALL_STEPS],
    )
    assert invoked.exit_code == 2 and "must be fewer than the phase-1 steps" in invoked.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--finetune-steps", "5"], f"they need the mpl recipe, not {DemoSettings().ssl_recipe}"),
        (["--ssl-recipe", "supervised"], "SSL recipe 'supervised' is none of mpl, fixmatch"),
    ],
)
def test_the_command_refuses_ssl_settings_that_cannot_apply(tmp_path, options, message):
    invoked = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), *options])
    assert invoked.exit_code == 2 and message in invoked.stderr
    assert not (tmp_path / "d").exists()


def test_report_says_when_a_row_does_not_improve(demo):
    _, result = demo
    report = result.report.read_text()
    for before, row in zip(result.rows, result.rows[1:], strict=False):
        verdict = "improves on" if row.f1 > before.f1 else "does **not** improve on"
        assert f"- {row.name} {verdict} the previous row" in report


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FercacheError, match="holds no earlier demo"):
        run_demo(tmp_path, settings=TINY, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_the_reference_learners_are_scored_on_the_rows_frames_and_reported(demo):
    """HOG + logistic regression on each labelled source, on every labelled validation frame
    (the frames the rows are scored on), in references.json and beside the table."""
    out, result = demo
    written = json.loads((out / "references.json").read_text())
    assert written == result.references and set(written) == {"frames", "still"}
    validation = validation_sample(out / "data", None)
    still = labelled_source(out / "data", "still")
    assert written["still"] == hog_logistic(still, validation)
    report = result.report.read_text()
    assert (
        f"- the labelled still images alone (row 3's extra data): {written['still']:.2f}" in report
    )


def test_without_scikit_image_the_report_says_the_references_were_not_computed(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("fercache.experiments.demo.hog_available", lambda: False)
    stages = _Stages(Console(quiet=True))
    assert _references(stages, tmp_path) == {} and stages.commands == []
    lines = "\n".join(_reference_lines({}))
    assert "Reference learners: not computed (HOG needs scikit-image" in lines

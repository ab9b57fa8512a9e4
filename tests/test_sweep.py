"""Grid sweeps of training runs and the runs table (issue 8, part B)."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fercache.cli import app
from fercache.errors import FercacheError
from fercache.experiments.runs_table import runs_table
from fercache.experiments.sweep import grid_points, parse_grid, sweep
from fercache.settings import setting_key
from fercache.temporal.config import SECTIONS, TemporalConfig, load_config
from fercache.temporal.loop import TrainRequest
from tests.train_data import TreeSpec, write_cache, write_tree

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ("width=16", "heads=2", "ff_width=32", "batch_size=8", "workers=0")
POINTS = ["layers=1,lr=0.001", "layers=1,lr=0.003", "layers=2,lr=0.001", "layers=2,lr=0.003"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    labels = write_tree(root / "data", TreeSpec(train_videos=4, val_videos=2, frames=120))
    write_cache(root / "cache", root / "data", labels)
    return {"data": root / "data", "cache": root / "cache", "root": root}


def _request(**options) -> TrainRequest:
    return TrainRequest(overrides=TINY, epochs=1, device="cpu", progress=False, **options)


@pytest.fixture(scope="module")
def swept(tree) -> Path:
    """`fercache sweep` over 2 x 2 points (the issue's dotted keys), one epoch each."""
    out = tree["root"] / "sweep"
    result = runner.invoke(
        app,
        [
            *("sweep", str(tree["cache"]), "--data", str(tree["data"]), "--out", str(out)),
            *("--grid", "model.layers=1,2", "--grid", "optim.lr=1e-3,3e-3", "--epochs", "1"),
            *(item for setting in TINY for item in ("--set", setting)),
            *("--device", "cpu", "--no-progress"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count(": trained;") == 4
    return out


def _summaries(out: Path) -> dict[str, dict]:
    return {name: json.loads((out / name / "summary.json").read_text()) for name in POINTS}


def test_grid_expands_to_every_combination():
    grid = parse_grid(["model.layers=2,4", "lr=1e-4, 3e-4", "balance=none"])
    assert grid == {"layers": ["2", "4"], "lr": ["1e-4", "3e-4"], "balance": ["none"]}
    assert grid_points(grid) == [
        {"layers": layers, "lr": lr, "balance": "none"}
        for layers in ("2", "4")
        for lr in ("1e-4", "3e-4")
    ]


def test_runs_of_a_four_run_sweep_lists_the_best_first_as_in_the_summaries(swept, tmp_path):
    summaries = _summaries(swept)
    best = max(summaries, key=lambda name: summaries[name]["best_val_f1"])
    json_path = tmp_path / "runs.json"

    result = runner.invoke(app, ["runs", str(swept), "--json", str(json_path)])

    assert result.exit_code == 0, result.output
    table = json.loads(json_path.read_text())
    assert table["columns"][:3] == ["run", "layers", "lr"]  # only the settings that differ
    assert "width" not in table["columns"] and "best_val_f1" in table["columns"]
    rows = table["rows"]
    assert sorted(row["run"] for row in rows) == POINTS
    assert rows[0]["run"] == best
    for row in rows:
        summary = summaries[row["run"]]
        for key in ("best_val_f1", "best_val_f1_smoothed", "best_epoch"):
            assert row[key] == summary[key]
        assert row["status"] == "finished" and row["epochs_done"] == 1
    assert [row["best_val_f1"] for row in rows] == sorted(
        (summary["best_val_f1"] for summary in summaries.values()), reverse=True
    )
    first_row = next(line for line in result.output.splitlines() if line.startswith("│"))
    assert f"{summaries[best]['best_val_f1']:.4f}" in first_row


def test_runs_of_different_epochs_show_the_setting_and_the_epochs_done_apart(swept, tmp_path):
    for name in ("short", "long"):
        shutil.copytree(swept / POINTS[0], tmp_path / name)
    config = tmp_path / "long" / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 1\n", "epochs: 3\n"))
    (tmp_path / "long" / "summary.json").unlink()  # killed after its first epoch

    table = runs_table(tmp_path, sort="run")

    assert table.columns.count("epochs") == 1 and table.columns.count("epochs_done") == 1
    long, short = table.rows
    assert (long["epochs"], long["epochs_done"]) == (3, 1)
    assert long["status"] == "unfinished (1/3 epochs)"
    assert (short["epochs"], short["epochs_done"], short["status"]) == (1, 1, "finished")


def test_runs_sorts_on_any_column_and_refuses_an_unknown_one(swept):
    by_lr = runs_table(swept, sort="lr").rows
    assert [row["lr"] for row in by_lr] == [0.001, 0.001, 0.003, 0.003]
    assert [row["run"] for row in by_lr[:2]] == POINTS[0::2]  # ties by run name
    with pytest.raises(FercacheError, match="--sort 'f1': not a column; choose one of run, "):
        runs_table(swept, sort="f1")


def test_a_killed_sweep_resumes_and_skips_finished_runs(swept, tree):
    interrupted = swept / POINTS[2]
    (interrupted / "summary.json").unlink()  # as if killed after its last checkpoint
    rows = {row["run"]: row for row in runs_table(swept).rows}
    assert rows[POINTS[2]]["status"] == "unfinished (1/1 epochs)"
    assert rows[POINTS[2]]["best_val_f1"] is None
    assert runs_table(swept).rows[-1]["run"] == POINTS[2]  # empty scores sort last
    finished = swept / POINTS[0] / "best.safetensors"
    before = finished.stat().st_mtime_ns

    runs = sweep([tree["cache"]], tree["data"], swept, ["layers=1,2", "lr=1e-3,3e-3"], _request())

    statuses = {run.name: run.status for run in runs}
    assert statuses == {name: "finished earlier" for name in POINTS} | {POINTS[2]: "resumed"}
    assert finished.stat().st_mtime_ns == before
    assert (interrupted / "summary.json").is_file()
    narrower = TrainRequest(overrides=(*TINY, "width=8"), epochs=1, device="cpu", progress=False)
    with pytest.raises(FercacheError, match="width 16 -> 8"):
        sweep([tree["cache"]], tree["data"], swept, ["layers=1,2", "lr=1e-3,3e-3"], narrower)


def test_under_torchrun_each_rank_trains_its_share_alone(tree, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tree["root"] / "ranks"

    runs = sweep([tree["cache"]], tree["data"], out, ["layers=1,2,3"], _request())

    assert [run.name for run in runs] == ["layers=2"]  # points 1, 3, ... of 0, 1, 2
    assert sorted(path.name for path in out.iterdir()) == ["layers=2"]
    assert os.environ["RANK"] == "1" and os.environ["WORLD_SIZE"] == "2"


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["layers"], "expected key=value1,value2"),
        (["layers=1,,2"], "expected key=value1,value2"),
        (["layers=1", "model.layers=2"], "'layers' is already swept"),
        (["layers=2,2"], "a value is repeated"),
        (["lr=1e-3,0.001"], "several points resolve to the same settings"),
        (["foo.layers=1,2"], "unknown temporal setting"),
        (["layers=1,two"], "setting layers='two' should be like 4"),
        ([], "give at least one --grid"),
    ],
)
def test_bad_grids_are_refused_before_any_run(tree, tmp_path, grid, message):
    with pytest.raises(FercacheError, match=message):
        sweep([tree["cache"]], tree["data"], tmp_path / "out", grid, _request())
    assert not (tmp_path / "out").exists()


def test_runs_names_a_folder_without_runs_and_an_unreadable_summary(tmp_path):
    result = runner.invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 2 and "no training runs found" in result.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("layers: 2\n")
    (run / "summary.json").write_text("{not json")
    assert runs_table(tmp_path).rows[0]["status"] == "unreadable: summary.json"


# --- one key syntax for --set and --grid ----------------------------------------------------

FLAT_KEYS = [field.name for field in dataclasses.fields(TemporalConfig)]
DOTTED_KEYS = [f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys]
WRONG_KEYS = [
    "layerz",
    "model.lr",
    "foo.layers",
    "model.",
    ".layers",
    "model.layers.x",
    "Model.layers",
]


def test_the_sections_are_those_of_configs_temporal_yaml():
    # Every setting in exactly one section, in the order of the file (and of the dataclass).
    file_keys = list(_yaml_keys(Path(__file__).parents[1] / "configs" / "temporal.yaml"))
    assert [key for keys in SECTIONS.values() for key in keys] == FLAT_KEYS == file_keys


def _yaml_keys(path: Path) -> list[str]:
    return [line.split(":")[0] for line in path.read_text().splitlines() if line[:1].isalpha()]


def _value(key: str) -> str:
    """A valid value of the setting `key` names, as one --grid value (no comma)."""
    default = getattr(TemporalConfig(), key, 1)
    if isinstance(default, tuple):
        return default[0]
    if isinstance(default, dict):
        return "{expr: 2.0}"
    return str(default).lower() if isinstance(default, bool) else str(default)


@pytest.mark.parametrize("key", FLAT_KEYS + DOTTED_KEYS + WRONG_KEYS)
def test_grid_and_set_accept_the_same_keys_and_refuse_the_others_alike(key, tmp_path):
    value = _value(setting_key(key, SECTIONS))
    try:
        by_set, refused = load_config(None, [f"{key}={value}"]), None
    except FercacheError as error:
        by_set, refused = None, str(error)
    with pytest.raises(FercacheError) as swept:  # no cache: a run fails once the point is valid
        sweep([tmp_path / "no-cache"], tmp_path / "data", tmp_path / "out", [f"{key}={value}"],
              _request())  # fmt: skip
    if refused is not None:
        assert key in WRONG_KEYS
        assert str(swept.value) == refused and refused.startswith("unknown temporal setting(s)")
    else:
        assert key not in WRONG_KEYS
        assert "no such feature cache folder" in str(swept.value)
        flat = key.rpartition(".")[2]
        assert parse_grid([f"{key}={value}"]) == {flat: [value]}
        assert by_set == load_config(None, [f"{flat}={value}"])

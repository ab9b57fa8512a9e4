"""The run-folder convention both training phases share (issue 18): config.yaml, last.pt and
metrics.jsonl, the resume rule, and the one atomic writer every file goes through."""

import errno
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fercache.errors import FercacheError
from fercache.outputs import (
    create_text_exclusively,
    remove_dead_leftovers,
    temporary_name,
    write_atomically,
    write_text_atomically,
)
from fercache.resume import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    config_text,
    holds_run,
    read_checkpoint,
    read_config,
    read_metrics,
    resumed_settings,
    write_checkpoint,
    write_config,
    write_metrics,
)
from fercache.settings import read_yaml

SETTINGS = {"tasks": ["expr", "au"], "lr": 0.0003, "loss_weights": {"expr": 1.0}, "amp": True}


def _no_temporaries(folder) -> bool:
    return not [path.name for path in folder.iterdir() if ".tmp-" in path.name]


# --- config.yaml ----------------------------------------------------------------------------


def test_config_round_trips_under_its_header_and_is_a_valid_config_file(tmp_path):
    path = write_config(tmp_path / "run", SETTINGS, "resolved settings\nsecond line")
    assert path == tmp_path / "run" / CONFIG_FILE
    text = path.read_text()
    assert text == config_text(SETTINGS, "resolved settings\nsecond line")
    assert text.startswith("# resolved settings\n# second line\ntasks:\n")
    assert read_config(tmp_path / "run") == SETTINGS
    assert list(read_config(tmp_path / "run")) == list(SETTINGS)  # in the order given
    assert read_yaml(path) == SETTINGS  # `--config` takes it as it is


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "missing, so .* holds no run to resume"),
        (b"lr: [0.1\n", "unreadable saved settings"),
        (b"- lr\n- 0.1\n", "does not hold a mapping of setting: value"),
        (b"\xff\xfe\x00garbage", "unreadable saved settings"),
    ],
)
def test_a_missing_or_damaged_config_names_the_file(tmp_path, content, message):
    path = tmp_path / CONFIG_FILE
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FercacheError, match=f"^{re.escape(str(path))}: {message}"):
        read_config(tmp_path)


# --- last.pt --------------------------------------------------------------------------------


def test_checkpoint_round_trips_tensors_and_plain_values(tmp_path):
    state = {
        "model": {"weight": torch.randn(3, 4), "bias": torch.zeros(3)},
        "optimizer": torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]).state_dict(),
        "state": {"epochs_done": 2, "best_score": -math.inf, "history": [{"val_f1": 0.5}]},
        "fingerprints": ["abc"],
    }
    write_checkpoint(tmp_path, state)
    loaded = read_checkpoint(tmp_path)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["state"] == state["state"] and loaded["fingerprints"] == ["abc"]
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


def _truncated(path):
    torch.save({"model": {"weight": torch.randn(64, 64)}}, path)
    path.write_bytes(path.read_bytes()[:500])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (None, "no checkpoint to resume from"),
        (_truncated, "unreadable checkpoint"),
        (lambda path: path.write_bytes(b"not a checkpoint"), "unreadable checkpoint"),
        (lambda path: path.write_bytes(b""), "unreadable checkpoint"),
        # weights_only: a checkpoint holding anything but tensors and plain values is refused
        (lambda path: torch.save({"rng": np.random.default_rng(0)}, path), "unreadable"),
        (lambda path: torch.save([1, 2], path), "not a fercache checkpoint"),
    ],
)
def test_a_missing_or_damaged_checkpoint_names_the_file(tmp_path, damage, message):
    path = tmp_path / CHECKPOINT_FILE
    if damage is not None:
        damage(path)
    with pytest.raises(FercacheError, match=f"^{re.escape(str(path))}: {message}") as error:
        read_checkpoint(tmp_path)
    assert "\n" not in str(error.value)  # one line, however long torch's own message


# --- metrics.jsonl --------------------------------------------------------------------------


def test_metrics_are_rewritten_whole_from_the_history(tmp_path):
    assert read_metrics(tmp_path) == []  # before the first record
    history = [{"epoch": 1, "val_f1": 0.25}, {"epoch": 2, "val_f1": 0.5}]
    write_metrics(tmp_path, history)
    assert read_metrics(tmp_path) == history
    write_metrics(tmp_path, history[:1])  # a resumed run's history replaces the file
    assert read_metrics(tmp_path) == history[:1]
    assert (tmp_path / METRICS_FILE).read_text() == '{"epoch": 1, "val_f1": 0.25}\n'


def test_a_damaged_metrics_line_is_named(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"epoch": 1}\n{"epoch": 2, "val\n')
    with pytest.raises(FercacheError, match=rf"{re.escape(str(tmp_path / METRICS_FILE))}:2: "):
        read_metrics(tmp_path)


# --- the resume rule ------------------------------------------------------------------------


def test_a_resumed_run_keeps_its_settings_but_what_may_change():
    saved = {"epochs": 20, "lr": 0.1, "workers": 2}
    assert resumed_settings(saved, dict(saved), frozenset(), "run/config.yaml") == saved
    given = {**saved, "workers": 0}
    resumed = resumed_settings(saved, given, frozenset({"workers"}), "run/config.yaml")
    assert resumed == given and list(resumed) == list(saved)


def test_a_resumed_run_refuses_every_other_change_and_names_it():
    saved = {"epochs": 20, "lr": 0.1, "workers": 2}
    given = {"epochs": 30, "lr": 0.1, "workers": 0, "new": "x"}
    message = (
        "run/config.yaml: --resume continues the run with its saved settings, but the options "
        "given change epochs 20 -> 30, new '<unset>' -> 'x' (only workers may change on resume)"
    )
    with pytest.raises(FercacheError, match=f"^{re.escape(message)}"):
        resumed_settings(saved, given, frozenset({"workers"}), "run/config.yaml")
    with pytest.raises(FercacheError, match=r"change lr 0\.1 -> 0\.2\. Drop those options"):
        resumed_settings(saved, {**saved, "lr": 0.2}, frozenset(), "run/config.yaml")


def test_a_folder_holds_a_run_once_it_holds_a_checkpoint(tmp_path):
    assert not holds_run(tmp_path / "missing") and not holds_run(tmp_path)
    write_config(tmp_path, SETTINGS, "header")
    write_metrics(tmp_path, [{"epoch": 1}])
    assert not holds_run(tmp_path)  # nothing to resume from
    write_checkpoint(tmp_path, {"state": {}})
    assert holds_run(tmp_path)


# --- atomic writes --------------------------------------------------------------------------


def test_the_temporary_name_is_hidden_and_matches_no_glob_of_the_suffix(tmp_path):
    name = temporary_name(tmp_path / "video.h5")
    assert name.parent == tmp_path and name.name.startswith(".video.h5.tmp-")
    assert name.suffix != ".h5"


def test_a_full_disk_mid_checkpoint_keeps_the_last_one_and_leaves_no_partial_file(
    tmp_path, monkeypatch
):
    write_checkpoint(tmp_path, {"state": {"epochs_done": 1}})
    real_write = Path.write_bytes

    def half_written(path, data):  # as if the disk filled up halfway through
        real_write(path, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", half_written)
    message = f"{tmp_path / CHECKPOINT_FILE}: could not write the checkpoint (No space left"
    with pytest.raises(FercacheError, match=f"^{re.escape(message)}"):
        write_checkpoint(tmp_path, {"state": {"epochs_done": 2}})
    monkeypatch.undo()
    assert read_checkpoint(tmp_path)["state"] == {"epochs_done": 1}
    assert _no_temporaries(tmp_path)


def test_an_interrupt_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_metrics(tmp_path, [{"epoch": 1}])

    def interrupted(tmp):
        tmp.write_text('{"epoch": 1}\n{"epo')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / METRICS_FILE, interrupted, "the metrics")
    assert read_metrics(tmp_path) == [{"epoch": 1}]
    assert _no_temporaries(tmp_path)


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_file_created_exclusively_is_written_once_whole(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # as on exFAT or some network shares

        def no_link(source, target):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "settings.json"
    assert create_text_exclusively(path, '{"first": 1}', "the settings")
    assert not create_text_exclusively(path, '{"second": 2}', "the settings")
    assert path.read_text() == '{"first": 1}' and _no_temporaries(tmp_path)


def test_an_unwritable_folder_is_named_with_what_was_being_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FercacheError, match=r"file/run/config\.yaml: could not write the run's"):
        write_config(blocker / "run", SETTINGS, "header")
    with pytest.raises(FercacheError, match=r"could not write the report .*; free some space"):
        write_text_atomically(blocker / "report.md", "text", "the report", "free some space")


def test_leftovers_of_dead_writers_are_removed_and_a_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)  # fmt: skip
    dead = int(finished.stdout)  # its pid is free now (reuse within the test is unlikely)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        weights = tmp_path / f".best.safetensors.tmp-{dead}"
        pred = tmp_path / f".val.h5.tmp-{dead}"
        running = tmp_path / f".last.pt.tmp-{live.pid}"
        for path in (weights, pred, running, tmp_path / "best.safetensors"):
            path.write_bytes(b"half")
        assert remove_dead_leftovers(tmp_path, "val.h5") == [pred]  # only that file's
        assert remove_dead_leftovers(tmp_path) == [weights]
        assert sorted(path.name for path in tmp_path.iterdir()) == [
            f".last.pt.tmp-{live.pid}",
            "best.safetensors",
        ]
    finally:
        live.kill()
        live.wait()

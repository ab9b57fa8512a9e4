"""Concurrent extraction: per-video claims, two `extract` processes on one cache sharing it, and
a second one with other settings refused."""

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fercache.features.extract
import fercache.features.sharing
from fercache.claims import (
    HOST,
    PROCESS_STARTED,
    STALE_SECONDS,
    Claims,
    claim_path,
    read_holder,
)
from fercache.cli import app
from fercache.data.affwild2 import AffWild2
from fercache.errors import FercacheError
from fercache.features.extract import ExtractOptions, extract
from fercache.features.store import (
    PROVENANCE_NAME,
    read_manifest,
    read_store,
    store_path,
    store_state,
    write_store,
)
from tests.train_data import fake_provenance

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEOS = 4  # of the session tree: enough for two processes to interleave, few frames to compute


def _options(videos: tuple[str, ...], **overrides) -> ExtractOptions:
    settings = dict(
        backbone="resnet18", input_size=64, batch_size=48, workers=0, progress=False, videos=videos
    )
    return ExtractOptions(**{**settings, **overrides})


@pytest.fixture(scope="module")
def videos(synthetic_tree) -> tuple[str, ...]:
    return tuple(AffWild2(synthetic_tree).videos()[:VIDEOS])


@pytest.fixture(scope="module")
def reference_cache(synthetic_tree, videos, tmp_path_factory) -> Path:
    """One extraction of the videos by one process alone."""
    cache = tmp_path_factory.mktemp("alone") / "cache"
    report = extract(synthetic_tree, cache, _options(videos))
    assert report.extracted == list(videos) and report.elsewhere == []
    return cache


def _write_claim(folder: Path, item: str, pid: int, host: str = HOST) -> Path:
    path = claim_path(folder, item)
    record = {"pid": pid, "host": host, "started": time.time(), "token": "theirs"}
    path.write_text(json.dumps(record))
    return path


def _dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def test_a_claim_is_exclusive_until_released(tmp_path):
    mine, theirs = Claims(tmp_path), Claims(tmp_path)  # two holders, as two processes would be
    assert mine.take("v1") and mine.take("v1")
    holder = read_holder(claim_path(tmp_path, "v1"))
    assert (holder.pid, holder.host, holder.started) == (os.getpid(), HOST, mine.started)
    assert not theirs.take("v1")
    assert str(theirs.holder("v1")) == f"pid {os.getpid()}" and mine.holder("v1") is None
    assert theirs.take("v2")
    mine.release("v1")
    assert not claim_path(tmp_path, "v1").exists() and theirs.take("v1")
    mine.release("v1")  # no longer its claim: the new holder's stays
    assert claim_path(tmp_path, "v1").exists()
    with theirs:
        pass
    assert not list(tmp_path.iterdir()), "leaving the context releases every claim"


def test_a_dead_process_claim_is_taken_over(tmp_path):
    _write_claim(tmp_path, "v1", _dead_pid())
    _write_claim(tmp_path, "v2", os.getppid())  # alive, on this host
    claims = Claims(tmp_path)
    assert claims.take("v1") and read_holder(claim_path(tmp_path, "v1")).token == claims.token
    assert not claims.take("v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".v1.claim", ".v2.claim"]


def test_a_claim_of_this_pid_made_before_this_process_is_taken_over(tmp_path):
    path = _write_claim(tmp_path, "v1", os.getpid())  # pid reuse: a process of an earlier boot
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "started": PROCESS_STARTED - 3600}))
    claims = Claims(tmp_path)
    assert claims.holder("v1") is None and claims.take("v1")
    assert read_holder(path).token == claims.token


def test_another_host_claim_is_kept_until_stale(tmp_path):
    path = _write_claim(tmp_path, "v1", _dead_pid(), host="elsewhere")  # its pid means nothing
    claims = Claims(tmp_path)
    assert not claims.take("v1")
    assert str(claims.holder("v1")) == f"pid {read_holder(path).pid} on elsewhere"
    untouched = time.time() - STALE_SECONDS - 1
    os.utime(path, (untouched, untouched))
    assert claims.holder("v1") is None and claims.take("v1")


def test_claims_are_released_when_extract_fails(synthetic_tree, videos, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_compute, calls = fercache.features.extract._compute, []

    def fails_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FercacheError("out of memory, say")
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(fercache.features.extract, "_compute", fails_on_second_batch)
    with pytest.raises(FercacheError, match="out of memory"):
        extract(synthetic_tree, cache, _options(videos[:2]))
    assert len(calls) == 2
    assert not list(cache.glob(".*")), "claims (or temporaries) outlived the failed run"


def test_videos_another_process_holds_are_waited_for(
    synthetic_tree, videos, reference_cache, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    cache.mkdir()
    other = Claims(cache)  # another extract, holding two videos
    finished_by_other, abandoned = videos[1], videos[2]
    assert other.take(finished_by_other) and other.take(abandoned)
    lines: list[str] = []
    monkeypatch.setattr(
        fercache.features.sharing, "progress_line", lambda text, enabled: lines.append(text)
    )
    monkeypatch.setattr(fercache.features.sharing, "WAIT_POLL_SECONDS", 0.02)
    reports = []
    run = threading.Thread(
        target=lambda: reports.append(extract(synthetic_tree, cache, _options(videos)))
    )
    run.start()
    deadline = time.monotonic() + 60
    while not lines:
        assert time.monotonic() < deadline and run.is_alive(), "extract never waited"
        time.sleep(0.02)
    assert lines == [f"waiting for 2 videos being extracted by pid {os.getpid()}"]
    assert sorted(p.stem for p in cache.glob("*.h5")) == sorted({*videos} - {*other.held})
    time.sleep(0.1)
    assert run.is_alive() and not (cache / "manifest.json").exists()
    # The other process writes one store, then dies while computing the other video.
    name = f"{finished_by_other}.h5"
    shutil.copy(reference_cache / name, cache / f".{name}.copy")
    os.replace(cache / f".{name}.copy", cache / name)
    other.release(finished_by_other)
    _write_claim(cache, abandoned, _dead_pid())
    run.join(timeout=60)
    assert not run.is_alive()
    (report,) = reports
    assert report.extracted == [videos[0], videos[3], abandoned]  # the taken-over one last
    assert report.elsewhere == [finished_by_other]
    assert read_manifest(cache)["videos"] == read_manifest(reference_cache)["videos"]
    assert not list(cache.glob(".*"))


def test_only_dead_processes_leftovers_are_removed(
    synthetic_tree, videos, reference_cache, tmp_path
):
    cache = shutil.copytree(reference_cache, tmp_path / "cache")
    _write_claim(cache, "killed", _dead_pid())
    orphan = cache / ".killed.h5.tmp-4242"
    orphan.write_bytes(b"half a store")
    live = Claims(cache)  # another process, still writing this store
    assert live.take("running")
    (cache / ".running.h5.tmp-4343").write_bytes(b"half a store")
    report = extract(synthetic_tree, cache, _options(videos))
    assert report.extracted == [] and sorted(report.resumed) == sorted(videos)
    assert sorted(p.name for p in cache.glob(".*")) == [".running.claim", ".running.h5.tmp-4343"]


def _extract_when_both_are_ready(data: Path, cache: Path, videos, barrier, results) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    barrier.wait(timeout=120)
    report = extract(data, cache, _options(videos))
    results.put((report.extracted, report.elsewhere, report.resumed, str(report.manifest)))


def test_two_processes_started_at_once_share_the_videos(
    synthetic_tree, videos, reference_cache, tmp_path
):
    cache = tmp_path / "cache"
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    processes = [
        spawn.Process(
            target=_extract_when_both_are_ready,
            args=(synthetic_tree, cache, videos, barrier, results),
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    reports = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    extracted = [video for report in reports for video in report[0]]
    assert sorted(extracted) == sorted(videos), "each store is written by exactly one process"
    assert all(report[0] for report in reports), f"one process did all the work: {reports}"
    for (mine, elsewhere, resumed, manifest), theirs in zip(reports, reports[::-1], strict=True):
        assert sorted(mine + elsewhere + resumed) == sorted(videos)
        assert set(elsewhere + resumed) <= set(theirs[0])
        assert manifest == str(cache / "manifest.json")  # both wrote it; the last one stays
    assert read_manifest(cache) == read_manifest(reference_cache)
    for video in videos:
        alone, shared = (
            read_store(reference_cache / f"{video}.h5"),
            read_store(cache / f"{video}.h5"),
        )
        np.testing.assert_array_equal(shared.frames, alone.frames)
        np.testing.assert_array_equal(shared.features, alone.features)
        assert shared.provenance == alone.provenance
    assert not list(cache.glob(".*")), "claims or temporaries were left behind"


# --- another extraction's settings -------------------------------------------------------------

TINY = "test_resnet"  # timm's test model, at 32 or 48 px: a fast extraction


def _extract_or_refuse(data: Path, cache: Path, options: ExtractOptions, barrier) -> str:
    barrier.wait(timeout=120)
    try:
        extract(data, cache, options)
    except FercacheError as error:
        return str(error)
    return "extracted"


def _other_settings_in_a_process(data, cache, options, barrier, results) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    results.put(_extract_or_refuse(data, cache, options, barrier))


def test_two_processes_of_other_settings_on_one_new_cache_one_is_refused(
    synthetic_tree, videos, tmp_path
):
    cache, pair = tmp_path / "cache", videos[:2]
    sizes = (32, 48)
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    other = spawn.Process(
        target=_other_settings_in_a_process,
        args=(
            synthetic_tree,
            cache,
            _options(pair, backbone=TINY, input_size=sizes[1]),
            barrier,
            results,
        ),
    )
    other.start()
    mine = _extract_or_refuse(
        synthetic_tree, cache, _options(pair, backbone=TINY, input_size=sizes[0]), barrier
    )
    theirs = results.get(timeout=240)
    other.join(timeout=60)
    assert other.exitcode == 0
    outcomes = [mine, theirs]
    assert outcomes.count("extracted") == 1, outcomes
    (refusal,) = [outcome for outcome in outcomes if outcome != "extracted"]
    assert str(cache) in refusal and "another --out" in refusal
    winner = sizes[outcomes.index("extracted")]
    manifest = read_manifest(cache)
    assert sorted(manifest["videos"]) == sorted(pair)
    assert manifest["provenance"]["input_size"] == [3, winner, winner]
    for video in pair:
        state, found = store_state(store_path(cache, video))
        assert state == "complete" and found.fingerprint == manifest["provenance"]["fingerprint"]
    assert not list(cache.glob(".*")), "claims or temporaries were left behind"


def _record(cache: Path, backbone: str) -> str:
    """The settings record a first writer (still running) left in `cache`; its fingerprint."""
    provenance = fake_provenance(backbone, 16, 0)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / PROVENANCE_NAME).write_text(json.dumps(provenance.to_json()))
    return provenance.fingerprint


def test_an_extraction_of_other_settings_than_the_cache_records_is_refused_in_one_line(
    synthetic_tree, videos, tmp_path
):
    cache = tmp_path / "cache"
    recorded = _record(cache, "another-net")  # before the first store: no manifest yet
    arguments = [str(synthetic_tree), "--out", str(cache), "--videos", videos[0],
                 "--backbone=test_resnet", "--input-size=32", "--device=cpu", "--workers=0",
                 "--no-progress"]  # fmt: skip

    result = CliRunner().invoke(app, ["extract", *arguments])

    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {cache}: holds features of another-net") and recorded in line
    assert "this run's test_resnet" in line and "another --out" in line
    assert 'backbone "another-net" there, "test_resnet" here' in line
    assert sorted(path.name for path in cache.iterdir()) == [PROVENANCE_NAME]


def test_a_store_is_renamed_into_place_only_while_the_cache_records_its_settings(tmp_path):
    recorded = _record(tmp_path, "another-net")  # as an `extract --force` of them leaves it
    frames = np.arange(1, 4, dtype=np.int32)
    with pytest.raises(FercacheError, match=f"not written: .*fingerprint {recorded}"):
        write_store(tmp_path, "v1", frames, np.zeros((3, 16)), None, fake_provenance("net", 16, 0))
    assert sorted(path.name for path in tmp_path.iterdir()) == [PROVENANCE_NAME]

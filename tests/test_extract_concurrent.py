"""Concurrent extraction: per-video claims, and two `extract` processes on one cache sharing it."""

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

import fercache.features.extract
import fercache.features.sharing
from fercache.data.affwild2 import AffWild2
from fercache.errors import FercacheError
from fercache.features.claims import (
    HOST,
    PROCESS_STARTED,
    STALE_SECONDS,
    Claims,
    claim_path,
    read_holder,
)
from fercache.features.extract import ExtractOptions, extract
from fercache.features.store import read_manifest, read_store

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

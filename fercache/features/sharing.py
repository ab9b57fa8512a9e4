"""How `extract` processes share one cache. Under torchrun each rank takes a frame-count-balanced
share of the videos (`rank_share`). Several `extract` processes on one cache (started at once,
on one host or on several hosts sharing the folder) share the work through per-video claims
(`fercache.claims`):

1. The batch sampler (`fercache.features.frames.ClaimedBatches`) runs in the main process and
   walks the videos in order; before it hands out the first frame of a video it claims it
   (`Sharing.take`: `CACHE/.<video>.claim`, O_CREAT|O_EXCL, with pid, host and start time). A
   video held by a live process is left out of this pass, and so is one whose store another
   process wrote since this run started (checked after claiming). Claims are taken as the
   loader reaches them, a few batches ahead of the forward pass, so batches still run across
   video boundaries. A claimed video's leftover `.<video>.h5.tmp-*` (of a killed run) is
   deleted then, never another live process's.
2. The writer releases a video's claim once its store is renamed into place; an error or an
   interrupt releases every claim this process holds (try/finally). Held claims are touched
   while the batches run, so they stay visibly alive.
3. When the pass ends, the process waits for the videos it left out (`share_work`), polling
   and printing "waiting for N videos being extracted by pid P": a video whose store appears
   is done; a claim that disappears without a store (its holder failed) or is abandoned (the
   pid is dead on this host, or the claim has gone untouched for
   `fercache.claims.STALE_SECONDS` on any host) is taken over in another pass. So no
   video is computed twice unless its holder dies, and no process waits forever on a dead one.
4. Every process then writes `manifest.json` atomically from the complete stores it finds
   (all its videos are complete by then), so whichever writes last writes a whole, correct
   manifest; leftover temporaries and abandoned claims are removed (`remove_leftovers`).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fercache.claims import CLAIM_SUFFIX, Claims, Holder
from fercache.features.frames import VideoJob
from fercache.features.store import TMP_MARK, Provenance, store_path, store_state
from fercache.progress import progress_line

WAIT_POLL_SECONDS = 1.0  # how often a process checks on videos other processes are extracting


def rank_share(jobs: list[VideoJob], rank: int, world: int) -> list[VideoJob]:
    """Rank's videos: greedy largest-first onto the least-loaded rank; disjoint, no padding."""
    loads = [0] * world
    owner: dict[str, int] = {}
    for job in sorted(jobs, key=lambda job: (-len(job.frames), job.video)):
        lightest = min(range(world), key=lambda r: (loads[r], r))
        loads[lightest] += len(job.frames)
        owner[job.video] = lightest
    return [job for job in jobs if owner[job.video] == rank]


@dataclass
class Sharing:
    """This process's side of the claims: which videos it takes, which others hold."""

    out: Path
    provenance: Provenance
    force: bool
    started: float  # time.time() when this run began: --force keeps stores written since
    claims: Claims
    elsewhere: list[str]  # videos another process wrote during this run
    held: dict[str, Holder | None] = field(default_factory=dict)  # left to other processes

    def take(self, job: VideoJob) -> bool:
        """Claim `job` for this process; False (and noted) when another has it or wrote it."""
        if not self.claims.take(job.video):
            self.held[job.video] = self.claims.holder(job.video)
            return False
        if self.written_elsewhere(job):
            self.claims.release(job.video)
            return False
        for leftover in self.out.glob(f".{job.video}{TMP_MARK}*"):  # a killed run's
            leftover.unlink(missing_ok=True)
        return True

    def written_elsewhere(self, job: VideoJob) -> bool:
        """Whether another process wrote `job`'s store, with this provenance, during this run."""
        path = store_path(self.out, job.video)
        state, found = store_state(path)
        if state != "complete" or found.fingerprint != self.provenance.fingerprint:
            return False
        if self.force and path.stat().st_mtime < self.started:
            return False  # --force: a store from before this run is replaced
        self.elsewhere.append(job.video)
        return True


def share_work(
    todo: list[VideoJob],
    sharing: Sharing,
    compute: Callable[[list[VideoJob]], None],
    progress: bool,
) -> None:
    """Extract (`compute`, one pass) the videos of `todo` no other process holds, then wait for
    the held ones, taking over those whose holder fails or dies, until each is written by
    someone."""
    remaining = todo
    while remaining:
        sharing.held.clear()
        compute(remaining)
        remaining = [job for job in remaining if job.video in sharing.held]
        remaining = _wait_for_others(remaining, sharing, progress)


def _wait_for_others(jobs: list[VideoJob], sharing: Sharing, progress: bool) -> list[VideoJob]:
    """Poll until a video of `jobs` can be taken over; return those not written meanwhile."""
    shown = ""
    while jobs:
        jobs = [job for job in jobs if not sharing.written_elsewhere(job)]
        holders = {job.video: sharing.claims.holder(job.video) for job in jobs}
        if any(holder is None for holder in holders.values()):
            return jobs  # released without a store, or abandoned: the next pass takes it
        line = _waiting_line(list(holders.values()))
        if line != shown:
            progress_line(line, progress)
            shown = line
        time.sleep(WAIT_POLL_SECONDS)
    return jobs


def _waiting_line(holders: list[Holder]) -> str:
    counts: dict[str, int] = {}
    for holder in holders:
        counts[str(holder)] = counts.get(str(holder), 0) + 1
    by = ", ".join(
        name if len(counts) == 1 else f"{name} ({count})" for name, count in counts.items()
    )
    plural = "s" if len(holders) > 1 else ""
    return f"waiting for {len(holders)} video{plural} being extracted by {by}"


def remove_leftovers(out: Path, claims: Claims) -> None:
    """Delete the temporary stores and the claims that dead processes left, never a live
    process's: a video's leftovers go only while this process holds its claim."""
    videos = {path.name[1:].split(TMP_MARK)[0] for path in out.glob(f".*{TMP_MARK}*")}
    videos |= {path.name[1 : -len(CLAIM_SUFFIX)] for path in out.glob(f".*{CLAIM_SUFFIX}")}
    for video in sorted(videos):
        if claims.take(video):
            for leftover in out.glob(f".{video}{TMP_MARK}*"):
                leftover.unlink(missing_ok=True)
            claims.release(video)

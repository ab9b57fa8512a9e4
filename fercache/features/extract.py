"""Extraction: the frozen backbone over every frame of every video, into per-video stores.

Data flow: DataLoader workers read and decode JPEGs at native size as uint8 (batches run across
video boundaries, so short videos never starve the device) -> pinned, non-blocking copy ->
resize + normalise on the device -> `forward_features` + `forward_head(pre_logits=True)` (and
the classifier, when the checkpoint has one) under autocast on CUDA -> a writer thread that
assembles each video's rows and writes its store atomically (`fercache.features.store`) while the
next batches compute. Under torchrun each rank takes a frame-count-balanced share of the videos.

Several `extract` processes on one cache (started at once, on one host or on several hosts
sharing the folder) share the work through per-video claims (`fercache.features.claims`):

1. The batch sampler runs in the main process and walks the videos in order; before it hands
   out the first frame of a video it claims it (`CACHE/.<video>.claim`, O_CREAT|O_EXCL, with
   pid, host and start time). A video held by a live process is left out of this pass, and so
   is one whose store another process wrote since this run started (checked after claiming).
   Claims are taken as the loader reaches them, a few batches ahead of the forward pass, so
   batches still run across video boundaries. A claimed video's leftover `.<video>.h5.tmp-*`
   (of a killed run) is deleted then, never another live process's.
2. The writer releases a video's claim once its store is renamed into place; an error or an
   interrupt releases every claim this process holds (try/finally). Held claims are touched
   while the batches run, so they stay visibly alive.
3. When the pass ends, the process waits for the videos it left out, polling and printing
   "waiting for N videos being extracted by pid P": a video whose store appears is done; a
   claim that disappears without a store (its holder failed) or is abandoned (the pid is dead
   on this host, or the claim has gone untouched for `fercache.features.claims.STALE_SECONDS` on any
   host) is taken over in another pass. So no video is computed twice unless its holder dies,
   and no process waits forever on a dead one.
4. Every process then writes `manifest.json` atomically from the complete stores it finds
   (all its videos are complete by then), so whichever writes last writes a whole, correct
   manifest; leftover temporaries and abandoned claims are removed.
"""

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from fercache.backbone.network import Backbone, load_backbone, preprocess, resize_mode
from fercache.backbone.readout import DEFAULT_READOUT, Readout, check_readout, forward_readout
from fercache.data.affwild2 import AffWild2, frame_filename
from fercache.distributed import Ranks, distributed
from fercache.errors import FercacheError
from fercache.features.claims import CLAIM_SUFFIX, Claims, Holder
from fercache.features.store import (
    TMP_MARK,
    Provenance,
    check_manifest,
    open_store,
    other_store,
    store_path,
    store_state,
    write_manifest,
    write_store,
)
from fercache.progress import progress_counters, progress_line

WRITE_QUEUE_BATCHES = 8
WAIT_POLL_SECONDS = 1.0  # how often a process checks on videos other processes are extracting


@dataclass(frozen=True)
class ExtractOptions:
    """Everything `fercache extract` takes besides DATA and --out."""

    backbone: str | None = None
    checkpoint: Path | None = None
    batch_size: int | None = None
    workers: int | None = None
    dtype: str = "float16"
    device: str = "auto"
    force: bool = False
    videos: tuple[str, ...] = ()
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    init_seed: int = 0
    progress: bool = True
    pretrained: str | None = None  # timm's pretrained weights by name (tag, hf-hub:)
    allow_missing_head: bool = False  # a checkpoint without classifier: features, no logits
    layer: int | None = None  # an intermediate of timm's forward_intermediates; None: pooled
    pool: str = ""  # token models: avg, cls or tokens-mean; "": the network's own head
    tta: str = ""  # "flip": mean of each frame's and its mirror's features

    @property
    def readout(self) -> Readout:
        return Readout(-1 if self.layer is None else self.layer, self.pool, self.tta)


@dataclass
class VideoJob:
    """One video to extract: its frame numbers that have images, and their files."""

    video: str
    frames: np.ndarray
    folder: Path

    def path(self, frame: int) -> Path:
        return self.folder / frame_filename(frame)


@dataclass
class ExtractReport:
    """What a run did; `manifest` is None on ranks other than 0."""

    extracted: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # written by another process meanwhile
    skipped_frames: list[str] = field(default_factory=list)
    frames: int = 0
    seconds: float = 0.0
    manifest: Path | None = None

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def extract(data: Path, out: Path, options: ExtractOptions = ExtractOptions()) -> ExtractReport:
    """Extract features of every frame of DATA's videos into OUT; resume where stores exist."""
    if options.dtype not in ("float16", "float32"):
        raise FercacheError(f"--dtype must be float16 or float32, not '{options.dtype}'")
    with distributed(options.device) as ranks:
        return _extract(data, Path(out), options, ranks)


def _extract(data: Path, out: Path, options: ExtractOptions, ranks: Ranks) -> ExtractReport:
    # Everything that can fail on the user's input fails here, before a file is written.
    backbone = load_backbone(
        options.backbone,
        options.checkpoint,
        options.init_seed,
        options.input_size,
        options.mean,
        options.std,
        pretrained=options.pretrained,
        allow_missing_head=options.allow_missing_head,
    )
    if options.layer is not None and options.layer < 0:
        raise FercacheError(
            f"--layer {options.layer}: give an intermediate's index from 0; leave --layer out "
            "for the pooled output"
        )
    feature_dim = check_readout(
        backbone.model, backbone.name, options.readout, backbone.feature_dim
    )
    provenance = _provenance(backbone, options, feature_dim)
    dataset = AffWild2(data)
    report = ExtractReport()
    jobs = _video_jobs(dataset, options.videos, report)
    check_manifest(out, provenance, options.force)
    started = time.time()
    # Shares are cut from all selected videos, not from the unfinished ones, so every rank
    # computes the same split even while other ranks are already writing.
    share = _rank_share(jobs, ranks.rank, ranks.world_size)
    todo = [job for job in share if _needs_work(out, job, provenance, options.force)]
    report.resumed = sorted({job.video for job in share} - {job.video for job in todo})
    out.mkdir(parents=True, exist_ok=True)
    with Claims(out) as claims:
        sharing = _Sharing(out, provenance, options.force, started, claims, report)
        _share_work(backbone, todo, options, ranks.device, sharing)
        ranks.barrier()
        if ranks.is_main:
            report.manifest = write_manifest(out, provenance, _finished_stores(out, provenance))
            _remove_leftovers(out, claims)
    return report


def _provenance(backbone: Backbone, options: ExtractOptions, feature_dim: int) -> Provenance:
    config = backbone.data_config
    readout = options.readout
    return Provenance(
        backbone=backbone.name,
        checkpoint=backbone.checkpoint,
        checkpoint_sha256=backbone.checkpoint_sha256,
        init_seed=options.init_seed,
        input_size=config.input_size,
        mean=config.mean,
        std=config.std,
        interpolation=resize_mode(config.interpolation),
        dtype=options.dtype,
        feature_dim=feature_dim,
        # an intermediate block has no classifier: no logits are stored with --layer
        num_classes=backbone.num_classes if readout.layer < 0 else 0,
        pretrained=backbone.pretrained,
        weights_source=backbone.weights_source,
        layer=readout.layer,
        pool=readout.pool,
        tta=readout.tta,
    )


def _video_jobs(
    dataset: AffWild2, selected: Iterable[str], report: ExtractReport
) -> list[VideoJob]:
    names = dataset.videos()
    selected = list(selected)
    unknown = sorted(set(selected) - set(names))
    if unknown:
        raise FercacheError(
            f"{dataset.images}: no image folder for video(s) {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; --videos takes folder names under it"
        )
    jobs = []
    for video in selected or names:
        frames, _ = dataset.image_frames(video)
        if len(frames) == 0:
            report.empty.append(video)
            continue
        jobs.append(VideoJob(video, frames, dataset.images / video))
    if not jobs:
        raise FercacheError(f"{dataset.images}: no video folder holds frames named 00001.jpg ...")
    return jobs


def _needs_work(out: Path, job: VideoJob, provenance: Provenance, force: bool) -> bool:
    state, found = store_state(store_path(out, job.video))
    if state != "complete":
        return True
    if found.fingerprint == provenance.fingerprint:
        return force
    if force:
        return True
    raise other_store(store_path(out, job.video), found, provenance)


def _rank_share(jobs: list[VideoJob], rank: int, world: int) -> list[VideoJob]:
    """Rank's videos: greedy largest-first onto the least-loaded rank; disjoint, no padding."""
    loads = [0] * world
    owner: dict[str, int] = {}
    for job in sorted(jobs, key=lambda job: (-len(job.frames), job.video)):
        lightest = min(range(world), key=lambda r: (loads[r], r))
        loads[lightest] += len(job.frames)
        owner[job.video] = lightest
    return [job for job in jobs if owner[job.video] == rank]


def _finished_stores(out: Path, provenance: Provenance) -> dict[str, dict]:
    """{video: {rows, skipped}} of every complete store in OUT with this provenance."""
    finished = {}
    for path in sorted(out.glob("*.h5")):
        state, found = store_state(path)
        if state == "complete" and found.fingerprint == provenance.fingerprint:
            rows, skipped = _store_counts(path)
            finished[path.stem] = {"rows": rows, "skipped": skipped}
    return finished


def _store_counts(path: Path) -> tuple[int, int]:
    with open_store(path) as store:
        return int(store["frames"].shape[0]), len(store.attrs["skipped_frames"])


@dataclass
class _Sharing:
    """This process's side of the claims: which videos it takes, which others hold."""

    out: Path
    provenance: Provenance
    force: bool
    started: float  # time.time() when this run began: --force keeps stores written since
    claims: Claims
    report: ExtractReport
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
        self.report.elsewhere.append(job.video)
        return True


def _share_work(
    backbone: Backbone,
    todo: list[VideoJob],
    options: ExtractOptions,
    device: torch.device,
    sharing: _Sharing,
) -> None:
    """Extract the videos of `todo` no other process holds, then wait for the held ones, taking
    over those whose holder fails or dies, until each is written by someone."""
    remaining = todo
    while remaining:
        sharing.held.clear()
        _run(backbone, remaining, options, device, sharing)
        remaining = [job for job in remaining if job.video in sharing.held]
        remaining = _wait_for_others(remaining, sharing, options.progress)


def _wait_for_others(jobs: list[VideoJob], sharing: _Sharing, progress: bool) -> list[VideoJob]:
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


def _remove_leftovers(out: Path, claims: Claims) -> None:
    """Delete the temporary stores and the claims that dead processes left, never a live
    process's: a video's leftovers go only while this process holds its claim."""
    videos = {path.name[1:].split(TMP_MARK)[0] for path in out.glob(f".*{TMP_MARK}*")}
    videos |= {path.name[1 : -len(CLAIM_SUFFIX)] for path in out.glob(f".*{CLAIM_SUFFIX}")}
    for video in sorted(videos):
        if claims.take(video):
            for leftover in out.glob(f".{video}{TMP_MARK}*"):
                leftover.unlink(missing_ok=True)
            claims.release(video)


class FrameDataset(Dataset):
    """Every frame of the given videos, in order, decoded to uint8 CHW at native size.

    An unreadable file yields an empty image and the reason, so one bad JPEG costs one row,
    not the run.
    """

    def __init__(self, jobs: list[VideoJob]) -> None:
        self.paths = [job.path(frame) for job in jobs for frame in job.frames]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = np.array(image.convert("RGB"))
            return index, torch.from_numpy(pixels).permute(2, 0, 1), ""
        except (UnidentifiedImageError, OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            return index, torch.empty(0, dtype=torch.uint8), f"{path}: {reason}"


class ClaimedBatches(Sampler[list[int]]):
    """FrameDataset indices in batches of `batch_size`, across video boundaries, of the videos
    `take` accepts; it is asked for each video when the first batch reaching it is drawn.

    The DataLoader draws batches in the main process, a few ahead of the forward pass, so
    videos are claimed in order as the run reaches them.
    """

    def __init__(
        self, jobs: list[VideoJob], batch_size: int, take: Callable[[VideoJob], bool]
    ) -> None:
        self.jobs, self.batch_size, self.take = jobs, batch_size, take

    def __iter__(self):
        batch: list[int] = []
        start = 0
        for job in self.jobs:
            if self.take(job):
                for index in range(start, start + len(job.frames)):
                    batch.append(index)
                    if len(batch) == self.batch_size:
                        yield batch
                        batch = []
            start += len(job.frames)
        if batch:
            yield batch


def collate_frames(items: list[tuple[int, torch.Tensor, str]]) -> dict:
    """Stack the decoded frames (a list when sizes differ) and keep the failures apart."""
    good = [(index, image) for index, image, reason in items if not reason]
    images = [image for _, image in good]
    same_size = len({image.shape for image in images}) <= 1
    return {
        "index": torch.tensor([index for index, _ in good], dtype=torch.long),
        "images": torch.stack(images) if images and same_size else images,
        "failed": [(index, reason) for index, _, reason in items if reason],
    }


def forward_backbone(
    model: torch.nn.Module,
    batch: torch.Tensor,
    with_logits: bool,
    readout: Readout = DEFAULT_READOUT,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled pre-logit features and, when the model has a head, its logits; or, for another
    readout (`--layer`, `--pool`, `--tta`), what `fercache.backbone.readout` defines."""
    with torch.autocast(
        batch.device.type, dtype=torch.float16, enabled=batch.device.type == "cuda"
    ):
        if readout.is_default:
            pooled = model.forward_head(model.forward_features(batch), pre_logits=True)
            logits = model.get_classifier()(pooled) if with_logits else None
        else:
            pooled, logits = forward_readout(model, batch, with_logits, readout)
    return pooled.float(), logits.float() if logits is not None else None


@dataclass
class _VideoRows:
    """A video's rows as batches deliver them; complete when every frame is accounted for."""

    job: VideoJob
    start: int
    features: np.ndarray
    logits: np.ndarray | None
    ok: np.ndarray
    failed: list[tuple[int, str]] = field(default_factory=list)
    seen: int = 0

    @property
    def complete(self) -> bool:
        return self.seen == len(self.job.frames)

    def take(self, dataset_index: int, features: np.ndarray, logits: np.ndarray | None) -> None:
        row = dataset_index - self.start
        self.features[row] = features
        if logits is not None:
            self.logits[row] = logits
        self.ok[row] = True
        self.seen += 1

    def fail(self, dataset_index: int, reason: str) -> None:
        self.failed.append((int(self.job.frames[dataset_index - self.start]), reason))
        self.seen += 1


class StoreWriter:
    """Assembles rows per video on a background thread and writes each finished store.

    Rows arrive as (dataset index, features, logits) batches plus failures; the thread keeps
    the GPU/CPU compute path free of HDF5 and file-system work. An error on the thread is
    re-raised in the caller at the next `put` or at `close`.
    """

    def __init__(
        self,
        jobs: list[VideoJob],
        out: Path,
        provenance: Provenance,
        on_video_done=lambda job: None,
    ) -> None:
        self.jobs, self.out, self.provenance = jobs, out, provenance
        self.on_video_done = on_video_done
        self.starts = np.cumsum([0] + [len(job.frames) for job in jobs])
        self.pending: dict[int, _VideoRows] = {}
        self.failed: list[str] = []
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="fercache-store-writer")
        self.thread.start()

    def put(self, index: np.ndarray, features: np.ndarray, logits, failed) -> None:
        self._raise_if_failed()
        self.queue.put((index, features, logits, failed))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()
        unfinished = [rows.job.video for rows in self.pending.values()]
        if unfinished:
            raise RuntimeError(f"frames of {unfinished} never reached the writer")

    def abort(self) -> None:
        """Stop the thread without writing anything more (the caller is failing)."""
        self.error = self.error or RuntimeError("aborted")
        self.queue.put(None)
        self.thread.join()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _drain(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._add(*item)
                except BaseException as error:  # handed to the main thread, never lost
                    self.error = error

    def _add(self, index: np.ndarray, features: np.ndarray, logits, failed) -> None:
        for row, dataset_index in enumerate(index.tolist()):
            self._rows_of(dataset_index).take(
                dataset_index, features[row], logits[row] if logits is not None else None
            )
        for dataset_index, reason in failed:
            self._rows_of(dataset_index).fail(dataset_index, reason)
            self.failed.append(reason)
        for video_index in [v for v, rows in self.pending.items() if rows.complete]:
            self._write(self.pending.pop(video_index))

    def _rows_of(self, dataset_index: int) -> _VideoRows:
        video_index = int(np.searchsorted(self.starts, dataset_index, side="right")) - 1
        if video_index not in self.pending:
            job = self.jobs[video_index]
            self.pending[video_index] = _VideoRows(
                job=job,
                start=int(self.starts[video_index]),
                features=np.empty((len(job.frames), self.provenance.feature_dim), np.float32),
                logits=(
                    np.empty((len(job.frames), self.provenance.num_classes), np.float32)
                    if self.provenance.num_classes
                    else None
                ),
                ok=np.zeros(len(job.frames), bool),
            )
        return self.pending[video_index]

    def _write(self, rows: _VideoRows) -> None:
        keep = rows.ok
        write_store(
            self.out,
            rows.job.video,
            frames=rows.job.frames[keep],
            features=rows.features[keep],
            logits=rows.logits[keep] if rows.logits is not None else None,
            provenance=self.provenance,
            skipped=rows.failed,
        )
        self.on_video_done(rows.job)


def _run(
    backbone: Backbone,
    todo: list[VideoJob],
    options: ExtractOptions,
    device: torch.device,
    sharing: _Sharing,
) -> None:
    """One pass over `todo`: computes and writes the videos `sharing` takes as they come."""
    if not todo:
        return
    report, claims, provenance = sharing.report, sharing.claims, sharing.provenance
    model = backbone.model.to(device).to(memory_format=torch.channels_last)
    total_frames = sum(len(job.frames) for job in todo)
    written: set[str] = set()
    started = time.perf_counter()
    with progress_counters(
        {"videos": len(todo), "frames": total_frames}, enabled=options.progress
    ) as advance:

        def take(job: VideoJob) -> bool:
            if sharing.take(job):
                return True
            advance("videos")  # the bars count the cache's progress, whoever computes it
            advance("frames", len(job.frames))
            return False

        def done(job: VideoJob) -> None:  # on the writer thread, once the store is in place
            written.add(job.video)
            claims.release(job.video)
            advance("videos")

        loader = _loader(todo, options, device, take)
        writer = StoreWriter(todo, sharing.out, provenance, on_video_done=done)
        with_logits = provenance.num_classes > 0  # none with --layer
        try:
            with torch.inference_mode():
                for batch in loader:
                    claims.refresh()
                    # A batch whose every file failed has nothing to compute.
                    has_rows = len(batch["index"]) > 0
                    features, logits = (
                        _compute(model, batch, backbone, device, options.readout, with_logits)
                        if has_rows
                        else (None, None)
                    )
                    writer.put(batch["index"].numpy(), features, logits, batch["failed"])
                    advance("frames", len(batch["index"]) + len(batch["failed"]))
        except BaseException:
            writer.abort()
            raise
        writer.close()
    extracted = [job for job in todo if job.video in written]
    report.seconds += time.perf_counter() - started
    report.frames += sum(len(job.frames) for job in extracted)
    report.extracted += [job.video for job in extracted]
    report.skipped_frames += writer.failed


def _loader(
    todo: list[VideoJob],
    options: ExtractOptions,
    device: torch.device,
    take: Callable[[VideoJob], bool],
) -> DataLoader:
    workers = _default_workers() if options.workers is None else options.workers
    batch_size = options.batch_size or (256 if device.type == "cuda" else 64)
    return DataLoader(
        FrameDataset(todo),
        batch_sampler=ClaimedBatches(todo, batch_size, take),
        num_workers=workers,
        collate_fn=collate_frames,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


def _default_workers() -> int:
    # Decoding a 112x112 JPEG is cheap; one worker per ~4 cores keeps any GPU fed, and on a
    # small CPU machine one worker leaves the cores to the forward pass.
    return max(1, min(8, (os.cpu_count() or 2) // 4))


def _compute(
    model: torch.nn.Module,
    batch: dict,
    backbone: Backbone,
    device: torch.device,
    readout: Readout = DEFAULT_READOUT,
    with_logits: bool | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    images = batch["images"]
    if isinstance(images, list):
        images = [image.to(device, non_blocking=True) for image in images]
    else:
        images = images.to(device, non_blocking=True)
    with_logits = backbone.num_classes > 0 if with_logits is None else with_logits
    features, logits = forward_backbone(
        model, preprocess(images, backbone.data_config), with_logits, readout
    )
    return features.cpu().numpy(), logits.cpu().numpy() if logits is not None else None

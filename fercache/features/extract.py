"""Extraction: the frozen backbone over every frame of every video, into per-video stores.

Data flow: DataLoader workers read and decode JPEGs at native size as uint8 (batches run across
video boundaries, so short videos never starve the device; `fercache.features.frames`) ->
pinned, non-blocking copy -> resize + normalise on the device -> `forward_features` +
`forward_head(pre_logits=True)` (and the classifier, when the checkpoint has one) under autocast
on CUDA -> a writer thread that assembles each video's rows and writes its store atomically
(`fercache.features.store_writer`) while the next batches compute.

Under torchrun each rank takes a frame-count-balanced share of the videos; several `extract`
processes on one cache share the work through per-video claims, waiting for the videos others
hold: `fercache.features.sharing`. Every process then writes `manifest.json` atomically from the
complete stores it finds.
"""

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fercache.backbone.network import Backbone, load_backbone, preprocess, resize_mode
from fercache.backbone.readout import DEFAULT_READOUT, Readout, check_readout, forward_readout
from fercache.claims import Claims
from fercache.data.affwild2 import AffWild2
from fercache.distributed import Ranks, distributed
from fercache.errors import FercacheError
from fercache.features.frames import ClaimedBatches, FrameDataset, VideoJob, collate_frames
from fercache.features.sharing import Sharing, rank_share, remove_leftovers, share_work
from fercache.features.store import (
    Provenance,
    open_store,
    prepare_cache,
    store_path,
    store_state,
    write_manifest,
)
from fercache.features.store_writer import StoreWriter
from fercache.outputs import output_folder
from fercache.progress import progress_counters


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
    if options.std is not None and not all(0 < value < math.inf for value in options.std):
        raise FercacheError(
            f"--std {','.join(f'{value:g}' for value in options.std)}: every channel's std must "
            "be a positive number (images are divided by it)"
        )
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
    provenance = extraction_provenance(backbone, options, feature_dim)
    dataset = AffWild2(data)
    report = ExtractReport()
    jobs = _video_jobs(dataset, options.videos, report)
    output_folder(out)
    prepare_cache(out, provenance, options.force)
    started = time.time()
    # Shares are cut from all selected videos, not from the unfinished ones, so every rank
    # computes the same split even while other ranks are already writing.
    share = rank_share(jobs, ranks.rank, ranks.world_size)
    todo = [job for job in share if _needs_work(out, job, provenance, options.force)]
    report.resumed = sorted({job.video for job in share} - {job.video for job in todo})
    with Claims(out) as claims:
        sharing = Sharing(out, provenance, options.force, started, claims, report.elsewhere)

        def compute(jobs: list[VideoJob]) -> None:
            _run(backbone, jobs, options, ranks.device, sharing, report)

        share_work(todo, sharing, compute, options.progress)
        ranks.barrier()
        if ranks.is_main:
            report.manifest = write_manifest(
                out, provenance, _finished_stores(out, provenance), report.empty
            )
            remove_leftovers(out, claims)
    return report


def extraction_provenance(
    backbone: Backbone, options: ExtractOptions, feature_dim: int
) -> Provenance:
    """What the stores of `backbone`'s features extracted with `options` record (`analyse`
    compares a run's caches with it before extracting)."""
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
    """Missing, incomplete or --force; and a store of other features, which `prepare_cache`
    found to be no more than a stray in a cache of `provenance` (copied in, say)."""
    state, found = store_state(store_path(out, job.video))
    return state != "complete" or force or found.fingerprint != provenance.fingerprint


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


def _run(
    backbone: Backbone,
    todo: list[VideoJob],
    options: ExtractOptions,
    device: torch.device,
    sharing: Sharing,
    report: ExtractReport,
) -> None:
    """One pass over `todo`: computes and writes the videos `sharing` takes as they come."""
    if not todo:
        return
    claims, provenance = sharing.claims, sharing.provenance
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

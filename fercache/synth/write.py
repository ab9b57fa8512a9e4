"""Writing the synthetic tree: frames, annotation files, the pools and synth.json.

The tree has exactly the layout of the real data (`cropped_aligned/<video>/00001.jpg`,
`Annotations/<task>_Recognition_Challenge/<Split>_Set/<video>.txt`) plus `pools/` for the
semi-supervised phase and `synth.json`, written last, which records what was generated and
every planted quirk. Videos and pool chunks are rendered by worker processes; the same
`SynthConfig` always gives the same bytes, whatever their number.
"""

import json
import os
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing import get_context
from operator import call
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fercache.claims import claim_path
from fercache.data.affwild2 import IMAGES_DIRNAME, frame_filename
from fercache.data.layout import (
    ANNOTATION_FOLDERS,
    IMAGE_SIZE,
    LABELLED_CSV,
    LANDMARKS_CSV,
    POOLS_DIRNAME,
    SPLIT_FOLDERS,
)
from fercache.data.tasks import AU, EXPR, VA
from fercache.errors import FercacheError
from fercache.outputs import output_folder, write_text_atomically
from fercache.progress import progress_bar
from fercache.resume import RUN_CLAIM, writing_run
from fercache.synth.face import Geometry
from fercache.synth.plan import N_CLASSES, SynthConfig, VideoPlan, plan_videos
from fercache.synth.pools import (
    PoolKind,
    plan_labelled_pool,
    pool_image,
    pool_kinds,
    pool_name,
    write_labelled_csv,
    write_landmarks,
)
from fercache.synth.render import render_face
from fercache.synth.streams import Stream
from fercache.synth.timeline import VideoTimeline, simulate_video

FORMAT_VERSION = 1
SYNTH_JSON = "synth.json"  # written last: what the tree holds; its presence marks a whole tree
_POOL_CHUNK = 250  # pool images per worker task


def _annotation_path(out: Path, task: str, split: str, video: str) -> Path:
    return out / "Annotations" / ANNOTATION_FOLDERS[task] / SPLIT_FOLDERS[split] / f"{video}.txt"


def _format_va(values: np.ndarray) -> str:
    if values[0] == VA.invalid:
        return f"{VA.invalid:g},{VA.invalid:g}"
    valence, arousal = np.round(values, 3) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{valence:.3f},{arousal:.3f}"


def _annotation_lines(timeline: VideoTimeline) -> dict[str, list[str]]:
    return {
        "expr": [str(label) for label in timeline.expr.tolist()],
        "au": [",".join(map(str, row)) for row in timeline.au.tolist()],
        "va": [_format_va(row) for row in timeline.va],
    }


class _Done(NamedTuple):
    """What a finished worker task reports: items for the progress bar, a video's record,
    the landmarks of labelled pool images by index."""

    items: int
    video: str | None = None
    record: dict | None = None
    landmarks: dict[int, np.ndarray] | None = None


def _write_video(out: Path, plan: VideoPlan, seed: int) -> _Done:
    timeline = simulate_video(plan, seed)
    folder = out / IMAGES_DIRNAME / plan.name
    folder.mkdir(parents=True, exist_ok=True)
    for t in np.flatnonzero(timeline.has_image).tolist():
        face = render_face(
            timeline.identity,
            Geometry.from_array(timeline.geometry[t]),
            timeline.nuisance[t],
            IMAGE_SIZE,
        )
        face.save(folder / frame_filename(t + 1), quality=int(timeline.jpeg_quality[t]))
    headers = {"expr": EXPR.header, "au": AU.header, "va": VA.header}
    for task, lines in _annotation_lines(timeline).items():
        path = _annotation_path(out, task, plan.split, plan.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([headers[task], *lines]) + "\n", newline="\n")
    return _Done(plan.frames, plan.name, _video_record(plan, timeline))


def _video_record(plan: VideoPlan, timeline: VideoTimeline) -> dict:
    has_image = timeline.has_image
    valid = timeline.expr[timeline.expr != EXPR.invalid]
    trailing = len(has_image) - (int(np.flatnonzero(has_image)[-1]) + 1 if has_image.any() else 0)
    return {
        "split": plan.split,
        "identity": plan.identity,
        "frames": plan.frames,
        "images": int(has_image.sum()),
        "frames_without_image": int((~has_image).sum()),
        "trailing_frames_without_image": trailing,
        "expr_invalid": int((timeline.expr == EXPR.invalid).sum()),
        "expr_counts": np.bincount(valid, minlength=N_CLASSES).tolist(),
        "au_invalid": int((timeline.au == AU.invalid).all(axis=1).sum()),
        "va_invalid": int((timeline.va == VA.invalid).all(axis=1).sum()),
    }


def _write_pool_chunk(
    out: Path, seed: int, kind: PoolKind, start: int, labels: list[int | None]
) -> _Done:
    folder = out / POOLS_DIRNAME / kind.folder
    folder.mkdir(parents=True, exist_ok=True)
    landmarks = {}
    for offset, label in enumerate(labels):
        image, quality, landmarks[start + offset] = pool_image(seed, kind, start + offset, label)
        image.save(folder / pool_name(start + offset), quality=quality)
    return _Done(len(labels), landmarks=landmarks if kind.stream == Stream.LABELLED else None)


def _tasks(
    out: Path, config: SynthConfig, plans: list[VideoPlan], labelled: np.ndarray
) -> list[Callable[[], _Done]]:
    """All the work, biggest first so that the workers finish together."""
    kinds = pool_kinds(config)
    by_length = sorted(plans, key=lambda plan: -plan.frames)
    videos = [partial(_write_video, out, plan, config.seed) for plan in by_length]
    pool_labels: dict[str, list[int | None]] = {
        "labelled": labelled.tolist(),
        "unlabelled": [None] * config.unlabelled_pool,
    }
    pools = [
        partial(
            _write_pool_chunk,
            out,
            config.seed,
            kinds[name],
            start,
            labels[start : start + _POOL_CHUNK],
        )
        for name, labels in pool_labels.items()
        for start in range(0, len(labels), _POOL_CHUNK)
    ]
    return videos + pools


def _results(tasks: list[Callable[[], _Done]], workers: int) -> Iterator[_Done]:
    if workers == 1:
        yield from map(call, tasks)
        return
    # spawn, not fork: the caller may hold threads (progress bars, torch) that fork would copy
    with get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(call, tasks)


def _prepare_output(out: Path, force: bool) -> None:
    """Empty `out` (held by this process: its claim is kept) for a new tree, or refuse."""
    hold = claim_path(out, RUN_CLAIM)
    contents = [path for path in out.iterdir() if path != hold]
    if contents:
        if not (out / SYNTH_JSON).is_file():
            raise FercacheError(
                f"{out} is not empty and holds no synth.json, so it is not a complete synthetic "
                "tree: choose an empty or new folder (--force only replaces a synthetic tree; "
                "delete the folder yourself if it is a half-written one)"
            )
        if not force:
            raise FercacheError(
                f"{out} already holds a synthetic tree: pass --force to replace it, "
                "or choose another folder"
            )
        for path in contents:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _readme(config: SynthConfig) -> str:
    return (
        f"Synthetic Aff-Wild2-shaped tree made by fercache (format {FORMAT_VERSION}); "
        "synth.json lists what it holds and where its quirks are.\n"
        f"Command: fercache synth OUT --videos {config.videos} --frames {config.frames} "
        f"--seed {config.seed} --labelled {config.labelled_pool} "
        f"--unlabelled {config.unlabelled_pool} (val_fraction {config.val_fraction})\n"
    )


def generate(out: Path, config: SynthConfig, progress: bool = True, *, force: bool = False) -> dict:
    """Write the synthetic tree into `out` and return what synth.json records.

    `out` must be missing or empty; with `force`, an earlier synthetic tree (a folder holding
    synth.json) is replaced. Any other folder is refused, never deleted.
    """
    config.validate()
    out = Path(out)
    output_folder(out, "OUT")  # a file, a read-only or full disk: one line before any work
    advice = (
        f"the tree is incomplete (no {SYNTH_JSON}): delete {out}, make room and run the command "
        "again"
    )
    wait = "wait until it ends, or choose another folder"
    with writing_run(out, what="a synthetic tree", wait=wait):
        _prepare_output(out, force)
        try:
            return _write_tree(out, config, progress, advice)
        except OSError as error:  # a full disk: in a worker too, which passes the error on
            raise FercacheError(
                f"{out}: could not write the synthetic tree ({error.strerror or error}); {advice}"
            ) from error


def _write_tree(out: Path, config: SynthConfig, progress: bool, advice: str) -> dict:
    plans = plan_videos(config)
    labelled = plan_labelled_pool(config)
    tasks = _tasks(out, config, plans, labelled)
    workers = min(config.workers or os.cpu_count() or 1, len(tasks))
    total = sum(plan.frames for plan in plans) + config.labelled_pool + config.unlabelled_pool
    videos: dict[str, dict] = {}
    landmarks: dict[int, np.ndarray] = {}
    with progress_bar("synthesising frames and images", total, progress) as advance:
        for done in _results(tasks, workers):
            if done.video is not None:
                videos[done.video] = done.record
            landmarks.update(done.landmarks or {})
            advance(done.items)
    kinds = pool_kinds(config)
    pools = out / POOLS_DIRNAME
    write_labelled_csv(pools / LABELLED_CSV, kinds["labelled"].folder, labelled)
    write_landmarks(pools / LANDMARKS_CSV, kinds["labelled"].folder, landmarks)
    pair = sorted(name for name in videos if name.endswith(("_left", "_right")))
    info = {
        "fercache_synth": FORMAT_VERSION,
        "config": config.recorded(),
        "videos": dict(sorted(videos.items())),
        "left_right_pair": pair,
        "pools": {
            "labelled": config.labelled_pool,
            "labelled_counts": np.bincount(labelled, minlength=N_CLASSES).tolist(),
            "labelled_identities": kinds["labelled"].identities,
            "unlabelled": config.unlabelled_pool,
            "unlabelled_identities": kinds["unlabelled"].identities,
        },
    }
    (out / "README.txt").write_text(_readme(config), newline="\n")
    # whole or absent: its presence marks a whole tree
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    write_text_atomically(out / SYNTH_JSON, text, "the tree's record", advice)
    return info

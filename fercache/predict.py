"""Per-frame EXPR class probabilities for every frame of a split that needs a prediction.

Which frames: every annotated frame of every video of the split (line i of the EXPR annotation
file is frame i, `-1` frames included), or exactly the frames of a frame list (`--frames`, the
organisers' list for the test split; format in `fercache.submit`).

Where the numbers come from (`source`):
- `temporal`: a trained temporal run (`fercache.temporal.inference.TemporalPredictor`) over the
  features of the caches it was trained on (fused in the same order);
- `student`: the softmax of the logits the frozen student stored in the cache: the per-frame
  baseline of the ablation.

Frames without features (no face found, image missing or undecodable) take the probabilities
of the nearest frame that has features; a frame midway between two takes their mean. A video
whose store has no rows at all gets uniform probabilities.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fercache.data.affwild2 import SPLITS, AffWild2
from fercache.data.tasks import EXPR_CLASSES
from fercache.errors import FercacheError
from fercache.predictions import Predictions, VideoPredictions
from fercache.progress import progress_bar
from fercache.store import FeatureCache
from fercache.submit import read_frame_list

SOURCES = ("temporal", "student")

# video -> (1-based frames that have features, their class probabilities (rows, classes))
FrameProbabilities = Callable[[str], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class PredictOptions:
    """What `predict` needs besides the run, caches and output."""

    split: str
    data: Path | None = None
    frames: Path | None = None
    annotations: Path | None = None
    source: str = "temporal"
    device: str = "cpu"
    weights: str = "best"
    progress: bool = True


def predict(
    run_dir: Path | None, caches: list[Path], out: Path, options: PredictOptions
) -> Predictions:
    """Write the PRED file `out` for `options.split` and return what it holds."""
    if options.split not in SPLITS:
        raise FercacheError(f"unknown split '{options.split}': choose one of {', '.join(SPLITS)}")
    if options.source not in SOURCES:
        raise FercacheError(f"unknown source '{options.source}': choose {' or '.join(SOURCES)}")
    if not caches:
        raise FercacheError("give the feature cache with --cache CACHE_DIR")
    required, listed_in = required_frames(options)
    opened = [FeatureCache.open(cache) for cache in caches]
    if options.source == "student":
        probabilities_of, source = _student_source(opened)
    else:
        probabilities_of, source = _temporal_source(run_dir, opened, options)
    _check_videos_cached(required, opened, listed_in)
    videos = {}
    with progress_bar("predicting videos", len(required), options.progress) as advance:
        for video, frames in required.items():
            have, probabilities = probabilities_of(video)
            filled, has_image = fill_from_nearest(frames, have, probabilities)
            videos[video] = VideoPredictions.from_probabilities(frames, filled, has_image)
            advance()
    predictions = Predictions(split=options.split, source=source, videos=videos)
    predictions.write(out)
    return predictions


def required_frames(options: PredictOptions) -> tuple[dict[str, np.ndarray], str]:
    """{video: frames needing a prediction} and where that list came from (for errors)."""
    if options.frames:
        return read_frame_list(options.frames), f"frame list {options.frames}"
    if options.split == "test":
        raise FercacheError(
            "the test split has no annotations: give the organisers' frame list with --frames FILE"
        )
    if options.data is None:
        raise FercacheError(
            "give the Aff-Wild2 root with --data DATA (its annotations list frames)"
        )
    data = AffWild2(options.data, annotations=options.annotations)
    videos = data.load("expr", options.split)
    frames = {v.video: np.arange(1, len(v.labels) + 1, dtype=np.int32) for v in videos}
    return frames, f"the EXPR {options.split} annotations of {options.annotations or options.data}"


def _check_videos_cached(
    required: dict[str, np.ndarray], caches: list[FeatureCache], listed_in: str
) -> None:
    for cache in caches:
        missing = [video for video in required if video not in cache.manifest["videos"]]
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise FercacheError(
                f"{listed_in} names video(s) not in the feature cache {cache.root}: {shown}. "
                f"Extract them (`fercache extract DATA --out {cache.root}`) or fix the list."
            )


def fill_from_nearest(
    needed: np.ndarray, have: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `values` (one per frame of `have`, ascending) for every frame of `needed`, and
    whether each needed frame had its own row. A frame without a row takes the nearest frame's
    row; midway between two frames, their mean; with no rows at all, uniform."""
    needed = np.asarray(needed, dtype=np.int64)
    if len(have) == 0:
        classes = values.shape[1]
        return np.full((len(needed), classes), 1 / classes, np.float32), np.zeros(len(needed), bool)
    have = np.asarray(have, dtype=np.int64)
    after = np.searchsorted(have, needed).clip(max=len(have) - 1)
    before = (after - 1).clip(min=0)
    to_after = np.abs(have[after] - needed)
    to_before = np.abs(needed - have[before])
    nearest = np.where(to_before < to_after, before, after)
    filled = values[nearest].astype(np.float32)
    midway = (to_before == to_after) & (before != after)
    filled[midway] = (values[before[midway]] + values[after[midway]]) / 2
    return filled, have[after] == needed


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(shifted - shifted.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def _student_source(caches: list[FeatureCache]) -> tuple[FrameProbabilities, str]:
    if len(caches) != 1:
        raise FercacheError("--source student reads the logits of one cache: give one --cache")
    (cache,) = caches
    if cache.num_classes != len(EXPR_CLASSES):
        raise FercacheError(
            f"{cache.root}: the student has {cache.num_classes} output classes, not the "
            f"{len(EXPR_CLASSES)} EXPR classes; extract with an EXPR student checkpoint or use "
            "a temporal run"
        )

    def probabilities_of(video: str) -> tuple[np.ndarray, np.ndarray]:
        path = cache.path(video)
        with h5py.File(path, "r") as store:
            if "logits" not in store:
                raise FercacheError(
                    f"{path}: the store has no logits (the backbone had no classifier head); "
                    "use a temporal run instead of --source student"
                )
            return store["frames"][:], softmax(store["logits"][:])

    fingerprint = cache.provenance["fingerprint"]
    return probabilities_of, f"student logits of {cache.root} (fingerprint {fingerprint})"


def _temporal_source(
    run_dir: Path | None, caches: list[FeatureCache], options: PredictOptions
) -> tuple[FrameProbabilities, str]:
    if run_dir is None:
        raise FercacheError("give the training run folder RUN_DIR (or use --source student)")
    from fercache.temporal.features import load_fused_features
    from fercache.temporal.inference import TemporalPredictor

    predictor = TemporalPredictor.load(run_dir, options.device, options.weights)
    _check_run_matches(run_dir, predictor, caches)
    roots = [cache.root for cache in caches]

    def probabilities_of(video: str) -> tuple[np.ndarray, np.ndarray]:
        fused = load_fused_features(roots, [video])[video]
        return fused.frames, predictor.predict(fused.features)

    return probabilities_of, (
        f"temporal run {run_dir} ({options.weights} weights) on {', '.join(map(str, roots))}"
    )


def _check_run_matches(run_dir: Path, predictor, caches: list[FeatureCache]) -> None:
    if tuple(predictor.classes) != EXPR_CLASSES:
        raise FercacheError(
            f"{run_dir}: the run predicts {list(predictor.classes)}, not the EXPR classes "
            f"{list(EXPR_CLASSES)}"
        )
    fingerprints = [cache.provenance["fingerprint"] for cache in caches]
    if list(predictor.cache_fingerprints) != fingerprints:
        raise FercacheError(
            f"{run_dir}: trained on caches with fingerprints {list(predictor.cache_fingerprints)}"
            f", but the given caches have {fingerprints}; pass the caches it was trained on, "
            "in the same order"
        )
    dim = sum(cache.feature_dim for cache in caches)
    if predictor.feature_dim != dim:
        raise FercacheError(
            f"{run_dir}: the run expects {predictor.feature_dim}-d features, the caches give {dim}"
        )

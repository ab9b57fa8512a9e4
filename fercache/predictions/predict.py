"""Per-frame predictions (EXPR class probabilities, AU probabilities, VA values: whatever the
source predicts) for every frame of a split that needs a prediction.

Which frames: every annotated frame of every video of the split, for each task the source
predicts that the split annotates (line i of an annotation file is frame i, invalid frames
included; a video annotated for several tasks gets the longest annotation's frames), or exactly
the frames of a frame list (`--frames`, the organisers' list for the test split; format in
`fercache.predictions.submit`).

Where the numbers come from (`source`):
- `temporal`: a trained temporal run (`fercache.temporal.inference.TemporalPredictor`) over the
  features of the caches it was trained on (fused in the same order): one array per task it
  was trained on; AU decisions use the run's tuned thresholds (`thresholds.json`) if any;
- `student`: the softmax of the logits the frozen student stored in the cache: the per-frame
  EXPR baseline of the ablation.

`tune_thresholds` (validation split, a run with an AU head): per AU, the threshold with the best
F1 on the split's AU annotations (`fercache.framewise.metrics.tune_au_thresholds`) is stored in the
run's `thresholds.json` for its weights file, and the PRED written carries it.

Frames without features (no face found, image missing or undecodable, or recorded missing by
an imported cache: `fercache.temporal.features`) take the predictions of the nearest frame that
has features; a frame midway between two takes their mean. A video whose
store has no rows at all gets uniform EXPR probabilities, AU probabilities 0 (the state of most
frames) and VA 0 (neutral).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fercache.data.affwild2 import SPLITS, AffWild2
from fercache.data.framelist import read_frame_list
from fercache.data.tasks import AU_NAMES, EXPR_CLASSES
from fercache.errors import FercacheError
from fercache.features.store import FeatureCache
from fercache.framewise.metrics import pooled, tune_au_thresholds
from fercache.framewise.pred_file import AU_THRESHOLD, Predictions, VideoPredictions
from fercache.progress import progress_bar

SOURCES = ("temporal", "student")
# Every row of a video without any features: None is uniform (EXPR probabilities).
NO_FEATURES = {"expr": None, "au": 0.0, "va": 0.0}


@dataclass(frozen=True)
class Source:
    """Where predictions come from: `predict(video)` gives the 1-based frames that have
    features and, per task of `tasks`, their predictions (rows, outputs)."""

    predict: Callable[[str], tuple[np.ndarray, dict[str, np.ndarray]]]
    tasks: tuple[str, ...]
    description: str
    au_thresholds: tuple[float, ...]


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
    tune_thresholds: bool = False
    progress: bool = True


def predict(
    run_dir: Path | None, caches: list[Path], out: Path, options: PredictOptions
) -> Predictions:
    """Write the PRED file `out` for `options.split` and return what it holds."""
    _check_options(options, caches)
    opened = [FeatureCache.open(cache) for cache in caches]
    if options.source == "student":
        source = _student_source(opened)
    else:
        source = _temporal_source(run_dir, opened, options)
    if options.tune_thresholds and "au" not in source.tasks:
        raise FercacheError(
            f"--tune-thresholds: {run_dir or 'the student'} predicts {list(source.tasks)}, no "
            "AU; train with --set tasks=[...,au] to get AU thresholds"
        )
    required, listed_in = required_frames(options, source.tasks)
    _check_videos_cached(required, opened, listed_in)
    videos = {}
    with progress_bar("predicting videos", len(required), options.progress) as advance:
        for video, frames in required.items():
            have, predicted = source.predict(video)
            filled, has_image = _filled(frames, have, predicted)
            videos[video] = VideoPredictions.from_probabilities(
                frames, filled.get("expr"), has_image, au=filled.get("au"), va=filled.get("va")
            )
            advance()
    predictions = Predictions(
        split=options.split,
        source=source.description,
        videos=videos,
        au_thresholds=source.au_thresholds,
    )
    if options.tune_thresholds:
        predictions = _with_tuned_thresholds(predictions, run_dir, out, options)
    predictions.write(out)
    return predictions


def _check_options(options: PredictOptions, caches: list[Path]) -> None:
    if options.split not in SPLITS:
        raise FercacheError(f"unknown split '{options.split}': choose one of {', '.join(SPLITS)}")
    if options.source not in SOURCES:
        raise FercacheError(f"unknown source '{options.source}': choose {' or '.join(SOURCES)}")
    if not caches:
        raise FercacheError("give the feature cache with --cache CACHE_DIR")
    if not options.frames and options.split == "test":
        raise FercacheError(
            "the test split has no annotations: give the organisers' frame list with --frames FILE"
        )
    if not options.frames and options.data is None:
        raise FercacheError(
            "give the Aff-Wild2 root with --data DATA (its annotations list frames)"
        )
    if options.tune_thresholds and (options.split != "val" or options.data is None):
        raise FercacheError(
            "--tune-thresholds picks AU thresholds on the validation split's annotations: "
            "predict with --split val --data DATA"
        )


def required_frames(
    options: PredictOptions, tasks: tuple[str, ...] = ("expr",)
) -> tuple[dict[str, np.ndarray], str]:
    """{video: frames needing a prediction} and where that list came from (for errors)."""
    if options.frames:
        return read_frame_list(options.frames), f"frame list {options.frames}"
    root = options.annotations or options.data
    data = AffWild2(options.data, annotations=options.annotations)
    annotated = [task for task in tasks if options.split in data.splits(task)]
    if not annotated:
        raise FercacheError(
            f"{root}: no {'/'.join(t.upper() for t in tasks)} annotations for split "
            f"'{options.split}' list the frames to predict; give another split or --frames FILE"
        )
    lengths: dict[str, int] = {}
    for task in annotated:
        for video in data.load(task, options.split):
            lengths[video.video] = max(lengths.get(video.video, 0), len(video.labels))
    frames = {video: np.arange(1, lengths[video] + 1, dtype=np.int32) for video in sorted(lengths)}
    named = "/".join(task.upper() for task in annotated)
    if not frames:
        raise FercacheError(
            f"{root}: the {named} annotations of split '{options.split}' list no video, so "
            "there is nothing to predict; add its annotation files, or give another split or "
            "--frames FILE"
        )
    return frames, f"the {named} {options.split} annotations of {root}"


def _filled(
    frames: np.ndarray, have: np.ndarray, predicted: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every task's predictions of `frames` (see `fill_from_nearest`), and which had features."""
    filled, has_image = {}, np.zeros(len(frames), bool)
    for task, values in predicted.items():
        filled[task], has_image = fill_from_nearest(frames, have, values, NO_FEATURES[task])
    return filled, has_image


def _with_tuned_thresholds(
    predictions: Predictions, run_dir: Path, out: Path, options: PredictOptions
) -> Predictions:
    """The predictions with per-AU thresholds tuned on the split, also stored in the run."""
    from fercache.temporal.inference import write_thresholds

    data = AffWild2(options.data, annotations=options.annotations)
    if "val" not in data.splits("au"):
        raise FercacheError(
            f"{options.annotations or options.data}: no AU val annotations to tune thresholds on"
        )
    truth, probabilities = pooled(out, predictions, "au", data.load("au", "val"))
    thresholds = tune_au_thresholds(truth, probabilities)
    write_thresholds(run_dir, options.weights, thresholds)
    return replace(predictions, au_thresholds=tuple(thresholds.tolist()))


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
    needed: np.ndarray, have: np.ndarray, values: np.ndarray, empty: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `values` (one per frame of `have`, ascending) for every frame of `needed`, and
    whether each needed frame had its own row. A frame without a row takes the nearest frame's
    row; midway between two frames, their mean; with no rows at all, `empty` everywhere (None:
    uniform over the columns, for probabilities)."""
    needed = np.asarray(needed, dtype=np.int64)
    if len(have) == 0:
        columns = values.shape[1]
        fill = 1 / columns if empty is None else empty
        return np.full((len(needed), columns), fill, np.float32), np.zeros(len(needed), bool)
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


def _student_source(caches: list[FeatureCache]) -> Source:
    if len(caches) != 1:
        raise FercacheError("--source student reads the logits of one cache: give one --cache")
    (cache,) = caches
    if cache.num_classes != len(EXPR_CLASSES):
        raise FercacheError(
            f"{cache.root}: the student has {cache.num_classes} output classes, not the "
            f"{len(EXPR_CLASSES)} EXPR classes; extract with an EXPR student checkpoint or use "
            "a temporal run"
        )

    def predict_video(video: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        path = cache.path(video)
        with cache.open_store(video) as store:
            if "logits" not in store:
                raise FercacheError(
                    f"{path}: the store has no logits (the backbone had no classifier head); "
                    "use a temporal run instead of --source student"
                )
            return store["frames"][:], {"expr": softmax(store["logits"][:])}

    fingerprint = cache.provenance["fingerprint"]
    return Source(
        predict_video,
        ("expr",),
        f"student logits of {cache.root} (fingerprint {fingerprint})",
        (AU_THRESHOLD,) * len(AU_NAMES),
    )


def _temporal_source(
    run_dir: Path | None, caches: list[FeatureCache], options: PredictOptions
) -> Source:
    if run_dir is None:
        raise FercacheError("give the training run folder RUN_DIR (or use --source student)")
    from fercache.temporal.features import load_fused_features
    from fercache.temporal.inference import TemporalPredictor

    predictor = TemporalPredictor.load(run_dir, options.device, options.weights)
    _check_run_matches(run_dir, predictor, caches)
    roots = [cache.root for cache in caches]

    def predict_video(video: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        fused = load_fused_features(roots, [video])[video]
        return fused.frames, predictor.predict(fused.features)

    return Source(
        predict_video,
        predictor.tasks,
        f"temporal run {run_dir} ({options.weights} weights) on {', '.join(map(str, roots))}",
        tuple(predictor.au_thresholds.tolist()),
    )


def _check_run_matches(run_dir: Path, predictor, caches: list[FeatureCache]) -> None:
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

"""Soft voting: one PRED file whose every prediction array is the (weighted) mean of the inputs'.

Every array a PRED file carries per video besides `frames`, `labels` and `has_image` (EXPR
`probabilities`, AU probabilities `au`, VA values `va`, and any later addition of
`fercache.framewise.pred_file`) is averaged over the inputs that all carry it for that video; an
array only some inputs carry is left out (and named, so the caller can warn). The EXPR label of each
frame is the arg-max of the mean probabilities; `has_image` holds where every input had the
frame's own features. The inputs must be raw predictions (vote after ensembling, not before) of
the same split, videos and frame numbers; the output's `source` names each input, its weight
and its own source. AU decision thresholds the inputs share are kept; thresholds tuned for
different models do not fit their mean, so inputs that disagree give the vote the default 0.5.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fercache.errors import FercacheError
from fercache.framewise.pred_file import Predictions, VideoPredictions

ROW_FIELDS = ("frames", "labels", "has_image")  # the row index and what is derived per row
AVERAGED = tuple(
    field.name for field in dataclasses.fields(VideoPredictions) if field.name not in ROW_FIELDS
)


@dataclass(frozen=True)
class Ensemble:
    """The soft vote written to `path`, the normalised weights, and what the user should know
    (arrays left out, thresholds reset)."""

    path: Path
    predictions: Predictions
    weights: tuple[float, ...]
    notes: tuple[str, ...]


def parse_weights(text: str | None) -> list[float] | None:
    """'1,2' -> [1.0, 2.0]; None (equal weights) stays None."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise FercacheError(
            f"--weights '{text}': give one number per PRED file, comma-separated (e.g. 1,2)"
        ) from None


def ensemble(preds: list[Path], out: Path, weights: list[float] | None = None) -> Ensemble:
    """Soft-vote the PRED files `preds` (weights: one per file, default equal) into `out`."""
    if len(preds) < 2:
        raise FercacheError("give at least two PRED files to ensemble")
    normalised = _normalised(weights, len(preds))
    inputs = [Predictions.read(path) for path in preds]
    for path, predictions in zip(preds, inputs, strict=True):
        _check_compatible(preds[0], inputs[0], path, predictions)
    dropped: set[str] = set()
    videos = {}
    for video in inputs[0].videos:
        rows = [predictions.videos[video] for predictions in inputs]
        videos[video], missing = _vote(rows, normalised)
        dropped.update(missing)
    sources = "; ".join(
        f"{weight:.4g} x {path} [{predictions.source}]"
        for weight, path, predictions in zip(normalised, preds, inputs, strict=True)
    )
    notes = [f"'{name}' is not in every input: left out of the vote" for name in sorted(dropped)]
    thresholds = {predictions.au_thresholds for predictions in inputs}
    shared = {"au_thresholds": thresholds.pop()} if len(thresholds) == 1 else {}
    voted = Predictions(
        split=inputs[0].split,
        source=f"soft vote (weighted mean) of {len(preds)} predictions: {sources}",
        videos=videos,
        **shared,
    )
    if not shared and "au" in voted.tasks:
        notes.append("the inputs' AU thresholds differ: the vote uses 0.5; tune them on the vote")
    voted.write(out)
    return Ensemble(Path(out), voted, tuple(normalised), tuple(notes))


def _normalised(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1 / count] * count
    if len(weights) != count:
        raise FercacheError(f"--weights gives {len(weights)} weights for {count} PRED files")
    if any(not np.isfinite(weight) or weight < 0 for weight in weights) or sum(weights) <= 0:
        raise FercacheError(
            f"--weights {','.join(map(str, weights))}: weights must be finite, non-negative "
            "and not all zero"
        )
    return [weight / sum(weights) for weight in weights]


def _check_compatible(first: Path, reference: Predictions, path: Path, other: Predictions):
    """FercacheError naming both files unless `other` can be voted with `reference`."""
    if other.smoothing:
        raise FercacheError(
            f"{path}: holds majority-voted labels (smoothing {list(other.smoothing)}); ensemble "
            "the raw predictions of `fercache predict`, then smooth the ensemble"
        )
    if other.split != reference.split:
        raise FercacheError(
            f"{path} holds {other.split} predictions but {first} holds {reference.split}: "
            "ensemble predictions of one split"
        )
    missing = sorted(set(reference.videos) - set(other.videos))
    extra = sorted(set(other.videos) - set(reference.videos))
    if missing or extra:
        problem = (
            f"lacks video(s) {', '.join(missing[:5])}"
            if missing
            else (f"has video(s) {', '.join(extra[:5])} that {first} lacks")
        )
        raise FercacheError(
            f"{path} {problem} (compared with {first}); predict every input with the same "
            "--data or --frames list"
        )
    for video, rows in reference.videos.items():
        if not np.array_equal(rows.frames, other.videos[video].frames):
            raise FercacheError(
                f"{path}: video '{video}' has {len(other.videos[video].frames)} frames that "
                f"differ from the {len(rows.frames)} of {first}; predict every input with the "
                "same --data or --frames list"
            )


def _vote(rows: list[VideoPredictions], weights: list[float]) -> tuple[VideoPredictions, set]:
    """One video's weighted means, and the names of arrays only some inputs carry."""
    means, dropped = {}, set()
    for name in AVERAGED:
        arrays = [getattr(row, name) for row in rows]
        carried = [array is not None for array in arrays]
        shared = all(carried)
        means[name] = np.average(np.stack(arrays), axis=0, weights=weights) if shared else None
        if any(carried) and not shared:
            dropped.add(name)
    has_image = np.logical_and.reduce([row.has_image for row in rows])
    voted = VideoPredictions.from_probabilities(rows[0].frames, has_image=has_image, **means)
    return voted, dropped

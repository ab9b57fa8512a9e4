"""`fercache smooth`: the sliding-window majority vote (`fercache.framewise.vote`) on a PRED file.

`smooth_predictions` votes each video's EXPR `labels` (the arg-max class, or an earlier vote)
of a PRED file (`fercache.framewise.pred_file`) and keeps its probabilities; AU and VA predictions
are copied unchanged. A PRED without EXPR predictions is refused. The vote's rules (windows, ties)
are in `fercache.framewise.vote`.
"""

from pathlib import Path

import numpy as np

from fercache.errors import FercacheError
from fercache.framewise.pred_file import Predictions
from fercache.framewise.vote import majority_vote


def smooth_predictions(
    pred: Path, out: Path, window: int = 30, mode: str = "centered"
) -> Predictions:
    """Vote the labels of PRED file `pred` per video and write them, with the same
    probabilities, to `out`; its `smoothing` attribute gains {"window", "mode"}."""
    predictions = Predictions.read(pred)
    if predictions.videos and "expr" not in predictions.tasks:
        raise FercacheError(
            f"{pred}: holds no EXPR predictions to vote on (only "
            f"{', '.join(task.upper() for task in predictions.tasks)}); the vote smooths EXPR "
            "labels, so evaluate or submit this file as it is"
        )
    videos = list(predictions.videos)
    lengths = np.array([len(predictions.videos[v].frames) for v in videos], dtype=np.int64)
    voted = majority_vote(
        np.concatenate([predictions.videos[v].labels for v in videos] or [np.zeros(0, np.int64)]),
        np.concatenate(
            [predictions.videos[v].probabilities for v in videos]
            or [np.zeros((0, len(predictions.classes)), np.float32)]
        ),
        window,
        mode,
        lengths,
    )
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    smoothed = predictions.with_labels(
        {video: voted[offsets[i] : offsets[i + 1]] for i, video in enumerate(videos)},
        smoothing={"window": window, "mode": mode},
    )
    smoothed.write(out)
    return smoothed

"""Validation of a temporal run's epoch: every validation video predicted as
`fercache.temporal.inference.TemporalPredictor` predicts it (windows every `eval_stride`
frames, each frame's outputs averaged), then each trained task scored: EXPR macro-F1 over the 8
classes raw and after the `smooth_window` majority vote, AU mean F1 at threshold 0.5, VA mean
CCC, and P, their sum, when several tasks are trained. Under torchrun the videos are split over
the ranks and every prediction is gathered before scoring.
"""

import numpy as np
import torch.distributed as dist
from sklearn.metrics import f1_score

from fercache.data.labels import row_valid
from fercache.data.tasks import EXPR_CLASSES
from fercache.distributed import Ranks
from fercache.framewise.metrics import au_metrics, va_metrics
from fercache.framewise.vote import majority_vote
from fercache.temporal.clips import RowTargets
from fercache.temporal.config import SCORE_OF_TASK, TemporalConfig
from fercache.temporal.features import LazyFeatures, MemoryFeatures
from fercache.temporal.inference import to_predictions, window_outputs
from fercache.temporal.model import TemporalModel

# The epoch record's key of each validation score (`select` names the score).
RECORD_KEY = {"expr_f1": "val_f1", "au_f1": "val_au_f1", "va_ccc": "val_va_ccc", "p": "val_p"}


def validate(
    model: TemporalModel,
    source: MemoryFeatures | LazyFeatures,
    labels: list[RowTargets],
    val_indices: range,
    config: TemporalConfig,
    ranks: Ranks,
) -> dict:
    """The epoch record's validation scores of every trained task, over the videos
    `val_indices` of `source` (split over the ranks, gathered before scoring)."""
    model.eval()
    mine = {
        index: window_outputs(
            model,
            source.whole(index),
            clip=config.clip_frames,
            stride=config.eval_stride,
            device=ranks.device,
            batch_size=config.eval_batch,
            amp=config.amp,
        )
        for index in val_indices[ranks.rank :: ranks.world_size]
        if source.rows(index) > 0
    }
    outputs = _gather(mine, ranks)
    order = [index for index in val_indices if index in outputs]
    predicted = to_predictions(
        {task: np.concatenate([outputs[index][task] for index in order]) for task in config.tasks}
    )
    truth = {
        task: np.concatenate([labels[index][task] for index in order]) for task in config.tasks
    }
    record = {}
    if "expr" in config.tasks:
        lengths = np.array([len(outputs[index]["expr"]) for index in order])
        record.update(_expr_scores(predicted["expr"], truth["expr"], lengths, config))
    if "au" in config.tasks:
        scores = au_metrics(truth["au"], predicted["au"])
        record["val_au_f1"] = scores["au_f1"]
        record["val_au_per_au"] = {name: round(f1, 6) for name, f1 in scores["per_au_f1"].items()}
        record["val_au_frames"] = int(row_valid("au", truth["au"]).sum())
    if "va" in config.tasks:
        scores = va_metrics(truth["va"], predicted["va"])
        record["val_va_ccc"] = scores["va_ccc"]
        record["val_va_per_dimension"] = {
            name: round(ccc, 6) for name, ccc in scores["per_dimension_ccc"].items()
        }
        record["val_va_frames"] = int(row_valid("va", truth["va"]).sum())
    if len(config.tasks) > 1:
        record["val_p"] = sum(record[RECORD_KEY[SCORE_OF_TASK[task]]] for task in config.tasks)
    return record


def _expr_scores(
    probabilities: np.ndarray, labels: np.ndarray, lengths: np.ndarray, config: TemporalConfig
) -> dict:
    predicted = probabilities.argmax(axis=1)
    smoothed = majority_vote(predicted, probabilities, config.smooth_window, "centered", lengths)
    valid = labels >= 0
    classes = list(range(len(EXPR_CLASSES)))
    per_class = f1_score(
        labels[valid], predicted[valid], labels=classes, average=None, zero_division=0
    )
    return {
        "val_f1": float(per_class.mean()),
        "val_f1_smoothed": float(
            f1_score(
                labels[valid], smoothed[valid], labels=classes, average="macro", zero_division=0
            )
        ),
        "val_class_f1": dict(zip(EXPR_CLASSES, per_class.round(6).tolist(), strict=True)),
        "val_frames": int(valid.sum()),
    }


def _gather(mine: dict[int, dict], ranks: Ranks) -> dict[int, dict]:
    if ranks.world_size == 1:
        return mine
    shares: list[dict | None] = [None] * ranks.world_size
    dist.all_gather_object(shares, mine)
    return {index: value for share in shares for index, value in share.items()}

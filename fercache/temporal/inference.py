"""Per-frame predictions from a trained run, exactly as evaluation computes them.

`window_outputs` covers every row of a video with overlapping `clip`-row windows (see
`clips.evaluation_starts`) and averages each row's outputs (EXPR and AU logits, VA values) over
the windows that contain it; `to_predictions` turns them into EXPR class probabilities (softmax),
AU probabilities (sigmoid) and VA values. The trainer's validation and
`TemporalPredictor.predict` both use them.

A run folder may hold `thresholds.json`, the per-AU decision thresholds tuned on the validation
split (`fercache predict --tune-thresholds`), per weights file: {"best": {"AU1": 0.42, ...}}.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fercache.data.tasks import AU_NAMES
from fercache.errors import FercacheError
from fercache.framewise.pred_file import AU_THRESHOLD
from fercache.outputs import write_text_atomically
from fercache.readers import first_line, read_json_object, unreadable
from fercache.temporal.clips import evaluation_starts
from fercache.temporal.model import OUTPUTS, ModelConfig, TemporalModel
from fercache.temporal.registry import build_model
from fercache.temporal.run_files import MODEL_JSON, THRESHOLDS_FILE, WEIGHTS
from fercache.temporal.step import autocast_for

# What rewrites a run's model.json and weights: nothing repairs a finished run in place.
RETRAIN = "train the run again (`fercache train ... --out NEW_DIR`), or restore the file"


@torch.no_grad()
def window_outputs(
    model: torch.nn.Module,
    features: np.ndarray,
    *,
    clip: int,
    stride: int,
    device: torch.device,
    batch_size: int = 64,
    amp: bool = False,
) -> dict[str, np.ndarray]:
    """(T, D) features → per task (T, outputs) float32 averaged over the overlapping windows."""
    rows = len(features)
    starts = evaluation_starts(rows, clip, stride)
    length = min(clip, rows)
    index = torch.from_numpy(starts[:, None] + np.arange(length)[None, :]).to(device)
    sums: dict[str, torch.Tensor] = {}
    for first in range(0, len(starts), batch_size):
        chunk = slice(first, first + batch_size)
        windows = np.stack([features[start : start + length] for start in starts[chunk]])
        with autocast_for(device, amp):
            outputs = model(torch.from_numpy(windows).to(device))
        for task, values in outputs.items():
            if task not in sums:
                sums[task] = torch.zeros(rows, values.shape[-1], device=device)
            sums[task].index_add_(0, index[chunk].reshape(-1), values.float().flatten(0, 1))
    counts = np.bincount(index.cpu().numpy().reshape(-1), minlength=rows)[:, None]
    return {task: (total.cpu().numpy() / counts).astype(np.float32) for task, total in sums.items()}


def to_predictions(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Averaged outputs → EXPR class probabilities, AU probabilities, VA values."""
    made = {}
    for task, values in outputs.items():
        tensor = torch.from_numpy(values)
        if task == "expr":
            tensor = torch.softmax(tensor, dim=1)
        elif task == "au":
            tensor = torch.sigmoid(tensor)
        made[task] = tensor.numpy()
    return made


def read_thresholds(run_dir: Path, weights: str) -> np.ndarray:
    """The run's tuned AU thresholds for `weights` (AU order), or 0.5 for every AU."""
    stored = _stored_thresholds(Path(run_dir) / THRESHOLDS_FILE)
    return stored.get(weights, np.full(len(AU_NAMES), AU_THRESHOLD))


def write_thresholds(run_dir: Path, weights: str, thresholds: np.ndarray) -> Path:
    """Store the tuned thresholds of `weights`, keeping those of the other weights file."""
    path = Path(run_dir) / THRESHOLDS_FILE
    stored = {**_stored_thresholds(path), weights: np.asarray(thresholds, float)}
    named = {
        key: dict(zip(AU_NAMES, values.tolist(), strict=True)) for key, values in stored.items()
    }
    return write_text_atomically(path, json.dumps(named, indent=2), "the AU thresholds")


def _stored_thresholds(path: Path) -> dict[str, np.ndarray]:
    """{weights: thresholds in AU order} of a run's thresholds file; {} when it has none."""
    if not path.is_file():
        return {}
    remedy = (
        "delete it (predictions then use 0.5) and tune again with "
        "`fercache predict RUN_DIR ... --split val --tune-thresholds`"
    )
    stored = read_json_object(path, "AU thresholds", remedy)
    try:
        return {
            weights: np.array([float(values[name]) for name in AU_NAMES])
            for weights, values in stored.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise unreadable(path, "AU thresholds", repr(error), remedy) from error


def _built(config: ModelConfig, json_path: Path) -> TemporalModel:
    try:
        return build_model(config)
    except FercacheError as error:  # a model this installation does not register
        raise FercacheError(f"{json_path}: {error} (the run was trained with it)") from error


def _load_weights(model: TemporalModel, path: Path) -> None:
    """`path`'s weights into `model`; FercacheError naming the file when it is damaged or holds
    another network's weights."""
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as error:
        raise unreadable(path, "run weights", first_line(error), RETRAIN) from error
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        why = f"not the weights of the network model.json describes: {first_line(error)}"
        raise unreadable(path, "run weights", why, RETRAIN) from error


@dataclass
class TemporalPredictor:
    """A trained temporal model (the run's best or final weights), ready to predict videos;
    `au_thresholds` are the run's tuned ones for these weights, else 0.5."""

    model: TemporalModel
    config: ModelConfig
    caches: list[dict]
    eval_stride: int
    device: torch.device
    au_thresholds: np.ndarray

    @classmethod
    def load(cls, run_dir: Path, device: str = "cpu", weights: str = "best") -> "TemporalPredictor":
        if weights not in WEIGHTS:
            raise FercacheError(f"unknown weights '{weights}': choose {' or '.join(WEIGHTS)}")
        run_dir = Path(run_dir)
        json_path, weights_path = run_dir / MODEL_JSON, run_dir / WEIGHTS[weights]
        for path in (json_path, weights_path):
            if not path.is_file():
                raise FercacheError(
                    f"{path}: missing; {run_dir} is not a finished `fercache train` run "
                    "(best weights appear after its first epoch, final ones at its end)"
                )
        details = read_json_object(json_path, "model config", RETRAIN)
        try:
            config = ModelConfig.from_json(details, json_path)
            model = _built(config, json_path)
            caches = [
                {**cache, "fingerprint": str(cache["fingerprint"])} for cache in details["caches"]
            ]
            eval_stride = int(details["eval_stride"])
        except (KeyError, TypeError, ValueError) as error:
            why = f"not as `fercache train` writes it: {type(error).__name__} {first_line(error)}"
            raise unreadable(json_path, "model config", why, RETRAIN) from error
        _load_weights(model, weights_path)
        target = torch.device(device)
        return cls(
            model.to(target).eval(),
            config,
            caches,
            eval_stride,
            target,
            read_thresholds(run_dir, weights),
        )

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.config.tasks

    @property
    def cache_fingerprints(self) -> list[str]:
        """Provenance fingerprints of the caches trained on, in concatenation order."""
        return [cache["fingerprint"] for cache in self.caches]

    def predict(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """(T, D) features of one video → per trained task, float32: "expr" (T, 8) class
        probabilities, "au" (T, 12) probabilities, "va" (T, 2) valence and arousal."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise FercacheError(
                f"features of shape {features.shape} do not fit this model: it was trained on "
                f"(T, {self.feature_dim}) features of caches {self.cache_fingerprints}"
            )
        if len(features) == 0:
            return {task: np.zeros((0, len(OUTPUTS[task])), np.float32) for task in self.tasks}
        outputs = window_outputs(
            self.model,
            features,
            clip=self.config.clip_frames,
            stride=self.eval_stride,
            device=self.device,
        )
        return to_predictions(outputs)

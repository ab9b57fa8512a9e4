"""Per-frame class probabilities from a trained run, exactly as evaluation computes them.

`window_logits` covers every row of a video with overlapping `clip`-row windows (see
`clips.evaluation_starts`) and averages each row's logits over the windows that contain it;
the trainer's validation and `TemporalPredictor.predict` both use it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fercache.errors import FercacheError
from fercache.temporal.clips import evaluation_starts
from fercache.temporal.model import ModelConfig, TemporalTransformer
from fercache.temporal.step import autocast_for

BEST_WEIGHTS = "best.safetensors"
FINAL_WEIGHTS = "final.safetensors"
# "best": the epoch with the best validation macro-F1; "final": the last epoch, for results
# that must not depend on a choice made on the validation split.
WEIGHTS = {"best": BEST_WEIGHTS, "final": FINAL_WEIGHTS}
MODEL_JSON = "model.json"


@torch.no_grad()
def window_logits(
    model: torch.nn.Module,
    features: np.ndarray,
    *,
    clip: int,
    stride: int,
    device: torch.device,
    batch_size: int = 64,
    amp: bool = False,
) -> np.ndarray:
    """(T, D) features → (T, C) float32 logits averaged over the overlapping windows."""
    rows = len(features)
    starts = evaluation_starts(rows, clip, stride)
    length = min(clip, rows)
    sums: torch.Tensor | None = None
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        windows = np.stack([features[start : start + length] for start in chunk])
        with autocast_for(device, amp):
            logits = model(torch.from_numpy(windows).to(device)).float()
        if sums is None:
            sums = torch.zeros(rows, logits.shape[-1], device=device)
        index = torch.from_numpy(chunk[:, None] + np.arange(length)[None, :]).to(device)
        sums.index_add_(0, index.reshape(-1), logits.reshape(-1, logits.shape[-1]))
    counts = np.bincount((starts[:, None] + np.arange(length)[None, :]).reshape(-1), minlength=rows)
    return (sums.cpu().numpy() / counts[:, None]).astype(np.float32)


@dataclass
class TemporalPredictor:
    """A trained temporal model (the run's best or final weights), ready to predict videos."""

    model: TemporalTransformer
    config: ModelConfig
    classes: list[str]
    caches: list[dict]
    eval_stride: int
    device: torch.device

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
        details = json.loads(json_path.read_text())
        config = ModelConfig.from_json(details, json_path)
        model = TemporalTransformer(config)
        model.load_state_dict(load_file(weights_path))
        target = torch.device(device)
        return cls(
            model.to(target).eval(),
            config,
            list(details["classes"]),
            list(details["caches"]),
            int(details["eval_stride"]),
            target,
        )

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def cache_fingerprints(self) -> list[str]:
        """Provenance fingerprints of the caches trained on, in concatenation order."""
        return [cache["fingerprint"] for cache in self.caches]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(T, D) features of one video → (T, C) float32 class probabilities."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise FercacheError(
                f"features of shape {features.shape} do not fit this model: it was trained on "
                f"(T, {self.feature_dim}) features of caches {self.cache_fingerprints}"
            )
        if len(features) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        logits = window_logits(
            self.model,
            features,
            clip=self.config.clip_frames,
            stride=self.eval_stride,
            device=self.device,
        )
        return torch.softmax(torch.from_numpy(logits), dim=1).numpy()

"""The files of a temporal run folder; each is written whole (temporary name, then rename).

The files every training phase keeps (`fercache.resume`):

- `config.yaml`       resolved settings (`config.write_config`)
- `last.pt`           what `--resume` needs: weights, optimizer state, epochs done, history
- `metrics.jsonl`     one JSON record per finished epoch: training losses, every validation score

and those of `fercache train` (this module):

- `model.json`        network config + tasks and their outputs, evaluation stride, caches
- `best.safetensors`  weights of the epoch with the best validation score (`select`)
- `final.safetensors` weights of the last epoch, at the end
- `summary.json`      the best epoch, its figures (`best_val_*`), the run's inputs, at the end
- `curves.png`        training losses and validation scores per epoch, at the end
- `thresholds.json`   per-AU thresholds, written by `fercache predict --tune-thresholds`
"""

import json
from pathlib import Path

from matplotlib.figure import Figure
from safetensors.torch import save

from fercache.outputs import write_atomically, write_made_atomically, write_text_atomically
from fercache.readers import read_json_object, unreadable
from fercache.resume import RESUME_ADVICE

BEST_WEIGHTS = "best.safetensors"
FINAL_WEIGHTS = "final.safetensors"
# "best": the epoch with the best validation score (the run's `select` setting); "final": the
# last epoch, for results that must not depend on a choice made on the validation split.
WEIGHTS = {"best": BEST_WEIGHTS, "final": FINAL_WEIGHTS}
MODEL_JSON = "model.json"
THRESHOLDS_FILE = "thresholds.json"
SUMMARY_FILE = "summary.json"
VIDEOS_FILE = "videos.json"  # the explicit training and validation videos of a fold
CURVES_FILE = "curves.png"
# The validation scores an epoch record may hold, as the curves name them.
SCORE_TITLES = {
    "val_f1": "EXPR macro-F1",
    "val_f1_smoothed": "EXPR macro-F1, smoothed",
    "val_au_f1": "AU mean F1",
    "val_va_ccc": "VA mean CCC",
    "val_p": "P (sum of the task scores)",
}


def write_json(path: Path, value: dict) -> None:
    write_text_atomically(path, json.dumps(value, indent=2), "the JSON file")


def write_weights(path: Path, state_dict: dict) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    write_made_atomically(path, lambda: save(tensors), "the weights", RESUME_ADVICE)


def write_best(run_dir: Path, state_dict: dict, model_details: dict) -> None:
    write_weights(run_dir / BEST_WEIGHTS, state_dict)
    write_json(run_dir / MODEL_JSON, model_details)


def read_summary(run_dir: Path) -> dict | None:
    """The finished run's `summary.json`; None while the run is unfinished."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    remedy = "delete it and resume the run (`fercache train ... --resume`) to write it again"
    summary = read_json_object(path, "run summary", remedy)
    counts = [summary.get(key) for key in ("epochs", "best_epoch")]
    if not all(isinstance(count, int) and not isinstance(count, bool) for count in counts):
        raise unreadable(path, "run summary", "no epochs and best_epoch counts", remedy)
    return summary


def plot_curves(run_dir: Path, history: list[dict]) -> None:
    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(10, 4))  # no pyplot: no global figure state, no GUI backend
    loss_axis, score_axis = figure.subplots(1, 2)
    losses = [key for key in history[0] if key.startswith("train_loss")]
    for key in losses:
        label = "total" if key == "train_loss" else key.removeprefix("train_loss_").upper()
        loss_axis.plot(epochs, [record[key] for record in history], marker="o", label=label)
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="training")
    loss_axis.legend()
    for key, title in SCORE_TITLES.items():
        if key in history[0]:
            scores = [record[key] for record in history]
            score_axis.plot(epochs, scores, marker="o", label=title)
    score_axis.set(xlabel="epoch", ylabel="score", title="validation")
    score_axis.legend()
    figure.tight_layout()
    write_atomically(
        run_dir / CURVES_FILE, lambda tmp: figure.savefig(tmp, format="png"), "the curves"
    )

"""Bagging (the LSD paper): K temporal models, each on its own seeded subsample of the training
videos, soft-voted on the validation split.

Bag k trains into `OUT/bag-<k>` with seed `base + k` (base: `--seed`, else the config's) and the
`subsample` fraction, so both its videos and its initial weights differ from the other bags'.
Then each bag predicts the validation split with its best weights into `OUT/bag-<k>/val.h5`
(evaluated into `val.json`; names follow the config's `val_split`), the K predictions are
averaged (`fercache.predictions.ensemble`) into `OUT/ensemble-val.h5`, and that is evaluated into
`OUT/ensemble-val.json`. `OUT/bagging.json` sums it up: every bag's seed, training videos and
scores beside the ensemble's. Finished bags are reused and interrupted ones resume
(`fercache.experiments.sweep.train_or_reuse`). Under torchrun each bag trains data-parallel over the
ranks and rank 0 alone predicts, votes and evaluates.
"""

from dataclasses import replace
from pathlib import Path

from rich.table import Table

from fercache.distributed import resolve_device, torchrun_rank
from fercache.errors import FercacheError
from fercache.experiments.runs_table import best_scores
from fercache.experiments.sweep import train_or_reuse
from fercache.predictions.ensemble import ensemble
from fercache.predictions.evaluate import evaluate, write_report
from fercache.predictions.predict import PredictOptions, predict
from fercache.temporal.config import load_config
from fercache.temporal.loop import TrainRequest
from fercache.temporal.run_files import write_json

SUMMARY = "bagging.json"


def train_bagged(
    cache_dirs: list[Path],
    data: Path,
    out: Path,
    request: TrainRequest,
    bags: int,
) -> dict | None:
    """Train `bags` models into `out` (each on the `subsample` fraction of the videos that the
    request's settings give), soft-vote and evaluate them on the validation split; the summary
    (also `bagging.json`), or None on ranks other than 0 under torchrun."""
    if bags < 2:
        raise FercacheError(f"--bagging {bags}: bagging needs at least 2 models")
    config = load_config(
        request.config_file, list(request.overrides), epochs=request.epochs, seed=request.seed
    )
    out = Path(out)
    bags_trained = []
    for k in range(bags):
        bag_dir, seed = out / f"bag-{k}", config.seed + k
        summary, _ = train_or_reuse(cache_dirs, data, bag_dir, replace(request, seed=seed))
        bags_trained.append({"run": str(bag_dir), "seed": seed, **_training_figures(summary)})
    if torchrun_rank()[0] != 0:
        return None
    options = PredictOptions(
        split=config.val_split,
        data=data,
        device=str(resolve_device(request.device)),
        progress=request.progress,
    )
    preds = []
    for bag in bags_trained:
        pred, report = _predicted_and_scored(Path(bag["run"]), cache_dirs, data, options)
        preds.append(pred)
        bag.update(_scores(report))
    voted = ensemble(preds, out / f"ensemble-{options.split}.h5")
    report = evaluate(voted.path, data, options.split)
    write_report(report, voted.path.with_suffix(".json"))
    summary = {
        "split": options.split,
        "subsample": config.subsample,
        "bags": bags_trained,
        "ensemble": {"pred": str(voted.path), **_scores(report)},
    }
    write_json(out / SUMMARY, summary)
    return summary


def render(summary: dict) -> Table:
    """Each bag's seed, training videos and scores, then the ensemble's."""
    scores = [key for key in summary["ensemble"] if key != "pred"]
    table = Table(title=f"bagging: {len(summary['bags'])} models on {summary['split']}")
    for column in ("model", "seed", "train videos", *scores):
        table.add_column(column, justify="left" if column == "model" else "right")
    for bag in summary["bags"]:
        shown = [f"{bag[key]:.4f}" for key in scores]
        table.add_row(Path(bag["run"]).name, str(bag["seed"]), str(bag["train_videos"]), *shown)
    table.add_section()
    shown = [f"{summary['ensemble'][key]:.4f}" for key in scores]
    table.add_row(f"soft vote: {summary['ensemble']['pred']}", "", "", *shown)
    return table


def _training_figures(summary: dict) -> dict:
    """What the trainer reports of a bag: its training videos and best validation figures."""
    return {
        "train_videos": summary["train_videos"],
        "best_epoch": summary["best_epoch"],
        **best_scores(summary),
    }


def _predicted_and_scored(
    run_dir: Path, cache_dirs: list[Path], data: Path, options: PredictOptions
) -> tuple[Path, dict]:
    """Predict the split with the run's best weights into `<split>.h5` and evaluate it."""
    pred = run_dir / f"{options.split}.h5"
    predict(run_dir, cache_dirs, pred, options)
    report = evaluate(pred, data, options.split)
    write_report(report, pred.with_suffix(".json"))
    return pred, report


def _scores(report: dict) -> dict[str, float]:
    """The report's headline scores (expr_f1, and au_f1 / va_ccc where present)."""
    return {key: value for key, value in report.items() if isinstance(value, float)}

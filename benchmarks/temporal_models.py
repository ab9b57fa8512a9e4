"""Every registered temporal model on the demo's caches, side by side.

    fercache demo --out DEMO --seed 0
    python benchmarks/temporal_models.py --demo DEMO [--seeds 0 1 2] [--write results/training.md]

Trains each model of `fercache.temporal.registry` on the cache the demo's temporal row trains
on (its last phase-1 student's), with the demo's temporal settings (`DemoSettings`: width,
dropouts, batch, lr, epochs), on the demo's training videos, and scores its final epoch on the
validation videos (nothing chosen on them): EXPR macro-F1 raw and after the demo's vote window,
as the demo's "+ temporal encoder" and "+ post-processing" rows do. Only `layers` differs: each
model gets the depth that lets a frame see the clip (`DEPTH`). Each model is trained once per
training seed given with `--seeds`; the table gives the figures of each and their mean. With
`--write`, the section "Temporal models on the demo's caches" of that file is replaced by the
table, the command, the commit and the machine.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
import textwrap
from pathlib import Path

import torch

from fercache.experiments.demo import PHASE_ONE, DemoSettings
from fercache.resume import read_metrics
from fercache.temporal.loop import TrainRequest, train
from fercache.temporal.registry import TEMPORAL_MODELS

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Temporal models on the demo's caches"
# layers per model: the demo's transformer has 2 (attention sees the whole clip at every
# layer); the tcn's receptive field is 2^(layers+1) - 1 frames, 63 at 5: the 64-frame clip
DEPTH = {"transformer": 2, "tcn": 5}


def train_model(demo: Path, name: str, seed: int, work: Path) -> dict:
    """Final-epoch validation figures of model `name` trained at `seed`."""
    settings = DemoSettings()
    overrides = [item for item in settings.temporal_overrides if not item.startswith("layers=")]
    overrides += [f"model={name}", f"layers={DEPTH.get(name, 2)}"]
    request = TrainRequest(
        overrides=tuple(overrides),
        epochs=settings.temporal_epochs,
        seed=seed,
        device="cpu",
        progress=False,
    )
    run = work / f"{name}-seed{seed}"
    cache = demo / "cache" / PHASE_ONE[-1].name
    train([cache], demo / "data", run, request)
    last = read_metrics(run)[-1]
    model = json.loads((run / "model.json").read_text())
    seconds = sum(record["timing"]["train_seconds"] for record in read_metrics(run))
    return {
        "f1": 100 * last["val_f1"],
        "smoothed": 100 * last["val_f1_smoothed"],
        "layers": model["layers"],
        "parameters": sum(tensor.numel() for tensor in torch.load(
            run / "last.pt", weights_only=True)["model"].values()),
        "seconds_per_epoch": seconds / len(read_metrics(run)),
    }  # fmt: skip


def table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    head = (
        "| model | layers | parameters | s / epoch | val macro-F1 % (seeds "
        + ", ".join(map(str, seeds))
        + "; mean) | after the vote (seeds; mean) |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        raw = [run["f1"] for run in runs]
        voted = [run["smoothed"] for run in runs]
        lines.append(
            f"| `{name}` | {runs[0]['layers']} | {runs[0]['parameters']:,} | "
            f"{sum(run['seconds_per_epoch'] for run in runs) / len(runs):.1f} | "
            f"{' / '.join(f'{v:.2f}' for v in raw)}; **{sum(raw) / len(raw):.2f}** | "
            f"{' / '.join(f'{v:.2f}' for v in voted)}; **{sum(voted) / len(voted):.2f}** |"
        )
    return "\n".join(lines)


def section(text: str, args: argparse.Namespace) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    settings = DemoSettings()
    seeds = " ".join(map(str, args.seeds))
    reading = textwrap.fill(
        "Each registered temporal model, trained on the cache the demo's temporal row trains on "
        f"(its last phase-1 student's, from `fercache demo --out DEMO --seed {args.demo_seed}`) "
        f"with the demo's temporal settings ({', '.join(settings.temporal_overrides)}, "
        f"{settings.temporal_epochs} epochs) except its depth, at training seeds {seeds}. The "
        "figures are the trainer's validation of the final epoch (nothing chosen on the "
        "validation videos): macro-F1 over the rows of the validation videos' stores, raw and "
        f"after the window-{settings.window} vote. The demo's table scores every annotated "
        "frame instead (frames without a face image filled from their neighbours), so its "
        "temporal rows read a little differently.",
        width=96,
    )
    return f"""{SECTION}

{reading}

{text}

- Command: `fercache demo --out DEMO --seed {args.demo_seed}`, then `python
  benchmarks/temporal_models.py --demo DEMO --seeds {seeds} --write results/training.md`.
- Commit: {commit}.
- Machine: {platform.machine()}, {os.cpu_count()} cores, CPU only (torch {torch.__version__});
  seconds per epoch on a shared machine (other jobs ran beside it).
"""


def write_section(path: Path, text: str) -> None:
    content = path.read_text()
    pattern = re.compile(rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", re.S)
    content = pattern.sub(text.rstrip("\n"), content) if pattern.search(content) else (
        content.rstrip("\n") + "\n\n" + text
    )  # fmt: skip
    path.write_text(content.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a `fercache demo --out` folder")
    parser.add_argument("--demo-seed", type=int, default=0, help="the seed the demo ran with")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--write", type=Path, default=None, help="results file to update")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fercache-temporal-models-"))
    results = {
        name: [train_model(args.demo, name, seed, work) for seed in args.seeds]
        for name in TEMPORAL_MODELS
    }
    text = table(results, args.seeds)
    print(text)
    if args.write:
        write_section(args.write, section(text, args))


if __name__ == "__main__":
    main()

"""Phase 1 on the synthetic pools: MPL (teacher/student with feedback) against the supervised
baseline of the same budget (same backbone, steps, batch, schedule), over several seeds.

For every run it reports the held-out split of the labelled pool (what `metrics.jsonl` logs)
and the macro-F1 of the exported student on every labelled frame of the synthetic
Validation_Set videos (other identities, video-like nuisance: the frames extraction will see).

    python benchmarks/pretrain_ssl_vs_supervised.py --out /tmp/bench --steps 300 --seeds 0 1
    python benchmarks/pretrain_ssl_vs_supervised.py --out /tmp/b2 --steps 1200 --finetune-steps 600
    python benchmarks/pretrain_ssl_vs_supervised.py --out /tmp/b3 --steps 600 --finetune-steps 300 \
        --seeds 0 --set threshold=0.7 --set lambda_u=3
"""

import argparse
import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from fercache.pretrain import PretrainConfig, pretrain
from fercache.pretrain.loop import evaluate
from fercache.pretrain.sources import affwild2_frames
from fercache.pretrain.views import LabelledDataset, build_views, data_config_of
from fercache.settings import parse_override, typed_values
from fercache.synth import SynthConfig, generate


def validation_frames(tree: Path) -> tuple[list[Path], np.ndarray]:
    """Every labelled Validation_Set frame that has an image, and its class."""
    frames = affwild2_frames(tree, "val")
    return frames.paths, np.asarray(frames.labels)


def frame_f1(run: Path, config: PretrainConfig, frames: tuple[list[Path], np.ndarray]) -> float:
    model = timm.create_model(config.backbone, num_classes=8)
    model.load_state_dict(load_file(run / "student.safetensors"))
    views = build_views(
        data_config_of(model, config.image_size),
        config.resize_ratio,
        config.randaugment,
        config.erasing_prob,
    )
    loader = DataLoader(LabelledDataset(*frames, views.evaluation), batch_size=128)
    return evaluate(model, loader, torch.device("cpu"), contextlib.nullcontext)["f1"]


def _student_f1_at(records: list[dict], step: int) -> float | None:
    """The held-out student F1 logged at `step` (for MPL: before its fine-tuning)."""
    at_step = (r for r in records if r["step"] == step and "heldout_student_f1" in r)
    return next((r["heldout_student_f1"] for r in at_step), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=0.05, help="the baseline's and the teacher's")
    parser.add_argument("--student-lr", type=float, default=0.01, help="the MPL student's")
    parser.add_argument("--erasing", type=float, default=0.0, help="strong-view erasing")
    parser.add_argument(
        "--finetune-steps", type=int, default=0, help="of --steps, the MPL student's fine-tuning"
    )
    parser.add_argument("--finetune-lr", type=float, default=0.05, help="its peak lr")
    parser.add_argument("--labelled", type=int, default=800)
    parser.add_argument("--unlabelled", type=int, default=3000)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pretrain setting for both runs, e.g. threshold=0.7 (repeatable)",
    )
    args = parser.parse_args()
    overrides = typed_values(
        PretrainConfig, dict(parse_override(text) for text in args.overrides), "pretrain"
    )

    tree = args.out / "tree"
    if not tree.is_dir():
        synth = SynthConfig(
            videos=8,
            frames=200,
            seed=0,
            labelled_pool=args.labelled,
            unlabelled_pool=args.unlabelled,
            workers=1,
        )
        generate(tree, synth, progress=False)
    frames = validation_frames(tree)
    results = []
    for seed in args.seeds:
        for recipe in ("supervised", "mpl"):
            defaults = PretrainConfig(
                recipe=recipe,
                backbone=args.backbone,
                image_size=args.image_size,
                steps=args.steps,
                batch_size=32,
                mu=2,
                student_lr=args.lr if recipe == "supervised" else args.student_lr,
                teacher_lr=args.lr,
                uda_steps=args.steps - args.finetune_steps,
                erasing_prob=args.erasing,
                student_finetune_steps=args.finetune_steps if recipe == "mpl" else 0,
                student_finetune_lr=args.finetune_lr,
                eval_every=args.steps,
                log_every=max(1, args.steps // 10),
                checkpoint_every=args.steps,
                workers=1,
                seed=seed,
            )
            config = replace(defaults, **overrides)  # --set wins over the defaults above
            config.validate()
            run = args.out / f"{recipe}-seed{seed}"
            started = time.perf_counter()
            report = pretrain(
                [tree / "pools" / "labelled.csv"],
                [tree / "pools" / "unlabelled"],
                run,
                config,
                progress=False,
            )
            seconds = time.perf_counter() - started
            records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
            loss_key = "student_supervised" if recipe == "supervised" else "teacher_supervised"
            result = {
                "recipe": recipe,
                "seed": seed,
                "seconds": round(seconds, 1),
                "first_loss": records[0][loss_key],
                "last_loss": [record for record in records if loss_key in record][-1][loss_key],
                "heldout_f1": report.evaluation["student_f1"],
                "heldout_f1_after_mpl": _student_f1_at(records, config.mpl_steps),
                "heldout_accuracy": report.evaluation["student_accuracy"],
                "teacher_heldout_f1": report.evaluation.get("teacher_f1"),
                "validation_frames_f1": frame_f1(run, config, frames),
                "feedback_running_mean": records[-1].get("feedback_running_mean"),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

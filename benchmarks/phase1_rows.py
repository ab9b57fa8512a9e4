"""One phase-1 run as a row of the demo trains it, scored on the frames the demo scores it on.

Trains one student (and, for mpl, its teacher) on a synthetic tree with the demo's phase-1
settings plus any `--set`, then prints one JSON line: the macro-F1 (%) of the exported student
and teacher on every labelled frame of the tree's Validation_Set, their per-class recall and
prediction counts, and their macro-F1 on the unlabelled faces whose drawn intensity is at least
0.5 (against the class the generator drew: the quality of the teacher's pseudo labels). The
ablations in results/demo.md were made with it, one change at a time:

    python benchmarks/phase1_rows.py --tree /tmp/t0 --out /tmp/runs/base --recipe supervised
    python benchmarks/phase1_rows.py --tree /tmp/t0 --out /tmp/runs/mpl --recipe mpl \
        --set threshold=0.7 --set lambda_u=2 --set temperature=0.4

The tree is generated with the demo's sizes at `--seed` when `--tree` does not exist yet.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file
from sklearn.metrics import confusion_matrix, f1_score
from torch.utils.data import DataLoader

from fercache.experiments.demo import DemoSettings
from fercache.pretrain import load_config, pretrain
from fercache.pretrain.sources import affwild2_frames
from fercache.pretrain.views import LabelledDataset, build_views, data_config_of
from fercache.synth import SynthConfig, generate, unlabelled_truth

LABELLED = {"frames": [""], "both": ["", "pools/labelled.csv"], "still": ["pools/labelled.csv"]}


def validation_frames(tree: Path) -> tuple[list[Path], np.ndarray]:
    """Every labelled Validation_Set frame that has an image, and its class."""
    frames = affwild2_frames(tree, "val")
    return frames.paths, np.asarray(frames.labels)


def unlabelled_faces(tree: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The unlabelled pool's images with the class and intensity each was drawn with."""
    config = SynthConfig(**json.loads((tree / "synth.json").read_text())["config"])
    classes, intensities = unlabelled_truth(config)
    paths = [tree / "pools" / "unlabelled" / f"{i + 1:06d}.jpg" for i in range(len(classes))]
    return paths, classes, intensities


@torch.no_grad()
def predictions(checkpoint: Path, backbone: str, image_size: int, paths, labels) -> np.ndarray:
    """The exported network's class for each image, seen as extraction sees it."""
    model = timm.create_model(backbone, num_classes=8)
    model.load_state_dict(load_file(checkpoint))
    model.eval()
    views = build_views(data_config_of(model, image_size), 1.0, "rand-m9", 0.0)
    loader = DataLoader(LabelledDataset(paths, labels, views.evaluation), batch_size=256)
    return np.concatenate([model(images).argmax(1).numpy() for images, *_ in loader])


def scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Macro-F1 (%), per-class recall and prediction counts."""
    matrix = confusion_matrix(labels, predicted, labels=range(8))
    return {
        "f1": round(100 * f1_score(labels, predicted, average="macro", labels=range(8)), 2),
        "recall": np.round(matrix.diagonal() / np.maximum(1, matrix.sum(1)), 2).tolist(),
        "predicted": np.bincount(predicted, minlength=8).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the run folder (must be new)")
    parser.add_argument(
        "--recipe", choices=("supervised", "mpl", "fixmatch", "pseudo-label"), default="mpl"
    )
    parser.add_argument(
        "--labelled",
        choices=tuple(LABELLED),
        default="frames",
        help="the video training frames (rows 1-2), + the still images (row 3), or those alone",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the tree (when made) and the run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--score-only", action="store_true", help="score the networks already in --out"
    )
    args = parser.parse_args()
    settings = DemoSettings()
    if not args.tree.is_dir():
        generate(args.tree, settings.synth_config(args.seed), progress=False)
    labelled = [args.tree / part for part in LABELLED[args.labelled]]
    unlabelled = [args.tree / "pools" / "unlabelled"] if args.recipe != "supervised" else []
    overrides = [
        f"backbone={settings.backbone}",
        f"steps={settings.pretrain_steps}",
        f"recipe={args.recipe}",
        *settings.pretrain_overrides(args.recipe),
        f"seed={args.seed}",
        *args.overrides,  # last: they win
    ]
    config = load_config(None, overrides)
    started = time.perf_counter()
    if not args.score_only:
        pretrain(labelled, unlabelled, args.out, config, progress=False)
    result = {
        "recipe": args.recipe,
        "labelled": args.labelled,
        "set": args.overrides,
        "seconds": round(time.perf_counter() - started, 1),
    }
    frames, frame_labels = validation_frames(args.tree)
    faces, classes, intensities = unlabelled_faces(args.tree)
    visible = intensities >= 0.5  # below, most faces look neutral whatever class was drawn
    for network in ("student", "teacher"):
        checkpoint = args.out / f"{network}.safetensors"
        if not checkpoint.is_file():
            continue
        shape = (checkpoint, config.backbone, config.image_size)
        result[network] = scores(frame_labels, predictions(*shape, frames, frame_labels))
        # the teacher's labels of the unlabelled faces are what its student learns from
        on_faces = predictions(*shape, faces, classes)
        result[network]["unlabelled_f1"] = scores(classes[visible], on_faces[visible])["f1"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

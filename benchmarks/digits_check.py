"""Phase 1 on real images: scikit-learn's handwritten digits, at the demo's phase-1 settings.

Digits are the textbook case where unlabelled images help. Classes 0-7 (8, as the expression
classes), a stratified 30 % test split (`random_state` 0), 10 labelled images per class and the
rest of the training images unlabelled; the 8x8 images scaled to 0-255 and upscaled (bilinear)
to 48 px RGB. Each recipe runs `fercache pretrain` with `DemoSettings().pretrain_overrides`,
exactly as the demo's rows do, and its exported network is scored on the test split as
`extract` feeds images. The semi-supervised recipes should end at least at the supervised
network's test accuracy:

    python benchmarks/digits_check.py --seeds 0 1 2 --recipes supervised mpl fixmatch

Prints one JSON line per run and a markdown table (results/pretraining.md holds it).
"""

import argparse
import csv
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from phase1_rows import predictions
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from fercache.experiments.demo import DemoSettings
from fercache.pretrain import load_config, pretrain

LABELLED_PER_CLASS = 10
CLASSES = 8
SIZE = 48


def write_images(folder: Path, images: np.ndarray, prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        grey = Image.fromarray((image * 255 / 16).astype(np.uint8), "L")
        path = folder / f"{prefix}{index:05d}.png"
        grey.resize((SIZE, SIZE), Image.BILINEAR).convert("RGB").save(path)
        paths.append(path)
    return paths


def digits_task(root: Path) -> dict:
    """Write the labelled CSV, the unlabelled folder and the test images under `root`."""
    digits = load_digits()
    keep = digits.target < CLASSES
    images, labels = digits.images[keep], digits.target[keep]
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.3, stratify=labels, random_state=0
    )
    rng = np.random.default_rng(0)
    labelled = np.concatenate(
        [
            rng.choice(np.flatnonzero(train_y == c), LABELLED_PER_CLASS, replace=False)
            for c in range(CLASSES)
        ]
    )
    unlabelled = np.setdiff1d(np.arange(len(train_y)), labelled)
    labelled_paths = write_images(root / "labelled", train_x[labelled], "l")
    csv_path = root / "labelled.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for path, label in zip(labelled_paths, train_y[labelled], strict=True):
            writer.writerow([f"labelled/{path.name}", int(label)])
    write_images(root / "unlabelled", train_x[unlabelled], "u")
    test_paths = write_images(root / "test", test_x, "t")
    return {
        "labelled": f"abaw:{csv_path}",
        "unlabelled": root / "unlabelled",
        "test": (test_paths, test_y),
    }


def run(task: dict, recipe: str, seed: int, out: Path) -> dict:
    settings = DemoSettings()
    overrides = [
        f"backbone={settings.backbone}",
        f"steps={settings.pretrain_steps}",
        f"recipe={recipe}",
        *settings.pretrain_overrides(recipe),
        f"seed={seed}",
    ]
    config = load_config(None, overrides)
    unlabelled = [task["unlabelled"]] if recipe != "supervised" else []
    started = time.perf_counter()
    pretrain([Path(task["labelled"])], unlabelled, out, config, progress=False)
    paths, labels = task["test"]
    predicted = predictions(
        out / "student.safetensors", config.backbone, config.image_size, paths, labels
    )
    return {
        "recipe": recipe,
        "seed": seed,
        "accuracy": round(100 * accuracy_score(labels, predicted), 2),
        "f1": round(100 * f1_score(labels, predicted, average="macro"), 2),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _commit() -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], check=False).returncode
    return commit + (" plus uncommitted changes" if dirty else "")


def table(results: list[dict], seeds: list[int], recipes: list[str]) -> list[str]:
    lines = [
        "| recipe (exported network) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for recipe in recipes:
        cells = []
        for seed in seeds:
            found = next(r for r in results if r["recipe"] == recipe and r["seed"] == seed)
            cells.append(f"{found['accuracy']:.1f} % / {found['f1']:.1f}")
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=["supervised", "mpl", "fixmatch"])
    args = parser.parse_args()
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        task = digits_task(Path(work) / "digits")
        for seed in args.seeds:
            for recipe in args.recipes:
                result = run(task, recipe, seed, Path(work) / f"{recipe}-{seed}")
                results.append(result)
                print(json.dumps(result), flush=True)
    minutes = (time.perf_counter() - started) / 60
    command = "python benchmarks/digits_check.py --seeds " + " ".join(map(str, args.seeds))
    command += " --recipes " + " ".join(args.recipes)
    print("\nTest accuracy / macro-F1 (%) on the 433 test digits:\n")
    print("\n".join(table(results, args.seeds, args.recipes)))
    print(f"\n- Command: `{command}` ({minutes:.0f} min)\n- Commit: {_commit()}")
    print(f"- Machine: {platform.machine()}, {torch.get_num_threads()} threads, no GPU")


if __name__ == "__main__":
    main()

"""Row 2 of the demo: which semi-supervised recipe, chosen on held-out *training* videos.

On the demo's synthetic tree of each seed, trains every recipe the demo may use for its SSL row
(and the supervised baseline of row 1) with the demo's shared phase-1 settings (`DemoSettings`):
labelled, the training videos' frames; unlabelled, the unlabelled face pool. For each run:

- held-out F1: macro-F1 (%) of the exported network on the run's own held-out split (whole
  training videos it did not train on): the only figure the choice is made on;
- validation F1: the same network on the validation frames the demo's rows are scored on
  (people never seen in training), reported, never chosen on;
- teacher validation F1: the same for the network that makes the pseudo labels (MPL's teacher;
  the network itself for the other recipes);
- pseudo-label F1: that network's macro-F1 on the unlabelled faces drawn with intensity >= 0.5,
  against the class the generator drew (`unlabelled_truth`): what it teaches;
- confident share: the unlabelled images over the threshold in the last logged step.

    python benchmarks/ssl_variants.py --seeds 0 1 2 --write results/ssl-variants.md

Trees are made with the demo's sizes under `--trees` (kept, so a second run reuses them).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from phase1_rows import predictions, unlabelled_faces
from reference_learners import _commit, demo_tree, machine

from fercache.experiments.demo import DemoSettings
from fercache.experiments.references import macro_f1, validation_sample
from fercache.pretrain import load_config, pretrain

RECIPES = ("supervised", "fixmatch", "pseudo-label", "mpl")
VISIBLE = 0.5  # below this drawn intensity most faces look neutral whatever class was drawn


def run_recipe(tree: Path, recipe: str, seed: int, work: Path) -> dict[str, float]:
    """One phase-1 run of `recipe` as the demo would train it, and its four figures."""
    settings = DemoSettings()
    overrides = [
        f"backbone={settings.backbone}",
        f"steps={settings.pretrain_steps}",
        f"recipe={recipe}",
        *settings.pretrain_overrides(recipe),
        f"seed={seed}",
    ]
    config = load_config(None, overrides)
    run = work / f"{tree.name}-{recipe}"
    unlabelled = [] if recipe == "supervised" else [tree / "pools" / "unlabelled"]
    pretrain([tree], unlabelled, run, config, progress=False)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    validation = validation_sample(tree)
    faces, classes, intensities = unlabelled_faces(tree)
    visible = intensities >= VISIBLE
    teacher = run / "teacher.safetensors"
    teaching = teacher if teacher.is_file() else run / "student.safetensors"
    on_faces = predictions(teaching, config.backbone, config.image_size, faces, classes)
    shape = (config.backbone, config.image_size, validation.paths, validation.labels)
    predicted = predictions(run / "student.safetensors", *shape)
    return {
        "heldout": round(100 * last["heldout_student_f1"], 2),
        "validation": macro_f1(validation.labels, predicted),
        "teacher_validation": macro_f1(validation.labels, predictions(teaching, *shape)),
        "pseudo_label": macro_f1(classes[visible], on_faces[visible]),
        "confident": round(100 * last.get("mask_ratio", float("nan")), 1),
    }


def markdown(results: dict[int, dict[str, dict]], command: str, seconds: float) -> str:
    seeds = sorted(results)
    figures = ("heldout", "validation", "teacher_validation", "pseudo_label")
    header = "| recipe | " + " | ".join(
        f"{name}, seeds {' / '.join(map(str, seeds))} | mean" for name in figures
    )
    lines = [
        header + " | confident share, last step |",
        "|---|" + "---|---|" * len(figures) + "---|",
    ]
    means = {}
    for recipe in RECIPES:
        cells = []
        for name in figures:
            values = [results[s][recipe][name] for s in seeds]
            cells += [" / ".join(f"{v:.2f}" for v in values), f"{np.mean(values):.2f}"]
        means[recipe] = np.mean([results[s][recipe]["heldout"] for s in seeds])
        shares = " / ".join(_share(results[s][recipe]["confident"]) for s in seeds)
        lines.append(f"| {recipe} | " + " | ".join(cells) + f" | {shares} |")
    best = max((r for r in RECIPES if r != "supervised"), key=means.get)
    chosen = DemoSettings().ssl_recipe
    verdict = (
        f"The best semi-supervised recipe on held-out training videos is **{best}** "
        f"(mean {means[best]:.2f}); the demo's row 2 uses `{chosen}`"
        + (" (the same)." if best == chosen else ": **change `DemoSettings.ssl_recipe`**.")
    )
    return "\n".join(
        [
            "# Row 2 of the demo: which semi-supervised recipe",
            "",
            "Each recipe the demo may use for its SSL row, and the supervised baseline of row 1, "
            "trained with the demo's shared phase-1 settings (`DemoSettings`) on the demo tree of "
            "each seed: labelled, the training videos' frames; unlabelled, the unlabelled face "
            "pool. Macro-F1 (%, 8 classes) of the exported network: *heldout* on the run's own "
            "held-out split (whole training videos it did not train on), the only figure the "
            "choice is made on; *validation* on the validation frames the demo's rows are scored "
            "on (people never seen in training), reported, never chosen on; "
            "*teacher_validation* the same for the network that makes the pseudo labels (MPL's "
            "teacher; the network itself for the other recipes); *pseudo_label* on "
            f"the unlabelled faces drawn with intensity >= {VISIBLE} against the class the "
            "generator drew (what that network teaches). The confident share is "
            "the unlabelled images over the pseudo-label threshold in the last logged step "
            "(none for supervised).",
            "",
            *lines,
            "",
            verdict,
            "",
            f"- Command: `{command}` ({seconds / 60:.0f} min)",
            f"- Commit: {_commit()}",
            f"- Machine: {machine()}",
            "",
        ]
    )


def _share(percent: float) -> str:
    return "-" if np.isnan(percent) else f"{percent:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--trees", type=Path, default=Path(tempfile.gettempdir()) / "fercache-ref")
    parser.add_argument("--write", type=Path, help="write the markdown table to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            tree = demo_tree(args.trees, seed)
            results[seed] = {r: run_recipe(tree, r, seed, Path(work)) for r in RECIPES}
            print(json.dumps({"seed": seed, **results[seed]}), flush=True)
    command = "python benchmarks/ssl_variants.py --seeds " + " ".join(map(str, args.seeds))
    if args.write:
        command += f" --write {args.write}"
    text = markdown(results, command, time.perf_counter() - started)
    if args.write:
        args.write.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

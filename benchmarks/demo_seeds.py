"""Regenerate the seed tables of results/demo.md: `fercache demo` at several seeds, mean ± sd.

    python benchmarks/demo_seeds.py --work /tmp/demo-seeds --seeds 0 1 2

Each seed runs `fercache demo --out WORK/seed-S --seed S` (a seed whose report.md exists is
read, not rerun: delete its folder to rerun it). The section between the `seeds` markers of
results/demo.md is replaced with the per-seed table, mean ± sd, the checks of the demo's
acceptance, the commands, the commit and the machine; the rest of the file (the ablations) is
kept as written.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

from fercache.experiments.demo import REFERENCES_FILE, ROW_FILES, DemoSettings, paper_rows, run_demo

BEGIN, END = "<!-- seeds:begin -->", "<!-- seeds:end -->"
RESULTS = Path(__file__).resolve().parent.parent / "results" / "demo.md"


REFERENCE_ROWS = {
    "frames": "Reference: HOG + logistic regression on the training frames",
    "still": "Reference: HOG + logistic regression on the still images",
}


def seed_rows(work: Path, seed: int) -> list[float]:
    """The five validation macro-F1 figures of the demo at `seed`, from its evaluate JSON files,
    then its reference learners' (REFERENCE_ROWS) on the same frames."""
    out = work / f"seed-{seed}"
    if not (out / "report.md").is_file():
        run_demo(out, seed=seed, progress=False)
    references = json.loads((out / REFERENCES_FILE).read_text())
    return [
        *(
            round(100 * json.loads((out / "pred" / f"{stem}.json").read_text())["expr_f1"], 2)
            for stem in ROW_FILES
        ),
        *(references[source] for source in REFERENCE_ROWS),
    ]


def section(figures: dict[int, list[float]]) -> str:
    seeds = sorted(figures)
    header = "| row | Yu et al. | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |"
    lines = [header, "|---" * (len(seeds) + 3) + "|"]
    means = []
    rows = paper_rows(DemoSettings().ssl_recipe)
    named = [*rows, *((name, None) for name in REFERENCE_ROWS.values())]
    for index, (name, paper) in enumerate(named):
        values = [figures[s][index] for s in seeds]
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        means.append(mean)
        cells = " | ".join(f"{v:.2f}" for v in values)
        cited = "-" if paper is None else f"{paper:.2f}"
        lines.append(f"| {name} | {cited} | {cells} | {mean:.2f} ± {spread:.2f} |")
    means = means[: len(rows)]
    checks = [
        ("the mean rises at every row", all(b > a for a, b in pairwise(means))),
        *((f"seed {s}: row 2 ≥ row 1 + 3", figures[s][1] >= figures[s][0] + 3) for s in seeds),
        *((f"seed {s}: row 5 > row 3", figures[s][4] > figures[s][2]) for s in seeds),
    ]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    machine = (
        f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {sys.version.split()[0]}"
    )
    return "\n".join(
        [
            BEGIN,
            "Validation macro-F1 (%) of `fercache demo --seed S` (default settings), each figure "
            "read from the row's `fercache evaluate --json` file (`pred/<row>.json`); the "
            "reference rows from the demo's `references.json`, on the same frames.",
            "",
            *lines,
            "",
            "Acceptance checks of the demo:",
            "",
            *(f"- {'met' if ok else '**not met**'}: {text}" for text, ok in checks),
            "",
            f"Command: `python benchmarks/demo_seeds.py --seeds {' '.join(map(str, seeds))}`; "
            f"commit {commit or 'unknown'}; machine: {machine}, "
            f"{os.cpu_count()} cores, no GPU.",
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo-seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    figures = {seed: seed_rows(args.work, seed) for seed in args.seeds}
    text = RESULTS.read_text() if RESULTS.is_file() else f"# The demo table\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    written = section(figures)
    RESULTS.write_text(head + written + rest.split(END, 1)[1])
    print(written)


if __name__ == "__main__":
    main()

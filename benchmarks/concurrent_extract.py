"""Two `fercache extract` processes on one cache against one alone, and against the naive pair.

(a) alone:  one `fercache extract` on a fresh cache;
(b) shared: two started at once on one fresh cache: they split the videos through per-video
            claims (docs/extract.md, "Several processes");
(c) naive:  two started at once, each on its own fresh cache: what two processes did before
            claims, each computing every video.

Each process is the real command line (`python cli.py extract`) limited to one core: one torch
thread (OMP_NUM_THREADS=1) and JPEG decoding in the process itself (--workers 0), so a pair on
a 2-core machine has one core per process, as (a) has one core. Wall times include each
process's start (imports, model); a pair's time runs until both have exited. CPU seconds
(user + system, of the processes together) are printed beside them: the work done, which
other jobs on a shared machine do not change as they change wall times.

    python benchmarks/concurrent_extract.py                    # resnet18 at 112 px, synthetic
    python benchmarks/concurrent_extract.py --videos 16 --frames 400 --repeats 3

Without --data a synthetic tree is generated first (not timed). Prints the wall times and
b/a (ideal 0.5 on two free cores) and c/a (ideal 1.0: the second process only duplicates),
and the same ratios of CPU seconds (ideal 1.0 and 2.0).
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fercache.features.store import read_manifest
from fercache.synth import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = _arguments()
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch_dir:
        scratch = Path(scratch_dir)
        data = args.data or _synthetic_tree(scratch / "tree", args)
        print(f"{args.backbone} at {args.input_size} px, batch {args.batch_size}, one core each")
        runs: dict[str, list[tuple[float, float]]] = {"alone": [], "shared": [], "naive": []}
        for repeat in range(args.repeats):
            caches = scratch / f"caches-{repeat}"
            alone = _timed(args, data, [caches / "alone"])
            frames = read_manifest(caches / "alone")["total_rows"]
            print(f"(a) one process alone          {_figures(alone)}   {frames:,} frames")
            shared = _timed(args, data, [caches / "shared"] * 2)
            print(f"(b) two at once, one cache     {_figures(shared)}   videos {_split(shared)}")
            _check_same_manifest(caches / "alone", caches / "shared")
            naive = _timed(args, data, [caches / "naive-1", caches / "naive-2"])
            print(f"(c) two at once, a cache each  {_figures(naive)}   videos {_split(naive)}")
            for name, run in zip(runs, (alone, shared, naive), strict=True):
                runs[name].append(run[:2])
        label = f"medians of {args.repeats}" if args.repeats > 1 else "one run"
        for kind, column in (("wall", 0), ("CPU", 1)):
            a, b, c = (statistics.median(run[column] for run in runs[name]) for name in runs)
            print(f"{kind:>4}: b/a = {b / a:.2f}   c/a = {c / a:.2f}   ({label})")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="Aff-Wild2 root; default: a synthetic tree")
    parser.add_argument("--videos", type=int, default=8, help="synthetic videos")
    parser.add_argument("--frames", type=int, default=250, help="mean frames per synthetic video")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="(a), (b), (c) in turn, N times")
    parser.add_argument("--scratch", type=Path, help="folder for temporary files")
    return parser.parse_args()


def _synthetic_tree(root: Path, args: argparse.Namespace) -> Path:
    config = SynthConfig(
        videos=args.videos, frames=args.frames, seed=0, labelled_pool=40, unlabelled_pool=40
    )
    generate(root, config, progress=False)
    return root


def _timed(
    args: argparse.Namespace, data: Path, caches: list[Path]
) -> tuple[float, float, list[str]]:
    """Start one `fercache extract` per cache at once: the seconds until all exited, their CPU
    seconds together, and their outputs."""
    one_core = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [
        sys.executable, str(ROOT / "cli.py"), "extract", str(data), "--backbone", args.backbone,
        "--input-size", str(args.input_size), "--batch-size", str(args.batch_size),
        "--workers", "0", "--device", "cpu", "--no-progress", "--out",
    ]  # fmt: skip
    cpu_before = _children_cpu_seconds()
    started = time.perf_counter()
    processes = [
        subprocess.Popen([*command, str(cache)], env=one_core, stdout=subprocess.PIPE, text=True)
        for cache in caches
    ]
    outputs = [process.communicate()[0] for process in processes]
    seconds = time.perf_counter() - started
    cpu = _children_cpu_seconds() - cpu_before  # the processes have been waited for
    for process, output in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            sys.exit(f"fercache extract failed ({process.returncode}):\n{output}")
    return seconds, cpu, outputs


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _figures(run: tuple[float, float, list[str]]) -> str:
    return f"{run[0]:7.1f} s wall  {run[1]:7.1f} s CPU"


def _split(run: tuple[float, float, list[str]]) -> str:
    """How many videos each process extracted, e.g. `4 + 4`."""
    counts = []
    for output in run[2]:
        found = re.search(r"extracted (\d+) videos", output)
        if found is None:
            sys.exit(f"no summary line in the output of fercache extract:\n{output}")
        counts.append(found.group(1))
    return " + ".join(counts)


def _check_same_manifest(alone: Path, shared: Path) -> None:
    if read_manifest(alone)["videos"] != read_manifest(shared)["videos"]:
        sys.exit(f"{shared}: the shared cache's manifest differs from the single run's")


if __name__ == "__main__":
    main()

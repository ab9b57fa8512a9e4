"""Imports point down: every module of fercache/ has a layer, and imports only its own or earlier.

Layers, lowest first: base (errors, outputs, settings, the Aff-Wild2 data...) -> synth (the
generator) -> backbone/store (formats and the shared computation: backbone, stores, PRED files,
metrics, the vote) -> the stages in pipeline order (pretrain, extract, temporal, predict,
smooth, evaluate, submit, inspect; pretrain and temporal ordered inside too) -> experiments
(demo, sweep, bagging, folds, ensemble, runs) -> cli. A module may import any module of its own
group or of an earlier one. Imports inside functions (the CLI imports lazily) count like any other.

A helper two modules share goes down to the lowest layer both can import, never up.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fercache"

# (kind, group), lowest first. Within one group imports go either way.
ORDER: list[tuple[str, str]] = [
    ("layer", "base"),
    ("layer", "synth"),
    ("layer", "backbone/store"),
    ("stage", "pretrain: blocks"),
    ("stage", "pretrain: recipe"),
    ("stage", "pretrain: recipes"),
    ("stage", "pretrain: registry"),
    ("stage", "pretrain: loop"),
    ("stage", "pretrain"),
    ("stage", "crop"),
    ("stage", "extract"),
    ("stage", "temporal: blocks"),
    ("stage", "temporal: inference"),
    ("stage", "temporal: loop"),
    ("stage", "predict"),
    ("stage", "smooth"),
    ("stage", "evaluate"),
    ("stage", "submit"),
    ("stage", "inspect"),
    ("layer", "experiments"),
    ("layer", "cli"),
]

# Module -> group, one line per module; `pkg.*` is a package and everything in it. An exact line
# wins over a package line.
RANKS: dict[str, str] = {
    "fercache": "base",  # __version__
    "fercache.errors": "base",
    "fercache.damage": "base",  # how a file that cannot be read is named in an error
    "fercache.outputs": "base",
    "fercache.progress": "base",
    "fercache.settings": "base",
    "fercache.distributed": "base",
    "fercache.runfolder": "base",  # the run-folder convention of pretrain and train
    "fercache.claims": "base",  # which process computes which item of a shared folder
    "fercache.data.*": "base",  # affwild2, tasks, layout, labels, framelist
    "fercache.synth.*": "synth",
    "fercache.backbone": "backbone/store",
    "fercache.store": "backbone/store",
    "fercache.weights": "backbone/store",  # pretrained by name, foreign checkpoints, convert
    "fercache.predictions": "backbone/store",  # the PRED file format
    "fercache.metrics": "backbone/store",  # F1, CCC, P: training and evaluate score with them
    "fercache.readout": "backbone/store",  # which layer, pooling and TTA extract reads out
    "fercache.vote": "backbone/store",  # the majority vote: training and smooth use it
    "fercache.pretrain.config": "pretrain: blocks",
    "fercache.pretrain.sampling": "pretrain: blocks",
    "fercache.pretrain.sources": "pretrain: blocks",
    "fercache.pretrain.views": "pretrain: blocks",
    "fercache.pretrain.export": "pretrain: blocks",
    "fercache.pretrain.recipe": "pretrain: recipe",  # what every recipe shares
    # every other pretrain module is a recipe (supervised, mpl, finetune, cotex, emma,
    # landmarks): a new recipe needs its module and its registry line, not a line here
    "fercache.pretrain.*": "pretrain: recipes",
    "fercache.pretrain.recipes": "pretrain: registry",
    "fercache.pretrain.loop": "pretrain: loop",
    "fercache.pretrain": "pretrain",  # the package's __init__: its public face
    "fercache.crop": "crop",  # videos -> cropped_aligned/, runs before extract
    "fercache.extract": "extract",
    "fercache.importing": "extract",  # features made by other tools -> a cache, beside extract
    "fercache.audio": "extract",  # speech-encoder features of the videos' sound -> a cache
    "fercache.temporal.features": "temporal: blocks",
    "fercache.temporal.clips": "temporal: blocks",
    "fercache.temporal.subsample": "temporal: blocks",
    "fercache.temporal.config": "temporal: blocks",
    "fercache.temporal.model": "temporal: blocks",
    "fercache.temporal.step": "temporal: blocks",
    "fercache.temporal.rundir": "temporal: blocks",
    "fercache.temporal.inference": "temporal: inference",
    "fercache.temporal.loop": "temporal: loop",
    "fercache.temporal": "temporal: loop",  # the package's __init__
    "fercache.predict": "predict",
    "fercache.smooth": "smooth",
    "fercache.evaluate": "evaluate",
    "fercache.submit": "submit",
    "fercache.inspect": "inspect",
    "fercache.references": "experiments",  # reference learners the demo reports beside its rows
    "fercache.demo": "experiments",
    "fercache.analyse": "experiments",  # crop -> extract -> predict -> smooth on video files
    "fercache.sweep": "experiments",
    "fercache.bagging": "experiments",
    "fercache.folds": "experiments",  # subject-grouped k-fold cross-validation
    "fercache.ensemble": "experiments",
    "fercache.runs": "experiments",
    "fercache.cli": "cli",
    "fercache.__main__": "cli",
}

RANK = {group: index for index, (_, group) in enumerate(ORDER)}
KIND = {group: kind for kind, group in ORDER}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module under fercache/ -> its file."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def group_of(module: str) -> str | None:
    if module in RANKS:
        return RANKS[module]
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        wildcard = ".".join(parts[:end]) + ".*"
        if wildcard in RANKS:
            return RANKS[wildcard]
    return None


def imported(source: str, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The fercache modules `source` (module `module`) imports, anywhere in it: top level,
    functions, branches. `from a import b` names module a.b when that is a module, else a."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                found.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return sorted({name for name in found if name == "fercache" or name.startswith("fercache.")})


def edges() -> list[tuple[str, str, str]]:
    """(file, importer, imported) for every import of a fercache module by a fercache module."""
    found = modules()
    known = set(found)
    return [
        (str(path.relative_to(ROOT)), name, target)
        for name, path in found.items()
        for target in imported(path.read_text(), name, path.name == "__init__.py", known)
    ]


def upward(pairs: list[tuple[str, str, str]]) -> list[str]:
    """One line per import that points to a later group (or to a module without a group)."""
    problems = []
    for path, importer, target in pairs:
        mine, theirs = group_of(importer), group_of(target)
        if theirs is None:
            problems.append(
                f"{path} imports {target}, which has no layer (no such module, or add it to "
                "RANKS in tests/test_layers.py)"
            )
        elif mine is not None and RANK[theirs] > RANK[mine]:
            problems.append(
                f"{path} imports {target} ({KIND[mine]} '{mine}' → {KIND[theirs]} '{theirs}' "
                "which comes later)"
            )
    return problems


def test_every_module_has_a_layer():
    assert set(RANKS.values()) <= set(RANK), "every group in RANKS must be in ORDER"
    missing = [
        f"{path.relative_to(ROOT)} ({name}) has no layer: add a line for it to RANKS in "
        "tests/test_layers.py"
        for name, path in modules().items()
        if group_of(name) is None
    ]
    assert not missing, "\n".join(missing)


def test_no_import_points_up():
    problems = upward(edges())
    assert not problems, "imports that point up (move the helper down):\n" + "\n".join(problems)


def test_the_checker_catches_an_upward_import():
    later = ("fercache/evaluate.py", "fercache.evaluate", "fercache.submit")
    assert upward([later]) == [
        "fercache/evaluate.py imports fercache.submit (stage 'evaluate' → stage 'submit' which "
        "comes later)"
    ]
    inside = ("fercache/temporal/rundir.py", "fercache.temporal.rundir", "fercache.temporal.loop")
    assert "(stage 'temporal: blocks' → stage 'temporal: loop'" in upward([inside])[0]
    lowest = ("fercache/data/tasks.py", "fercache.data.tasks", "fercache.cli")
    assert "(layer 'base' → layer 'cli'" in upward([lowest])[0]
    assert "has no layer" in upward([("x", "fercache.cli", "fercache.nowhere")])[0]
    down = [
        ("fercache/submit.py", "fercache.submit", "fercache.evaluate"),
        ("fercache/evaluate.py", "fercache.evaluate", "fercache.metrics"),
        ("fercache/temporal/loop.py", "fercache.temporal.loop", "fercache.temporal.config"),
        ("fercache/cli.py", "fercache.cli", "fercache.pretrain"),
    ]
    assert upward(down) == []


def test_imports_inside_functions_and_relative_imports_are_seen():
    source = (
        "import numpy\n"
        "from fercache.errors import FercacheError\n"
        "def later():\n"
        "    from fercache.submit import write_submission\n"
        "    if True:\n"
        "        import fercache.smooth\n"
        "from . import clips\n"
        "from ..metrics import pooled\n"
    )
    known = {"fercache.temporal.clips", "fercache.metrics", "fercache.submit", "fercache.smooth"}
    assert imported(source, "fercache.temporal.loop", False, known) == [
        "fercache.errors",
        "fercache.metrics",
        "fercache.smooth",
        "fercache.submit",
        "fercache.temporal.clips",
    ]

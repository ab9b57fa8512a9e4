"""Imports point down the pipeline: every module of fercache/ lies in a layer, and imports only
from its own layer or an earlier one; and no chain of imports leads a module back to itself.

A layer is a folder of fercache/, or the base: the flat modules of fercache/ (errors, readers,
atomic outputs, settings, ...) that every layer may import. `LAYERS` ranks them, lowest first;
a new module needs no line here, its folder gives its layer. Imports inside functions (the CLI
imports lazily) count like any other. A helper two layers share goes down to the lowest layer
both can import, never up.

docs/development.md shows the layers in a table, checked here against `LAYERS`.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fercache"
DEVELOPMENT_MD = ROOT / "docs" / "development.md"

BASE = "base"
# Lowest first: the base, then the folders of fercache/ in pipeline order.
LAYERS = [
    BASE,
    "data",  # reading Aff-Wild2-shaped trees
    "video",  # video files: cropped faces, sound tracks (the one caller of PyAV)
    "synth",  # the synthetic tree generator (and test videos with sound)
    "backbone",  # frozen timm backbones and their weights
    "features",  # the feature store, extract and import
    "framewise",  # the PRED file, the ABAW metrics, the majority vote
    "pretrain",  # phase 1
    "temporal",  # phase 2
    "predictions",  # predict, smooth, ensemble, evaluate, submit
    "experiments",  # compositions of stages
    "cli",  # the Typer commands
]
MAX_FLAT = 10  # modules directly in fercache/, __init__ and __main__ included
RANK = {layer: index for index, layer in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module under fercache/ -> its file."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The layer of a fercache module: its folder's; the base for a flat one (the command
    line's `__main__` excepted); None for a name that is no module of fercache/."""
    parts = module.split(".")
    if parts[0] != "fercache":
        return None
    if module == "fercache.__main__":
        return "cli"
    if len(parts) == 1 or (len(parts) == 2 and parts[1] not in RANK):
        return BASE if module in modules() else None
    return parts[1] if parts[1] in RANK and parts[1] != BASE else None


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
    """One line per import that points to a later layer (or to a module without a layer)."""
    problems = []
    for path, importer, target in pairs:
        mine, theirs = layer_of(importer), layer_of(target)
        if theirs is None:
            problems.append(f"{path} imports {target}, which is no module of fercache/")
        elif mine is not None and RANK[theirs] > RANK[mine]:
            problems.append(
                f"{path} imports {target} (layer '{mine}' → layer '{theirs}', which comes later)"
            )
    return problems


def cycles(pairs: list[tuple[str, str, str]]) -> list[list[str]]:
    """The import cycles among modules, each as the chain that leads back to its start."""
    graph: dict[str, set[str]] = {}
    for _, importer, target in pairs:
        if importer != target:
            graph.setdefault(importer, set()).add(target)
    found, done = [], set()

    def visit(module: str, chain: list[str]) -> None:
        if module in chain:
            found.append([*chain[chain.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*chain, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_every_module_has_a_layer():
    missing = [
        f"{path.relative_to(ROOT)} ({name}) lies in no layer: put it in a folder of LAYERS "
        "(tests/test_layers.py)"
        for name, path in modules().items()
        if layer_of(name) is None
    ]
    assert not missing, "\n".join(missing)


def test_few_modules_lie_flat_in_the_package():
    flat = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(flat) <= MAX_FLAT, f"{len(flat)} flat modules in fercache/: {', '.join(flat)}"


def test_no_import_points_up():
    problems = upward(edges())
    assert not problems, "imports that point up (move the helper down):\n" + "\n".join(problems)


def test_no_import_cycle():
    found = cycles(edges())
    assert not found, "import cycles:\n" + "\n".join(" → ".join(chain) for chain in found)


def test_the_checker_catches_an_upward_import():
    later = ("fercache/predictions/evaluate.py", "fercache.predictions.evaluate", "fercache.cli")
    assert upward([later]) == [
        "fercache/predictions/evaluate.py imports fercache.cli (layer 'predictions' → layer "
        "'cli', which comes later)"
    ]
    lowest = ("fercache/data/tasks.py", "fercache.data.tasks", "fercache.framewise.metrics")
    assert "(layer 'data' → layer 'framewise'" in upward([lowest])[0]
    base = ("fercache/errors.py", "fercache.errors", "fercache.data.tasks")
    assert "(layer 'base' → layer 'data'" in upward([base])[0]
    assert "no module of fercache/" in upward([("x", "fercache.cli", "fercache.nowhere")])[0]
    down = [
        ("fercache/temporal/loop.py", "fercache.temporal.loop", "fercache.framewise.metrics"),
        ("fercache/temporal/loop.py", "fercache.temporal.loop", "fercache.temporal.config"),
        ("fercache/__main__.py", "fercache.__main__", "fercache.cli"),
        ("fercache/data/affwild2.py", "fercache.data.affwild2", "fercache.errors"),
    ]
    assert upward(down) == []


def test_the_checker_catches_a_cycle():
    pairs = [("a", "fercache.a", "fercache.b"), ("b", "fercache.b", "fercache.c")]
    assert cycles(pairs) == []
    looped = cycles([*pairs, ("c", "fercache.c", "fercache.a")])
    assert looped == [["fercache.a", "fercache.b", "fercache.c", "fercache.a"]]


def test_imports_inside_functions_and_relative_imports_are_seen():
    source = (
        "import numpy\n"
        "from fercache.errors import FercacheError\n"
        "def later():\n"
        "    from fercache.predictions.submit import write_submission\n"
        "    if True:\n"
        "        import fercache.predictions.smooth\n"
        "from . import clips\n"
        "from ..framewise.metrics import pooled\n"
    )
    known = {
        "fercache.temporal.clips",
        "fercache.framewise.metrics",
        "fercache.predictions.submit",
        "fercache.predictions.smooth",
    }
    assert imported(source, "fercache.temporal.loop", False, known) == [
        "fercache.errors",
        "fercache.framewise.metrics",
        "fercache.predictions.smooth",
        "fercache.predictions.submit",
        "fercache.temporal.clips",
    ]


def documented_layers() -> list[tuple[str, list[str]]]:
    """(layer, the names in its modules cell) of each row of docs/development.md's table."""
    text = DEVELOPMENT_MD.read_text()
    table = text.split("| layer | modules | what |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:3] for line in table.strip().splitlines()[1:]]
    return [(layer.strip(), sorted(re.findall(r"`([^`]+)`", cell))) for layer, cell in rows]


def layer_contents(layer: str) -> list[str]:
    """What the table names in the layer's row, sorted: its folder (`name/`), its flat modules."""
    folder = [f"{layer}/"] if (PACKAGE / layer).is_dir() and layer != BASE else []
    flat = [
        path.stem
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem != "__init__" and layer_of(module_name(path)) == layer
    ]
    return sorted(folder + flat)


def test_the_development_guide_shows_the_layers_in_this_order():
    expected = [(layer, layer_contents(layer)) for layer in LAYERS]
    assert documented_layers() == expected, (
        "docs/development.md's layer table must list, in this order, each layer and its "
        "folder or modules:\n" + "\n".join(f"{layer}: {names}" for layer, names in expected)
    )

"""The docs back their promises with named tests (docs/survival.md, docs/formats.md): every test
they name exists, so a renamed or deleted test cannot leave a promise without its check."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMED = re.compile(r"::(test_\w+)")
DEFINED = re.compile(r"^def (test_\w+)\(", re.MULTILINE)


def test_every_test_the_docs_name_exists():
    defined = {
        name
        for path in (ROOT / "tests").glob("test_*.py")
        for name in DEFINED.findall(path.read_text())
    }
    named = {
        (doc.name, name)
        for doc in sorted((ROOT / "docs").glob("*.md"))
        for name in NAMED.findall(doc.read_text())
    }
    assert len(named) > 30  # the survival table alone names that many
    assert sorted((doc, name) for doc, name in named if name not in defined) == []

"""Imports go one way: the core (with its formats) below the sources and the pipelines, the
sources never into the pipelines. Read from the code's own import statements, those inside
functions too, so that a lazy import cannot hide an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported(folder: str, skip: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """Every module each file under ``folder`` imports (except the subfolders in ``skip``)."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[1] in skip:
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(relative)] = names
    return found


@pytest.mark.parametrize(("folder", "skip", "above"), [
    # The core and its formats: below everything else (the command line sits on top of all).
    ("changefeed", ("cli", "__main__.py"),
     ("changefeed.backends", "changefeed.pipelines", "changefeed.cli")),
    # The sources read the core and the formats, never the pipelines or the command line.
    ("backends", (), ("changefeed.pipelines", "changefeed.cli")),
    # The pipelines read the core and the formats, not the command line.
    ("pipelines", (), ("changefeed.cli",)),
])
def test_no_arrow_points_up(folder, skip, above):
    wrong = {
        file: sorted(name for name in names if name.startswith(above))
        for file, names in imported(folder, skip).items()
    }
    assert {file: names for file, names in wrong.items() if names} == {}


"""Imports go one way: the core (with its formats) below the sources and the pipelines, the
sources never into the pipelines, and the public surface (``changefeed/__init__.py``) above
them all. Read from the code's own import statements, those inside functions (and under
``TYPE_CHECKING``) too, so that a lazy import cannot hide an arrow."""

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
    # The core and its formats: below everything else. The two applications sit on top of all:
    # the command line and `changefeed serve` (which builds its pipelines as `run` does); the
    # surface, __init__.py, hands on names from every layer but those.
    ("changefeed", ("cli", "serve", "__main__.py", "__init__.py"),
     ("changefeed.backends", "changefeed.pipelines", "changefeed.cli")),
    # The sources read the core and the formats, never the pipelines or the applications.
    ("backends", (), ("changefeed.pipelines", "changefeed.cli", "changefeed.serve")),
    # The pipelines read the core and the formats, not the applications.
    ("pipelines", (), ("changefeed.cli", "changefeed.serve")),
])
def test_no_arrow_points_up(folder, skip, above):
    wrong = {
        file: sorted(name for name in names if name.startswith(above))
        for file, names in imported(folder, skip).items()
    }
    assert {file: names for file, names in wrong.items() if names} == {}


def test_the_surface_sits_above_all_but_the_applications():
    names = imported("changefeed")["changefeed/__init__.py"]
    assert {"changefeed.pipelines.pipeline", "changefeed.backends.postgres"} <= names
    assert sorted(name for name in names
                  if name.startswith(("changefeed.cli", "changefeed.serve"))) == []


@pytest.mark.parametrize(("folder", "skip"), [
    ("changefeed", ("cli", "serve", "__init__.py", "__main__.py")),
    ("backends", ()),
    ("pipelines", ()),
])
def test_only_the_applications_import_the_surface(folder, skip):
    """The core, the sources and the pipelines import the modules they need, never the
    ``changefeed`` package's names: that would be an arrow from below to the surface above."""
    wrong = {file for file, names in imported(folder, skip).items() if "changefeed" in names}
    assert wrong == set()

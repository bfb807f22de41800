"""The package list in setup.cfg covers every package folder, so a regular (non-editable)
install holds all of changefeed: an editable install would hide a forgotten one."""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_setup_cfg():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    mapping = dict(
        line.split("=", 1) for line in config["options"]["package_dir"].strip().splitlines()
    )
    mapping = {name.strip(): folder.strip() for name, folder in mapping.items()}
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            parts = [part for part in relative.parts if part != "."]
            found.add(".".join([package, *parts]))
    assert found, "no package folder found"
    assert found == listed


def test_every_included_cython_file_is_a_dependency_of_the_extension():
    """The .pxi files _kernels.pyx includes are the extension's ``depends`` in pyproject.toml:
    a file left out is missing from the sdist (which then cannot build the extension) and
    a change to it does not rebuild the extension."""
    speedups = ROOT / "changefeed" / "_speedups"
    included = set(re.findall(r'^include "([^"]+)"', (speedups / "_kernels.pyx").read_text(),
                              flags=re.MULTILINE))
    assert included == {path.name for path in speedups.glob("*.pxi")}
    (module,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "ext-modules"]
    assert set(module["depends"]) == {f"changefeed/_speedups/{name}" for name in included}

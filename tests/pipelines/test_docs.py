"""The README's pipeline example runs as written; so do the package's docstring examples."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).parents[2] / "README.md"


def test_the_readme_pipeline_example_runs_as_written():
    text = README.read_text()
    section = text[text.index("## Compose a pipeline in Python"):]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "MemoryFeed" in example and "assert sink.items ==" in example
    exec(compile(example, str(README), "exec"), {})  # its own asserts check the output


@pytest.mark.parametrize("module", ["pipeline", "stages", "where_expressions"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"changefeed.pipelines.{module}"))
    assert result.attempted > 0 and result.failed == 0

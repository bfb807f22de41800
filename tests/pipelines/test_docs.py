"""The runnable example of docs/pipelines.md, and the docstring examples of the package."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).parents[2] / "docs" / "pipelines.md"


def test_the_first_example_of_docs_pipelines_runs_as_written():
    text = DOC.read_text()
    assert text.startswith("## Compose a pipeline in Python")
    example = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    exec(compile(example, str(DOC), "exec"), {})  # its own asserts check the output


@pytest.mark.parametrize("module", ["pipeline", "stages", "cli"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"changefeed.pipelines.{module}"))
    assert result.attempted > 0 and result.failed == 0

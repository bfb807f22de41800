"""The compiled hot path is optional: the package builds without a C compiler, and runs its
pure-Python code when the extension is missing or ``CHANGEFEED_IMPL=python`` asks for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

WHICH = """
import changefeed._speedups as speedups
from changefeed.backends.postgres.pgoutput import PgOutputDecoder
from changefeed.formats.registry import FormatOptions, format_named
decoder = PgOutputDecoder()
print(speedups.implementation, hasattr(decoder, "kernel"),
      *[type(format_named(name).lines(FormatOptions())).__name__
        for name in ("delta", "debezium", "change")])
"""


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT, timeout=120)


def test_the_compiled_path_runs_where_it_is_built():
    result = python(WHICH, CHANGEFEED_IMPL="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["c", "True", "DeltaEncoder", "DebeziumEncoder",
                                     "ChangeEncoder"]


def test_changefeed_impl_python_forces_the_pure_python_path():
    result = python(WHICH, CHANGEFEED_IMPL="python")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python", "False", "function", "method", "function"]


def test_a_missing_extension_falls_back_to_pure_python():
    hidden = "import sys; sys.modules['changefeed._speedups._kernels'] = None\n"
    result = python(hidden + WHICH, CHANGEFEED_IMPL="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python", "False", "function", "method", "function"]


def test_asking_for_a_path_that_cannot_be_had_is_one_clear_error():
    hidden = "import sys; sys.modules['changefeed._speedups._kernels'] = None\n"
    result = python(hidden + WHICH, CHANGEFEED_IMPL="c")
    assert "ConfigurationError: CHANGEFEED_IMPL=c, but the compiled extension is not built" \
        in result.stderr
    result = python(WHICH, CHANGEFEED_IMPL="fast")
    assert "ConfigurationError: CHANGEFEED_IMPL='fast': use python, c, or leave it unset" \
        in result.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "changefeed", "run", "t", "--url", "postgresql://127.0.0.1:1/x"],
        capture_output=True, text=True, env={**os.environ, "CHANGEFEED_IMPL": "fast"},
        timeout=120,
    )
    assert cli.returncode != 0
    assert "Traceback" not in cli.stderr
    assert "CHANGEFEED_IMPL='fast'" in cli.stderr


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["cc", "false"])
def test_a_regular_build_compiles_the_extension_where_it_can(tmp_path, compiler):
    """A wheel (what ``pip install .`` installs) holds the extension; with ``CC=false`` (no
    compiler) its build fails and the wheel is made without it. Built from a copy of the
    sources as a fresh clone has them (not the extension an editable install left here)."""
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    # -O0: this checks what the wheel holds, not the code's speed, and optimising the
    # generated C is most of the build's time (over a minute on 2 busy cores).
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "CC": compiler, "CFLAGS": "-O0", "PIP_NO_INPUT": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = wheels.glob("changefeed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "changefeed/_speedups/__init__.py" in names
    built = [name for name in names if name.startswith("changefeed/_speedups/_kernels.")
             and name.endswith((".so", ".pyd"))]
    assert len(built) == (1 if compiler == "cc" else 0), names


def test_the_compiled_encoders_do_not_import_psycopg():
    """A command writing lines from another source does not pay for importing a driver."""
    code = (
        "import sys\n"
        "from changefeed.change import Change, Operation\n"
        "from changefeed.formats.delta import delta_line_encoder\n"
        "from changefeed.formats.debezium import line_encoder\n"
        "change = Change(Operation.INSERT, 'db.items', {'_id': 1}, key={'_id': 1})\n"
        "encode = delta_line_encoder()\n"
        "print(encode(change).decode().strip(), type(encode).__name__)\n"
        "line_encoder()(change)\n"
        "print('psycopg' in sys.modules)\n"
    )
    result = python(code, CHANGEFEED_IMPL="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['{"type":"insert","model":"items","data":{"_id":1}}',
                                     "DeltaEncoder", "False"]

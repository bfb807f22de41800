"""Instructions per change, pure Python against the compiled path, counted with valgrind.

Runs `decode_cost.py` under callgrind for each stage (copy, decode, encode, deliver, and the
compiled path's direct and direct-deliver), each implementation (``CHANGEFEED_IMPL=python``
and the compiled one) and row shape, twice: with ``--changes`` and with a tenth of them, so
that the difference, divided by the difference in changes, is the cost per change without
start-up. That still holds what recording the stream from the server costs per change (in
Python): the copy stage, which only slices the recorded messages, shows that floor. Counts are
exact and do not depend on the machine's load, unlike timings.

    .venv/bin/python benchmarks/instructions.py [--changes 20000] [--shapes bench,narrow]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("copy", "decode", "encode", "deliver", "direct", "direct-deliver")


def instructions(stage: str, shape: str, changes: int, implementation: str) -> int:
    """Instructions the whole `decode_cost.py` run executes (callgrind's "Collected")."""
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, str(HERE / "decode_cost.py"), "--changes", str(changes),
            "--rounds", "1", "--only", stage, "--shape", shape]
    env = {**os.environ, "CHANGEFEED_IMPL": implementation}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=HERE)
    if result.returncode != 0:
        raise SystemExit(f"{stage} ({implementation}) failed:\n{result.stderr[-2000:]}")
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise SystemExit(f"no count from valgrind:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def per_change(stage: str, shape: str, changes: int, implementation: str) -> float:
    few = changes // 10
    difference = instructions(stage, shape, changes, implementation) - instructions(
        stage, shape, few, implementation)
    return difference / (changes - few)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20_000)
    parser.add_argument("--shapes", default="bench,narrow")
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args()
    print(f"instructions per change ({args.changes:,} and {args.changes // 10:,} changes):")
    print(f"{'shape':8} {'stage':8} {'python':>10} {'compiled':>10} {'ratio':>7}")
    for shape in args.shapes.split(","):
        reference = None
        for stage in args.stages.split(","):
            python = None if stage.startswith("direct") else per_change(
                stage, shape, args.changes, "python")
            compiled = python if stage == "copy" else per_change(stage, shape, args.changes, "c")
            if stage == "deliver":
                reference = python
            base = python if python is not None else reference
            ratio = f"{base / compiled:6.1f}x" if base else ""
            shown = f"{python:10,.0f}" if python is not None else f"{'':>10}"
            print(f"{shape:8} {stage:8} {shown} {compiled:10,.0f} {ratio}", flush=True)
    print("(direct, direct-deliver: ratios against the pure-Python deliver, the whole loop)")


if __name__ == "__main__":
    main()

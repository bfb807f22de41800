"""Instructions per change of a whole `changefeed run`, counted with valgrind.

`instructions.py` replays a recorded stream in-process; this runs the command itself, as a user
does, against a real server: the socket reads, the stream loop, delivery and stdout, under
callgrind. A throwaway cluster holds one slot made before the workload; each measurement reads
a fresh copy of it (`pg_copy_logical_replication_slot`) with ``--limit``, once for a tenth of
the changes and once for all of them, so the difference divided by the difference in changes
is the cost per change without start-up. Only the client runs under valgrind (the server runs
at full speed and is always ahead of it), so the counts hardly depend on the machine's load.

Variants (``--variants``, comma-separated):

    plain       changefeed run TABLE (delta lines to stdout)
    change      --format change
    where       --where 'id >= 0' (a pipeline stage)
    processes   --where 'id >= 0' --processes (stages and sink in worker processes; the
                workers' instructions are counted too: --trace-children)

    .venv/bin/python benchmarks/run_instructions.py [--changes 200000] [--shapes narrow,bench]
        [--variants plain,change] [--impl c,python]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_postgres import TABLE, make_workload  # noqa: E402
from decode_cost import NARROW_TABLE, make_narrow_workload  # noqa: E402

from changefeed.embedded import TemporaryPostgres  # noqa: E402

VARIANTS = {
    "plain": [],
    "change": ["--format", "change"],
    "where": ["--where", "id >= 0"],
    "processes": ["--where", "id >= 0", "--processes"],
}


def prepare(dsn: str, shape: str, changes: int) -> None:
    """The table, its publication and the template slot, then the workload."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(NARROW_TABLE if shape == "narrow" else TABLE)
        conn.execute("CREATE PUBLICATION bench FOR TABLE bench")
        conn.execute("SELECT pg_create_logical_replication_slot('template', 'pgoutput')")
        (make_narrow_workload if shape == "narrow" else make_workload)(conn, changes)


def instructions(dsn: str, variant: str, limit: int, implementation: str, number: int) -> int:
    """Instructions one `changefeed run` (and its children) executes reading ``limit``
    changes from a fresh copy of the template slot."""
    slot = f"run_{number}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_copy_logical_replication_slot('template', %s)", [slot])
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.%p"
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                "--trace-children=yes", sys.executable, "-m", "changefeed", "run", "bench",
                "--url", dsn, "--slot", slot, "--publication", "bench", "--limit", str(limit),
                "--quiet", *VARIANTS[variant]]
        env = {**os.environ, "CHANGEFEED_IMPL": implementation}
        result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=HERE.parent)
        if result.returncode != 0:
            raise SystemExit(f"{variant} ({implementation}) failed:\n{result.stderr[-3000:]}")
        counts = [int(found) for found in re.findall(r"Collected : (\d+)", result.stderr)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    if not counts:
        raise SystemExit(f"no count from valgrind:\n{result.stderr[-2000:]}")
    return sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--shapes", default="narrow,bench")
    parser.add_argument("--variants", default="plain,change")
    parser.add_argument("--impl", default="c,python")
    args = parser.parse_args()
    few = args.changes // 10
    print(f"instructions per change of changefeed run ({args.changes:,} and {few:,} changes):")
    print(f"{'shape':8} {'variant':10} {'impl':7} {'per change':>11}")
    number = 0
    for shape in args.shapes.split(","):
        with TemporaryPostgres() as server:
            dsn = server.dsn()
            prepare(dsn, shape, args.changes)
            for variant in args.variants.split(","):
                for implementation in args.impl.split(","):
                    counts = []
                    for limit in (few, args.changes):
                        number += 1
                        counts.append(instructions(dsn, variant, limit, implementation, number))
                    per_change = (counts[1] - counts[0]) / (args.changes - few)
                    print(f"{shape:8} {variant:10} {implementation:7} {per_change:11,.0f}",
                          flush=True)


if __name__ == "__main__":
    main()

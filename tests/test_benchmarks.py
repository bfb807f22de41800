"""The benchmark scripts still run end to end (on tiny workloads; timings are not checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with ``args``, its output captured."""
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_benchmark_runs_both_consumers_to_the_end_and_reports_the_ratio():
    result = bench("bench_postgres.py", "--changes", "2000", "--rounds", "2", "--big-rows", "3000")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "workload: 2,000 changes" in out
    assert len(re.findall(r"round \d: (changefeed|recvlogical) ", out)) == 4
    assert re.search(r"ratio changefeed / pg_recvlogical: \d+\.\d\d \(of the medians: \d+\.\d\d\)",
                     out)
    assert re.search(r"one transaction of 3,000 rows: .* peak RSS \d+ MB", out)


def test_decode_cost_replays_every_recorded_change_through_each_stage():
    result = bench("decode_cost.py", "--changes", "2000", "--rounds", "1")
    assert result.returncode == 0, result.stderr  # it exits non-zero if a change went missing
    for stage in ("copy", "decode", "encode"):
        line = rf"  {stage} +\d+\.\d\d us  \(\d+\.\dx copy\)"
        assert re.search(line, result.stdout), result.stdout


def test_snapshot_benchmark_reads_the_table_three_ways_and_reports_the_ratios():
    result = bench("bench_snapshot.py", "--rows", "3000", "--rounds", "2", "--chunk-size", "500")
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"round \d: (changefeed|copy|chunks) ", result.stdout)) == 6
    assert re.search(r"ratio changefeed / COPY: \d+\.\d\d \(medians\), \d+\.\d\d \(best\)",
                     result.stdout)
    assert re.search(r"ratio changefeed / chunk queries: \d+\.\d\d \(medians\); chunk queries"
                     r" / COPY: \d+\.\d\d", result.stdout)
    assert re.search(r"peak RSS of changefeed: \d+ MB", result.stdout)


def test_serve_benchmark_runs_pipelines_in_processes_and_in_threads_and_the_meters():
    result = bench("bench_serve.py", "--changes", "2000", "--rounds", "2", "--pipelines", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert len(re.findall(r"round \d: (process|thread) .* changes/s .* probe late p50", out)) == 4
    assert re.search(r"ratio of wall times thread / process: \d+\.\d\d", out)
    assert re.search(r"served \(meters\) \d+\.\d us, changefeed run \d+\.\d us; ratio", out)
    for kind in ("plain", "metered"):  # what valgrind counts
        run = bench("bench_serve.py", "--meter-cost", kind, "--changes", "500", timeout=120)
        assert run.returncode == 0, run.stderr

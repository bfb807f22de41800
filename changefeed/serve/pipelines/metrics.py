"""The pipelines' Prometheus metrics and health details, read from their supervisors on demand.

Every series has the ``pipeline`` label (the name in the config file); counters add up the
pipeline's runs since the server started, so a restart does not reset them. `METRICS` lists
each with its help text (the README's table is checked against it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from changefeed.serve.pipelines.meters import LATENCY_BUCKETS
from changefeed.serve.pipelines.supervisor import READY_STATES, STATES, Snapshot

METRICS: dict[str, str] = {
    "changefeed_pipeline_state": "1 for the state the pipeline is in, 0 for the others",
    "changefeed_changes_read_total": "Changes read from the source",
    "changefeed_changes_delivered_total":
        "Changes the sink confirmed, by table and operation (after the stages)",
    "changefeed_delivered_bytes_total": "Size of what the sink confirmed, as JSON lines",
    "changefeed_lag_seconds":
        "Age (since its commit) of the oldest change read and not yet delivered; 0 when none"
        " waits",
    "changefeed_wal_lag_bytes":
        "PostgreSQL: WAL written since the slot's last acknowledged position",
    "changefeed_wal_retained_bytes":
        "PostgreSQL: WAL the server keeps for the pipeline's slot",
    "changefeed_sink_latency_seconds": "Time the sink took per batch, retries included",
    "changefeed_retries_total": "Retries, by side: sink (a batch sent again) or source"
                                " (a reconnect)",
    "changefeed_dead_letters_total": "Changes written to the dead-letter sink",
    "changefeed_snapshot_rows_total": "Snapshot rows delivered, by table",
    "changefeed_snapshot_table_rows":
        "PostgreSQL: the table's estimated row count (pg_class.reltuples) while it is"
        " snapshotted: the snapshot's progress is snapshot_rows_total over this",
    "changefeed_restarts_total": "Restarts of the pipeline's process after a failure",
}


class PipelinesCollector(Collector):
    """Yields the metrics of ``snapshots()`` (one `Snapshot` per pipeline) at each scrape."""

    def __init__(self, snapshots: Callable[[], Iterable[Snapshot]]) -> None:
        self.snapshots = snapshots

    def describe(self) -> list[Metric]:  # no samples at registration: collect() is live
        return []

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(name.removesuffix("_total"), METRICS[name], labels=labels)

        def gauge(name: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, METRICS[name], labels=labels)

        state = gauge("changefeed_pipeline_state", ["pipeline", "state"])
        read = counter("changefeed_changes_read_total", ["pipeline"])
        delivered = counter("changefeed_changes_delivered_total",
                            ["pipeline", "table", "operation"])
        size = counter("changefeed_delivered_bytes_total", ["pipeline"])
        lag = gauge("changefeed_lag_seconds", ["pipeline"])
        wal_lag = gauge("changefeed_wal_lag_bytes", ["pipeline"])
        wal_retained = gauge("changefeed_wal_retained_bytes", ["pipeline"])
        latency = HistogramMetricFamily("changefeed_sink_latency_seconds",
                                        METRICS["changefeed_sink_latency_seconds"],
                                        labels=["pipeline"])
        retries = counter("changefeed_retries_total", ["pipeline", "side"])
        dead = counter("changefeed_dead_letters_total", ["pipeline"])
        snapshot_rows = counter("changefeed_snapshot_rows_total", ["pipeline", "table"])
        table_rows = gauge("changefeed_snapshot_table_rows", ["pipeline", "table"])
        restarts = counter("changefeed_restarts_total", ["pipeline"])
        for snap in self.snapshots():
            name, totals, stats = snap.name, snap.totals, snap.stats or {}
            for one in STATES:
                state.add_metric([name, one], 1.0 if one == snap.state else 0.0)
            read.add_metric([name], totals.read)
            for (table, operation), count in sorted(totals.delivered.items()):
                delivered.add_metric([name, table, operation], count)
            size.add_metric([name], totals.bytes)
            lag.add_metric([name], float(stats.get("lag_seconds", 0.0)))
            wal = stats.get("wal")
            if wal is not None:
                wal_lag.add_metric([name], max(0, wal.get("lag_bytes") or 0))
                wal_retained.add_metric([name], max(0, wal.get("retained_bytes") or 0))
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), totals.buckets,
                                    strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            latency.add_metric([name], buckets, totals.latency_sum)
            retries.add_metric([name, "sink"], totals.sink_retries)
            retries.add_metric([name, "source"], totals.source_retries)
            dead.add_metric([name], totals.dead_letters)
            for table, count in sorted(totals.snapshot_rows.items()):
                snapshot_rows.add_metric([name, table], count)
            for table, estimate in sorted((stats.get("snapshot_estimates") or {}).items()):
                if estimate >= 0:
                    table_rows.add_metric([name, table], estimate)
            restarts.add_metric([name], snap.restarts)
        yield from (state, read, delivered, size, lag, wal_lag, wal_retained, latency, retries,
                    dead, snapshot_rows, table_rows, restarts)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def details(snap: Snapshot) -> dict[str, Any]:
    """A pipeline's health details: JSON values, secrets masked by whoever made the error."""
    stats = snap.stats or {}
    wal = stats.get("wal") or {}
    body: dict[str, Any] = {
        "state": snap.state,
        "ready": snap.state in READY_STATES,
        "since": _iso(snap.since),
        "delivered": sum(snap.totals.delivered.values()),
        "read": snap.totals.read,
        "lag_seconds": round(float(stats.get("lag_seconds", 0.0)), 3),
        "restarts": snap.restarts,
    }
    if wal:
        body["wal_lag_bytes"] = wal.get("lag_bytes")
        body["wal_retained_bytes"] = wal.get("retained_bytes")
    if snap.totals.dead_letters:
        body["dead_letters"] = snap.totals.dead_letters
    if snap.error:
        body["error"] = snap.error
    if snap.retry_at is not None:
        body["restart_in_seconds"] = round(max(0.0, snap.retry_at - time.time()), 1)
    retrying = stats.get("retrying")
    if snap.state == "retrying" and retrying:
        body["retrying"] = retrying.get("side")
    if snap.pid is not None:
        body["pid"] = snap.pid
    return body


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


__all__ = ["METRICS", "PipelinesCollector", "details"]

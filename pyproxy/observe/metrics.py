"""Metrics: per-worker counters, shared with the supervisor, rendered by prometheus-client.

Each worker counts in :class:`WorkerMetrics`, compiled with the data plane (``pyproxy._protocol``:
C arrays per histogram and per status code, no lock, no ``observe()`` object call per request). Every ``PUBLISH_INTERVAL`` seconds it writes a snapshot
into its slot of a shared memory region the supervisor created before forking; ``/metrics``
(served once, by the supervisor) sums the slots, plus what workers that died had counted, and
renders the Prometheus text format through a prometheus-client custom collector at scrape time.
With one worker the snapshot is read directly.

Series (``pyproxy_<subsystem>_<what>_<unit>``):

- ``pyproxy_http_requests_total{route,pool,code}`` — answered requests (``route``/``pool`` empty
  when the proxy answered itself before routing);
- ``pyproxy_http_request_duration_seconds{route}`` — head received → response done (histogram);
- ``pyproxy_upstream_response_duration_seconds{pool}`` — request sent → response head (histogram);
- ``pyproxy_http_requests_in_flight``, ``pyproxy_http_connections_open`` (gauges),
  ``pyproxy_http_connections_total``;
- ``pyproxy_upstream_connections_total{pool,kind}`` — ``kind`` is ``new`` or ``reused`` (pool reuse);
- ``pyproxy_http_refused_total{code}`` — requests the proxy refused itself (parse errors and limits:
  400, 408, 413, 431, ...).
"""

from __future__ import annotations

import json
import mmap
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from pyproxy._protocol import BUCKETS, WorkerMetrics

__all__ = [
    "BUCKETS",
    "PUBLISH_INTERVAL",
    "SharedSnapshots",
    "Snapshot",
    "WorkerMetrics",
    "merge",
    "render",
    "without_gauges",
]

PUBLISH_INTERVAL = 1.0

Snapshot = dict[str, Any]


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Sum snapshots of several workers (and of workers that have died)."""
    requests: dict[tuple[str, ...], int] = defaultdict(int)
    upstream: dict[tuple[str, ...], int] = defaultdict(int)
    refused: dict[str, int] = defaultdict(int)
    durations: dict[str, dict[str, list[float]]] = {"request_duration": {}, "upstream_duration": {}}
    totals = {"connections_total": 0, "connections_open": 0, "in_flight": 0}
    for snap in snapshots:
        for *labels, value in snap.get("requests", []):
            requests[tuple(labels)] += value
        for *labels, value in snap.get("upstream_connections", []):
            upstream[tuple(labels)] += value
        for code, value in snap.get("refused", {}).items():
            refused[code] += value
        for family, table in durations.items():
            for name, h in snap.get(family, {}).items():
                acc = table.setdefault(name, [0.0] * len(h))
                for i, v in enumerate(h):
                    acc[i] += v
        for key in totals:
            totals[key] += snap.get(key, 0)
    return {
        "requests": [[*k, v] for k, v in requests.items()],
        "upstream_connections": [[*k, v] for k, v in upstream.items()],
        "refused": dict(refused),
        **durations,
        **totals,
    }


def without_gauges(snapshot: Snapshot) -> Snapshot:
    """What a dead worker leaves behind: its counters count on, its gauges are gone."""
    return {**snapshot, "connections_open": 0, "in_flight": 0}


class _Collector(Collector):
    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        snap = self.source()
        requests = CounterMetricFamily(
            "pyproxy_http_requests", "Requests answered", labels=["route", "pool", "code"]
        )
        for route, pool, code, value in snap["requests"]:
            requests.add_metric([route, pool, code], value)
        yield requests
        refused = CounterMetricFamily(
            "pyproxy_http_refused", "Requests the proxy refused itself (parse errors, limits)",
            labels=["code"],
        )
        for code, value in snap["refused"].items():
            refused.add_metric([code], value)
        yield refused
        conns = CounterMetricFamily(
            "pyproxy_upstream_connections", "Upstream connections used, new or reused from the pool",
            labels=["pool", "kind"],
        )
        for pool, kind, value in snap["upstream_connections"]:
            conns.add_metric([pool, kind], value)
        yield conns
        yield CounterMetricFamily(
            "pyproxy_http_connections", "Client connections accepted", value=snap["connections_total"]
        )
        yield GaugeMetricFamily(
            "pyproxy_http_connections_open", "Client connections open", value=snap["connections_open"]
        )
        yield GaugeMetricFamily(
            "pyproxy_http_requests_in_flight", "Requests being answered", value=snap["in_flight"]
        )
        for family, label, help_text in (
            ("request_duration", "route", "Request head received to response done"),
            ("upstream_duration", "pool", "Request sent upstream to response head"),
        ):
            name = (
                "pyproxy_http_request_duration_seconds"
                if family == "request_duration"
                else "pyproxy_upstream_response_duration_seconds"
            )
            hist = HistogramMetricFamily(name, help_text, labels=[label])
            for key, h in snap[family].items():
                cumulative, buckets = 0.0, []
                for bound, count in zip((*map(str, BUCKETS), "+Inf"), h[: len(BUCKETS) + 1]):
                    cumulative += count
                    buckets.append((bound, cumulative))
                hist.add_metric([key], buckets, sum_value=h[-2])
            yield hist


def render(source: Callable[[], Snapshot]) -> bytes:
    """The Prometheus text exposition of ``source()``, read at scrape time."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(source))
    return generate_latest(registry)


class SharedSnapshots:
    """One slot per worker in anonymous shared memory, created before forking.

    A slot is ``[sequence u64][length u32][JSON]``, written seqlock-style: the sequence is odd while
    a write is in progress, so a reader that sees it odd, or changed across its read, reads again
    and never takes a torn snapshot.
    """

    _HEAD = struct.Struct("<QI")

    def __init__(self, slots: int, slot_size: int = 1 << 20) -> None:
        self.slots, self.slot_size = slots, slot_size
        self.memory = mmap.mmap(-1, slots * slot_size, flags=mmap.MAP_SHARED)

    def write(self, slot: int, snapshot: Snapshot) -> bool:
        data = json.dumps(snapshot, separators=(",", ":")).encode()
        if len(data) > self.slot_size - self._HEAD.size:
            return False  # too many series for the slot: keep the previous snapshot
        base = slot * self.slot_size
        seq = self._HEAD.unpack_from(self.memory, base)[0]
        self._HEAD.pack_into(self.memory, base, seq + 1, 0)
        self.memory[base + self._HEAD.size : base + self._HEAD.size + len(data)] = data
        self._HEAD.pack_into(self.memory, base, seq + 2, len(data))
        return True

    def read(self, slot: int) -> Snapshot | None:
        base = slot * self.slot_size
        for _ in range(100):
            seq, length = self._HEAD.unpack_from(self.memory, base)
            if seq == 0:
                return None  # never written
            if seq % 2:
                continue
            data = bytes(self.memory[base + self._HEAD.size : base + self._HEAD.size + length])
            if self._HEAD.unpack_from(self.memory, base)[0] == seq:
                snapshot: Snapshot = json.loads(data)
                return snapshot
        return None

    def clear(self, slot: int) -> None:
        self._HEAD.pack_into(self.memory, slot * self.slot_size, 0, 0)

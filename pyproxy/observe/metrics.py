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
  400, 408, 413, 431, ...);
- per upstream server (``{pool,server}``): ``pyproxy_upstream_server_up`` (1 when it takes requests),
  ``pyproxy_upstream_server_healthy``, ``pyproxy_upstream_server_breaker_state`` (0 closed,
  1 open, 2 half-open, -1 no breaker), ``pyproxy_upstream_server_ejections_total``,
  ``pyproxy_upstream_server_effective_weight``, ``pyproxy_upstream_server_latency_ewma_seconds``,
  ``pyproxy_upstream_server_in_flight``;
- rate limiting: ``pyproxy_ratelimit_requests_total{route,level,result}``,
  ``pyproxy_ratelimit_redis_fallbacks_total``, ``pyproxy_ratelimit_table_overflows_total``,
  ``pyproxy_ratelimit_blocks_total`` (penalty box), ``pyproxy_ratelimit_redis_duration_seconds``
  (histogram) and ``pyproxy_ratelimit_redis_up`` (redis / hybrid modes),
  ``pyproxy_ratelimit_adaptive_limit{name}``;
- the HTTP cache: ``pyproxy_cache_events_total{event}`` (hit, stale_hit, miss, revalidate,
  revalidated, stored, not_storable, collapsed_hit, stale_if_error, not_modified, invalidated,
  refresh_ahead, prefetch, prefetch_used, warm_loaded...),
  ``pyproxy_cache_tier_operations_total{tier,result}`` (hit, miss, write, promotion, corrupt,
  error, timeout, skipped), ``pyproxy_cache_tier_up{tier}``, ``pyproxy_cache_compression_ratio``;
- per pool (``{pool}``): ``pyproxy_upstream_retries_total``,
  ``pyproxy_upstream_retry_budget_exhausted_total``, ``pyproxy_upstream_rejected_total{reason}``
  (``unhealthy``: no server could take it; ``bulkhead``: concurrency limit),
  ``pyproxy_upstream_queue_wait_seconds_total``, ``pyproxy_upstream_panics_total``,
  ``pyproxy_upstream_hedges_total`` and ``pyproxy_upstream_hedge_wins_total`` (hedges that
  answered first).
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
    snapshots_list = list(snapshots)
    snapshots = snapshots_list
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
        "upstreams": merge_upstreams(snap.get("upstreams", {}) for snap in snapshots_list),
        "ratelimit": merge_ratelimit([snap["ratelimit"] for snap in snapshots_list if "ratelimit" in snap]),
        "cache": merge_cache([snap["cache"] for snap in snapshots_list if "cache" in snap]),
    }


def merge_cache(views: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' :meth:`HttpCachePhase.snapshot` summed (a tier is up if it is up everywhere)."""
    events: dict[str, int] = defaultdict(int)
    tiers: dict[str, dict[str, Any]] = {}
    raw = stored = 0
    for view in views:
        for event, n in view.get("events", {}).items():
            events[event] += n
        for name, t in view.get("tiers", {}).items():
            acc = tiers.setdefault(name, {"up": True})
            for k, v in t.items():
                if k == "up":
                    acc["up"] = acc["up"] and v
                else:
                    acc[k] = acc.get(k, 0) + v
        raw += view.get("compression", {}).get("raw_bytes", 0)
        stored += view.get("compression", {}).get("stored_bytes", 0)
    return {"events": dict(events), "tiers": tiers, "compression": {"raw_bytes": raw, "stored_bytes": stored}}


def merge_ratelimit(views: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' :meth:`RateLimitPhase.snapshot` summed (adaptive limits: the first worker's)."""
    decisions: dict[tuple[str, ...], int] = defaultdict(int)
    fallbacks = blocks = overflows = 0
    adaptive: dict[str, Any] = {}
    mode = None
    redis: dict[str, Any] | None = None
    for view in views:
        for *labels, value in view.get("decisions", []):
            decisions[tuple(labels)] += value
        fallbacks += view.get("fallbacks", 0)
        blocks += view.get("blocks", 0)
        overflows = max(overflows, view.get("table_overflows", 0))  # one shared table
        adaptive = adaptive or view.get("adaptive", {})
        mode = mode or view.get("mode")
        r = view.get("redis")
        if r is not None:
            if redis is None:
                redis = {**r, "latency_counts": list(r["latency_counts"])}
            else:
                redis["healthy"] = redis["healthy"] and r["healthy"]
                for k in ("round_trips", "errors", "latency_sum"):
                    redis[k] += r[k]
                redis["latency_counts"] = [a + b for a, b in zip(redis["latency_counts"], r["latency_counts"])]
    out: dict[str, Any] = {
        "mode": mode,
        "decisions": [[*k, v] for k, v in decisions.items()],
        "fallbacks": fallbacks,
        "blocks": blocks,
        "adaptive": adaptive,
        "table_overflows": overflows,
    }
    if redis is not None:
        out["redis"] = redis
    return out


_BREAKER_ORDER = {"disabled": 0, "closed": 1, "half_open": 2, "open": 3}


def merge_upstreams(views: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One view of every pool from the workers' views (``ProxyState.upstream_view``): counters and
    in-flight requests summed; a server is ``up`` when every worker sends to it, ``down`` when
    none does, ``degraded`` in between; the worst breaker state; the mean latency and weight."""
    pools: dict[str, dict[str, Any]] = {}
    for view in views:
        for name, pool in view.items():
            acc = pools.setdefault(name, {"balance": pool.get("balance"), "counters": defaultdict(float), "servers": {}})
            for key, value in pool.get("counters", {}).items():
                acc["counters"][key] += value
            for server in pool.get("servers", []):
                acc["servers"].setdefault(server["id"], []).append(server)
    out: dict[str, Any] = {}
    for name, acc in pools.items():
        servers = []
        for sid, seen in acc["servers"].items():
            n = len(seen)
            states = {s["state"] for s in seen}
            servers.append({
                "id": sid,
                "state": "draining" if "draining" in states else (states.pop() if len(states) == 1 else "degraded"),
                "healthy": all(s["healthy"] for s in seen),
                "ejected": any(s["ejected"] for s in seen),
                "ejections": sum(s["ejections"] for s in seen),
                "breaker": max((s["breaker"] for s in seen), key=lambda b: _BREAKER_ORDER.get(b, 0)),
                "weight": seen[0]["weight"],
                "effective_weight": sum(s["effective_weight"] for s in seen) / n,
                "ewma_latency_seconds": sum(s["ewma_latency_seconds"] for s in seen) / n,
                "error_rate": sum(s["error_rate"] for s in seen) / n,
                "in_flight": sum(s["in_flight"] for s in seen),
                "workers": n,
            })
        out[name] = {"balance": acc["balance"], "counters": dict(acc["counters"]), "servers": servers}
    return out


def without_gauges(snapshot: Snapshot) -> Snapshot:
    """What a dead worker leaves behind: its counters count on, its gauges are gone."""
    upstreams = {
        name: {"balance": pool.get("balance"), "counters": pool.get("counters", {}), "servers": []}
        for name, pool in snapshot.get("upstreams", {}).items()
    }
    return {**snapshot, "connections_open": 0, "in_flight": 0, "upstreams": upstreams}


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
        yield from _upstream_families(snap.get("upstreams", {}))
        yield from _ratelimit_families(snap.get("ratelimit", {}))
        yield from _cache_families(snap.get("cache", {}))


_TIER_RESULTS = {
    "hits": "hit", "misses": "miss", "writes": "write", "promotions": "promotion",
    "corrupt": "corrupt", "errors": "error", "timeouts": "timeout", "skipped": "skipped",
}


def _cache_families(cache: dict[str, Any]) -> Iterator[Any]:
    """What the HTTP cache did, per event and per tier; tier health; compression."""
    if not cache.get("tiers") and not cache.get("events"):
        return
    events = CounterMetricFamily("pyproxy_cache_events", "HTTP cache outcomes", labels=["event"])
    for event, n in sorted(cache.get("events", {}).items()):
        events.add_metric([event], n)
    yield events
    ops = CounterMetricFamily("pyproxy_cache_tier_operations", "Cache tier operations by result", labels=["tier", "result"])
    up = GaugeMetricFamily("pyproxy_cache_tier_up", "1 while the tier answers (0 during a backoff)", labels=["tier"])
    for name, t in sorted(cache.get("tiers", {}).items()):
        for key, result in _TIER_RESULTS.items():
            ops.add_metric([name, result], t.get(key, 0))
        up.add_metric([name], 1.0 if t.get("up", True) else 0.0)
    yield ops
    yield up
    c = cache.get("compression", {})
    ratio = c.get("raw_bytes", 0) / c["stored_bytes"] if c.get("stored_bytes") else 1.0
    yield GaugeMetricFamily("pyproxy_cache_compression_ratio", "Bytes before / after compression, L2 and L3 records", value=ratio)


def _ratelimit_families(rl: dict[str, Any]) -> Iterator[Any]:
    """Rate-limit decisions per route and level, Redis fallbacks, adaptive limits."""
    decisions = CounterMetricFamily(
        "pyproxy_ratelimit_requests", "Rate-limit decisions (level: the one that denied)",
        labels=["route", "level", "result"],
    )
    for route, level, result, value in rl.get("decisions", []):
        decisions.add_metric([route, level, result], value)
    yield decisions
    yield CounterMetricFamily(
        "pyproxy_ratelimit_redis_fallbacks", "Requests decided by on_redis_error because Redis failed",
        value=rl.get("fallbacks", 0),
    )
    yield CounterMetricFamily(
        "pyproxy_ratelimit_table_overflows", "New keys allowed uncounted: the shared counter table was full",
        value=rl.get("table_overflows", 0),
    )
    yield CounterMetricFamily(
        "pyproxy_ratelimit_blocks", "Keys put in the penalty box", value=rl.get("blocks", 0)
    )
    redis = rl.get("redis")
    if redis is not None:
        from pyproxy.ratelimit.redis_backend import LATENCY_BOUNDS

        hist = HistogramMetricFamily(
            "pyproxy_ratelimit_redis_duration_seconds", "Rate-limit round trips to Redis"
        )
        cumulative, buckets = 0.0, []
        for bound, count in zip((*map(str, LATENCY_BOUNDS), "+Inf"), redis["latency_counts"]):
            cumulative += count
            buckets.append((bound, cumulative))
        hist.add_metric([], buckets, sum_value=redis["latency_sum"])
        yield hist
        yield GaugeMetricFamily("pyproxy_ratelimit_redis_up", "1 while Redis answers", value=1.0 if redis["healthy"] else 0.0)
    adaptive = GaugeMetricFamily("pyproxy_ratelimit_adaptive_limit", "Current adaptive limits", labels=["name"])
    for name, view in rl.get("adaptive", {}).items():
        adaptive.add_metric([name], view.get("limit", 0))
    yield adaptive


_BREAKER_CODE = {"disabled": -1, "closed": 0, "open": 1, "half_open": 2}


def _upstream_families(upstreams: dict[str, Any]) -> Iterator[Any]:
    """Per-server gauges and per-pool counters of balancing, health and resilience."""
    labels = ["pool", "server"]
    gauges = {
        "up": GaugeMetricFamily("pyproxy_upstream_server_up", "1 when the server takes new requests", labels=labels),
        "healthy": GaugeMetricFamily("pyproxy_upstream_server_healthy", "1 when active health checks pass", labels=labels),
        "breaker": GaugeMetricFamily(
            "pyproxy_upstream_server_breaker_state", "Circuit breaker: 0 closed, 1 open, 2 half-open, -1 none", labels=labels
        ),
        "weight": GaugeMetricFamily("pyproxy_upstream_server_effective_weight", "Weight the balancer uses now", labels=labels),
        "latency": GaugeMetricFamily(
            "pyproxy_upstream_server_latency_ewma_seconds", "Peak-EWMA response latency", labels=labels
        ),
        "in_flight": GaugeMetricFamily("pyproxy_upstream_server_in_flight", "Requests in flight to the server", labels=labels),
    }
    ejections = CounterMetricFamily("pyproxy_upstream_server_ejections", "Outlier ejections", labels=labels)
    retries = CounterMetricFamily("pyproxy_upstream_retries", "Retries sent to another server", labels=["pool"])
    exhausted = CounterMetricFamily(
        "pyproxy_upstream_retry_budget_exhausted", "Retries refused by the retry budget", labels=["pool"]
    )
    rejected = CounterMetricFamily(
        "pyproxy_upstream_rejected", "Requests refused with 503 by the pool", labels=["pool", "reason"]
    )
    queue_wait = CounterMetricFamily(
        "pyproxy_upstream_queue_wait_seconds", "Time requests waited in the pool's bulkhead queue", labels=["pool"]
    )
    hedges = CounterMetricFamily("pyproxy_upstream_hedges", "Hedged requests (a second copy sent)", labels=["pool"])
    hedge_wins = CounterMetricFamily(
        "pyproxy_upstream_hedge_wins", "Hedged requests the second copy answered first", labels=["pool"]
    )
    panics = CounterMetricFamily(
        "pyproxy_upstream_panics", "Requests sent to an unhealthy server because every server was (panic mode)",
        labels=["pool"],
    )
    for pool, view in upstreams.items():
        for s in view.get("servers", []):
            key = [pool, s["id"]]
            gauges["up"].add_metric(key, 1.0 if s["state"] == "up" else 0.0)
            gauges["healthy"].add_metric(key, 1.0 if s["healthy"] else 0.0)
            gauges["breaker"].add_metric(key, _BREAKER_CODE.get(s["breaker"], -1))
            gauges["weight"].add_metric(key, s["effective_weight"])
            gauges["latency"].add_metric(key, s["ewma_latency_seconds"])
            gauges["in_flight"].add_metric(key, s["in_flight"])
            ejections.add_metric(key, s["ejections"])
        c = view.get("counters", {})
        retries.add_metric([pool], c.get("retries", 0))
        exhausted.add_metric([pool], c.get("retries_budget_exhausted", 0))
        rejected.add_metric([pool, "unhealthy"], c.get("rejected_unhealthy", 0))
        rejected.add_metric([pool, "bulkhead"], c.get("rejected_bulkhead", 0))
        queue_wait.add_metric([pool], c.get("queue_wait_seconds", 0.0))
        panics.add_metric([pool], c.get("panics", 0))
        hedges.add_metric([pool], c.get("hedges", 0))
        hedge_wins.add_metric([pool], c.get("hedge_wins", 0))
    yield from gauges.values()
    yield from (ejections, retries, exhausted, rejected, queue_wait, panics, hedges, hedge_wins)


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

"""One pool of upstream servers at run time, in one worker: balancer, health, ejection, breakers,
bulkhead and retry budget, behind the three calls the data plane makes per request.

- :meth:`UpstreamPool.admit` — the pool's bulkhead (concurrency limit + bounded wait queue);
- :meth:`UpstreamPool.choose` — a server for the request: the balancer's pick among the servers
  that can take it (healthy, not ejected, breaker closed or probing, under their concurrency
  limit, not draining, not already tried by this request); when none can: ``panic`` (use every
  server anyway, as Envoy's panic threshold) or ``reject`` (the caller answers 503);
- :meth:`UpstreamPool.finished` — the outcome, fed back to the server's EWMAs, its breaker and the
  outlier detector, and the slots given back.

Availability is one boolean per server (``UpstreamServer.available``), recomputed only when one of
its inputs changes (a health transition, an ejection, a breaker opening, a drain), so a pick reads
a flag instead of asking four components. Breakers that are open become "half-open" by time: the
pool's periodic tick (every :data:`TICK` seconds) lets them probe again and returns ejected servers
whose time is up.

The default pool (round robin, no checks, no limits) costs one ``pick`` and a few float updates
per request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyproxy._balance import PoolCore
from pyproxy.balance.algorithms import Balancer, RequestInfo, make_balancer
from pyproxy.balance.health import HealthChecker
from pyproxy.balance.outlier import OutlierDetector
from pyproxy.balance.upstream import UpstreamServer
from pyproxy.config import Pool, Server
from pyproxy.resilience import Bulkhead, BulkheadWaiter, CircuitBreaker, RetryBudget, backoff

__all__ = ["TICK", "UpstreamPool"]

log = logging.getLogger("pyproxy.balance")

TICK = 0.25
"""Seconds between the pool's checks of open breakers and expired ejections."""
RECENT = 512
"""Successful requests whose latency ``hedge_after = "p95"`` looks at."""
MIN_SAMPLES = 20
"""Samples needed before a p95 is trusted for hedging (or a p99 for adaptive limits)."""
HEALTH_WINDOW = 5.0
"""Seconds of recent requests whose p99 adaptive rate limits follow."""


class ServerState:
    """What the pool knows of one server besides the balancer's view (:class:`UpstreamServer`)."""

    __slots__ = ("breaker", "draining", "ejected", "healthy", "removed_when_idle", "upstream")

    def __init__(self, upstream: UpstreamServer, breaker: CircuitBreaker | None) -> None:
        self.upstream = upstream
        self.breaker = breaker
        self.healthy = True
        self.ejected = False
        self.draining = False  # no new requests; in-flight ones finish
        self.removed_when_idle = False  # DELETE: drop from the pool once nothing is in flight


class UpstreamPool(PoolCore):
    """The run-time side of one configured :class:`~pyproxy.config.Pool`.

    :meth:`choose` and :meth:`finished` are its compiled base's (:class:`pyproxy._balance.PoolCore`,
    the same steps as C calls: a Python frame each per request was ~2k instructions): ``choose``
    asks the balancer directly on a first try of a plain pool (no per-server limit, no breakers),
    else :meth:`_choose_among`; ``finished`` is documented where it stood, below.
    """

    def __init__(self, pool: Pool, *, loop: asyncio.AbstractEventLoop | None = None, rng: random.Random | None = None) -> None:
        self.config = pool
        self.name = pool.name
        self._rng = rng or random.Random()
        self._loop = loop
        self.states: dict[str, ServerState] = {}
        self.retry_budget: RetryBudget = RetryBudget(
            pool.retry.budget_percent, pool.retry.min_retries_per_window, pool.retry.budget_window
        )
        b = pool.bulkhead
        self.bulkhead = Bulkhead(b.max_concurrent, b.max_queue, b.queue_timeout)
        self._per_server_limit = b.max_concurrent_per_server or math.inf
        self._plain = not b.max_concurrent_per_server and pool.circuit_breaker is None
        # No pool-wide limit: the data plane skips admit()/leave() (the bulkhead would only count).
        self.unlimited = b.max_concurrent == 0
        self.outlier = (
            OutlierDetector(pool.outlier, on_change=self._on_ejection) if pool.outlier else None
        )
        self.health = (
            HealthChecker(pool.health_check, self._on_health, rng=self._rng) if pool.health_check else None
        )
        self.balancer: Balancer = make_balancer(pool.balance, [], **self._balance_options(pool))
        for server in pool.servers:
            self.add_server(server)
        # counters (metrics)
        self.retries = 0
        self.retries_exhausted = 0
        self.rejected_unhealthy = 0
        self.panics = 0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._panic_next = 0
        # Hedging: the latencies of recent successful requests, for hedge_after = "p95".
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT)
        # The same samples with when they came, for the recent p99 adaptive rate limits follow.
        self._recent_at: collections.deque[float] = collections.deque(maxlen=RECENT)
        self._p95 = 0.0
        self._p95_at = -math.inf
        self.hedges = 0
        self.hedge_wins = 0

    @staticmethod
    def _balance_options(pool: Pool) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if pool.balance == "consistent_hash":
            options.update(key=pool.hash_key, balance_factor=pool.balance_factor, fallback=pool.hash_fallback)
            if pool.slow_start and pool.balance_factor is not None:
                options["slow_start"] = pool.slow_start
        elif pool.balance != "round_robin":
            options["slow_start"] = pool.slow_start
        if pool.balance == "weighted_round_robin":
            options["dynamic"] = pool.dynamic
        return options

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start health checks and the periodic tick (needs the running loop)."""
        self._loop = asyncio.get_running_loop()
        if self.health is not None:
            self.health.start()
        self._tick_handle = self._loop.call_later(TICK, self._tick)

    async def stop(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self.health is not None and self.health.running:
            await self.health.stop()

    def close(self) -> None:
        """Stop the tick and the health checks' tasks (without waiting for them)."""
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self.health is not None and self.health.running:
            asyncio.get_running_loop().create_task(self.health.stop())

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = self._now()
        if self.outlier is not None:
            self.outlier.tick(now)
        for st in self.states.values():
            if st.breaker is not None and not st.upstream.available and st.breaker.state == "open":
                if now >= st.breaker.retry_at:
                    self._update(st, now)  # half-open: let probes through
        self._tick_handle = loop.call_later(TICK, self._tick)

    # -- servers -------------------------------------------------------------------------------
    def add_server(self, server: Server, *, weight: float | None = None) -> ServerState:
        """Add a server at run time (or at start); it ramps up over ``slow_start`` if configured."""
        existing = self.states.get(server.address)
        if existing is not None:
            if not existing.removed_when_idle:
                raise ValueError(f"server {server.address} is already in pool {self.name!r}")
            # Added again while a DELETE still waits for its in-flight requests: the admin's model
            # already has it removed and re-added, so cancel the removal (refusing would leave the
            # worker without the server the API just answered 201 for).
            existing.removed_when_idle = existing.draining = False
            self.set_weight(existing.upstream.id, float(server.weight if weight is None else weight))
            self._update(existing, self._now())
            return existing
        now = self._now()
        upstream = UpstreamServer(server, weight=weight, since=now if self.config.slow_start and self._loop else -math.inf)
        cb = self.config.circuit_breaker
        breaker = (
            CircuitBreaker(
                consecutive_failures=cb.consecutive_failures,
                failure_ratio=cb.failure_ratio,
                window=cb.window,
                min_requests=cb.min_requests,
                base_open_time=cb.base_open_time,
                max_open_time=cb.max_open_time,
                jitter=cb.jitter,
                success_threshold=cb.success_threshold,
                half_open_max_probes=cb.half_open_max_probes,
                rng=self._rng,
            )
            if cb is not None
            else None
        )
        st = ServerState(upstream, breaker)
        self.states[upstream.id] = st
        if self.health is not None:
            st.healthy = self.health.config.initial_healthy
            self.health.add(upstream.id, server.host, server.port)
        if self.outlier is not None:
            self.outlier.add(upstream.id)
        upstream.available = st.healthy
        self.balancer.add(upstream)
        return st

    def set_weight(self, server_id: str, weight: float) -> None:
        st = self.states[server_id]
        st.upstream.weight = weight
        self.balancer.add(st.upstream)  # re-reads the weight

    def drain(self, server_id: str, *, remove: bool) -> None:
        """No new requests to the server; with ``remove`` it leaves the pool once idle."""
        st = self.states[server_id]
        st.draining = True
        st.removed_when_idle = st.removed_when_idle or remove
        self._update(st, self._now())
        if remove and st.upstream.in_flight == 0:
            self._remove(st)

    def undrain(self, server_id: str) -> None:
        st = self.states[server_id]
        if st.removed_when_idle:
            raise ValueError(f"server {server_id} is being removed")
        st.draining = False
        self._update(st, self._now())

    def _remove(self, st: ServerState) -> None:
        sid = st.upstream.id
        if self.states.pop(sid, None) is None:
            return
        self.balancer.remove(st.upstream)
        if self.health is not None:
            self.health.remove(sid)
        if self.outlier is not None:
            self.outlier.remove(sid)
        log.info("server %s left pool %s", sid, self.name)

    # -- availability --------------------------------------------------------------------------
    def _now(self) -> float:
        # CLOCK_MONOTONIC at full resolution: the data plane's clock for every ``now`` it passes
        # (uvloop's loop.time() is the same clock, read once per iteration in whole milliseconds;
        # mixing the two would make a 3 s breaker say Retry-After: 4).
        return time.monotonic() if self._loop is not None else 0.0

    def _update(self, st: ServerState, now: float) -> None:
        breaker_ok = st.breaker is None or st.breaker.state != "open" or now >= st.breaker.retry_at
        available = st.healthy and not st.ejected and breaker_ok and not st.draining
        if available and not st.upstream.available and self.config.slow_start:
            st.upstream.mark_returned(now)  # back in service: ramp up again
        st.upstream.available = available

    def _on_health(self, server_id: str, healthy: bool, reason: str) -> None:
        st = self.states.get(server_id)
        if st is not None:
            st.healthy = healthy
            self._update(st, self._now())

    def _on_ejection(self, server_id: str, ejected: bool, reason: str) -> None:
        st = self.states.get(server_id)
        if st is not None:
            st.ejected = ejected
            self._update(st, self._now())

    # -- per request ---------------------------------------------------------------------------
    def admit(self, callback: Callable[[bool], None]) -> bool | BulkheadWaiter:
        """Take a slot of the pool's bulkhead: ``True`` (go on), ``False`` (full: 503) or a
        waiter (queued: ``callback(admitted)`` follows; ``waiter.cancel()`` if the client leaves)."""
        if self.bulkhead.try_enter():
            return True
        assert self._loop is not None
        verdict: list[bool] = []
        waiter = self.bulkhead.enter_cb(verdict.append, self._loop)
        if waiter is None:
            return bool(verdict and verdict[0])
        waiter.callback = callback
        return waiter

    def leave(self) -> None:
        """Give back the bulkhead slot :meth:`admit` took."""
        self.bulkhead.leave()

    def _choose_among(self, request: RequestInfo | None, now: float, tried: Sequence[UpstreamServer]) -> UpstreamServer | None:
        """:meth:`choose` past its common case: a server for ``request`` other than those in
        ``tried``; ``None`` when the pool cannot serve it (every server unavailable with
        ``on_all_unhealthy = "reject"``, all at their concurrency limit, or all tried)."""
        exclude: list[UpstreamServer] = list(tried)
        for _ in range(len(self.states) + 1):
            server = self.balancer.pick(request, now, exclude)
            if server is None:
                break
            st = self.states[server.id]
            if server.in_flight >= self._per_server_limit or (
                st.breaker is not None and not st.breaker.allow(now)
            ):
                exclude.append(server)  # full, or an open breaker's probe slots are taken
                continue
            return server
        if any(st.upstream.available for st in self.states.values()):
            return None  # available servers exist, but not for this request (tried / full)
        if self.config.on_all_unhealthy == "reject":
            self.rejected_unhealthy += 1
            return None
        # Panic (Envoy's panic threshold): every server is down as far as we know; trying them
        # beats refusing everything. Round robin over the servers not draining nor tried.
        candidates = [st.upstream for st in self.states.values() if not st.draining and st.upstream not in tried]
        if not candidates:
            return None
        self.panics += 1
        self._panic_next = (self._panic_next + 1) % len(candidates)
        return candidates[self._panic_next]

    def retry_after(self) -> int:
        """Seconds a refused client should wait (``Retry-After``) when no server is available."""
        now = self._now()
        soonest = [
            st.breaker.retry_at - now for st in self.states.values() if st.breaker is not None and st.breaker.state == "open"
        ]
        if self.outlier is not None:
            soonest += [u - now for u in (self.outlier.ejected_until(s) for s in self.states) if u is not None]
        if self.health is not None:
            soonest.append(self.health.config.interval * self.health.config.rise)
        return max(1, math.ceil(min(soonest))) if soonest else 1

    # finished(server, latency, ok, connect_failure, now) is PoolCore's (compiled):
    #   The outcome of one request to ``server`` (``started()`` was called when it was sent): fed to
    #   the server's EWMAs, its breaker and the outlier detector, and the slots given back.
    #   ``ok=None`` is no verdict: the attempt ended without a response and without a failure of
    #   the server's (the client left first, the proxy refused the request itself). Its slots are
    #   given back (in flight, a half-open probe); its EWMAs, breaker and ejection counters are
    #   left alone — a client giving up says nothing about the server (nginx's 499).

    def can_retry_elsewhere(self, tried: Sequence[UpstreamServer]) -> bool:
        """Whether :meth:`choose` could find a server outside ``tried`` (checked before a retry is
        granted: without it a retry with nowhere to go used up the budget and turned the real
        failure, say a 502, into a 503 "no server can take the request")."""
        untried = [st.upstream for st in self.states.values() if st.upstream not in tried and not st.draining]
        if any(u.available for u in untried):
            return True
        if any(st.upstream.available for st in self.states.values()):
            return False  # only tried servers are available: choose() would refuse
        return self.config.on_all_unhealthy == "panic" and bool(untried)

    def hedge_delay(self, hedge_after: float | str, now: float) -> float:
        """Seconds to wait for a response head before hedging; ``hedge_after`` is a number or
        ``"p95"`` (of the last :data:`RECENT` successful requests, recomputed at most once a second;
        0.0 until :data:`MIN_SAMPLES` are known: no hedging on a guess)."""
        if not isinstance(hedge_after, str):
            return hedge_after
        if now - self._p95_at >= 1.0:
            self._p95_at = now
            recent = sorted(self._recent)
            self._p95 = recent[int(0.95 * (len(recent) - 1))] if len(recent) >= MIN_SAMPLES else 0.0
        return self._p95

    def may_retry(self, now: float) -> bool:
        """Whether the retry budget allows one more retry now (counted when it does)."""
        if self.retry_budget.try_acquire(now):
            self.retries += 1
            return True
        self.retries_exhausted += 1
        return False

    def retry_delay(self, attempt: int) -> float:
        r = self.config.retry
        return backoff(attempt, r.backoff_base, r.backoff_max, self._rng)

    # -- views ---------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Every server's state, for ``GET /upstreams`` and the metrics."""
        now = self._now()
        weights: dict[str, float] = {}
        effective = getattr(self.balancer, "effective_weights", None)
        if callable(effective):
            weights = effective(now)
        out = []
        for sid, st in self.states.items():
            u = st.upstream
            out.append({
                "id": sid,
                "state": "draining" if st.draining else ("up" if u.available else "down"),
                "healthy": st.healthy,
                "ejected": st.ejected,
                "ejections": self.outlier.ejections(sid) if self.outlier is not None else 0,
                "breaker": st.breaker.state if st.breaker is not None else "disabled",
                "weight": u.weight,
                "effective_weight": weights.get(sid, u.weight * u.slow_start_factor(now, self.config.slow_start)),
                "ewma_latency_seconds": u.latency(now),
                "error_rate": u.error_rate(now),
                "in_flight": u.in_flight,
            })
        return out

    def recent_health(self) -> tuple[float | None, float | None]:
        """(p99 latency of the successful requests of the last :data:`HEALTH_WINDOW` seconds, mean
        error rate of the servers) — what
        adaptive rate limits follow; ``None`` where nothing is known yet."""
        now = self._now()
        since = now - HEALTH_WINDOW
        recent = sorted(lat for lat, at in zip(self._recent, self._recent_at) if at >= since)
        p99 = recent[int(0.99 * (len(recent) - 1))] if len(recent) >= MIN_SAMPLES else None
        rates = [st.upstream.error_rate(now) for st in self.states.values() if st.upstream.sampled]
        return p99, (sum(rates) / len(rates) if rates else None)

    def counters(self) -> dict[str, float]:
        return {
            "retries": self.retries,
            "retries_budget_exhausted": self.retries_exhausted,
            "rejected_unhealthy": self.rejected_unhealthy,
            "rejected_bulkhead": self.bulkhead.rejected + self.bulkhead.timeouts,
            "queue_wait_seconds": self.bulkhead.queue_wait_total,
            "panics": self.panics,
            "hedges": self.hedges,
            "hedge_wins": self.hedge_wins,
        }

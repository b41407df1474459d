"""The request lifecycle (see ``cython_ext/_protocol.pyx`` for the phases, compiled as
``pyproxy._protocol``) and the state every connection of a worker shares.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pyproxy._protocol import ClientConnection, ConnectionPool, Exchange, StateCore, UpstreamConnection
from pyproxy.balance.pool import UpstreamPool
from pyproxy.cache.phase import HttpCachePhase
from pyproxy.cache.refresh import UpstreamRefresher
from pyproxy.core import SharedWindows
from pyproxy.config import Config
from pyproxy.observe.access_log import AccessLog
from pyproxy.observe.metrics import WorkerMetrics
from pyproxy.ratelimit.local import LocalLimiter
from pyproxy.ratelimit.phase import TABLE_CAPACITY, RateLimitPhase, needs_ratelimit
from pyproxy.routing import Router

__all__ = ["ClientConnection", "ConnectionPool", "Exchange", "ProxyState", "UpstreamConnection"]

ADAPT_INTERVAL = 0.25
"""Seconds between two feeds of pool health to adaptive rate limits (each limit moves at most once
per its own ``interval``)."""


class ProxyState(StateCore):
    """What every connection of a worker shares: the configuration, router, pools (the fields the
    data plane reads per request live in the compiled base, ``StateCore``).

    ``clients``: the open client connections. ``draining``: shutting down (answer what is in
    flight with "Connection: close", take nothing new). ``ratelimit``: the rate-limit phase (None:
    no route has any limit); ``ratelimit_local``, the local limiter (its counter table and its
    journal of blocked keys), is shared by the machine's workers when the supervisor made it before
    forking, and outlives reloads. ``cache``: the HTTP cache phase (None: no route caches); its
    memory tier is this worker's, Redis and the database tiers are shared.
    """

    def __init__(
        self,
        config: Config,
        router: Router,
        upstreams: dict[str, UpstreamPool],
        pools: dict[str, ConnectionPool],
        ratelimit_local: LocalLimiter | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.upstreams = upstreams  # balancing, health, resilience per pool
        self.pools = pools  # kept-alive upstream connections per pool
        self.clients: set[ClientConnection] = set()
        self.draining = False
        self.access_log: AccessLog | None = None
        self.metrics = WorkerMetrics()
        self.ratelimit: RateLimitPhase | None = None
        self.ratelimit_local = ratelimit_local
        self.cache: HttpCachePhase | None = None
        self._adapt_handle: asyncio.TimerHandle | None = None
        self._started = False  # start() ran: a cache phase built later (a reload) starts at once
        self._background: set[asyncio.Task[Any]] = set()

    def open_access_log(self) -> None:
        """Open (or reopen, after a reload) the access log the configuration asks for."""
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None
        if self.config.access_log.enabled:
            self.access_log = AccessLog(self.config.access_log)
            self.access_log.start()

    @classmethod
    def from_config(cls, config: Config, ratelimit_local: LocalLimiter | None = None) -> ProxyState:
        state = cls(
            config=config,
            router=Router(config.routes),
            upstreams={name: UpstreamPool(p) for name, p in config.pools.items()},
            pools={name: ConnectionPool(p, config.limits) for name, p in config.pools.items()},
            ratelimit_local=ratelimit_local,
        )
        state._configure_ratelimit(config)
        state._configure_cache(config)
        return state

    def _configure_cache(self, config: Config) -> None:
        """Build (or, on a reload that keeps the tiers, keep and reconfigure) the cache phase."""
        if not any(route.cache.enabled for route in config.routes):
            self._close_cache()
            return
        if self.cache is not None and config.cache == self.config.cache:
            self.cache.reconfigure(config.routes)
            return
        self._close_cache()
        refresher = UpstreamRefresher(lambda: self.upstreams, lambda: {r.name: r.pool for r in self.config.routes},
                                      limits=lambda: self.config.limits)
        self.cache = HttpCachePhase.from_config(config.cache, config.routes, refresh=refresher)
        refresher.phase = self.cache
        if self._started:
            self._in_background(self.cache.start())

    def _close_cache(self) -> None:
        old, self.cache = self.cache, None
        if old is not None:
            self._in_background(old.aclose())

    def _in_background(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()  # no loop any more (the process ends)
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _configure_ratelimit(self, config: Config) -> None:
        """Build (or, on a reload, keep and reconfigure) the rate-limit phase."""
        if not needs_ratelimit(config):
            self._close_ratelimit()
            return
        if self.ratelimit_local is None:
            self.ratelimit_local = LocalLimiter(SharedWindows(TABLE_CAPACITY))
        old = self.ratelimit
        where = ("mode", "redis_url", "cluster", "timeout", "sync_interval")
        if old is not None and all(
            getattr(config.ratelimit, k) == getattr(self.config.ratelimit, k) for k in where
        ):
            old.reconfigure(config)
            return
        self._close_ratelimit()
        self.ratelimit = RateLimitPhase(config, self.ratelimit_local)

    def _close_ratelimit(self) -> None:
        old, self.ratelimit = self.ratelimit, None
        if old is not None and old.shared is not None:
            try:
                asyncio.get_running_loop().create_task(old.aclose())
            except RuntimeError:
                pass  # no loop any more: the process is ending


    def upstream_view(self) -> dict[str, Any]:
        """Every pool's servers and counters (``GET /upstreams``, metrics)."""
        return {
            name: {"balance": up.config.balance, "servers": up.describe(), "counters": up.counters()}
            for name, up in self.upstreams.items()
        }

    def snapshot(self) -> dict[str, Any]:
        """The worker's metrics snapshot, pools included (published for the supervisor)."""
        snap = self.metrics.snapshot()
        snap["upstreams"] = self.upstream_view()
        if self.ratelimit is not None:
            snap["ratelimit"] = self.ratelimit.snapshot()
        if self.cache is not None:
            snap["cache"] = self.cache.snapshot()
        return snap

    def start(self) -> None:
        """Start what runs in the background per pool (health checks, ticks); on the loop."""
        self._started = True
        for upstream in self.upstreams.values():
            upstream.start()
        if self.cache is not None:
            self._in_background(self.cache.start())
        self._adapt_handle = asyncio.get_running_loop().call_later(ADAPT_INTERVAL, self._adapt)

    def _adapt(self) -> None:
        """Feed every pool's recent health to the adaptive rate limits that follow it."""
        if self.ratelimit is not None and self.ratelimit.policy.adaptive:
            for name, upstream in self.upstreams.items():
                p99, error_rate = upstream.recent_health()
                self.ratelimit.policy.observe(name, p99, error_rate)
        self._adapt_handle = asyncio.get_running_loop().call_later(ADAPT_INTERVAL, self._adapt)

    def apply(self, config: Config) -> None:
        """Switch to a new configuration without dropping a connection (reload).

        New requests use the new routes and pools at once; requests in flight finish on what they
        started with. A pool whose definition did not change keeps its warm upstream connections;
        a changed or removed one is retired: its idle connections close now, its busy ones when
        their exchange ends.
        """
        pools: dict[str, ConnectionPool] = {}
        upstreams: dict[str, UpstreamPool] = {}
        for name, pool in config.pools.items():
            old = self.pools.get(name)
            if old is not None and old.pool == pool:
                pools[name], upstreams[name] = old, self.upstreams[name]
                old.limits = config.limits  # for its new connections
            else:
                pools[name], upstreams[name] = ConnectionPool(pool, config.limits), UpstreamPool(pool)
                upstreams[name].start()
        for name, old in self.pools.items():
            if pools.get(name) is not old:
                old.retire()
                asyncio.get_running_loop().create_task(self.upstreams[name].stop())
        log_changed = config.access_log != self.config.access_log
        self._configure_ratelimit(config)
        self._configure_cache(config)
        self.config, self.router = config, Router(config.routes)
        self.pools, self.upstreams = pools, upstreams
        if log_changed:
            self.open_access_log()

    async def drain(self, timeout: float) -> None:
        """Let in-flight requests finish (up to ``timeout`` seconds), then close everything."""
        self.draining = True
        for client in list(self.clients):
            if client.idle():
                client.close()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.clients and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        phase, self.ratelimit = self.ratelimit, None
        if phase is not None:
            await phase.aclose()  # the Redis connections, while the loop still runs
        cache, self.cache = self.cache, None
        if cache is not None:
            await cache.aclose()  # background refreshes and writes, then the tiers
        self.close()

    def close(self) -> None:
        if self._adapt_handle is not None:
            self._adapt_handle.cancel()
            self._adapt_handle = None
        self._close_ratelimit()
        self._close_cache()
        for upstream in self.upstreams.values():
            upstream.close()
        for client in list(self.clients):
            client.close()
        for pool in self.pools.values():
            pool.close()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None

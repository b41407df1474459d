"""The request lifecycle (see ``cython_ext/_protocol.pyx`` for the phases, compiled as
``pyproxy._protocol``) and the state every connection of a worker shares.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pyproxy._protocol import ClientConnection, ConnectionPool, Exchange, UpstreamConnection
from pyproxy.balance.pool import UpstreamPool
from pyproxy.config import Config
from pyproxy.observe.access_log import AccessLog
from pyproxy.observe.metrics import WorkerMetrics
from pyproxy.routing import Router

__all__ = ["ClientConnection", "ConnectionPool", "Exchange", "ProxyState", "UpstreamConnection"]


@dataclass
class ProxyState:
    """What every connection of a worker shares: the configuration, router, pools."""

    config: Config
    router: Router
    upstreams: dict[str, UpstreamPool]  # balancing, health, resilience per pool
    pools: dict[str, ConnectionPool]  # kept-alive upstream connections per pool
    clients: set[ClientConnection] = field(default_factory=set)
    # Shutting down: answer what is in flight with "Connection: close", take nothing new.
    draining: bool = False
    access_log: AccessLog | None = None
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)

    def open_access_log(self) -> None:
        """Open (or reopen, after a reload) the access log the configuration asks for."""
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None
        if self.config.access_log.enabled:
            self.access_log = AccessLog(self.config.access_log)
            self.access_log.start()

    @classmethod
    def from_config(cls, config: Config) -> ProxyState:
        return cls(
            config=config,
            router=Router(config.routes),
            upstreams={name: UpstreamPool(p) for name, p in config.pools.items()},
            pools={name: ConnectionPool(p) for name, p in config.pools.items()},
        )

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
        return snap

    def start(self) -> None:
        """Start what runs in the background per pool (health checks, ticks); on the loop."""
        for upstream in self.upstreams.values():
            upstream.start()

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
            else:
                pools[name], upstreams[name] = ConnectionPool(pool), UpstreamPool(pool)
                upstreams[name].start()
        for name, old in self.pools.items():
            if pools.get(name) is not old:
                old.retire()
                asyncio.get_running_loop().create_task(self.upstreams[name].stop())
        log_changed = config.access_log != self.config.access_log
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
        self.close()

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()
        for client in list(self.clients):
            client.close()
        for pool in self.pools.values():
            pool.close()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None

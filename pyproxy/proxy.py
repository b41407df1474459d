"""The request lifecycle (see ``cython_ext/_protocol.pyx`` for the phases, compiled as
``pyproxy._protocol``) and the state every connection of a worker shares.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pyproxy._protocol import ClientConnection, ConnectionPool, Exchange, UpstreamConnection
from pyproxy.balance import RoundRobin
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
    balancers: dict[str, RoundRobin]
    pools: dict[str, ConnectionPool]
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
            balancers={name: RoundRobin(p.servers) for name, p in config.pools.items()},
            pools={name: ConnectionPool(p) for name, p in config.pools.items()},
        )

    def apply(self, config: Config) -> None:
        """Switch to a new configuration without dropping a connection (reload).

        New requests use the new routes and pools at once; requests in flight finish on what they
        started with. A pool whose definition did not change keeps its warm upstream connections;
        a changed or removed one is retired: its idle connections close now, its busy ones when
        their exchange ends.
        """
        pools: dict[str, ConnectionPool] = {}
        balancers: dict[str, RoundRobin] = {}
        for name, pool in config.pools.items():
            old = self.pools.get(name)
            if old is not None and old.pool == pool:
                pools[name], balancers[name] = old, self.balancers[name]
            else:
                pools[name], balancers[name] = ConnectionPool(pool), RoundRobin(pool.servers)
        for name, old in self.pools.items():
            if pools.get(name) is not old:
                old.retire()
        log_changed = config.access_log != self.config.access_log
        self.config, self.router = config, Router(config.routes)
        self.pools, self.balancers = pools, balancers
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
        for client in list(self.clients):
            client.close()
        for pool in self.pools.values():
            pool.close()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None

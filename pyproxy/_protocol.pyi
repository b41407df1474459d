"""Type stubs for ``pyproxy._protocol`` (compiled from ``cython_ext/_protocol.pyx``): the parts the
Python side uses. The protocol objects are driven by uvloop and httptools through their callbacks; they
are typed as ``asyncio.Protocol`` because they implement its methods (uvloop needs no base class)."""

import asyncio
from typing import Any

from pyproxy.config import Pool, Route, Server

class Answer:
    """A response for the data plane to send as it is (what the HTTP cache answers)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes | memoryview
    tier: str | None
    length: int | None
    head: bytes | None
    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes | memoryview,
        tier: str | None = None,
        length: int | None = None,
        head: bytes | None = None,
    ) -> None: ...

class StateCore:
    """What every connection of a worker reads of their shared state on each request."""

    config: Any
    router: Any
    upstreams: Any
    pools: Any
    clients: Any
    access_log: Any
    ratelimit: Any
    cache: Any
    draining: bool
    metrics: WorkerMetrics

class ConnectionPool:
    pool: Pool
    connects: int
    retired: bool
    def __init__(self, pool: Pool) -> None: ...
    def take_idle(self, address: str) -> UpstreamConnection | None: ...
    async def connect(self, server: Server) -> UpstreamConnection: ...
    def release(self, conn: UpstreamConnection) -> None: ...
    def close_server(self, address: str) -> None: ...
    def retire(self) -> None: ...
    def close(self) -> None: ...

class Exchange:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    route: Route | None
    status: int
    request_id: bytes

class UpstreamConnection(asyncio.Protocol):
    server: Server
    def close(self) -> None: ...

class ClientConnection(asyncio.Protocol):
    def __init__(self, state: object) -> None: ...
    def idle(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

BUCKETS: tuple[float, ...]

class Histogram:
    def as_list(self) -> list[float]: ...

class WorkerMetrics:
    connections_total: int
    connections_open: int
    in_flight: int
    def __init__(self) -> None: ...
    def request_done(self, route: str, pool: str, status: int, seconds: float) -> None: ...
    def upstream_answered(self, pool: str, seconds: float) -> None: ...
    def upstream_connection(self, pool: str, reused: bool) -> None: ...
    def refused_request(self, status: int) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...

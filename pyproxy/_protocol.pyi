"""Type stubs for ``pyproxy._protocol`` (compiled from ``cython_ext/_protocol.pyx``): the parts the
Python side uses. The protocol objects are driven by uvloop through their callbacks; they
are typed as ``asyncio.Protocol`` because they implement its methods (uvloop needs no base class)."""

import asyncio
from typing import Any

from pyproxy.config import Limits, Pool, Route, Server

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
    limits: Limits
    def __init__(self, pool: Pool, limits: Limits | None = None) -> None: ...
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

EV_MORE: int
EV_HEAD: int
EV_BODY: int
EV_END: int

class MessageReader:
    """What reading requests and responses share: framing, header lines, bodies (RFC 9112)."""

    max_head: int
    max_headers: int
    version: int
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    body: bytes
    def __init__(self, max_head: int = 16384, max_headers: int = 100) -> None: ...
    @property
    def unread(self) -> int: ...
    @property
    def head_pending(self) -> int: ...
    def reset(self) -> None: ...
    def next_message(self) -> None: ...
    def feed(self, data: bytes) -> None: ...
    def rest(self) -> bytes: ...
    def feed_at(self, data: bytes, start: int) -> None: ...
    def let_go(self) -> int: ...
    def expect_body(self, framing: int) -> None: ...
    def finish(self) -> bool: ...
    def next_event(self) -> int: ...

class ResponseReader(MessageReader):
    """Reads the responses of one upstream connection (errors: HeaderError, status 502)."""

    status: int
    reason: bytes
    def next_head(self) -> None: ...

class RequestReader(MessageReader):
    """Reads the requests of one client connection (errors: HeaderError, 400 / 414 / 431 / 505)."""

    method: bytes
    target: bytes
    @property
    def upgrade(self) -> bool: ...

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

"""Background refreshes of stale cache entries (``stale-while-revalidate``), outside any client.

A client got the stale copy at once; this asks a server of the route's pool for a fresh one with
the stored validators, on a connection of its own (``Connection: close``: refreshes are rare and
must not disturb the pooled connections' bookkeeping), reads the response with the data plane's
strict :class:`~pyproxy._protocol.ResponseReader` (framed as the data plane frames it), and hands it to the cache phase exactly as a client exchange would (``response`` then ``finish``):
a 304 renews the stored head, a cacheable 200 replaces the entry, anything else leaves it. The
server's outcome is reported to its pool like any request's (latency, success, breaker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pyproxy.balance.pool import UpstreamPool
from pyproxy.cache.phase import HttpCachePhase, Plan, Relay
from pyproxy.config import Limits
from pyproxy.errors import HeaderError
from pyproxy.headers import serialize_request_head
from pyproxy.upstream_response import UpstreamResponse

__all__ = ["UpstreamRefresher"]

_DROPPED = frozenset({b"if-none-match", b"if-modified-since", b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"te", b"upgrade"})


class UpstreamRefresher:
    """The cache phase's ``refresh`` hook: one background request per stale entry."""

    def __init__(
        self,
        upstreams: Callable[[], dict[str, UpstreamPool]],
        route_pools: Callable[[], dict[str, str]],
        *,
        timeout: float = 30.0,
        limits: Callable[[], Limits] = Limits,
    ) -> None:
        self.upstreams = upstreams
        self.route_pools = route_pools
        self.limits = limits  # the current head limits (size, header lines)
        self.timeout = timeout
        self.phase: HttpCachePhase | None = None

    async def __call__(self, plan: Plan) -> None:
        phase = self.phase
        pool_name = self.route_pools().get(plan.route)
        upstream = self.upstreams().get(pool_name) if pool_name is not None else None
        if phase is None or upstream is None:
            return
        server = upstream.choose(None, time.monotonic(), ())
        if server is None:
            return
        headers = [(n, v) for n, v in plan.request_headers if n.lower() not in _DROPPED]
        head = serialize_request_head(plan.method, plan.target, [*headers, *plan.extra_headers, (b"Connection", b"close")])
        server.started()
        sent = time.monotonic()
        ok: bool | None = False
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(server.server.host, server.server.port)
                writer.write(head)
                # the data plane's head limits: a response it would relay, a refresh reads
                limits = self.limits()
                response = UpstreamResponse(plan.method, plan.policy.max_object_size,
                                            limits.max_head_size, limits.max_header_count, switch_allowed=False)
                while not response.complete:
                    data = await reader.read(65536)
                    response.feed(data)
                    if not data:
                        break
                status = response.status
                if status == 0:
                    raise HeaderError(f"no response from {server.server}", None, 502)
                ok = status < 500
                outcome = phase.response(plan, status, response.headers)
                relay = outcome if isinstance(outcome, Relay) else None
                body = bytes(response.body) if relay is not None and relay.capture and not response.too_big else None
                await phase.finish(plan, body, response.complete)
        except (OSError, TimeoutError, HeaderError):
            await phase.finish(plan, None, False)
            raise
        finally:
            upstream.finished(server, time.monotonic() - sent, ok, False, time.monotonic())
            if writer is not None:
                writer.close()

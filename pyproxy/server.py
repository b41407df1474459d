"""Listeners and the process around them: start, serve, stop.

One process for now: every configured listener on one event loop (uvloop when installed).
SIGINT/SIGTERM stop accepting, let in-flight requests finish (answered with ``Connection: close``)
for up to ``limits.drain_timeout`` and exit 0. The worker processes sharing the port (SO_REUSEPORT),
their supervisor and reload without dropped connections are the next steps of the data-plane issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from pyproxy.config import Config
from pyproxy.loop import in_thread, serve_until_signal
from pyproxy.proxy import ClientConnection, ProxyState

__all__ = ["ProxyServer", "run"]

log = logging.getLogger("pyproxy.server")


class ProxyServer:
    """The proxy's listeners over one :class:`~pyproxy.proxy.ProxyState`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state: ProxyState | None = None
        self._servers: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []

    async def start(self) -> None:
        """Bind every listener (port 0 takes a free port: see :attr:`addresses`)."""
        loop = asyncio.get_running_loop()
        self.state = state = ProxyState.from_config(self.config)
        for listener in self.config.listeners:
            server = await loop.create_server(
                lambda: ClientConnection(state),
                listener.host,
                listener.port,
                reuse_address=True,
                backlog=1024,
            )
            self._servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            self.addresses.append((host, port))
            log.info("listening on %s:%d", host, port)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``limits.drain_timeout``), close."""
        for server in self._servers:
            server.close()
        if self.state is not None:
            await self.state.drain(self.config.limits.drain_timeout)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[ProxyServer]:
        """Serve from a background thread (tests, embedding in synchronous code)."""
        with in_thread(self.start, self.stop, "pyproxy"):
            yield self


def run(config: Config) -> None:
    """Serve ``config`` until SIGINT or SIGTERM."""
    server = ProxyServer(config)
    serve_until_signal(server.start, server.stop)

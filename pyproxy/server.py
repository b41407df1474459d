"""Listeners and the process around them: start, serve, stop.

``workers = 1`` serves every listener on one event loop (uvloop when installed) in this process.
``workers = N`` makes this process a supervisor that forks N workers; each binds the listeners
itself with SO_REUSEPORT (so the kernel spreads connections over the workers' own accept queues,
rather than waking them all on one shared queue), and a worker that dies is replaced.

SIGINT/SIGTERM stop accepting, let in-flight requests finish (answered with ``Connection: close``)
for up to ``limits.drain_timeout`` and exit 0; the supervisor passes the signal to its workers and
exits 0 when they have. Reload without dropped connections is the next step of the data-plane issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
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
                reuse_port=self.config.workers > 1,
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


def run(config: Config) -> int:
    """Serve ``config`` until SIGINT or SIGTERM; the exit status."""
    if config.workers == 1:
        serve_worker(config)
        return 0
    return Supervisor(config).run()


def serve_worker(config: Config) -> None:
    """One worker: the listeners on one event loop until SIGINT or SIGTERM."""
    server = ProxyServer(config)
    serve_until_signal(server.start, server.stop)


class Supervisor:
    """Forks ``config.workers`` workers, replaces any that dies, stops them all on a signal."""

    # A worker that dies this soon after starting is crashing at start: wait before the next try,
    # so a broken deployment does not fork in a tight loop.
    FAST_CRASH_SECONDS = 1.0

    def __init__(self, config: Config) -> None:
        self.config = config
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at)
        self.stopping = False
        self.restarts = 0

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        for slot in range(self.config.workers):
            self._spawn(slot)
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid not in self.children:
                continue
            slot, started = self.children.pop(pid)
            if self.stopping:
                continue
            log.error("worker %d (pid %d) exited (%s); starting another", slot, pid, _describe(status))
            self.restarts += 1
            if time.monotonic() - started < self.FAST_CRASH_SECONDS:
                time.sleep(self.FAST_CRASH_SECONDS)
            if not self.stopping:
                self._spawn(slot)
        return 0

    def _spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                serve_worker(self.config)
                code = 0
            except BaseException:  # noqa: BLE001 - reported, then the supervisor replaces us
                log.exception("worker %d failed", slot)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (slot, time.monotonic())
        log.info("worker %d started (pid %d)", slot, pid)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"

"""Event-loop wiring: uvloop when it is installed, and running a service on a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator

__all__ = ["in_thread", "new_event_loop", "serve_until_signal"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop (the proxy's production loop) or, without uvloop, asyncio's default one."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@contextlib.contextmanager
def in_thread(
    start: Callable[[], Awaitable[object]], stop: Callable[[], Awaitable[object]], name: str
) -> Iterator[asyncio.AbstractEventLoop]:
    """Run ``start()`` on a new loop in a background thread, yield the loop while it serves, then
    ``stop()`` and close it. An exception from ``start()`` is raised here, in the caller."""
    loop = new_event_loop()
    started = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors.append(e)
            started.set()
            loop.close()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(stop())
        loop.close()

    thread = threading.Thread(target=serve, name=name, daemon=True)
    thread.start()
    started.wait()
    if errors:
        raise errors[0]
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)


def serve_until_signal(
    start: Callable[[], Awaitable[object]],
    stop: Callable[[], Awaitable[object]],
    on_hangup: Callable[[], object] | None = None,
) -> None:
    """Run ``start()`` on a new loop in this thread, serve until SIGINT or SIGTERM, then ``stop()``.
    SIGHUP calls ``on_hangup`` (a reload) when given."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stopping = asyncio.Event()
    try:
        loop.run_until_complete(start())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        if on_hangup is not None:
            loop.add_signal_handler(signal.SIGHUP, on_hangup)
        loop.run_until_complete(stopping.wait())
    finally:
        loop.run_until_complete(stop())
        loop.close()

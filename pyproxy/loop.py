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
        try:
            loop.run_until_complete(stop())
        finally:
            _close(loop)

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


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Close ``loop`` as ``asyncio.run`` does: cancel the tasks still pending and let them finish
    first. A task left pending would be finalized later by the garbage collector, in whatever
    thread runs it, with its loop closed: its coroutines' cleanup then runs outside any loop
    (seen: redis-py failing in ``disconnect``, and a crash in CPython while closing a coroutine
    chain during a collection)."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


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
        try:
            loop.run_until_complete(stop())
        finally:
            _close(loop)

"""Request coalescing: concurrent misses of one key make one upstream request.

The first caller of :meth:`Coalescer.run` for a key becomes the leader and runs ``fetch``; callers
arriving while it runs wait for the leader's result instead of fetching themselves (Varnish's
request coalescing, nginx's ``proxy_cache_lock``). Waiting is bounded twice, as nginx bounds it: a
follower waits at most ``wait_timeout`` and at most ``max_waiters`` wait per key — past either
bound a caller fetches on its own rather than queue behind a slow or stuck leader. A leader that
fails hands its exception to its followers (they would most likely fail the same way; the caller
decides whether to retry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Coalescer", "CoalescerStats"]

T = TypeVar("T")


@dataclass
class CoalescerStats:
    leaders: int = 0
    collapsed: int = 0  # callers answered by another's fetch
    timed_out: int = 0  # followers that stopped waiting and fetched themselves
    overflow: int = 0  # callers that found too many waiting and fetched themselves


class _LeaderGone(Exception):
    """The leader's fetch was cancelled, not failed: its followers fetch on their own."""


class _Flight(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[T] = loop.create_future()
        self.waiters = 0


class Coalescer(Generic[T]):
    """One in-flight fetch per key; see the module doc."""

    def __init__(self, *, wait_timeout: float = 10.0, max_waiters: int = 10_000) -> None:
        if wait_timeout <= 0 or max_waiters < 0:
            raise ValueError("wait_timeout must be > 0 and max_waiters >= 0")
        self.wait_timeout = wait_timeout
        self.max_waiters = max_waiters
        self.stats = CoalescerStats()
        self._flights: dict[str, _Flight[T]] = {}

    def in_flight(self, key: str) -> bool:
        return key in self._flights

    def lead(self, key: str) -> Callable[[T | BaseException], None] | None:
        """Become the leader for ``key`` now (synchronously, so no other caller can slip in):
        returns the function to call with the result (or the exception) when done; ``None`` if
        another caller leads already."""
        if key in self._flights:
            return None
        flight: _Flight[T] = _Flight(asyncio.get_running_loop())
        self._flights[key] = flight
        self.stats.leaders += 1

        def finish(outcome: T | BaseException) -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if flight.done.done():
                return
            if isinstance(outcome, BaseException):
                flight.done.set_exception(outcome if isinstance(outcome, Exception) else _LeaderGone())
                flight.done.exception()  # retrieved: no "never retrieved" warning without followers
            else:
                flight.done.set_result(outcome)

        return finish

    async def run(self, key: str, fetch: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``(result, collapsed)``: ``fetch()``'s result, from this caller's own call or, when
        ``collapsed``, from the leader's."""
        finish = self.lead(key)
        if finish is None:
            return await self.follow(key, fetch)
        try:
            result = await fetch()
        except BaseException as e:
            finish(e)
            raise
        finish(result)
        return result, False

    async def follow(self, key: str, fetch: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Wait for the leader of ``key`` (bounded); fetch alone when there is none, when waiting
        is over its bounds, or when the leader was cancelled."""
        flight = self._flights.get(key)
        if flight is None:
            return await fetch(), False
        if flight.waiters >= self.max_waiters:
            self.stats.overflow += 1
            return await fetch(), False
        flight.waiters += 1
        try:
            async with asyncio.timeout(self.wait_timeout):
                result = await asyncio.shield(flight.done)
        except TimeoutError:
            self.stats.timed_out += 1
            return await fetch(), False
        except _LeaderGone:
            return await fetch(), False  # the leader was cancelled (its client left): fetch ourselves
        finally:
            flight.waiters -= 1
        self.stats.collapsed += 1
        return result, True

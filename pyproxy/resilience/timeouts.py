"""A timeout shared by many concurrent awaits: one loop timer for all of them.

``asyncio.timeout()`` creates, schedules and cancels a loop timer on every use: 3-4 µs with uvloop,
a tenth of a Redis round trip on the rate limiter's and the cache's hot paths. Awaits bounded by
the same duration expire in the order they start, so :class:`SharedTimeout` keeps the pending ones
in start order (a dict: insertion-ordered, O(1) removal) and one timer armed for the oldest. When it
fires it cancels those past their deadline and re-arms for the next; under steady traffic it fires
about once per timeout period, and a finished await costs a dict insert and pop (~0.5 µs).

Semantics are ``asyncio.timeout()``'s: the awaiting task is cancelled at the deadline and the
cancellation surfaces as :class:`TimeoutError`; a cancellation from elsewhere (or one that arrives
with ours) stays a :class:`asyncio.CancelledError` (``Task.uncancel`` bookkeeping, as asyncio does).
One instance serves one event loop at a time (it follows the running loop if that changes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["SharedTimeout"]

T = TypeVar("T")

_CLOCK_STEP = 0.001  # the resolution of uvloop's loop.time() (libuv's millisecond clock)


class _Bound:
    """One bounded await (a context manager): its deadline (loop time), task, and the task's cancel
    count at the start."""

    __slots__ = ("cancelling", "deadline", "expired", "owner", "task")

    def __init__(self, owner: SharedTimeout, deadline: float, task: asyncio.Task[object]) -> None:
        self.owner = owner
        self.deadline = deadline
        self.task = task
        self.cancelling = task.cancelling()
        self.expired = False

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.owner._pending.pop(self, None)
        if self.expired:
            # our cancel is taken back whatever became of it (the awaited code may have swallowed
            # it or turned it into another error), as asyncio.timeout does
            if self.task.uncancel() <= self.cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc


class SharedTimeout:
    """Bound awaits by ``seconds`` each, with one loop timer for all that are pending (module doc)."""

    __slots__ = ("_loop", "_pending", "_timer", "seconds")

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")
        self.seconds = seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[_Bound, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        """Awaits in progress."""
        return len(self._pending)

    def bound(self) -> _Bound:
        """A context manager bounding what the current task awaits in it by ``seconds``
        (:class:`TimeoutError` after them), like ``asyncio.timeout(seconds)`` but not async::

            with shared.bound():
                reply = await client.execute_command(...)
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("SharedTimeout.bound must be used in a task")
        if loop is not self._loop:
            self._rebind(loop)
        call = _Bound(self, loop.time() + self.seconds, task)
        self._pending[call] = None
        if self._timer is None:
            self._timer = loop.call_at(call.deadline, self._expire)
        return call

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` from the current task; :class:`TimeoutError` after ``seconds``."""
        with self.bound():
            return await awaitable

    def _expire(self) -> None:
        """The timer: cancel every await past its deadline (the oldest first), re-arm for the next."""
        self._timer = None
        loop = self._loop
        assert loop is not None
        # uvloop's clock moves in whole milliseconds: a timer fires when it reads up to 1 ms short
        # of the deadline, and waiting for the exact instant would re-arm it hundreds of times
        now = loop.time() + _CLOCK_STEP
        pending = self._pending
        while pending:
            call = next(iter(pending))
            if call.deadline > now:
                self._timer = loop.call_at(call.deadline, self._expire)
                return
            del pending[call]
            call.expired = True
            call.task.cancel()

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """A new running loop (the old one is gone): its timer and pending awaits with it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._loop = loop

"""A bulkhead: at most ``max_concurrent`` requests at once, the next ``max_queue`` waiting in line.

Like Envoy's per-cluster ``max_requests`` / ``max_pending_requests`` circuit breakers and
resilience4j's ``SemaphoreBulkhead``: one slow upstream can hold only its own slots, never every
connection of the proxy. Waiting is bounded twice, by the queue's length (beyond it a request is
refused at once, ``BulkheadFull``) and by ``queue_timeout`` (``BulkheadTimeout``), so a request
fails fast rather than use up its client's whole deadline in line. ``BulkheadTimeout`` is a subclass
of ``BulkheadFull``: both mean "no capacity, answer 503"; catch the subclass to tell them apart.

One mechanism for both styles of caller: the queue holds callbacks. ``enter_cb`` is the data plane's
callback API; ``enter`` (a coroutine) waits on a future that such a callback settles. Slots pass
directly from ``leave`` to the first waiter (``active`` does not change), so a newcomer calling
``try_enter`` between a ``leave`` and the waiter's wake-up cannot take the slot: admission is
strictly FIFO, and ``active < max_concurrent`` implies an empty queue. The queue is an
``OrderedDict``, so popping the head and removing a cancelled or expired waiter from the middle are
both O(1), and dead entries never pile up.

Cancellation never leaks a slot: a waiter cancelled while queued leaves the queue; one cancelled
just after ``leave`` handed it a slot (before its task resumed) passes the slot on to the next
waiter.

``max_concurrent=0`` means unlimited: every request is admitted at once, ``active`` still counts.
Single event loop, no locking (one bulkhead per worker and upstream).
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Final

from pyproxy.errors import PyproxyError

__all__ = ["Bulkhead", "BulkheadFull", "BulkheadTimeout", "BulkheadWaiter"]

_UNLIMITED: Final = sys.maxsize


class BulkheadFull(PyproxyError):
    """No free slot and no room in the queue: the request is refused (answer 503)."""


class BulkheadTimeout(BulkheadFull):
    """The request waited ``queue_timeout`` seconds in the queue without getting a slot."""


class BulkheadWaiter:
    """A place in a bulkhead's queue: what ``Bulkhead.enter_cb`` returns when the request waits."""

    __slots__ = ("_bulkhead", "callback", "enqueued_at", "granted", "loop", "timer")

    def __init__(
        self,
        bulkhead: Bulkhead,
        callback: Callable[[bool], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._bulkhead = bulkhead
        self.callback = callback
        self.loop = loop
        self.enqueued_at = loop.time()
        self.granted = False  # a slot was handed to this waiter
        self.timer: asyncio.TimerHandle | None = None

    def cancel(self) -> bool:
        """Leave the queue (the callback will not be called). False when no longer queued: it was
        admitted (the caller holds a slot and must ``leave()``) or it already timed out."""
        return self._bulkhead._withdraw(self)


def _settle(future: asyncio.Future[bool], admitted: bool) -> None:
    # The future is already done when the waiting task was cancelled in the meantime.
    if not future.done():
        future.set_result(admitted)


class Bulkhead:
    """Concurrency limit with a bounded FIFO queue and a queue timeout, for one event loop."""

    __slots__ = (
        "_limit",
        "_waiters",
        "active",
        "max_concurrent",
        "max_queue",
        "queue_timeout",
        "queue_wait_total",
        "rejected",
        "timeouts",
        "waited",
    )

    def __init__(
        self,
        max_concurrent: int = 1024,
        max_queue: int = 1024,
        queue_timeout: float | None = 1.0,
    ) -> None:
        """``max_concurrent=0``: unlimited. ``max_queue=0``: no waiting, refuse when full.
        ``queue_timeout=None``: wait in the queue without a time limit."""
        if max_concurrent < 0:
            raise ValueError(f"max_concurrent must be >= 0 (0 = unlimited), got {max_concurrent!r}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue!r}")
        if queue_timeout is not None and not queue_timeout > 0.0:
            raise ValueError(f"queue_timeout must be > 0 seconds or None, got {queue_timeout!r}")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._limit = max_concurrent if max_concurrent else _UNLIMITED  # one comparison per entry
        self._waiters: OrderedDict[BulkheadWaiter, None] = OrderedDict()
        self.active = 0  # slots held (admitted requests that have not left)
        self.rejected = 0  # refused because the queue was full
        self.timeouts = 0  # gave up after queue_timeout
        self.queue_wait_total = 0.0  # seconds spent in the queue by every waiter that left it
        self.waited = 0  # waiters that left the queue (admitted, timed out or cancelled)

    @property
    def queued(self) -> int:
        """Requests waiting in the queue now."""
        return len(self._waiters)

    # ------------------------------------------------------------------------------ hot path

    def try_enter(self) -> bool:
        """Take a slot if one is free (never waits, never counts a rejection)."""
        if self.active < self._limit:
            self.active += 1
            return True
        return False

    def leave(self) -> None:
        """Give back a slot: straight to the first waiter if there is one."""
        waiters = self._waiters
        if waiters:
            waiter = waiters.popitem(last=False)[0]
            waiter.granted = True
            self._dequeued(waiter)
            # active is unchanged: the slot changes hands. The callback runs here, synchronously.
            waiter.callback(True)
            return
        if self.active <= 0:
            raise RuntimeError("Bulkhead.leave() without a matching enter")
        self.active -= 1

    # ------------------------------------------------------------------------------ waiting

    def enter_cb(
        self, callback: Callable[[bool], None], loop: asyncio.AbstractEventLoop
    ) -> BulkheadWaiter | None:
        """Ask for a slot; ``callback(True)`` once admitted, ``callback(False)`` when refused.

        A free slot or a full queue call the callback at once, synchronously, and return ``None``.
        Otherwise the request queues and the returned waiter can ``cancel()`` it (the client went
        away); the callback then runs later from ``leave()`` (True) or the timeout (False). After
        ``callback(True)`` the caller holds a slot and must ``leave()``. The callback must not
        raise: it runs inside another request's ``leave()``.
        """
        if self.active < self._limit:
            self.active += 1
            callback(True)
            return None
        waiter = self._enqueue(callback, loop)
        if waiter is None:
            callback(False)
        return waiter

    async def enter(self) -> None:
        """Take a slot, waiting in line if needed. Raises ``BulkheadFull`` at once when the queue is
        full, ``BulkheadTimeout`` after ``queue_timeout``. The caller must ``leave()`` after."""
        if self.active < self._limit:
            self.active += 1
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiter = self._enqueue(functools.partial(_settle, future), loop)
        if waiter is None:
            raise BulkheadFull(
                f"bulkhead full: {self.active} active of {self.max_concurrent}, "
                f"{self.queued} queued of {self.max_queue}"
            )
        try:
            admitted = await future
        except asyncio.CancelledError:
            if waiter.granted:
                self.leave()  # handed a slot just as we were cancelled: pass it on
            else:
                self._withdraw(waiter)
            raise
        if not admitted:
            raise BulkheadTimeout(f"no bulkhead slot within {self.queue_timeout} s")

    async def __aenter__(self) -> Bulkhead:
        await self.enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.leave()

    # ------------------------------------------------------------------------------ internals

    def _enqueue(
        self, callback: Callable[[bool], None], loop: asyncio.AbstractEventLoop
    ) -> BulkheadWaiter | None:
        if len(self._waiters) >= self.max_queue:
            self.rejected += 1
            return None
        waiter = BulkheadWaiter(self, callback, loop)
        if self.queue_timeout is not None:
            waiter.timer = loop.call_later(self.queue_timeout, self._expire, waiter)
        self._waiters[waiter] = None
        return waiter

    def _expire(self, waiter: BulkheadWaiter) -> None:
        try:
            del self._waiters[waiter]
        except KeyError:  # admitted or withdrawn just before the timer ran
            return
        waiter.timer = None  # it has fired
        self.timeouts += 1
        self._dequeued(waiter)
        waiter.callback(False)

    def _withdraw(self, waiter: BulkheadWaiter) -> bool:
        try:
            del self._waiters[waiter]
        except KeyError:  # already admitted or timed out
            return False
        self._dequeued(waiter)
        return True

    def _dequeued(self, waiter: BulkheadWaiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        self.queue_wait_total += waiter.loop.time() - waiter.enqueued_at
        self.waited += 1

    def __repr__(self) -> str:
        return (
            f"<Bulkhead active={self.active}/{self.max_concurrent or 'unlimited'} "
            f"queued={self.queued}/{self.max_queue} rejected={self.rejected} "
            f"timeouts={self.timeouts}>"
        )

# A timeout that costs nothing to move: the lazy timer of the data plane (included by _protocol.pyx).
#
# Every request used to create and cancel four loop timers (head, keep-alive, upstream response,
# upstream idle): a TimerHandle, a libuv timer start and stop each, ~15% of the proxy's CPU per
# request. A Deadline keeps one loop timer per connection and only stores the new expiry time when
# it moves: the timer, when it fires early, re-arms itself for the current expiry, and when the
# deadline was cleared meanwhile it simply lapses. Under steady keep-alive load a connection's
# timer then fires about once per timeout period instead of being rebuilt per request.


cdef class Deadline:
    """One re-armable timeout: :meth:`set` (expiry in loop time + what to call) and :meth:`clear`
    are plain stores; at most one loop timer per Deadline is ever pending."""

    cdef readonly object loop
    cdef object handle      # the pending loop TimerHandle, or None
    cdef object callback    # called (without arguments) when the deadline passes
    cdef public double when  # loop time of expiry; 0.0 = no deadline
    cdef double fires_at     # when the pending loop timer is due

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.handle = None
        self.callback = None
        self.when = 0.0
        self.fires_at = 0.0

    cpdef set(self, double when, object callback):
        """Expire at loop time ``when`` (replacing any earlier setting) and then call ``callback``."""
        self.when = when
        self.callback = callback
        if self.handle is None:
            self._schedule(when)
        elif when < self.fires_at:
            # Sooner than the pending timer: only then is a new loop timer needed.
            self.handle.cancel()
            self._schedule(when)

    cpdef clear(self):
        """No deadline (the pending loop timer, if any, lapses when it fires)."""
        self.when = 0.0
        self.callback = None

    cpdef cancel(self):
        """No deadline and no pending loop timer (the connection is gone)."""
        self.clear()
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    @property
    def armed(self) -> bool:
        return self.when != 0.0

    cdef _schedule(self, double when):
        self.fires_at = when
        self.handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.handle = None
        if self.when == 0.0:
            return
        # libuv timers have millisecond resolution: "early" by less than that counts as due.
        if self.loop.time() + 0.001 < self.when:
            self._schedule(self.when)
            return
        callback = self.callback
        self.when = 0.0
        self.callback = None
        callback()

"""A rolling window of two counters, bucketed like Hystrix's rolling statistics.

The window of ``window`` seconds is cut into ``buckets`` slots of ``window / buckets`` seconds, kept
in a ring; the totals are kept beside the ring, so adding an event and reading the totals are O(1)
and allocate nothing. Moving to a newer slot subtracts the slots that fell out of the window (at
most ``buckets`` of them, however long the pause was). The totals therefore cover the current,
partly filled slot plus the ``buckets - 1`` before it: between ``(buckets - 1) / buckets × window``
and ``window`` seconds of history, the usual price of bucketing.

Time is passed in (monotonic seconds). A time older than the newest slot counts into the newest
slot, so a caller whose clock reading is a little stale never corrupts the ring.
"""

from __future__ import annotations

__all__ = ["BucketCounter"]


class BucketCounter:
    """Two rolling counters, ``a`` and ``b`` (say requests and failures), over ``window``."""

    __slots__ = ("_a", "_b", "_epoch", "_index", "_n", "_per_second", "a", "b")

    def __init__(self, window: float, buckets: int = 10) -> None:
        if not window > 0.0:
            raise ValueError(f"window must be > 0 seconds, got {window!r}")
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets!r}")
        # Slot number = now × buckets / window: a multiplication, exact for round numbers where
        # now // (window / buckets) is not (1001.5 // 0.1 == 10014.0).
        self._per_second = buckets / window
        self._n = buckets
        self._a = [0] * buckets
        self._b = [0] * buckets
        self._epoch = 0  # absolute slot number (now // width) of the newest slot
        self._index = 0  # its position in the ring: _epoch % _n
        self.a = 0  # totals over the window
        self.b = 0

    def advance(self, now: float) -> None:
        """Move the newest slot to ``now``, dropping the slots that left the window."""
        epoch = int(now * self._per_second)  # monotonic time is positive: int() is floor
        if epoch > self._epoch:  # else the same slot (the common case) or a stale clock reading
            self._roll(epoch)

    def add(self, now: float, da: int, db: int) -> None:
        """Count ``da`` and ``db`` events at ``now``."""
        # advance() inlined: this is the per-request call, and a method call costs ~60 ns.
        epoch = int(now * self._per_second)
        if epoch > self._epoch:
            self._roll(epoch)
        i = self._index
        self._a[i] += da
        self._b[i] += db
        self.a += da
        self.b += db

    def _roll(self, epoch: int) -> None:
        n = self._n
        gap = epoch - self._epoch
        if gap >= n:  # idle for a whole window: everything expired
            self.clear()
        else:
            a = self._a
            b = self._b
            i = self._index
            for _ in range(gap):
                i += 1
                if i == n:
                    i = 0
                self.a -= a[i]
                self.b -= b[i]
                a[i] = 0
                b[i] = 0
        self._epoch = epoch
        self._index = epoch % n

    def clear(self) -> None:
        """Forget every event (the ring keeps its position)."""
        n = self._n
        self._a[:] = [0] * n
        self._b[:] = [0] * n
        self.a = 0
        self.b = 0

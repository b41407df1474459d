"""A rolling window of two counters, bucketed like Hystrix's rolling statistics.

The window of ``window`` seconds is cut into ``buckets`` slots of ``window / buckets`` seconds, kept
in a ring; the totals are kept beside the ring, so adding an event and reading the totals are O(1)
and allocate nothing. Moving to a newer slot subtracts the slots that fell out of the window (at
most ``buckets`` of them, however long the pause was). The totals therefore cover the current,
partly filled slot plus the ``buckets - 1`` before it: between ``(buckets - 1) / buckets × window``
and ``window`` seconds of history, the usual price of bucketing.

Time is passed in (monotonic seconds). A time older than the newest slot counts into the newest
slot, so a caller whose clock reading is a little stale never corrupts the ring.

The class is compiled (:class:`pyproxy._balance.BucketCounter`, same arithmetic): the retry budget
counts every request in it.
"""

from __future__ import annotations

from pyproxy._balance import BucketCounter

__all__ = ["BucketCounter"]

"""A circuit breaker for one upstream server.

States, after Nygard's *Release It!* and Hystrix / resilience4j:

* **closed** — requests flow; outcomes are counted. The breaker trips open on
  ``consecutive_failures`` failures in a row, or when the failures reach ``failure_ratio`` of the
  requests in the rolling ``window`` once at least ``min_requests`` requests were seen there (so
  three errors in a quiet minute do not open it). The window is a ring of ``buckets`` counters (see
  ``_buckets``): O(1) per outcome, no list of events.
* **open** — every request is refused until ``retry_at``. The open time grows exponentially with the
  number of consecutive openings, ``base_open_time × 2^(openings - 1)``, capped at
  ``max_open_time``, then spread by ±``jitter`` (a fraction) so that the breakers of many workers or
  proxies do not all probe a recovering server at the same instant. The cap is a hard bound: jitter
  never exceeds it.
* **half-open** — entered lazily by the first ``allow(now)`` at or after ``retry_at``. At most
  ``half_open_max_probes`` requests are in flight at once; ``success_threshold`` successes close the
  breaker, one failure opens it again for twice as long.

Consecutive openings: ``openings`` counts the openings since the breaker was last healthy. Closing
does not reset it at once — a server that closes and trips again soon after (flapping) keeps its
growing open time — but a trip that comes ``max_open_time`` or more after the last close starts
again at one (like Envoy's outlier detection, whose ejection multiplier decays while the host stays
healthy). ``total_openings`` never resets (for metrics).

The caller passes the time (monotonic seconds) to every call, so tests control it and the hot path
reads the clock once per request for all its users. ``allow`` and ``record`` are a few attribute
operations each.

Result attribution: ``allow`` returns a plain bool, with no token, so the breaker cannot tell a
probe's result from a late result of a request admitted while it was still closed. It counts an
outcome as a probe's only while a probe is outstanding, and ignores outcomes when open; a stale
result can thus stand in for a probe's. The error is bounded (at most the number of requests in
flight at the trip) and conservative for failures.
"""

from __future__ import annotations

import random
from typing import Final

from pyproxy.resilience._buckets import BucketCounter

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "STATE_NAMES", "CircuitBreaker"]

CLOSED: Final = 0
OPEN: Final = 1
HALF_OPEN: Final = 2
STATE_NAMES: Final = ("closed", "open", "half_open")  # indexed by state code

_MAX_EXPONENT: Final = 62  # 2.0**62 × any sane base is far past any cap; avoids float overflow


class CircuitBreaker:
    """Closed → open → half-open → closed, for one upstream server (one event loop, no locking).

    Use: ``if breaker.allow(now): send ... breaker.record(ok, now)``; call ``release_probe()``
    instead of ``record`` for an admitted request that never completed (cancelled by the client).
    What counts as a failure is the caller's choice (connect errors, timeouts, 5xx).
    """

    __slots__ = (
        "_base",
        "_code",
        "_consecutive",
        "_closed_at",
        "_jitter",
        "_max_consecutive",
        "_max_open",
        "_max_probes",
        "_min_requests",
        "_probes",
        "_ratio",
        "_rng",
        "_successes",
        "_success_threshold",
        "_window",
        "openings",
        "retry_at",
        "total_openings",
    )

    def __init__(
        self,
        *,
        consecutive_failures: int | None = 5,
        failure_ratio: float | None = 0.5,
        window: float = 10.0,
        min_requests: int = 20,
        buckets: int = 10,
        base_open_time: float = 5.0,
        max_open_time: float = 300.0,
        jitter: float = 0.1,
        success_threshold: int = 3,
        half_open_max_probes: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        """``consecutive_failures`` / ``failure_ratio`` of ``None`` turn that trip rule off."""
        if consecutive_failures is not None and consecutive_failures < 1:
            raise ValueError(
                f"consecutive_failures must be >= 1 or None, got {consecutive_failures!r}"
            )
        if failure_ratio is not None and not 0.0 < failure_ratio <= 1.0:
            raise ValueError(f"failure_ratio must be in (0, 1] or None, got {failure_ratio!r}")
        if min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {min_requests!r}")
        if not 0.0 < base_open_time <= max_open_time:
            raise ValueError(
                "need 0 < base_open_time <= max_open_time, "
                f"got {base_open_time!r}, {max_open_time!r}"
            )
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        if success_threshold < 1:
            raise ValueError(f"success_threshold must be >= 1, got {success_threshold!r}")
        if half_open_max_probes < 1:
            raise ValueError(f"half_open_max_probes must be >= 1, got {half_open_max_probes!r}")
        # A disabled rule becomes a threshold that is never reached, so record() tests no None.
        self._max_consecutive = consecutive_failures if consecutive_failures is not None else -1
        # A hair under the ratio so that 3 failures of 10 meet 0.3 (0.3 * 10 is 3.0000000000000004).
        self._ratio = failure_ratio * (1.0 - 1e-9) if failure_ratio is not None else 2.0
        self._min_requests = min_requests
        self._window = BucketCounter(window, buckets)  # a = requests, b = failures
        self._base = base_open_time
        self._max_open = max_open_time
        self._jitter = jitter
        self._success_threshold = success_threshold
        self._max_probes = half_open_max_probes
        self._rng = rng if rng is not None else random.Random()
        self._code: int = CLOSED
        self._consecutive = 0  # failures in a row while closed
        self._probes = 0  # half-open requests in flight
        self._successes = 0  # half-open successes so far
        self._closed_at: float | None = None  # when it last closed from half-open
        self.openings = 0
        self.total_openings = 0
        self.retry_at = 0.0  # meaningful while open: when the first probe may go

    # ------------------------------------------------------------------------------ hot path

    def allow(self, now: float) -> bool:
        """May a request go to this server now? In half-open a True takes a probe slot."""
        code = self._code
        if code == CLOSED:
            return True
        if code == OPEN:
            if now < self.retry_at:
                return False
            self._code = HALF_OPEN
            self._probes = 0
            self._successes = 0
        if self._probes < self._max_probes:
            self._probes += 1
            return True
        return False

    def record(self, ok: bool, now: float) -> None:
        """The outcome of a request that ``allow`` let through."""
        code = self._code
        if code == CLOSED:
            w = self._window
            if ok:
                w.add(now, 1, 0)
                self._consecutive = 0
                return
            w.add(now, 1, 1)
            self._consecutive += 1
            if self._consecutive == self._max_consecutive or (
                w.a >= self._min_requests and w.b >= self._ratio * w.a
            ):
                self._trip(now)
            return
        if code == HALF_OPEN and self._probes > 0:
            self._probes -= 1
            if not ok:
                self._trip(now)
                return
            self._successes += 1
            if self._successes >= self._success_threshold:
                self._close(now)
            return
        # Open, or half-open with no probe outstanding: a late result of a request admitted
        # before the trip. It says nothing about the server now.
        if self._probes > 0:
            self._probes -= 1

    def release_probe(self) -> None:
        """Give back the probe slot of a request admitted in half-open that never completed."""
        if self._probes > 0:
            self._probes -= 1

    # ------------------------------------------------------------------------------ state

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (open → half-open happens in ``allow``)."""
        return STATE_NAMES[self._code]

    @property
    def state_code(self) -> int:
        """0 closed, 1 open, 2 half-open: the value of a state gauge."""
        return self._code

    @property
    def probes_in_flight(self) -> int:
        """Half-open requests admitted and not yet recorded or released."""
        return self._probes

    def open_time(self, openings: int) -> float:
        """The open time, before jitter, after ``openings`` consecutive openings (>= 1)."""
        exponent = min(max(openings, 1) - 1, _MAX_EXPONENT)
        return min(self._base * 2.0**exponent, self._max_open)

    def reset(self) -> None:
        """Force closed and forget all history (an operator's override)."""
        self._code = CLOSED
        self._window.clear()
        self._consecutive = 0
        self._probes = 0
        self._successes = 0
        self._closed_at = None
        self.openings = 0
        self.retry_at = 0.0

    # ------------------------------------------------------------------------------ transitions

    def _trip(self, now: float) -> None:
        closed_at = self._closed_at
        if self._code == CLOSED and closed_at is not None and now - closed_at >= self._max_open:
            self.openings = 0  # healthy long enough since the last close: not consecutive
        self.openings += 1
        self.total_openings += 1
        duration = self.open_time(self.openings)
        if self._jitter:
            duration *= 1.0 + self._jitter * self._rng.uniform(-1.0, 1.0)
            if duration > self._max_open:
                duration = self._max_open
        self._code = OPEN
        self.retry_at = now + duration
        self._successes = 0

    def _close(self, now: float) -> None:
        self._code = CLOSED
        self._closed_at = now
        self._window.clear()  # the failures that opened it must not trip it again at once
        self._consecutive = 0
        self._successes = 0

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self.state} openings={self.openings} "
            f"retry_at={self.retry_at:.3f} probes={self._probes}>"
        )

"""Adaptive limits: a route's or the global limit follows its pool's health (AIMD).

Additive increase, multiplicative decrease — TCP's congestion control (Jacobson, "Congestion
Avoidance and Control", SIGCOMM 1988; Chiu & Jain 1989 for why AIMD converges to a fair share)
applied to a rate limit, as Netflix's ``concurrency-limits`` does with its ``AIMDLimit``: each
``interval`` the pool's recent p99 latency and error rate are compared with their targets; if
either is above its target the limit is multiplied by ``decrease`` (0.7: −30%), else ``increase``
is added; the limit always stays within ``[min, max]``. Backing off fast and recovering slowly
lets an overloaded upstream drain its queue before traffic comes back.

:meth:`AdaptiveLimit.observe` is called periodically (e.g. each second) with the pool's stats;
calls closer together than ``interval`` change nothing, so the caller need not time them. A
signal without data (``None`` or NaN: no request finished lately) is not judged; with no signal
at all the limit stays as it is. The limit grows while the pool is healthy even if the traffic
does not use it (up to ``max``): the cap is the configuration's, the AIMD only takes it away
while the pool suffers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyproxy.config import AdaptiveLimitConfig

__all__ = ["AdaptiveLimit"]


class AdaptiveLimit:
    """An AIMD limit in ``[min_limit, max_limit]``, starting at ``start`` (default the maximum).

    ``target_p99`` (seconds) and ``target_error_rate`` (a fraction): the health to keep; at least
    one is needed. ``decrease`` in (0, 1) multiplies the limit on an unhealthy interval (rounded
    down); ``increase`` (≥ 1) is added on a healthy one. ``clock``: seconds, monotonic.
    """

    def __init__(
        self,
        min_limit: int,
        max_limit: int,
        *,
        start: int | None = None,
        target_p99: float | None = None,
        target_error_rate: float | None = None,
        decrease: float = 0.7,
        increase: int = 1,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(min_limit, int) or min_limit < 1:
            raise ValueError(f"min_limit must be an int >= 1, got {min_limit!r}")
        if not isinstance(max_limit, int) or max_limit < min_limit:
            raise ValueError(f"max_limit must be an int >= min_limit ({min_limit}), got {max_limit!r}")
        start = max_limit if start is None else start
        if not isinstance(start, int) or not min_limit <= start <= max_limit:
            raise ValueError(f"start must be an int in [{min_limit}, {max_limit}], got {start!r}")
        if target_p99 is None and target_error_rate is None:
            raise ValueError("give target_p99 and/or target_error_rate: the health to follow")
        if target_p99 is not None and not (math.isfinite(target_p99) and target_p99 > 0):
            raise ValueError(f"target_p99 must be seconds > 0, got {target_p99!r}")
        if target_error_rate is not None and not 0 < target_error_rate <= 1:
            raise ValueError(f"target_error_rate must be in (0, 1], got {target_error_rate!r}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {decrease!r}")
        if not isinstance(increase, int) or increase < 1:
            raise ValueError(f"increase must be an int >= 1, got {increase!r}")
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be seconds > 0, got {interval!r}")
        self.min = min_limit
        self.max = max_limit
        self.target_p99 = target_p99
        self.target_error_rate = target_error_rate
        self.decrease = decrease
        self.increase = increase
        self.interval = interval
        self._clock = clock
        self._limit = start
        self._judged_at: float | None = None
        self.decreases = 0  # adjustments made, for metrics
        self.increases = 0
        self.version = 0  # bumped whenever the limit changes (for caches of derived values)
        self.last_p99: float | None = None
        self.last_error_rate: float | None = None

    @classmethod
    def from_config(
        cls,
        config: AdaptiveLimitConfig,
        *,
        start: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> AdaptiveLimit:
        """The limit an ``adaptive = {...}`` table describes (``start``: the rule's ``limit``)."""
        return cls(
            config.min,
            config.max,
            start=start,
            target_p99=config.target_p99,
            target_error_rate=config.target_error_rate,
            decrease=config.decrease,
            increase=config.increase,
            interval=config.interval,
            clock=clock,
        )

    @property
    def limit(self) -> int:
        """The current limit."""
        return self._limit

    def observe(self, p99: float | None, error_rate: float | None, now: float | None = None) -> int:
        """Judge the pool's recent health and adjust (at most once per ``interval``); the limit."""
        target_p99, target_errors = self.target_p99, self.target_error_rate
        if p99 is not None and (target_p99 is None or math.isnan(p99)):
            p99 = None
        if error_rate is not None and (target_errors is None or math.isnan(error_rate)):
            error_rate = None
        if p99 is None and error_rate is None:
            return self._limit
        now = self._clock() if now is None else now
        if self._judged_at is not None and now - self._judged_at < self.interval:
            return self._limit
        self._judged_at = now
        self.last_p99, self.last_error_rate = p99, error_rate
        slow = p99 is not None and target_p99 is not None and p99 > target_p99
        failing = error_rate is not None and target_errors is not None and error_rate > target_errors
        old = self._limit
        if slow or failing:
            new = max(self.min, math.floor(old * self.decrease))
            if new < old:
                self.decreases += 1
        else:
            new = min(self.max, old + self.increase)
            if new > old:
                self.increases += 1
        if new != old:
            self._limit = new
            self.version += 1
        return new

    def snapshot(self) -> dict[str, Any]:
        """The state as plain data (``GET /ratelimits``)."""
        return {
            "limit": self._limit,
            "min": self.min,
            "max": self.max,
            "target_p99": self.target_p99,
            "target_error_rate": self.target_error_rate,
            "last_p99": self.last_p99,
            "last_error_rate": self.last_error_rate,
            "decreases": self.decreases,
            "increases": self.increases,
        }

    def __repr__(self) -> str:
        return f"AdaptiveLimit(limit={self._limit}, min={self.min}, max={self.max})"

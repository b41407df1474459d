"""A retry budget, and full-jitter exponential backoff.

Retries multiply load exactly when a server is struggling; a per-request retry count cannot stop a
storm (three retries per request is 4× the load). A budget caps retries as a share of the traffic:
over the sliding ``window`` at most ``budget_percent`` % of the requests may be retried, plus
``min_retries_per_window`` so that a quiet route can still retry at all. This is Envoy's
``retry_budget`` (``budget_percent`` 20 %, ``min_retry_concurrency`` 3) expressed over a time window
as Finagle's ``RetryBudget`` does (``ttl`` 10 s, ``percentCanRetry`` 0.2), since a worker sees
rates, not a cluster-wide count of active requests. The two allowances add up; within any window:

    retries ≤ min_retries_per_window + budget_percent / 100 × requests

``record_request`` counts original requests only; a retry is counted by ``try_acquire`` and does not
earn budget itself (otherwise retries would pay for more retries). Both are O(1) on a bucketed ring.

``backoff`` is the "full jitter" schedule of Marc Brooker's *Exponential Backoff And Jitter* (AWS
Architecture Blog, 2015): ``uniform(0, min(cap, base × 2^(attempt-1)))``, which spreads the retries
of many clients best for the least total wait.
"""

from __future__ import annotations

import random
from typing import Final

from pyproxy._balance import BudgetWindow
from pyproxy.resilience._buckets import BucketCounter

__all__ = ["RetryBudget", "backoff"]

_MAX_EXPONENT: Final = 62  # keeps 2.0**n finite; any sane base is already past its cap there


class RetryBudget(BudgetWindow):
    """Retries allowed as a share of requests over a sliding window (one event loop, no locking).

    ``record_request`` (once per request) is its compiled base's (:class:`pyproxy._balance.BudgetWindow`).
    """

    __slots__ = ("_min", "_percent", "budget_percent", "exhausted", "retries")

    def __init__(
        self,
        budget_percent: float = 20.0,
        min_retries_per_window: int = 3,
        window: float = 10.0,
        buckets: int = 10,
    ) -> None:
        if not 0.0 <= budget_percent <= 100.0:
            raise ValueError(f"budget_percent must be in [0, 100], got {budget_percent!r}")
        if min_retries_per_window < 0:
            raise ValueError(f"min_retries_per_window must be >= 0, got {min_retries_per_window!r}")
        self.budget_percent = budget_percent
        self._percent = float(budget_percent)
        self._min = min_retries_per_window
        self._window = BucketCounter(window, buckets)  # a = requests, b = retries
        self.retries = 0  # retries granted, ever
        self.exhausted = 0  # retries denied, ever

    def try_acquire(self, now: float) -> bool:
        """May one retry go now? True counts it against the budget; False counts as exhausted."""
        w = self._window
        w.advance(now)
        # This retry fits if retries + 1 ≤ min + percent/100 × requests; multiplied out by 100 so
        # that whole percentages compare exactly (0.2 × 15 is not 3.0 in floating point).
        if 100 * (w.b + 1 - self._min) <= self._percent * w.a:
            w.add(now, 0, 1)
            self.retries += 1
            return True
        self.exhausted += 1
        return False

    def available(self, now: float) -> int:
        """How many retries the budget would grant now (for metrics and tests)."""
        w = self._window
        w.advance(now)
        allowed = self._min + int(self._percent * w.a // 100)
        return max(allowed - w.b, 0)

    @property
    def requests_in_window(self) -> int:
        """Original requests counted in the current window (as of the last call)."""
        return self._window.a

    @property
    def retries_in_window(self) -> int:
        """Retries granted in the current window (as of the last call)."""
        return self._window.b

    def __repr__(self) -> str:
        return (
            f"<RetryBudget {self.budget_percent}% + {self._min} retries={self.retries} "
            f"exhausted={self.exhausted}>"
        )


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first): full-jitter exponential.

    Uniform in ``[0, min(cap, base × 2^(attempt-1))]``; ``rng`` defaults to the ``random`` module.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt!r}")
    if base < 0.0 or cap < 0.0:
        raise ValueError(f"base and cap must be >= 0, got {base!r}, {cap!r}")
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    if rng is None:
        return random.uniform(0.0, ceiling)
    return rng.uniform(0.0, ceiling)

"""Resilience building blocks: circuit breaker, retry budget and backoff, bulkhead.

Pure Python, one event loop each (a worker keeps one per upstream server or route), time passed in
by the caller so the policy is testable without sleeping. Each module's docstring gives its design.
"""

from __future__ import annotations

from pyproxy.resilience.breaker import CLOSED, HALF_OPEN, OPEN, STATE_NAMES, CircuitBreaker
from pyproxy.resilience.budget import RetryBudget, backoff
from pyproxy.resilience.bulkhead import Bulkhead, BulkheadFull, BulkheadTimeout, BulkheadWaiter

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "STATE_NAMES",
    "Bulkhead",
    "BulkheadFull",
    "BulkheadTimeout",
    "BulkheadWaiter",
    "CircuitBreaker",
    "RetryBudget",
    "backoff",
]

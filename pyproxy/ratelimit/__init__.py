"""Rate limiting: multi-level sliding windows, local or shared through Redis / Redis Cluster.

- :mod:`pyproxy.ratelimit.checks`: the value types every limiter shares (:class:`Check`,
  :class:`Penalty`, :class:`Decision`, :class:`CheckResult`).
- :mod:`pyproxy.ratelimit.redis_backend`: :class:`RedisLimiter`, every check of a request decided
  and charged in one atomic Lua script on Redis's clock, with the penalty box.

Redis is optional at run time: the Redis names are imported on first use, so ``import
pyproxy.ratelimit`` works without ``redis`` installed (using ``RedisLimiter`` then needs it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pyproxy.ratelimit.checks import ALGORITHMS, Algorithm, Check, CheckResult, Decision, Penalty

if TYPE_CHECKING:
    from pyproxy.ratelimit.redis_backend import (
        LATENCY_BOUNDS,
        BlockedKey,
        RedisLimiter,
        RedisLimiterStats,
        RedisUnavailable,
    )

__all__ = [
    "ALGORITHMS",
    "LATENCY_BOUNDS",
    "Algorithm",
    "BlockedKey",
    "Check",
    "CheckResult",
    "Decision",
    "Penalty",
    "RedisLimiter",
    "RedisLimiterStats",
    "RedisUnavailable",
]

_REDIS_NAMES = frozenset({"LATENCY_BOUNDS", "BlockedKey", "RedisLimiter", "RedisLimiterStats", "RedisUnavailable"})


def __getattr__(name: str) -> Any:
    if name in _REDIS_NAMES:
        return getattr(importlib.import_module("pyproxy.ratelimit.redis_backend"), name)
    raise AttributeError(f"module 'pyproxy.ratelimit' has no attribute {name!r}")

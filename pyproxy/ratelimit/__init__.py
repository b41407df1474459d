"""Rate limiting: multi-level sliding windows, local or shared through Redis / Redis Cluster.

- :mod:`pyproxy.ratelimit.checks`: the value types every limiter shares (:class:`Check`,
  :class:`Penalty`, :class:`Decision`, :class:`CheckResult`, :class:`BlockedKey`).
- :mod:`pyproxy.ratelimit.base`: :class:`Limiter`, the interface all three limiters satisfy.
- :mod:`pyproxy.ratelimit.local`: :class:`LocalLimiter`, counters in shared memory for the worker
  processes of one machine (mode ``local``).
- :mod:`pyproxy.ratelimit.redis_backend`: :class:`RedisLimiter`, every check of a request decided
  and charged in one atomic Lua script on Redis's clock, with the penalty box (mode ``redis``).
- :mod:`pyproxy.ratelimit.hybrid`: :class:`HybridLimiter`, decided locally and reconciled with
  Redis every ``sync_interval`` (mode ``hybrid``).
- :mod:`pyproxy.ratelimit.penalty_box`: the penalty box of the whole proxy (every worker, every
  instance sharing Redis) as the admin API lists and lifts it.

Redis is optional at run time: the Redis names are imported on first use, so ``import
pyproxy.ratelimit`` works without ``redis`` installed (using ``RedisLimiter`` then needs it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pyproxy.ratelimit.base import Limiter, LimiterStats
from pyproxy.ratelimit.checks import ALGORITHMS, Algorithm, BlockedKey, Check, CheckResult, Decision, Penalty
from pyproxy.ratelimit.local import LocalLimiter, LocalLimiterStats

if TYPE_CHECKING:
    from pyproxy.ratelimit.hybrid import HybridLimiter, HybridLimiterStats
    from pyproxy.ratelimit.redis_backend import (
        LATENCY_BOUNDS,
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
    "HybridLimiter",
    "HybridLimiterStats",
    "Limiter",
    "LimiterStats",
    "LocalLimiter",
    "LocalLimiterStats",
    "Penalty",
    "RedisLimiter",
    "RedisLimiterStats",
    "RedisUnavailable",
]

_LAZY = {
    "LATENCY_BOUNDS": "pyproxy.ratelimit.redis_backend",
    "RedisLimiter": "pyproxy.ratelimit.redis_backend",
    "RedisLimiterStats": "pyproxy.ratelimit.redis_backend",
    "RedisUnavailable": "pyproxy.ratelimit.redis_backend",
    "HybridLimiter": "pyproxy.ratelimit.hybrid",
    "HybridLimiterStats": "pyproxy.ratelimit.hybrid",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'pyproxy.ratelimit' has no attribute {name!r}")

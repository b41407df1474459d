"""What every limiter of :mod:`pyproxy.ratelimit` offers, so the data plane can use any of them.

Three limiters satisfy :class:`Limiter` (checked by mypy, structurally):

- :class:`~pyproxy.ratelimit.local.LocalLimiter`: counters in shared memory for the worker
  processes of one machine (mode ``local``);
- :class:`~pyproxy.ratelimit.redis_backend.RedisLimiter`: one atomic Lua round trip per request on
  Redis or Redis Cluster (mode ``redis``);
- :class:`~pyproxy.ratelimit.hybrid.HybridLimiter`: decided locally, reconciled with Redis every
  ``sync_interval`` (mode ``hybrid``).

All take the same :class:`~pyproxy.ratelimit.checks.Check` lists and answer the same
:class:`~pyproxy.ratelimit.checks.Decision` (every check charged or none), with the penalty box
and its admin operations. The local and hybrid limiters also decide synchronously
(``hit_sync`` / ``peek_sync``: no await on the hot path); the Redis one cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pyproxy.ratelimit.checks import BlockedKey, Check, Decision

__all__ = ["Limiter", "LimiterStats"]


class LimiterStats(Protocol):
    """The part of a limiter's ``stats()`` every limiter has; each adds its own counters."""

    @property
    def healthy(self) -> bool: ...


@runtime_checkable
class Limiter(Protocol):
    """A rate limiter: decide requests (:meth:`hit`, :meth:`peek`) and run the penalty box."""

    @property
    def healthy(self) -> bool:
        """False while the limiter cannot decide as configured (Redis unreachable)."""
        ...

    def stats(self) -> LimiterStats:
        """Counters since the limiter was made, for metrics."""
        ...

    async def hit(self, checks: Sequence[Check]) -> Decision:
        """Decide ``checks`` for one request; charge all of them if all admit it, else none."""
        ...

    async def peek(self, checks: Sequence[Check]) -> Decision:
        """What :meth:`hit` would answer now, charging nothing and counting no violation."""
        ...

    async def block(self, key: str, seconds: float) -> float:
        """Put ``key`` in the penalty box for ``seconds``; the Unix time it is blocked until."""
        ...

    async def unblock(self, key: str) -> bool:
        """Take ``key`` out of the penalty box, forgetting its strikes; True if it was blocked."""
        ...

    async def block_state(self, key: str) -> BlockedKey | None:
        """``key``'s block, ``None`` when it is not blocked."""
        ...

    async def list_blocked(self) -> list[BlockedKey]:
        """Every key blocked now, shortest remaining time first."""
        ...

    async def aclose(self) -> None:
        """Release what the limiter holds (connections, background tasks)."""
        ...

"""The penalty box of the whole proxy, as the admin API lists and lifts it.

Where a block lives, by mode (so where the admin API must look):

- ``local``: in the machine's :class:`~pyproxy.core.SharedWindows` table, which every worker reads
  on every request: one :meth:`~pyproxy.ratelimit.local.LocalLimiter.unblock_sync` there frees the
  key in every worker at once. The names of blocked keys are listed from the limiter's journal, a
  mapping shared by every process forked after the :class:`~pyproxy.ratelimit.local.LocalLimiter`
  was made — so the supervisor makes the limiter (not only its table) before forking, and the
  workers and the admin API all use their inherited copy of it.
- ``redis``: in Redis, for every instance; and in the machine's table for blocks made by the local
  fallback while Redis was unavailable (``on_redis_error = "local"``).
- ``hybrid``: decided in the machine's table and shared through Redis at each sync. Listing merges
  both; unblocking lifts the key in Redis, then in the table (every worker of this machine at
  once). Other instances lift their copy at their next sync that checks the key, so a request or
  two there may still be refused for up to a ``sync_interval``; a block made less than one
  ``sync_interval`` before the unblock, not yet pushed, can come back from the worker that made it.

So wherever the admin API runs — in the only worker, or in the supervisor on a thread and event
loop of its own — it needs no message to the workers: :class:`PenaltyBox` opens its own view of
the same state (the inherited local limiter, and for ``redis`` / ``hybrid`` a
:class:`~pyproxy.ratelimit.redis_backend.RedisLimiter` of its own on the admin API's loop).
Fanning out to the workers (the change log and SIGUSR1 the pool changes use) would add a reply
path for listing and reach no other instance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from pyproxy.config import RateLimitConfig
from pyproxy.ratelimit.checks import BlockedKey
from pyproxy.ratelimit.local import LocalLimiter

if TYPE_CHECKING:
    from pyproxy.ratelimit.redis_backend import RedisLimiter

__all__ = ["PenaltyBox"]


class PenaltyBox:
    """List and lift the blocks of the whole proxy; see the module doc.

    ``local``: this machine's limiter (made before the workers were forked). ``settings``: the
    ``[ratelimit]`` configuration in force (read at each call, so a reload that changes the mode or
    the Redis settings is followed). Use it from one event loop; :meth:`aclose` on that loop.
    """

    def __init__(self, local: LocalLimiter, settings: Callable[[], RateLimitConfig]) -> None:
        self.local = local
        self.settings = settings
        self._redis: RedisLimiter | None = None
        self._redis_for: tuple[str, bool, float] | None = None

    async def _shared(self) -> RedisLimiter | None:
        """The Redis limiter for the current settings (``None`` in mode ``local``)."""
        rl = self.settings()
        want = (rl.redis_url, rl.cluster, rl.timeout) if rl.mode != "local" and rl.redis_url else None
        if want != self._redis_for:
            await self.aclose()
            if want is not None:
                from pyproxy.ratelimit.redis_backend import RedisLimiter

                self._redis = RedisLimiter.from_url(want[0], cluster=want[1], timeout=want[2])
                self._redis_for = want
        return self._redis

    async def blocked(self) -> tuple[list[BlockedKey], str | None]:
        """Every key blocked now, shortest remaining time first (a key blocked both here and in
        Redis once, with the longer block and the most strikes); and why Redis could not be read (the list then holds
        this machine's blocks only), else ``None``."""
        from_redis: list[BlockedKey] = []
        problem = None
        redis = await self._shared()
        if redis is not None:
            from pyproxy.ratelimit.redis_backend import RedisUnavailable

            try:
                from_redis = await redis.list_blocked()
            except RedisUnavailable as e:
                problem = str(e)
        found: dict[str, BlockedKey] = {}
        for b in [*self.local.list_blocked_sync(), *from_redis]:
            seen = found.get(b.key)
            if seen is not None:
                # hybrid: strikes are this machine's (Redis holds the block's end only)
                longer = b if b.remaining > seen.remaining else seen
                b = replace(longer, strikes=max(b.strikes, seen.strikes))
            found[b.key] = b
        return sorted(found.values(), key=lambda b: (b.remaining, b.key)), problem

    async def unblock(self, key: str) -> tuple[bool, str | None]:
        """Take ``key`` out of the penalty box (forgetting its strikes and violations) in Redis, then
        on this machine: whether it was blocked in either; and why Redis could not be reached (the
        key is then unblocked on this machine only), else ``None``."""
        was = False
        problem = None
        redis = await self._shared()
        if redis is not None:
            from pyproxy.ratelimit.redis_backend import RedisUnavailable

            try:
                was = await redis.unblock(key)
            except RedisUnavailable as e:
                problem = str(e)
        was |= self.local.unblock_sync(key)
        return was, problem

    async def aclose(self) -> None:
        """Close the Redis connections this view opened."""
        redis, self._redis, self._redis_for = self._redis, None, None
        if redis is not None:
            await redis.aclose()

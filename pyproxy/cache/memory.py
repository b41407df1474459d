"""L1: records in this process's memory, in the compiled ``LruCache`` (LRU + TTL + byte budget).

Reads are a dictionary-speed lookup that returns the stored ``bytes`` object itself (``LruCache``
shares values instead of copying them), so decoding a hit makes a ``memoryview`` of the value and
copies nothing. Tags are indexed beside it (tag → keys); entries that ``LruCache`` evicted or
expired stay in that index until a purge or a prune finds them gone, which costs nothing but a few
bytes: deleting a key that is no longer there is a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from pyproxy.core import LruCache

__all__ = ["MemoryTier"]

DEFAULT_MAX_BYTES = 256 << 20


class MemoryTier:
    """An in-process tier over :class:`~pyproxy.core.LruCache`."""

    name = "memory"
    shared = False
    verify = False
    compressed = False

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, max_entries: int | None = None) -> None:
        self.lru = LruCache(max_bytes, max_entries=max_entries)
        self._tagged: dict[str, set[str]] = {}

    def get_now(self, key: str) -> bytes | None:
        """:meth:`get` without a coroutine: the tiered cache's fast path."""
        return self.lru.get(key)

    async def get(self, key: str) -> bytes | None:
        return self.get_now(key)

    def set_now(self, key: str, record: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        if ttl is not None and ttl <= 0:
            self.lru.delete(key)
            return
        self.lru.set(key, record, math.inf if ttl is None else ttl)
        for tag in tags:
            self._tagged.setdefault(tag, set()).add(key)
        if len(self._tagged) > 4 * len(self.lru) + 1024:
            self.prune_tags()

    async def set(self, key: str, record: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        self.set_now(key, record, ttl, tags)

    def delete_now(self, keys: Sequence[str]) -> int:
        return sum(1 for k in keys if self.lru.delete(k))

    async def delete(self, keys: Sequence[str]) -> int:
        return self.delete_now(keys)

    def purge_tags_now(self, tags: Iterable[str]) -> int:
        removed = 0
        for tag in tags:
            removed += self.delete_now(list(self._tagged.pop(tag, ())))
        return removed

    async def purge_tags(self, tags: Iterable[str]) -> int:
        return self.purge_tags_now(tags)

    def prune_tags(self) -> None:
        """Drop index entries of keys the cache no longer holds (evicted or expired)."""
        lru = self.lru
        for tag in list(self._tagged):
            keys = {k for k in self._tagged[tag] if k in lru}
            if keys:
                self._tagged[tag] = keys
            else:
                del self._tagged[tag]

    async def clear(self) -> None:
        self.lru.clear()
        self._tagged.clear()

    async def aclose(self) -> None:
        await self.clear()

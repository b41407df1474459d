"""A tiny pure-Python model of ``LruCache``, for the hypothesis state machine in test_cache.py.

It keeps only *live* entries in recency order and applies the documented rules: a write that needs
room first drops every expired entry, then evicts least recently used live entries; a replaced entry
becomes most recent and is never the one evicted for its own write.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from pyproxy.core import ENTRY_OVERHEAD

Key = str | bytes


def charge(key: Key, value: bytes) -> int:
    raw = key.encode() if isinstance(key, str) else key
    return len(raw) + len(value) + ENTRY_OVERHEAD


@dataclass
class Entry:
    value: bytes
    deadline: float  # math.inf: never expires


class CacheModel:
    def __init__(
        self, max_bytes: int, max_entries: int | None = None, default_ttl: float | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.default_ttl = default_ttl
        self.entries: OrderedDict[tuple[type, Key], Entry] = OrderedDict()  # LRU first

    @staticmethod
    def _k(key: Key) -> tuple[type, Key]:
        return (type(key), key)

    def _expire(self, now: float) -> None:
        for k in [k for k, e in self.entries.items() if e.deadline <= now]:
            del self.entries[k]

    def live_keys_mru(self, now: float) -> list[Key]:
        return [k[1] for k, e in reversed(self.entries.items()) if e.deadline > now]

    def bytes_live(self, now: float) -> int:
        return sum(charge(k[1], e.value) for k, e in self.entries.items() if e.deadline > now)

    def get(self, key: Key, now: float) -> bytes | None:
        k = self._k(key)
        e = self.entries.get(k)
        if e is None or e.deadline <= now:
            self.entries.pop(k, None)
            return None
        self.entries.move_to_end(k)
        return e.value

    def set(self, key: Key, value: bytes, ttl: float | None, now: float) -> bool:
        """False (and no change) when the entry alone exceeds the budget."""
        c = charge(key, value)
        if c > self.max_bytes:
            return False
        if ttl is None:
            ttl = self.default_ttl if self.default_ttl is not None else math.inf
        k = self._k(key)
        self.entries.pop(k, None)
        self.entries[k] = Entry(value, now + ttl)

        def over() -> bool:
            total = sum(charge(kk[1], e.value) for kk, e in self.entries.items())
            return total > self.max_bytes or (
                self.max_entries is not None and len(self.entries) > self.max_entries
            )

        if over():
            self._expire(now)
        while over():
            victim = next(iter(self.entries))
            assert victim != k
            del self.entries[victim]
        return True

    def delete(self, key: Key, now: float) -> bool:
        e = self.entries.pop(self._k(key), None)
        return e is not None and e.deadline > now

    def ttl(self, key: Key, now: float) -> float | None:
        e = self.entries.get(self._k(key))
        if e is None or e.deadline <= now or e.deadline == math.inf:
            return None
        return e.deadline - now

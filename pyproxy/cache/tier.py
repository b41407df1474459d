"""What a cache tier is: a store of encoded records (``entry.py``) by key, with a tag index.

Tiers hold records, not entries: the tiered cache encodes once per form (plain for memory,
compressed for the shared tiers) and decodes what it reads, so corruption is detected in one place.
A tier reports any failure of its backend as :class:`~pyproxy.errors.TierUnavailable`; the tiered
cache then skips it for a while (``tiered.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = ["Tier"]


class Tier(Protocol):
    """A level of the cache (memory, Redis, SQL)."""

    #: Short name for stats, metrics and ``Cache-Status`` ("memory", "redis", "sqlite", "postgres").
    name: str
    #: Seen by every proxy instance (Redis, a PostgreSQL server): a purge made by one instance has
    #: already reached it. Memory and an embedded SQLite file are per instance.
    shared: bool
    #: Records read back must be checked (checksum): everything except memory.
    verify: bool
    #: Records are stored compressed (the tiers that pay per byte).
    compressed: bool

    async def get(self, key: str) -> bytes | None:
        """The record stored under ``key``, ``None`` if absent or expired."""
        ...

    async def set(self, key: str, record: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        """Store ``record`` under ``key`` for ``ttl`` seconds (``None``: no expiry), indexed by
        ``tags``."""
        ...

    async def delete(self, keys: Sequence[str]) -> int:
        """Remove ``keys``; how many were present."""
        ...

    async def purge_tags(self, tags: Iterable[str]) -> int:
        """Remove every entry carrying one of ``tags``; how many were removed."""
        ...

    async def clear(self) -> None:
        """Remove everything this tier holds for this cache."""
        ...

    async def aclose(self) -> None:
        """Release connections and background tasks."""
        ...

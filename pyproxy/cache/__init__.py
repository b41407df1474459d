"""pyproxy's multi-level cache, usable from any asyncio program.

    from pyproxy.cache import TieredCache, MemoryTier, RedisTier, SqlTier

    async with TieredCache([
        MemoryTier(256 << 20),                      # L1: this process
        RedisTier.from_url("redis://127.0.0.1:6379"),  # L2: every instance (cluster=True for a Cluster)
        SqlTier.sqlite("/var/lib/pyproxy/cache.db"),  # L3: survives restarts (SqlTier.postgres(dsn))
    ]) as cache:
        await cache.set("summary:42", b"...", ttl=600, tags=["doc:42"])
        entry = await cache.get("summary:42")        # L1 → L2 → L3, promoted upward on a hit
        await cache.purge_tags("doc:42")             # every tier, every instance

See ``tiered.py`` for the read/write/failure rules and ``entry.py`` for the stored format.
"""

from pyproxy.cache.compression import Compressor, CompressionStats
from pyproxy.cache.entry import FORMAT_VERSION, CacheEntry, decode, encode
from pyproxy.cache.memory import MemoryTier
from pyproxy.cache.redis_tier import RedisTier
from pyproxy.cache.sql import SqlTier
from pyproxy.cache.tags import TagGraph
from pyproxy.cache.tier import Tier
from pyproxy.cache.tiered import CacheHit, PurgeResult, TieredCache, TierStats

__all__ = [
    "FORMAT_VERSION",
    "CacheEntry",
    "CacheHit",
    "CompressionStats",
    "Compressor",
    "MemoryTier",
    "PurgeResult",
    "RedisTier",
    "SqlTier",
    "TagGraph",
    "Tier",
    "TierStats",
    "TieredCache",
    "decode",
    "encode",
]

"""TieredCache over real tiers: memory, Redis and a 3-master Redis Cluster, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from services import RedisCluster, RedisServer

from pyproxy.cache import Compressor, MemoryTier, RedisTier, SqlTier, TieredCache
from pyproxy.cache.sql import MIGRATIONS
from pyproxy.errors import TierUnavailable
from pyproxy.loop import new_event_loop

BODY = b'{"summary": "' + b"lorem ipsum dolor sit amet " * 300 + b'"}'


def run(main: Callable[[], Coroutine[Any, Any, None]], seconds: float = 60) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), seconds)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(bounded())


def three_levels(redis: RedisTier, sql: SqlTier, **options: Any) -> TieredCache:
    options.setdefault("timeout", 2.0)  # generous: a shared 2-core machine; failure tests set their own
    return TieredCache([MemoryTier(1 << 20), redis, sql], **options)


@pytest.fixture(params=["redis+sqlite", "cluster+postgres"])
def tiers(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], tuple[RedisTier, SqlTier]]:
    """A factory of (L2, L3) tiers; each call opens new clients on the same stores."""
    if request.param == "redis+sqlite":
        server: RedisServer = request.getfixturevalue("redis_clean")
        path = tmp_path / "l3.sqlite3"
        return lambda: (RedisTier.from_url(server.url), SqlTier.sqlite(path))
    cluster: RedisCluster = request.getfixturevalue("redis_cluster_clean")
    dsn: str = request.getfixturevalue("postgres_dsn")
    return lambda: (RedisTier.from_url(cluster.url, cluster=True), SqlTier.postgres(dsn))


def test_reads_go_down_the_tiers_and_promote_hits_upward(tiers: Callable[[], tuple[RedisTier, SqlTier]]) -> None:
    async def main() -> None:
        redis, sql = tiers()
        async with three_levels(redis, sql) as cache:
            memory = cache.tiers[0]
            await cache.set("k", BODY, ttl=60, tags=["doc:1"], meta=b"200")
            hit = await cache.lookup("k")
            assert hit is not None and hit.tier == "memory" and bytes(hit.entry.value) == BODY
            assert hit.entry.meta == b"200" and hit.entry.tags == ("doc:1",)

            await memory.clear()
            hit = await cache.lookup("k")
            assert hit is not None and hit.tier == "redis" and bytes(hit.entry.value) == BODY
            assert (await cache.lookup("k")).tier == "memory", "promoted into memory"  # type: ignore[union-attr]

            await memory.clear()
            await redis.clear()
            hit = await cache.lookup("k")
            assert hit is not None and hit.tier == sql.name and bytes(hit.entry.value) == BODY
            await cache.drain()
            assert await redis.get("k") is not None, "promoted into Redis in the background"
            assert (await cache.lookup("k")).tier == "memory"  # type: ignore[union-attr]
            ttl = hit.entry.ttl()
            assert ttl is not None and 55 < ttl <= 60, "promotion keeps the remaining lifetime"

            stats = cache.stats()
            assert stats["tiers"]["memory"]["promotions"] == 2
            assert stats["tiers"][sql.name]["hits"] == 1
            assert stats["compression"]["ratio"] > 5, stats["compression"]
            assert await cache.get("missing") is None
            assert cache.stats()["tiers"][sql.name]["misses"] == 1

    run(main)


def test_entries_expire_in_every_tier(tiers: Callable[[], tuple[RedisTier, SqlTier]]) -> None:
    async def main() -> None:
        redis, sql = tiers()
        async with three_levels(redis, sql) as cache:
            await cache.set("short", b"v", ttl=0.4)
            await cache.set("long", b"v", ttl=30)
            assert await cache.get("short") is not None
            await asyncio.sleep(0.6)
            assert await cache.get("short") is None
            for tier in cache.tiers:
                assert await tier.get("short") is None, tier.name
            assert await cache.get("long") is not None

    run(main)


def test_corrupt_records_in_l2_and_l3_are_dropped_never_served(tiers: Callable[[], tuple[RedisTier, SqlTier]]) -> None:
    async def main() -> None:
        redis, sql = tiers()
        async with three_levels(redis, sql) as cache:
            memory = cache.tiers[0]
            await cache.set("k", BODY, ttl=60)
            good = await redis.get("k")
            assert good is not None
            # L2 holds damaged bytes: L3's intact copy is served, L2's is deleted.
            await memory.clear()
            damaged = bytearray(good)
            damaged[len(damaged) // 2] ^= 0xFF
            await redis.set("k", bytes(damaged), 60, ())
            hit = await cache.lookup("k")
            assert hit is not None and hit.tier == sql.name and bytes(hit.entry.value) == BODY
            assert cache.stats()["tiers"]["redis"]["corrupt"] == 1
            await cache.drain()
            # L2 was repaired by the promotion that followed (an intact record again).
            again = await redis.get("k")
            assert again is not None and again != bytes(damaged)

            # Every copy damaged or foreign: a miss, nothing served, both dropped.
            await memory.clear()
            await redis.set("k", b"not a record", 60, ())
            await sql.set("k", bytes(damaged), 60, ())
            assert await cache.get("k") is None
            await cache.drain()
            assert await redis.get("k") is None and await sql.get("k") is None
            tiers_stats = cache.stats()["tiers"]
            assert tiers_stats["redis"]["corrupt"] == 2 and tiers_stats[sql.name]["corrupt"] == 1

    run(main)


def test_tag_purge_cascades_through_dependencies_and_reaches_another_instance(
    tiers: Callable[[], tuple[RedisTier, SqlTier]],
) -> None:
    async def main() -> None:
        redis_a, sql_a = tiers()
        redis_b, sql_b = tiers()
        a = three_levels(redis_a, sql_a, dependencies=[("page:home", "user:7")])
        b = three_levels(redis_b, sql_b)
        async with a, b:
            await a.set("home", b"home page", ttl=60, tags=["page:home"])
            await a.set("profile", b"profile", ttl=60, tags=["user:7"])
            await a.set("feed", b"feed", ttl=60, tags=["feed"])
            await a.set("other", b"other", ttl=60, tags=["user:8"])
            # A dependency learned at run time by instance B (e.g. from X-Cache-Depends), and a cycle.
            await b.add_dependency("feed", "page:home")
            await b.add_dependency("user:7", "feed")
            for key in ("home", "profile", "feed", "other"):
                assert await b.get(key) is not None  # now in B's memory too
            await asyncio.sleep(0.2)  # B's subscription is live

            started = time.monotonic()
            result = await a.purge_tags("user:7")
            assert result.tags == {"user:7", "page:home", "feed"}
            b_memory = b.tiers[0]
            assert isinstance(b_memory, MemoryTier)
            while any(b_memory.get_now(k) is not None for k in ("home", "profile", "feed")):
                assert time.monotonic() - started < 0.1, "the purge reached instance B within 100 ms"
                await asyncio.sleep(0.002)
            for cache in (a, b):
                for key in ("home", "profile", "feed"):
                    assert await cache.get(key) is None, key
                assert await cache.get("other") is not None
            assert b.purge_messages >= 1

    run(main)


def test_delete_reaches_every_tier_and_instance(tiers: Callable[[], tuple[RedisTier, SqlTier]]) -> None:
    async def main() -> None:
        redis_a, sql_a = tiers()
        redis_b, sql_b = tiers()
        async with three_levels(redis_a, sql_a) as a, three_levels(redis_b, sql_b) as b:
            await a.set("k", b"v", ttl=60)
            await b.set("k", b"v", ttl=60)  # B's own memory (and, for SQLite, B's own file)
            await asyncio.sleep(0.2)
            assert await a.delete("k") >= 3
            deadline = time.monotonic() + 1
            while await b.tiers[0].get("k") is not None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            assert await b.get("k") is None

    run(main)


def test_l3_persists_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "persist.sqlite3"

    async def first() -> None:
        async with TieredCache([MemoryTier(), SqlTier.sqlite(path)], timeout=2) as cache:
            await cache.set("kept", BODY, ttl=3600, tags=["t"])
            await cache.set("gone", BODY, ttl=0.2)

    async def second() -> None:
        await asyncio.sleep(0.3)
        async with TieredCache([MemoryTier(), SqlTier.sqlite(path)], timeout=2) as cache:
            hit = await cache.lookup("kept")
            assert hit is not None and hit.tier == "sqlite" and bytes(hit.entry.value) == BODY
            assert await cache.get("gone") is None
            assert (await cache.purge_tags("t")).removed["sqlite"] == 1

    run(first)
    run(second)


def test_sql_schema_is_created_once_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "schema.sqlite3"

    async def main() -> None:
        async with SqlTier.sqlite(path) as tier:
            assert await tier.schema_version() == len(MIGRATIONS)
        async with SqlTier.sqlite(path) as tier:  # opening again migrates nothing
            assert await tier.schema_version() == len(MIGRATIONS)
            await tier.db.execute(f"UPDATE {tier.schema} SET version = 99")
        with pytest.raises(TierUnavailable, match="newer"):
            await SqlTier.sqlite(path).open()

    run(main)


def test_postgres_schema_migrates_once_with_two_instances_starting_together(postgres_dsn: str) -> None:
    async def main() -> None:
        tiers = [SqlTier.postgres(postgres_dsn) for _ in range(3)]
        await asyncio.gather(*(t.open() for t in tiers))
        assert [await t.schema_version() for t in tiers] == [len(MIGRATIONS)] * 3
        for t in tiers:
            await t.aclose()

    run(main)


def test_expired_rows_are_swept_incrementally(sqlite_path: Path) -> None:
    now = [1000.0]

    async def main() -> None:
        async with SqlTier.sqlite(sqlite_path, sweep_batch=10, sweep_interval=3600, clock=lambda: now[0]) as tier:
            for i in range(35):
                await tier.set(f"k{i}", b"v", 5 if i < 25 else None, ["t"])
            now[0] += 10
            assert await tier.get("k0") is None, "expired rows are never read"
            assert await tier.sweep(max_statements=2) == 20, "a bounded number per sweep"
            assert await tier.sweep() == 5
            assert await tier.count() == 10
            rows = await tier.db.fetch(f"SELECT COUNT(*) FROM {tier.tags}")
            assert rows[0][0] == 10, "tag rows go with their entries"

    run(main)


def test_redis_down_mid_run_degrades_to_the_other_tiers_and_comes_back(redis_clean: RedisServer, sqlite_path: Path) -> None:
    async def main() -> None:
        cache = TieredCache(
            [MemoryTier(), RedisTier.from_url(redis_clean.url, connect_timeout=0.2), SqlTier.sqlite(sqlite_path)],
            timeout=0.5,
            backoff=0.2,
            max_backoff=0.4,
        )
        async with cache:
            await cache.set("a", BODY, ttl=60)
            redis_clean.stop()
            await cache.tiers[0].clear()
            hit = await cache.lookup("a")  # Redis refuses: answered by SQLite
            assert hit is not None and hit.tier == "sqlite" and bytes(hit.entry.value) == BODY
            await cache.set("b", b"written while Redis is down", ttl=60)
            assert bytes((await cache.get("b")).value) == b"written while Redis is down"  # type: ignore[union-attr]
            stats = cache.stats()["tiers"]["redis"]
            assert stats["up"] is False and stats["errors"] + stats["timeouts"] >= 1
            assert stats["skipped"] >= 1, "skipped during its backoff instead of being asked again"

            redis_clean.start()
            await asyncio.sleep(0.5)  # backoff over
            await cache.set("c", b"after", ttl=60)
            await cache.tiers[0].clear()
            hit = await cache.lookup("c")
            assert hit is not None and hit.tier == "redis"
            assert cache.stats()["tiers"]["redis"]["up"] is True

    run(main)


def test_a_tier_that_is_down_at_start_is_opened_later(tmp_path: Path) -> None:
    target = tmp_path / "later"
    path = target / "l3.sqlite3"  # its folder does not exist yet: SQLite cannot open it

    async def main() -> None:
        async with TieredCache([MemoryTier(), SqlTier.sqlite(path)], timeout=2, backoff=0.05, max_backoff=0.1) as cache:
            await cache.set("k", b"v", ttl=60)
            assert cache.stats()["tiers"]["sqlite"]["up"] is False
            target.mkdir()
            await asyncio.sleep(0.15)
            await cache.set("k", b"v2", ttl=60)
            await cache.tiers[0].clear()
            hit = await cache.lookup("k")
            assert hit is not None and hit.tier == "sqlite" and hit.entry.value == b"v2"

    run(main)


def test_compression_setting_changes_do_not_strand_old_records(redis_clean: RedisServer) -> None:
    async def main() -> None:
        async with TieredCache([RedisTier.from_url(redis_clean.url)], compressor=Compressor("lz4"), timeout=2) as old:
            await old.set("k", BODY, ttl=60)
        async with TieredCache([RedisTier.from_url(redis_clean.url)], compressor=Compressor("zstd", level=19), timeout=2) as new:
            entry = await new.get("k")
            assert entry is not None and bytes(entry.value) == BODY

    run(main)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one tier"):
        TieredCache([])
    with pytest.raises(ValueError, match="distinct"):
        TieredCache([MemoryTier(), MemoryTier()])
    with pytest.raises(ValueError, match="identifier"):
        SqlTier.sqlite("x", table_prefix="a; DROP TABLE b")

    async def main() -> None:
        cache = TieredCache([MemoryTier()])
        with pytest.raises(ValueError, match="ttl"):
            await cache.set("k", b"v", ttl=0)

    run(main)

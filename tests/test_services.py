"""The real-service fixtures (tests/services.py, tests/conftest.py) give real, working services.

Redis, a 3-master Redis Cluster and PostgreSQL are real processes on free 127.0.0.1 ports; every check
is made against what the server answers, through the asyncio clients the proxy uses (redis.asyncio,
asyncpg, aiosqlite) on the proxy's production loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import services
from helpers import accepts_connections
from pyproxy.loop import new_event_loop
from services import PostgresServer, RedisCluster, RedisServer, ServiceError, pid_alive

SLOTS = 16384


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on the proxy's production loop (uvloop), bounded in time."""

    async def bounded() -> None:
        await asyncio.wait_for(main(), 20)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(bounded())


def client(server: RedisServer) -> redis.asyncio.Redis:
    # No retries: a server that is down must show as ConnectionError at once, not after backoff.
    return redis.asyncio.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)


def cluster_client(cluster: RedisCluster) -> ClusterClient:
    return ClusterClient(startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes])


# -- single Redis -------------------------------------------------------------------------------------


def test_redis_set_get_and_time(redis_clean: RedisServer) -> None:
    async def main() -> None:
        async with client(redis_clean) as r:
            assert await r.set("greeting", "hello", ex=60) is True
            assert await r.get("greeting") == b"hello"
            assert 0 < await r.ttl("greeting") <= 60
            assert await r.incrby("counter", 5) == 5
            seconds, micros = await r.time()
            assert abs(seconds + micros / 1e6 - time.time()) < 5
            info = await r.info("server")
            assert info["tcp_port"] == redis_clean.port
            assert info["process_id"] == redis_clean.pid

    run(main)


@pytest.mark.parametrize("round_", [1, 2])
def test_redis_clean_starts_empty(redis_clean: RedisServer, round_: int) -> None:
    """Whichever round runs second would see the first one's key without the per-test FLUSHALL."""

    async def main() -> None:
        async with client(redis_clean) as r:
            assert await r.dbsize() == 0
            await r.set(f"left-by-round-{round_}", 1)
            assert await r.dbsize() == 1

    run(main)


def test_redis_down_and_back_on_the_same_port(redis_clean: RedisServer) -> None:
    port, first_pid = redis_clean.port, redis_clean.pid
    assert first_pid is not None

    async def main() -> None:
        async with client(redis_clean) as r:
            await r.set("k", "v")
            redis_clean.stop()
            assert not pid_alive(first_pid)
            assert not accepts_connections(port)
            for _ in range(2):  # the pooled connection is dead, and so is a new one
                with pytest.raises(redis.exceptions.ConnectionError):
                    await r.get("k")

            redis_clean.start()
            assert redis_clean.port == port
            assert redis_clean.pid not in (None, first_pid)
            # The same client reconnects; the data is gone (no persistence).
            assert await r.get("k") is None
            await r.set("k", "again")
            assert await r.get("k") == b"again"

    run(main)


# -- Redis Cluster ------------------------------------------------------------------------------------


def test_cluster_has_three_masters_covering_every_slot(redis_cluster_clean: RedisCluster) -> None:
    cluster = redis_cluster_clean
    assert len(set(cluster.ports)) == 3

    # Straight from a node: CLUSTER SLOTS ranges, each served by one of our ports, cover 0..16383 once.
    with cluster.nodes[0].client() as node:
        slots = node.execute_command("CLUSTER", "SLOTS")
    owners: dict[int, int] = {}
    for start, end, master, *replicas in slots:
        assert replicas == []  # no replicas
        assert int(master[1]) in cluster.ports
        for slot in range(int(start), int(end) + 1):
            assert slot not in owners
            owners[slot] = int(master[1])
    assert sorted(owners) == list(range(SLOTS))
    assert set(owners.values()) == set(cluster.ports)

    async def main() -> None:
        async with cluster_client(cluster) as rc:
            primaries = rc.get_primaries()
            assert sorted(n.port for n in primaries) == sorted(cluster.ports)
            assert rc.get_replicas() == []

    run(main)


def test_cluster_hash_tags_place_keys(redis_cluster_clean: RedisCluster) -> None:
    cluster = redis_cluster_clean

    async def main() -> None:
        async with cluster_client(cluster) as rc:
            tags = [f"user{i}" for i in range(30)]
            for tag in tags:
                await rc.set(f"{{{tag}}}a", "1")
                await rc.set(f"{{{tag}}}b", "2")
                assert rc.keyslot(f"{{{tag}}}a") == rc.keyslot(f"{{{tag}}}b")

            # Ask every node what it really holds.
            holder: dict[bytes, int] = {}
            for node in cluster.nodes:
                async with client(node) as r:
                    for key in await r.keys("*"):
                        holder[key if isinstance(key, bytes) else key.encode()] = node.port
            assert len(holder) == 2 * len(tags)
            for tag in tags:
                assert holder[f"{{{tag}}}a".encode()] == holder[f"{{{tag}}}b".encode()]
            # Different tags spread over different nodes: all three hold some.
            assert set(holder.values()) == set(cluster.ports)

    run(main)


def test_cluster_lua_on_one_slot(redis_cluster_clean: RedisCluster) -> None:
    cluster = redis_cluster_clean
    script = """
        redis.call('SET', KEYS[1], ARGV[1])
        redis.call('INCRBY', KEYS[2], ARGV[2])
        return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
    """

    async def main() -> None:
        async with cluster_client(cluster) as rc:
            assert await rc.eval(script, 2, "{rl:42}state", "{rl:42}count", "x", 3) == [b"x", b"3"]
            assert await rc.eval(script, 2, "{rl:42}state", "{rl:42}count", "y", 4) == [b"y", b"7"]
            # The node that owns the slot refuses keys of two slots in one script.
            owner = rc.get_node_from_key("{a}1")
            assert owner is not None
            assert rc.keyslot("{a}1") != rc.keyslot("{b}1")
            async with redis.asyncio.Redis(host=owner.host, port=int(owner.port)) as direct:
                with pytest.raises(redis.exceptions.ResponseError):
                    await direct.eval("return redis.call('MGET', KEYS[1], KEYS[2])", 2, "{a}1", "{b}1")

    run(main)


# -- PostgreSQL ---------------------------------------------------------------------------------------


def test_postgres_table_round_trip(postgres_dsn: str, postgres: PostgresServer) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(postgres_dsn, timeout=10)
        try:
            assert await conn.fetchval("SELECT current_user") == "pyproxy"
            assert await conn.fetchval("SHOW port") == str(postgres.port)
            await conn.execute("CREATE TABLE entries (key text PRIMARY KEY, body bytea, expires double precision)")
            await conn.executemany(
                "INSERT INTO entries VALUES ($1, $2, $3)", [("/a", b"alpha", 1.5), ("/b", b"\x00\xff", 2.5)]
            )
            rows = await conn.fetch("SELECT key, body, expires FROM entries ORDER BY key")
            assert [tuple(r) for r in rows] == [("/a", b"alpha", 1.5), ("/b", b"\x00\xff", 2.5)]
        finally:
            await conn.close()

    run(main)


@pytest.mark.parametrize("round_", [1, 2])
def test_postgres_dsn_is_a_fresh_database(postgres_dsn: str, round_: int) -> None:
    """Both rounds create the same table: the second would fail if the database were shared."""

    async def main() -> None:
        conn = await asyncpg.connect(postgres_dsn, timeout=10)
        try:
            assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
            await conn.execute("CREATE TABLE marker (round int)")
            await conn.execute("INSERT INTO marker VALUES ($1)", round_)
        finally:
            await conn.close()

    run(main)


def test_postgres_checks_the_password(postgres: PostgresServer) -> None:
    async def main() -> None:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(postgres.dsn.replace(":pyproxy@", ":wrong@"), timeout=10)

    run(main)


# -- SQLite -------------------------------------------------------------------------------------------


def test_aiosqlite_round_trip(sqlite_path: Path) -> None:
    async def main() -> None:
        async with aiosqlite.connect(sqlite_path) as db:
            await db.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, body BLOB)")
            await db.execute("INSERT INTO entries VALUES (?, ?)", ("/a", b"alpha"))
            await db.commit()
        async with aiosqlite.connect(sqlite_path) as db:  # a new connection reads it from the file
            async with db.execute("SELECT key, body FROM entries") as cursor:
                assert [tuple(row) for row in await cursor.fetchall()] == [("/a", b"alpha")]

    run(main)


# -- the services module itself -----------------------------------------------------------------------


def test_a_missing_binary_is_an_error_naming_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(services, "PG_BIN_DIRS", [])
    with pytest.raises(ServiceError, match=r"redis-server not found.*apt-get install -y redis-server"):
        RedisServer()
    with pytest.raises(ServiceError, match=r"redis-cli not found.*apt-get install -y redis-tools"):
        RedisCluster()
    with pytest.raises(ServiceError, match=r"initdb not found.*apt-get install -y postgresql"):
        PostgresServer()


def test_services_stop_exactly_what_they_started() -> None:
    with RedisServer() as server:
        pid, port, directory = server.pid, server.port, server.dir
        assert pid is not None and pid_alive(pid)
    assert not pid_alive(pid)
    assert not accepts_connections(port)
    assert not directory.exists()

    with PostgresServer() as pg:
        postmaster, port, directory = pg.postmaster_pid, pg.port, pg.dir
        assert postmaster is not None and pid_alive(postmaster) and pg.pids == [postmaster]
        assert accepts_connections(port)
    assert not pid_alive(postmaster)
    assert not accepts_connections(port)
    assert not directory.exists()

"""Shared test set-up: make the pure-Python models in this folder importable; real-service fixtures."""

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


# -- Real external services (tests/services.py) ---------------------------------------------------------
#
# Session-scoped, started lazily: a service starts the first time a test asks for it (directly or
# through a per-test fixture below) and is stopped by PID when the session ends. A missing binary or a
# service that does not come up is a test ERROR naming the binary / Debian package, never a skip.
#
#   redis_server   RedisServer: .url .port .host .pid .start() .stop() .flush() .client()
#   redis_cluster  RedisCluster: 3 masters, no replicas; .startup_nodes [(host, port)] .ports .url .nodes
#   postgres       PostgresServer: .dsn (database "pyproxy", role "pyproxy"/"pyproxy", 127.0.0.1)
#                  .create_database(name) -> dsn, .drop_database(name), .sql(statement)
#
# Per-test fixtures give each test a clean state on the shared servers:
#
#   redis_clean          the redis_server, running (restarted if an earlier test left it stopped) and
#                        emptied (FLUSHALL + SCRIPT FLUSH) before the test; restarted after it if the
#                        test stopped it
#   redis_cluster_clean  the redis_cluster after FLUSHALL + SCRIPT FLUSH on every master
#   postgres_dsn         DSN of a new, empty database owned by the test role; dropped (WITH FORCE) after
#   sqlite_path          a path for a new SQLite file in the test's tmp_path

from services import PostgresServer, RedisCluster, RedisServer  # noqa: E402  (needs the path above)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_clean(redis_server: RedisServer) -> Iterator[RedisServer]:
    redis_server.start()  # no-op while it runs
    redis_server.flush()
    yield redis_server
    redis_server.start()  # a test that stopped it leaves it running for the next


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_clean(redis_cluster: RedisCluster) -> RedisCluster:
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


_database_numbers = itertools.count(1)


@pytest.fixture
def postgres_dsn(postgres: PostgresServer) -> Iterator[str]:
    name = f"test_{next(_database_numbers)}"
    dsn = postgres.create_database(name)
    yield dsn
    postgres.drop_database(name)


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "pyproxy-test.sqlite3"

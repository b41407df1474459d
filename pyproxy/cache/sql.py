"""L3: records in a database that survives restarts — SQLite embedded (default) or PostgreSQL.

Two tables (names under a prefix, default ``pyproxy_cache``)::

    {prefix}_entries (key TEXT PRIMARY KEY, record BLOB, stored_at, expires_at)   -- expires_at NULL: never
    {prefix}_tags    (tag, key → entries ON DELETE CASCADE, PRIMARY KEY (tag, key))

plus ``{prefix}_schema (version)``. On start the schema is created or migrated forward in one
transaction (``MIGRATIONS``; PostgreSQL takes an advisory lock so two instances starting together
do not race; SQLite's ``BEGIN IMMEDIATE`` serialises them). Expired rows are never returned (reads
compare ``expires_at`` with the clock) and are deleted incrementally by a background sweep:
``sweep_batch`` rows per statement, a few statements per ``sweep_interval`` — never a full-table
delete that would stall other writers.

SQLite runs on ``aiosqlite`` (its own thread, WAL journal, ``synchronous=NORMAL``), PostgreSQL on an
``asyncpg`` pool. One small adapter per driver runs the same SQL (``?`` placeholders are rewritten to
``$n`` for PostgreSQL). Any driver or connection failure is raised as
:class:`~pyproxy.errors.TierUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

from pyproxy.errors import TierUnavailable

__all__ = ["MIGRATIONS", "SqlTier"]

log = logging.getLogger("pyproxy.cache.sql")

_FAILURES = (sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ConnectionError)

#: Schema versions, each a list of statements; ``{entries}``, ``{tags}``, ``{blob}``, ``{real}`` are
#: filled per database. Append new versions; never edit a released one.
MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE {entries} (key TEXT PRIMARY KEY, record {blob} NOT NULL,"
        " stored_at {real} NOT NULL, expires_at {real})",
        "CREATE INDEX {entries}_expires ON {entries} (expires_at)",
        "CREATE TABLE {tags} (tag TEXT NOT NULL,"
        " key TEXT NOT NULL REFERENCES {entries} (key) ON DELETE CASCADE, PRIMARY KEY (tag, key))",
        "CREATE INDEX {tags}_key ON {tags} (key)",
    ],
]

_IN_CHUNK = 500  # keys per "IN (...)" list: SQLite allows 32766 parameters, keep statements small


class _Sqlite:
    """aiosqlite with one connection; a lock keeps a transaction's statements together."""

    blob, real = "BLOB", "REAL"

    def __init__(self, conn: aiosqlite.Connection, lock: asyncio.Lock | None = None) -> None:
        self.conn = conn
        self.lock = asyncio.Lock() if lock is None else lock
        # A transaction's own handle (lock given) runs under the lock its transaction holds;
        # every other statement, from any task, takes the lock first, so none slips into it.
        self._guard: Any = nullcontext() if lock is not None else self.lock

    @classmethod
    async def open(cls, path: str | Path) -> _Sqlite:
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON", "busy_timeout = 2000"):
            await conn.execute(f"PRAGMA {pragma}")
        return cls(conn)

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        async with self._guard:
            return list(await self.conn.execute_fetchall(sql, args))

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._guard:
            cursor = await self.conn.execute(sql, args)
            return cursor.rowcount

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Sqlite]:
        async with self.lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Sqlite(self.conn, self.lock)
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")

    async def close(self) -> None:
        await self.conn.close()


_PLACEHOLDER = re.compile(r"\?")


def _numbered(sql: str) -> str:
    """``?`` placeholders → PostgreSQL's ``$1, $2, ...``."""
    counter = iter(range(1, 1 << 20))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _Postgres:
    """An asyncpg pool; a transaction holds one of its connections."""

    blob, real = "BYTEA", "DOUBLE PRECISION"

    def __init__(self, pool: asyncpg.Pool, conn: asyncpg.Connection | None = None) -> None:
        self.pool = pool
        self.conn = conn

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 1, max_size: int = 4) -> _Postgres:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
        return cls(pool)

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        runner = self.conn if self.conn is not None else self.pool
        return list(await runner.fetch(_numbered(sql), *args))

    async def execute(self, sql: str, *args: Any) -> int:
        runner = self.conn if self.conn is not None else self.pool
        status = await runner.execute(_numbered(sql), *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Postgres]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield _Postgres(self.pool, conn)

    async def close(self) -> None:
        await self.pool.close()


class SqlTier:
    """A tier in SQLite (``SqlTier.sqlite(path)``) or PostgreSQL (``SqlTier.postgres(dsn)``).

    Open it with ``await tier.open()`` (or ``async with``): that migrates the schema and starts the
    expiry sweep.
    """

    verify = True
    compressed = True

    def __init__(
        self,
        connect: Any,
        *,
        name: str,
        shared: bool,
        table_prefix: str = "pyproxy_cache",
        sweep_interval: float = 1.0,
        sweep_batch: int = 500,
        clock: Any = time.time,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", table_prefix):
            raise ValueError(f"table_prefix must be a plain SQL identifier, got {table_prefix!r}")
        if sweep_interval <= 0 or sweep_batch < 1:
            raise ValueError("sweep_interval must be > 0 and sweep_batch >= 1")
        self.name = name
        self.shared = shared
        self._connect = connect
        self._db: _Sqlite | _Postgres | None = None
        self.entries = f"{table_prefix}_entries"
        self.tags = f"{table_prefix}_tags"
        self.schema = f"{table_prefix}_schema"
        self.sweep_interval = sweep_interval
        self.sweep_batch = sweep_batch
        self.clock = clock
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    def sqlite(cls, path: str | Path, **options: Any) -> SqlTier:
        """An embedded SQLite file (per instance: not shared between proxy instances)."""
        return cls(lambda: _Sqlite.open(path), name="sqlite", shared=False, **options)

    @classmethod
    def postgres(cls, dsn: str, *, min_size: int = 1, max_size: int = 4, **options: Any) -> SqlTier:
        """A PostgreSQL database every proxy instance shares."""
        return cls(lambda: _Postgres.open(dsn, min_size=min_size, max_size=max_size), name="postgres", shared=True, **options)

    # -- life cycle ------------------------------------------------------------------------------

    async def open(self) -> SqlTier:
        """Connect, create or migrate the schema, start the expiry sweep. Idempotent."""
        if self._db is not None:
            return self
        db = None
        try:
            db = await self._connect()
            await self._migrate(db)
        except BaseException as e:
            if db is not None:
                await db.close()
            if isinstance(e, _FAILURES):
                raise TierUnavailable(f"{self.name} cache tier could not open: {e}") from e
            raise
        if self._db is not None:  # opened meanwhile by a concurrent call
            await db.close()
            return self
        self._db = db  # usable only once migrated: nothing reads a half-made schema
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name=f"pyproxy-{self.name}-sweep")
        return self

    async def __aenter__(self) -> SqlTier:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> _Sqlite | _Postgres:
        if self._db is None:
            raise TierUnavailable(f"{self.name} cache tier is not open (await tier.open())")
        return self._db

    async def schema_version(self) -> int:
        rows = await self.db.fetch(f"SELECT version FROM {self.schema}")
        return int(rows[0][0]) if rows else 0

    async def _migrate(self, db: _Sqlite | _Postgres) -> None:
        async with db.transaction() as tx:
            if isinstance(tx, _Postgres):
                # Before anything else: two CREATE TABLE IF NOT EXISTS racing each other fail in
                # PostgreSQL ("type ... already exists"); the lock makes the instances take turns.
                await tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", self.schema)
            await tx.execute(f"CREATE TABLE IF NOT EXISTS {self.schema} (version INTEGER NOT NULL)")
            rows = await tx.fetch(f"SELECT version FROM {self.schema}")
            version = int(rows[0][0]) if rows else 0
            if version > len(MIGRATIONS):
                raise TierUnavailable(
                    f"{self.name} cache schema is version {version}, newer than this build's {len(MIGRATIONS)}"
                )
            names = {"entries": self.entries, "tags": self.tags, "blob": db.blob, "real": db.real}
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    await tx.execute(statement.format(**names))
            if version < len(MIGRATIONS):
                if rows:
                    await tx.execute(f"UPDATE {self.schema} SET version = ?", len(MIGRATIONS))
                else:
                    await tx.execute(f"INSERT INTO {self.schema} (version) VALUES (?)", len(MIGRATIONS))
                log.info("%s cache schema migrated from version %d to %d", self.name, version, len(MIGRATIONS))

    # -- the tier ----------------------------------------------------------------------------------

    async def _guard(self, what: str, op: Callable[[_Sqlite | _Postgres], Awaitable[Any]]) -> Any:
        """Run ``op`` on the database, opening the tier first if it could not open before (a
        database down at start is used once it answers); driver failures as TierUnavailable."""
        if self._db is None:
            await self.open()
        assert self._db is not None
        try:
            return await op(self._db)
        except _FAILURES as e:
            raise TierUnavailable(f"{self.name} {what} failed: {e}") from e

    async def get(self, key: str) -> bytes | None:
        rows = await self._guard(
            "read",
            lambda db: db.fetch(
                f"SELECT record FROM {self.entries} WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)",
                key,
                self.clock(),
            ),
        )
        return bytes(rows[0][0]) if rows else None

    async def set(self, key: str, record: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        now = self.clock()
        if ttl is not None and ttl <= 0:
            await self.delete([key])
            return
        expires = None if ttl is None else now + ttl

        async def write(db: _Sqlite | _Postgres) -> None:
            async with db.transaction() as tx:
                await tx.execute(
                    f"INSERT INTO {self.entries} (key, record, stored_at, expires_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET record = excluded.record,"
                    " stored_at = excluded.stored_at, expires_at = excluded.expires_at",
                    key,
                    record,
                    now,
                    expires,
                )
                await tx.execute(f"DELETE FROM {self.tags} WHERE key = ?", key)
                for tag in dict.fromkeys(tags):
                    await tx.execute(f"INSERT INTO {self.tags} (tag, key) VALUES (?, ?)", tag, key)

        await self._guard("write", write)

    async def _delete_where_in(self, column: str, values: Sequence[str]) -> int:
        removed = 0
        for i in range(0, len(values), _IN_CHUNK):
            chunk = values[i : i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            if column == "key":
                sql = f"DELETE FROM {self.entries} WHERE key IN ({marks})"
            else:
                sql = f"DELETE FROM {self.entries} WHERE key IN (SELECT key FROM {self.tags} WHERE tag IN ({marks}))"
            removed += await self._guard("delete", lambda db: db.execute(sql, *chunk))
        return removed

    async def delete(self, keys: Sequence[str]) -> int:
        return await self._delete_where_in("key", list(keys))

    async def purge_tags(self, tags: Iterable[str]) -> int:
        return await self._delete_where_in("tag", list(dict.fromkeys(tags)))

    async def clear(self) -> None:
        await self._guard("clear", lambda db: db.execute(f"DELETE FROM {self.entries}"))

    async def count(self) -> int:
        """Rows stored, expired ones not swept yet included."""
        rows = await self._guard("count", lambda db: db.fetch(f"SELECT COUNT(*) FROM {self.entries}"))
        return int(rows[0][0])

    async def sweep(self, max_statements: int = 8) -> int:
        """Delete expired rows, ``sweep_batch`` per statement, at most ``max_statements`` statements
        (stops early once a statement finds fewer than a batch); how many were deleted."""
        total = 0
        for _ in range(max_statements):
            n = await self._guard(
                "sweep",
                lambda db: db.execute(
                    f"DELETE FROM {self.entries} WHERE key IN (SELECT key FROM {self.entries}"
                    " WHERE expires_at <= ? LIMIT ?)",
                    self.clock(),
                    self.sweep_batch,
                ),
            )
            total += n
            if n < self.sweep_batch:
                break
        return total

    async def _sweep_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
                failing = False
            except TierUnavailable as e:
                if not failing:
                    log.warning("%s cache expiry sweep failed (will retry): %s", self.name, e)
                failing = True

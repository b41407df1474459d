"""``TieredCache``: memory → Redis → database, read top-down with promotion, written through.

Reads try each tier in order; a hit in a lower tier is copied into the tiers above it (memory at once,
the others in the background, so the reader does not wait for them). Writes go to every tier (or the
ones named) concurrently. Each record is encoded once per form: plain for memory, compressed for the
tiers that store bytes remotely (``entry.py``, ``compression.py``).

Corruption: a record that fails its checksum or format check is counted, deleted from that tier in
the background and treated as a miss there — the next tier (or the origin) answers; it is never
served.

Failures: every operation on a remote tier runs under ``timeout``; a tier that fails or times out is
skipped for a backoff (``backoff`` × 2^(failures−1), capped at ``max_backoff``, with jitter), logged
once per incident and counted; the cache keeps serving from the others and tries the tier again when
its backoff ends. Memory never fails and is never skipped.

Invalidation: ``delete`` and ``purge_tags`` act on every tier, and — when a Redis tier is present —
publish the purge so every other instance drops what only it holds (its memory, an embedded SQLite
file) as soon as the message arrives. Tags cascade through dependencies (``tags.py``), including
dependencies other instances recorded in Redis.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import random
import time
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from pyproxy.cache.compression import Compressor
from pyproxy.cache.entry import CacheEntry, decode, encode
from pyproxy.cache.memory import MemoryTier
from pyproxy.cache.redis_tier import RedisTier
from pyproxy.cache.sql import SqlTier
from pyproxy.cache.tags import TagGraph
from pyproxy.cache.tier import Tier
from pyproxy.errors import CorruptEntry, TierUnavailable
from pyproxy.resilience.timeouts import SharedTimeout

__all__ = ["CacheHit", "PurgeResult", "TierStats", "TieredCache"]

log = logging.getLogger("pyproxy.cache")


@dataclass(slots=True)
class TierStats:
    """What happened at one tier (all counters since the cache was made)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    promotions: int = 0
    corrupt: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0
    purged: int = 0
    up: bool = True


class CacheHit(NamedTuple):
    entry: CacheEntry
    tier: str  # the name of the tier that had it ("memory", "redis", "sqlite", "postgres")


@dataclass
class PurgeResult:
    tags: set[str] = field(default_factory=set)  # the tags purged, dependencies included
    removed: dict[str, int] = field(default_factory=dict)  # tier name → entries removed there


class _Skipped(Exception):
    """Internal: the tier is in its backoff, or just failed."""


class _TierState:
    """A tier with its counters and backoff."""

    def __init__(self, tier: Tier) -> None:
        self.tier = tier
        self.memory = tier if isinstance(tier, MemoryTier) else None
        self.stats = TierStats()
        self.failures = 0
        self.skip_until = 0.0


class TieredCache:
    """A cache over ``tiers`` (first = fastest), usable from any asyncio program.

    ``compressor`` compresses records for the tiers that store them compressed (default zstd,
    values of 1 KiB and more). ``dependencies`` are ``(dependent, on)`` tag pairs (configuration);
    more can be added with :meth:`add_dependency`. Use it as ``async with TieredCache(...) as c`` or
    call :meth:`start` / :meth:`aclose`.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        compressor: Compressor | None = None,
        timeout: float = 0.1,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        dependencies: Iterable[tuple[str, str]] = (),
        clock: Callable[[], float] = time.time,
        instance_id: str | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a TieredCache needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be distinct, got {names}")
        if timeout <= 0 or backoff <= 0 or max_backoff < backoff:
            raise ValueError("timeout and backoff must be > 0 and max_backoff >= backoff")
        self._states = [_TierState(t) for t in tiers]
        self.compressor = compressor if compressor is not None else Compressor("zstd")
        # one loop timer for all remote-tier calls in flight (asyncio.timeout: one per call)
        self._call_timeout = SharedTimeout(timeout)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.graph = TagGraph(dependencies)
        self.clock = clock
        self.instance_id = instance_id or uuid.uuid4().hex
        self._redis = next((t for t in tiers if isinstance(t, RedisTier)), None)
        self._background: set[asyncio.Task[Any]] = set()
        self._decoded: dict[str, tuple[bytes, CacheEntry]] = {}  # memory records, decoded
        self._listener: asyncio.Task[None] | None = None
        self.purge_messages = 0

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> TieredCache:
        """Open the SQL tiers and subscribe to other instances' purges. A tier that cannot open
        now is skipped (backoff) and opened again on its next use."""
        for st in self._states:
            if isinstance(st.tier, SqlTier):
                try:
                    await st.tier.open()
                except TierUnavailable as e:
                    self._failed(st, e, timeout=False)
        if self._redis is not None and self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="pyproxy-cache-purges")
        return self

    async def __aenter__(self) -> TieredCache:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening, let background writes finish (bounded), close every tier."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        await self.drain()
        for st in self._states:
            try:
                await st.tier.aclose()
            except TierUnavailable as e:
                log.warning("closing cache tier %s: %s", st.tier.name, e)

    async def drain(self, timeout: float = 2.0) -> None:
        """Wait (up to ``timeout``) for background promotions and repairs to finish."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)

    @property
    def timeout(self) -> float:
        """The bound of each remote-tier call, in seconds."""
        return self._call_timeout.seconds

    @property
    def tiers(self) -> list[Tier]:
        return [st.tier for st in self._states]

    # -- guarded calls ----------------------------------------------------------------------------

    async def _call(self, st: _TierState, op: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``op`` on a remote tier under the timeout; raise :class:`_Skipped` if the tier is in
        its backoff or fails now (counted, logged once per incident, backoff started)."""
        now = time.monotonic()
        if now < st.skip_until:
            st.stats.skipped += 1
            raise _Skipped
        try:
            with self._call_timeout.bound():
                result = await op()
        except TimeoutError as e:
            self._failed(st, e, timeout=True)
            raise _Skipped from None
        except TierUnavailable as e:
            self._failed(st, e, timeout=False)
            raise _Skipped from None
        if st.failures:
            log.info("cache tier %s is back after %d failure(s)", st.tier.name, st.failures)
            st.failures = 0
            st.stats.up = True
        return result

    def _backoff(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row: doubling, capped (the exponent too: a
        float overflows past 2**1023, some 8 hours into an outage at a 30 s cap)."""
        return min(self.max_backoff, self.backoff * 2.0 ** min(failures - 1, 62))

    def _failed(self, st: _TierState, error: BaseException, *, timeout: bool) -> None:
        if timeout:
            st.stats.timeouts += 1
        else:
            st.stats.errors += 1
        st.failures += 1
        st.stats.up = False
        delay = self._backoff(st.failures) * random.uniform(0.8, 1.0)
        st.skip_until = time.monotonic() + delay
        if st.failures == 1:
            what = f"timed out after {self.timeout * 1000:.0f} ms" if timeout else f"failed: {error}"
            log.warning("cache tier %s %s; serving from the other tiers, retrying in %.2f s", st.tier.name, what, delay)

    def _in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- reads --------------------------------------------------------------------------------------

    def tier_stats(self, tier: Tier) -> TierStats:
        """``tier``'s counters, for a caller that counts what it serves from the tier itself (the
        HTTP cache's compiled hit path keeps them at hand). ``KeyError`` for another tier."""
        for st in self._states:
            if st.tier is tier:
                return st.stats
        raise KeyError(f"{tier!r} is not a tier of this cache")

    async def get(self, key: str) -> CacheEntry | None:
        """The entry for ``key`` from the first tier that has it, or ``None``."""
        hit = await self.lookup(key)
        return None if hit is None else hit.entry

    async def lookup(self, key: str) -> CacheHit | None:
        """As :meth:`get`, also naming the tier that answered."""
        now = self.clock()
        for level, st in enumerate(self._states):
            tier = st.tier
            if st.memory is not None:
                record = st.memory.get_now(key)
            else:
                try:
                    record = await self._call(st, lambda t=tier: t.get(key))  # type: ignore[misc]
                except _Skipped:
                    continue
            if record is None:
                st.stats.misses += 1
                continue
            try:
                if st.memory is not None:
                    # Memory returns the stored object itself: decoded once, kept by identity.
                    memo = self._decoded.get(key)
                    if memo is not None and memo[0] is record:
                        entry = memo[1]
                    else:
                        entry = decode(record, verify=False)
                        if len(self._decoded) >= 4096:
                            self._decoded.clear()
                        self._decoded[key] = (record, entry)
                else:
                    entry = decode(record, verify=tier.verify)
            except CorruptEntry as e:
                st.stats.corrupt += 1
                log.warning("dropping a corrupt %s cache entry for %r: %s", tier.name, key, e)
                self._repair(st, key)
                continue
            if entry.expired(now):
                st.stats.misses += 1
                continue
            st.stats.hits += 1
            if level:
                self._promote(key, entry, record, self._states[:level], now)
            return CacheHit(entry, tier.name)
        return None

    def _repair(self, st: _TierState, key: str) -> None:
        if st.memory is not None:
            st.memory.delete_now([key])
            return

        async def drop() -> None:
            try:
                await self._call(st, lambda: st.tier.delete([key]))
            except _Skipped:
                pass

        self._in_background(drop())

    def _promote(self, key: str, entry: CacheEntry, record: bytes, upper: list[_TierState], now: float) -> None:
        ttl = entry.ttl(now)
        plain: bytes | None = None
        for st in upper:
            st.stats.promotions += 1
            if st.memory is not None:
                # A record read from a compressed tier is re-encoded plain for memory (reads there
                # must not pay for decompression); an uncompressed one is valid as it is.
                if plain is None:
                    plain = record if _uncompressed(record) else encode(entry)
                st.memory.set_now(key, plain, ttl, entry.tags)
            else:
                self._in_background(self._write(st, key, record if st.tier.compressed else plain or encode(entry), ttl, entry.tags))

    # -- writes -------------------------------------------------------------------------------------

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        meta: bytes = b"",
        tiers: Collection[str] | None = None,
    ) -> None:
        """Store ``value`` under ``key`` in every tier (or the ``tiers`` named) for ``ttl`` seconds
        (``None``: until evicted or purged). A tier that is down is skipped (counted)."""
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds or None, got {ttl}")
        now = self.clock()
        entry = CacheEntry(value, now, None if ttl is None else now + ttl, tuple(dict.fromkeys(tags)), meta)
        targets = [st for st in self._states if tiers is None or st.tier.name in tiers]
        # Encoded once per form; a value the compressor leaves as it is has one form for all.
        packed = encode(entry, self.compressor) if any(st.tier.compressed for st in targets) else None
        plain: bytes | None = None
        writes = []
        for st in targets:
            if st.tier.compressed:
                assert packed is not None
                record = packed
            else:
                if plain is None:
                    plain = packed if packed is not None and _uncompressed(packed) else encode(entry)
                record = plain
            if st.memory is not None:
                st.memory.set_now(key, record, ttl, entry.tags)
                st.stats.writes += 1
            else:
                writes.append(self._write(st, key, record, ttl, entry.tags))
        if writes:
            await asyncio.gather(*writes)

    async def _write(self, st: _TierState, key: str, record: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        try:
            await self._call(st, lambda: st.tier.set(key, record, ttl, tags))
            st.stats.writes += 1
        except _Skipped:
            pass

    # -- invalidation ---------------------------------------------------------------------------------

    async def delete(self, *keys: str) -> int:
        """Remove ``keys`` from every tier here and, through Redis, from every other instance's own
        tiers; how many entries were removed here (all tiers counted)."""
        removed = await self._on_all(lambda t: t.delete(list(keys)), local_only=False)
        await self._publish({"keys": list(keys)})
        return sum(removed.values())

    async def purge_tags(self, *tags: str) -> PurgeResult:
        """Remove every entry carrying one of ``tags`` or a tag depending on them (transitively),
        in every tier here and every other instance's own tiers."""
        closure = await self.graph.closure(tags, self._shared_dependents if self._redis is not None else None)
        removed = await self._on_all(lambda t: t.purge_tags(closure), local_only=False)
        for st in self._states:
            st.stats.purged += removed.get(st.tier.name, 0)
        await self._publish({"tags": sorted(closure)})
        return PurgeResult(closure, removed)

    async def add_dependency(self, dependent: str, on: str) -> None:
        """Purging ``on`` will also purge ``dependent`` — here and, through Redis, everywhere."""
        self.graph.add(dependent, on)
        redis = self._redis_state()
        if redis is not None:
            try:
                await self._call(redis, lambda: self._redis.add_dependency(dependent, on))  # type: ignore[union-attr]
            except _Skipped:
                pass

    async def clear(self) -> None:
        """Empty every tier (this cache's keys only in the shared ones)."""
        await self._on_all(lambda t: t.clear(), local_only=False)

    def _redis_state(self) -> _TierState | None:
        return next((st for st in self._states if st.tier is self._redis), None)

    async def _shared_dependents(self, tags: list[str]) -> builtins.set[str]:
        redis = self._redis_state()
        if redis is None:
            return set()
        try:
            return await self._call(redis, lambda: self._redis.dependents(tags))  # type: ignore[no-any-return, union-attr]
        except _Skipped:
            return set()

    async def _on_all(self, op: Callable[[Tier], Coroutine[Any, Any, Any]], *, local_only: bool) -> dict[str, int]:
        done: dict[str, int] = {}

        async def one(st: _TierState) -> None:
            try:
                result = await (op(st.tier) if st.memory is not None else self._call(st, lambda: op(st.tier)))
            except _Skipped:
                return
            done[st.tier.name] = int(result or 0)

        await asyncio.gather(*(one(st) for st in self._states if not (local_only and st.tier.shared)))
        return done

    async def _publish(self, message: dict[str, object]) -> None:
        redis = self._redis_state()
        if redis is None:
            return
        message["origin"] = self.instance_id
        try:
            await self._call(redis, lambda: self._redis.publish(message))  # type: ignore[union-attr]
        except _Skipped:
            log.warning("a purge could not be published (Redis down): other instances keep their copies until they expire")

    async def _listen(self) -> None:
        """Apply other instances' purges to the tiers only this instance holds."""
        assert self._redis is not None
        failures = 0
        while True:
            try:
                async for message in self._redis.messages():
                    failures = 0
                    if message.get("origin") == self.instance_id:
                        continue
                    self.purge_messages += 1
                    keys = [k for k in message.get("keys", ()) if isinstance(k, str)]
                    tags = [t for t in message.get("tags", ()) if isinstance(t, str)]
                    if keys:
                        await self._on_all(lambda t: t.delete(keys), local_only=True)
                    if tags:
                        await self._on_all(lambda t: t.purge_tags(tags), local_only=True)
            except TierUnavailable as e:
                failures += 1
                delay = self._backoff(failures)
                if failures == 1:
                    log.warning("purge subscription lost (%s); resubscribing in %.1f s", e, delay)
                await asyncio.sleep(delay)
            except Exception:  # a bug must not silently end purges for the life of the process
                log.exception("purge subscription failed unexpectedly; resubscribing in %.1f s", self.max_backoff)
                await asyncio.sleep(self.max_backoff)

    # -- observing ---------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters per tier, compression, and purge messages applied from other instances."""
        c = self.compressor.stats
        return {
            "tiers": {st.tier.name: asdict(st.stats) for st in self._states},
            "compression": {
                "codec": self.compressor.codec,
                "level": self.compressor.level,
                "raw_bytes": c.raw_bytes,
                "stored_bytes": c.stored_bytes,
                "ratio": c.ratio,
            },
            "purge_messages": self.purge_messages,
        }


def _uncompressed(record: bytes) -> bool:
    return len(record) > 4 and record[4] == 0  # the codec byte (entry.py)

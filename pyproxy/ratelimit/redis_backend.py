"""Rate limits shared through Redis or Redis Cluster: every check of a request in one atomic step.

:class:`RedisLimiter` decides a request's checks (global, route, user key...) with one Lua script
(``pyproxy.ratelimit.lua``) that reads Redis's clock (``TIME``: the proxies' clocks do not matter),
evaluates every check, and charges all of them only if all admit the request. Two algorithms, the
same arithmetic as the local ``pyproxy.core.SlidingWindow`` (``core_rs/src/window.rs``), in
microseconds:

- ``sliding_window_counter``: two fixed-window counts per key (O(1) memory), the previous one
  weighted: estimate ``⌊P·(W−e)/W⌋ + C``, allowed iff ``estimate + cost ≤ L`` (Cloudflare's
  "counting things, a lot of different things"; HAProxy's ``http_req_rate``).
- ``sliding_log``: a sorted set of the hits in the last window (exact: never more than ``L`` in any
  window ``W``; O(log N) per check, up to ``L`` members per key).

Keys expire once they can no longer change a decision. ``retry_after`` is exact (the wait until
the same request would pass if no other came). The penalty box (:class:`~pyproxy.ratelimit.Penalty`)
is evaluated in the same script: a blocked key is denied without charging anything, and violations
are counted and turned into (doubling) blocks atomically.

Redis Cluster: each check's key is its own hash tag (``pyproxy:rl:{user:alice}:c:20:1000000``), so
all the state of one key (its limits, block and violations) shares a slot, while different keys
spread over the cluster. A global or route key is one key for all requests, so a per-request hash
tag (putting a request's keys together) is not an option: it would split the global count per
user. A request whose keys fall in several slots runs one script per slot, concurrently (one round
trip of latency), each atomic on its slot; if any slot denies, the slots that charged are refunded
by a second script before :meth:`RedisLimiter.hit` returns (only on denials, one more round trip).
Semantics: no limit is ever exceeded (each slot's check-and-charge is atomic); all-or-none holds
once ``hit`` returns; between the charge and the refund (one round trip) other requests may see
the refunded units still counted, so a concurrent request can be denied spuriously — the race errs
on the safe side, never by over-admitting. A request whose keys share one slot (or any request on
a single server) is decided in exactly one atomic script.

Failures: every operation is bounded by ``timeout``; a timeout, a connection error or a cluster
that is down raises :class:`RedisUnavailable`, is counted, logged once per incident (WARNING at
the first failure, INFO when Redis answers again), and starts a backoff during which calls fail
fast without a round trip; after the backoff one call probes Redis (the others keep failing fast)
and doubles the backoff (up to ``backoff_max``) if it fails. What to do instead (``on_redis_error``
= local / deny / allow) is the caller's policy.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import os
import random
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    ClusterError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from pyproxy.errors import PyproxyError
from pyproxy.ratelimit import lua
from pyproxy.ratelimit.checks import BlockedKey, Check, CheckResult, Decision, Penalty, TupleMemo, add_penalty
from pyproxy.resilience.timeouts import SharedTimeout

__all__ = ["LATENCY_BOUNDS", "BlockedKey", "RedisLimiter", "RedisLimiterStats", "RedisUnavailable"]

T = TypeVar("T")

log = logging.getLogger("pyproxy.ratelimit.redis")

#: Upper bounds (seconds) of the buckets of the operation latency histogram (plus one for +Inf).
LATENCY_BOUNDS: Final = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

_MAX_INT: Final = 2**53

# HIT's reply: allowed, now, five numbers per counter, four per penalty key (lua.HIT)
_Reply = tuple[int, ...]
_KIND = {"sliding_window_counter": "c", "sliding_log": "l"}

# Errors that mean "Redis is not there (for now)": they start an incident and a backoff. Other
# Redis errors (a script error, a key of the wrong type) fail the call but say nothing about the
# server's availability.
_OUTAGE: Final = (
    RedisConnectionError,  # includes BusyLoadingError, MaxConnectionsError
    RedisTimeoutError,
    TimeoutError,  # asyncio.timeout
    OSError,
    ClusterError,  # ClusterDownError, MasterDownError
    RedisClusterException,  # SlotNotCoveredError, cluster not initialised
    TryAgainError,
    ReadOnlyError,  # a replica after a failover, before the client follows
    OutOfMemoryError,
)


class RedisUnavailable(PyproxyError):
    """Redis did not answer in time, is unreachable, or refused the operation.

    ``cause`` is the underlying exception (``None`` when failing fast during a backoff);
    ``fast`` is true when no round trip was attempted.
    """

    def __init__(self, message: str, cause: BaseException | None = None, fast: bool = False) -> None:
        super().__init__(message)
        self.cause = cause
        self.fast = fast


@dataclass(frozen=True, slots=True)
class RedisLimiterStats:
    """Counters of a :class:`RedisLimiter` since it was made (for metrics).

    ``round_trips``: Redis commands sent (scripts per slot, script loads, refunds, admin calls).
    ``errors``: operations that failed with a round trip; ``fast_failures``: failed without one
    (backoff); ``incidents``: times Redis became unavailable. ``refunds``: cluster compensations
    (requests whose charged slots were refunded); ``refund_failures``: slot refunds that failed.
    ``latency_counts``: operations per bucket of ``LATENCY_BOUNDS`` (the last is +Inf), not
    cumulative; ``latency_sum`` in seconds.
    """

    healthy: bool
    round_trips: int
    errors: int
    fast_failures: int
    incidents: int
    script_loads: int
    refunds: int
    refund_failures: int
    last_latency: float | None
    latency_counts: tuple[int, ...]
    latency_sum: float


@dataclass(slots=True)
class _Item:
    """A distinct counter of a request: what the script gets for one check (or merged checks)."""

    rkey: str
    kind: str  # "c" counter, "l" log
    spec: tuple[int, int, int, int]  # kind (1 counter, 2 log), limit, window (units / µs), unit µs
    cost: int
    tag: str
    slot: int


@dataclass(slots=True)
class _Group:
    """The part of a request that one script decides: one slot (or everything on a single server)."""

    items: list[int]
    pens: list[str]  # tags of the penalty keys
    keys: list[str] = field(default_factory=list)
    # HIT's command up to its arguments (EVALSHA, sha, number of keys, keys), encoded once
    command: tuple[str | bytes | int, ...] = ()
    packed: bytes = b""  # HIT's numbers (ARGV[1])
    logs: bool = False  # a sliding_log check among them: HIT then needs the request's nonce
    reply: struct.Struct = struct.Struct("<0q")  # HIT's reply in binary form

    def hit_command(self, nonce: bytes) -> tuple[str | bytes | int, ...]:
        """HIT's EVALSHA command for one request."""
        return (*self.command, self.packed, nonce) if self.logs else (*self.command, self.packed)


@dataclass(slots=True)
class _Plan:
    """How a tuple of checks is decided: distinct counters, check → counter, penalty boxes by tag,
    the script calls (one per slot), and for a single call each check's place in its reply."""

    items: list[_Item]
    mapping: list[int]
    penalties: dict[str, Penalty]
    groups: list[_Group]
    # one script call: the reply offset of each check's (ok, remaining, wait, reset, window)
    offsets: list[int] | None
    logs: bool  # a sliding_log check among them (the request needs a nonce)


def _escape(key: str) -> str:
    """A check key as its hash tag: ``{`` ``}`` ``%`` percent-escaped, so the tag is the whole key."""
    if "%" in key or "{" in key or "}" in key:
        return key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return key


def _unescape(tag: str) -> str:
    if "%" not in tag:
        return tag
    return tag.replace("%7D", "}").replace("%7B", "{").replace("%25", "%")


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _window_us(seconds: float) -> int:
    return max(1, round(seconds * 1e6))


def _counter_unit(limit: int, window_us: int) -> int:
    """µs per time unit of a counter check: keeps ``(limit + 1) · window_in_units ≤ 2^53``."""
    need = (limit + 1) * window_us
    return 1 if need <= _MAX_INT else -(-need // _MAX_INT)


def _us_to_s(us: int) -> float:
    return math.inf if us < 0 else us / 1e6


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLimiter:
    """Multi-check rate limiting on Redis or Redis Cluster (``redis.asyncio``); see the module doc.

    ``client`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` (either
    ``decode_responses`` setting); :meth:`from_url` makes one. ``prefix`` starts every key (no
    braces). ``timeout`` bounds each decision (seconds, including a script reload and, in a
    cluster, the refund); ``admin_timeout`` bounds block / unblock / list operations.
    ``backoff_base`` / ``backoff_max``: the first and the longest wait before probing Redis again
    after a failure (each uniform in [½, 1] of ``min(max, base · 2^(failures−1))``).

    Usable from any asyncio program; one instance per event loop (it keeps connections).
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "pyproxy:rl:",
        timeout: float = 0.05,
        admin_timeout: float = 2.0,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
        owns_client: bool = False,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must not contain braces (they make the hash tag), got {prefix!r}")
        for name, value in (("timeout", timeout), ("admin_timeout", admin_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if not 0 < backoff_base <= backoff_max:
            raise ValueError(f"need 0 < backoff_base <= backoff_max, got {backoff_base!r}, {backoff_max!r}")
        self.client = client
        self.prefix = prefix
        # The decisions' bound: one loop timer for all in flight (asyncio.timeout: one per call).
        self._decision_timeout = SharedTimeout(timeout)
        self.admin_timeout = admin_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._owns_client = owns_client
        self._cluster = isinstance(client, RedisCluster)
        # HIT answers in packed integers unless the client would decode them as text
        self._binary_replies = not client.get_encoder().decode_responses
        # Nonces name the log members a request adds: unique per instance and per request.
        self._nonce_prefix = os.urandom(6).hex().encode()
        self._nonces = itertools.count()
        self._items: dict[tuple[str, str, int, float], tuple[str, str, tuple[int, int, int, int], str, int]] = {}
        # Plans of tuples of checks seen before (_plan_of), by identity.
        self._plans: TupleMemo[_Plan] = TupleMemo()
        self._ready = not self._cluster
        self._init_lock = asyncio.Lock()
        # health
        self._healthy = True
        self._probing = False
        self._retry_at = 0.0
        self._failures = 0  # consecutive failed probes in the current incident
        self._incident_start = 0.0
        self._incident_errors = 0
        self._cause = ""
        self._last_error_log = -math.inf
        # counters
        self._round_trips = 0
        self._errors = 0
        self._fast_failures = 0
        self._incidents = 0
        self._script_loads = 0
        self._refunds = 0
        self._refund_failures = 0
        self._background: set[asyncio.Task[None]] = set()
        self._last_latency: float | None = None
        self._latency_counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self._latency_sum = 0.0

    # -- construction and life cycle ------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, **options: Any) -> RedisLimiter:
        """A limiter on its own client for ``url`` (``cluster=True``: any node of a Redis Cluster).

        A single server's client does not retry by itself (the limiter's backoff does); a cluster
        client keeps redis-py's retries (they re-learn the topology), bounded by ``timeout`` like
        everything else. :meth:`aclose` closes it. ``options`` are the constructor's keywords.
        """
        timeout = float(options.get("timeout", 0.05))
        client: Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, socket_connect_timeout=max(timeout, 0.1))
        else:
            client = Redis.from_url(url, socket_connect_timeout=max(timeout, 0.1), retry=Retry(NoBackoff(), 0))
        return cls(client, owns_client=True, **options)

    async def aclose(self) -> None:
        """Finish background refunds (bounded), then close the client if this limiter made it."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=self.admin_timeout)
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> RedisLimiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- state ----------------------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        """The bound of each decision, in seconds."""
        return self._decision_timeout.seconds

    @property
    def healthy(self) -> bool:
        """False from a failure until Redis answers again."""
        return self._healthy

    @property
    def cluster(self) -> bool:
        return self._cluster

    def stats(self) -> RedisLimiterStats:
        return RedisLimiterStats(
            healthy=self._healthy,
            round_trips=self._round_trips,
            errors=self._errors,
            fast_failures=self._fast_failures,
            incidents=self._incidents,
            script_loads=self._script_loads,
            refunds=self._refunds,
            refund_failures=self._refund_failures,
            last_latency=self._last_latency,
            latency_counts=tuple(self._latency_counts),
            latency_sum=self._latency_sum,
        )

    def state_key(self, check: Check) -> str:
        """The Redis key holding ``check``'s counter (hash) or log (sorted set)."""
        return self._item_parts(check)[0]

    def block_key(self, key: str) -> str:
        """The Redis key of ``key``'s penalty-box state (hash ``u`` until µs, ``n`` strikes)."""
        return f"{self.prefix}{{{_escape(key)}}}:b"

    def violation_key(self, key: str) -> str:
        return f"{self.prefix}{{{_escape(key)}}}:v"

    def key_for(self, key: str, suffix: str) -> str:
        """A Redis key for more state of check key ``key`` (``<prefix>{<key>}:<suffix>``): in the
        same Redis Cluster slot as the key's counters and penalty box (used by the hybrid limiter)."""
        return f"{self.prefix}{{{_escape(key)}}}:{suffix}"

    def slot_of(self, key: str) -> int:
        """The Redis Cluster slot of check key ``key``'s state (0 on a single server)."""
        return key_slot(_escape(key).encode()) if self._cluster else 0

    async def run_scripts(
        self, calls: Sequence[tuple[lua.Script, list[str], Sequence[str | bytes | int]]], timeout: float | None = None
    ) -> list[Any]:
        """Run scripts concurrently (in a cluster each on the node of its keys, which must share a
        slot), within ``timeout`` (default ``timeout``) and with the health state, backoff and
        counters of :meth:`hit`: raises :class:`RedisUnavailable` like it. For other limiters
        built on this one's connection (the hybrid limiter's reconciliation)."""

        async def op() -> list[Any]:
            return list(await asyncio.gather(*(self._script(script, keys, args) for script, keys, args in calls)))

        started = time.perf_counter()
        replies = await self._guarded(op, self.timeout if timeout is None else timeout)
        self._observe(time.perf_counter() - started)
        return replies

    # -- deciding -------------------------------------------------------------------------------

    async def hit(self, checks: Sequence[Check]) -> Decision:
        """Decide ``checks`` for one request and charge all of them if all admit it, else none.

        Counts penalty-box violations and blocks keys that pass ``max_violations``. Raises
        :class:`RedisUnavailable` when Redis fails or is backing off.
        """
        return await self._decide(checks, charge=True)

    async def peek(self, checks: Sequence[Check]) -> Decision:
        """What :meth:`hit` would answer now, charging nothing and counting no violation."""
        return await self._decide(checks, charge=False)

    def _item_parts(self, check: Check) -> tuple[str, str, tuple[int, int, int, int], str, int]:
        """(state key, kind, script spec (kind, limit, window, unit), tag, slot) of a check, cached."""
        ident = (check.key, check.algorithm, check.limit, check.window)
        parts = self._items.get(ident)
        if parts is None:
            kind = _KIND[check.algorithm]
            wus = _window_us(check.window)
            if kind == "c":
                unit = _counter_unit(check.limit, wus)
                warg = max(1, wus // unit)
            else:
                unit, warg = 1, wus
            tag = _escape(check.key)
            rkey = f"{self.prefix}{{{tag}}}:{kind}:{check.limit}:{wus}"
            slot = key_slot(tag.encode()) if self._cluster else 0
            parts = (rkey, kind, (1 if kind == "c" else 2, check.limit, warg, unit), tag, slot)
            if len(self._items) >= 65536:
                self._items.clear()
            self._items[ident] = parts
        return parts

    def _plan_of(self, checks: Sequence[Check], charge: bool) -> _Plan:
        """:meth:`_plan`, kept for a tuple of checks seen before (a rate-limit policy hands out the
        same tuple for a route and key): identity, since a tuple never changes, and the memo holds
        it, so its id cannot be reused. Plans are never modified once made."""
        try:
            return self._plans.get(checks, charge)
        except KeyError:
            pass
        plan = self._plan(checks, charge)
        self._plans.put(checks, charge, plan)
        return plan

    def _plan(self, checks: Sequence[Check], charge: bool) -> _Plan:
        """Distinct counters (same Redis key: costs added), check → counter, penalty boxes by tag,
        and the script calls: one group per slot in a cluster, else one."""
        items: list[_Item] = []
        index: dict[str, int] = {}
        mapping: list[int] = []
        penalties: dict[str, Penalty] = {}
        for check in checks:
            rkey, kind, spec, tag, slot = self._item_parts(check)
            at = index.get(rkey)
            if at is None:
                at = index[rkey] = len(items)
                items.append(_Item(rkey, kind, spec, check.cost, tag, slot))
            else:
                items[at].cost += check.cost
            mapping.append(at)
            add_penalty(penalties, tag, check)
        by_slot: dict[int, _Group] = {}
        for i, item in enumerate(items):
            group = by_slot.get(item.slot)
            if group is None:
                group = by_slot[item.slot] = _Group([], [])
            group.items.append(i)
            if item.tag in penalties and item.tag not in group.pens:
                group.pens.append(item.tag)
        # which penalty key each item answers to: items of a key with a penalty box
        for group in by_slot.values():
            pen_index = {tag: j + 1 for j, tag in enumerate(group.pens)}
            keys = [items[i].rkey for i in group.items]
            numbers = [len(group.items), len(group.pens), 1 if charge else 0, 1 if self._binary_replies else 0]
            for i in group.items:
                it = items[i]
                numbers += (*it.spec, it.cost, pen_index.get(it.tag, 0))
            for tag in group.pens:
                keys += (f"{self.prefix}{{{tag}}}:b", f"{self.prefix}{{{tag}}}:v")
                p = penalties[tag]
                numbers += (
                    p.max_violations,
                    _window_us(p.violation_window),
                    _window_us(p.block_for),
                    _window_us(p.block_max),
                )
            group.keys = keys
            group.command = self._evalsha(lua.HIT, keys)
            group.logs = any(items[i].kind == "l" for i in group.items)
            group.packed = struct.pack(f"<{len(numbers)}d", *numbers)
            group.reply = struct.Struct(f"<{2 + 5 * len(group.items) + 4 * len(group.pens)}q")
        groups = list(by_slot.values())
        # one group holds every item, in order: item i's five numbers start at 2 + 5·i
        offsets = [2 + 5 * i for i in mapping] if len(groups) == 1 else None
        return _Plan(items, mapping, penalties, groups, offsets, any(g.logs for g in groups))

    async def _decide(self, checks: Sequence[Check], charge: bool) -> Decision:
        if not checks:
            return Decision(True, ())
        plan = self._plan_of(checks, charge)
        groups = plan.groups
        # a nonce only names the members sliding_log checks add (HIT and the cluster's REFUND)
        nonce = b"%s%x" % (self._nonce_prefix, next(self._nonces)) if plan.logs else b""
        started = time.perf_counter()
        if plan.offsets is not None:
            group = groups[0]
            command = group.hit_command(nonce)
            if self._healthy and self._ready:
                # _guarded inlined for the common case (one script, Redis healthy): in a round
                # trip of ~150 µs, each coroutine and call here costs its share of the wake-up
                try:
                    with self._decision_timeout.bound():
                        raw = await self._run_script(lua.HIT, group.keys, command)
                except (*_OUTAGE, RedisError) as exc:
                    raise self._unavailable(exc, False, self.timeout) from exc
                if not self._healthy:  # an incident began while this call was on its way
                    self._recovered()
            else:
                raw = await self._guarded(lambda: self._run_script(lua.HIT, group.keys, command), self.timeout)
            reply = self._reply(group, raw)
            self._observe(time.perf_counter() - started)
            if reply[0] == 1:  # allowed: the common case, without the denial bookkeeping
                return Decision(
                    True,
                    tuple([
                        CheckResult(check, True, reply[at + 1], 0.0, reply[at + 3] / 1e6)
                        for check, at in zip(checks, plan.offsets)
                    ]),
                    server_time_us=reply[1],
                )
            replies = [reply]
        else:
            replies = await self._guarded(lambda: self._hit_slots(groups, nonce, plan.items, charge), self.timeout)
            self._observe(time.perf_counter() - started)
        return self._decision(checks, plan, replies)

    async def _hit_one(self, group: _Group, nonce: bytes) -> _Reply:
        return self._reply(group, await self._run_script(lua.HIT, group.keys, group.hit_command(nonce)))

    def _reply(self, group: _Group, raw: Any) -> _Reply:
        """HIT's reply as integers (packed, or as text for a client decoding replies)."""
        if self._binary_replies:
            return group.reply.unpack(raw)
        return tuple(map(int, raw.split()))

    async def _hit_slots(self, groups: list[_Group], nonce: bytes, items: list[_Item], charge: bool) -> list[_Reply]:
        """One HIT per slot, concurrently; refund the slots that charged if another denied or failed.

        A denial is refunded before returning (so all-or-none holds when ``hit`` returns); a failure
        or a timeout is refunded in the background, within ``admin_timeout``, while the error is
        raised at once. A slot that timed out may still run its script later (its charge then
        stays until it ages out: an error on the safe side).
        """
        tasks = [asyncio.ensure_future(self._hit_one(g, nonce)) for g in groups]
        try:
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:  # the timeout (or the caller) gave up on us
            if charge:
                done = [
                    (g, t.result())
                    for g, t in zip(groups, tasks, strict=True)
                    if t.done() and not t.cancelled() and t.exception() is None
                ]
                self._refund_later([(g, r) for g, r in done if int(r[0]) == 1], nonce, items)
            raise
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        replies = [o for o in outcomes if isinstance(o, tuple)]
        if charge:
            charged = [(g, o) for g, o in zip(groups, outcomes, strict=True) if isinstance(o, tuple) and int(o[0]) == 1]
            if failed is not None:
                self._refund_later(charged, nonce, items)
            elif len(charged) < len(groups):
                await self._refund_all(charged, nonce, items)
        if failed is not None:
            raise failed
        return replies

    async def _refund_all(self, charged: list[tuple[_Group, _Reply]], nonce: bytes, items: list[_Item]) -> None:
        if not charged:
            return
        self._refunds += 1
        results = await asyncio.gather(
            *(self._refund(g, reply, nonce, items) for g, reply in charged), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # The units stay charged until they age out: logged, not raised (the decision stands).
            self._refund_failures += len(failures)
            log.debug("Redis rate limiter: refund failed (%r); the units age out with their window", failures[0])

    def _refund_later(self, charged: list[tuple[_Group, _Reply]], nonce: bytes, items: list[_Item]) -> None:
        if not charged:
            return

        async def refund() -> None:
            try:
                async with asyncio.timeout(self.admin_timeout):
                    await self._refund_all(charged, nonce, items)
            except TimeoutError:
                self._refund_failures += len(charged)

        task = asyncio.get_running_loop().create_task(refund())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refund(self, group: _Group, reply: _Reply, nonce: bytes, items: list[_Item]) -> None:
        """Take back what HIT charged on one slot (``reply`` gives each counter's window index)."""
        keys = [items[i].rkey for i in group.items]
        args: list[str | bytes | int] = [nonce]
        for n, i in enumerate(group.items):
            args += (items[i].kind, reply[2 + 5 * n + 4], items[i].cost)
        await self._script(lua.REFUND, keys, args)

    def _decision(self, checks: Sequence[Check], plan: _Plan, replies: list[_Reply]) -> Decision:
        items, mapping = plan.items, plan.mapping
        # per distinct counter: (ok, remaining, wait µs, reset µs); the replies are already ints
        state: list[tuple[int, int, int, int]] = [(1, 0, 0, 0)] * len(items)
        pen_left: dict[str, int] = {}  # µs until unblocked, on the key's node clock
        pen_was: dict[str, bool] = {}
        now = 0
        allowed = True
        for group, reply in zip(plan.groups, replies, strict=True):
            if reply[0] != 1:
                allowed = False
            if reply[1] > now:
                now = reply[1]
            base = 2
            for i in group.items:
                state[i] = (reply[base], reply[base + 1], reply[base + 2], reply[base + 3])
                base += 5
            for tag in group.pens:
                pen_was[tag] = reply[base] == 1
                pen_left[tag] = reply[base + 1] - reply[1]
                base += 4
        results: list[CheckResult] = []
        denied: int | None = None
        retry = 0.0
        blocked_by_box = False
        for pos, check in enumerate(checks):
            i = mapping[pos]
            ok, remaining, wait, reset = state[i]
            left = pen_left.get(items[i].tag, 0) if pen_left and check.penalty is not None else 0
            if allowed:
                results.append(CheckResult(check, True, remaining, 0.0, reset / 1e6))
                continue
            if ok and left <= 0:
                # admits, but another check denied: nothing was charged, remaining as it stands
                results.append(CheckResult(check, True, remaining + items[i].cost, 0.0, reset / 1e6))
                continue
            if left > 0 and wait >= 0:
                wait = max(wait, left)
            result = CheckResult(
                check, False, remaining + items[i].cost if ok else remaining, _us_to_s(wait), reset / 1e6, left > 0
            )
            results.append(result)
            retry = max(retry, result.retry_after)
            if denied is None:
                denied = pos
            if left > 0 and pen_was.get(items[i].tag, False):
                blocked_by_box = True
        newly = tuple(_unescape(tag) for tag, left in pen_left.items() if left > 0 and not pen_was[tag])
        return Decision(allowed, tuple(results), denied, retry, blocked_by_box, newly, now)

    # -- the penalty box ------------------------------------------------------------------------

    async def block(self, key: str, seconds: float) -> float:
        """Block ``key`` for ``seconds`` from now (Redis clock); the Unix time it is blocked until."""
        if not 1e-6 <= seconds <= 1e9:
            raise ValueError(f"seconds must be in [1e-6, 1e9], got {seconds!r}")
        reply = await self._guarded(
            lambda: self._script(lua.BLOCK, [self.block_key(key)], [_window_us(seconds)]), self.admin_timeout
        )
        return int(reply[1]) / 1e6

    async def unblock(self, key: str) -> bool:
        """Take ``key`` out of the penalty box and forget its strikes and violations.

        True if it was blocked.
        """
        reply = await self._guarded(
            lambda: self._script(lua.UNBLOCK, [self.block_key(key), self.violation_key(key)], []),
            self.admin_timeout,
        )
        return int(reply) == 1

    async def blocked_until(self, key: str) -> float | None:
        """The Unix time (Redis clock) until which ``key`` is blocked, ``None`` if it is not."""
        state = await self.block_state(key)
        return state.until if state is not None else None

    async def block_state(self, key: str) -> BlockedKey | None:
        """``key``'s block (until, remaining seconds, strikes), ``None`` if it is not blocked."""
        reply = await self._guarded(
            lambda: self._script(lua.BLOCK_STATE, [self.block_key(key), self.violation_key(key)], []),
            self.admin_timeout,
        )
        return self._blocked_key(key, reply)

    async def violations(self, key: str) -> int:
        """Violations of ``key`` counted in its current violation window."""
        reply = await self._guarded(
            lambda: self._script(lua.BLOCK_STATE, [self.block_key(key), self.violation_key(key)], []),
            self.admin_timeout,
        )
        return int(reply[3])

    @staticmethod
    def _blocked_key(key: str, reply: list[Any]) -> BlockedKey | None:
        now, until, strikes = int(reply[0]), int(reply[1]), int(reply[2])
        if until <= now:
            return None
        return BlockedKey(key=key, until=until / 1e6, remaining=(until - now) / 1e6, strikes=strikes)

    async def list_blocked(self) -> list[BlockedKey]:
        """Every key blocked now, by the remaining time (SCAN of the prefix; every master in a cluster)."""
        return await self._guarded(self._list_blocked, self.admin_timeout)

    async def _list_blocked(self) -> list[BlockedKey]:
        pattern = f"{_glob_escape(self.prefix)}{{*}}:b"
        names: list[str] = []
        if isinstance(self.client, RedisCluster):
            for node in self.client.get_primaries():
                names += await self._scan(pattern, node)
        else:
            names += await self._scan(pattern, None)
        start = len(self.prefix) + 1
        keys = [_unescape(name[start:-3]) for name in set(names)]
        replies = await asyncio.gather(
            *(self._script(lua.BLOCK_STATE, [self.block_key(k), self.violation_key(k)], []) for k in keys)
        )
        found = [self._blocked_key(k, r) for k, r in zip(keys, replies, strict=True)]
        return sorted((b for b in found if b is not None), key=lambda b: (b.remaining, b.key))

    async def _scan(self, pattern: str, node: ClusterNode | None) -> list[str]:
        names: list[str] = []
        cursor: int = 0
        while True:
            self._round_trips += 1
            if node is not None:
                raw = await node.execute_command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            else:
                assert isinstance(self.client, Redis)
                raw = await self.client.scan(cursor, match=pattern, count=1000)
            cursor = int(raw[0])
            names += (_text(k) for k in raw[1])
            if cursor == 0:
                return names

    # -- Redis calls ----------------------------------------------------------------------------

    def _evalsha(self, script: lua.Script, keys: list[str]) -> tuple[str | bytes | int, ...]:
        """``script``'s EVALSHA command up to its arguments. On a single server already encoded:
        redis-py then packs it ~30% faster (a hot command); a cluster client routes commands by
        their text name, so it gets text."""
        if self._cluster:
            return ("EVALSHA", script.sha, len(keys), *keys)
        return (b"EVALSHA", script.sha.encode(), str(len(keys)).encode(), *(k.encode() for k in keys))

    async def _script(self, script: lua.Script, keys: list[str], args: Sequence[str | bytes | int]) -> Any:
        """EVALSHA; on NOSCRIPT load the script (on the node owning ``keys`` in a cluster), again."""
        return await self._run_script(script, keys, (*self._evalsha(script, keys), *args))

    async def _run_script(self, script: lua.Script, keys: list[str], command: tuple[str | bytes | int, ...]) -> Any:
        """Send ``command``, ``script``'s EVALSHA with its keys and arguments (see :meth:`_script`)."""
        self._round_trips += 1
        try:
            return await self.client.execute_command(*command)
        except NoScriptError:
            pass
        self._round_trips += 2
        self._script_loads += 1
        if isinstance(self.client, RedisCluster):
            node = self.client.get_node_from_key(keys[0])
            if node is None:
                raise RedisClusterException(f"no node serves the slot of {keys[0]!r}")
            await node.execute_command("SCRIPT", "LOAD", script.source)
        else:
            await self.client.script_load(script.source)
        return await self.client.execute_command(*command)

    async def _guarded(self, op: Callable[[], Awaitable[T]], timeout: float) -> T:
        """Run ``op`` within ``timeout``, keeping the health state, backoff and counters."""
        probe = False
        if not self._healthy:
            if self._probing or time.monotonic() < self._retry_at:
                self._fast_failures += 1
                raise RedisUnavailable(
                    f"Redis unavailable ({self._cause}); backing off, next attempt in "
                    f"{max(0.0, self._retry_at - time.monotonic()):.3f} s",
                    fast=True,
                )
            self._probing = probe = True
        try:
            if self._ready and timeout == self._decision_timeout.seconds:
                with self._decision_timeout.bound():
                    result = await op()
            else:
                async with asyncio.timeout(timeout):
                    if not self._ready:
                        await self._initialize()
                    result = await op()
        except (*_OUTAGE, RedisError) as exc:
            raise self._unavailable(exc, probe, timeout) from exc
        finally:
            if probe:
                self._probing = False
        if not self._healthy:
            self._recovered()
        return result

    def _recovered(self) -> None:
        """Redis answered during an incident: it ends (logged once)."""
        log.info(
            "Redis rate limiter: Redis answers again after %.3f s (%d failed calls in the incident)",
            time.monotonic() - self._incident_start,
            self._incident_errors,
        )
        self._healthy = True
        self._failures = 0

    def _unavailable(self, exc: BaseException, probe: bool, timeout: float) -> RedisUnavailable:
        """What a failed operation raises: counted; an outage (``_OUTAGE``) starts or continues an
        incident and its backoff, another Redis error (a refused operation) is logged at most once
        a minute."""
        self._errors += 1
        if isinstance(exc, _OUTAGE):
            self._outage(exc, probe, timeout)
            return RedisUnavailable(f"Redis unavailable: {self._cause}", cause=exc)
        cause = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if now - self._last_error_log >= 60.0:
            self._last_error_log = now
            log.error("Redis rate limiter: Redis refused an operation (%s)", cause)
        return RedisUnavailable(f"Redis refused the operation: {cause}", cause=exc)

    async def _initialize(self) -> None:
        """Learn a cluster's topology once, before concurrent use.

        ``redis.asyncio.RedisCluster`` initialises itself on first use, but many tasks using a fresh
        client at once can race there (a connection closed under a concurrent command; seen with
        redis-py 8.1), so the limiter initialises it first, one task at a time.
        """
        if isinstance(self.client, RedisCluster):
            async with self._init_lock:
                if not self._ready:
                    await self.client.initialize()
        self._ready = True

    def _outage(self, exc: BaseException, probe: bool, timeout: float) -> None:
        if isinstance(exc, TimeoutError) and not str(exc):
            cause = f"no answer within {timeout * 1000:.0f} ms"
        else:
            cause = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self._healthy:
            self._healthy = False
            self._incidents += 1
            self._incident_start = now
            self._incident_errors = 0
            self._failures = 0
            self._cause = cause
            log.warning(
                "Redis rate limiter: Redis unavailable (%s); failing fast and retrying with backoff "
                "(this is logged once per incident)",
                cause,
            )
        elif not probe:
            # a call that was in flight when the incident started: counted, no new backoff
            self._incident_errors += 1
            return
        self._incident_errors += 1
        self._failures += 1
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(self._failures - 1, 60))
        self._retry_at = now + random.uniform(ceiling / 2, ceiling)

    def _observe(self, seconds: float) -> None:
        self._last_latency = seconds
        self._latency_sum += seconds
        self._latency_counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1

"""Rate limits decided locally and reconciled with Redis: mode ``hybrid``, no round trip per request.

:class:`HybridLimiter` keeps, per counter (``(key, limit, window)``, ``sliding_window_counter``),
the cluster-wide counts of the current and the previous fixed window as Redis last reported them,
plus the units this process admitted since. A request is decided on that estimate at once — the
same arithmetic as everywhere (``⌊P·(W−e)/W⌋ + C``, windows aligned on Redis ``TIME``, so every
instance counts in the same windows) — and charged locally. Every ``sync_interval`` (50 ms) one
Lua script per Redis Cluster slot (one on a single server; all concurrently) pushes this process's
units per window (``HINCRBY`` on a hash per counter, field = window index) and pulls the global
counts of the windows that matter now (which fold in every other instance's usage), with Redis'
clock; Redis' time is tracked from the midpoint of each round trip.

**Overshoot bound.** An instance decides without seeing what the others admitted since its last
pull: another instance's unit reaches Redis at that instance's next push (at most
``sync_interval`` later) and this one at its next pull (another ``sync_interval``, plus the round
trip). With ``D = 2·sync_interval + RTT``, at every admission the true cluster-wide estimate is at
most ``limit`` plus what the instances admitted in the last ``D`` unseen by the deciding one — so
each fixed window holds at most::

    limit + N × R × D        (N instances, each admitting at most R requests/s)

e.g. 2 instances at 500/s, ``sync_interval`` 50 ms: ≤ 100 + 2·500·0.101 ≈ 201 per 1 s window
against a limit of 100 in the worst case (a burst at a window's start, every instance fresh). Once
the counts are known (after ``D``) every instance refuses until the estimate falls, so a sustained
overload costs far less. Measured (``tests/test_ratelimit_hybrid.py``: 2 instances × 500
requests/s, 100 per 1 s, 3 s, one Redis on loopback; five runs): 15–38 requests more than one exact
limiter allows from the same requests (4–11%); 105–126 in the first window (both instances fresh),
101–106 in the later ones. The bound counts processes: every worker of every machine is
an instance (each keeps its own state). A counter not used for a while starts from what Redis said
when it was last used (a new one: from zero) until the next sync, so the first requests after a
pause also count as unseen; pushes that timed out are sent again (the script may have run: an
overcount, on the safe side).

``sliding_log`` checks are refused (``ValueError``): exactness cannot survive deferred
reconciliation; use mode ``redis`` for exact limits. Hybrid counters live under their own Redis
keys (``<prefix>{key}:h:<limit>:<window µs>``), separate from mode ``redis``'s.

**Redis unavailable** (a sync fails, times out, or the Redis limiter is backing off): the limiter
falls back to the :class:`~pyproxy.ratelimit.local.LocalLimiter` it was given (the machine's
shared counters — limits hold per machine), logged once per incident (WARNING, then INFO when a
sync succeeds again), and keeps trying at every ``sync_interval`` (the Redis limiter's backoff
turns most tries into fast failures). Units admitted meanwhile are pushed once Redis answers,
and decisions go back to the cluster-wide counts by themselves. ``fallback_local=False`` raises
:class:`~pyproxy.ratelimit.redis_backend.RedisUnavailable` instead, so the caller applies
``on_redis_error`` (deny / allow) as for mode ``redis``.

**Penalty box**: decided by the local limiter's (violations and strikes per machine); blocks are
shared through Redis at each sync — a block made here is written to the key's Redis block hash
(the one :class:`~pyproxy.ratelimit.redis_backend.RedisLimiter` uses, so its admin operations see
it), and a longer block found there for a key this process checks is applied locally — so a key
blocked on one instance is blocked on every instance that checks it within two syncs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pyproxy._core import HybridClock, HybridCounter, HybridPlan, Tally, hybrid_charge
from pyproxy.ratelimit import lua
from pyproxy.ratelimit.checks import Binding, BlockedKey, Check, CheckResult, Decision, Penalty, TupleMemo, add_penalty
from pyproxy.ratelimit.headers import plan_fields
from pyproxy.ratelimit.local import MAX_LIMIT, LocalLimiter, _BoxState, _counter_decide, _counter_reset, _Item, _ns
from pyproxy.ratelimit.redis_backend import RedisLimiter, RedisUnavailable

if TYPE_CHECKING:
    from pyproxy.ratelimit.base import Limiter

__all__ = ["SYNC", "HybridLimiter", "HybridLimiterStats", "overshoot_bound"]

log = logging.getLogger("pyproxy.ratelimit.hybrid")

# what _fast_hit answers for an allowed request
_NO_DETAILS: Final = 0
_DECISION: Final = 1
_BINDING: Final = 2

# SYNC: push this instance's units per window and pull the global counts, on Redis' clock.
#
# KEYS: n counter hashes (field = window index, value = units), then m penalty-box hashes.
# ARGV[1]: space-separated integers: n, m; per counter: window (µs), number of deltas d, then d
#   pairs (window index, units); per penalty key: blocked until (µs, Redis clock) to raise the
#   key's block to, 0 to only read it.
# Reply: now (µs); per counter: the previous and the current window's count; per penalty key:
#   blocked until (µs, 0 if never).
# Units for a window older than the previous one are dropped (they can no longer change a
# decision); the fields before it are deleted; a hash expires three windows after its last push.
SYNC: Final = lua.Script(
    "hybrid_sync",
    r"""
local fmod = math.fmod
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ARG = {}
for tok in string.gmatch(ARGV[1], '%S+') do ARG[#ARG + 1] = tonumber(tok) end
local n, m = ARG[1], ARG[2]
local a = 3
local out = {now}
for i = 1, n do
  local key = KEYS[i]
  local w, nd = ARG[a], ARG[a + 1]
  a = a + 2
  local cur = (now - fmod(now, w)) / w
  local wrote = false
  for _ = 1, nd do
    local idx, delta = ARG[a], ARG[a + 1]
    a = a + 2
    if delta > 0 and idx >= cur - 1 and idx <= cur + 1 then
      redis.call('HINCRBY', key, idx, delta)
      wrote = true
    end
  end
  local r = redis.call('HMGET', key, cur - 1, cur)
  if wrote then
    if redis.call('HLEN', key) > 3 then
      for _, f in ipairs(redis.call('HKEYS', key)) do
        if tonumber(f) < cur - 1 then redis.call('HDEL', key, f) end
      end
    end
    redis.call('PEXPIRE', key, math.ceil(3 * w / 1000) + 1)
  end
  out[#out + 1] = tonumber(r[1]) or 0
  out[#out + 1] = tonumber(r[2]) or 0
end
for j = 1, m do
  local bkey = KEYS[n + j]
  local want = ARG[a]
  a = a + 1
  local u = tonumber(redis.call('HGET', bkey, 'u') or '0') or 0
  if want > u and want > now then
    redis.call('HSET', bkey, 'u', want)
    local need = math.ceil((want - now) / 1000) + 1
    if redis.call('PTTL', bkey) < need then redis.call('PEXPIRE', bkey, need) end
    u = want
  end
  out[#out + 1] = u
end
return out
""",
)


@dataclass(frozen=True, slots=True)
class HybridLimiterStats:
    """Counters of a :class:`HybridLimiter` since it was made (for metrics).

    ``healthy``: decisions use the cluster-wide counts (not falling back). ``syncs`` / ``sync_failures``:
    reconciliations that succeeded / failed; ``incidents``: times it fell back to local decisions;
    ``local_decisions``: requests decided by the local limiter meanwhile. ``pushed``: units sent to
    Redis. ``counters``: counters tracked by this process. ``last_sync_latency``: seconds of the
    last successful round trip. ``allowed`` / ``denied``: requests.
    """

    healthy: bool
    syncs: int
    sync_failures: int
    incidents: int
    local_decisions: int
    pushed: int
    counters: int
    last_sync_latency: float | None
    allowed: int
    denied: int


class HybridLimiter:
    """Rate limits decided locally against cluster-wide counts reconciled with Redis; see the
    module doc.

    ``local``: the :class:`~pyproxy.ratelimit.local.LocalLimiter` of this machine (the fallback and
    the penalty box); ``redis``: a :class:`~pyproxy.ratelimit.redis_backend.RedisLimiter` (its
    client, key prefix, timeout, health and backoff are used). ``sync_interval``: seconds between
    reconciliations (the overshoot bound grows with it). ``max_counters``: counters tracked per
    process (the idle ones are dropped beyond it).

    One instance per process and event loop. The reconciliation runs in a task started by the first
    decision made inside a running loop (or by :meth:`start`); :meth:`aclose` stops it after a last
    push. :meth:`hit_sync` / :meth:`peek_sync` decide synchronously; :meth:`hit` / :meth:`peek` are
    their ``async`` twins.
    """

    def __init__(
        self,
        local: LocalLimiter,
        redis: RedisLimiter,
        sync_interval: float = 0.05,
        *,
        fallback_local: bool = True,
        max_counters: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.001 <= sync_interval <= 60:
            raise ValueError(f"sync_interval must be seconds in [0.001, 60], got {sync_interval!r}")
        self.local = local
        self.redis = redis
        self.sync_interval = sync_interval
        self.fallback_local = fallback_local
        self.max_counters = max_counters
        self.clock = clock
        self._counters: dict[tuple[str, int, float], HybridCounter] = {}
        self._plans: TupleMemo[HybridPlan | None] = TupleMemo()  # charge_plan's; variant: with fields
        self._plans_allowed = Tally()  # what every plan handed out allowed
        # penalty keys checked since the last sync: key -> blocked until (local ns) to share, or 0
        self._penalty_keys: dict[str, int] = {}
        # blocks shared through Redis: key -> when they end (time.monotonic()), to notice unblocks
        self._shared: dict[str, float] = {}
        # Redis time (µs) = (clock() + offset) · 1e6, a wall-clock guess until the first sync; and
        # whether Redis is unreachable (decisions then fall back) — shared with the plans
        self._redis_clock = HybridClock(time.time() - clock())
        self._sync_lock: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._syncs = 0
        self._sync_failures = 0
        self._incidents = 0
        self._local_decisions = 0
        self._pushed = 0
        self._last_latency: float | None = None
        self._allowed = 0
        self._denied = 0

    # -- state ----------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while decisions fall back to the local limiter (Redis unavailable)."""
        return not self._degraded

    @property
    def _degraded(self) -> bool:
        return self._redis_clock.degraded

    @_degraded.setter
    def _degraded(self, degraded: bool) -> None:
        self._redis_clock.degraded = degraded

    def stats(self) -> HybridLimiterStats:
        return HybridLimiterStats(
            healthy=not self._degraded,
            syncs=self._syncs,
            sync_failures=self._sync_failures,
            incidents=self._incidents,
            local_decisions=self._local_decisions,
            pushed=self._pushed,
            counters=len(self._counters),
            last_sync_latency=self._last_latency,
            allowed=self._allowed + self._plans_allowed.value,
            denied=self._denied,
        )

    def redis_now_us(self) -> int:
        """This process's estimate of Redis' clock, µs (the windows decisions are made in); never
        goes back (a new estimate after a sync may be a few µs behind the last one)."""
        return self._redis_clock.now_us(self.clock())

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start reconciling (the first decision in a running loop also does)."""
        self._ensure_task()

    def _ensure_task(self) -> None:
        if self._task is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # decided outside a loop: reconcile once one runs
            self._task = loop.create_task(self._run(), name="pyproxy-ratelimit-hybrid-sync")

    async def aclose(self) -> None:
        """Stop reconciling after pushing what is pending (bounded by the Redis timeout), then
        close the Redis limiter it was given (the local one holds nothing to close)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if not self._degraded:
            await self.sync(every=False)
        await self.redis.aclose()

    async def __aenter__(self) -> HybridLimiter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        failed_before = False
        while True:
            started = time.monotonic()
            try:
                await self.sync(every=False)
                failed_before = False
            except Exception:  # a bug, or a reply of an unexpected shape: keep reconciling
                self._sync_failures += 1
                if not failed_before:
                    log.exception("hybrid rate limiter: reconciliation failed")
                failed_before = True
            await asyncio.sleep(max(0.0, self.sync_interval - (time.monotonic() - started)))

    # -- deciding -------------------------------------------------------------------------------

    async def hit(self, checks: Sequence[Check]) -> Decision:
        """:meth:`hit_sync`, awaitable."""
        return self.hit_sync(checks)

    async def peek(self, checks: Sequence[Check]) -> Decision:
        """:meth:`peek_sync`, awaitable."""
        return self.peek_sync(checks)

    def hit_sync(self, checks: Sequence[Check]) -> Decision:
        """Decide ``checks`` on the cluster-wide estimate and charge all of them locally if all
        admit the request, else none (counting penalty-box violations). While Redis is
        unavailable: the local limiter's decision (or :class:`RedisUnavailable` with
        ``fallback_local=False``)."""
        return self._decide(checks, charge=True)

    def peek_sync(self, checks: Sequence[Check]) -> Decision:
        """What :meth:`hit_sync` would answer now, charging nothing and counting no violation."""
        return self._decide(checks, charge=False)

    def _counter(self, check: Check) -> HybridCounter:
        if check.algorithm != "sliding_window_counter":
            raise ValueError(
                f"check {check.name!r}: hybrid mode counts sliding_window_counter limits only "
                f"({check.algorithm} cannot be reconciled by deltas; use mode redis for exact limits)"
            )
        if check.limit > MAX_LIMIT:
            raise ValueError(f"check {check.name!r}: limit {check.limit} is above {MAX_LIMIT}")
        ident = (check.key, check.limit, check.window)
        counter = self._counters.get(ident)
        if counter is None:
            if len(self._counters) >= self.max_counters:
                self._evict()
            w = max(1, round(check.window * 1e6))
            rkey = self.redis.key_for(check.key, f"h:{check.limit}:{w}")
            counter = self._counters[ident] = HybridCounter(rkey, check.key, check.limit, w)
        else:
            counter.touch()
        return counter

    def _evict(self) -> None:
        """Drop counters with nothing to push and not used since the last sync."""
        idle = [k for k, c in self._counters.items() if c.idle]
        for k in idle:
            self._counters.pop(k).retire()  # a plan holding it can no longer charge it
        if idle:
            self._plans.clear()  # a plan must not charge a counter no longer reconciled

    def admit(self, checks: Sequence[Check]) -> Decision | None:
        """:meth:`hit_sync` without the details of an allowed request: ``None`` when it is allowed
        (and charged), else the full denial (see ``LocalLimiter.admit``)."""
        if not checks:
            return None
        if not self._degraded:
            fast = self._fast_hit(checks, _NO_DETAILS)
            if fast is not False:
                return None
        decision = self._decide(checks, True, fast=False)
        return None if decision.allowed else decision

    def hit_binding(self, checks: Sequence[Check]) -> Decision | Binding:
        """:meth:`hit_sync` for a data plane whose allowed responses advertise one check: the
        usual allowed request answers ``(check, remaining, reset)`` for the binding check
        (charged), any other the full :class:`Decision` (see ``LocalLimiter.hit_binding``)."""
        if checks and not self._degraded:
            fast = self._fast_hit(checks, _BINDING)
            if type(fast) is tuple:
                return fast
        return self._decide(checks, True, fast=False)

    def _fast_hit(self, checks: Sequence[Check], details: int) -> Decision | Binding | bool | None:
        """The usual request, quickly: one cost, each counter once, all admit it, no key blocked.

        Charged: ``None`` (``_NO_DETAILS``), the decision (``_DECISION``) or the binding check
        (``_BINDING``); ``False``, having done nothing, for any other request (the general path
        decides it). (Measured in a running loop: ``hit_sync`` 3.4 µs for one check, 6.2 µs for
        three; ``admit`` 1.7 µs / 3.0 µs; the general path ~13 µs.)
        """
        self._ensure_task()
        cost = checks[0].cost
        if cost < 1:
            return False
        chosen = self._fast_counters(checks, cost)
        if chosen is None:
            return False
        penalized = [check for check in checks if check.penalty is not None]
        if penalized:
            local = self.local
            now = local.clock()
            t = _ns(now)
            seen: dict[str, Penalty] = {}
            for check in penalized:
                assert check.penalty is not None
                known = seen.setdefault(check.key, check.penalty)
                if known != check.penalty or (known is check.penalty and local._is_blocked(check.key, t, now)):
                    return False
                self._penalty_keys.setdefault(check.key, 0)
        t_us = self.redis_now_us()
        charged = hybrid_charge(chosen, cost, t_us)
        if charged is None:
            return False
        self._allowed += 1
        if details == _NO_DETAILS:
            return None
        # per counter (window index, offset, current count, remaining, reset µs); which one binds
        binds, found = charged
        if details == _BINDING:
            _, _, _, remaining, reset_us = found[binds]
            return (checks[binds], remaining, reset_us / 1e6)
        results = tuple(
            CheckResult(check, True, remaining, 0.0, reset_us / 1e6)
            for check, (_, _, _, remaining, reset_us) in zip(checks, found, strict=True)
        )
        return Decision(True, results, server_time_us=t_us)

    def _fast_counters(self, checks: Sequence[Check], cost: int) -> list[HybridCounter] | None:
        """The counters of a usual request's checks — one cost, each counter once — or ``None``."""
        get = self._counters.get
        chosen: list[HybridCounter] = []
        for check in checks:
            counter = get((check.key, check.limit, check.window))
            if counter is None or check.algorithm != "sliding_window_counter":
                counter = self._counter(check)  # validates, raises for what hybrid cannot count
            if check.cost != cost:
                return None
            counter.touch()  # in use: not dropped as idle by an eviction a later check's counter makes
            chosen.append(counter)
        if len(chosen) > 1 and len({id(c) for c in chosen}) != len(chosen):
            return None
        return chosen

    def charge_plan(self, checks: Sequence[Check], fields: bool) -> HybridPlan | None:
        """``checks`` prepared for the data plane's usual request, as ``LocalLimiter.charge_plan``:
        ``plan.charge()`` decides and charges as :meth:`hit_binding` does (at the monotonic
        clock's estimate of Redis time) and answers the response's fields, or ``None`` — denied,
        Redis unreachable, or a counter this limiter stopped tracking — having charged nothing.
        ``None`` instead of a plan for checks that are not the usual request or have a penalty
        box, and when this limiter's clock is not ``time.monotonic``. Every plan's allowed charges
        count in :meth:`stats`."""
        try:
            return self._plans.get(checks, fields)
        except KeyError:
            pass
        if type(checks) is not tuple or not checks or self.clock is not time.monotonic:
            return None
        plan = None
        cost = checks[0].cost
        if cost >= 1 and all(check.penalty is None for check in checks):
            chosen = self._fast_counters(checks, cost)
            if chosen is not None:
                plan = HybridPlan(
                    chosen, cost, self._redis_clock, plan_fields(checks) if fields else None, self._plans_allowed
                )
        self._plans.put(checks, fields, plan)
        self._ensure_task()
        return plan

    def _decide(self, checks: Sequence[Check], charge: bool, fast: bool = True) -> Decision:
        if not checks:
            return Decision(True, ())
        if charge and fast and not self._degraded:
            decided = self._fast_hit(checks, _DECISION)
            if isinstance(decided, Decision):
                return decided
        self._ensure_task()
        counters = [self._counter(check) for check in checks]  # validates before any fallback
        if self._degraded:
            if not self.fallback_local:
                raise RedisUnavailable("Redis unavailable: hybrid rate limiting has no cluster-wide counts", fast=True)
            decision = self.local.hit_sync(checks) if charge else self.local.peek_sync(checks)
            if charge:
                self._local_decisions += 1
                if decision.allowed:
                    idx_us = self.redis_now_us()
                    for check, counter in zip(checks, counters, strict=True):
                        if check.cost:
                            idx = idx_us // counter.w
                            counter.add(idx, check.cost)
                self._count(decision)
            return decision
        local = self.local
        now = local.clock()
        t = _ns(now)
        t_us = self.redis_now_us()
        # distinct counters (costs added), check -> counter, penalty boxes by key
        items: list[_Item] = []
        index: dict[int, int] = {}
        mapping: list[int] = []
        owners: list[HybridCounter] = []
        penalties: dict[str, Penalty] = {}
        for check, counter in zip(checks, counters, strict=True):
            at = index.get(id(counter))
            if at is None:
                at = index[id(counter)] = len(items)
                items.append(_Item(local._spec(check), check.cost, check.key))
                owners.append(counter)
            else:
                items[at].cost += check.cost
            mapping.append(at)
            add_penalty(penalties, check.key, check)
        boxes: dict[str, _BoxState] = {key: local._box_state(key, pen, t, now) for key, pen in penalties.items()}
        for key in penalties:
            self._penalty_keys.setdefault(key, 0)
        blocked_before = any(b.was for b in boxes.values())
        all_ok = True
        for item, counter in zip(items, owners, strict=True):
            w = counter.w
            idx = t_us // w
            e = t_us - idx * w
            p, c = counter.count(idx - 1), counter.count(idx)
            ok, remaining, wait = _counter_decide(p, c, item.cost, counter.limit, e, w)
            all_ok &= ok
            item.ok, item.remaining = ok, remaining
            item.wait = wait * 1000 if wait >= 0 else -1
            item.reset = _counter_reset(p, c, e, w) * 1000
        allowed = all_ok and not blocked_before
        if charge and allowed:
            for item, counter in zip(items, owners, strict=True):
                w = counter.w
                idx = t_us // w
                # reset as the Redis script gives it: after the charge
                item.reset = _counter_reset(counter.count(idx - 1), counter.count(idx) + item.cost, t_us - idx * w, w)
                item.reset *= 1000
                if item.cost:
                    counter.add(idx, item.cost)
        if charge and not allowed:
            for key, pen in penalties.items():
                if not boxes[key].was and any(not item.ok for item in items if item.key == key):
                    boxes[key] = local._violation(key, pen, boxes[key], t, now)
                    if boxes[key].until > t:
                        self._penalty_keys[key] = boxes[key].until
        decision = local._decision(checks, items, mapping, boxes, allowed, t)
        decision.server_time_us = t_us
        if charge:
            self._count(decision)
        return decision

    def _count(self, decision: Decision) -> None:
        if decision.allowed:
            self._allowed += 1
        else:
            self._denied += 1

    # -- reconciliation -------------------------------------------------------------------------

    async def sync(self, every: bool = True) -> bool:
        """Push this process's units and pull the global counts now: of every counter this process
        tracks (``every``), or of those used since the last sync — what the background task does
        every ``sync_interval``. True on success; on failure the units stay pending and decisions
        fall back to the local limiter until a sync succeeds."""
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:  # one at a time: a second would push the first's units again
            return await self._sync(every)

    async def _sync(self, every: bool) -> bool:
        counters = [c for c in self._counters.values() if every or not c.idle]
        penalty_keys = self._penalty_keys
        self._penalty_keys = {}
        if not counters and not penalty_keys:
            return True
        # group by Redis Cluster slot (one group on a single server)
        groups: dict[int, tuple[list[tuple[HybridCounter, list[tuple[int, int]]]], list[tuple[str, int]]]] = {}
        for counter in counters:
            inflight = counter.begin_sync()  # what is pending goes in flight
            groups.setdefault(self.redis.slot_of(counter.key), ([], []))[0].append((counter, inflight))
        mono_now = self.local.clock()
        t = _ns(mono_now)
        redis_now = self.redis_now_us()
        for key, until in penalty_keys.items():
            want = redis_now + (until - t) // 1000 if until > t else 0
            groups.setdefault(self.redis.slot_of(key), ([], []))[1].append((key, want))
        calls: list[tuple[lua.Script, list[str], list[str | int]]] = []
        for group, pens in groups.values():
            keys = [c.rkey for c, _ in group] + [self.redis.block_key(key) for key, _ in pens]
            args: list[str] = [str(len(group)), str(len(pens))]
            for c, inflight in group:
                args += (str(c.w), str(len(inflight)))
                for idx, units in inflight:
                    args += (str(idx), str(units))
            args += (str(want) for _, want in pens)
            calls.append((SYNC, keys, [" ".join(args)]))
        sent = time.monotonic()
        try:
            replies = await self.redis.run_scripts(calls)
        except (RedisUnavailable, asyncio.CancelledError) as exc:
            # not sent, or sent without a reply: push again later (an overcount if it ran)
            for counter in counters:
                counter.sync_failed()
            for key, until in penalty_keys.items():
                self._penalty_keys[key] = max(self._penalty_keys.get(key, 0), until)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._sync_failures += 1
            if not self._degraded:
                self._degraded = True
                self._incidents += 1
                log.warning(
                    "hybrid rate limiter: %s; deciding with the local limits of this machine until it answers "
                    "(this is logged once per incident)",
                    exc,
                )
            return False
        received = time.monotonic()
        self._last_latency = received - sent
        for (group, pens), reply in zip(groups.values(), replies, strict=True):
            now_us = int(reply[0])
            # Redis read its clock somewhere in the round trip: take the middle
            offset = self._redis_clock.offset = now_us / 1e6 - (self.clock() - (received - sent) / 2)
            for n, (counter, _) in enumerate(group):
                # the global counts replace this view's; pending units of windows that no longer
                # matter are dropped
                self._pushed += counter.sync_done(now_us, int(reply[1 + 2 * n]), int(reply[2 + 2 * n]))
            base = 1 + 2 * len(group)
            slack = max(0.001, received - sent)  # how far off our estimate of Redis' clock may be
            for n, (key, _) in enumerate(pens):
                until_us = int(reply[base + n])
                state = self.local.block_state_sync(key)
                if until_us > now_us:
                    # Redis' end on this process's clock now (not from the reply's TIME: the reply
                    # took a while to be read), as the offset just estimated says
                    left = until_us / 1e6 - offset - self.clock()
                    if left > slack and (state is None or state.remaining < left - slack):
                        self.local.block_sync(key, left)
                        state = self.local.block_state_sync(key)
                    if state is not None:
                        # The end as the machine's table reads it (rounded up, by up to 2.1 s for
                        # long blocks): what to recognise the block by when Redis drops it.
                        self._shared[key] = self.local.clock() + state.remaining
                    continue
                shared = self._shared.pop(key, None)
                if state is not None and shared is not None and self.local.clock() + state.remaining <= shared + 0.001:
                    # a block Redis had and no longer has (not a newer one of ours): unblocked by
                    # an admin somewhere
                    self.local.unblock_sync(key)
        self._syncs += 1
        if self._degraded:
            self._degraded = False
            log.info("hybrid rate limiter: Redis answers again; deciding on cluster-wide counts")
        return True

    # -- the penalty box ------------------------------------------------------------------------

    async def block(self, key: str, seconds: float) -> float:
        """Block ``key`` for ``seconds`` here and in Redis (when it answers); the Unix time it is
        blocked until."""
        until = self.local.block_sync(key, seconds)
        try:
            return max(until, await self.redis.block(key, seconds))
        except RedisUnavailable:
            self._penalty_keys[key] = _ns(self.local.clock() + seconds)
            return until

    async def unblock(self, key: str) -> bool:
        """Unblock ``key`` in Redis and here; True if it was blocked in either. The other
        instances unblock it at their next sync that checks it (a block they had from Redis)."""
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:  # no sync re-applying the block from Redis meanwhile
            was = False
            try:
                was = await self.redis.unblock(key)
            except RedisUnavailable:
                pass
            was |= self.local.unblock_sync(key)
            self._penalty_keys.pop(key, None)
            self._shared.pop(key, None)
        return was

    async def block_state(self, key: str) -> BlockedKey | None:
        """``key``'s block as this machine applies it (blocks from Redis arrive with the syncs)."""
        return self.local.block_state_sync(key)

    async def list_blocked(self) -> list[BlockedKey]:
        """Keys blocked here or in Redis (Redis' list when it answers), by remaining time."""
        found = {b.key: b for b in self.local.list_blocked_sync()}
        try:
            for b in await self.redis.list_blocked():
                if b.key not in found or found[b.key].remaining < b.remaining:
                    found[b.key] = b
        except RedisUnavailable:
            pass
        return sorted(found.values(), key=lambda b: (b.remaining, b.key))


def overshoot_bound(limit: int, instances: int, rate: float, sync_interval: float, rtt: float = 0.002) -> float:
    """The most a fixed window can hold (module doc): ``limit + N × R × (2·sync_interval + RTT)``."""
    return limit + instances * rate * (2 * sync_interval + rtt)


if TYPE_CHECKING:
    _: type[Limiter] = HybridLimiter

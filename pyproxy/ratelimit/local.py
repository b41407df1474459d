"""Rate limits for the worker processes of one machine: mode ``local``, no network.

:class:`LocalLimiter` decides a request's checks through one
:class:`~pyproxy.core.SharedWindows` table — sliding-window counters in a ``MAP_SHARED`` mapping
made before the supervisor forks its workers (``core_rs/src/shared_window.rs``) — so a limit of
100/s holds for the whole proxy, not per worker. Everything it keeps, the penalty box included,
lives in that table; nothing is locked and a worker that dies mid-request leaves nothing held.

**Sharing.** Make the limiter (or at least the table: ``LocalLimiter(table)``) in the supervisor
before forking: workers inherit it. Made after a fork, a limiter has a table of its own (one
process). :meth:`LocalLimiter.list_blocked` reads a journal of blocked keys (a ring of 4096 names
in a shared mapping, entries claimed by an atomic counter in the table and checked by CRC) that
is shared only when the limiter itself was made before the fork (with a table handed over, each
worker lists the keys it blocked itself); blocking, unblocking and the decisions are shared
either way.

**Cost** (2-vCPU development machine, ``pyproxy.core`` release build): ``hit_sync`` 3.3 µs for one
check, 6 µs for three, 7 µs with a penalty box — mostly the reads behind an allowed decision's
per-check ``remaining`` / ``reset`` (two table calls per check, see below) and building the
result objects; :meth:`LocalLimiter.admit`, the same decision without those details (``None``
when allowed), 1.0 µs / 1.6 µs / 2.4 µs. A ``hit_all`` that returned each triple's counts would
let ``hit_sync`` cost about what ``admit`` does.

**Counters** (``sliding_window_counter``): one table counter per ``(key, limit, window)`` — the
table name is ``c:<limit>:<window ns>:<key>`` — so two limits on one key (20 per 1 s and 1000
per 1 h, or two routes giving one key different limits) never share a count, as in Redis. All
checks of a request go through one ``SharedWindows.hit_all``: decided on the counts as they
stand, charged by one compare-and-swap each, rolled back if another process took the room in
between (all or none; the table's doc has the fine print). The arithmetic is the Rust
``SlidingWindow``'s (and the Redis script's): estimate ``⌊P·(W−e)/W⌋ + C``, allowed iff
``estimate + cost ≤ limit``.

**Exact answers.** ``hit_all`` reports one denial index and the extremes; the per-check fields of
:class:`~pyproxy.ratelimit.checks.CheckResult` (``remaining``, ``retry_after``, ``reset``) come
from reading each counter's two fixed-window counts after the decision: a read (``cost=0``, which
never charges nor creates a key) at the start of the current window gives ``P + C``, one at the
start of the next gives ``C``; the Redis script's formulas then apply unchanged. Exact while the
monotonic clock is below 2^52 ns (52 days of uptime: a float's ``now`` then names every
nanosecond); later a window start can only be named within a few ns, and a count is off by one
only if it exceeds ``window / 8 ns``. Values read after the decision include other processes'
charges made meanwhile (they are what stands).

**sliding_log** (exact: never more than ``limit`` in any ``window``). The table only counts, so
local mode keeps a log as ``log_slices`` (16) fixed sub-windows of ``⌈window/16⌉``, one table
counter each (``l:<limit>:<window ns>:<sub-window>:<key>``), and admits a request iff the counts of
the current sub-window and the 16 before it, plus its cost, stay within the limit. Every interval
of length ``window`` lies inside those 17 sub-windows, so **the limit is not exceeded, across all
the workers** — the promise that makes ``sliding_log`` worth choosing (checked with 4 forked
workers). The price: a unit is forgotten up to one sub-window (1/16 of the window) late, so a
client kept at the limit gets less than Redis' log gives it — measured 0.95 of it over 20 s at
any request rate — and a log key holds up to 34 table slots. The charge is one compare-and-swap
on the current sub-window's counter against a limit computed from the finished ones (read once
per process and cached: they no longer change — but the last one, read afresh), inside the same
``hit_all`` as the counters. *The lag rule*: a worker whose clock reading is older than the
sub-window others already charge (preempted between reading the clock and charging) charges that
later sub-window instead, so concurrent charges meet on one counter and its compare-and-swap
orders them; what remains is two workers crossing a sub-window boundary within the same
microseconds, each reading the other's counter just before the other's charge (at most one unit
per such pair). Rejected alternatives: a per-process exact ``SlidingWindow`` (silently multiplies
the limit by the number of workers) and refusing ``sliding_log`` in local mode (leaves no exact
limit without Redis).

**Penalty box** (:class:`~pyproxy.ratelimit.checks.Penalty`), shared by all workers through the
same table:

- *Violations*: a table counter per key, ``limit = max_violations`` per sliding
  ``violation_window``; a violation that counter refuses is the one over the limit and blocks the
  key (Redis counts them in a fixed window from the first violation; here it is the sliding
  estimate). The counter's name carries the serial of the key's last block (itself kept in a
  register), so each block starts a fresh count.
- *Blocks*: a block is a 32-bit record ``(blocked until, strikes)`` kept in "registers": table
  counters used as atomic compare-and-add words, one per key per 275-second (2^38 ns) period,
  read with ``cost=0`` and raised with ``hit(limit=new, cost=new−old)`` — which succeeds only if
  nobody changed the word since it was read (records are ordered by their end, so raising is
  the only write). A block is written into every period it (and the memory of its strikes)
  spans, so a worker reads two words per request and key with a penalty box (the key's epoch,
  below, and the record). ``until`` is kept to 33 µs (rounded up) within a period of it, to 2.1 s
  beyond. Two workers blocking a key at once write one block (the second sees the first's),
  never two strikes.
- *Strikes*: each block doubles the next one up to ``block_max``; strikes are forgotten
  ``max(block_max, violation_window)`` after a block ends (exact), as in Redis.
- :meth:`~LocalLimiter.block` extends a block (with the key's strikes) but never shortens one
  (Redis' ``block`` may); :meth:`~LocalLimiter.unblock` moves the key to a new *epoch* — every
  name above carries it — which forgets its block, strikes and violations for every worker at
  once. The epoch is a table counter that never expires: one slot per key ever unblocked.
- Blocks and their strike memory are written at most 8192 periods (26 days) ahead: a longer block
  ends there. A table too full to take a block's word is counted (``overflows``), logged once,
  and the block then holds in this worker only.

**Full table**: a new key that finds no slot is allowed uncounted (the table's policy:
``stats().overflows``); size it at about twice the keys live at once (two windows' worth).
"""

from __future__ import annotations

import logging
import math
import mmap
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pyproxy.core import ChargePlan, SharedWindows, Tally
from pyproxy.ratelimit.checks import Binding, BlockedKey, Check, CheckResult, Decision, Penalty, TupleMemo, add_penalty
from pyproxy.ratelimit.headers import plan_fields

if TYPE_CHECKING:
    from pyproxy.ratelimit.base import Limiter

__all__ = ["MAX_LIMIT", "LocalLimiter", "LocalLimiterStats"]

log = logging.getLogger("pyproxy.ratelimit.local")

#: Largest limit the shared table counts (its counts are 32-bit).
MAX_LIMIT: Final = 2**32 - 1

_NS: Final = 1_000_000_000


def _secs_for(ns: int) -> float:
    """A ``now``/``window`` in seconds that the table reads as ``ns`` nanoseconds.

    The table converts with ``int(seconds * 1e9)`` (as Python does here): the smallest float that
    lands on ``ns`` or, where floats are too sparse for that (past 2^52 ns), just above it.
    """
    if ns <= 0:
        return 0.0
    f = ns / 1e9
    for _ in range(64):
        if int(f * 1e9) >= ns:
            break
        f = math.nextafter(f, math.inf)
    for _ in range(64):
        g = math.nextafter(f, -math.inf)
        if int(g * 1e9) < ns:
            break
        f = g
    return f


def _ns(seconds: float) -> int:
    """Seconds → the nanoseconds the table sees (its ``secs_to_ns``: multiply, truncate)."""
    return int(seconds * 1e9)


# Registers: table counters read as words (see the module doc).
_REG_FOREVER_NS: Final = _ns(_secs_for(2**59))  # 18 years: window index 0 for the machine's uptime
_REG_FOREVER: Final = _secs_for(_REG_FOREVER_NS)
_PEN_NS: Final = 2**38  # one register per key per 275 s period
_PEN_W: Final = _secs_for(_PEN_NS)
_PEN_CHAIN: Final = 8192  # periods written ahead at most (26 days)
_STRIKES_MAX: Final = 63
# A block record: mode (2 bits) | field (24 bits) | strikes (6 bits), ordered by the block's end
# within one period's word. Mode 1: the end lies within a period of the word's period start, in
# fine ticks (33 µs, rounded up); mode 2: later, in coarse ticks past the period's end (2.1 s,
# rounded up; 417 days); mode 0: earlier, in coarse ticks before the period's start (rounded to
# the later end: strikes are remembered up to 2.1 s longer).
_FINE: Final = 2**15
_COARSE: Final = 2**31
_F24: Final = 1 << 24

assert _ns(_PEN_W) == _PEN_NS, "2^38 ns must be representable"


def _encode_block(until: int, j: int, strikes: int) -> int:
    """The word of period ``j`` for a block ending at ``until`` (ns) after ``strikes`` blocks."""
    d = until - j * _PEN_NS
    if d >= _PEN_NS:
        mode, field = 2, min(-(-(d - _PEN_NS) // _COARSE), _F24 - 1)
    elif d >= -_PEN_NS:
        mode, field = 1, -(-(d + _PEN_NS) // _FINE)
        if field >= _F24:
            mode, field = 2, 0
    else:
        mode, field = 0, max(_F24 - 1 - (-_PEN_NS - d) // _COARSE, 1)
    return (mode << 30) | (field << 6) | min(strikes, _STRIKES_MAX)


def _decode_block(v: int, j: int) -> tuple[int, int]:
    """``(until ns, strikes)`` of period ``j``'s word ``v`` (non-zero)."""
    mode, field, base = v >> 30, (v >> 6) & (_F24 - 1), j * _PEN_NS
    if mode >= 2:
        until = base + _PEN_NS + field * _COARSE
    elif mode == 1:
        until = base - _PEN_NS + field * _FINE
    else:
        until = base - _PEN_NS - (_F24 - 1 - field) * _COARSE
    return until, v & 63


def _first_fit(w: int, p: int, s: int) -> int:
    """First offset ``e'`` of a window ``w`` at which ``⌊p·(w−e')/w⌋ ≤ s`` (``p > 0``)."""
    return max(w + 1 - -(-(s + 1) * w // p), 0)


def _counter_decide(p: int, c: int, cost: int, limit: int, e: int, w: int) -> tuple[bool, int, int]:
    """``(ok, remaining, wait ns or -1)``: ``core_rs`` ``counter_decide`` / the Redis script's."""
    used = p * (w - e) // w + c
    if used + cost <= limit:
        return True, limit - used - cost, 0
    remaining = max(limit - used, 0)
    if cost > limit:
        return False, remaining, -1
    if c + cost <= limit:
        wait = max(_first_fit(w, p, limit - c - cost) - e, 0)
    else:
        wait = (w - e) + _first_fit(w, c, limit - cost)
    return False, remaining, wait


def _counter_reset(p: int, c: int, e: int, w: int) -> int:
    """ns until the estimate is back to 0 (the Redis script's ``reset``)."""
    if c > 0:
        return (w - e) + _first_fit(w, c, 0)
    if p > 0:
        return max(_first_fit(w, p, 0) - e, 0)
    return 0


@dataclass(frozen=True, slots=True)
class LocalLimiterStats:
    """Counters of a :class:`LocalLimiter` in this process since it was made (for metrics).

    ``allowed`` / ``denied`` requests (``blocked``: denied by the penalty box), ``new_blocks``:
    keys this process put in the box. ``capacity``, ``live`` (slots counting now: reads every
    slot, so :meth:`LocalLimiter.stats` is not for the hot path) and ``overflows`` (new keys allowed
    uncounted because the table was full) are the shared table's, for all processes.
    """

    healthy: bool
    allowed: int
    denied: int
    blocked: int
    new_blocks: int
    capacity: int
    live: int
    overflows: int


@dataclass(slots=True)
class _Spec:
    """How a check's limit maps onto the table (cached per ``(key, algorithm, limit, window)``)."""

    name: str  # table key (counters) or the prefix of the sub-window keys (logs)
    log: bool
    limit: int
    w: int  # window, ns
    window: float  # the window as the table is given it (counters)
    slice_ns: int = 0  # logs: sub-window length
    big: float = 0.0  # logs: the table window of the sub-window counters (a multiple of slice_ns)
    triple: tuple[int, float, str] = (0, 0.0, "")  # counters: what hit_all is given


# What the usual request needs, made once per tuple of checks (LocalLimiter._fast_plan): the specs,
# hit_all's triples, the keys under a penalty box (checked for a block per request), the one cost.
_FastPlan = tuple[list[_Spec], list[tuple[int, float, str]], tuple[str, ...], int]
# a fast plan and what SharedWindows.hit_all_binding answered for it
_FastCharge = tuple[_FastPlan, tuple[bool, int, float, int, int, float]]


@dataclass(slots=True)
class _Item:
    """A distinct counter of a request (checks on the same one are merged, costs added)."""

    spec: _Spec
    cost: int
    key: str
    # state read for the decision (filled in by _decide)
    ok: bool = True
    remaining: int = 0
    wait: int = 0  # ns, -1 never
    reset: int = 0
    # logs: the finished sub-windows' counts (oldest first) and the current one's key
    past: int = 0
    counts: tuple[int, ...] = ()
    cur_name: str = ""
    sub: int = 0  # the sub-window charged


@dataclass(slots=True)
class _BoxState:
    """A key's penalty-box state as read at ``now`` (ns)."""

    epoch: int
    until: int  # ns, monotonic; 0 when never blocked (or forgotten)
    strikes: int  # remembered strikes (0 once forgotten)
    was: bool  # blocked when read


class _Journal:
    """Names of keys that were blocked: a ring of fixed-size entries in a shared anonymous mapping.

    Entries are claimed by an atomic counter in the table (a forever register) and checked by a
    CRC, so a torn or overwritten entry is skipped, never misread. Only for listing.
    """

    ENTRY: Final = 256
    ENTRIES: Final = 4096
    _HEAD: Final = struct.Struct("<IHHI")

    def __init__(self, table: SharedWindows) -> None:
        self._table = table
        self._mm = mmap.mmap(-1, self.ENTRY * self.ENTRIES)  # MAP_SHARED: inherited by forks

    def add(self, key: str) -> None:
        data = key.encode()
        if len(data) > self.ENTRY - self._HEAD.size:
            return  # too long to list (still blocked)
        _, left, _ = self._table.hit(MAX_LIMIT, _REG_FOREVER, "pj:seq", 1)
        seq = MAX_LIMIT - left
        at = (seq % self.ENTRIES) * self.ENTRY
        head = self._HEAD.size
        self._mm[at + head : at + head + len(data)] = data
        self._mm[at : at + head] = self._HEAD.pack(seq, len(data), 0, zlib.crc32(data))

    def keys(self) -> set[str]:
        found: set[str] = set()
        head = self._HEAD.size
        for at in range(0, self.ENTRY * self.ENTRIES, self.ENTRY):
            seq, n, _, crc = self._HEAD.unpack_from(self._mm, at)
            if seq == 0 or n > self.ENTRY - head:
                continue
            data = self._mm[at + head : at + head + n]
            if zlib.crc32(data) == crc:
                try:
                    found.add(data.decode())
                except UnicodeDecodeError:
                    continue
        return found


class LocalLimiter:
    """Multi-check rate limiting for the worker processes of one machine; see the module doc.

    ``table``: a :class:`~pyproxy.core.SharedWindows` made before the workers were forked (shared
    by them); ``None`` makes one of ``capacity`` slots (shared with processes forked after this
    limiter is made). ``log_slices``: sub-windows of a ``sliding_log`` limit (more: closer to an
    exact log, more table slots per key; 2 to 64). ``clock``: seconds on ``CLOCK_MONOTONIC``, the
    one clock every process shares (another is for tests: all users of a table must agree on it).

    :meth:`hit_sync` / :meth:`peek_sync` decide synchronously (a few µs, no I/O); :meth:`hit` /
    :meth:`peek` are their ``async`` twins for the :class:`~pyproxy.ratelimit.base.Limiter`
    interface. One instance per process (or thread): its small caches are not locked.
    """

    def __init__(
        self,
        table: SharedWindows | None = None,
        *,
        capacity: int = 65536,
        log_slices: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(log_slices, int) or not 2 <= log_slices <= 64:
            raise ValueError(f"log_slices must be an int in [2, 64], got {log_slices!r}")
        self.table = table if table is not None else SharedWindows(capacity)
        self.log_slices = log_slices
        self.clock = clock
        self._journal = _Journal(self.table)
        self._specs: dict[tuple[str, str, int, float], _Spec] = {}
        self._fast_plans: TupleMemo[_FastPlan | None] = TupleMemo()
        self._charge_plans: TupleMemo[ChargePlan | None] = TupleMemo()  # variant: with fields
        self._plans_allowed = Tally()  # what every plan handed out allowed
        # logs: counts of finished sub-windows, per sub-window key (they no longer change)
        self._past: dict[str, int] = {}
        # counters: (window index, its start, the next one's start as the table's `now`), per window
        self._starts: dict[int, tuple[int, float, float]] = {}
        # blocks this process could not write to the table (full): key -> (epoch, until ns, strikes)
        self._private_blocks: dict[str, tuple[int, int, int]] = {}
        self._overflow_logged = False
        self._allowed = 0
        self._denied = 0
        self._blocked = 0
        self._new_blocks = 0

    # -- the Limiter interface ------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Always true: nothing external to fail."""
        return True

    def stats(self) -> LocalLimiterStats:
        return LocalLimiterStats(
            healthy=True,
            allowed=self._allowed + self._plans_allowed.value,
            denied=self._denied,
            blocked=self._blocked,
            new_blocks=self._new_blocks,
            capacity=self.table.capacity,
            live=self.table.live(),
            overflows=self.table.overflows,
        )

    async def hit(self, checks: Sequence[Check]) -> Decision:
        """:meth:`hit_sync`, awaitable."""
        return self.hit_sync(checks)

    async def peek(self, checks: Sequence[Check]) -> Decision:
        """:meth:`peek_sync`, awaitable."""
        return self.peek_sync(checks)

    async def block(self, key: str, seconds: float) -> float:
        """:meth:`block_sync`, awaitable."""
        return self.block_sync(key, seconds)

    async def unblock(self, key: str) -> bool:
        """:meth:`unblock_sync`, awaitable."""
        return self.unblock_sync(key)

    async def block_state(self, key: str) -> BlockedKey | None:
        """:meth:`block_state_sync`, awaitable."""
        return self.block_state_sync(key)

    async def list_blocked(self) -> list[BlockedKey]:
        """:meth:`list_blocked_sync`, awaitable."""
        return self.list_blocked_sync()

    async def aclose(self) -> None:
        """Nothing to release (the table lives as long as a process refers to it)."""

    async def __aenter__(self) -> LocalLimiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- deciding -------------------------------------------------------------------------------

    def hit_sync(self, checks: Sequence[Check]) -> Decision:
        """Decide ``checks`` for one request and charge all of them if all admit it, else none.

        Counts penalty-box violations and blocks keys that pass ``max_violations``. Raises
        ``ValueError`` for a check the table cannot count (``limit`` above :data:`MAX_LIMIT`) or
        for one key given two different penalty boxes.
        """
        return self._decide(checks, charge=True)

    def peek_sync(self, checks: Sequence[Check]) -> Decision:
        """What :meth:`hit_sync` would answer now, charging nothing and counting no violation."""
        return self._decide(checks, charge=False)

    def supports(self, check: Check) -> bool:
        """Whether this limiter can count ``check`` (its limit fits the table's 32-bit counts)."""
        return check.limit <= MAX_LIMIT

    def _spec(self, check: Check) -> _Spec:
        ident = (check.key, check.algorithm, check.limit, check.window)
        spec = self._specs.get(ident)
        if spec is None:
            if check.limit > MAX_LIMIT:
                raise ValueError(
                    f"check {check.name!r}: limit {check.limit} is above what local limiting counts ({MAX_LIMIT})"
                )
            w = _ns(check.window)
            if check.algorithm == "sliding_log":
                slice_ns, big = self._log_geometry(w)
                spec = _Spec(f"l:{check.limit}:{w}:", True, check.limit, w, check.window, slice_ns, big)
            else:
                name = f"c:{check.limit}:{w}:{check.key}"
                spec = _Spec(name, False, check.limit, w, check.window, triple=(check.limit, check.window, name))
            if len(self._specs) >= 65536:
                self._specs.clear()
            self._specs[ident] = spec
        return spec

    def _log_geometry(self, w: int) -> tuple[int, float]:
        """Sub-window length and the table window of its counters: ``(k+1)`` sub-windows exactly
        (so a sub-window never straddles two table windows), ``k`` of them covering ``w``."""
        k = self.log_slices
        slice_ns = -(-w // k)
        for _ in range(4096):  # past 2^52 ns not every length is a float's: find one that is
            big = _secs_for((k + 1) * slice_ns)
            if _ns(big) == (k + 1) * slice_ns:
                return slice_ns, big
            slice_ns += 1
        raise ValueError(f"sliding_log window of {w} ns cannot be divided into sub-windows here")

    def admit(self, checks: Sequence[Check]) -> Decision | None:
        """:meth:`hit_sync` without the details of an allowed request: ``None`` when it is allowed
        (and charged), else the full denial. For a data plane that sends no ``RateLimit`` headers
        on allowed responses: the per-check reads behind an allowed decision's ``remaining`` and
        ``reset`` are most of its cost (measured here, 3 levels: 1.6 µs against 6 µs).
        """
        got = self.hit_binding(checks)  # the binding comes with hit_all's answer at no cost
        return None if isinstance(got, tuple) or got.allowed else got

    def hit_binding(self, checks: Sequence[Check]) -> Decision | Binding:
        """:meth:`hit_sync` for a data plane whose allowed responses advertise one check (the
        ``RateLimit`` header names the binding check only): the usual allowed request answers
        ``(check, remaining, reset)`` for that check, charged — what the table's ``hit_all``
        works out anyway, so it costs no per-check reads and no :class:`CheckResult`; any other
        request gets the full :class:`Decision` (allowed or denied).
        """
        if not checks:
            return Decision(True, ())
        now = self.clock()
        t = _ns(now)
        fast = self._fast_charge(checks, now, t)
        if fast is not None:
            ok, _, _, remaining, binding, reset = fast[1]
            if ok:
                self._allowed += 1
                return (checks[binding], remaining, reset)
        return self._decide(checks, True, now, t, fast)

    def charge_plan(self, checks: Sequence[Check], fields: bool) -> ChargePlan | None:
        """``checks`` prepared for the data plane's usual request: one call that decides and
        charges as :meth:`hit_binding` does and, allowed, answers the response's fields
        (``RateLimit-Policy`` and ``RateLimit`` with ``fields``, none without) — ``None`` when
        denied, having charged nothing (:meth:`hit_binding` then gives the details).

        ``None`` instead of a plan for checks that are not the usual request (a sliding log, mixed
        costs, a counter twice) or that have a penalty box, whose blocks the general path reads.
        Kept per tuple of checks (by identity, as :meth:`_fast_plan`; other sequences get
        ``None``); every plan's allowed charges count in :meth:`stats`, however long it is kept.
        Plans read the monotonic clock themselves: none for a limiter on another clock.
        """
        try:
            return self._charge_plans.get(checks, fields)
        except KeyError:
            pass
        if type(checks) is not tuple or self.clock is not time.monotonic:
            return None
        fast = self._fast_plan(checks)
        plan = None
        if fast is not None and not fast[2]:
            _, triples, _, cost = fast
            plan = ChargePlan(self.table, triples, cost, plan_fields(checks) if fields else None, self._plans_allowed)
        self._charge_plans.put(checks, fields, plan)
        return plan

    def _fast_charge(self, checks: Sequence[Check], now: float, t: int) -> _FastCharge | None:
        """The usual request, quickly: counters only, one cost, each counter once, no key blocked.

        ``(its plan, the table's hit_all_binding answer)``: allowed (and charged) or refused
        (nothing charged); ``None``, having done nothing, for another kind of request (the general
        path decides it).
        """
        plan = self._fast_plan(checks)
        if plan is None:
            return None
        _, triples, penalized, cost = plan
        for key in penalized:
            if self._is_blocked(key, t, now):
                return None
        return plan, self.table.hit_all_binding(triples, cost, now)

    def _fast_plan(self, checks: Sequence[Check]) -> _FastPlan | None:
        """What :meth:`_fast_charge` needs of ``checks`` (``None``: not a usual request), kept for
        a tuple of checks seen before — by identity: a tuple never changes, and the memo holds it
        (a rate-limit policy hands out the same tuple per route and key)."""
        try:
            return self._fast_plans.get(checks)
        except KeyError:
            pass
        plan = self._make_fast_plan(checks)
        self._fast_plans.put(checks, None, plan)
        return plan

    def _make_fast_plan(self, checks: Sequence[Check]) -> _FastPlan | None:
        specs = self._specs
        cost = checks[0].cost
        if cost < 1:
            return None
        chosen: list[_Spec] = []
        for check in checks:
            spec = specs.get((check.key, check.algorithm, check.limit, check.window))
            if spec is None:
                spec = self._spec(check)
            if spec.log or check.cost != cost or spec.limit < 1:
                return None
            chosen.append(spec)
        if len({spec.name for spec in chosen}) != len(chosen):
            return None
        seen: dict[str, Penalty] = {}
        try:
            for check in checks:
                add_penalty(seen, check.key, check)
        except ValueError:
            return None  # the general path refuses it
        return chosen, [spec.triple for spec in chosen], tuple(seen), cost

    def _allowed_decision(self, checks: Sequence[Check], chosen: list[_Spec], t: int) -> Decision:
        """The details of a request :meth:`_fast_charge` allowed (two reads per counter)."""
        self._allowed += 1
        hit = self.table.hit
        starts_by_w = self._starts
        results: list[CheckResult] = []
        for check, spec in zip(checks, chosen, strict=True):
            w = spec.w
            idx = t // w
            e = t - idx * w
            starts = starts_by_w.get(w)
            if starts is None or starts[0] != idx:
                starts = self._window_starts(w, idx)
            c = MAX_LIMIT - hit(MAX_LIMIT, spec.window, spec.name, 0, starts[2])[1]
            p = MAX_LIMIT - hit(MAX_LIMIT, spec.window, spec.name, 0, starts[1])[1] - c
            if p < 0:
                p = 0
            used = p * (w - e) // w + c
            if c > 0:
                reset = (w - e) + max(w + 1 - -(-w // c), 0)
            elif p > 0:
                reset = max(max(w + 1 - -(-w // p), 0) - e, 0)
            else:
                reset = 0
            results.append(CheckResult(check, True, max(spec.limit - used, 0), 0.0, reset / 1e9))
        return Decision(True, tuple(results))

    def _window_starts(self, w: int, idx: int) -> tuple[int, float, float]:
        """(``idx``, the start of window ``idx``, the next one's start) as the table's ``now``."""
        starts = (idx, _secs_for(idx * w), _secs_for((idx + 1) * w))
        if len(self._starts) >= 4096:
            self._starts.clear()
        self._starts[w] = starts
        return starts

    def _decide(
        self,
        checks: Sequence[Check],
        charge: bool,
        now: float | None = None,
        t: int = 0,
        pre: _FastCharge | None = None,
    ) -> Decision:
        """The general path; ``pre``: what the fast path's ``hit_all`` answered (a refusal when it
        gets here, unless the fast path was not taken yet)."""
        if not checks:
            return Decision(True, ())
        table = self.table
        if now is None:
            now = self.clock()
            t = _ns(now)
            if charge:
                pre = self._fast_charge(checks, now, t)
        if pre is not None and pre[1][0]:
            return self._allowed_decision(checks, pre[0][0], t)
        # -- plan: distinct counters, check -> counter, penalty boxes by key
        items: list[_Item] = []
        index: dict[str, int] = {}
        mapping: list[int] = []
        penalties: dict[str, Penalty] = {}
        for check in checks:
            spec = self._spec(check)
            ident = spec.name + check.key if spec.log else spec.name
            at = index.get(ident)
            if at is None:
                at = index[ident] = len(items)
                items.append(_Item(spec, check.cost, check.key))
            else:
                items[at].cost += check.cost
            mapping.append(at)
            add_penalty(penalties, check.key, check)
        # -- the penalty box first: a blocked key is denied without charging anything
        boxes = {key: self._box_state(key, pen, t, now) for key, pen in penalties.items()}
        blocked_before = any(b.was for b in boxes.values())
        # -- logs: what the finished sub-windows hold
        python_denied = False
        for item in items:
            spec = item.spec
            if spec.log:
                s = t // spec.slice_ns
                # The lag rule (as the table's for counters): a process whose clock reading is
                # older than the sub-window others already charge (it was preempted between
                # reading the clock and charging) charges that later one, so that concurrent
                # charges meet on one counter and its compare-and-swap orders them.
                while self._read(spec.limit, spec.big, f"{spec.name}{s + 1}:{item.key}", self._slice_time(spec, s + 1)):
                    s += 1
                item.sub = s
                item.counts = self._log_past(spec, item.key, s)
                item.past = sum(item.counts)
                item.cur_name = f"{spec.name}{s}:{item.key}"
                if item.cost > 0 and item.past + item.cost > spec.limit:
                    python_denied = True
            elif item.cost > spec.limit:
                python_denied = True
        # -- charge: one hit_all over every counter that costs something
        charged = False
        called = False  # hit_all decided
        rust_denied: int | None = None
        rust_retry = 0.0
        if pre is not None:
            # the fast path's hit_all refused the request (checks there are items here, in order)
            called = True
            rust_denied, rust_retry = mapping[pre[1][1]], pre[1][2]
        elif charge and not blocked_before and not python_denied:
            paid = [i for i, item in enumerate(items) if item.cost > 0]
            if paid:
                called = True
                costs = {items[i].cost for i in paid}
                triples: list[tuple[int, float, str]] = []
                owners: list[int] = []
                top_up: list[int] = []
                if len(costs) == 1:
                    unit = items[paid[0]].cost
                    for i in paid:
                        triples.append(self._triple(items[i], items[i].cost))
                        owners.append(i)
                else:
                    unit = math.gcd(*costs)
                    if sum(c // unit for c in (items[i].cost for i in paid)) <= 32:
                        # each counter listed cost/unit times: hit_all decides the n-th listing
                        # with n·unit, i.e. the last with the counter's whole cost (exact)
                        for i in paid:
                            for _ in range(items[i].cost // unit):
                                triples.append(self._triple(items[i], items[i].cost))
                                owners.append(i)
                    else:
                        # decided on the whole cost (the limit lowered by cost − unit), charged
                        # unit, the rest added right after (see _triple)
                        unit = min(costs)
                        for i in paid:
                            triples.append(self._triple(items[i], items[i].cost, unit))
                            owners.append(i)
                            if items[i].cost > unit:
                                top_up.append(i)
                ok, first, retry, _ = table.hit_all(triples, unit, now)
                if ok:
                    charged = True
                    for i in top_up:
                        item = items[i]
                        name = item.cur_name if item.spec.log else item.spec.name
                        window = item.spec.big if item.spec.log else item.spec.window
                        table.hit(MAX_LIMIT, window, name, item.cost - unit, now)
                else:
                    rust_denied = owners[first]
                    rust_retry = retry
        # -- every counter's state as it stands now (after our charge)
        for item in items:
            self._read_item(item, t, now, charged)
        allowed = charged if called else (not blocked_before and not python_denied and all(i.ok for i in items))
        if rust_denied is not None and all(item.ok for item in items):
            # another process took the room between hit_all and our reads, then gave it back
            item = items[rust_denied]
            item.ok = False
            item.wait = -1 if math.isinf(rust_retry) else round(rust_retry * 1e9)
        # -- violations: keys not blocked whose own limit refused the request
        if charge and not allowed:
            for key, pen in penalties.items():
                if not boxes[key].was and any(not item.ok for item in items if item.key == key):
                    boxes[key] = self._violation(key, pen, boxes[key], t, now)
        decision = self._decision(checks, items, mapping, boxes, allowed, t)
        if charge:
            if decision.allowed:
                self._allowed += 1
            else:
                self._denied += 1
                self._blocked += decision.blocked
        return decision

    @staticmethod
    def _triple(item: _Item, cost: int, unit: int | None = None) -> tuple[int, float, str]:
        """The ``(limit, window, key)`` of a counter for ``hit_all``; with ``unit``, a limit under
        which charging ``unit`` is allowed iff charging ``cost`` would be."""
        spec = item.spec
        limit = spec.limit - item.past if spec.log else spec.limit
        if unit is not None:
            limit -= cost - unit
        if spec.log:
            return limit, spec.big, item.cur_name
        return limit, spec.window, spec.name

    def _log_past(self, spec: _Spec, key: str, s: int) -> tuple[int, ...]:
        """Units in each of the ``log_slices`` finished sub-windows before sub-window ``s``."""
        counts: list[int] = []
        k = self.log_slices
        past = self._past
        if len(past) >= 262144:
            past.clear()
        for j in range(s - k, s):
            name = f"{spec.name}{j}:{key}"
            n = past.get(name)
            if n is None:
                n = self._read(spec.limit, spec.big, name, self._slice_time(spec, j))
                if j < s - 1:  # the last one may still take a late charge (see the lag rule)
                    past[name] = n
            counts.append(n)
        # forget the sub-window that just dropped out of the log
        past.pop(f"{spec.name}{s - k - 1}:{key}", None)
        return tuple(counts)

    @staticmethod
    def _slice_time(spec: _Spec, j: int) -> float:
        """A ``now`` inside sub-window ``j`` (its middle)."""
        return _secs_for(j * spec.slice_ns + spec.slice_ns // 2)

    def _read(self, limit: int, window: float, name: str, at: float) -> int:
        """The estimate of a table counter at ``at`` (never charges nor creates it)."""
        _, left, _ = self.table.hit(MAX_LIMIT, window, name, 0, at)
        return MAX_LIMIT - left

    def _read_item(self, item: _Item, t: int, now: float, charged: bool) -> None:
        """Fill ``item``'s ok / remaining / wait / reset from the table as it stands at ``t``."""
        spec = item.spec
        limit, cost = spec.limit, item.cost
        if spec.log:
            k, sl = self.log_slices, spec.slice_ns
            s = item.sub
            cur = self._read(limit, spec.big, item.cur_name, self._slice_time(spec, s))
            counts = (*item.counts, cur)
            used = item.past + cur
            if charged:
                item.ok, item.remaining, item.wait = True, max(limit - used, 0), 0
            elif used + cost <= limit:
                item.ok, item.remaining, item.wait = True, limit - used - cost, 0
            else:
                item.ok, item.remaining = False, max(limit - used, 0)
                if cost > limit:
                    item.wait = -1
                else:
                    # the oldest sub-windows drop out one per sub-window boundary
                    left, d = used, 0
                    while left + cost > limit:
                        left -= counts[d]
                        d += 1
                    item.wait = (s + d) * sl - t
            last = max((j for j, n in enumerate(counts) if n > 0), default=None)
            item.reset = 0 if last is None else (s - k + last + k + 1) * sl - t
            return
        w = spec.w
        idx = t // w
        e = t - idx * w
        starts = self._starts.get(w)
        if starts is None or starts[0] != idx:
            starts = self._window_starts(w, idx)
        p_plus_c = self._read(limit, spec.window, spec.name, starts[1])
        c = self._read(limit, spec.window, spec.name, starts[2])
        p = max(p_plus_c - c, 0)
        if charged:
            used = p * (w - e) // w + c
            item.ok, item.remaining, item.wait = True, max(limit - used, 0), 0
        else:
            item.ok, item.remaining, item.wait = _counter_decide(p, c, cost, limit, e, w)
        item.reset = _counter_reset(p, c, e, w)

    def _decision(
        self,
        checks: Sequence[Check],
        items: list[_Item],
        mapping: list[int],
        boxes: dict[str, _BoxState],
        allowed: bool,
        t: int,
    ) -> Decision:
        """The :class:`Decision`, shaped exactly as ``RedisLimiter`` shapes it."""
        results: list[CheckResult] = []
        denied: int | None = None
        retry = 0.0
        blocked_by_box = False
        for pos, check in enumerate(checks):
            item = items[mapping[pos]]
            box = boxes.get(check.key) if check.penalty is not None else None
            left = box.until - t if box is not None and box.until > t else 0
            reset = item.reset / 1e9
            if allowed:
                results.append(CheckResult(check, True, item.remaining, 0.0, reset))
                continue
            stands = item.remaining + item.cost if item.ok else item.remaining
            if item.ok and left <= 0:
                results.append(CheckResult(check, True, stands, 0.0, reset))
                continue
            wait = item.wait if not item.ok else 0
            if left > 0 and wait >= 0:
                wait = max(wait, left)
            result = CheckResult(check, False, stands, math.inf if wait < 0 else wait / 1e9, reset, left > 0)
            results.append(result)
            retry = max(retry, result.retry_after)
            if denied is None:
                denied = pos
            if left > 0 and box is not None and box.was:
                blocked_by_box = True
        newly = tuple(key for key, b in boxes.items() if b.until > t and not b.was)
        return Decision(allowed, tuple(results), denied, retry, blocked_by_box, newly)

    # -- the penalty box ------------------------------------------------------------------------

    def _epoch(self, key: str, now: float) -> int:
        return self._read(MAX_LIMIT, _REG_FOREVER, f"pe:{key}", now)

    def _is_blocked(self, key: str, t: int, now: float) -> bool:
        """Whether ``key`` is in the penalty box at ``t`` (two reads: the hot path's question)."""
        hit = self.table.hit
        epoch = MAX_LIMIT - hit(MAX_LIMIT, _REG_FOREVER, f"pe:{key}", 0, now)[1]
        j = t // _PEN_NS
        v = MAX_LIMIT - hit(MAX_LIMIT, _PEN_W, f"pu:{epoch}:{j}:{key}", 0, now)[1]
        if v and t < _decode_block(v, j)[0]:
            return True
        if self._private_blocks:
            private = self._private_blocks.get(key)
            return private is not None and private[0] == epoch and private[1] > t
        return False

    def _record(self, key: str, epoch: int, t: int, now: float) -> tuple[int, int]:
        """``(until ns, strikes)`` of the block record in force at ``t`` (``(0, 0)``: none)."""
        j = t // _PEN_NS
        v = self._read(MAX_LIMIT, _PEN_W, f"pu:{epoch}:{j}:{key}", now)
        private = self._private_blocks.get(key) if self._private_blocks else None
        until, strikes = 0, 0
        if v:
            until, strikes = _decode_block(v, j)
            if v >> 30 >= 2:
                # A block ending after this period is held here only to 2.1 s (rounded up); the
                # writer also put it in the next period's word, where it is exact to 33 µs.
                v2 = self._read(MAX_LIMIT, _PEN_W, f"pu:{epoch}:{j + 1}:{key}", now)
                if v2:
                    until2, _ = _decode_block(v2, j + 1)
                    if until - _COARSE < until2 <= until:
                        until = until2
        if private is not None and private[0] == epoch and private[1] > until:
            until, strikes = private[1], private[2]
        return until, strikes

    def _box_state(self, key: str, pen: Penalty | None, t: int, now: float) -> _BoxState:
        epoch = self._epoch(key, now)
        until, strikes = self._record(key, epoch, t, now)
        if strikes and pen is not None and t >= until + _ns(max(pen.block_max, pen.violation_window)):
            strikes = 0  # forgotten (the record outlives it by up to one period)
        return _BoxState(epoch, until, strikes, until > t)

    def _violation(self, key: str, pen: Penalty, box: _BoxState, t: int, now: float) -> _BoxState:
        """Count a violation of ``key``; block it when it is one too many. The state after."""
        if pen.max_violations > 0:
            name = self._violations_name(key, box.epoch, t, now)
            if self.table.hit(pen.max_violations, pen.violation_window, name, 1, now)[0]:
                return box
        duration = min(_ns(pen.block_for) * 2 ** min(box.strikes, 62), _ns(pen.block_max))
        keep = _ns(max(pen.block_max, pen.violation_window))
        # the block's serial (which names the next violation counter) is kept until the counter
        # used before it has surely expired (two violation windows)
        until, strikes = self._put_block(
            key, box.epoch, t, now, t + duration, box.strikes + 1, keep, t + 2 * _ns(pen.violation_window)
        )
        if until > t:
            self._new_blocks += 1
        return _BoxState(box.epoch, until, strikes, False)

    def _violations_name(self, key: str, epoch: int, t: int, now: float) -> str:
        """The violation counter of ``key`` since its last block (named by that block's serial)."""
        serial = self._read(MAX_LIMIT, _PEN_W, f"pb:{epoch}:{t // _PEN_NS}:{key}", now)
        return f"pv:{epoch}:{serial}:{key}"

    def _put_block(
        self,
        key: str,
        epoch: int,
        t: int,
        now: float,
        until: int,
        strikes: int,
        keep: int,
        serial_until: int = 0,
    ) -> tuple[int, int]:
        """Write a block record into every period from now to ``until + keep`` (raising the words,
        never lowering them), and the block's serial (its end in ms: a new one per block) through
        ``serial_until`` when given; the record in force after (another process's, if it wrote a
        later one meanwhile)."""
        strikes = min(strikes, _STRIKES_MAX)
        j0 = t // _PEN_NS
        last = min(max(until + keep, serial_until) // _PEN_NS, j0 + _PEN_CHAIN)
        serial = (until // 1_000_000) % MAX_LIMIT + 1
        for j in range(j0, last + 1):
            value = _encode_block(until, j, strikes)
            at = now if j == j0 else _secs_for(j * _PEN_NS + _PEN_NS // 2)
            if serial_until:
                self._raise_word(f"pb:{epoch}:{j}:{key}", serial, at)
            if not self._raise_word(f"pu:{epoch}:{j}:{key}", value, at) and j == j0:
                # the table had no slot for the word: this process keeps the block itself
                self._private_blocks[key] = (epoch, until, strikes)
                if not self._overflow_logged:
                    self._overflow_logged = True
                    log.warning(
                        "local rate limiter: the shared table is full; a penalty-box block of %r holds in "
                        "this worker only (make the table bigger; this is logged once)",
                        key,
                    )
        self._journal.add(key)
        return self._record(key, epoch, t, now)

    def _raise_word(self, name: str, value: int, at: float) -> bool:
        """Raise the register ``name`` to ``value`` unless it already holds as much; False if the
        table could not keep it (full)."""
        for _ in range(64):
            cur = self._read(MAX_LIMIT, _PEN_W, name, at)
            if cur >= value:
                return True
            if self.table.hit(value, _PEN_W, name, value - cur, at)[0]:
                return self._read(MAX_LIMIT, _PEN_W, name, at) >= value
        return False

    def block_sync(self, key: str, seconds: float) -> float:
        """Block ``key`` for ``seconds`` from now (keeping its strikes); the Unix time it is
        blocked until. A block already running longer is kept (this never shortens one)."""
        if not 1e-6 <= seconds <= 1e9:
            raise ValueError(f"seconds must be in [1e-6, 1e9], got {seconds!r}")
        now = self.clock()
        t = _ns(now)
        box = self._box_state(key, None, t, now)
        until, _ = self._put_block(key, box.epoch, t, now, t + _ns(seconds), box.strikes, 0)
        return time.time() + (until - t) / 1e9

    def unblock_sync(self, key: str) -> bool:
        """Take ``key`` out of the penalty box and forget its strikes and violations (for every
        worker); True if it was blocked."""
        now = self.clock()
        t = _ns(now)
        box = self._box_state(key, None, t, now)
        self.table.hit(MAX_LIMIT, _REG_FOREVER, f"pe:{key}", 1, now)
        self._private_blocks.pop(key, None)
        if self._epoch(key, now) == box.epoch:
            log.error("local rate limiter: the shared table is full; could not unblock %r", key)
        return box.was

    def block_state_sync(self, key: str) -> BlockedKey | None:
        """``key``'s block (until as Unix time, remaining seconds, strikes), ``None`` if not blocked."""
        now = self.clock()
        t = _ns(now)
        box = self._box_state(key, None, t, now)
        if not box.was:
            return None
        remaining = (box.until - t) / 1e9
        return BlockedKey(key=key, until=time.time() + remaining, remaining=remaining, strikes=box.strikes)

    def violations(self, key: str, penalty: Penalty) -> int:
        """Violations of ``key`` counted now (the sliding estimate of its violation counter)."""
        now = self.clock()
        t = _ns(now)
        box = self._box_state(key, penalty, t, now)
        return self._read(MAX_LIMIT, penalty.violation_window, self._violations_name(key, box.epoch, t, now), now)

    def list_blocked_sync(self) -> list[BlockedKey]:
        """Every key blocked now, by the remaining time (from the journal of blocked keys: see the
        module doc for when it covers every worker)."""
        found = [self.block_state_sync(key) for key in self._journal.keys() | set(self._private_blocks)]
        return sorted((b for b in found if b is not None), key=lambda b: (b.remaining, b.key))


if TYPE_CHECKING:
    _: type[Limiter] = LocalLimiter

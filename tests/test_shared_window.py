"""SharedWindows: agreement with SlidingWindow's counter mode, the limit across forked processes,
a worker killed mid-run, the full-table policy, bad input."""

from __future__ import annotations

import math
import os
import select
import signal
import struct
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxy.core import ChargePlan, SharedWindows, SlidingWindow, Tally, hit_all

T0 = 1000.0  # a monotonic-looking start time, in seconds


# ------------------------------------------------------------------------------------- behaviour


def test_allows_limit_then_denies_like_sliding_window() -> None:
    sw = SharedWindows(64)
    local = SlidingWindow(3, 1.0)
    for _ in range(5):
        assert sw.hit(3, 1.0, "k", now=T0) == local.hit("k", now=T0)
    allowed, remaining, retry = sw.hit(3, 1.0, "k", now=T0)
    assert (allowed, remaining) == (False, 0)
    assert 0.0 < retry <= 2.0
    assert sw.hit(3, 1.0, "k", now=T0 + retry)[0] is True


def test_identity_is_window_and_key_limit_is_per_call() -> None:
    sw = SharedWindows(64)
    assert sw.hit(1, 1.0, "k", now=T0)[0]
    assert not sw.hit(1, 1.0, "k", now=T0)[0]
    assert sw.hit(1, 1.0, b"k", now=T0)[0], "str and bytes keys are distinct"
    assert sw.hit(1, 2.0, "k", now=T0)[0], "another window is another counter"
    # the same counter under a higher limit: one used of three
    assert sw.hit(3, 1.0, "k", 0, now=T0) == (True, 2, 0.0)
    assert sw.live(T0) == 3


def test_denied_hit_and_cost_zero_charge_nothing() -> None:
    sw = SharedWindows(64)
    assert sw.hit(5, 1.0, "k", 4, now=T0) == (True, 1, 0.0)
    assert sw.hit(5, 1.0, "k", 2, now=T0)[:2] == (False, 1)
    assert sw.hit(5, 1.0, "k", 0, now=T0) == (True, 1, 0.0)
    assert sw.hit(5, 1.0, "new", 0, now=T0) == (True, 5, 0.0)
    assert sw.hit(5, 1.0, "new", 6, now=T0) == (False, 5, math.inf)
    assert sw.live(T0) == 1  # neither cost 0 nor a denial creates a key


def test_expired_keys_free_their_slots() -> None:
    sw = SharedWindows(16)
    assert sw.capacity == 16
    for i in range(16):
        assert sw.hit(2, 1.0, f"a{i}", 2, now=T0)[0]
    assert sw.live(T0 + 1.5) == 16  # the previous window still counts
    assert sw.live(T0 + 2.0) == 0
    for i in range(16):  # two windows on, every slot is reused
        assert sw.hit(2, 1.0, f"b{i}", 2, now=T0 + 2.0)[0]
    assert sw.overflows == 0
    assert sw.live(T0 + 2.0) == 16


def test_full_table_allows_new_keys_uncounted_and_counts_overflows() -> None:
    sw = SharedWindows(16)
    for i in range(16):
        sw.hit(1, 60.0, f"k{i}", now=T0)
    assert sw.overflows == 0
    assert [sw.hit(1, 60.0, "late", now=T0)[0] for _ in range(3)] == [True, True, True]
    assert sw.overflows == 3
    assert sw.live(T0) == 16
    assert sw.hit(1, 60.0, "k3", now=T0)[0] is False, "keys in the table are still enforced"


def test_properties_repr_and_default_clock() -> None:
    sw = SharedWindows(1000)
    assert sw.capacity == 1024
    assert sw.nbytes >= 1024 * 32
    assert repr(sw) == "SharedWindows(capacity=1024, overflows=0)"
    assert len(sw) == 0
    assert sw.hit(2, 3600.0, "k")[:2] == (True, 1)
    assert sw.hit(2, 3600.0, "k", now=time.monotonic())[:2] == (True, 0)
    allowed, _, retry = sw.hit(2, 3600.0, "k")
    assert not allowed and 0 < retry <= 7200
    assert len(sw) == 1


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        SharedWindows(0)
    with pytest.raises(OverflowError):
        SharedWindows(2**70)
    sw = SharedWindows(16)
    with pytest.raises(TypeError):
        sw.hit(1, 1.0, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        sw.hit(0, 1.0, "k")
    with pytest.raises(ValueError, match="limit"):
        sw.hit(2**32, 1.0, "k")
    with pytest.raises(ValueError, match="window"):
        sw.hit(1, 0.0, "k")
    with pytest.raises(ValueError, match="window"):
        sw.hit(1, 1e-10, "k")
    with pytest.raises(ValueError, match="window"):
        sw.hit(1, math.nan, "k")
    with pytest.raises(ValueError, match="cost"):
        sw.hit(1, 1.0, "k", -1)
    with pytest.raises(ValueError, match="now"):
        sw.hit(1, 1.0, "k", now=-1.0)
    with pytest.raises(ValueError, match="now"):
        sw.hit(1, 1.0, "k", now=1e12)
    with pytest.raises(ValueError, match="empty"):
        sw.hit_all([])
    with pytest.raises(TypeError):
        sw.hit_all([(1, 1.0)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        sw.hit_all([[1, 1.0, "k"]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="limit"):
        sw.hit_all([(1, 1.0, "a"), (0, 1.0, "b")])
    assert sw.live(0.0) == 0, "nothing was charged by a refused call"


# ------------------------------------------------------------------------------------ hit_all


def test_hit_all_charges_all_or_none() -> None:
    sw = SharedWindows(64)
    checks = [(100, 1.0, "global"), (2, 1.0, "route:/v1/chat"), (5, 1.0, "user:alice")]
    assert sw.hit_all(checks, now=T0) == (True, -1, 0.0, 1)
    assert sw.hit_all(checks, now=T0) == (True, -1, 0.0, 0)
    allowed, first, retry, remaining = sw.hit_all(checks, now=T0)
    assert (allowed, first, remaining) == (False, 1, 0)
    assert retry > 0
    assert sw.hit(100, 1.0, "global", 0, now=T0)[1] == 98  # the denied call charged nothing
    assert sw.hit(5, 1.0, "user:alice", 0, now=T0)[1] == 3
    assert sw.hit_all([(2, 1.0, "route:/v1/chat"), (5, 1.0, "user:alice")], 6, now=T0)[:3] == (
        False,
        0,
        math.inf,
    )
    # a triple listed twice is charged twice; any iterable works
    assert sw.hit_all(((3, 1.0, "x"), (3, 1.0, "x")), now=T0) == (True, -1, 0.0, 1)
    assert sw.hit_all(iter([(3, 1.0, "x"), (3, 1.0, "x")]), now=T0)[:2] == (False, 1)
    assert sw.hit_all([(3, 1.0, f"y{i}") for i in range(6)], now=T0)[0]  # more than 4 triples


def test_charge_plan_charges_as_hit_all_binding_and_writes_its_fields() -> None:
    """Two tables in lockstep: the plan's decisions are hit_all_binding's, its RateLimit value
    names the binding check with its remaining and whole seconds of reset, a denial is ``None``
    and charges nothing, more than four triples work."""
    import random

    rng = random.Random(7)
    triples = [(30, 1.0, "global"), (6, 0.25, "route:/a"), (4, 0.1, b"user:u"), (40, 5.0, "x"), (9, 0.5, "y")]
    policy = (b"P", b"policy-value")
    prefixes = [f"n{i};r=".encode() for i in range(len(triples))]
    direct, planned = SharedWindows(64), SharedWindows(64)
    tally = Tally()
    plan = ChargePlan(planned, triples, 2, (policy, b"S", prefixes), tally)
    assert len(plan) == 5 and plan.tally is tally and tally.value == 0
    now, allowed = T0, 0
    for step in range(400):
        ok, _, _, remaining, binding, reset = direct.hit_all_binding(triples, 2, now)
        got = plan.charge(now)
        if ok:
            allowed += 1
            assert got == [policy, (b"S", b"n%d;r=%d;t=%d" % (binding, remaining, math.ceil(reset - 1e-9)))], step
            assert got[0] is policy  # the field given, not a copy
        else:
            assert got is None, step
        now += rng.choice([0.0, 0.0, 0.001, 0.02, 0.1, 0.4])
    assert 40 < allowed < 400 and tally.value == allowed
    # plans sharing a tally add to it
    other = ChargePlan(planned, [(5, 1.0, "other")], tally=tally)
    assert other.charge(now) == [] and tally.value == allowed + 1 and repr(tally) == f"Tally({allowed + 1})"
    # the same counters: the tables agree key by key
    for limit, window, key in triples:
        assert direct.hit(limit, window, key, 0, now) == planned.hit(limit, window, key, 0, now)


def test_charge_plan_without_fields_and_bad_input() -> None:
    sw = SharedWindows(64)
    plan = ChargePlan(sw, [(2, 1.0, "k")])
    assert plan.charge(T0) == [] and plan.charge(T0) == [] and plan.charge(T0) is None
    assert plan.tally.value == 2  # a tally of its own
    assert sw.hit(2, 1.0, "k", 0, now=T0)[1] == 0
    assert plan.charge() == []  # the table's own clock: the monotonic one, far past T0's window
    with pytest.raises(ValueError, match="checks must not be empty"):
        ChargePlan(sw, [])
    with pytest.raises(ValueError, match="limit"):
        ChargePlan(sw, [(0, 1.0, "k")])
    with pytest.raises(TypeError, match="key"):
        ChargePlan(sw, [(1, 1.0, 3)])
    with pytest.raises(ValueError, match="cost"):
        ChargePlan(sw, [(1, 1.0, "k")], -1)
    with pytest.raises(TypeError, match="fields must be"):
        ChargePlan(sw, [(1, 1.0, "k")], 1, (b"x", b"y"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="policy_field must be"):
        ChargePlan(sw, [(1, 1.0, "k")], 1, ((b"x",), b"S", [b"p"]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one entry per check"):
        ChargePlan(sw, [(1, 1.0, "k")], 1, ((b"P", b"v"), b"S", [b"a", b"b"]))
    with pytest.raises(ValueError, match="now"):
        plan.charge(-1.0)


# ---------------------------------------------------------------- agreement with SlidingWindow

# (gap in seconds, level, key, cost): gaps on several scales so bursts, window edges and idles occur
SCHEDULE = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(1e-6, 0.05), st.floats(0.05, 1.5)),
        st.integers(0, 2),
        st.sampled_from(["a", b"a", "ü", "user-000042"]),
        st.integers(0, 9),
    ),
    min_size=1,
    max_size=200,
)
LEVELS = st.lists(
    st.tuples(st.integers(1, 8), st.sampled_from([0.1, 1.0, 0.003, 2.5])), min_size=3, max_size=3
)


@settings(max_examples=200, deadline=None)
@given(levels=LEVELS, schedule=SCHEDULE)
def test_hit_agrees_with_sliding_window_counter_mode(
    levels: list[tuple[int, float]], schedule: list[tuple[float, int, str | bytes, int]]
) -> None:
    # Level i ↔ SlidingWindow i; in the shared table the level is a key prefix (its counters are
    # identified by (window, key), and two levels may have the same window).
    sw = SharedWindows(256)
    local = [SlidingWindow(limit, window) for limit, window in levels]
    now = T0
    for gap, level, key, cost in schedule:
        now += gap
        limit, window = levels[level]
        prefixed = _prefixed(level, key)
        want = local[level].hit(prefixed, cost, now=now)
        assert sw.hit(limit, window, prefixed, cost, now=now) == want
    for w in local:
        w.peek("", 0, now=now)  # len() counts as of the latest time a SlidingWindow has seen
    assert sw.live(now) == sum(len(w) for w in local)


@settings(max_examples=200, deadline=None)
@given(
    levels=LEVELS,
    schedule=SCHEDULE,
    picks=st.lists(
        st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["a", "b"])), min_size=1, max_size=4),
        min_size=1,
        max_size=200,
    ),
)
def test_hit_all_agrees_with_sliding_window_hit_all(
    levels: list[tuple[int, float]],
    schedule: list[tuple[float, int, str | bytes, int]],
    picks: list[list[tuple[int, str]]],
) -> None:
    sw = SharedWindows(256)
    local = [SlidingWindow(limit, window) for limit, window in levels]
    now = T0
    for (gap, _, _, cost), pick in zip(schedule, picks):
        now += gap
        cost = cost % 4
        want = hit_all([(local[lv], _prefixed(lv, k)) for lv, k in pick], cost, now=now)
        got = sw.hit_all([(*levels[lv], _prefixed(lv, k)) for lv, k in pick], cost, now=now)
        assert got == want


def _prefixed(level: int, key: str | bytes) -> str | bytes:
    return f"{level}:{key}" if isinstance(key, str) else b"%d:%s" % (level, key)


# ------------------------------------------------------------------------ across processes

W = 0.5  # seconds
LIMIT = 1000  # per window, for the whole machine


def _fork_workers(n: int, work: Callable[[int], bytes]) -> list[tuple[int, int]]:
    """Fork ``n`` children running ``work(i)``; each writes its result to a pipe and exits.

    Returns ``(pid, read_fd)`` pairs.
    """
    children = []
    for i in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 0
            try:
                os.close(r)
                os.write(w, work(i))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        children.append((pid, r))
    return children


def _collect(children: list[tuple[int, int]], timeout: float) -> dict[int, bytes]:
    """Read every child's result (bounded by ``timeout``) and reap them all."""
    results: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout
    pending = {r: pid for pid, r in children}
    buffers: dict[int, bytes] = {r: b"" for r in pending}
    try:
        while pending and time.monotonic() < deadline:
            ready, _, _ = select.select(list(pending), [], [], max(0.0, deadline - time.monotonic()))
            for r in ready:
                chunk = os.read(r, 4096)
                if chunk:
                    buffers[r] += chunk
                else:
                    results[pending.pop(r)] = buffers[r]
    finally:
        for pid, r in children:
            os.close(r)
            if r in pending:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert not pending, f"{len(pending)} worker(s) did not finish within {timeout} s"
    return results


def _next_window_start() -> float:
    """The start of the next fixed window (they are aligned on multiples of W), at least 50 ms on."""
    return (math.floor((time.monotonic() + 0.05) / W) + 1) * W


def _wait_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.001))


def test_the_limit_holds_across_forked_workers() -> None:
    # 4 workers hit one key as fast as they can for two fixed windows: together they get the limit
    # in the first window and, in the second, what the sliding estimate lets through by its end —
    # never more than LIMIT per fixed window.
    sw = SharedWindows(4096)
    t0 = _next_window_start()
    start, end = t0 + 0.002, t0 + 2 * W - 0.01

    def work(_: int) -> bytes:
        _wait_until(start)
        allowed = attempts = 0
        while (now := time.monotonic()) < end:
            allowed += sw.hit(LIMIT, W, "hot", now=now)[0]
            attempts += 1
        return struct.pack("<qq", allowed, attempts)

    results = _collect(_fork_workers(4, work), timeout=30)
    counts = [struct.unpack("<qq", b) for b in results.values()]
    total = sum(a for a, _ in counts)
    assert all(n > LIMIT for _, n in counts), counts  # every worker was over the limit
    # window k: LIMIT; window k+1 at offset e: LIMIT − ⌊LIMIT·(W−e)/W⌋ by the end
    e_end = end - (t0 + W)
    expected_max = LIMIT + LIMIT - math.floor(LIMIT * (W - e_end) / W)
    assert total <= 2 * LIMIT, (total, counts)
    assert total <= expected_max + 1, (total, expected_max)
    assert total > 0.9 * expected_max, (total, expected_max, counts)


def test_hit_all_limits_hold_across_forked_workers() -> None:
    # Global 600 per window, 200 per user; 4 users want 800 in one window: the global level binds
    # and no user passes its own limit; late denials roll back the charges made before them.
    sw = SharedWindows(4096)
    t0 = _next_window_start()
    start, end = t0 + 0.002, t0 + W - 0.01

    def work(i: int) -> bytes:
        _wait_until(start)
        allowed = 0
        checks = [(600, W, "global"), (200, W, f"user-{i}")]
        while (now := time.monotonic()) < end:
            allowed += sw.hit_all(checks, now=now)[0]
        return struct.pack("<q", allowed)

    results = _collect(_fork_workers(4, work), timeout=30)
    per_user = [struct.unpack("<q", b)[0] for b in results.values()]
    assert all(n <= 200 for n in per_user), per_user
    assert 0.9 * 600 < sum(per_user) <= 600, per_user
    # what the table holds agrees with what the workers were told
    assert sw.hit(600, W, "global", 0, now=start)[1] == 600 - sum(per_user)


def test_a_worker_killed_mid_run_does_not_wedge_the_others() -> None:
    # Workers hit the hot key and a churn of short-lived keys (inserts, reuse of expired slots:
    # the paths that take an insert lock or a claim marker); one is SIGKILLed mid-run and not
    # reaped until the end. The others finish on time, the limit still holds, the table works.
    sw = SharedWindows(4096)
    t0 = _next_window_start()
    start, end = t0 + 0.002, t0 + 2 * W - 0.01

    def work(i: int) -> bytes:
        _wait_until(start)
        allowed = n = 0
        while (now := time.monotonic()) < end:
            allowed += sw.hit(LIMIT, W, "hot", now=now)[0]
            sw.hit(5, 0.001, f"churn-{i}-{n % 200}", now=now)
            n += 1
        return struct.pack("<q", allowed)

    children = _fork_workers(4, work)
    _wait_until(start + 0.3)
    victim, victim_fd = children[0]
    os.kill(victim, signal.SIGKILL)
    survivors = _collect(children[1:], timeout=30)
    os.close(victim_fd)
    os.waitpid(victim, 0)
    assert len(survivors) == 3
    total = sum(struct.unpack("<q", b)[0] for b in survivors.values())
    assert 0 < total <= 2 * LIMIT
    # still usable from here, new keys included, without waiting on anything
    t = time.perf_counter()
    for j in range(1000):
        assert sw.hit(1, 60.0, f"after-{j}")[0]
    assert time.perf_counter() - t < 0.5
    assert sw.overflows == 0

"""SlidingWindow / hit_all: behaviour, the model comparison, the modes' guarantees, bad input."""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from model_window import ModelWindow, model_hit_all, to_ns
from pyproxy.core import SlidingWindow, hit_all

T0 = 1000.0  # a monotonic-looking start time, in seconds


# ------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("exact", [False, True])
def test_allows_limit_then_denies(exact: bool) -> None:
    w = SlidingWindow(3, 1.0, exact=exact)
    assert [w.hit("k", now=T0) for _ in range(3)] == [
        (True, 2, 0.0),
        (True, 1, 0.0),
        (True, 0, 0.0),
    ]
    allowed, remaining, retry = w.hit("k", now=T0)
    assert (allowed, remaining) == (False, 0)
    assert 0.0 < retry <= 2.0
    assert w.peek("other", now=T0) == (True, 2, 0.0)
    assert len(w) == 1
    assert w.peek("k", now=T0 + retry + 1e-6)[0] is True


def test_counter_interpolates_the_previous_window() -> None:
    # 10 per second; T0 is a whole second, so [T0, T0+1) is one fixed window
    w = SlidingWindow(10, 1.0)
    assert w.hit("k", 10, now=T0 + 0.5)[0]
    # at T0 + 1.25 the previous window weighs ⌊10 * 0.75⌋ = 7 → 3 units left
    assert w.peek("k", 0, now=T0 + 1.25) == (True, 3, 0.0)
    assert w.hit("k", 2, now=T0 + 1.25) == (True, 1, 0.0)
    # two more need ⌊10·(1 − e)⌋ + 2 + 2 <= 10, i.e. e > 0.3
    allowed, remaining, retry = w.hit("k", 2, now=T0 + 1.25)
    assert (allowed, remaining) == (False, 1)
    assert retry == pytest.approx(0.05, abs=1e-6)
    assert w.hit("k", 2, now=T0 + 1.30 + 1e-6) == (True, 0, 0.0)


def test_exact_retry_after_is_when_the_oldest_hits_expire() -> None:
    w = SlidingWindow(3, 1.0, exact=True)
    for dt in (0.1, 0.2, 0.3):
        assert w.hit("k", now=T0 + dt)[0]
    allowed, remaining, retry = w.hit("k", 2, now=T0 + 0.5)
    assert (allowed, remaining) == (False, 0)
    assert retry == pytest.approx(0.7, abs=1e-6)  # the first two must age out: T0 + 0.2 + 1
    assert w.hit("k", 2, now=T0 + 1.2 - 1e-6)[0] is False
    assert w.hit("k", 2, now=T0 + 1.2 + 1e-6) == (True, 0, 0.0)


@pytest.mark.parametrize("exact", [False, True])
def test_sub_second_window_ten_per_tenth_of_a_second(exact: bool) -> None:
    w = SlidingWindow(10, 0.1, exact=exact)
    admitted = []
    t = T0
    for i in range(2000):  # one attempt every millisecond for 2 s: 10× over the limit
        t = T0 + i * 0.001
        if w.hit("k", now=t)[0]:
            admitted.append(to_ns(t))
    window = to_ns(0.1)
    # exact: never more than 10 in any 0.1 s; counter: never more than 10 per fixed window and
    # 2·10 in any 0.1 s (the documented bound)
    worst = max(sum(1 for b in admitted if a <= b < a + window) for a in admitted)
    assert worst <= (10 if exact else 20)
    # and the full 10 per 0.1 s gets through under sustained overload
    assert 195 <= len(admitted) <= 201
    if not exact:
        per_fixed: dict[int, int] = {}
        for a in admitted:
            per_fixed[a // window] = per_fixed.get(a // window, 0) + 1
        assert max(per_fixed.values()) <= 10


def test_str_and_bytes_keys_are_distinct() -> None:
    w = SlidingWindow(1, 1.0)
    assert w.hit("k", now=T0)[0]
    assert w.hit(b"k", now=T0)[0]
    assert not w.hit("k", now=T0)[0]
    assert len(w) == 2


@pytest.mark.parametrize("exact", [False, True])
def test_denied_hit_and_cost_zero_charge_nothing(exact: bool) -> None:
    w = SlidingWindow(5, 1.0, exact=exact)
    assert w.hit("k", 4, now=T0) == (True, 1, 0.0)
    assert w.hit("k", 2, now=T0)[:2] == (False, 1)
    assert w.hit("k", 0, now=T0) == (True, 1, 0.0)
    assert w.hit("k", 1, now=T0) == (True, 0, 0.0)
    assert w.hit("new", 0, now=T0) == (True, 5, 0.0)
    assert len(w) == 1  # neither cost 0 nor a denial creates a key


@pytest.mark.parametrize("exact", [False, True])
def test_cost_above_limit_can_never_pass(exact: bool) -> None:
    w = SlidingWindow(5, 1.0, exact=exact)
    assert w.hit("k", 6, now=T0) == (False, 5, math.inf)
    assert w.peek("k", 2**62, now=T0) == (False, 5, math.inf)
    assert len(w) == 0


@pytest.mark.parametrize("exact", [False, True])
def test_time_going_backwards_counts_as_the_latest_time(exact: bool) -> None:
    w = SlidingWindow(2, 1.0, exact=exact)
    assert w.hit("k", 2, now=T0 + 10)[0]
    assert w.hit("k", now=T0) == w.hit("k", now=T0 + 10)
    assert w.hit("k", now=0.0)[0] is False


@pytest.mark.parametrize("exact", [False, True])
def test_reset(exact: bool) -> None:
    w = SlidingWindow(1, 1.0, exact=exact)
    assert w.hit("k", now=T0)[0]
    assert not w.hit("k", now=T0)[0]
    assert w.reset("k") is True
    assert w.reset("k") is False
    assert w.hit("k", now=T0)[0]


def test_properties_and_repr() -> None:
    w = SlidingWindow(10, 0.1, exact=True)
    assert (w.limit, w.window, w.exact) == (10, 0.1, True)
    assert repr(w) == "SlidingWindow(limit=10, window=0.1, exact=True)"
    assert SlidingWindow(3, 60).window == 60.0
    assert SlidingWindow(3, 60).exact is False


def test_default_clock_is_monotonic() -> None:
    import time

    w = SlidingWindow(2, 3600.0)
    assert w.hit("k")[:2] == (True, 1)
    assert w.hit("k", now=time.monotonic())[:2] == (True, 0)
    allowed, _, retry = w.hit("k")
    assert not allowed and 0 < retry <= 7200


# -------------------------------------------------------------------------------- idle keys


@pytest.mark.parametrize("exact", [False, True])
def test_idle_keys_are_dropped(exact: bool) -> None:
    w = SlidingWindow(5, 1.0, exact=exact)
    n = 200_000
    for i in range(n):
        w.hit(f"client-{i}", now=T0)
    assert len(w) == n
    for i in range(5):  # past two windows: every earlier key is idle
        w.hit(f"late-{i}", now=T0 + 2.5)
    assert len(w) == 5
    # a key that still counts is kept: at T0 + 1.5, "a" (T0 + 0.9) is inside the last second
    # (exact) and in the previous fixed window (counter)
    w2 = SlidingWindow(5, 1.0, exact=exact)
    w2.hit("a", 5, now=T0 + 0.9)
    w2.hit("b", now=T0 + 1.5)
    assert len(w2) == 2
    assert w2.peek("a", 0, now=T0 + 1.5)[1] == (0 if exact else 3)  # counter: 5 - ⌊5 * 0.5⌋
    # exact mode forgets it one window after its last hit, counter mode after two fixed windows
    w2.hit("b", now=T0 + 1.95)
    assert len(w2) == (1 if exact else 2)
    w2.hit("b", now=T0 + 2.0)
    assert len(w2) == 1


# ------------------------------------------------------------------------------------ hit_all


def test_hit_all_charges_all_or_none() -> None:
    glob = SlidingWindow(100, 1.0)
    route = SlidingWindow(2, 1.0)
    user = SlidingWindow(5, 1.0, exact=True)
    checks = [(glob, "*"), (route, "/v1/chat"), (user, "alice")]
    assert hit_all(checks, now=T0) == (True, -1, 0.0, 1)
    assert hit_all(checks, now=T0) == (True, -1, 0.0, 0)
    allowed, first, retry, remaining = hit_all(checks, now=T0)
    assert (allowed, first, remaining) == (False, 1, 0)
    assert retry > 0
    assert glob.peek("*", 0, now=T0)[1] == 98  # the denied call charged nothing
    assert user.peek("alice", 0, now=T0)[1] == 3
    # another user on the same route is denied by the route, also charging nothing
    assert hit_all([(glob, "*"), (route, "/v1/chat"), (user, "bob")], now=T0)[:2] == (False, 1)
    assert len(user) == 1
    # retry_after is the longest wait over the deniers; inf if one can never pass
    assert hit_all([(route, "/v1/chat"), (user, "alice")], cost=6, now=T0)[:3] == (False, 0, math.inf)


def test_hit_all_same_limiter_and_pair_twice() -> None:
    w = SlidingWindow(3, 1.0, exact=True)
    assert hit_all([(w, "k"), (w, "k")], now=T0) == (True, -1, 0.0, 1)
    assert hit_all([(w, "k"), (w, "k")], now=T0)[:2] == (False, 1)
    assert w.peek("k", 0, now=T0)[1] == 1
    assert hit_all([(w, "k"), (w, "j")], now=T0) == (True, -1, 0.0, 0)
    # any sequence of pairs works, tuples and generators included
    assert hit_all(((w, "x"),), now=T0)[0]
    assert hit_all(((w, k) for k in ["y", "z"]), now=T0)[0]


# ------------------------------------------------------------------------- model comparison

KEYS = st.sampled_from(["a", b"a", "ü"])
WINDOWS = st.sampled_from([0.1, 1.0, 0.003, 2.5, 60.0])


class WindowMachine(RuleBasedStateMachine):
    """Three limiters (both modes) against the model, with injected, sometimes backwards, time."""

    @initialize(
        specs=st.lists(st.tuples(st.integers(1, 12), WINDOWS), min_size=3, max_size=3),
        third=st.booleans(),
    )
    def setup(self, specs: list[tuple[int, float]], third: bool) -> None:
        modes = [False, True, third]
        self.now = T0
        self.last_retry = 0.0
        self.real = [SlidingWindow(l, w, exact=m) for (l, w), m in zip(specs, modes)]
        self.model = [ModelWindow(l, to_ns(w), m) for (l, w), m in zip(specs, modes)]

    @rule(dt=st.one_of(
        st.just(0.0),
        st.floats(1e-9, 1e-3),
        st.floats(1e-3, 0.5),
        st.floats(0.5, 200.0),
    ))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(back=st.floats(1e-6, 5.0))
    def go_back(self, back: float) -> None:
        self.now -= back  # both sides must treat it as the latest time seen

    # Exact nanosecond landings: window edges, one window after now (an exact-mode entry's expiry),
    # and the end of the last retry_after — each ±1 ns, where off-by-one mistakes show.

    @rule(i=st.integers(0, 2), skip=st.integers(0, 2), delta=st.integers(-2, 2))
    def to_window_edge(self, i: int, skip: int, delta: int) -> None:
        w = self.model[i].window
        self._to_ns((to_ns(self.now) // w + 1 + skip) * w + delta)

    @rule(i=st.integers(0, 2), windows=st.integers(1, 2), delta=st.integers(-1, 1))
    def by_whole_windows(self, i: int, windows: int, delta: int) -> None:
        self._to_ns(to_ns(self.now) + windows * self.model[i].window + delta)

    @rule(delta=st.integers(-1, 0))
    def by_last_retry(self, delta: int) -> None:
        if 0 < self.last_retry < math.inf:
            self._to_ns(to_ns(self.now) + round(self.last_retry * 1e9) + delta)

    def _to_ns(self, target: int) -> None:
        """Move to the float whose nanoseconds (as both sides convert them) are ``target``."""
        now = target / 1e9
        while to_ns(now) < target:
            now = math.nextafter(now, math.inf)
        while to_ns(now) > target:
            now = math.nextafter(now, -math.inf)
        assert to_ns(now) == target
        self.now = now

    @rule(i=st.integers(0, 2), key=KEYS, cost=st.integers(0, 14))
    def hit(self, i: int, key: str | bytes, cost: int) -> None:
        expected = self.model[i].hit(key, cost, to_ns(self.now))
        assert self.real[i].hit(key, cost, now=self.now) == expected
        self.last_retry = expected[2]

    @rule(i=st.integers(0, 2), key=KEYS, cost=st.integers(0, 14))
    def peek(self, i: int, key: str | bytes, cost: int) -> None:
        expected = self.model[i].peek(key, cost, to_ns(self.now))
        assert self.real[i].peek(key, cost, now=self.now) == expected
        self.last_retry = expected[2]

    @rule(i=st.integers(0, 2), key=KEYS)
    def reset(self, i: int, key: str | bytes) -> None:
        assert self.real[i].reset(key) == self.model[i].reset(key)

    @rule(
        picks=st.lists(st.tuples(st.integers(0, 2), KEYS), min_size=1, max_size=4),
        cost=st.integers(0, 6),
    )
    def hit_all(self, picks: list[tuple[int, str | bytes]], cost: int) -> None:
        expected = model_hit_all([(self.model[i], k) for i, k in picks], cost, to_ns(self.now))
        got = hit_all([(self.real[i], k) for i, k in picks], cost, now=self.now)
        assert got == expected

    @invariant()
    def lengths(self) -> None:
        if hasattr(self, "real"):
            assert [len(r) for r in self.real] == [len(m) for m in self.model]


TestWindowMachine = WindowMachine.TestCase
TestWindowMachine.settings = settings(max_examples=400, stateful_step_count=80, deadline=None)


# ------------------------------------------------------------------------ mode guarantees

# A schedule: (gap in seconds since the previous attempt, cost). Gaps on several scales, so bursts,
# window edges and long idles all occur.
SCHEDULE = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(1e-6, 0.05), st.floats(0.05, 1.5)),
        st.integers(0, 4),
    ),
    min_size=1,
    max_size=300,
)


def _run(w: SlidingWindow, schedule: list[tuple[float, int]]) -> list[tuple[int, int, bool, int]]:
    """Attempts as (time ns, cost, allowed, remaining)."""
    out = []
    now = T0
    for gap, cost in schedule:
        now += gap
        allowed, remaining, _ = w.hit("k", cost, now=now)
        out.append((to_ns(now), cost, allowed, remaining))
    return out


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 8), schedule=SCHEDULE)
def test_exact_never_exceeds_the_limit_in_any_interval(limit: int, schedule: list[tuple[float, int]]) -> None:
    window = to_ns(1.0)
    attempts = _run(SlidingWindow(limit, 1.0, exact=True), schedule)
    admitted = [(t, c) for t, c, ok, _ in attempts if ok]
    # the heaviest interval [a, a + W) starts at an admitted time
    for a, _ in admitted:
        assert sum(c for t, c in admitted if a <= t < a + window) <= limit
    # and it is exact both ways: allowed iff the last W (t − W, t] has room for the cost
    so_far: list[tuple[int, int]] = []
    for t, cost, ok, _ in attempts:
        in_window = sum(c for u, c in so_far if t - window < u)
        assert ok == (in_window + cost <= limit)
        if ok:
            so_far.append((t, cost))


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 8), schedule=SCHEDULE)
def test_counter_error_bound(limit: int, schedule: list[tuple[float, int]]) -> None:
    window = to_ns(1.0)
    attempts = _run(SlidingWindow(limit, 1.0), schedule)
    admitted = [(t, c) for t, c, ok, _ in attempts if ok]
    # at most 2·limit in any interval of length W
    for a, _ in admitted:
        assert sum(c for t, c in admitted if a <= t < a + window) <= 2 * limit
    # at most limit per fixed window
    per_fixed: dict[int, int] = {}
    for t, c in admitted:
        per_fixed[t // window] = per_fixed.get(t // window, 0) + c
    assert all(v <= limit for v in per_fixed.values())
    # never denies while the two fixed windows together still have room
    charged: dict[int, int] = {}
    for t, cost, ok, _ in attempts:
        k = t // window
        if not ok:
            assert charged.get(k - 1, 0) + charged.get(k, 0) + cost > limit
        else:
            charged[k] = charged.get(k, 0) + cost


def test_counter_worst_case_is_reached() -> None:
    # limit hits in the last nanoseconds of one fixed window, then limit at the end of the next:
    # 2·limit admitted within one window length
    limit = 10
    w = SlidingWindow(limit, 1.0)
    admitted = sum(w.hit("k", now=T0 + 1.0 - 1e-9)[0] for _ in range(limit + 1))
    admitted += sum(w.hit("k", now=T0 + 2.0 - 2e-9)[0] for _ in range(limit + 1))
    assert admitted == 2 * limit
    # the same bursts half a window earlier: the first still weighs half when the second comes
    w = SlidingWindow(limit, 1.0)
    admitted = sum(w.hit("k", now=T0 + 0.5)[0] for _ in range(limit + 1))
    admitted += sum(w.hit("k", now=T0 + 1.5 - 2e-9)[0] for _ in range(limit + 1))
    assert admitted == limit + limit // 2


@pytest.mark.parametrize("hits_per_window", [1, 3, 7, 25, 50])
def test_counter_is_exact_for_uniform_traffic(hits_per_window: int) -> None:
    # Evenly spaced hits below the limit: the estimate is within one hit of the true count in the
    # last W, so `remaining` is too.
    limit, window = 100, 1.0
    w = SlidingWindow(limit, window)
    period = window / hits_per_window
    times: list[int] = []
    for i in range(hits_per_window * 6):
        now = T0 + 0.123 + i * period
        assert w.hit("k", now=now)[0]
        times.append(to_ns(now))
        t = times[-1]
        true_count = sum(1 for u in times if t - to_ns(window) < u <= t)
        _, remaining, _ = w.peek("k", 0, now=now)
        if i >= 2 * hits_per_window:  # both fixed windows hold uniform traffic
            assert abs(remaining - (limit - true_count)) <= 1


@settings(max_examples=200, deadline=None)
@given(
    exact=st.booleans(),
    limit=st.integers(1, 8),
    schedule=SCHEDULE,
    cost=st.integers(1, 8),
)
def test_retry_after_is_when_the_hit_passes(
    exact: bool, limit: int, schedule: list[tuple[float, int]], cost: int
) -> None:
    w = SlidingWindow(limit, 0.5, exact=exact)
    _run(w, schedule)
    now = T0 + sum(g for g, _ in schedule)
    allowed, _, retry = w.peek("k", cost, now=now)
    if cost > limit:
        assert (allowed, retry) == (False, math.inf)
    elif allowed:
        assert retry == 0.0
    else:
        assert retry > 0
        if retry > 4e-9:
            assert w.peek("k", cost, now=now + retry - 2e-9)[0] is False
        assert w.peek("k", cost, now=now + retry + 2e-9)[0] is True


# ------------------------------------------------------------------------------------ threads


@pytest.mark.parametrize("exact", [False, True])
def test_threads_hammering_one_instance(exact: bool) -> None:
    limit = 5000
    w = SlidingWindow(limit, 3600.0, exact=exact)
    allowed = [0] * 4

    def worker(n: int) -> None:
        for i in range(3000):
            allowed[n] += w.hit(f"k{i % 2}", now=T0)[0]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 2 * limit  # 12000 attempts over two keys, 5000 each allowed
    assert w.peek("k0", 0, now=T0)[1] == 0
    assert w.peek("k1", 0, now=T0)[1] == 0


def test_threads_hit_all_across_instances() -> None:
    a = SlidingWindow(3000, 3600.0, exact=True)
    b = SlidingWindow(2000, 3600.0)
    c = SlidingWindow(10_000, 3600.0)
    orders = [
        [(a, "x"), (b, "y"), (c, "z")],
        [(c, "z"), (b, "y"), (a, "x")],
        [(b, "y"), (a, "x"), (c, "z"), (a, "x2")],
    ]
    allowed = [0] * 3

    def worker(n: int) -> None:
        for _ in range(1500):
            allowed[n] += hit_all(orders[n], now=T0)[0]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(allowed)
    assert total == 2000  # b (limit 2000) is in every check; nothing else runs out first
    assert b.peek("y", 0, now=T0)[1] == 0
    assert a.peek("x", 0, now=T0)[1] == 3000 - total
    assert c.peek("z", 0, now=T0)[1] == 10_000 - total
    assert a.peek("x2", 0, now=T0)[1] == 3000 - allowed[2]


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "kwargs", "exc"),
    [
        (("10", 1.0), {}, TypeError),
        ((10, "1"), {}, TypeError),
        ((1.5, 1.0), {}, TypeError),
        ((10, None), {}, TypeError),
        ((10, 1.0), {"exact": "yes"}, TypeError),
        ((0, 1.0), {}, ValueError),
        ((-3, 1.0), {}, ValueError),
        ((10, 0.0), {}, ValueError),
        ((10, -1.0), {}, ValueError),
        ((10, math.nan), {}, ValueError),
        ((10, math.inf), {}, ValueError),
        ((10, 1e-12), {}, ValueError),  # below one nanosecond
    ],
)
def test_bad_constructor_arguments(args: tuple[object, ...], kwargs: dict[str, object], exc: type) -> None:
    with pytest.raises(exc):
        SlidingWindow(*args, **kwargs)  # type: ignore[arg-type]


def test_bad_constructor_messages_name_the_argument() -> None:
    with pytest.raises(ValueError, match="limit"):
        SlidingWindow(0, 1.0)
    with pytest.raises(ValueError, match="window"):
        SlidingWindow(1, math.nan)


@pytest.mark.parametrize("method", ["hit", "peek"])
def test_bad_hit_arguments(method: str) -> None:
    w = SlidingWindow(5, 1.0)
    call = getattr(w, method)
    for key in (1, None, 1.5, ["k"], bytearray(b"k")):
        with pytest.raises(TypeError):
            call(key, now=T0)
    with pytest.raises(TypeError):
        call("k", 1.5, now=T0)
    with pytest.raises(TypeError):
        call("k", "1", now=T0)
    with pytest.raises(TypeError):
        call("k", now="now")
    with pytest.raises(ValueError, match="cost"):
        call("k", -1, now=T0)
    for now in (math.nan, math.inf, -math.inf, -1.0):
        with pytest.raises(ValueError, match="now"):
            call("k", now=now)
    with pytest.raises(OverflowError):
        call("k", 2**64, now=T0)
    with pytest.raises(TypeError):
        w.reset(3)  # type: ignore[arg-type]
    assert w.peek("k", 0, now=T0) == (True, 5, 0.0)  # nothing above changed anything


def test_bad_hit_all_arguments() -> None:
    w = SlidingWindow(5, 1.0)
    with pytest.raises(ValueError, match="checks"):
        hit_all([], now=T0)
    with pytest.raises(TypeError):
        hit_all(5, now=T0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        hit_all([w], now=T0)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        hit_all([(w, "k", 1)], now=T0)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        hit_all([("not a limiter", "k")], now=T0)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        hit_all([(w, 1)], now=T0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="cost"):
        hit_all([(w, "k")], cost=-1, now=T0)
    with pytest.raises(ValueError, match="now"):
        hit_all([(w, "k")], now=math.nan)
    # a bad pair anywhere means nothing was charged
    with pytest.raises(TypeError):
        hit_all([(w, "k"), (w, 7)], now=T0)  # type: ignore[list-item]
    assert w.peek("k", 0, now=T0) == (True, 5, 0.0)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 2**63 - 1),
    window=st.floats(1e-9, 1e12),
    exact=st.booleans(),
    hits=st.lists(
        st.tuples(st.integers(0, 2**63 - 1), st.floats(0, 1e12)), min_size=1, max_size=20
    ),
)
def test_extreme_values_never_panic(
    limit: int, window: float, exact: bool, hits: list[tuple[int, float]]
) -> None:
    w = SlidingWindow(limit, window, exact=exact)
    for cost, now in hits:
        allowed, remaining, retry = w.hit("k", cost, now=now)
        assert 0 <= remaining <= limit
        assert retry == 0.0 if allowed else retry > 0
        assert hit_all([(w, "k"), (w, "j")], cost, now=now)[3] <= limit
    assert len(w) <= 2

"""pyproxy.resilience: circuit breaker, retry budget and backoff, bulkhead (asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from pyproxy.errors import PyproxyError
from pyproxy.resilience import (
    Bulkhead,
    BulkheadFull,
    BulkheadTimeout,
    CircuitBreaker,
    RetryBudget,
    backoff,
)
from pyproxy.resilience._buckets import BucketCounter

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, None]], None]  # the `run` fixture
T0 = 1000.0  # a monotonic-looking start time, in seconds


def breaker(**kwargs: Any) -> CircuitBreaker:
    """A breaker with deterministic open times unless the test asks for jitter."""
    kwargs.setdefault("jitter", 0.0)
    kwargs.setdefault("rng", random.Random(7))
    return CircuitBreaker(**kwargs)


def trip(cb: CircuitBreaker, now: float) -> None:
    """Fail requests until the breaker opens (at most 1000)."""
    for _ in range(1000):
        if cb.state == "open":
            return
        assert cb.allow(now)
        cb.record(False, now)
    raise AssertionError("the breaker never opened")


# ------------------------------------------------------------------------------- bucket ring


def test_buckets_totals_slide_and_expire() -> None:
    w = BucketCounter(10.0, 10)  # 1 s buckets
    w.add(T0 + 0.2, 1, 1)
    w.add(T0 + 0.7, 1, 0)
    w.add(T0 + 5.5, 2, 1)
    assert (w.a, w.b) == (4, 2)
    w.advance(T0 + 9.9)  # the window still reaches back into the first bucket
    assert (w.a, w.b) == (4, 2)
    w.advance(T0 + 10.0)  # first bucket expired, the one at +5.5 not
    assert (w.a, w.b) == (2, 1)
    w.add(T0 + 12.0, 1, 1)
    assert (w.a, w.b) == (3, 2)
    w.advance(T0 + 15.0)  # +5.5 expired
    assert (w.a, w.b) == (1, 1)
    w.advance(T0 + 100.0)  # a gap longer than the window clears everything
    assert (w.a, w.b) == (0, 0)


def test_buckets_stale_time_counts_into_newest_bucket() -> None:
    w = BucketCounter(1.0, 10)
    w.add(T0 + 0.55, 1, 0)
    w.add(T0 + 0.30, 1, 1)  # older than the newest bucket: counted in it, not lost
    assert (w.a, w.b) == (2, 1)
    w.advance(T0 + 1.5)  # bucket of +0.5 expired, taking both with it
    assert (w.a, w.b) == (0, 0)


@pytest.mark.parametrize("window, buckets", [(0.0, 10), (-1.0, 10), (1.0, 0)])
def test_buckets_bad_arguments(window: float, buckets: int) -> None:
    with pytest.raises(ValueError):
        BucketCounter(window, buckets)


# ------------------------------------------------------------------------------- breaker: trip


def test_breaker_starts_closed_and_allows() -> None:
    cb = breaker()
    assert (cb.state, cb.state_code, cb.openings) == ("closed", 0, 0)
    assert all(cb.allow(T0) for _ in range(100))


def test_breaker_opens_on_consecutive_failures() -> None:
    cb = breaker(consecutive_failures=3, failure_ratio=None)
    for _ in range(2):
        assert cb.allow(T0)
        cb.record(False, T0)
    cb.record(True, T0)  # a success breaks the run
    for _ in range(2):
        cb.record(False, T0)
    assert cb.state == "closed"
    cb.record(False, T0)
    assert (cb.state, cb.state_code, cb.openings, cb.total_openings) == ("open", 1, 1, 1)
    assert not cb.allow(T0)


def test_breaker_opens_on_failure_ratio_after_min_requests() -> None:
    cb = breaker(consecutive_failures=None, failure_ratio=0.5, min_requests=10)
    # 5 failures of 9 (56 %) but fewer than min_requests requests: stays closed.
    for i in range(9):
        cb.record(i % 2 == 1, T0)
    assert cb.state == "closed"
    cb.record(True, T0)  # 5 of 10 = 50 %, but a success never trips
    assert cb.state == "closed"
    cb.record(False, T0)  # 6 of 11 ≥ 50 %
    assert cb.state == "open"


def test_breaker_ratio_below_threshold_stays_closed() -> None:
    cb = breaker(consecutive_failures=None, failure_ratio=0.5, min_requests=10)
    for i in range(1000):  # 1 failure in 3: 33 %
        cb.record(i % 3 != 0, T0 + i * 0.001)
    assert cb.state == "closed"


def test_breaker_ratio_is_met_exactly() -> None:
    # 0.3 * 10 is 3.0000000000000004 in floating point; 3 failures of 10 must still trip.
    cb = breaker(consecutive_failures=None, failure_ratio=0.3, min_requests=10)
    for _ in range(7):
        cb.record(True, T0)
    for _ in range(2):
        cb.record(False, T0)
    assert cb.state == "closed"
    cb.record(False, T0)
    assert cb.state == "open"


def test_breaker_window_expires_old_failures() -> None:
    cb = breaker(consecutive_failures=None, failure_ratio=0.5, min_requests=4, window=10.0)
    for _ in range(3):
        cb.record(False, T0)
    cb.record(True, T0 + 0.5)  # 3 of 4 failed once this ran: but it is a success, no trip
    assert cb.state == "closed"
    # One window later the three failures have expired: 1 failure of 4 is 25 %.
    for _ in range(3):
        cb.record(True, T0 + 10.5)
    cb.record(False, T0 + 10.5)
    assert cb.state == "closed"
    # The same four outcomes inside the first window would have tripped it.
    cb2 = breaker(consecutive_failures=None, failure_ratio=0.5, min_requests=4, window=10.0)
    for _ in range(3):
        cb2.record(False, T0)
    for _ in range(3):
        cb2.record(True, T0 + 9.5)
    cb2.record(False, T0 + 9.5)  # 4 of 7
    assert cb2.state == "open"


# ------------------------------------------------------------------------------- breaker: open


def test_breaker_open_refuses_until_retry_at() -> None:
    cb = breaker(consecutive_failures=1, base_open_time=5.0)
    trip(cb, T0)
    assert cb.retry_at == pytest.approx(T0 + 5.0)
    assert not cb.allow(T0 + 1.0)
    assert not cb.allow(T0 + 4.999)
    assert cb.state == "open"
    assert cb.allow(T0 + 5.0)
    assert (cb.state, cb.state_code) == ("half_open", 2)


def test_breaker_half_open_limits_concurrent_probes() -> None:
    cb = breaker(consecutive_failures=1, half_open_max_probes=2, success_threshold=10)
    trip(cb, T0)
    now = cb.retry_at
    assert cb.allow(now)
    assert cb.allow(now)
    assert cb.probes_in_flight == 2
    assert not cb.allow(now)
    assert not cb.allow(now + 100.0)  # time alone frees no probe
    cb.record(True, now)  # a completed probe frees its slot
    assert cb.allow(now)
    assert not cb.allow(now)
    cb.release_probe()  # so does a cancelled one
    assert cb.probes_in_flight == 1
    assert cb.allow(now)
    assert not cb.allow(now)
    assert cb.state == "half_open"


def test_breaker_closes_after_success_threshold() -> None:
    cb = breaker(consecutive_failures=3, failure_ratio=0.5, min_requests=4, success_threshold=3)
    trip(cb, T0)
    now = cb.retry_at
    for i in range(3):
        assert cb.state == ("open" if i == 0 else "half_open")
        assert cb.allow(now)
        cb.record(True, now)
    assert cb.state == "closed"
    assert cb.probes_in_flight == 0
    assert cb.openings == 1  # kept: a quick new trip would open it for longer (see flapping test)
    cb.record(False, now)
    cb.record(False, now)
    assert cb.state == "closed"  # 2 in a row < 3, 2 requests < min_requests


def test_breaker_reset_forces_closed() -> None:
    cb = breaker(consecutive_failures=2)
    trip(cb, T0)
    cb.reset()
    assert (cb.state, cb.openings, cb.total_openings) == ("closed", 0, 1)
    cb.record(False, T0)
    assert cb.state == "closed"  # the failures before the reset are forgotten
    cb.record(False, T0)
    assert (cb.state, cb.openings) == ("open", 1)
    assert cb.retry_at == pytest.approx(T0 + 5.0)


def test_breaker_close_forgets_window() -> None:
    cb = breaker(consecutive_failures=None, failure_ratio=0.5, min_requests=4, success_threshold=1)
    for _ in range(4):
        cb.record(False, T0)
    assert cb.state == "open"
    now = cb.retry_at  # still inside the 10 s window of those failures
    assert cb.allow(now)
    cb.record(True, now)
    assert cb.state == "closed"
    # With the 4 old failures still counted, this would be 5 of 5; after the reset it is 1 of 1.
    cb.record(False, now)
    assert cb.state == "closed"


def test_breaker_half_open_failure_reopens_with_doubled_backoff() -> None:
    cb = breaker(consecutive_failures=1, base_open_time=5.0, max_open_time=1000.0)
    trip(cb, T0)
    assert cb.retry_at == pytest.approx(T0 + 5.0)
    now = cb.retry_at
    for openings, expected in [(2, 10.0), (3, 20.0), (4, 40.0), (5, 80.0)]:
        assert cb.allow(now)
        cb.record(False, now)
        assert (cb.state, cb.openings) == ("open", openings)
        assert cb.retry_at - now == pytest.approx(expected)
        assert not cb.allow(now + expected - 0.001)
        now = cb.retry_at


def test_breaker_cap_is_honoured_with_and_without_jitter() -> None:
    for jitter in (0.0, 0.5):
        cb = breaker(
            consecutive_failures=1, base_open_time=1.0, max_open_time=30.0, jitter=jitter
        )
        trip(cb, T0)
        now = cb.retry_at
        durations = []
        for _ in range(60):  # far past 2^5 = 32 > 30
            assert cb.allow(now)
            cb.record(False, now)
            durations.append(cb.retry_at - now)
            now = cb.retry_at
        assert max(durations) <= 30.0
        if jitter == 0.0:
            assert durations[-1] == 30.0
            assert durations[:5] == [2.0, 4.0, 8.0, 16.0, 30.0]
        else:
            assert min(durations[10:]) >= 15.0  # 30 × (1 - 0.5)
    assert CircuitBreaker(base_open_time=5.0, max_open_time=300.0).open_time(10**6) == 300.0


def test_breaker_jitter_within_bounds() -> None:
    cb = breaker(consecutive_failures=1, base_open_time=10.0, jitter=0.2, rng=random.Random(1))
    durations = []
    for _ in range(500):
        cb.reset()
        trip(cb, T0)
        assert cb.openings == 1
        durations.append(cb.retry_at - T0)
    assert all(8.0 <= d <= 12.0 for d in durations)
    assert min(durations) < 8.5 and max(durations) > 11.5  # actually spread over the range
    # Seeded: the same sequence again.
    cb2 = breaker(consecutive_failures=1, base_open_time=10.0, jitter=0.2, rng=random.Random(1))
    trip(cb2, T0)
    assert cb2.retry_at - T0 == durations[0]


def test_breaker_flapping_keeps_growing_backoff_but_decays_when_healthy() -> None:
    cb = breaker(
        consecutive_failures=1, base_open_time=5.0, max_open_time=60.0, success_threshold=1
    )
    trip(cb, T0)
    now = cb.retry_at
    assert cb.allow(now)
    cb.record(True, now)  # closed at T0 + 5
    assert cb.state == "closed"
    trip(cb, now + 1.0)  # trips again 1 s after closing: still consecutive
    assert cb.openings == 2
    assert cb.retry_at - (now + 1.0) == pytest.approx(10.0)
    now = cb.retry_at
    assert cb.allow(now)
    cb.record(True, now)
    later = now + 60.0  # healthy for max_open_time: the count starts again
    trip(cb, later)
    assert (cb.openings, cb.total_openings) == (1, 3)
    assert cb.retry_at - later == pytest.approx(5.0)


def test_breaker_ignores_results_while_open_and_without_probes() -> None:
    cb = breaker(consecutive_failures=1, success_threshold=1)
    trip(cb, T0)
    for _ in range(10):
        cb.record(True, T0 + 1.0)  # late results of requests sent before the trip
    assert cb.state == "open"
    now = cb.retry_at
    assert cb.allow(now)
    cb.release_probe()  # the probe was cancelled
    cb.record(True, now)  # a stray success with no probe outstanding does not close it
    assert cb.state == "half_open"
    cb.release_probe()  # extra releases never go negative
    assert cb.probes_in_flight == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_failures": 0},
        {"failure_ratio": 0.0},
        {"failure_ratio": 1.5},
        {"min_requests": 0},
        {"base_open_time": 0.0},
        {"base_open_time": 10.0, "max_open_time": 5.0},
        {"jitter": 1.0},
        {"jitter": -0.1},
        {"success_threshold": 0},
        {"half_open_max_probes": 0},
        {"window": 0.0},
    ],
)
def test_breaker_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)


# ------------------------------------------------------------------------------- retry budget


def test_budget_caps_retries_at_percent_of_requests() -> None:
    b = RetryBudget(budget_percent=20.0, min_retries_per_window=3, window=10.0)
    for i in range(1000):
        b.record_request(T0 + i * 0.001)
    granted = sum(b.try_acquire(T0 + 1.0) for _ in range(500))
    assert granted == 200 + 3
    assert (b.retries, b.exhausted) == (203, 297)
    assert b.available(T0 + 1.0) == 0


def test_budget_never_exceeds_share_while_every_request_fails() -> None:
    b = RetryBudget(budget_percent=20.0, min_retries_per_window=3, window=10.0)
    now = T0
    for _ in range(2000):  # every request wants up to 3 retries, all inside one window
        b.record_request(now)
        for _ in range(3):
            if not b.try_acquire(now):
                break
        assert b.retries_in_window <= 3 + 0.2 * b.requests_in_window
        now += 0.004
    assert b.retries == 3 + 0.2 * 2000
    assert b.exhausted > 0


def test_budget_min_retries_without_traffic() -> None:
    b = RetryBudget(budget_percent=20.0, min_retries_per_window=3)
    assert [b.try_acquire(T0) for _ in range(5)] == [True, True, True, False, False]
    assert (b.retries, b.exhausted) == (3, 2)
    # 4 requests earn 0.8 of a retry: not yet a whole one; the 5th makes it one.
    for _ in range(4):
        b.record_request(T0)
    assert not b.try_acquire(T0)
    b.record_request(T0)
    assert b.try_acquire(T0)


def test_budget_zero_percent_allows_only_the_minimum() -> None:
    b = RetryBudget(budget_percent=0.0, min_retries_per_window=2)
    for _ in range(10_000):
        b.record_request(T0)
    assert sum(b.try_acquire(T0) for _ in range(10)) == 2


def test_budget_recovers_after_the_window() -> None:
    b = RetryBudget(budget_percent=20.0, min_retries_per_window=3, window=10.0)
    for _ in range(100):
        b.record_request(T0)
    assert sum(b.try_acquire(T0) for _ in range(100)) == 23
    assert not b.try_acquire(T0 + 9.5)  # same window (the first bucket is still in it)
    assert b.available(T0 + 10.0) == 3  # window passed: requests and retries both expired
    assert sum(b.try_acquire(T0 + 10.0) for _ in range(10)) == 3
    for _ in range(50):
        b.record_request(T0 + 10.0)
    assert sum(b.try_acquire(T0 + 10.0) for _ in range(50)) == 10


def test_budget_slides_bucket_by_bucket() -> None:
    b = RetryBudget(budget_percent=50.0, min_retries_per_window=0, window=10.0, buckets=10)
    for _ in range(10):
        b.record_request(T0)  # bucket 0
    for _ in range(10):
        b.record_request(T0 + 5.0)  # bucket 5
    assert b.available(T0 + 9.0) == 10
    assert b.available(T0 + 10.0) == 5  # bucket 0 left the window
    assert b.available(T0 + 15.0) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"budget_percent": -1.0}, {"budget_percent": 101.0}, {"min_retries_per_window": -1},
     {"window": 0.0}],
)
def test_budget_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryBudget(**kwargs)


def test_backoff_full_jitter_bounds() -> None:
    rng = random.Random(3)
    base, cap = 0.1, 2.0
    for attempt in range(1, 12):
        ceiling = min(cap, base * 2 ** (attempt - 1))
        samples = [backoff(attempt, base, cap, rng) for _ in range(300)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > 0.9 * ceiling  # full jitter uses the whole range...
        assert min(samples) < 0.1 * ceiling  # ...down to zero
    assert backoff(10_000, base, cap, rng) <= cap  # no overflow for absurd attempts
    assert backoff(1, base, cap, random.Random(5)) == backoff(1, base, cap, random.Random(5))
    assert 0.0 <= backoff(2, base, cap) <= 0.2  # default rng
    with pytest.raises(ValueError):
        backoff(0, base, cap, rng)


# ------------------------------------------------------------------------------- bulkhead


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine on a fresh loop of the kind given; a hang (a leaked slot) fails in 10 s."""
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, 10.0))

    return runner


def test_bulkhead_exceptions_hierarchy() -> None:
    assert issubclass(BulkheadTimeout, BulkheadFull)
    assert issubclass(BulkheadFull, PyproxyError)


def test_bulkhead_try_enter_fast_path() -> None:
    bh = Bulkhead(max_concurrent=2, max_queue=1, queue_timeout=1.0)
    assert [bh.try_enter() for _ in range(3)] == [True, True, False]
    assert (bh.active, bh.rejected) == (2, 0)  # a failed try_enter is not a rejection
    bh.leave()
    assert bh.try_enter()
    bh.leave()
    bh.leave()
    assert bh.active == 0
    with pytest.raises(RuntimeError):
        bh.leave()


def test_bulkhead_zero_means_unlimited() -> None:
    bh = Bulkhead(max_concurrent=0, max_queue=0, queue_timeout=None)
    assert all(bh.try_enter() for _ in range(10_000))
    assert bh.active == 10_000
    for _ in range(10_000):
        bh.leave()
    assert bh.active == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_concurrent": -1}, {"max_queue": -1}, {"queue_timeout": 0.0}, {"queue_timeout": -1.0}],
)
def test_bulkhead_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Bulkhead(**kwargs)


def test_bulkhead_concurrency_never_exceeds_max(run: Run) -> None:
    bh = Bulkhead(max_concurrent=3, max_queue=100, queue_timeout=None)
    inside = 0
    peak = 0
    done = 0

    async def work(i: int) -> None:
        nonlocal inside, peak, done
        async with bh:
            inside += 1
            peak = max(peak, inside)
            assert bh.active <= 3
            await asyncio.sleep(0.002 * (i % 4))
            inside -= 1
        done += 1

    async def main() -> None:
        await asyncio.gather(*(work(i) for i in range(40)))

    run(main())
    assert (peak, done) == (3, 40)
    assert (bh.active, bh.queued, bh.rejected, bh.timeouts) == (0, 0, 0, 0)
    assert bh.waited == 37  # all but the first three had to queue


def test_bulkhead_queue_full_rejects_immediately(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=2, queue_timeout=5.0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert bh.try_enter()
        waiters = [asyncio.create_task(bh.enter()) for _ in range(2)]
        await asyncio.sleep(0)
        assert bh.queued == 2
        start = loop.time()
        with pytest.raises(BulkheadFull) as info:
            await bh.enter()
        assert type(info.value) is BulkheadFull
        assert loop.time() - start < 0.05
        assert (bh.rejected, bh.queued, bh.active) == (1, 2, 1)
        for _ in range(3):
            bh.leave()
            await asyncio.sleep(0)
        await asyncio.gather(*waiters)
        assert (bh.active, bh.queued) == (0, 0)

    run(main())


def test_bulkhead_no_queue_rejects(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=0, queue_timeout=1.0)

    async def main() -> None:
        await bh.enter()
        with pytest.raises(BulkheadFull):
            await bh.enter()
        assert bh.rejected == 1

    run(main())


def test_bulkhead_queue_timeout(run: Run) -> None:
    timeout = 0.1
    bh = Bulkhead(max_concurrent=1, max_queue=5, queue_timeout=timeout)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await bh.enter()
        start = loop.time()
        with pytest.raises(BulkheadTimeout):
            await bh.enter()
        elapsed = loop.time() - start
        # Timers may fire up to the clock resolution early (1 ms on uvloop); lateness is generous.
        assert timeout - 0.005 <= elapsed <= timeout + 1.0
        assert (bh.timeouts, bh.queued, bh.active, bh.rejected) == (1, 0, 1, 0)
        assert bh.waited == 1
        assert timeout - 0.005 <= bh.queue_wait_total <= timeout + 1.0
        bh.leave()
        assert bh.active == 0

    run(main())


def test_bulkhead_admits_in_fifo_order(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=10, queue_timeout=None)
    order: list[int] = []

    async def work(i: int) -> None:
        async with bh:
            order.append(i)
            await asyncio.sleep(0)

    async def main() -> None:
        assert bh.try_enter()
        tasks = []
        for i in range(8):
            tasks.append(asyncio.create_task(work(i)))
            await asyncio.sleep(0)  # let it reach the queue before the next one starts
        assert bh.queued == 8
        bh.leave()
        await asyncio.gather(*tasks)

    run(main())
    assert order == list(range(8))


def test_bulkhead_handoff_beats_newcomers(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=10, queue_timeout=None)

    async def main() -> None:
        assert bh.try_enter()
        waiter = asyncio.create_task(bh.enter())
        await asyncio.sleep(0)
        bh.leave()  # the slot goes to the waiter, which has not run yet
        assert (bh.active, bh.queued) == (1, 0)
        assert not bh.try_enter()  # a newcomer cannot take it in between
        await waiter
        assert bh.active == 1
        bh.leave()
        assert bh.active == 0

    run(main())


def test_bulkhead_cancelled_waiter_does_not_leak(run: Run) -> None:
    bh = Bulkhead(max_concurrent=2, max_queue=10, queue_timeout=5.0)

    async def main() -> None:
        assert bh.try_enter() and bh.try_enter()
        tasks = [asyncio.create_task(bh.enter()) for _ in range(3)]
        await asyncio.sleep(0)
        assert bh.queued == 3
        tasks[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        assert bh.queued == 2
        bh.leave()
        bh.leave()
        await asyncio.gather(tasks[0], tasks[2])
        assert (bh.active, bh.queued) == (2, 0)
        bh.leave()
        bh.leave()
        assert bh.active == 0
        # Every slot can be taken again, and no more.
        assert [bh.try_enter() for _ in range(3)] == [True, True, False]

    run(main())
    assert bh.timeouts == 0


def test_bulkhead_cancel_after_handoff_passes_slot_on(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=10, queue_timeout=None)

    async def main() -> None:
        assert bh.try_enter()
        first = asyncio.create_task(bh.enter())
        await asyncio.sleep(0)
        second = asyncio.create_task(bh.enter())
        await asyncio.sleep(0)
        bh.leave()  # slot handed to `first`...
        first.cancel()  # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await first
        await second  # the slot went on to the next waiter
        assert (bh.active, bh.queued) == (1, 0)
        bh.leave()
        assert bh.active == 0
        assert bh.try_enter()
        assert not bh.try_enter()

    run(main())


def test_bulkhead_cancel_by_wait_for_timeout(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=10, queue_timeout=None)

    async def main() -> None:
        await bh.enter()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bh.enter(), 0.01)
        assert (bh.queued, bh.active, bh.timeouts) == (0, 1, 0)
        bh.leave()
        assert bh.active == 0

    run(main())


def test_bulkhead_enter_cb_paths(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=1, queue_timeout=5.0)
    results: list[tuple[str, bool]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # Immediate: called synchronously, before enter_cb returns.
        assert bh.enter_cb(lambda ok: results.append(("a", ok)), loop) is None
        assert results == [("a", True)]
        # Queued: not called yet, a waiter comes back.
        waiter = bh.enter_cb(lambda ok: results.append(("b", ok)), loop)
        assert waiter is not None
        assert (results, bh.queued) == ([("a", True)], 1)
        # Rejected: the queue is full, False synchronously.
        assert bh.enter_cb(lambda ok: results.append(("c", ok)), loop) is None
        assert results[-1] == ("c", False)
        assert bh.rejected == 1
        # leave() hands the slot over, calling the waiter's callback inside leave().
        bh.leave()
        assert results[-1] == ("b", True)
        assert (bh.active, bh.queued, bh.waited) == (1, 0, 1)
        assert not waiter.cancel()  # admitted already: the caller owns the slot
        bh.leave()
        assert bh.active == 0

    run(main())
    assert [r[0] for r in results] == ["a", "c", "b"]


def test_bulkhead_enter_cb_timeout(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=4, queue_timeout=0.05)
    results: list[bool] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert bh.try_enter()
        waiter = bh.enter_cb(results.append, loop)
        assert waiter is not None
        start = loop.time()
        while not results and loop.time() - start < 2.0:
            await asyncio.sleep(0.005)
        assert results == [False]
        assert 0.045 <= loop.time() - start <= 1.0
        assert (bh.timeouts, bh.queued, bh.active) == (1, 0, 1)
        assert not waiter.cancel()
        bh.leave()
        assert bh.active == 0

    run(main())


def test_bulkhead_enter_cb_cancel(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=4, queue_timeout=0.02)
    results: list[bool] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert bh.try_enter()
        waiter = bh.enter_cb(results.append, loop)
        assert waiter is not None
        assert waiter.cancel()
        assert not waiter.cancel()
        assert bh.queued == 0
        await asyncio.sleep(0.06)  # past the timeout: its timer was cancelled with it
        assert results == []
        assert bh.timeouts == 0
        bh.leave()  # nobody waiting: the slot is freed, not handed to the cancelled waiter
        assert bh.active == 0
        assert results == []

    run(main())


def test_bulkhead_queue_wait_total(run: Run) -> None:
    bh = Bulkhead(max_concurrent=1, max_queue=4, queue_timeout=None)

    async def main() -> None:
        assert bh.try_enter()
        waiters = [asyncio.create_task(bh.enter()) for _ in range(2)]
        await asyncio.sleep(0.05)
        bh.leave()  # first waiter admitted after ~50 ms
        await waiters[0]
        bh.leave()  # second, after about the same
        await waiters[1]
        bh.leave()

    run(main())
    assert bh.waited == 2
    assert 0.09 <= bh.queue_wait_total <= 1.0
    assert bh.active == 0

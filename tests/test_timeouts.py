"""SharedTimeout: asyncio.timeout's semantics with one loop timer for every pending await."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from pyproxy.loop import new_event_loop
from pyproxy.resilience.timeouts import SharedTimeout


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 10))


def test_result_passes_through_and_nothing_stays_pending() -> None:
    async def main() -> None:
        shared = SharedTimeout(1.0)

        async def answer() -> int:
            await asyncio.sleep(0)
            return 42

        assert await shared.run(answer()) == 42
        with shared.bound():
            value = await answer()
        assert value == 42
        assert shared.pending == 0

    run(main)


def test_each_await_expires_at_its_own_deadline() -> None:
    """Awaits started 0, 40 and 80 ms apart, each bounded by 100 ms, time out in that order at
    ~100, ~140 and ~180 ms; a quick one in between finishes untouched."""

    async def main() -> None:
        shared = SharedTimeout(0.1)
        start = time.monotonic()
        ended: dict[str, float] = {}

        async def stuck(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            with pytest.raises(TimeoutError):
                with shared.bound():
                    await asyncio.sleep(10)
            ended[name] = time.monotonic() - start

        async def quick() -> None:
            await asyncio.sleep(0.05)
            assert await shared.run(asyncio.sleep(0.01, "done")) == "done"
            ended["quick"] = time.monotonic() - start

        await asyncio.gather(stuck("a", 0), stuck("b", 0.04), quick(), stuck("c", 0.08))
        assert sorted(ended, key=ended.__getitem__) == ["quick", "a", "b", "c"]
        for name, expected in (("a", 0.1), ("b", 0.14), ("c", 0.18)):
            assert expected - 0.005 <= ended[name] < expected + 0.05, (name, ended[name])
        assert shared.pending == 0

    run(main)


def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def main() -> None:
        shared = SharedTimeout(5.0)

        async def waiter() -> None:
            with shared.bound():
                await asyncio.sleep(10)

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert shared.pending == 0

    run(main)


def test_a_timed_out_task_is_not_left_cancelling_and_can_go_on() -> None:
    """After a TimeoutError the task's cancel count is back (uncancel), so a later await in the same
    task is not cancelled again and another bounded await works."""

    async def main() -> None:
        shared = SharedTimeout(0.02)
        with pytest.raises(TimeoutError):
            await shared.run(asyncio.sleep(1))
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.03)
        assert await shared.run(asyncio.sleep(0.001, 7)) == 7

    run(main)


def test_one_timer_serves_a_stream_of_quick_awaits() -> None:
    """Thousands of quick bounded awaits in a row re-arm the loop timer about once per period, not
    once each (what makes it cheaper than asyncio.timeout)."""

    async def main() -> None:
        shared = SharedTimeout(0.05)
        timers: list[object] = []  # each distinct loop timer the awaits saw (kept: ids stay unique)
        started = time.monotonic()
        calls = 0
        while time.monotonic() - started < 0.2:
            with shared.bound():
                if not timers or shared._timer is not timers[-1]:
                    timers.append(shared._timer)
                await asyncio.sleep(0)
            calls += 1
        assert calls > 500
        assert len(timers) <= 0.2 / 0.05 + 2
        assert shared.pending == 0

    run(main)


def test_rejects_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="seconds must be > 0"):
        SharedTimeout(0)


def test_a_swallowed_expiry_is_still_taken_back() -> None:
    """Awaited code that catches our cancel and returns normally: no TimeoutError then (as with
    asyncio.timeout), but the task's cancel count is restored."""

    async def main() -> None:
        shared = SharedTimeout(0.02)

        async def stubborn() -> str:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                return "swallowed"
            return "slept"

        with shared.bound():
            result = await stubborn()
        assert result == "swallowed"
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    run(main)


def test_an_expiry_fires_the_timer_a_few_times_not_hundreds() -> None:
    """uvloop's clock moves in whole milliseconds; an expiry must not re-arm the timer until the
    clock reaches the exact deadline (hundreds of zero-delay timers, a busy loop)."""

    class Counting(SharedTimeout):
        __slots__ = ("fired",)

        def _expire(self) -> None:
            self.fired += 1
            super()._expire()

    async def main() -> None:
        shared = Counting(0.05)
        shared.fired = 0
        with pytest.raises(TimeoutError):
            await shared.run(asyncio.sleep(1))
        assert 1 <= shared.fired <= 3, shared.fired

    run(main)

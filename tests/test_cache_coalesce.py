"""Request coalescing (pyproxy/cache/coalesce.py)."""

from __future__ import annotations

import asyncio

import pytest

from pyproxy.cache.coalesce import Coalescer


def test_one_hundred_concurrent_misses_make_one_fetch() -> None:
    async def main() -> None:
        c: Coalescer[bytes] = Coalescer()
        fetches = 0

        async def fetch() -> bytes:
            nonlocal fetches
            fetches += 1
            await asyncio.sleep(0.05)
            return b"answer"

        results = await asyncio.gather(*(c.run("k", fetch) for _ in range(100)))
        assert fetches == 1
        assert all(r == b"answer" for r, _ in results)
        assert sum(collapsed for _, collapsed in results) == 99
        assert (c.stats.leaders, c.stats.collapsed) == (1, 99)
        assert not c.in_flight("k")
        # Other keys are not held up; a later miss fetches again.
        await c.run("k", fetch)
        assert fetches == 2

    asyncio.run(main())


def test_waiting_is_bounded_by_time_and_by_count() -> None:
    async def main() -> None:
        c: Coalescer[str] = Coalescer(wait_timeout=0.05, max_waiters=2)
        release = asyncio.Event()
        fetches = 0

        async def slow() -> str:
            nonlocal fetches
            fetches += 1
            await release.wait()
            return "slow"

        async def quick() -> str:
            nonlocal fetches
            fetches += 1
            return "own"

        leader = asyncio.create_task(c.run("k", slow))
        await asyncio.sleep(0)
        followers = [asyncio.create_task(c.run("k", quick)) for _ in range(4)]
        done = await asyncio.gather(*followers)
        # Two waited (then timed out and fetched), two found the queue full and fetched at once.
        assert sorted(done) == [("own", False)] * 4
        assert (c.stats.timed_out, c.stats.overflow) == (2, 2)
        release.set()
        assert await leader == ("slow", False)
        assert fetches == 5

    asyncio.run(main())


def test_a_failing_leader_fails_its_followers_and_clears_the_key() -> None:
    async def main() -> None:
        c: Coalescer[str] = Coalescer()

        async def broken() -> str:
            await asyncio.sleep(0.02)
            raise ConnectionError("upstream refused")

        results = await asyncio.gather(*(c.run("k", broken) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results)
        assert not c.in_flight("k")

        async def fine() -> str:
            return "ok"

        assert await c.run("k", fine) == ("ok", False)

    asyncio.run(main())


def test_followers_of_a_cancelled_leader_fetch_themselves() -> None:
    async def main() -> None:
        c: Coalescer[str] = Coalescer()

        async def stuck() -> str:
            await asyncio.sleep(10)
            return "never"

        async def fine() -> str:
            return "own"

        leader = asyncio.create_task(c.run("k", stuck))
        await asyncio.sleep(0)
        follower = asyncio.create_task(c.run("k", fine))
        await asyncio.sleep(0.01)
        leader.cancel()
        assert await follower == ("own", False)
        with pytest.raises(asyncio.CancelledError):
            await leader

    asyncio.run(main())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Coalescer(wait_timeout=0)

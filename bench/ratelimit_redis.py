"""Rate-limit checks: local (shared memory) and Redis-backed, against their anchors in the same run.

    python bench/ratelimit_redis.py [--rounds 5] [--calls 500]

Starts a real ``redis-server`` on a free 127.0.0.1 port (Debian package ``redis-server``), stopped
by its PID afterwards, pinned to a core of its own (as Redis runs elsewhere in a deployment). Alternating rounds, it times:

- ``LocalLimiter.hit_sync`` with 1 and 3 levels (``SharedWindows`` across processes), and
  ``SlidingWindow.hit`` (per process) as the anchor, in ns per call;
- ``RedisLimiter.hit`` with 3 levels (one Lua round trip), a raw ``PING`` (the floor: one round trip
  that does nothing) and the ``limits`` library's async Redis moving window (one level), p50 and p99
  in µs, and the ratio of our 3-level p50 to one ``PING`` (the issue's target: ≤ 1.3): the median
  of the rounds' ratios, the cases taking turns call by call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from services import RedisServer  # noqa: E402  (the tests' real-service fixtures)

from pyproxy.core import SlidingWindow  # noqa: E402
from pyproxy.ratelimit.checks import Check  # noqa: E402
from pyproxy.ratelimit.local import LocalLimiter  # noqa: E402

BIG = 2**31  # limits no benchmark call reaches: every call is an allowed hit


def local_ns(calls: int) -> dict[str, float]:
    """ns per call of the in-memory checks (median of 5 batches)."""
    limiter = LocalLimiter(capacity=1 << 16)
    # tuples, as the proxy's rate-limit policy hands them out (the limiter keeps its plan for one)
    one = (Check("user:a", BIG, 1.0),)
    three = (Check("global", BIG, 1.0), Check("route:/v1", BIG, 1.0), Check("user:a", BIG, 1.0))
    window = SlidingWindow(BIG, 1.0)
    out: dict[str, list[float]] = {"local 1 level": [], "local 3 levels": [], "SlidingWindow.hit": []}
    for _ in range(5):
        for name, fn in (
            ("local 1 level", lambda: limiter.hit_sync(one)),
            ("local 3 levels", lambda: limiter.hit_sync(three)),
            ("SlidingWindow.hit", lambda: window.hit("user:a")),
        ):
            start = time.perf_counter_ns()
            for _ in range(calls * 20):
                fn()
            out[name].append((time.perf_counter_ns() - start) / (calls * 20))
    return {k: statistics.median(v) for k, v in out.items()}


async def redis_us(url: str, calls: int, rounds: int) -> tuple[dict[str, tuple[float, float]], list[float]]:
    """(p50, p99) µs per call of each Redis-backed check, rounds alternated; and per round the
    ratio of our 3-level p50 to PING's in that round (the machine's noise moves both alike)."""
    import redis.asyncio as aioredis
    from limits import RateLimitItemPerSecond
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import MovingWindowRateLimiter

    from pyproxy.ratelimit.redis_backend import RedisLimiter

    client = aioredis.Redis.from_url(url)
    ours = RedisLimiter(client, timeout=1.0)
    # A tuple, as the proxy's rate-limit policy hands them out (the limiter keeps its plan for it).
    three = (Check("global", BIG, 1.0), Check("route:/v1", BIG, 1.0), Check("user:a", BIG, 1.0))
    anchor = MovingWindowRateLimiter(RedisStorage(url.replace("redis://", "async+redis://"), implementation="redispy"))
    item = RateLimitItemPerSecond(10**9)

    async def ping() -> None:
        await client.ping()

    async def hit3() -> None:
        await ours.hit(three)

    async def moving_window() -> None:
        await anchor.hit(item, "user", "a")

    cases = {"PING": ping, "RedisLimiter 3 levels": hit3, "limits moving window 1 level": moving_window}
    for fn in cases.values():  # warm up: scripts loaded, connections open
        for _ in range(50):
            await fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    ratios: list[float] = []
    for r in range(rounds):
        # The cases take turns call by call (in an order that alternates between rounds): a
        # machine whose speed drifts (scheduling across the 2 cores, a neighbour) moves all alike.
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        this_round: dict[str, list[float]] = {name: [] for name in order}
        for _ in range(calls):
            for name in order:
                fn = cases[name]
                start = time.perf_counter()
                await fn()
                this_round[name].append((time.perf_counter() - start) * 1e6)
        for name, times in this_round.items():
            samples[name] += times
        ratios.append(statistics.median(this_round["RedisLimiter 3 levels"]) / statistics.median(this_round["PING"]))
    await client.aclose()
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = (statistics.median(values), values[int(0.99 * (len(values) - 1))])
    return out, ratios


def pin(redis_pid: int | None) -> None:
    """Redis on the last CPU, this process on the others: left to the scheduler, the two sometimes
    share a core and sometimes not, and a round trip's cost flips between two regimes (PING ~100
    vs ~120 µs here) that move the ratio by 0.2."""
    cpus = sorted(os.sched_getaffinity(0))
    if redis_pid is None or len(cpus) < 2:
        return
    os.sched_setaffinity(redis_pid, {cpus[-1]})
    os.sched_setaffinity(0, set(cpus[:-1]))
    print(f"redis-server pinned to CPU {cpus[-1]}, the benchmark to {cpus[:-1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500, help="calls per case and round")
    args = parser.parse_args()
    print("in memory (ns per call, median of 5 batches):")
    for name, ns in local_ns(args.calls).items():
        print(f"  {name:<32}{ns:>10.0f}")
    with RedisServer() as server:
        import uvloop

        pin(server.pid)

        results, ratios = uvloop.run(redis_us(server.url, args.calls, args.rounds))
    print(f"\nRedis on 127.0.0.1 ({args.rounds} alternated rounds × {args.calls} calls; µs):")
    print(f"  {'case':<32}{'p50':>8}{'p99':>8}")
    for name, (p50, p99) in results.items():
        print(f"  {name:<32}{p50:>8.1f}{p99:>8.1f}")
    ping = results["PING"][0]
    print(f"\n  RedisLimiter 3 levels p50 / PING p50: {statistics.median(ratios):.2f} (median of the rounds' "
          f"ratios: {' '.join(f'{r:.2f}' for r in ratios)}; of all samples "
          f"{results['RedisLimiter 3 levels'][0] / ping:.2f})"
          f"\n  limits moving window, 1 level / PING: {results['limits moving window 1 level'][0] / ping:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RedisLimiter against a real redis-server and a real 3-master Redis Cluster (tests/services.py).

Decisions are compared exactly with the pure-Python model of the Rust ``SlidingWindow``
(``tests/model_window.py``), fed the Redis ``TIME`` each decision was made at (microseconds in the
model's nanosecond slot: the arithmetic is the same). Nothing is mocked: Redis is stopped, frozen
(SIGSTOP) and flushed for real.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient

from model_window import ModelWindow, model_hit_all
from pyproxy.errors import PyproxyError
from pyproxy.loop import new_event_loop
from pyproxy.ratelimit import Check, Decision, Penalty, RedisLimiter, RedisUnavailable
from pyproxy.ratelimit.redis_backend import LATENCY_BOUNDS
from services import RedisCluster, RedisServer

LOGGER = "pyproxy.ratelimit.redis"


def run(main: Callable[[], Coroutine[Any, Any, None]], seconds: float = 20) -> None:
    """Run ``main`` on the proxy's production loop (uvloop), bounded in time."""

    async def bounded() -> None:
        await asyncio.wait_for(main(), seconds)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(bounded())


def single(server: RedisServer, **options: Any) -> RedisLimiter:
    options.setdefault("timeout", 1.0)
    return RedisLimiter.from_url(server.url, **options)


def clustered(cluster: RedisCluster, **options: Any) -> RedisLimiter:
    options.setdefault("timeout", 1.0)
    client = ClusterClient(startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes])
    return RedisLimiter(client, owns_client=True, **options)


async def redis_time_us(client: redis.asyncio.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


def us(seconds: float) -> int:
    """A retry_after / window in seconds back to whole microseconds (inf stays inf)."""
    return -1 if math.isinf(seconds) else round(seconds * 1e6)


def model_us(seconds: float) -> int:
    """The model's wait (its 'nanoseconds' are our microseconds) in whole microseconds."""
    return -1 if math.isinf(seconds) else round(seconds * 1e9)


async def keys_on_distinct_nodes(limiter: RedisLimiter, cluster_client: ClusterClient, names: list[str]) -> list[str]:
    """Check keys ``<name>:<n>`` whose hash tags land on pairwise different masters."""
    await cluster_client.initialize()
    chosen: list[str] = []
    taken: set[str] = set()
    for name in names:
        for n in range(1000):
            key = f"{name}:{n}"
            node = cluster_client.get_node_from_key(limiter.block_key(key))
            assert node is not None
            if node.name not in taken:
                taken.add(node.name)
                chosen.append(key)
                break
    assert len(chosen) == len(names)
    return chosen


# -- exactness against the model of the Rust SlidingWindow ------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sliding_window_counter", "sliding_log"])
def test_single_check_matches_model_exactly(redis_clean: RedisServer, algorithm: str) -> None:
    """Every allowed / remaining / retry_after equals the model's at the Redis TIME used."""
    limit, window = 7, 0.2
    check_cost = [1, 1, 2, 3, 1]
    rng = random.Random(5)

    async def main() -> None:
        model = ModelWindow(limit, round(window * 1e6), exact=algorithm == "sliding_log")
        async with single(redis_clean) as lim:
            denied = allowed = 0
            for step in range(70):
                cost = rng.choice(check_cost)
                check = Check("user:m", limit, window, cost=cost, algorithm=algorithm)  # type: ignore[arg-type]
                d = await lim.hit([check])
                want_ok, want_remaining, want_wait = model.hit("user:m", cost, d.server_time_us)
                got = d.results[0]
                assert (d.allowed, got.remaining, us(got.retry_after)) == (
                    want_ok,
                    want_remaining,
                    model_us(want_wait),
                ), f"step {step} cost {cost}"
                allowed += d.allowed
                denied += not d.allowed
                await asyncio.sleep(rng.choice([0, 0, 0.002, 0.01, 0.03, 0.07]))
            assert allowed > 10 and denied > 10  # both sides of the boundary were exercised

    run(main)


@pytest.mark.parametrize("replies", ["packed", "text"])
def test_three_levels_match_model_hit_all(redis_clean: RedisServer, replies: str) -> None:
    """global + route + user (mixed algorithms and windows): all-or-none exactly as ``hit_all``;
    the same with a client that decodes replies as text (the script then answers in decimals)."""
    rng = random.Random(11)
    specs = [
        ("global", 12, 0.5, "sliding_window_counter"),
        ("route:/a", 9, 0.3, "sliding_log"),
        ("user:u", 5, 0.2, "sliding_window_counter"),
    ]

    async def main() -> None:
        models = [ModelWindow(limit, round(w * 1e6), exact=algo == "sliding_log") for _, limit, w, algo in specs]
        if replies == "packed":
            limiter = single(redis_clean)
        else:
            text_client = redis.asyncio.Redis.from_url(redis_clean.url, decode_responses=True)
            limiter = RedisLimiter(text_client, owns_client=True, timeout=1.0)
        async with limiter as lim:
            assert lim._binary_replies == (replies == "packed")
            firsts = set()
            for step in range(60):
                cost = rng.choice([1, 1, 2])
                checks = [
                    Check(k, limit, w, cost=cost, algorithm=a)  # type: ignore[arg-type]
                    for k, limit, w, a in specs
                ]
                d = await lim.hit(checks)
                ok, first, retry, remaining = model_hit_all(
                    [(m, k) for m, (k, *_rest) in zip(models, specs, strict=True)], cost, d.server_time_us
                )
                assert d.allowed == ok, f"step {step}"
                assert d.denied == (None if ok else first)
                assert us(d.retry_after) == model_us(retry)
                assert d.remaining == remaining
                if not ok:
                    firsts.add(first)
                await asyncio.sleep(rng.choice([0, 0, 0.005, 0.02, 0.05]))
            assert firsts  # some requests were denied

    run(main)


# -- semantics --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sliding_window_counter", "sliding_log"])
def test_denying_level_charges_nothing_anywhere(redis_clean: RedisServer, algorithm: str) -> None:
    async def main() -> None:
        checks = [
            Check("global", 100, 30, algorithm=algorithm),  # type: ignore[arg-type]
            Check("route:/x", 50, 30, algorithm=algorithm),  # type: ignore[arg-type]
            Check("user:z", 3, 30, algorithm=algorithm),  # type: ignore[arg-type]
        ]
        async with single(redis_clean) as lim:
            raw = lim.client
            assert isinstance(raw, redis.asyncio.Redis)

            async def used(check: Check) -> int:
                key = lim.state_key(check)
                if algorithm == "sliding_log":
                    return int(await raw.zcard(key))
                return int(await raw.hget(key, "c") or 0)

            for _ in range(3):
                assert (await lim.hit(checks)).allowed
            for _ in range(5):
                d = await lim.hit(checks)
                assert not d.allowed and d.denied == 2 and d.denied_check is checks[2]
                assert [r.allowed for r in d.results] == [True, True, False]
                assert [r.remaining for r in d.results] == [97, 47, 0]  # as they stand: nothing charged
            assert [await used(c) for c in checks] == [3, 3, 3]
            # a denial by the first level charges neither of the others either
            tight = Check("global:tight", 2, 30, cost=2, algorithm=algorithm)  # type: ignore[arg-type]
            other = Check("user:other", 3, 30, algorithm=algorithm)  # type: ignore[arg-type]
            assert (await lim.hit([tight])).allowed
            d = await lim.hit([tight, checks[1], other])
            assert not d.allowed and d.denied == 0 and [r.allowed for r in d.results] == [False, True, True]
            assert [await used(c) for c in (tight, checks[1], other)] == [2, 3, 0]

    run(main)


@pytest.mark.parametrize("algorithm", ["sliding_window_counter", "sliding_log"])
def test_cost_above_one_and_never(redis_clean: RedisServer, algorithm: str) -> None:
    async def main() -> None:
        async with single(redis_clean) as lim:
            check = Check("agent:a", 10, 30, cost=3, algorithm=algorithm)  # type: ignore[arg-type]
            got = [(d.allowed, d.results[0].remaining) for d in [await lim.hit([check]) for _ in range(4)]]
            assert got == [(True, 7), (True, 4), (True, 1), (False, 1)]
            one = await lim.hit([Check("agent:a", 10, 30, cost=1, algorithm=algorithm)])  # type: ignore[arg-type]
            assert one.allowed and one.results[0].remaining == 0
            never = await lim.hit([Check("agent:a", 10, 30, cost=11, algorithm=algorithm)])  # type: ignore[arg-type]
            assert not never.allowed and math.isinf(never.retry_after) and never.retry_after_header is None
            # the same counter listed twice in one request is decided with the combined cost
            twice = Check("agent:b", 5, 30, cost=3, algorithm=algorithm)  # type: ignore[arg-type]
            d = await lim.hit([twice, twice])
            assert not d.allowed and d.results[0].remaining == 5
            assert (await lim.hit([twice])).allowed

    run(main)


@pytest.mark.parametrize("algorithm", ["sliding_window_counter", "sliding_log"])
def test_retry_after_is_the_wait_until_allowed(redis_clean: RedisServer, algorithm: str) -> None:
    async def main() -> None:
        async with single(redis_clean) as lim:
            check = Check("user:r", 4, 0.4, algorithm=algorithm)  # type: ignore[arg-type]
            for _ in range(4):
                assert (await lim.hit([check])).allowed
            d = await lim.hit([check])
            assert not d.allowed and 0 < d.retry_after <= 0.8
            assert d.retry_after_header == 1
            if d.retry_after > 0.1:
                await asyncio.sleep(d.retry_after - 0.05)
                early = await lim.peek([check])
                assert not early.allowed
                await asyncio.sleep(max(0.0, early.retry_after) + 0.002)
            else:
                await asyncio.sleep(d.retry_after + 0.002)
            assert (await lim.hit([check])).allowed

    run(main)


def test_sliding_log_exact_at_the_window_edge(redis_clean: RedisServer) -> None:
    """limit 3 per 0.3 s: the 4th waits exactly until the first ages out; then 1 more, not 3."""

    async def main() -> None:
        async with single(redis_clean) as lim:
            check = Check("user:edge", 3, 0.3, algorithm="sliding_log")
            first = await lim.hit([check])
            await asyncio.sleep(0.1)
            assert (await lim.hit([check])).allowed and (await lim.hit([check])).allowed
            d = await lim.hit([check])
            assert not d.allowed
            assert us(d.retry_after) == first.server_time_us + 300_000 - d.server_time_us
            await asyncio.sleep(d.retry_after + 0.002)
            assert (await lim.hit([check])).allowed
            late = await lim.hit([check])
            assert not late.allowed and late.retry_after > 0.03  # the two later hits are still inside

    run(main)


def test_peek_charges_nothing_and_empty_request(redis_clean: RedisServer) -> None:
    async def main() -> None:
        async with single(redis_clean) as lim:
            check = Check("user:p", 2, 30)
            for _ in range(5):
                d = await lim.peek([check])
                assert d.allowed and d.results[0].remaining == 1
            assert (await lim.hit([])).allowed
            assert (await lim.hit([check])).results[0].remaining == 1

    run(main)


def test_decisions_use_redis_time_not_the_local_clock(
    redis_clean: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored times and window ids are Redis TIME's; a skewed local clock changes nothing."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 7 * 86400)  # the proxy's clock is a week ahead

    async def main() -> None:
        async with single(redis_clean) as lim:
            raw = lim.client
            assert isinstance(raw, redis.asyncio.Redis)
            counter = Check("user:t", 5, 0.25)
            log_check = Check("user:t", 5, 0.25, algorithm="sliding_log")
            before = await redis_time_us(raw)
            d = await lim.hit([counter, log_check])
            after = await redis_time_us(raw)
            assert before <= d.server_time_us <= after
            state = await raw.hgetall(lim.state_key(counter))
            t, i = int(state[b"t"]), int(state[b"i"])
            assert before <= t <= after and i == t // 250_000
            members = await raw.zrange(lim.state_key(log_check), 0, -1, withscores=True)
            assert len(members) == 1 and before <= int(members[0][1]) <= after
            assert abs(d.server_time_us / 1e6 - time.time()) > 86400  # far from the (skewed) local clock

    run(main)


def test_keys_expire_when_they_can_no_longer_matter(redis_clean: RedisServer) -> None:
    async def main() -> None:
        async with single(redis_clean) as lim:
            raw = lim.client
            assert isinstance(raw, redis.asyncio.Redis)
            counter = Check("user:x", 5, 0.2)
            log_check = Check("user:x", 5, 0.2, algorithm="sliding_log")
            await lim.hit([counter, log_check])
            assert 300 < await raw.pttl(lim.state_key(counter)) <= 402  # 2 windows
            assert 100 < await raw.pttl(lim.state_key(log_check)) <= 202  # 1 window
            await asyncio.sleep(0.45)
            assert await raw.exists(lim.state_key(counter), lim.state_key(log_check)) == 0

    run(main)


def test_large_limits_and_windows_stay_exact(redis_clean: RedisServer) -> None:
    """A daily limit of a million counts in coarser time units instead of losing precision."""

    async def main() -> None:
        async with single(redis_clean) as lim:
            day = Check("tenant:big", 1_000_000, 86400.0, cost=999_999)
            d = await lim.hit([day])
            assert d.allowed and d.results[0].remaining == 1
            d = await lim.hit([Check("tenant:big", 1_000_000, 86400.0, cost=2)])
            assert not d.allowed and d.results[0].remaining == 1 and 0 < d.retry_after <= 2 * 86400
            assert (await lim.hit([Check("tenant:big", 1_000_000, 86400.0, cost=1)])).allowed

    run(main)


def test_check_validation() -> None:
    with pytest.raises(ValueError, match="limit"):
        Check("k", -1, 1.0)
    with pytest.raises(ValueError, match="window"):
        Check("k", 1, 0.0)
    with pytest.raises(ValueError, match="cost"):
        Check("k", 1, 1.0, cost=-1)
    with pytest.raises(ValueError, match="algorithm"):
        Check("k", 1, 1.0, algorithm="token_bucket")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        Check("", 1, 1.0)
    with pytest.raises(ValueError, match="block_max"):
        Penalty(3, 1.0, 2.0, 1.0)
    assert Check("user:a", 1, 1.0).name == "user:a"
    assert issubclass(RedisUnavailable, PyproxyError)


# -- concurrency ------------------------------------------------------------------------------------------


async def redis_window_guard(raw: redis.asyncio.Redis, window_us: int, margin_us: int) -> None:
    """Sleep past the next fixed-window boundary if it is closer than ``margin_us``."""
    left = window_us - await redis_time_us(raw) % window_us
    if left < margin_us:
        await asyncio.sleep(left / 1e6 + 0.01)


@pytest.mark.parametrize("algorithm", ["sliding_log", "sliding_window_counter"])
def test_200_concurrent_requests_against_limit_50(redis_clean: RedisServer, algorithm: str) -> None:
    """Four limiters (four proxies) × 50 concurrent tasks: exactly 50 admitted."""

    async def main() -> None:
        limiters = [single(redis_clean, timeout=5.0) for _ in range(4)]
        try:
            raw = limiters[0].client
            assert isinstance(raw, redis.asyncio.Redis)
            check = Check("user:c", 50, 60, algorithm=algorithm)  # type: ignore[arg-type]
            await redis_window_guard(raw, 60_000_000, 3_000_000)
            decisions = await asyncio.gather(*(limiters[i % 4].hit([check]) for i in range(200)))
            assert sum(d.allowed for d in decisions) == 50
            assert all(d.retry_after > 0 for d in decisions if not d.allowed)
        finally:
            for lim in limiters:
                await lim.aclose()

    run(main)


# -- script loading ---------------------------------------------------------------------------------------


def test_noscript_reloads_the_script(redis_clean: RedisServer) -> None:
    async def main() -> None:
        async with single(redis_clean) as lim:
            check = Check("user:s", 5, 30)
            await lim.hit([check])
            assert lim.stats().script_loads == 1
            await asyncio.to_thread(redis_clean.flush)  # FLUSHALL + SCRIPT FLUSH
            d = await lim.hit([check])
            assert d.allowed and d.results[0].remaining == 4
            assert lim.stats().script_loads == 2

    run(main)


# -- failures ---------------------------------------------------------------------------------------------


def test_redis_stopped_fails_fast_backs_off_logs_once_and_resumes(
    redis_clean: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        async with single(redis_clean, timeout=0.05, backoff_base=0.3, backoff_max=0.6) as lim:
            check = Check("user:f", 100, 30)
            assert (await lim.hit([check])).allowed and lim.healthy
            redis_clean.stop()

            started = time.monotonic()
            with pytest.raises(RedisUnavailable) as first:
                await lim.hit([check])
            assert time.monotonic() - started < 0.05 + 0.05
            assert not first.value.fast and first.value.cause is not None
            assert not lim.healthy
            stats = lim.stats()
            assert stats.errors == 1 and stats.incidents == 1

            # During the backoff (>= 0.15 s): fail fast, no round trip.
            for _ in range(50):
                started = time.monotonic()
                with pytest.raises(RedisUnavailable) as fast:
                    await lim.hit([check])
                assert fast.value.fast and time.monotonic() - started < 0.02
            assert lim.stats().round_trips == stats.round_trips
            assert lim.stats().fast_failures == 50

            # Still down after the backoff: one probe fails, the backoff grows; still one log line.
            await asyncio.sleep(0.31)
            with pytest.raises(RedisUnavailable) as probe:
                await lim.hit([check])
            assert not probe.value.fast and lim.stats().round_trips == stats.round_trips + 1

            # Started from the loop's thread, not a worker thread: the server's parent-death signal
            # (PR_SET_PDEATHSIG) follows the thread that forked it.
            redis_clean.start()
            deadline = time.monotonic() + 5
            while True:
                try:
                    d = await lim.hit([check])
                    break
                except RedisUnavailable:
                    assert time.monotonic() < deadline, "the limiter did not resume after Redis came back"
                    await asyncio.sleep(0.02)
            assert d.allowed and lim.healthy
            assert d.results[0].remaining == 99  # a fresh server: its data (and scripts) were lost
            assert lim.stats().incidents == 1

    run(main)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "unavailable" in warnings[0].getMessage()
    assert any(r.levelno == logging.INFO and "answers again" in r.getMessage() for r in caplog.records)


def test_redis_frozen_times_out_within_timeout(redis_clean: RedisServer) -> None:
    """A Redis that accepts but never answers (SIGSTOP): RedisUnavailable after ``timeout``, no hang."""

    async def main() -> None:
        async with single(redis_clean, timeout=0.05, backoff_base=0.05, backoff_max=0.1) as lim:
            check = Check("user:h", 100, 30)
            assert (await lim.hit([check])).allowed
            pid = redis_clean.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(RedisUnavailable, match="no answer within 50 ms"):
                    await lim.hit([check])
                elapsed = time.monotonic() - started
                assert 0.045 <= elapsed < 0.2
            finally:
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 3
            while True:
                try:
                    d = await lim.hit([check])
                    break
                except RedisUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
            assert d.allowed and lim.healthy
            # The frozen request may or may not have been executed by Redis after SIGCONT.
            assert d.results[0].remaining in (97, 98)

    run(main)


# -- penalty box ------------------------------------------------------------------------------------------


def test_penalty_box_blocks_doubles_caps_and_unblocks(redis_clean: RedisServer) -> None:
    penalty = Penalty(max_violations=2, violation_window=5.0, block_for=0.2, block_max=0.5)

    async def main() -> None:
        async with single(redis_clean) as lim:
            user = Check("user:bad", 1, 30, algorithm="sliding_log", penalty=penalty)
            glob = Check("global", 1000, 30)
            assert (await lim.hit([glob, user])).allowed

            async def violate_until_blocked() -> Decision:
                for n in (1, 2):
                    d = await lim.hit([glob, user])
                    assert not d.allowed and not d.blocked and d.newly_blocked == ()
                    assert await lim.violations("user:bad") == n
                d = await lim.hit([glob, user])  # the third violation: more than 2
                assert not d.allowed and d.newly_blocked == ("user:bad",) and d.results[1].blocked
                return d

            expected = [0.2, 0.4, 0.5]  # doubling, capped at block_max
            for strikes, duration in enumerate(expected, start=1):
                await violate_until_blocked()
                state = await lim.block_state("user:bad")
                assert state is not None and state.strikes == strikes
                assert duration - 0.05 < state.remaining <= duration
                # While blocked: denied by the box, nothing charged, no violation counted.
                d = await lim.hit([glob, user])
                assert not d.allowed and d.blocked and d.denied == 1 and d.retry_after >= state.remaining - 0.01
                assert await lim.violations("user:bad") == 0
                await asyncio.sleep(state.remaining + 0.01)
                assert await lim.blocked_until("user:bad") is None
            assert (await lim.peek([glob])).results[0].remaining == 998  # charged once (peek: after 1 more)

            await violate_until_blocked()
            assert await lim.unblock("user:bad") is True
            assert await lim.blocked_until("user:bad") is None
            assert await lim.unblock("user:bad") is False
            # forgiven: the strikes are gone too, the next block is block_for again
            await violate_until_blocked()
            state = await lim.block_state("user:bad")
            assert state is not None and state.strikes == 1

    run(main)


def test_blocked_key_is_denied_without_charging(redis_clean: RedisServer) -> None:
    penalty = Penalty(max_violations=5, violation_window=5.0, block_for=1.0, block_max=8.0)

    async def main() -> None:
        async with single(redis_clean) as lim:
            glob = Check("global", 100, 30)
            route = Check("route:/b", 100, 30, algorithm="sliding_log")
            user = Check("user:blk", 100, 30, penalty=penalty)
            until = await lim.block("user:blk", 2.0)
            assert abs(until - (await lim.blocked_until("user:blk") or 0)) < 1e-6
            d = await lim.hit([glob, route, user])
            assert not d.allowed and d.blocked and d.denied == 2 and 1.9 < d.retry_after <= 2.0
            assert [r.allowed for r in d.results] == [True, True, False]
            assert (await lim.peek([glob, route])).remaining == 99  # nothing charged (peek: after 1 more)
            # the same key without a penalty box in this check is not affected by the block
            assert (await lim.hit([Check("user:blk", 100, 30)])).allowed

    run(main)


def test_list_blocked(redis_clean: RedisServer) -> None:
    async def main() -> None:
        async with single(redis_clean) as lim:
            odd = "user:{odd}%7B:*"
            await lim.block("user:a", 5)
            await lim.block(odd, 3)
            await lim.block("user:gone", 0.05)
            await lim.hit([Check("user:a", 5, 30)])  # state keys are not block keys
            await asyncio.sleep(0.06)
            listed = await lim.list_blocked()
            assert [b.key for b in listed] == [odd, "user:a"]
            assert 2.5 < listed[0].remaining <= 3 and 4.5 < listed[1].remaining <= 5
            assert await lim.unblock(odd)
            assert [b.key for b in await lim.list_blocked()] == ["user:a"]

    run(main)


# -- metrics ----------------------------------------------------------------------------------------------


def test_stats_count_round_trips_and_latency(redis_clean: RedisServer) -> None:
    async def main() -> None:
        async with single(redis_clean) as lim:
            for _ in range(10):
                await lim.hit([Check("global", 100, 30), Check("user:q", 10, 1)])
            stats = lim.stats()
            assert stats.healthy and stats.errors == 0
            assert stats.round_trips == 10 + 2  # one script per request; the first one loaded it
            assert sum(stats.latency_counts) == 10 and len(stats.latency_counts) == len(LATENCY_BOUNDS) + 1
            assert stats.last_latency is not None and 0 < stats.last_latency < 1
            assert stats.latency_sum >= stats.last_latency

    run(main)


# -- Redis Cluster ----------------------------------------------------------------------------------------


def test_cluster_state_of_one_key_shares_a_slot(redis_cluster_clean: RedisCluster) -> None:
    async def main() -> None:
        async with clustered(redis_cluster_clean) as lim:
            client = lim.client
            assert isinstance(client, ClusterClient)
            for key in ["user:alice", "route:/v1/{x}", "%7B}{"]:
                names = [
                    lim.state_key(Check(key, 20, 1)),
                    lim.state_key(Check(key, 1000, 3600, algorithm="sliding_log")),
                    lim.block_key(key),
                    lim.violation_key(key),
                ]
                assert len({client.keyslot(name) for name in names}) == 1, names
            assert client.keyslot(lim.block_key("a")) != client.keyslot(lim.block_key("b"))

    run(main)


@pytest.mark.parametrize("algorithm", ["sliding_window_counter", "sliding_log"])
def test_cluster_three_levels_on_three_masters_all_or_none(redis_cluster_clean: RedisCluster, algorithm: str) -> None:
    async def main() -> None:
        async with clustered(redis_cluster_clean) as lim:
            client = lim.client
            assert isinstance(client, ClusterClient)
            g, r, u = await keys_on_distinct_nodes(lim, client, ["global", "route", "user"])
            checks = [
                Check(g, 100, 30, algorithm=algorithm),  # type: ignore[arg-type]
                Check(r, 50, 30, algorithm=algorithm),  # type: ignore[arg-type]
                Check(u, 3, 30, algorithm=algorithm, penalty=Penalty(10, 30, 1, 2)),  # type: ignore[arg-type]
            ]

            async def used(check: Check) -> int:
                key = lim.state_key(check)
                if algorithm == "sliding_log":
                    return int(await client.zcard(key))
                return int(await client.hget(key, "c") or 0)

            for _ in range(3):
                d = await lim.hit(checks)
                assert d.allowed
            for _ in range(4):
                d = await lim.hit(checks)
                assert not d.allowed and d.denied == 2
                assert [x.remaining for x in d.results] == [97, 47, 0]
            assert [await used(c) for c in checks] == [3, 3, 3]  # the other slots were refunded
            assert lim.stats().refunds == 4
            assert await lim.violations(u) == 4
            # once per master and script: HIT on the 3, REFUND on the 2 that charged, BLOCK_STATE on 1
            assert lim.stats().script_loads == 6

    run(main)


def test_cluster_concurrent_requests_refund_exactly(redis_cluster_clean: RedisCluster) -> None:
    """200 concurrent requests, global and user keys on different masters, user limit 50: exactly 50
    admitted, and after the refunds the global count is exactly 50 too."""

    async def main() -> None:
        limiters = [clustered(redis_cluster_clean, timeout=5.0) for _ in range(4)]
        try:
            client = limiters[0].client
            assert isinstance(client, ClusterClient)
            g, u = await keys_on_distinct_nodes(limiters[0], client, ["global", "user"])
            checks = [Check(g, 10_000, 60, algorithm="sliding_log"), Check(u, 50, 60, algorithm="sliding_log")]
            decisions = await asyncio.gather(*(limiters[i % 4].hit(checks) for i in range(200)))
            assert sum(d.allowed for d in decisions) == 50
            assert await client.zcard(limiters[0].state_key(checks[0])) == 50
            assert await client.zcard(limiters[0].state_key(checks[1])) == 50
        finally:
            for lim in limiters:
                await lim.aclose()

    run(main)


def test_cluster_same_slot_request_is_one_script(redis_cluster_clean: RedisCluster) -> None:
    async def main() -> None:
        async with clustered(redis_cluster_clean) as lim:
            checks = [Check("user:one", 20, 1), Check("user:one", 1000, 3600, algorithm="sliding_log")]
            await lim.hit(checks)
            before = lim.stats().round_trips
            d = await lim.hit(checks)
            assert d.allowed and [x.remaining for x in d.results] == [18, 998]
            assert lim.stats().round_trips == before + 1

    run(main)


def test_cluster_noscript_reloads_per_node(redis_cluster_clean: RedisCluster) -> None:
    async def main() -> None:
        async with clustered(redis_cluster_clean) as lim:
            client = lim.client
            assert isinstance(client, ClusterClient)
            keys = await keys_on_distinct_nodes(lim, client, ["a", "b", "c"])
            checks = [Check(k, 10, 30) for k in keys]
            assert (await lim.hit(checks)).allowed
            assert lim.stats().script_loads == 3
            # Forget the script on one master only.
            node = client.get_node_from_key(lim.block_key(keys[1]))
            assert node is not None
            await node.execute_command("SCRIPT", "FLUSH")
            d = await lim.hit(checks)
            assert d.allowed and [x.remaining for x in d.results] == [8, 8, 8]
            assert lim.stats().script_loads == 4

    run(main)


def test_cluster_list_blocked_over_all_masters(redis_cluster_clean: RedisCluster) -> None:
    async def main() -> None:
        async with clustered(redis_cluster_clean) as lim:
            client = lim.client
            assert isinstance(client, ClusterClient)
            keys = await keys_on_distinct_nodes(lim, client, ["u", "v", "w"])
            for n, key in enumerate(keys):
                await lim.block(key, 10 + n)
            listed = await lim.list_blocked()
            assert [b.key for b in listed] == keys
            assert await lim.unblock(keys[0])
            assert [b.key for b in await lim.list_blocked()] == keys[1:]
            blocked = await lim.hit([Check(keys[1], 5, 30, penalty=Penalty(1, 1, 1, 1))])
            assert blocked.blocked and 10 < blocked.retry_after <= 11

    run(main)


def test_cluster_frozen_master_times_out_and_refunds_the_others(redis_cluster_clean: RedisCluster) -> None:
    """One master stops answering (SIGSTOP): RedisUnavailable after ``timeout``; the slot that did
    charge is refunded in the background; work resumes when the master answers again."""

    async def main() -> None:
        async with clustered(redis_cluster_clean, timeout=0.05, backoff_base=0.05, backoff_max=0.1) as lim:
            client = lim.client
            assert isinstance(client, ClusterClient)
            g, u = await keys_on_distinct_nodes(lim, client, ["global", "user"])
            checks = [Check(g, 100, 30, algorithm="sliding_log"), Check(u, 100, 30, algorithm="sliding_log")]
            assert (await lim.hit(checks)).allowed
            owner = client.get_node_from_key(lim.block_key(u))
            assert owner is not None
            node = next(n for n in redis_cluster_clean.nodes if n.port == int(owner.port))
            pid = node.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(RedisUnavailable, match="no answer within 50 ms"):
                    await lim.hit(checks)
                assert time.monotonic() - started < 0.2
                assert not lim.healthy
                # the global slot answered and charged: refunded in the background
                deadline = time.monotonic() + 2
                while await client.zcard(lim.state_key(checks[0])) != 1:
                    assert time.monotonic() < deadline, "the charged slot was not refunded"
                    await asyncio.sleep(0.01)
            finally:
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 5
            while True:
                try:
                    d = await lim.hit(checks)
                    break
                except RedisUnavailable:
                    assert time.monotonic() < deadline, "the limiter did not resume"
                    await asyncio.sleep(0.02)
            assert d.allowed and lim.healthy
            assert await client.zcard(lim.state_key(checks[0])) == 2
            # the frozen master may have run the timed-out script after SIGCONT (kept: the safe side)
            assert await client.zcard(lim.state_key(checks[1])) in (2, 3)
            assert lim.stats().refunds == 1 and lim.stats().refund_failures == 0

    run(main)

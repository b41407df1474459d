"""The proxy's cache phase (pyproxy/cache/phase.py) driven as the data plane drives it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from email.utils import formatdate
from typing import Any

import pytest

from pyproxy.cache import MemoryTier, TieredCache
from pyproxy.cache.http import CachePolicy
from pyproxy.cache.phase import Answer, HttpCachePhase, Plan, Relay

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))


def date(t: float) -> bytes:
    return formatdate(t, usegmt=True).encode()


def phase(clock: Clock, **policy: Any) -> HttpCachePhase:
    cache = TieredCache([MemoryTier()], clock=clock)
    return HttpCachePhase(cache, {"r": CachePolicy(**policy)}, clock=clock)


async def fetch(p: HttpCachePhase, target: bytes = b"/a", headers: list[tuple[bytes, bytes]] | None = None, method: bytes = b"GET", host: bytes = b"h", body: bytes | None = None) -> Answer | Plan | None:
    return await p.lookup("r", method, "http", host, target, headers or [], body)


async def origin(p: HttpCachePhase, plan: Plan, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer | Relay:
    """The upstream answers ``plan``: what the phase says, and the end of the exchange."""
    outcome = p.response(plan, status, headers)
    await p.finish(plan, body if isinstance(outcome, Relay) and outcome.capture else None, True)
    return outcome


def field(answer: Answer, name: bytes) -> bytes | None:
    return next((v for n, v in answer.headers if n.lower() == name), None)


def test_miss_store_hit_with_age_and_cache_status() -> None:
    async def main() -> None:
        clock = Clock()
        p = phase(clock)
        plan = await fetch(p)
        assert isinstance(plan, Plan) and plan.extra_headers == []
        outcome = await origin(p, plan, 200, [(b"Cache-Control", b"max-age=60"), (b"Date", date(T0)), (b"Content-Length", b"5"), (b"Connection", b"keep-alive")], b"hello")
        assert isinstance(outcome, Relay) and outcome.capture
        assert outcome.headers == [(b"Cache-Status", b"pyproxy; fwd=uri-miss; fwd-status=200; stored")]
        clock.now += 10
        hit = await fetch(p)
        assert isinstance(hit, Answer) and hit.status == 200 and bytes(hit.body) == b"hello"
        assert field(hit, b"age") == b"10"
        assert field(hit, b"cache-status") == b"pyproxy; hit; ttl=50; detail=memory"
        assert field(hit, b"connection") is None and field(hit, b"content-length") is None, "hop-by-hop and framing are not stored"
        head = await fetch(p, method=b"HEAD")
        assert isinstance(head, Answer) and head.body == b"" and head.status == 200, "HEAD from a stored GET"
        other_host = await fetch(p, host=b"other")
        assert isinstance(other_host, Plan), "keys differ by Host"
        await p.finish(other_host, None, False)

    run(main)


async def store_two_variants(p: HttpCachePhase) -> None:
    for enc, body in ((b"gzip", b"zipped"), (b"br", b"brotli")):
        plan = await fetch(p, headers=[(b"Accept-Encoding", enc)])
        assert isinstance(plan, Plan)
        await origin(p, plan, 200, [(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept-Encoding")], body)


def test_vary_keeps_one_variant_per_request_value() -> None:
    async def main() -> None:
        p = phase(Clock())
        await store_two_variants(p)
        for enc, body in ((b"gzip", b"zipped"), (b"br", b"brotli")):
            hit = await fetch(p, headers=[(b"Accept-Encoding", enc)])
            assert isinstance(hit, Answer) and bytes(hit.body) == body
        miss = await fetch(p, headers=[(b"Accept-Encoding", b"identity")])
        assert isinstance(miss, Plan)
        await p.finish(miss, None, False)

    run(main)


def test_revalidation_with_304_and_client_conditionals() -> None:
    async def main() -> None:
        clock = Clock()
        p = phase(clock)
        plan = await fetch(p)
        assert isinstance(plan, Plan)
        await origin(p, plan, 200, [(b"Cache-Control", b"max-age=1"), (b"ETag", b'"v1"'), (b"X-Version", b"1")], b"body v1")
        # The client's own conditional request is answered from cache.
        nm = await fetch(p, headers=[(b"If-None-Match", b'"v1"')])
        assert isinstance(nm, Answer) and nm.status == 304 and nm.body == b""
        clock.now += 5
        plan = await fetch(p)
        assert isinstance(plan, Plan) and plan.extra_headers == [(b"If-None-Match", b'"v1"')]
        answer = await origin(p, plan, 304, [(b"Cache-Control", b"max-age=60"), (b"X-Version", b"2")], b"")
        assert isinstance(answer, Answer) and answer.status == 200 and bytes(answer.body) == b"body v1"
        assert field(answer, b"x-version") == b"2"
        assert field(answer, b"cache-status") == b"pyproxy; fwd=stale; fwd-status=304; ttl=60; stored; detail=memory"
        clock.now += 10
        hit = await fetch(p)
        assert isinstance(hit, Answer) and field(hit, b"x-version") == b"2" and bytes(hit.body) == b"body v1"

    run(main)


def test_stale_if_error_and_only_if_cached() -> None:
    async def main() -> None:
        clock = Clock()
        p = phase(clock)
        miss = await fetch(p, headers=[(b"Cache-Control", b"only-if-cached")])
        assert isinstance(miss, Answer) and miss.status == 504
        plan = await fetch(p)
        assert isinstance(plan, Plan)
        await origin(p, plan, 200, [(b"Cache-Control", b"max-age=1, stale-if-error=60"), (b"ETag", b'"e"')], b"old")
        clock.now += 10
        plan = await fetch(p)
        assert isinstance(plan, Plan)
        answer = await origin(p, plan, 503, [], b"down")
        assert isinstance(answer, Answer) and answer.status == 200 and bytes(answer.body) == b"old"
        assert field(answer, b"cache-status").startswith(b"pyproxy; fwd=stale; fwd-status=503")  # type: ignore[union-attr]

    run(main)


def test_stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() -> None:
    async def main() -> None:
        clock = Clock()
        refreshed: list[Plan] = []

        async def refresh(plan: Plan) -> None:
            refreshed.append(plan)
            await origin(p, plan, 200, [(b"Cache-Control", b"max-age=60, stale-while-revalidate=30")], b"new")

        p = HttpCachePhase(TieredCache([MemoryTier()], clock=clock), {"r": CachePolicy()}, clock=clock, refresh=refresh)
        plan = await fetch(p)
        assert isinstance(plan, Plan)
        await origin(p, plan, 200, [(b"Cache-Control", b"max-age=1, stale-while-revalidate=30"), (b"ETag", b'"1"')], b"old")
        clock.now += 5
        stale = await fetch(p)
        assert isinstance(stale, Answer) and bytes(stale.body) == b"old"
        assert field(stale, b"cache-status") == b"pyproxy; hit; ttl=-4; detail=memory"
        await asyncio.sleep(0.05)
        assert len(refreshed) == 1 and refreshed[0].extra_headers == [(b"If-None-Match", b'"1"')]
        fresh = await fetch(p)
        assert isinstance(fresh, Answer) and bytes(fresh.body) == b"new"

    run(main)


def test_concurrent_misses_make_one_upstream_request() -> None:
    async def main() -> None:
        p = phase(Clock())
        requests = [asyncio.ensure_future(fetch(p)) for _ in range(100)]
        await asyncio.sleep(0.05)
        done = [t for t in requests if t.done()]
        assert len(done) == 1, "one request goes upstream; 99 wait for it"
        leader = done[0].result()
        assert isinstance(leader, Plan)
        await origin(p, leader, 200, [(b"Cache-Control", b"max-age=60")], b"once")
        answers = await asyncio.gather(*(t for t in requests if t is not done[0]))
        assert all(isinstance(a, Answer) and bytes(a.body) == b"once" for a in answers)
        assert all(field(a, b"cache-status").endswith(b"; collapsed") for a in answers if isinstance(a, Answer))  # type: ignore[union-attr]
        assert p.coalescer.stats.collapsed == 99

    run(main)


def test_authorization_and_private_responses_are_not_shared() -> None:
    async def main() -> None:
        p = phase(Clock())
        plan = await fetch(p)
        assert isinstance(plan, Plan)
        await origin(p, plan, 200, [(b"Cache-Control", b"max-age=60")], b"public page")
        authorized = await fetch(p, headers=[(b"Authorization", b"Bearer t")])
        assert isinstance(authorized, Plan) and authorized.fwd == "bypass"
        outcome = p.response(authorized, 200, [(b"Cache-Control", b"max-age=60")])
        assert isinstance(outcome, Relay) and not outcome.capture
        private = await fetch(p, target=b"/me")
        assert isinstance(private, Plan)
        assert isinstance(await origin(p, private, 200, [(b"Cache-Control", b"private, max-age=60")], b"mine"), Relay)
        assert isinstance(await fetch(p, target=b"/me"), Plan)

    run(main)


def test_unsafe_methods_invalidate_and_post_is_cached_by_body_when_enabled() -> None:
    async def main() -> None:
        p = phase(Clock(), cache_post=True)
        plan = await fetch(p, target=b"/items/7")
        assert isinstance(plan, Plan)
        await origin(p, plan, 200, [(b"Cache-Control", b"max-age=60")], b"item")
        assert isinstance(await fetch(p, target=b"/items/7"), Answer)
        await p.invalidate(b"PUT", 204, "http", b"h", b"/items/7", [], "r")
        assert p.counters["invalidated"] == 1
        assert isinstance(await fetch(p, target=b"/items/7"), Plan)

        summary = await fetch(p, target=b"/summarize", method=b"POST", body=b"text one")
        assert isinstance(summary, Plan)
        await origin(p, summary, 200, [(b"Cache-Control", b"max-age=60")], b"summary one")
        same = await fetch(p, target=b"/summarize", method=b"POST", body=b"text one")
        assert isinstance(same, Answer) and bytes(same.body) == b"summary one"
        other = await fetch(p, target=b"/summarize", method=b"POST", body=b"text two")
        assert isinstance(other, Plan)
        await p.finish(other, None, False)

    run(main)


def test_tags_from_headers_and_dependencies_purge() -> None:
    async def main() -> None:
        p = phase(Clock())
        plan = await fetch(p, target=b"/page")
        assert isinstance(plan, Plan)
        await origin(p, plan, 200, [(b"Cache-Control", b"max-age=60"), (b"Cache-Tag", b"page, site"), (b"X-Cache-Depends", b"user:7")], b"page")
        plan = await fetch(p, target=b"/other")
        assert isinstance(plan, Plan)
        await origin(p, plan, 200, [(b"Cache-Control", b"max-age=60"), (b"Surrogate-Key", b"other  site2")], b"other")
        result = await p.cache.purge_tags("user:7")
        assert {"user:7", "page", "site"} <= result.tags
        assert isinstance(await fetch(p, target=b"/page"), Plan)
        assert isinstance(await fetch(p, target=b"/other"), Answer)
        await p.cache.purge_tags("site2")
        assert isinstance(await fetch(p, target=b"/other"), Plan)

    run(main)


def test_bodies_larger_than_the_route_allows_are_relayed_not_stored() -> None:
    async def main() -> None:
        p = phase(Clock(), max_object_size=4)
        plan = await fetch(p)
        assert isinstance(plan, Plan)
        outcome = p.response(plan, 200, [(b"Cache-Control", b"max-age=60"), (b"Content-Length", b"10")])
        assert isinstance(outcome, Relay) and not outcome.capture
        await p.finish(plan, None, True)
        assert isinstance(await fetch(p), Plan)

    run(main)


def _warming_phase(clock: Clock, warming: Any, tiers: list[Any] | None = None) -> tuple[HttpCachePhase, list[Plan]]:
    fetched: list[Plan] = []

    async def refresh(plan: Plan) -> None:
        fetched.append(plan)

    p = HttpCachePhase(TieredCache(tiers or [MemoryTier()], clock=clock), {"r": CachePolicy()}, clock=clock, refresh=refresh, warming=warming)
    return p, fetched


def test_refresh_ahead_keeps_hot_entries_fresh_and_leaves_cold_ones() -> None:
    from pyproxy.config import WarmingConfig

    async def main() -> None:
        clock = Clock()
        p, fetched = _warming_phase(clock, WarmingConfig(hot_hits=3, refresh_before=0.2))
        for target in (b"/hot", b"/cold"):
            plan = await fetch(p, target)
            assert isinstance(plan, Plan)
            await origin(p, plan, 200, [(b"Cache-Control", b"max-age=10"), (b"ETag", b'"e"')], b"x")
        for _ in range(4):
            assert isinstance(await fetch(p, b"/hot"), Answer)
        assert fetched == [], "not yet near its expiry"
        clock.now += 9  # 1 s of 10 left: inside the last 20%
        assert isinstance(await fetch(p, b"/hot"), Answer)
        assert isinstance(await fetch(p, b"/cold"), Answer)
        await asyncio.sleep(0.01)
        assert [plan.key for plan in fetched] == ["http://h/hot"], "the hot entry only"
        assert fetched[0].extra_headers == [(b"If-None-Match", b'"e"')]
        assert p.counters["refresh_ahead"] == 1

    run(main)


def test_prediction_prefetches_the_usual_next_request_and_counts_its_use() -> None:
    from pyproxy.config import WarmingConfig

    async def main() -> None:
        clock = Clock()
        p, fetched = _warming_phase(clock, WarmingConfig(predict=True, predict_threshold=0.6, predict_min_samples=5, refresh_ahead=False))
        # A client's pattern: /list then /detail, six times (both cached after the first round).
        for i in range(6):
            for target in (b"/list", b"/detail"):
                got = await p.lookup("r", b"GET", "http", b"h", target, [], None, "client-1")
                if isinstance(got, Plan):
                    await origin(p, got, 200, [(b"Cache-Control", b"max-age=60")], target)
            clock.now += 1
        assert fetched == [], "nothing to prefetch while /detail is cached"
        await p.cache.delete("http://h/detail")
        await p.lookup("r", b"GET", "http", b"h", b"/list", [], None, "client-2")
        await asyncio.sleep(0.01)
        assert [plan.key for plan in fetched] == ["http://h/detail"]
        # The prefetch stored it (as the refresher would): the next request for it is a hit.
        await origin(p, fetched[0], 200, [(b"Cache-Control", b"max-age=60")], b"detail")
        hit = await p.lookup("r", b"GET", "http", b"h", b"/detail", [], None, "client-2")
        assert isinstance(hit, Answer) and bytes(hit.body) == b"detail"
        assert p.counters["prefetch"] == 1 and p.counters["prefetch_used"] == 1

    run(main)


def test_warm_start_loads_the_hottest_keys_from_l3_into_memory(tmp_path: Any) -> None:
    from pyproxy.cache import SqlTier
    from pyproxy.config import WarmingConfig

    warm = WarmingConfig(warm_file=str(tmp_path / "warm.json"), warm_keys=1)
    db = tmp_path / "l3.sqlite3"

    async def first() -> None:
        clock = Clock()
        p, _ = _warming_phase(clock, warm, [MemoryTier(), SqlTier.sqlite(db)])
        await p.start()
        for target, hits in ((b"/hot", 5), (b"/warm", 2)):
            plan = await fetch(p, target)
            assert isinstance(plan, Plan)
            await origin(p, plan, 200, [(b"Cache-Control", b"max-age=600")], target)
            for _ in range(hits):
                assert isinstance(await fetch(p, target), Answer)
        await p.aclose()

    async def second() -> None:
        clock = Clock()
        p, _ = _warming_phase(clock, warm, [MemoryTier(), SqlTier.sqlite(db)])
        await p.start()
        memory = p.cache.tiers[0]
        assert isinstance(memory, MemoryTier)
        for _ in range(100):
            if memory.get_now("http://h/hot") is not None:
                break
            await asyncio.sleep(0.01)
        assert memory.get_now("http://h/hot") is not None, "the hottest key is in memory at start"
        assert memory.get_now("http://h/warm") is None, "only warm_keys of them"
        assert p.counters["warm_loaded"] == 1
        await p.aclose()

    run(first)
    run(second)


def test_fast_path_serves_vary_variants() -> None:
    async def main() -> None:
        p = phase(Clock())
        await store_two_variants(p)
        for enc, body in ((b"gzip", b"zipped"), (b"br", b"brotli"), (b"gzip", b"zipped")):
            hit = p.lookup_now("r", b"GET", "http", b"h", b"/a", [(b"Accept-Encoding", enc)])
            assert hit is not None and bytes(hit.body) == body
        assert p.lookup_now("r", b"GET", "http", b"h", b"/a", [(b"Accept-Encoding", b"identity")]) is None

    run(main)


def test_fast_path_ages_answers_by_the_second_and_leaves_the_rest_to_the_full_rules() -> None:
    """lookup_now (compiled): Age and Cache-Status follow the clock, one answer is handed out for
    a whole second of age, HEAD gets the stored GET without a body, stale entries and requests
    with directives, conditionals or credentials (any case) go the full way."""

    async def main() -> None:
        clock = Clock()
        p = phase(clock)
        plan = await fetch(p)
        assert isinstance(plan, Plan)
        await origin(p, plan, 200, [(b"Cache-Control", b"max-age=60"), (b"Date", date(T0)), (b"ETag", b'"v1"')], b"hello")

        def now_hit(method: bytes = b"GET", headers: list[tuple[bytes, bytes]] | None = None) -> Answer | None:
            return p.lookup_now("r", method, "http", b"h", b"/a", headers or [(b"Host", b"h")], "192.0.2.1")

        clock.now += 10.2
        first = now_hit()
        assert first is not None and bytes(first.body) == b"hello" and first.tier == "memory"
        assert field(first, b"age") == b"10" and field(first, b"cache-status") == b"pyproxy; hit; ttl=49; detail=memory"
        assert first.head is not None and first.head.endswith(b"Age: 10\r\nCache-Status: pyproxy; hit; ttl=49; detail=memory\r\n")
        assert first.head.startswith(b"HTTP/1.1 200 OK\r\n") and b'ETag: "v1"\r\n' in first.head
        clock.now += 0.3
        assert now_hit() is first, "the same second of age: the same answer"
        head = now_hit(b"HEAD")
        assert head is not None and head is not first and head.body == b"" and head.length == 5 and head.head == first.head
        clock.now += 1.0
        later = now_hit()
        assert later is not None and later is not first and field(later, b"age") == b"11"
        for name in (b"cache-control", b"PRAGMA", b"Authorization", b"If-None-Match", b"if-modified-since"):
            assert now_hit(headers=[(name, b"x")]) is None, name
        assert now_hit(b"POST") is None and p.lookup_now("other", b"GET", "http", b"h", b"/a", []) is None
        assert p.counters["hit"] == 4
        clock.now += 60
        assert now_hit() is None, "stale: revalidation is the full path's"

    run(main)


def test_hit_counts_decay_by_half_life_and_keep_the_hottest() -> None:
    from pyproxy.cache.warming import HitCounts

    hits = HitCounts(10.0, max_keys=4)
    assert hits.hit("a", 0.0) == 1.0 and hits.hit("a", 0.0) == 2.0
    assert abs(hits.count("a", 10.0) - 1.0) < 1e-9, "one half-life halves the count"
    assert abs(hits.hit("a", 20.0) - 1.5) < 1e-9 and hits.count("never", 5.0) == 0.0
    for key, n in (("b", 3), ("c", 1), ("d", 2)):
        for _ in range(n):
            hits.hit(key, 20.0)
    assert [k for k, _ in hits.hottest(2, 20.0)] == ["b", "d"]
    hits.hit("e", 20.0)  # a fifth key: the coldest half goes
    assert len(hits) == 2 and [k for k, _ in hits.hottest(4, 20.0)] == ["b", "d"]
    hits.set("w", 7.0, 20.0)
    assert hits.count("w", 20.0) == 7.0
    with pytest.raises(ValueError, match="half_life"):
        HitCounts(0.0)

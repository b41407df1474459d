"""Phase 4 of the request lifecycle: answer from the HTTP cache, or say how to forward and store.

The data plane calls three methods per cacheable request and knows nothing of RFC 9111:

1. :meth:`HttpCachePhase.lookup` before choosing a server. It returns an :class:`Answer` (a
   response to send as it is: a hit, a 304 for the client's own conditional request, a 504 for
   ``only-if-cached``), or a :class:`Plan` for forwarding (extra request fields — the stored
   validators when revalidating — and what the phase needs to see the response), or ``None`` when
   the request is not the cache's business (route without caching, a method it does not cache).
   Concurrent misses of one key are coalesced here: the first forwards, the others wait for it
   (bounded) and are then answered from what it stored.
2. :meth:`HttpCachePhase.response` with the upstream's status and fields. It returns an
   :class:`Answer` to send *instead* of the upstream's response (the stored response refreshed by a
   304, or a stale one allowed by ``stale-if-error`` instead of a 5xx), or the fields to add to the
   relayed response (``Cache-Status``), and whether to keep a copy of the body for storing.
3. :meth:`HttpCachePhase.finish` once the exchange is over, with the body copy when one was kept
   (and not cut short): stores it, releases waiting followers, and applies invalidation by unsafe
   methods.

A stale-while-revalidate hit is answered at once and refreshed in the background through
``refresh``, a coroutine the data plane provides (it forwards a request outside any client
exchange); without one, such hits revalidate in the foreground instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyproxy._cachehit import READY_MAX, HitCounts, HitPath, Ready
from pyproxy._protocol import Answer  # what the data plane sends as it is (compiled with it)
from pyproxy._cachehit import lookup_now as _lookup_now
from pyproxy._cachehit import warm as _warm_on_hit
from pyproxy.cache.coalesce import Coalescer
from pyproxy.cache.compression import Compressor
from pyproxy.cache.entry import decode
from pyproxy.cache.http import (
    UNSAFE_METHODS,
    CachePolicy,
    StoredResponse,
    Use,
    body_digest,
    cache_status,
    client_condition_met,
    conditional_headers,
    current_age,
    freshness_lifetime,
    invalidated_targets,
    merge_304,
    not_modified_headers,
    parse_cache_control,
    primary_key,
    select,
    stale_if_error_allows,
    storable,
    store_ttl,
    vary_key,
    vary_names,
)
from pyproxy.cache.memory import MemoryTier
from pyproxy.cache.redis_tier import RedisTier
from pyproxy.cache.sql import SqlTier
from pyproxy.cache.tier import Tier
from pyproxy.cache.tiered import TieredCache
from pyproxy.cache.warming import FetchBudget, Successors, read_warm_keys, write_warm_keys
from pyproxy.config import CacheConfig, Route, RouteCache, WarmingConfig
from pyproxy.errors import CorruptEntry
from pyproxy.headers import connection_tokens, get_all, get_first, get_list, serialize_response_head

__all__ = ["Answer", "HttpCachePhase", "Plan", "Relay"]

log = logging.getLogger("pyproxy.cache.http")

Headers = Sequence[tuple[bytes, bytes]]

# Fields never stored (hop-by-hop, or about this hop's delivery); Age is recomputed on use.
_NOT_STORED = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade",
        b"proxy-authenticate", b"proxy-authorization", b"trailer", b"age", b"x-request-id",
        b"cache-status", b"content-length",
    }
)
_VARY_MARKER = b"pyproxy-vary:"  # the value of an entry that only says which fields a key varies on
@dataclass(frozen=True, slots=True)
class _Variants:
    """A key whose responses vary: the request fields that pick the variant (its ``Vary``)."""

    record: bytes
    names: tuple[str, ...]


@dataclass
class Plan:
    """How a request goes upstream, and what the phase must remember until its response."""

    route: str
    policy: CachePolicy
    method: bytes
    key: str  # primary key
    request_headers: Headers
    host: bytes
    scheme: str
    target: bytes = b"/"
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # validators to send
    stored: StoredResponse | None = None  # the stored response being revalidated / kept for errors
    stored_body: bytes | memoryview = b""
    stored_tier: str | None = None
    fwd: str = "uri-miss"  # Cache-Status fwd= reason
    request_time: float = 0.0
    release: Callable[[bool], None] | None = None  # this request leads a coalesced miss: call when done
    client: str = ""  # who asked (the next-request model is per client)
    store: bool = False  # a copy of the body is being kept for storing
    status: int = 0
    response_headers: Headers = ()
    response_time: float = 0.0


@dataclass
class Relay:
    """Relay the upstream's response, adding ``headers``; keep a body copy when ``capture`` (at
    most ``max_size`` bytes: a longer body is relayed but not stored)."""

    headers: list[tuple[bytes, bytes]]
    capture: bool
    max_size: int


def policy_of(route: RouteCache) -> CachePolicy:
    return CachePolicy(
        enabled=route.enabled,
        forced_ttl=route.ttl,
        heuristic=route.heuristic,
        max_object_size=route.max_object_size,
        cache_post=route.cache_post,
        share_set_cookie=route.share_set_cookie,
        query=route.query,  # type: ignore[arg-type]
        ignore_params=frozenset(route.ignore_params),
        tiers=route.tiers or None,
    )


def tiers_for(config: CacheConfig) -> list[Tier]:
    """The configured tiers, fastest first."""
    tiers: list[Tier] = [MemoryTier(config.memory_size)]
    if config.redis_url is not None:
        tiers.append(RedisTier.from_url(config.redis_url, cluster=config.cluster))
    if config.sqlite_path is not None:
        tiers.append(SqlTier.sqlite(config.sqlite_path))
    elif config.postgres_dsn is not None:
        tiers.append(SqlTier.postgres(config.postgres_dsn))
    return tiers


class HttpCachePhase:
    """The HTTP cache of one worker: policies per route over one :class:`TieredCache`."""

    def __init__(
        self,
        cache: TieredCache,
        policies: dict[str, CachePolicy],
        *,
        coalesce_timeout: float = 10.0,
        coalesce_max_waiters: int = 10_000,
        clock: Callable[[], float] = time.time,
        refresh: Callable[[Plan], Awaitable[None]] | None = None,
        warming: WarmingConfig | None = None,
    ) -> None:
        self.cache = cache
        self.policies = policies
        self.routes = frozenset(name for name, p in policies.items() if p.enabled)
        self.coalescer: Coalescer[bool] = Coalescer(wait_timeout=coalesce_timeout, max_waiters=coalesce_max_waiters)
        self.clock = clock
        self.refresh = refresh
        self._refreshing: set[str] = set()
        self.counters: dict[str, int] = {}
        self._memory = next((t for t in cache.tiers if isinstance(t, MemoryTier)), None)
        self._ready: dict[str, Ready | _Variants] = {}
        # The fast path's primary keys by (route, scheme, host, target): primary_key() decodes,
        # splits and formats (~0.2 us a hit); cleared when full and when the policies change.
        self._keys: dict[tuple[str, str, bytes, bytes], str] = {}
        # Warming (warming.py): hit counts, the next-request model, the background-fetch budget,
        # how to ask for a key again, and the keys fetched ahead and not used yet.
        self.warming = warming or WarmingConfig()
        self.hits = HitCounts(self.warming.half_life)
        self.successors = Successors()
        self.budget = FetchBudget(self.warming.max_fetches, self.warming.max_fetch_rate)
        self._requests: dict[str, tuple[str, str, bytes, bytes, tuple[tuple[bytes, bytes], ...]]] = {}
        self._prefetched: dict[str, None] = {}
        self._hit_path = self._make_hit_path()

    def _make_hit_path(self) -> HitPath:
        """What the compiled hit path reads of this phase (made again when any of it changes)."""
        memory = self._memory
        return HitPath(self, memory, self.cache.tier_stats(memory) if memory is not None else None)

    def reconfigure(self, routes: Sequence[Route]) -> None:
        """New route policies (a reload that kept the tiers)."""
        self.policies = {r.name: policy_of(r.cache) for r in routes}
        self.routes = frozenset(name for name, p in self.policies.items() if p.enabled)
        self._keys.clear()  # primary keys follow the route's policy (query normalisation)
        self._ready.clear()  # and a parsed copy's lifetime its forced TTL
        self._hit_path = self._make_hit_path()

    @classmethod
    def from_config(cls, config: CacheConfig, routes: Sequence[Route], **options: Any) -> HttpCachePhase:
        compressor = Compressor(config.compression, level=config.compression_level, min_size=config.compression_min_size)  # type: ignore[arg-type]
        cache = TieredCache(tiers_for(config), compressor=compressor, timeout=config.timeout, dependencies=config.depends)
        policies = {r.name: policy_of(r.cache) for r in routes}
        return cls(
            cache,
            policies,
            coalesce_timeout=config.coalesce_timeout,
            coalesce_max_waiters=config.coalesce_max_waiters,
            warming=config.warming,
            **options,
        )

    def snapshot(self) -> dict[str, Any]:
        """Counters for metrics (summed over workers by ``observe.metrics.merge_cache``)."""
        stats = self.cache.stats()
        tiers = {name: {k: v for k, v in t.items() if k != "purged"} for name, t in stats["tiers"].items()}
        return {
            "events": {**self.counters, "collapsed": self.coalescer.stats.collapsed},
            "tiers": tiers,
            "compression": {k: stats["compression"][k] for k in ("raw_bytes", "stored_bytes")},
        }

    async def start(self) -> None:
        """Open the tiers; then (warm start) load the keys the warm file names into memory."""
        await self.cache.start()
        if self.warming.warm_file is not None:
            task = asyncio.get_running_loop().create_task(self._warm_start(self.warming.warm_file))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _warm_start(self, path: str) -> None:
        for key, count in read_warm_keys(path)[: self.warming.warm_keys]:
            hit = await self.cache.lookup(key)  # a hit below memory is copied into it
            if hit is not None:
                self._count("warm_loaded")
                self.hits.set(key, count, self.clock())

    async def aclose(self) -> None:
        """Record the hottest keys for the next start (warm file), then close the tiers."""
        if self.warming.warm_file is not None:
            try:
                write_warm_keys(self.warming.warm_file, self.hits.hottest(self.warming.warm_keys, self.clock()), self.warming.warm_keys)
            except OSError as e:
                log.warning("could not write the cache warm file %s: %s", self.warming.warm_file, e)
        await self.cache.aclose()

    @property
    def memory(self) -> MemoryTier | None:
        """This worker's memory tier (``None`` when the cache has none)."""
        return self._memory

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _tier_names(self, policy: CachePolicy) -> list[str] | None:
        if policy.tiers is None:
            return None
        names = []
        for tier in self.cache.tiers:
            kind = "sql" if isinstance(tier, SqlTier) else tier.name
            if kind in policy.tiers:
                names.append(tier.name)
        return names

    # -- 1. lookup -------------------------------------------------------------------------------

    # The fast path, without awaiting: a fresh response in this worker's memory for a plain
    # GET/HEAD, or None (then lookup() applies the same rules). Compiled: cython_ext/_cachehit.pyx.
    lookup_now = _lookup_now

    def _prepare(self, key: str, record: bytes, policy: CachePolicy) -> Ready | _Variants | None:
        try:
            entry = decode(record, verify=False)
            if bytes(entry.value[: len(_VARY_MARKER)]) == _VARY_MARKER:
                names = tuple(n for n in bytes(entry.value[len(_VARY_MARKER) :]).decode("latin-1").split(",") if n)
                variants = _Variants(record, names)
                self._keep_ready(key, variants)
                return variants
            stored = StoredResponse.from_meta(entry.meta)
        except (CorruptEntry, ValueError, IndexError, struct.error):
            return None
        cc = parse_cache_control(stored.headers)
        if "no-cache" in cc:
            return None
        ready = Ready(
            record, stored.status, stored.headers, entry.value,
            freshness_lifetime(stored, policy, cc), current_age(stored, stored.response_time), stored.response_time,
            stored, serialize_response_head(stored.status, None, list(stored.headers))[:-2],
        )
        self._keep_ready(key, ready)
        return ready

    def _keep_ready(self, key: str, ready: Ready | _Variants) -> None:
        if len(self._ready) >= READY_MAX:
            self._ready.clear()
        self._ready[key] = ready

    async def lookup(
        self,
        route: str,
        method: bytes,
        scheme: str,
        host: bytes,
        target: bytes,
        headers: Headers,
        body: bytes | None = None,
        client: str = "",
    ) -> Answer | Plan | None:
        """Answer from the cache, or plan the forward (see the module doc). ``body`` is the whole
        request body of a POST on a route that caches POST (the key includes its digest);
        ``client`` names who asks (the next-request model is per client)."""
        policy = self.policies.get(route)
        if policy is None or not policy.enabled:
            return None
        if method not in (b"GET", b"HEAD") and not (method == b"POST" and policy.cache_post and body is not None):
            return None
        digest = body_digest(body) if method == b"POST" and body is not None else None
        key = primary_key(scheme, host, target, policy, digest)
        plan = Plan(route, policy, method, key, headers, host, scheme, target=target, request_time=self.clock())
        plan.client = client
        request_cc = parse_cache_control(headers)
        found = await self._find(key, headers)
        if found is not None:
            stored, body_bytes, tier = found
            answer = await self._use(plan, stored, body_bytes, tier)
            if answer is not None:
                return answer
        elif "only-if-cached" in request_cc:
            self._count("only_if_cached_miss")
            return Answer(504, [(b"Cache-Status", cache_status(hit=False, fwd="miss"))], b"")
        if plan.stored is None and plan.fwd == "uri-miss" and "no-cache" not in request_cc:
            return await self._coalesce(plan, headers)
        return plan

    async def _find(self, key: str, headers: Headers) -> tuple[StoredResponse, bytes | memoryview, str] | None:
        hit = await self.cache.lookup(key)
        if hit is None:
            return None
        if bytes(hit.entry.value[: len(_VARY_MARKER)]) == _VARY_MARKER:
            names = tuple(n for n in bytes(hit.entry.value[len(_VARY_MARKER) :]).decode("latin-1").split(",") if n)
            hit = await self.cache.lookup(vary_key(key, names, headers))
            if hit is None:
                return None
        try:
            stored = StoredResponse.from_meta(hit.entry.meta)
        except (ValueError, IndexError):
            self._count("bad_meta")
            return None
        return stored, hit.entry.value, hit.tier

    async def _use(self, plan: Plan, stored: StoredResponse, body: bytes | memoryview, tier: str) -> Answer | None:
        now = self.clock()
        if get_first(plan.request_headers, b"authorization") is not None:
            cc = parse_cache_control(stored.headers)
            if not ("public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
                self._count("authorization_bypass")
                plan.fwd = "bypass"
                return None  # not shared with an authorized request (RFC 9111 §3.5)
        use = select(stored, plan.request_headers, plan.policy, now)[0]
        if use is Use.STALE_REVALIDATE and self.refresh is not None:
            self._refresh_in_background(plan, stored)
            use = Use.STALE
        if use in (Use.FRESH, Use.STALE):
            self._count("hit" if use is Use.FRESH else "stale_hit")
            if use is Use.FRESH and plan.method != b"POST":
                lifetime = freshness_lifetime(stored, plan.policy)
                ttl = lifetime - current_age(stored, now)
                self._warm(plan.route, plan.scheme, plan.host, plan.target, plan.request_headers, plan.client, plan.key, stored, ttl, lifetime)
            return self._answer(plan, stored, body, tier, now)
        # Revalidate: conditional request with the stored validators; the stored response is kept
        # for a 304 and for stale-if-error.
        plan.stored, plan.stored_body, plan.stored_tier = stored, body, tier
        plan.extra_headers = conditional_headers(stored)
        request_cc = parse_cache_control(plan.request_headers)
        plan.fwd = "request" if "no-cache" in request_cc or "max-age" in request_cc else "stale"
        self._count("revalidate")
        return None

    def _answer(
        self, plan: Plan, stored: StoredResponse, body: bytes | memoryview, tier: str | None, now: float, *,
        fwd_status: int | None = None, collapsed: bool = False,
    ) -> Answer:
        """The stored response (or a 304, when the client's own condition holds) with ``Age`` and
        ``Cache-Status``: a hit (with its ttl; negative when served stale), or — after forwarding
        (``fwd_status``: a 304 that refreshed it, an error it stands in for) — ``fwd=...``."""
        age = current_age(stored, now)
        ttl = select(stored, (), plan.policy, now)[1].ttl
        if fwd_status is None:
            status_field = cache_status(hit=True, tier=tier, ttl=ttl, collapsed=collapsed)
        else:
            status_field = cache_status(hit=False, fwd=plan.fwd, fwd_status=fwd_status, ttl=ttl, stored=fwd_status == 304, tier=tier)
        if client_condition_met(plan.method, plan.request_headers, stored):
            self._count("not_modified")
            fields = not_modified_headers(stored)
            return Answer(304, [*fields, (b"Age", str(int(age)).encode()), (b"Cache-Status", status_field)], b"", tier)
        fields = [*stored.headers, (b"Age", str(int(age)).encode()), (b"Cache-Status", status_field)]
        if plan.method == b"HEAD":
            return Answer(stored.status, fields, b"", tier, length=len(body))
        return Answer(stored.status, fields, body, tier)

    async def _coalesce(self, plan: Plan, headers: Headers) -> Answer | Plan:
        """A plain miss: lead the fetch for this key, or wait for the request already leading it and
        answer from what it stored (if it stored nothing, forward after all)."""
        finish = self.coalescer.lead(plan.key)
        if finish is not None:
            plan.release = finish
            self._count("miss")
            if plan.method == b"GET":
                self._predict(plan.route, plan.scheme, plan.host, plan.target, plan.request_headers, plan.client, plan.key)
            return plan
        try:
            stored_something, collapsed = await self.coalescer.follow(plan.key, _nothing)
        except Exception:  # noqa: BLE001 - the leader's failure is its own; this request forwards
            stored_something, collapsed = False, False
        if collapsed and stored_something:
            found = await self._find(plan.key, headers)
            if found is not None:
                stored, body, tier = found
                now = self.clock()
                use, _ = select(stored, headers, plan.policy, now)
                if use is Use.FRESH:
                    self._count("collapsed_hit")
                    return self._answer(plan, stored, body, tier, now, collapsed=True)
        self._count("miss")
        return plan

    def _refresh_in_background(self, plan: Plan, stored: StoredResponse) -> None:
        """stale-while-revalidate: always refreshed (the entry is stale already)."""
        self._fetch(plan.route, plan.scheme, plan.host, plan.target, plan.request_headers, plan.key, stored, "background_refresh", budgeted=False)

    def _fetch(
        self, route: str, scheme: str, host: bytes, target: bytes, headers: Headers, key: str,
        stored: StoredResponse | None, what: str, *, budgeted: bool = True,
    ) -> bool:
        """Fetch ``key`` in the background through the refresh hook (with ``stored``'s validators
        when given); warming fetches take a place in the budget. Whether one was started."""
        policy = self.policies.get(route)
        if key in self._refreshing or self.refresh is None or policy is None:
            return False
        if budgeted and not self.budget.take():
            return False
        self._refreshing.add(key)
        plan = Plan(
            route, policy, b"GET", key, tuple(headers), host, scheme, target=target,
            extra_headers=conditional_headers(stored) if stored is not None else [], stored=stored,
            fwd="stale" if stored is not None else "uri-miss", request_time=self.clock(),
        )
        refresh = self.refresh

        async def run() -> None:
            try:
                await refresh(plan)
                self._count(what)
            except Exception as e:  # noqa: BLE001 - a failed background fetch leaves the cache as it was
                log.warning("%s of %s failed: %s", what.replace("_", " "), key, e)
            finally:
                self._refreshing.discard(key)
                if budgeted:
                    self.budget.give_back()

        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return True

    # -- warming (warming.py) ----------------------------------------------------------------------

    # A fresh hit feeds warming: its key's decayed hit count, a prefetch that paid off, a
    # refresh-ahead of a hot entry, the next request predicted. Compiled beside lookup_now.
    _warm = _warm_on_hit

    def _predict(self, route: str, scheme: str, host: bytes, target: bytes, headers: Headers, client: str, key: str) -> None:
        warming = self.warming
        if not warming.predict or not client:
            return
        self.successors.observe(client, key)
        if key not in self._requests:
            if len(self._requests) >= READY_MAX * 4:
                self._requests.clear()
            self._requests[key] = (route, scheme, host, target, tuple(headers))
        for following, _ in self.successors.likely_next(key, warming.predict_threshold, warming.predict_min_samples):
            request = self._requests.get(following)
            if request is None or (self._memory is not None and self._memory.get_now(following) is not None):
                continue
            nroute, nscheme, nhost, ntarget, nheaders = request
            if self._fetch(nroute, nscheme, nhost, ntarget, nheaders, following, None, "prefetch"):
                if len(self._prefetched) >= READY_MAX:
                    self._prefetched.clear()
                self._prefetched[following] = None

    # -- 2. the upstream's response head ---------------------------------------------------------

    def response(self, plan: Plan, status: int, headers: Headers) -> Answer | Relay:
        """What to do with the upstream's response to a planned request."""
        now = self.clock()
        plan.status, plan.response_headers, plan.response_time = status, headers, now
        if plan.stored is not None:
            if status == 304:
                merged = merge_304(plan.stored, _storable_fields(headers), plan.request_time, now)
                plan.stored = merged
                plan.store = True  # the refreshed head goes back with the stored body
                self._count("revalidated")
                return self._answer(plan, merged, plan.stored_body, plan.stored_tier, now, fwd_status=304)
            if status >= 500 and stale_if_error_allows(plan.stored, plan.request_headers, plan.policy, now):
                self._count("stale_if_error")
                return self._answer(plan, plan.stored, plan.stored_body, plan.stored_tier, now, fwd_status=status)
        why = storable(plan.method, plan.request_headers, status, headers, plan.policy)
        length = get_first(headers, b"content-length")
        too_big = length is not None and length.strip().isdigit() and int(length) > plan.policy.max_object_size
        plan.store = why is None and not too_big and plan.method != b"HEAD"
        if why is not None:
            self._count("not_storable")
        field = cache_status(hit=False, fwd=plan.fwd, fwd_status=status, stored=plan.store)
        return Relay([(b"Cache-Status", field)], plan.store, plan.policy.max_object_size)

    # -- 3. the end of the exchange ----------------------------------------------------------------

    async def finish(self, plan: Plan, body: bytes | None, complete: bool) -> None:
        """Store what should be stored (``body``: the copy kept, ``None`` if none; ``complete``:
        the response arrived whole), then release coalesced followers."""
        stored_something = False
        try:
            if plan.store and complete:
                if plan.status == 304 and plan.stored is not None:
                    stored_something = await self._store(plan, plan.stored, plan.stored_body)
                elif body is not None and len(body) <= plan.policy.max_object_size:
                    response = StoredResponse(plan.status, tuple(_storable_fields(plan.response_headers)), plan.request_time, plan.response_time)
                    stored_something = await self._store(plan, response, body)
        finally:
            if plan.release is not None:
                plan.release(stored_something)
                plan.release = None

    async def _store(self, plan: Plan, response: StoredResponse, body: bytes | memoryview) -> bool:
        names = vary_names(response.headers)
        if names is None:
            return False
        now = self.clock()
        ttl = store_ttl(response, plan.policy, now)
        if ttl <= 0:
            return False
        tags = _tags(response.headers)
        tiers = self._tier_names(plan.policy)
        key = plan.key
        if names:
            await self.cache.set(key, _VARY_MARKER + ",".join(names).encode(), ttl=max(ttl, 3600.0), tiers=tiers)
            key = vary_key(key, names, plan.request_headers)
        await self.cache.set(key, bytes(body), ttl=ttl, tags=tags, meta=response.to_meta(), tiers=tiers)
        for dependency in get_list(response.headers, b"x-cache-depends"):
            for tag in tags or (key,):
                if dependency.decode("latin-1") != tag:
                    await self.cache.add_dependency(tag, dependency.decode("latin-1"))
        self._count("stored")
        return True

    async def invalidate(self, method: bytes, status: int, scheme: str, host: bytes, target: bytes, response_headers: Headers, route: str) -> int:
        """An unsafe method that succeeded: drop the target and its Location / Content-Location
        (RFC 9111 §4.4), in every tier and instance; how many keys were removed here."""
        keys = self.invalidate_now(method, status, scheme, host, target, response_headers, route)
        return await self.cache.delete(*keys) if keys else 0

    def invalidate_now(self, method: bytes, status: int, scheme: str, host: bytes, target: bytes, response_headers: Headers, route: str) -> list[str]:
        """The keys an unsafe method invalidates, already dropped from this worker's memory (at
        once: the client's next request may be read before any task runs); the caller drops them
        from the other tiers (:meth:`TieredCache.delete`)."""
        policy = self.policies.get(route)
        if policy is None or method not in UNSAFE_METHODS or not (200 <= status < 400):
            return []
        targets = [target, *invalidated_targets(method, status, host, response_headers)]
        keys = [primary_key(scheme, host, t, policy) for t in targets]
        if self._memory is not None:
            self._memory.delete_now(keys)
        self._count("invalidated")
        return keys


def _storable_fields(headers: Headers) -> list[tuple[bytes, bytes]]:
    connection = connection_tokens(headers)
    return [(n, v) for n, v in headers if (lower := n.lower()) not in _NOT_STORED and lower not in connection]


def _tags(headers: Headers) -> list[str]:
    """Tags from ``Cache-Tag`` (comma-separated) and ``Surrogate-Key`` (space-separated)."""
    tags = [t.strip().decode("latin-1") for t in get_list(headers, b"cache-tag")]
    for line in get_all(headers, b"surrogate-key"):
        tags += [t.decode("latin-1") for t in line.split()]
    return list(dict.fromkeys(t for t in tags if t))


async def _nothing() -> bool:
    return False

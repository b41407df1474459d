"""RFC 9111 rules of the shared HTTP cache (pyproxy/cache/http.py): one case per behaviour."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from pyproxy.cache.http import (
    CachePolicy,
    StoredResponse,
    Use,
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

NOW = 1_800_000_000.0
POLICY = CachePolicy()


def date(t: float) -> bytes:
    return formatdate(t, usegmt=True).encode()


def stored(*headers: tuple[bytes, bytes], status: int = 200, at: float = NOW, delay: float = 0.0) -> StoredResponse:
    base = ((b"Date", date(at)),)
    return StoredResponse(status, base + headers, at - delay, at)


def cc(value: str) -> tuple[bytes, bytes]:
    return (b"Cache-Control", value.encode())


# -- directives ----------------------------------------------------------------------------------------


def test_cache_control_parsing() -> None:
    d = parse_cache_control([cc('max-age=60, no-cache="Set-Cookie"'), cc("PUBLIC"), (b"X", b"y")])
    assert d.values == {"max-age": "60", "no-cache": "Set-Cookie", "public": None}
    assert d.seconds("max-age") == 60 and d.seconds("s-maxage") is None
    # Repeated or malformed delta-seconds: the response counts as stale (lifetime 0).
    assert parse_cache_control([cc("max-age=60, max-age=120")]).seconds("max-age") == 0
    assert parse_cache_control([cc("max-age=abc")]).seconds("max-age") == 0
    assert parse_cache_control([cc('max-age="30"')]).seconds("max-age") == 30
    # Pragma: no-cache counts only without Cache-Control.
    assert "no-cache" in parse_cache_control([(b"Pragma", b"no-cache")])
    assert "no-cache" not in parse_cache_control([(b"Pragma", b"no-cache"), cc("max-age=5")])


# -- keys ---------------------------------------------------------------------------------------------------


def test_keys_include_scheme_host_and_target_with_query_normalisation() -> None:
    assert primary_key("http", b"Example.COM:80", b"/a?b=1&a=2", POLICY) == "http://example.com/a?b=1&a=2"
    assert primary_key("https", b"example.com:443", b"/a", POLICY) == "https://example.com/a"
    assert primary_key("http", b"example.com:8080", b"/a", POLICY) == "http://example.com:8080/a"
    assert primary_key("http", b"a.example", b"/x", POLICY) != primary_key("http", b"b.example", b"/x", POLICY)
    assert primary_key("http", b"h", b"/x", POLICY) != primary_key("https", b"h", b"/x", POLICY)
    sort = CachePolicy(query="sort", ignore_params=frozenset({"utm_source"}))
    assert primary_key("http", b"h", b"/a?b=1&utm_source=x&a=2", sort) == "http://h/a?a=2&b=1"
    assert primary_key("http", b"h", b"/a?b=1", CachePolicy(query="drop")) == "http://h/a"
    assert primary_key("http", b"h", b"/s", POLICY, body_digest="ab") == "http://h/s#body=ab"


def test_vary() -> None:
    response = [(b"Vary", b"Accept-Encoding, accept-language"), (b"Vary", b"X-Tenant")]
    names = vary_names(response)
    assert names == ("accept-encoding", "accept-language", "x-tenant")
    a = vary_key("k", names, [(b"Accept-Encoding", b"gzip"), (b"X-Tenant", b"1")])
    b = vary_key("k", names, [(b"accept-encoding", b" gzip "), (b"X-TENANT", b"1")])
    c = vary_key("k", names, [(b"Accept-Encoding", b"br"), (b"X-Tenant", b"1")])
    assert a == b != c
    assert vary_names([(b"Vary", b"*")]) is None
    assert vary_key("k", (), []) == "k"


# -- storing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "request_headers", "status", "response_headers", "policy", "why"),
    [
        (b"GET", [], 200, [cc("max-age=60")], POLICY, None),
        (b"HEAD", [], 200, [cc("s-maxage=60")], POLICY, None),
        (b"GET", [], 200, [(b"Expires", date(NOW + 60))], POLICY, None),
        (b"GET", [], 200, [(b"ETag", b'"v1"')], POLICY, None),  # stored stale, revalidated on use
        (b"GET", [], 404, [cc("max-age=60")], POLICY, None),
        (b"GET", [], 200, [], POLICY, "no freshness lifetime and no validator"),
        (b"GET", [], 200, [(b"Last-Modified", date(NOW - 1000))], CachePolicy(heuristic=True), None),
        (b"GET", [], 200, [], CachePolicy(forced_ttl=30), None),
        (b"POST", [], 200, [cc("max-age=60")], POLICY, "POST responses are not cached"),
        (b"POST", [], 200, [cc("max-age=60")], CachePolicy(cache_post=True), None),
        (b"GET", [], 206, [cc("max-age=60")], POLICY, "status 206 is not stored"),
        (b"GET", [cc("no-store")], 200, [cc("max-age=60")], POLICY, "no-store"),
        (b"GET", [], 200, [cc("max-age=60, no-store")], POLICY, "no-store"),
        (b"GET", [], 200, [cc("private, max-age=60")], POLICY, "private"),
        (b"GET", [], 200, [cc("max-age=60"), (b"Vary", b"*")], POLICY, "Vary: *"),
        (b"GET", [(b"Authorization", b"Bearer x")], 200, [cc("max-age=60")], POLICY, "a response to an authorized request that does not allow sharing"),
        (b"GET", [(b"Authorization", b"Bearer x")], 200, [cc("public, max-age=60")], POLICY, None),
        (b"GET", [(b"Authorization", b"Bearer x")], 200, [cc("s-maxage=60")], POLICY, None),
        (b"GET", [], 200, [cc("max-age=60"), (b"Set-Cookie", b"a=b")], POLICY, "Set-Cookie (not shared unless the route allows it)"),
        (b"GET", [], 200, [cc("max-age=60"), (b"Set-Cookie", b"a=b")], CachePolicy(share_set_cookie=True), None),
        (b"GET", [], 200, [cc("max-age=60")], CachePolicy(enabled=False), "caching is off for the route"),
    ],
)
def test_storable(method: bytes, request_headers: list, status: int, response_headers: list, policy: CachePolicy, why: str | None) -> None:  # type: ignore[type-arg]
    assert storable(method, request_headers, status, response_headers, policy) == why


# -- freshness and age ----------------------------------------------------------------------------------------------


def test_freshness_lifetime_precedence() -> None:
    assert freshness_lifetime(stored(cc("max-age=60, s-maxage=10")), POLICY) == 10
    assert freshness_lifetime(stored(cc("max-age=60"), (b"Expires", date(NOW + 500))), POLICY) == 60
    assert freshness_lifetime(stored((b"Expires", date(NOW + 500))), POLICY) == pytest.approx(500)
    assert freshness_lifetime(stored((b"Expires", b"0")), POLICY) == 0, "an invalid Expires is in the past"
    assert freshness_lifetime(stored(), CachePolicy(forced_ttl=42)) == 42
    assert freshness_lifetime(stored(cc("max-age=5")), CachePolicy(forced_ttl=42)) == 5, "explicit wins"
    lm = stored((b"Last-Modified", date(NOW - 10_000)))
    assert freshness_lifetime(lm, POLICY) == 0, "heuristics are off by default"
    assert freshness_lifetime(lm, CachePolicy(heuristic=True)) == pytest.approx(1000)


def test_age_follows_rfc_9111_4_2_3() -> None:
    # Received with Age: 30 after a 2 s round trip; 10 s in the cache since.
    r = stored((b"Age", b"30"), delay=2.0)
    assert current_age(r, NOW + 10) == pytest.approx(30 + 2 + 10)
    # A Date in the past (clock skew / a cache upstream that did not send Age): apparent age counts.
    skewed = StoredResponse(200, ((b"Date", date(NOW - 100)),), NOW, NOW)
    assert current_age(skewed, NOW + 5) == pytest.approx(105)


# -- using stored responses -------------------------------------------------------------------------------------------


def use(response: StoredResponse, request: list[tuple[bytes, bytes]], at: float) -> Use:
    return select(response, request, POLICY, at)[0]


def test_fresh_stale_and_request_directives() -> None:
    r = stored(cc("max-age=60"))
    assert use(r, [], NOW + 30) is Use.FRESH
    assert use(r, [], NOW + 61) is Use.REVALIDATE
    assert use(r, [cc("max-age=10")], NOW + 30) is Use.REVALIDATE
    assert use(r, [cc("min-fresh=40")], NOW + 30) is Use.REVALIDATE
    assert use(r, [cc("min-fresh=20")], NOW + 30) is Use.FRESH
    assert use(r, [cc("no-cache")], NOW + 1) is Use.REVALIDATE
    assert use(r, [(b"Pragma", b"no-cache")], NOW + 1) is Use.REVALIDATE
    assert use(r, [cc("max-stale=10")], NOW + 65) is Use.STALE
    assert use(r, [cc("max-stale=10")], NOW + 75) is Use.REVALIDATE
    assert use(r, [cc("max-stale")], NOW + 10_000) is Use.STALE
    assert use(stored(cc("max-age=60, no-cache")), [], NOW + 1) is Use.REVALIDATE


def test_must_revalidate_forbids_stale_use() -> None:
    for directive in ("must-revalidate", "proxy-revalidate", "s-maxage=60"):
        r = stored(cc(f"max-age=60, {directive}, stale-while-revalidate=100, stale-if-error=100"))
        assert use(r, [cc("max-stale")], NOW + 70) is Use.REVALIDATE, directive
        assert not stale_if_error_allows(r, [], POLICY, NOW + 70)


def test_stale_while_revalidate_and_stale_if_error() -> None:
    r = stored(cc("max-age=60, stale-while-revalidate=30, stale-if-error=300"))
    assert use(r, [], NOW + 80) is Use.STALE_REVALIDATE
    assert use(r, [], NOW + 95) is Use.REVALIDATE
    assert stale_if_error_allows(r, [], POLICY, NOW + 200)
    assert not stale_if_error_allows(r, [], POLICY, NOW + 400)
    assert stale_if_error_allows(stored(cc("max-age=1")), [cc("stale-if-error=60")], POLICY, NOW + 30)
    assert store_ttl(r, POLICY, NOW) == pytest.approx(360)


def test_revalidation_and_304_merge() -> None:
    r = stored(cc("max-age=60"), (b"ETag", b'"v1"'), (b"Last-Modified", date(NOW - 100)), (b"Content-Length", b"5"), (b"X-Old", b"1"))
    assert conditional_headers(r) == [(b"If-None-Match", b'"v1"'), (b"If-Modified-Since", date(NOW - 100))]
    merged = merge_304(r, [cc("max-age=120"), (b"Content-Length", b"0"), (b"X-New", b"2")], NOW + 99, NOW + 100)
    assert merged.header(b"cache-control") == b"max-age=120"
    assert merged.header(b"content-length") == b"5", "the 304 does not re-frame the stored body"
    assert (merged.header(b"x-old"), merged.header(b"x-new")) == (b"1", b"2")
    assert use(merged, [], NOW + 150) is Use.FRESH
    # An uncached validator-only response is stored for revalidation.
    assert store_ttl(stored((b"ETag", b'"v1"')), POLICY, NOW) > 0


def test_client_conditional_requests_answered_from_cache() -> None:
    r = stored(cc("max-age=60"), (b"ETag", b'W/"v1"'), (b"Last-Modified", date(NOW - 100)), (b"X-Body-Field", b"1"))
    assert client_condition_met(b"GET", [(b"If-None-Match", b'"v1"')], r), "weak comparison"
    assert client_condition_met(b"HEAD", [(b"If-None-Match", b'"x", W/"v1"')], r)
    assert client_condition_met(b"GET", [(b"If-None-Match", b"*")], r)
    assert not client_condition_met(b"GET", [(b"If-None-Match", b'"v2"')], r)
    # If-None-Match wins over If-Modified-Since.
    assert not client_condition_met(b"GET", [(b"If-None-Match", b'"v2"'), (b"If-Modified-Since", date(NOW))], r)
    assert client_condition_met(b"GET", [(b"If-Modified-Since", date(NOW - 50))], r)
    assert not client_condition_met(b"GET", [(b"If-Modified-Since", date(NOW - 200))], r)
    assert not client_condition_met(b"POST", [(b"If-None-Match", b'"v1"')], r)
    names = {n.lower() for n, _ in not_modified_headers(r)}
    assert names == {b"date", b"cache-control", b"etag", b"last-modified"}


def test_unsafe_methods_invalidate_their_targets() -> None:
    headers = [(b"Location", b"/items/7"), (b"Content-Location", b"http://API.example/items/7/v2")]
    assert invalidated_targets(b"POST", 201, b"api.example", headers) == [b"/items/7", b"/items/7/v2"]
    assert invalidated_targets(b"DELETE", 204, b"api.example", [(b"Location", b"http://other/x")]) == []
    assert invalidated_targets(b"POST", 500, b"api.example", headers) == [], "only when it succeeded"
    assert invalidated_targets(b"GET", 200, b"api.example", headers) == []


def test_stored_response_round_trips_through_meta() -> None:
    r = stored(cc("max-age=60"), (b"Content-Type", b"application/json"), (b"X-Empty", b""))
    again = StoredResponse.from_meta(r.to_meta())
    assert again == r


def test_cache_status_header() -> None:
    assert cache_status(hit=True, tier="memory", ttl=12.7) == b"pyproxy; hit; ttl=12; detail=memory"
    assert cache_status(hit=False, fwd="uri-miss", fwd_status=200, stored=True) == b"pyproxy; fwd=uri-miss; fwd-status=200; stored"
    assert cache_status(hit=False, fwd="stale", fwd_status=304, tier="redis") == b"pyproxy; fwd=stale; fwd-status=304; detail=redis"

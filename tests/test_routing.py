"""The route phase: order, hosts, path prefixes on segment boundaries, methods, normalisation."""

from __future__ import annotations

import pytest

from pyproxy.config import Route
from pyproxy.routing import Router, normalize_host, normalize_path


def route(name: str, **kw: object) -> Route:
    return Route(name=name, pool="p", **kw)  # type: ignore[arg-type]


ROUTER = Router(
    [
        route("admin-exact", host="agents.example.com", path_prefix="/admin"),
        route("sub", host="*.example.com", path_prefix="/v1/"),
        route("post-only", path_prefix="/v1/summarize", methods=frozenset({"POST"})),
        route("api", path_prefix="/api"),
        route("catch-all"),
    ]
)


@pytest.mark.parametrize(
    ("method", "target", "host", "expected"),
    [
        ("GET", "/admin/x", "agents.example.com", "admin-exact"),
        ("GET", "/admin", "AGENTS.example.com.:8443", "admin-exact"),
        ("GET", "/admin", "other.example.com", "catch-all"),
        ("GET", "/v1/chat", "a.example.com", "sub"),
        ("GET", "/v1/chat", "example.com", "catch-all"),  # *.example.com needs a subdomain
        ("POST", "/v1/summarize", None, "post-only"),
        ("GET", "/v1/summarize", None, "catch-all"),
        ("POST", "/v1/summarize?doc=1", "x.example.com", "sub"),  # earlier route wins
        ("GET", "/api", "h", "api"),
        ("GET", "/api/", "h", "api"),
        ("GET", "/api?q=1", "h", "api"),
        ("GET", "/apix", "h", "catch-all"),
        ("GET", "/api/../admin", "agents.example.com", "admin-exact"),
        ("GET", "/%61pi/x", "h", "api"),
        ("GET", "//api//x", "h", "api"),
        ("GET", "/x/./../api", "h", "api"),
        ("GET", "/api%2Fx", "h", "catch-all"),  # an encoded slash is data, not a separator
        ("GET", "http://h/api/x", "h", "api"),  # absolute-form target
    ],
)
def test_match(method: str, target: str, host: str | None, expected: str) -> None:
    got = ROUTER.match(method, target, host)
    assert got is not None and got.name == expected


def test_match_raw_agrees_with_match_and_remembers_bounded() -> None:
    router = Router(ROUTER.routes, decision_cache_size=8)
    cases = [("GET", "/api/x", "h"), ("GET", "/apix", "h"), ("POST", "/api/../admin", "agents.example.com"),
             ("GET", "/%61pi/x", None), ("GET", "/nothing", "elsewhere")]
    for _ in range(2):  # the second pass answers from the memo
        for method, target, host in cases:
            raw_host = host.encode() if host else None
            assert router.match_raw(method.encode(), target.encode(), raw_host) is router.match(method, target, host)
    for i in range(100):
        router.match_raw(b"GET", b"/api/%d" % i, b"h")
    assert len(router._decisions) <= 8


def test_no_route_is_none() -> None:
    router = Router([route("only", host="a.test", path_prefix="/x")])
    assert router.match("GET", "/x", "b.test") is None
    assert router.match("GET", "/y", "a.test") is None
    assert router.match("GET", "/x", None) is None


def test_trailing_slash_prefix_needs_the_slash() -> None:
    router = Router([route("dir", path_prefix="/docs/")])
    assert router.match("GET", "/docs/a", None) is not None
    assert router.match("GET", "/docs", None) is None


def test_many_random_hosts_do_not_grow_the_cache_without_bound() -> None:
    router = Router([route("w", host="*.a.test"), route("any")], host_cache_size=16)
    for i in range(1000):
        assert router.match("GET", "/", f"h{i}.b.test").name == "any"  # type: ignore[union-attr]
    assert router._candidates.cache_info().currsize <= 16  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("example.com.", "example.com"),
        ("[::1]:8080", "[::1]"),
        (b"API.test", "api.test"),
        (None, None),
    ],
)
def test_normalize_host(raw: str | bytes | None, host: str | None) -> None:
    assert normalize_host(raw) == host


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a/b/../c", "/a/c"),
        ("/a/./b/.", "/a/b/"),
        ("/../a", "/a"),
        ("/a/b/..", "/a/"),
        ("/%7Euser/%41", "/~user/A"),
        ("/a%2fb", "/a%2fb"),
        ("/a//b///c", "/a/b/c"),
        ("/p?x=/../y", "/p"),
        ("*", "*"),
    ],
)
def test_normalize_path(target: str, path: str) -> None:
    assert normalize_path(target) == path


def test_catch_all_is_the_first_route_only_when_it_takes_every_path() -> None:
    """``catch_all`` (what the data plane routes origin-form requests to without a lookup) is the
    first route exactly when it matches every path: and then ``match`` agrees for any such target."""
    everything = Route(name="all", pool="p")
    later = Route(name="api", pool="q", path_prefix="/api")
    router = Router([everything, later])
    assert router.catch_all is everything
    for method, target, host in [("GET", "/", None), ("POST", "/api/x", "h"), ("GET", "/%2e%2e/a?b", "x:1")]:
        assert router.match(method, target, host) is everything
    # not for a first route that filters (nor for asterisk-form, which the data plane checks)
    assert Router([later, everything]).catch_all is None
    assert Router([Route(name="h", pool="p", host="a.example")]).catch_all is None
    assert Router([Route(name="m", pool="p", methods=frozenset({"GET"}))]).catch_all is None
    assert Router([]).catch_all is None
    assert router.match("OPTIONS", "*", None) is None

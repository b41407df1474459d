"""The HTTP cache in the proxy, end to end: real sockets, a real upstream, real tiers."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from services import RedisServer

from pyproxy.config import Limits, parse_config
from pyproxy.errors import HeaderError
from pyproxy.sample_server import SampleServer
from pyproxy.server import ProxyServer
from pyproxy.upstream_response import UpstreamResponse


@contextmanager
def cached_proxy(
    up: SampleServer, route_cache: dict[str, Any] | None = None, cache: dict[str, Any] | None = None, admin: bool = False
) -> Iterator[ProxyServer]:
    config = parse_config(
        {
            "listeners": [{"port": 0}],
            "admin": {"enabled": True, "port": 0} if admin else {"enabled": False},
            "pools": {"p": {"servers": [up.address]}},
            "routes": [{"name": "api", "pool": "p", "cache": route_cache or {}}],
            "cache": cache or {},
        }
    )
    with ProxyServer(config).running() as server:
        yield server


def get(conn: http.client.HTTPConnection, target: str = "/a", headers: dict[str, str] | None = None, method: str = "GET", body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, target, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def upstream_requests(up: SampleServer, target: bytes = b"/a") -> int:
    return sum(1 for r in up.requests if r.target == target)


def test_hits_are_served_from_memory_with_age_and_cache_status() -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=60")]
    with up.running(), cached_proxy(up) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        first = get(conn)
        assert first[0] == 200 and first[1]["cache-status"] == "pyproxy; fwd=uri-miss; fwd-status=200; stored"
        time.sleep(1.1)
        second = get(conn)
        assert second[0] == 200 and second[2] == first[2]
        assert second[1]["cache-status"].startswith("pyproxy; hit; ttl=5") and second[1]["cache-status"].endswith("detail=memory")
        assert int(second[1]["age"]) >= 1
        assert second[1]["x-request-id"] and second[1]["content-length"] == str(len(first[2]))
        head = get(conn, method="HEAD")
        assert head[0] == 200 and head[2] == b"" and head[1]["content-length"] == str(len(first[2]))
        assert upstream_requests(up) == 1
        # Keys differ by Host.
        assert get(conn, headers={"Host": "other.example"})[1]["cache-status"].startswith("pyproxy; fwd=uri-miss")
        assert upstream_requests(up) == 2
        conn.close()


def test_revalidation_304_and_client_conditionals() -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=1")]
    up.etag = b'"v1"'
    with up.running(), cached_proxy(up) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        body = get(conn)[2]
        status, headers, _ = get(conn, headers={"If-None-Match": '"v1"'})
        assert status == 304 and headers["cache-status"].startswith("pyproxy; hit")
        time.sleep(1.5)
        status, headers, again = get(conn)
        assert status == 200 and again == body
        assert headers["cache-status"].startswith("pyproxy; fwd=stale; fwd-status=304")
        revalidation = up.requests[-1]
        assert revalidation.header(b"if-none-match") == b'"v1"'
        conn.close()


def test_one_hundred_concurrent_misses_make_one_upstream_request() -> None:
    up = SampleServer(name="up", latency=0.3)
    up.headers = [(b"Cache-Control", b"max-age=60")]
    with up.running(), cached_proxy(up) as server:
        results: list[int] = []

        def client() -> None:
            conn = http.client.HTTPConnection(*server.addresses[0], timeout=20)
            results.append(get(conn, "/hot")[0])
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 100
        assert upstream_requests(up, b"/hot") == 1


def test_a_hit_consumes_the_request_body_and_keeps_the_connection() -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=60")]
    with up.running(), cached_proxy(up) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        get(conn)
        # A GET with a body, answered from cache, then another request on the same connection.
        with socket.create_connection(server.addresses[0], timeout=10) as s:
            s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            deadline = time.monotonic() + 5
            while data.count(b"HTTP/1.1 200") < 2 and time.monotonic() < deadline:
                data += s.recv(65536)
        assert data.count(b"HTTP/1.1 200") == 2, data
        assert b"connection: close" not in data.lower()
        conn.close()


def test_unsafe_methods_invalidate_and_private_responses_are_not_shared() -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=60")]
    with up.running(), cached_proxy(up) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        get(conn, "/item")
        assert get(conn, "/item")[1]["cache-status"].startswith("pyproxy; hit")
        assert get(conn, "/item", method="POST", body=b"x")[0] == 200
        assert get(conn, "/item")[1]["cache-status"].startswith("pyproxy; fwd=uri-miss")
        up.headers = [(b"Cache-Control", b"private, max-age=60")]
        get(conn, "/me")
        get(conn, "/me")
        assert upstream_requests(up, b"/me") == 2
        conn.close()


def test_l2_redis_shared_by_two_proxies_and_redis_loss_is_not_an_error(redis_clean: RedisServer, tmp_path: Path) -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=60")]
    cache = {"redis_url": redis_clean.url, "sqlite_path": str(tmp_path / "l3.sqlite3"), "timeout": "500ms"}
    with up.running(), cached_proxy(up, cache=cache) as a, cached_proxy(up, cache={**cache, "sqlite_path": str(tmp_path / "b.sqlite3")}) as b:
        ca = http.client.HTTPConnection(*a.addresses[0], timeout=10)
        cb = http.client.HTTPConnection(*b.addresses[0], timeout=10)
        host = {"Host": "api.example"}  # the key includes Host: the same for both proxies
        assert get(ca, "/shared", host)[0] == 200
        time.sleep(0.3)  # A stores after answering (in the background)
        status, headers, _ = get(cb, "/shared", host)
        assert status == 200 and headers["cache-status"].endswith("detail=redis"), headers
        assert upstream_requests(up, b"/shared") == 1
        redis_clean.stop()
        for i in range(5):
            status, headers, _ = get(cb, f"/other/{i}")
            assert status == 200
        assert get(cb, "/shared", host)[0] == 200  # from B's memory
        ca.close()
        cb.close()


def test_stale_while_revalidate_refreshes_in_the_background() -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=1, stale-while-revalidate=30")]
    up.etag = b'"v1"'
    with up.running(), cached_proxy(up) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        body = get(conn)[2]
        time.sleep(1.5)
        # What the refresh will get: a longer lifetime (a 1 s one could be stale again on arrival,
        # Date having whole seconds).
        up.headers = [(b"Cache-Control", b"max-age=60, stale-while-revalidate=30")]
        status, headers, stale = get(conn)
        assert status == 200 and stale == body
        assert headers["cache-status"].startswith("pyproxy; hit; ttl=-"), headers["cache-status"]
        deadline = time.monotonic() + 5
        while upstream_requests(up) < 2:
            assert time.monotonic() < deadline, "the background refresh reached the upstream"
            time.sleep(0.02)
        assert up.requests[-1].header(b"if-none-match") == b'"v1"'
        time.sleep(0.2)  # the 304 renews the stored head
        status, headers, _ = get(conn)
        assert headers["cache-status"].startswith("pyproxy; hit; ttl=5"), headers["cache-status"]
        assert upstream_requests(up) == 2
        conn.close()


def test_stale_if_error_stands_in_for_a_failing_or_unreachable_upstream() -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=1, stale-if-error=60")]
    up.etag = b'"v1"'
    with up.running(), cached_proxy(up) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        body = get(conn)[2]
        time.sleep(1.5)
        up.mode = "error"
        status, headers, stale = get(conn)
        assert status == 200 and stale == body and headers["cache-status"].startswith("pyproxy; fwd=stale; fwd-status=500")
        conn.close()


def test_stale_if_error_when_the_upstream_is_unreachable() -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=1, stale-if-error=60")]
    with contextlib.ExitStack() as upstream_running:
        upstream_running.enter_context(up.running())
        config = parse_config(
            {
                "listeners": [{"port": 0}],
                "admin": {"enabled": False},
                "pools": {"p": {"servers": [up.address], "retry": {"attempts": 0}}},
                "routes": [{"name": "api", "pool": "p", "cache": {}}],
            }
        )
        with ProxyServer(config).running() as server:
            conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
            body = get(conn)[2]
            time.sleep(1.5)
            upstream_running.close()  # the upstream is gone: connections are refused
            status, headers, stale = get(conn)
            assert status == 200 and stale == body, (status, headers)
            assert headers["cache-status"].startswith("pyproxy; fwd=stale; fwd-status=502")
            conn.close()


def test_cache_metrics() -> None:
    import urllib.request

    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=60")]
    with up.running():
        with cached_proxy(up, admin=True) as server:
            conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
            get(conn)
            time.sleep(0.1)
            get(conn)
            get(conn)
            conn.close()
            admin = server.admin
            assert admin is not None and admin.address is not None
            with urllib.request.urlopen(f"http://127.0.0.1:{admin.address[1]}/metrics", timeout=5) as r:
                text = r.read().decode()
    assert 'pyproxy_cache_events_total{event="miss"} 1.0' in text
    assert 'pyproxy_cache_events_total{event="hit"} 2.0' in text
    assert 'pyproxy_cache_events_total{event="stored"} 1.0' in text
    assert 'pyproxy_cache_tier_operations_total{result="hit",tier="memory"} 2.0' in text
    assert 'pyproxy_cache_tier_up{tier="memory"} 1.0' in text


def _admin_purge(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/cache/purge", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_admin_purge_by_url_key_and_tag_with_dependencies() -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=60"), (b"Cache-Tag", b"doc:1")]
    with up.running():
        with cached_proxy(up, cache={"depends": [{"tag": "doc:1", "on": "user:7"}]}, admin=True) as server:
            admin = server.admin
            assert admin is not None and admin.address is not None
            conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
            host = {"Host": "api.example"}

            def cached(target: str) -> bool:
                return get(conn, target, host)[1]["cache-status"].startswith("pyproxy; hit")

            get(conn, "/a", host)
            get(conn, "/b", host)
            assert cached("/a") and cached("/b")
            status, body = _admin_purge(admin.address[1], {"urls": "http://api.example/a"})
            assert status == 200 and body["keys"] == ["http://api.example/a"]
            assert not cached("/a") and cached("/b")
            status, body = _admin_purge(admin.address[1], {"tags": ["user:7"]})
            assert status == 200 and set(body["tags"]) == {"user:7", "doc:1"}
            assert not cached("/a") and not cached("/b")
            assert _admin_purge(admin.address[1], {"bogus": 1})[0] == 400
            assert _admin_purge(admin.address[1], {"urls": ["/relative"]})[0] == 400
            conn.close()


def test_admin_purge_reaches_every_worker(tmp_path: Path) -> None:
    from helpers import free_port, proxy_process

    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=600"), (b"Cache-Tag", b"everything")]
    with up.running():
        port, admin_port = free_port(), free_port()
        config = tmp_path / "proxy.toml"
        config.write_text(
            f"""
workers = 2
[[listeners]]
port = {port}
[admin]
port = {admin_port}
[pools.p]
servers = ["{up.address}"]
[[routes]]
name = "api"
pool = "p"
cache = {{}}
"""
        )
        with proxy_process(config, port):
            def ages() -> list[int | None]:
                out = []
                for _ in range(24):  # new connections: SO_REUSEPORT spreads them over the workers
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    headers = get(conn, "/x")[1]
                    conn.close()
                    out.append(int(headers["age"]) if "age" in headers else None)
                return out

            before = ages()
            deadline = time.monotonic() + 10
            while upstream_requests(up, b"/x") < 2 and time.monotonic() < deadline:
                before = ages()  # the second worker may still be starting: until both have served
            assert upstream_requests(up, b"/x") == 2, "each worker fetched once"
            time.sleep(2.2)
            assert min(a for a in ages() if a is not None) >= 2, "served from the workers' memory"
            status, body = _admin_purge(admin_port, {"tags": "everything"})
            assert status == 200 and body["workers"] == 2, body
            time.sleep(0.3)
            after = ages()
            # No worker still serves the old copy (it would be at least 2 s old).
            assert all(a is None or a < 2 for a in after), after
            assert before


def test_tag_cascade_purge_reaches_another_proxy_instance(redis_clean: RedisServer, tmp_path: Path) -> None:
    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=600"), (b"Cache-Tag", b"page:home"), (b"X-Cache-Depends", b"user:7")]
    cache = {"redis_url": redis_clean.url}
    with up.running(), cached_proxy(up, cache=cache, admin=True) as a, cached_proxy(up, cache=cache) as b:
        host = {"Host": "api.example"}
        cb = http.client.HTTPConnection(*b.addresses[0], timeout=10)
        assert get(cb, "/home", host)[1]["cache-status"].startswith("pyproxy; fwd=uri-miss")
        assert get(cb, "/home", host)[1]["cache-status"].startswith("pyproxy; hit"), "in B's memory"
        time.sleep(0.3)  # B's store (and the dependency page:home -> user:7) reached Redis
        assert a.admin is not None and a.admin.address is not None
        started = time.monotonic()
        status, body = _admin_purge(a.admin.address[1], {"tags": "user:7"})
        assert status == 200 and set(body["tags"]) == {"user:7", "page:home"}, body
        while get(cb, "/home", host)[1]["cache-status"].startswith("pyproxy; hit"):
            assert time.monotonic() - started < 1.0, "B dropped its copy"
            time.sleep(0.01)
        cb.close()


def test_reload_turns_a_routes_caching_off_and_on(tmp_path: Path) -> None:
    from helpers import ReloadableConfig

    from pyproxy.config import load_config

    up = SampleServer(name="up")
    up.headers = [(b"Cache-Control", b"max-age=600")]
    with up.running():
        config = ReloadableConfig(tmp_path / "proxy.toml", up.address)
        config.write("cache = {}")
        with ProxyServer(load_config(config.path), config.path).running():
            conn = http.client.HTTPConnection("127.0.0.1", config.port, timeout=10)
            get(conn)
            assert get(conn)[1]["cache-status"].startswith("pyproxy; hit")
            config.write("cache = { enabled = false }")
            config.reload()
            assert "cache-status" not in get(conn)[1], "caching off for the route: relayed as it is"
            config.write('cache = { query = "sort" }')
            config.reload()
            # On again (no route cached in between, so the memory tier was let go): stored anew.
            assert get(conn)[1]["cache-status"].startswith("pyproxy; fwd=uri-miss")
            assert get(conn)[1]["cache-status"].startswith("pyproxy; hit")
            # A reload that keeps the route caching keeps the stored entries.
            config.write('cache = { query = "sort", ttl = "30s" }')
            config.reload()
            assert get(conn)[1]["cache-status"].startswith("pyproxy; hit")
            conn.close()


def test_a_refresh_reads_responses_with_the_data_planes_limits_and_refuses_a_101() -> None:
    """The background refresh frames a response as the data plane would: with its head limits
    (raised limits admit a head the defaults refuse), interim 1xx skipped, a 101 refused at once."""
    many = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"Content-Length: 2\r\n\r\nok"
    def refresh_response(limits: Limits) -> UpstreamResponse:  # as UpstreamRefresher makes it
        return UpstreamResponse(b"GET", 1 << 20, limits.max_head_size, limits.max_header_count, switch_allowed=False)

    raised = refresh_response(Limits(max_header_count=200))
    raised.feed(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + many)
    assert (raised.status, raised.complete, bytes(raised.body), len(raised.headers)) == (200, True, b"ok", 151)
    with pytest.raises(HeaderError, match="more than 100 header lines"):
        refresh_response(Limits()).feed(many)
    with pytest.raises(HeaderError, match="101"):
        refresh_response(Limits()).feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")

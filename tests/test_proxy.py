"""The data plane end to end: real sockets, real sample upstreams, the proxy on its own loop."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from helpers import eventually
from pyproxy.config import parse_config
from pyproxy.sample_server import SampleServer
from pyproxy.server import ProxyServer


@contextmanager
def proxy(*upstreams: SampleServer, limits: dict[str, Any] | None = None, pool: dict[str, Any] | None = None,
          routes: list[dict[str, Any]] | None = None) -> Iterator[tuple[str, int]]:
    """Start the upstreams and a proxy in front of them; yield the proxy's address."""
    with ExitStack() as stack:
        for u in upstreams:
            stack.enter_context(u.running())
        config = parse_config(
            {
                "listeners": [{"port": 0}],
                "admin": {"enabled": False},
                "limits": limits or {},
                "pools": {"p": {"servers": [u.address for u in upstreams], **(pool or {})}},
                "routes": routes or [{"pool": "p"}],
            }
        )
        server = stack.enter_context(ProxyServer(config).running())
        yield server.addresses[0]


def raw(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the proxy closes the connection."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return out


def test_round_robin_headers_and_request_id() -> None:
    a, b = SampleServer(name="a"), SampleServer(name="b")
    with proxy(a, b) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        served = []
        for i in range(4):
            conn.request("GET", f"/v1/item/{i}?q=1", headers={"Host": "agents.test", "X-Request-ID": f"id-{i}"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            served.append(body["server"])
            assert resp.getheader("X-Request-ID") == f"id-{i}"
            assert resp.getheader("Via") == "1.1 pyproxy"
        conn.request("GET", "/generated")
        resp = conn.getresponse()
        resp.read()
        generated = resp.getheader("X-Request-ID")
        assert generated and len(generated) == 32
    assert served == ["a", "b", "a", "b"]
    req = a.requests[0]
    assert req.target == b"/v1/item/0?q=1"
    assert req.header(b"host") == b"agents.test", "Host passes through"
    assert req.header(b"x-forwarded-for") == b"127.0.0.1"
    assert req.header(b"x-forwarded-host") == b"agents.test"
    assert req.header(b"x-forwarded-proto") == b"http"
    assert req.header(b"x-request-id") == b"id-0"
    assert a.requests[-1].header(b"x-request-id") == generated.encode()  # 5th request: a again


def test_hop_by_hop_headers_are_removed() -> None:
    up = SampleServer()
    with proxy(up) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/", headers={"Connection": "keep-alive, X-Secret", "X-Secret": "1", "Keep-Alive": "5",
                                          "X-Forwarded-For": "203.0.113.9", "TE": "trailers"})
        conn.getresponse().read()
    req = up.requests[0]
    names = {n.lower() for n, _ in req.headers}
    assert not names & {b"connection", b"x-secret", b"keep-alive", b"te"}
    assert req.header(b"x-forwarded-for") == b"203.0.113.9, 127.0.0.1"


def test_keep_alive_load_opens_no_new_upstream_connections() -> None:
    a, b = SampleServer(name="a"), SampleServer(name="b")
    with proxy(a, b) as addr:
        conns = [http.client.HTTPConnection(*addr, timeout=10) for _ in range(4)]
        for _ in range(50):
            for conn in conns:
                conn.request("GET", "/")
                assert conn.getresponse().read()
    assert len(a.requests) + len(b.requests) == 200
    assert a.accepts == 1 and b.accepts == 1


def test_request_bodies_stream_with_content_length_and_chunked() -> None:
    up = SampleServer()
    with proxy(up) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("POST", "/echo", body=b"hello world")
        assert conn.getresponse().read() == b"hello world"
        conn.request("POST", "/echo", body=iter([b"chunk-1,", b"chunk-2"]), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        assert conn.getresponse().read() == b"chunk-1,chunk-2"
        big = bytes(range(256)) * 40_000  # 10 MB
        conn.request("POST", "/echo", body=big)
        assert conn.getresponse().read()[:1000] == big[:1000]
    assert up.requests[1].header(b"transfer-encoding") == b"chunked"
    assert up.requests[2].body_size == len(big)


def test_downloads_stream_with_content_length_and_chunked() -> None:
    with proxy(SampleServer()) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=20)
        conn.request("GET", "/bytes/20000000")
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == "20000000"
        assert len(resp.read()) == 20_000_000
        conn.request("GET", "/chunked/300000")
        resp = conn.getresponse()
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.read() == b"x" * 300_000


def test_head_keeps_the_length_and_sends_no_body() -> None:
    with proxy(SampleServer()) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("HEAD", "/bytes/1234")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == "1234" and resp.read() == b""
        conn.request("GET", "/after-head")
        assert json.loads(conn.getresponse().read())["path"] == "/after-head"


def test_pipelined_requests_are_answered_in_order() -> None:
    with proxy(SampleServer(latency=0.02)) as addr:
        out = raw(addr, b"".join(
            b"GET /r%d HTTP/1.1\r\nHost: x\r\n%s\r\n" % (i, b"Connection: close\r\n" if i == 4 else b"")
            for i in range(5)
        ))
    positions = [out.index(b'"/r%d"' % i) for i in range(5)]
    assert positions == sorted(positions) and out.count(b"HTTP/1.1 200") == 5


def test_a_long_pipeline_in_one_read_is_parsed_a_few_requests_ahead() -> None:
    """300 requests in one send: all answered, in order, while at most 16 wait parsed at a time
    (the rest of the read waits as bytes, not as 300 exchanges)."""
    n = 300
    pipeline = b"".join(b"GET /r%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(n - 1))
    pipeline += b"GET /r%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (n - 1)
    up = SampleServer(latency=0.002)
    deepest = 0
    with up.running():
        config = parse_config({"listeners": [{"port": 0}], "admin": {"enabled": False},
                               "pools": {"p": {"servers": [up.address]}}, "routes": [{"pool": "p"}]})
        with ProxyServer(config).running() as server:
            with socket.create_connection(server.addresses[0], timeout=10) as sock:
                sock.sendall(pipeline)
                out = b""
                while chunk := sock.recv(65536):
                    out += chunk
                    assert server.state is not None
                    deepest = max([deepest, *(len(c.queue) for c in list(server.state.clients))])
    positions = [out.index(b'"/r%d"' % i) for i in range(n)]
    assert positions == sorted(positions) and out.count(b"HTTP/1.1 200") == n
    assert 0 < deepest <= 16, deepest


def test_keep_alive_timeout_does_not_run_while_pipelined_requests_wait() -> None:
    """Answers slower than the keep-alive timeout: the connection is not idle while a pipelined
    request waits for its answer, so it is not closed under it."""
    with proxy(SampleServer(latency=0.6), limits={"keepalive_timeout": "300ms"}) as addr:
        with socket.create_connection(addr, timeout=10) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            out = b""
            while out.count(b"HTTP/1.1 200 ") < 2 or not out.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, out  # closed before the second answer
                out += chunk
    assert out.index(b'"/a"') < out.index(b'"/b"')


def test_expect_100_continue_and_connection_close() -> None:
    up = SampleServer()
    with proxy(up) as addr:
        with socket.create_connection(addr, timeout=5) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"hello")
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"hello")
        out = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out.lower()
    assert up.requests[0].header(b"expect") is None


MALFORMED = {
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-cl": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "invalid-cl": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3x\r\n\r\nabc",
    "bad-chunk-size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "nul-in-header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "ctl-in-header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "missing-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "te-not-chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "bad-request-line": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "te-vertical-tab": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
    "te-chunked-identity": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "cl-plus-sign": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    "chunk-size-trailing-space": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
    "chunk-data-overrun": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    "te-in-http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nFoo\r\n\r\n",
    "space-before-first-header": b"GET / HTTP/1.1\r\n Host: x\r\n\r\n",
    "cl-trailer-smuggle": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_requests_get_400_close_and_never_reach_the_upstream(name: str) -> None:
    up = SampleServer()
    with proxy(up) as addr:
        out = raw(addr, MALFORMED[name])
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert b"connection: close" in out.lower()
    assert up.accepts == 0 and up.received == 0


def test_malformed_request_after_a_good_one_on_the_same_connection() -> None:
    up = SampleServer()
    with proxy(up) as addr:
        out = raw(addr, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n" + MALFORMED["cl-and-te"])
    assert out.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in out
    assert [r.target for r in up.requests] == [b"/ok"]


def test_limits_431_413_404() -> None:
    up = SampleServer()
    with proxy(up, limits={"max_head_size": 2048, "max_header_count": 10, "max_body_size": 100},
               routes=[{"pool": "p", "path_prefix": "/api"}]) as addr:
        out = raw(addr, b"GET /api HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431")
        many = b"".join(b"X-%d: v\r\n" % i for i in range(20))
        assert raw(addr, b"GET /api HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431")
        out = raw(addr, b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"a" * 101)
        assert out.startswith(b"HTTP/1.1 413")
        chunked = b"POST /api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"40\r\n" + b"a" * 64 + b"\r\n" * 1
        out = raw(addr, chunked + b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413")
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/elsewhere")
        resp = conn.getresponse()
        assert resp.status == 404 and b"no route" in resp.read()
        conn.request("GET", "/api")  # a 404 without a body keeps the connection
        assert conn.getresponse().status == 200
    assert [r.target for r in up.requests] == [b"/api"]


def test_slow_head_gets_408() -> None:
    up = SampleServer()
    with proxy(up, limits={"head_timeout": "300ms"}) as addr:
        with socket.create_connection(addr, timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            start = time.monotonic()
            out = sock.recv(65536)
            assert out.startswith(b"HTTP/1.1 408")
            assert 0.25 <= time.monotonic() - start < 3
    assert up.received == 0


KEEP_ALIVE_CASES = {
    # first request's version and fields -> whether the connection stays open for the second
    "1.1 default": (b"HTTP/1.1", b"", True),
    "1.1 close": (b"HTTP/1.1", b"Connection: close\r\n", False),
    "1.1 close among tokens": (b"HTTP/1.1", b"Connection: X-Trace, CLOSE\r\n", False),
    "1.1 keep-alive": (b"HTTP/1.1", b"Connection: keep-alive\r\n", True),
    "1.0 default": (b"HTTP/1.0", b"", False),
    "1.0 keep-alive": (b"HTTP/1.0", b"Connection: Keep-Alive\r\n", True),
    "1.1 upgrade without connection": (b"HTTP/1.1", b"Upgrade: websocket\r\n", True),
    "1.1 proxy-connection close": (b"HTTP/1.1", b"Proxy-Connection: close\r\n", False),
    "1.0 proxy-connection keep-alive": (b"HTTP/1.0", b"Proxy-Connection: keep-alive\r\n", True),
}


@pytest.mark.parametrize("name", sorted(KEEP_ALIVE_CASES))
def test_keep_alive_follows_version_and_connection(name: str) -> None:
    """HTTP/1.1 stays open unless Connection says close, 1.0 only when it says keep-alive; an
    Upgrade field alone (no Connection: upgrade) is an ordinary request."""
    version, fields, stays_open = KEEP_ALIVE_CASES[name]
    up = SampleServer()
    with proxy(up) as addr:
        out = raw(addr, b"GET /first " + version + b"\r\nHost: x\r\n" + fields + b"\r\n"
                  b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = out.count(b"HTTP/1.1 200 ")
    assert answers == (2 if stays_open else 1), out[:400]
    first = out.split(b"\r\n\r\n", 1)[0].lower()
    assert (b"connection: close" in first) is (not stays_open), first
    assert up.accepts >= 1 and b"101 " not in out


@pytest.mark.parametrize(
    ("version", "status"), [(b"HTTP/2.0", b"505"), (b"HTTP/1.2", b"400"), (b"HTTP/3.0", b"400"), (b"HTTP/0.9", b"400")]
)
def test_http_versions_other_than_1x_are_refused(version: bytes, status: bytes) -> None:
    """2.0 parses but is not spoken here (505); versions llhttp does not know are malformed (400).
    Either way nothing reaches the upstream and the connection closes."""
    up = SampleServer()
    with proxy(up) as addr:
        out = raw(addr, b"GET / " + version + b"\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 " + status + b" "), out[:200]
    assert out.count(b"HTTP/1.1 ") == 1 and up.received == 0


def test_http10_with_proxy_connection_keep_alive_is_still_http10() -> None:
    """llhttp keeps such a connection open as if Connection said so; the request stays HTTP/1.0:
    its Expect: 100-continue gets no interim response (a 1.0 client knows none)."""
    up = SampleServer()
    with proxy(up) as addr, socket.create_connection(addr, timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.0\r\nHost: x\r\nProxy-Connection: keep-alive\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        sock.settimeout(0.5)
        try:
            early = sock.recv(65536)
        except TimeoutError:
            early = b""
        assert early == b"", early  # nothing before the body: no 100 Continue to a 1.0 client
        sock.settimeout(5)
        sock.sendall(b"abc")
        out = b""
        while out.count(b"HTTP/1.1 ") < 1 or not out.endswith(b"abc"):
            chunk = sock.recv(65536)
            assert chunk, out
            out += chunk
        assert out.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in out.lower()


def test_idle_keep_alive_connection_is_closed() -> None:
    with proxy(SampleServer(), limits={"keepalive_timeout": "300ms"}) as addr:
        with socket.create_connection(addr, timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            assert sock.recv(65536) == b""
            assert 0.25 <= time.monotonic() - start < 3


@contextmanager
def proxy_to_a_dead_upstream() -> Iterator[tuple[str, int]]:
    """A proxy whose one upstream address has nothing listening (a server started and stopped)."""
    dead = SampleServer()
    with dead.running():
        address = dead.address
    config = parse_config({"listeners": [{"port": 0}], "pools": {"p": {"servers": [address]}},
                           "routes": [{"pool": "p"}], "admin": {"enabled": False}})
    with ProxyServer(config).running() as server:
        yield server.addresses[0]


def test_upstream_down_is_502() -> None:
    with proxy_to_a_dead_upstream() as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 502 and b"cannot connect" in resp.read()


def test_silent_upstream_is_504() -> None:
    with proxy(SampleServer(mode="silent"), pool={"response_timeout": "300ms"}) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 504 and resp.read()


def test_malformed_upstream_response_is_502_never_relayed() -> None:
    with proxy(SampleServer(mode="malformed")) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 502 and b"not a header" not in body


def test_chunked_upstream_response_in_pieces_is_relayed_without_its_trailers() -> None:
    up = SampleServer()
    up.raw = [b"HTTP/1.1 200 OK\r\nTransfer-", b"Encoding: chunked\r\nX-A: 1\r\n\r\n5;ext=1\r\nhel",
              b"lo\r\n6\r", b"\n world\r\n0\r\nX-Trailer: t\r\n", b"\r\n"]
    with proxy(up) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        for _ in range(2):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == b"hello world" and resp.getheader("X-A") == "1"
        out = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    # re-chunked as the pieces arrived; the trailer section is dropped, the last chunk kept
    assert out.endswith(b"\r\n world\r\n0\r\n\r\n") and b"X-Trailer" not in out, out
    assert up.accepts == 1  # reused after each complete chunked response


MALFORMED_RESPONSE_HEADS = {
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: \x00\r\nContent-Length: 2\r\n\r\nok",
    "HTTP/2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
}


@pytest.mark.parametrize("name", sorted(MALFORMED_RESPONSE_HEADS))
def test_malformed_upstream_heads_are_502_and_never_relayed(name: str) -> None:
    up = SampleServer()
    up.raw = [MALFORMED_RESPONSE_HEADS[name]]
    with proxy(up) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
    assert resp.status == 502 and b"malformed response" in body and resp.getheader("X-A") is None, body


def test_malformed_chunk_after_the_head_breaks_the_client_connection() -> None:
    up = SampleServer()
    up.raw = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"zz\r\nmore\r\n0\r\n\r\n"]
    with proxy(up) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()


def test_bytes_after_an_upstream_response_are_not_reused() -> None:
    up = SampleServer()
    up.raw = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforge"]
    with proxy(up) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        for _ in range(2):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == b"ok"
    assert up.accepts == 2  # the connection that sent more than its response was closed


def test_http10_upstream_body_runs_until_it_closes() -> None:
    up = SampleServer()
    up.raw = [b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ", b"second"]
    up.raw_close = True
    with proxy(up) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"first second"


def test_empty_line_before_a_request_and_nothing_after_connection_close() -> None:
    """A CRLF after a POST body is skipped (RFC 9112 §2.2); a request that closes the connection
    is the last one read (§9.6): the one after it never reaches the upstream."""
    up = SampleServer()
    with proxy(up) as addr:
        out = raw(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok\r\n"
                        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 ") == 2, out
    assert [r.target for r in up.requests] == [b"/echo", b"/a"]


def test_truncated_upstream_response_closes_the_client_connection() -> None:
    with proxy(SampleServer(mode="truncate", body=b"z" * 100_000)) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()


def test_upstream_closing_before_answering_is_502() -> None:
    with proxy(SampleServer(mode="close")) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().status == 502


@contextmanager
def resetting_upstream() -> Iterator[str]:
    """An upstream that accepts each connection and resets it at once (SO_LINGER 0); its address."""
    import struct
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_upstream_resetting_new_connections_is_502_at_once() -> None:
    """A connection the upstream resets right after accepting it may be lost before the request is
    handed to it: that is a failed attempt (502 now), never a request left waiting for its response
    timeout (5 s here) or for ever."""
    with resetting_upstream() as address:
        config = parse_config({"listeners": [{"port": 0}], "admin": {"enabled": False},
                               "pools": {"p": {"servers": [address], "response_timeout": "5s",
                                               "retry": {"attempts": 0}}},
                               "routes": [{"pool": "p"}]})
        with ProxyServer(config).running() as server:
            for i in range(150):
                started = time.monotonic()
                conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
                conn.request("GET", f"/{i}")
                resp = conn.getresponse()
                resp.read()
                conn.close()
                assert resp.status == 502 and time.monotonic() - started < 2, (i, resp.status)


WS_REQUEST = (b"GET /upgrade HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_upgrade_is_tunnelled_after_101() -> None:
    up = SampleServer()
    with proxy(up) as addr:
        with socket.create_connection(addr, timeout=5) as sock:
            sock.sendall(WS_REQUEST)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 101 ")
            lower = head.lower()
            assert b"upgrade: websocket" in lower and b"connection: upgrade" in lower
            assert b"x-request-id: " in lower
            for message in (b"\x81\x05hello", b"binary \x00\xff frames", b"x" * 200_000):
                sock.sendall(message)
                echoed = b""
                while len(echoed) < len(message):
                    echoed += sock.recv(65536)
                assert echoed == message
    req = up.requests[0]
    assert req.header(b"upgrade") == b"websocket" and req.header(b"connection") == b"upgrade"
    assert req.header(b"sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="


def test_upgrade_bytes_sent_with_the_head_are_relayed() -> None:
    with proxy(SampleServer()) as addr:
        with socket.create_connection(addr, timeout=5) as sock:
            sock.sendall(WS_REQUEST + b"early-bytes")
            data = b""
            while not data.endswith(b"early-bytes"):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 101")


def test_upgrade_refused_by_the_upstream_is_answered_and_closed() -> None:
    with proxy(SampleServer()) as addr:
        out = raw(addr, WS_REQUEST.replace(b"/upgrade", b"/plain"))
    assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out.lower()


class KeepAliveRecorder:
    """An upstream that answers every request head it reads with 200 "ok" and keeps the
    connection: unlike SampleServer (llhttp), it reads on after a declined Upgrade request, as
    many servers do. ``lines`` records every request line."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> KeepAliveRecorder:
        self.threads.append(threading.Thread(target=self._accept, daemon=True))
        self.threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            conn.settimeout(10)
            try:
                while chunk := conn.recv(65536):
                    buf += chunk
                    while b"\r\n\r\n" in buf:
                        head, buf = buf.split(b"\r\n\r\n", 1)
                        self.lines.append(head.split(b"\r\n", 1)[0])
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                return


def test_bytes_after_an_upgrade_request_wait_for_the_101() -> None:
    """An upstream declining the upgrade must never see the bytes that follow its head: they
    would be a request no route, limit or rewrite of ours saw (request smuggling)."""
    with KeepAliveRecorder() as up:
        config = parse_config({"listeners": [{"port": 0}], "admin": {"enabled": False},
                               "pools": {"p": {"servers": [up.address]}},
                               "routes": [{"pool": "p", "path_prefix": "/ws"}]})
        with ProxyServer(config).running() as server:
            addr = server.addresses[0]
            smuggled = b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"
            out = raw(addr, WS_REQUEST.replace(b"/upgrade", b"/ws") + smuggled)
            assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out.lower(), out
            assert out.count(b"HTTP/1.1 ") == 1
            conn = http.client.HTTPConnection(*addr, timeout=10)
            conn.request("GET", "/ws/next")  # on a new upstream connection: the declined one closed
            assert conn.getresponse().read() == b"ok"
    assert up.lines == [b"GET /ws HTTP/1.1", b"GET /ws/next HTTP/1.1"]


def test_upgrade_answered_by_the_proxy_closes_the_connection() -> None:
    with proxy_to_a_dead_upstream() as addr:
        started = time.monotonic()
        out = raw(addr, WS_REQUEST + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 502") and b"connection: close" in out.lower(), out
    assert out.count(b"HTTP/1.1 ") == 1 and time.monotonic() - started < 4  # closed, not left idle


def test_http10_client_gets_a_chunked_response_unchunked_then_close() -> None:
    up = SampleServer()
    with proxy(up) as addr:
        out = raw(addr, b"GET /chunked/1000 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower() and body == b"x" * 1000


def test_http10_request_without_host_gets_the_servers() -> None:
    up = SampleServer()
    with proxy(up) as addr:
        out = raw(addr, b"GET /v HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200"), out
    assert up.requests[0].header(b"host") == up.address.encode()


def test_http10_request_without_host_is_hedged_with_the_servers_host() -> None:
    slow, fast = SampleServer(name="slow", latency=0.5), SampleServer(name="fast")
    routes = [{"pool": "p", "hedge_after": "50ms"}]
    with proxy(slow, fast, pool={"balance": "round_robin"}, routes=routes) as addr:
        started = time.monotonic()
        out = raw(addr, b"GET /c HTTP/1.0\r\n\r\n")  # first to slow, then hedged to fast
        took = time.monotonic() - started
    assert out.startswith(b"HTTP/1.1 200") and b'"server": "fast"' in out, out
    assert took < 0.4
    assert [r.header(b"host") for r in fast.requests] == [fast.address.encode()]


def test_head_timeout_applies_after_an_empty_line_that_followed_a_body() -> None:
    up = SampleServer()
    with proxy(up, limits={"head_timeout": "500ms", "keepalive_timeout": "10s"}) as addr:
        with socket.create_connection(addr, timeout=5) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\r\n")
            out = b""
            while not out.endswith(b"hi"):
                out += sock.recv(65536)
            sock.sendall(b"GET / HTTP/1.1\r\n")  # and nothing more
            started = time.monotonic()
            late = sock.recv(65536)
            assert late.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 3, late


def test_connect_is_refused() -> None:
    up = SampleServer()
    with proxy(up) as addr:
        out = raw(addr, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405") and up.received == 0


def test_stalled_request_body_gets_408_and_nothing_waits_forever() -> None:
    up = SampleServer()
    with proxy(up, limits={"body_timeout": "300ms"}) as addr:
        with socket.create_connection(addr, timeout=5) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
            start = time.monotonic()
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            assert out.startswith(b"HTTP/1.1 408") and b"stalled" in out
            assert 0.25 <= time.monotonic() - start < 3
        # A body that keeps coming, slowly but within the timeout, is fine.
        with socket.create_connection(addr, timeout=5) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
            for byte in b"hello":
                time.sleep(0.15)
                sock.sendall(bytes([byte]))
            assert sock.recv(65536).endswith(b"hello")


def test_connections_beyond_max_connections_are_closed() -> None:
    with proxy(SampleServer(), limits={"max_connections": 2}) as addr:
        held = [socket.create_connection(addr, timeout=5) for _ in range(2)]
        time.sleep(0.1)
        extra = socket.create_connection(addr, timeout=5)
        assert extra.recv(100) == b""
        held[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
        for s in [*held, extra]:
            s.close()


def test_access_log_writes_one_json_line_per_request(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log_path = tmp_path / "access.log"
    up = SampleServer(name="a")
    with ExitStack() as stack:
        stack.enter_context(up.running())
        config = parse_config({
            "listeners": [{"port": 0}], "admin": {"enabled": False},
            "access_log": {"enabled": True, "path": str(log_path), "flush_interval": "50ms"},
            "pools": {"p": {"servers": [up.address]}},
            "routes": [{"name": "api", "pool": "p", "path_prefix": "/api"}],
        })
        server = stack.enter_context(ProxyServer(config).running())
        addr = server.addresses[0]
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/api/items?x=1", headers={"X-Request-ID": "rid-1", "Host": "h.test"})
        body = conn.getresponse().read()
        conn.request("GET", "/nowhere")
        conn.getresponse().read()
        raw(addr, MALFORMED["cl-and-te"])
        eventually(lambda: log_path.exists() and len(log_path.read_text().splitlines()) >= 3,
                   "three access log lines")
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [e["status"] for e in lines] == [200, 404, 400]
    first = lines[0]
    assert first["method"] == "GET" and first["target"] == "/api/items?x=1" and first["host"] == "h.test"
    assert first["route"] == "api" and first["upstream"] == up.address
    assert first["request_id"] == "rid-1" and first["bytes"] == len(body)
    assert first["client"] == "127.0.0.1" and first["duration_ms"] >= 0
    assert first["time"].endswith("Z")
    assert lines[1]["route"] is None and lines[1]["upstream"] is None


def test_absolute_form_target_becomes_origin_form_with_its_authority_as_host() -> None:
    up = SampleServer()
    with proxy(up, routes=[{"pool": "p", "host": "api.test"}]) as addr:
        out = raw(addr, b"GET http://api.test:8080/v1?x=1 HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200")
        assert raw(addr, b"GET ftp://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n").startswith(b"HTTP/1.1 400")
    req = up.requests[0]
    assert req.target == b"/v1?x=1" and req.header(b"host") == b"api.test:8080"
    assert [v for n, v in req.headers if n.lower() == b"host"] == [b"api.test:8080"]


def test_chunked_trailers_are_not_forwarded_as_headers() -> None:
    up = SampleServer()
    with proxy(up) as addr:
        out = raw(addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                        b"3\r\nabc\r\n0\r\nX-Checksum: 123\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"abc")
    assert up.requests[0].header(b"x-checksum") is None


def test_a_client_that_stops_reading_is_dropped_after_send_timeout() -> None:
    up = SampleServer()
    with proxy(up, limits={"send_timeout": "500ms"}) as addr:
        sock = socket.create_connection(addr, timeout=10)
        sock.sendall(b"GET /bytes/200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(2.0)  # read nothing: the proxy's buffer fills, it pauses, then gives up
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        sock.close()
        assert received < 200_000_000, "the proxy gave up on the reader"
        eventually(lambda: not up._connections, "the upstream connection to be released too")


def test_reused_connection_closed_by_the_upstream_is_retried_for_idempotent_requests() -> None:
    up = SampleServer(close_after=1)
    with proxy(up) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        for i in range(4):
            conn.request("GET", f"/get{i}")
            resp = conn.getresponse()
            assert resp.status == 200 and f"/get{i}".encode() in resp.read()
        assert up.accepts >= 4  # every second use of a connection was dropped and retried anew
        statuses = []
        for _ in range(2):
            conn.request("POST", "/echo", body=b"payload")  # has a body: never sent twice
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
    # One of the two POSTs lands on a reused connection the upstream drops: that one is a 502.
    assert sorted(statuses) == [200, 502]
    assert sum(1 for r in up.requests if r.method == b"POST") == 2, "the dropped POST was not retried"


def test_errors_answered_by_the_proxy_carry_a_request_id() -> None:
    with proxy(SampleServer(), routes=[{"pool": "p", "path_prefix": "/api"}]) as addr:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/nowhere", headers={"X-Request-ID": "client-id-7"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404 and resp.getheader("X-Request-ID") == "client-id-7"
        out = raw(addr, MALFORMED["cl-and-te"])
        rid = re.search(rb"X-Request-ID: ([0-9a-f]{32})\r\n", out)
        assert out.startswith(b"HTTP/1.1 400") and rid, out

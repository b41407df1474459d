"""The sample origin server used by the demo and by the data-plane tests, over real sockets."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time

import pytest

from pyproxy.sample_server import SampleServer


def request(
    server: SampleServer, method: str = "GET", path: str = "/", body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, resp


def test_default_answer_names_server_and_path_and_records_the_request() -> None:
    with SampleServer(name="a").running() as s:
        status, data, resp = request(s, path="/v1/x?q=1", headers={"X-Test": "yes"})
        assert status == 200 and json.loads(data) == {"server": "a", "path": "/v1/x"}
        assert resp.getheader("Server") == "pyproxy-sample/a"
        (req,) = s.requests
        assert req.method == b"GET" and req.target == b"/v1/x?q=1"
        assert req.header(b"x-test") == b"yes"
        assert s.accepts == 1 and s.received > 0


def test_echo_bytes_chunked_status_and_head() -> None:
    with SampleServer().running() as s:
        assert request(s, "POST", "/echo", b"hello")[1] == b"hello"
        assert s.requests[-1].body_size == 5
        assert request(s, path="/bytes/200000")[1] == b"x" * 200_000
        status, data, resp = request(s, path="/chunked/70000")
        assert data == b"x" * 70_000 and resp.getheader("Transfer-Encoding") == "chunked"
        assert request(s, path="/status/503")[0] == 503
        assert request(s, path="/status/204")[0] == 204
        status, data, resp = request(s, "HEAD", "/bytes/1000")
        assert status == 200 and data == b"" and resp.getheader("Content-Length") == "1000"


def test_keep_alive_reuses_one_connection() -> None:
    with SampleServer().running() as s:
        conn = http.client.HTTPConnection(s.host, s.port, timeout=10)
        for _ in range(20):
            conn.request("GET", "/")
            assert conn.getresponse().read()
        conn.close()
        assert s.accepts == 1 and len(s.requests) == 20


def test_pipelined_requests_are_answered_in_order() -> None:
    with SampleServer().running() as s:
        with socket.create_connection((s.host, s.port), timeout=10) as sock:
            sock.sendall(
                b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1 200") == 3
        assert data.index(b"/first") < data.index(b"/second") < data.index(b"/third")


def test_latency_is_applied() -> None:
    with SampleServer(latency=0.2).running() as s:
        start = time.monotonic()
        request(s)
        assert time.monotonic() - start >= 0.2


@pytest.mark.parametrize("mode", ["close", "truncate", "malformed"])
def test_failure_modes_break_the_response(mode: str) -> None:
    with SampleServer(mode=mode).running() as s:  # type: ignore[arg-type]
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            request(s)


def test_error_mode_answers_500_and_silent_mode_never_answers() -> None:
    with SampleServer(mode="error").running() as s:
        assert request(s)[0] == 500
        s.mode = "silent"
        with pytest.raises(TimeoutError):
            conn = http.client.HTTPConnection(s.host, s.port, timeout=0.3)
            conn.request("GET", "/")
            conn.getresponse()


def test_bad_request_gets_400_and_close() -> None:
    with SampleServer().running() as s:
        with socket.create_connection((s.host, s.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
            data = sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 400")
            assert sock.recv(65536) == b""


def test_asyncio_use_and_large_upload_is_counted_not_kept() -> None:
    async def main() -> None:
        async with SampleServer(record_body_limit=1024) as s:
            reader, writer = await asyncio.open_connection(s.host, s.port)
            size = 8 * 1024 * 1024
            writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            piece = b"y" * 65536
            for _ in range(size // len(piece)):
                writer.write(piece)
                await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            writer.close()
            req = s.requests[-1]
            assert req.body_size == size and len(req.body) == 1024

    asyncio.run(main())

"""A small HTTP/1.1 origin server: the demo's sample upstreams and the tests' controllable upstream.

It speaks real HTTP/1.1 over real sockets (requests parsed by httptools/llhttp, keep-alive,
pipelined requests answered in order, Content-Length and chunked bodies) and lets its owner change
how it behaves while it runs:

* ``latency`` — seconds to wait before answering each request;
* ``close_after`` — after that many answers on a connection, drop the next request on it unanswered;
* ``mode`` — ``"ok"`` (answer), ``"error"`` (500), ``"close"`` (close without answering),
  ``"truncate"`` (promise a body, send half of it, close), ``"silent"`` (read, never answer),
  ``"malformed"`` (answer with bytes that are not HTTP);
* ``headers`` — extra fields on every plain answer (``Cache-Control``, ``Vary``, ``Cache-Tag``...);
  ``etag`` — plain answers carry it, and a request whose ``If-None-Match`` names it gets 304;
* ``raw`` — answer every request with exactly these bytes, written piece by piece 10 ms apart
  (each arrives as a read of its own), then keep the connection open, or close it if
  ``raw_close``: for testing how a client frames and checks what it receives;
* recording — ``accepts`` counts accepted connections, ``requests`` keeps every parsed request
  (method, target, headers, body size and, up to ``record_body_limit`` bytes, the body), ``received``
  counts every byte read.

Paths with a meaning: ``/echo`` answers with the request body, ``/bytes/N`` with N bytes (streamed
in 64 KiB pieces with backpressure, for large-download tests), ``/chunked/N`` with N bytes chunked,
``/status/NNN`` with that status, ``/upgrade`` (with ``Connection: upgrade``) switches protocols
(101) and then echoes every byte back, like a WebSocket echo server. Anything else answers ``body`` (default: a short JSON naming the
server and the path).

Use from asyncio (``async with SampleServer(...) as s``) or from synchronous code in a thread of
its own (``with SampleServer(...).running() as s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal, cast

import httptools

from pyproxy.loop import in_thread

__all__ = ["Mode", "RecordedRequest", "SampleServer", "sample_servers"]

Mode = Literal["ok", "error", "close", "truncate", "silent", "malformed"]

_PIECE = 64 * 1024


@dataclass
class RecordedRequest:
    """One request as the server received it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body_size: int = 0
    body: bytearray = field(default_factory=bytearray)
    http_version: str = "1.1"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        lower = name.lower()
        return next((v for n, v in self.headers if n.lower() == lower), None)


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer them one at a time, in order."""

    def __init__(self, server: SampleServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: RecordedRequest | None = None
        self.queue: asyncio.Queue[RecordedRequest | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.head_only = False  # answering a HEAD: heads are written, bodies are not
        self.echo = False  # after a 101 on /upgrade: every byte read is written back
        self.early: bytes = b""  # bytes that came with the Upgrade request's head
        self.answered = 0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.server.accepts += 1
        self.server._connections.add(self)
        self.worker = asyncio.get_running_loop().create_task(self._answer_in_order())

    def data_received(self, data: bytes) -> None:
        self.server.received += len(data)
        if self.echo:
            self._write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.early = data[e.args[0] :] if e.args else b""
        except httptools.HttpParserError:
            self._write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self.queue.put_nowait(None)
        self.can_write.set()
        if self.server.mode == "silent" and self.worker is not None:
            self.worker.cancel()  # it waits forever by design

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.current = RecordedRequest(b"", b"", [])

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.method = self.parser.get_method()
        self.current.http_version = self.parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body_size += len(body)
        room = self.server.record_body_limit - len(self.current.body)
        if room > 0:
            self.current.body += body[:room]

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.server.requests.append(self.current)
        self.queue.put_nowait(self.current)
        self.current = None

    # -- answering
    async def _answer_in_order(self) -> None:
        while True:
            request = await self.queue.get()
            if request is None or self.transport is None or self.transport.is_closing():
                return
            keep_alive = await self._answer(request)
            if not keep_alive:
                self._close()
                return

    async def _answer(self, req: RecordedRequest) -> bool:
        """Answer one request; whether the connection stays open."""
        server = self.server
        if server.latency > 0:
            await asyncio.sleep(server.latency)
        mode = server.mode
        if mode == "silent":
            await asyncio.Event().wait()  # until the connection is lost and the task cancelled
        if mode == "close" or (server.close_after is not None and self.answered >= server.close_after):
            return False
        self.answered += 1
        if server.raw is not None:
            for i, piece in enumerate(server.raw):
                if i:
                    await asyncio.sleep(0.01)
                self._write(piece)
            return not server.raw_close
        if mode == "malformed":
            self._write(b"HTTP/1.1 OK-ish\r\nthis is not a header line\r\n\r\n")
            return False
        close = (req.header(b"connection") or b"").lower() == b"close" or req.http_version == "1.0"
        self.head_only = req.method == b"HEAD"
        conn = b"Connection: close\r\n" if close else b""
        path = req.target.split(b"?", 1)[0]
        if mode == "error":
            body = b'{"error": "sample server failure"}'
            self._head(500, [(b"Content-Length", str(len(body)).encode())], conn)
            self._body(body)
            return not close
        if mode == "truncate":
            body = server.body_for(path)
            self._head(200, [(b"Content-Length", str(len(body) + 100).encode())], conn)
            self._body(body[: len(body) // 2])
            return False
        if path == b"/upgrade" and self.parser.should_upgrade():
            self._head(101, [(b"Upgrade", req.header(b"upgrade") or b"echo"), (b"Connection", b"Upgrade")], b"")
            self.echo = True
            if self.early:
                self._write(self.early)
            return True
        if self.parser.should_upgrade():
            close, conn = True, b"Connection: close\r\n"  # llhttp stopped parsing: nothing follows
        if path == b"/echo":
            body = bytes(req.body)
            self._head(200, [(b"Content-Length", str(len(body)).encode())], conn)
            self._body(body)
        elif path.startswith(b"/bytes/") and path[7:].isdigit():
            size = int(path[7:])
            self._head(200, [(b"Content-Length", str(size).encode())], conn)
            await self._stream(size, chunked=False)
        elif path.startswith(b"/chunked/") and path[9:].isdigit():
            self._head(200, [(b"Transfer-Encoding", b"chunked")], conn)
            await self._stream(int(path[9:]), chunked=True)
        elif path.startswith(b"/status/") and path[8:].isdigit():
            status = int(path[8:])
            no_body = status in (204, 304) or 100 <= status < 200
            self._head(status, [] if no_body else [(b"Content-Length", b"0")], conn)
        else:
            fields = list(server.headers)
            if server.etag is not None:
                fields.append((b"ETag", server.etag))
                if server.etag in (t.strip() for t in (req.header(b"if-none-match") or b"").split(b",")):
                    self._head(304, fields, conn)
                    return not close
            body = server.body_for(path)
            self._head(200, [*fields, (b"Content-Length", str(len(body)).encode())], conn)
            self._body(body)
        return not close

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], conn: bytes) -> None:
        lines = [f"HTTP/1.1 {status} {_reason(status)}\r\n".encode()]
        lines += [n + b": " + v + b"\r\n" for n, v in headers]
        lines.append(b"Server: pyproxy-sample/" + self.server.name.encode() + b"\r\n")
        lines.append(conn + b"\r\n")
        self._write(b"".join(lines))

    async def _stream(self, size: int, chunked: bool) -> None:
        if self.head_only:
            return
        piece = b"x" * _PIECE
        left = size
        while left > 0:
            n = min(left, _PIECE)
            data = piece[:n]
            self._write(b"%x\r\n%s\r\n" % (n, data) if chunked else data)
            left -= n
            await self.can_write.wait()  # real backpressure: never buffer a large body
            if self.transport is None or self.transport.is_closing():
                return
        if chunked:
            self._write(b"0\r\n\r\n")

    def _body(self, data: bytes) -> None:
        if not self.head_only:
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class SampleServer:
    """An HTTP/1.1 origin server on ``host:port`` (``port=0``: a free port, see :attr:`port`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "sample",
        latency: float = 0.0,
        body: bytes | None = None,
        mode: Mode = "ok",
        record_body_limit: int = 1 << 20,
        close_after: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.name = name
        self.latency = latency
        self.body = body
        self.mode: Mode = mode
        self.record_body_limit = record_body_limit
        # After this many answers on one connection, the next request on it is read and the
        # connection closed without an answer: a server whose keep-alive timeout races the client's.
        self.close_after = close_after
        self.headers: list[tuple[bytes, bytes]] = []
        self.etag: bytes | None = None
        self.raw: list[bytes] | None = None
        self.raw_close = False
        self.accepts = 0
        self.received = 0
        self.requests: list[RecordedRequest] = []
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    def body_for(self, path: bytes) -> bytes:
        """What a plain request for ``path`` gets."""
        if self.body is not None:
            return self.body
        return json.dumps({"server": self.name, "path": path.decode("latin-1")}).encode()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._connections):
                conn._close()
                if conn.worker is not None:
                    conn.worker.cancel()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> SampleServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[SampleServer]:
        """Serve from a background thread with its own event loop (for synchronous callers)."""
        with in_thread(self.start, self.stop, f"sample-server-{self.name}"):
            yield self


@contextlib.asynccontextmanager
async def sample_servers(*servers: SampleServer) -> AsyncIterator[list[SampleServer]]:
    """Start several servers together and stop them all afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        yield list(servers)

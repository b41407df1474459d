"""The message readers (pyproxy._protocol.RequestReader / ResponseReader): framing, strictness,
and that how the bytes are split into reads never changes what is read."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pyproxy.errors import HeaderError
from pyproxy.headers import CHUNKED, UNTIL_CLOSE, request_framing, response_framing
from pyproxy._protocol import EV_BODY, EV_END, EV_HEAD, EV_MORE, RequestReader, ResponseReader


@dataclass
class Message:
    status: int
    version: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    body: bytes = b""
    interim: list[int] = field(default_factory=list)


def read_all(reads: list[bytes], method: bytes = b"GET", eof: bool = False,
             sequence: bool = False) -> tuple[list[Message], int]:
    """Feed ``reads`` one by one; frame each head as the proxy does. Returns the complete
    messages and the bytes left unread after the last one (``sequence``: bytes after a message
    are the next message's, as on a connection reused after it)."""
    reader = ResponseReader()
    messages: list[Message] = []
    current: Message | None = None
    interim: list[int] = []
    unread = 0
    for data in reads:
        reader.feed(data)
        while (event := reader.next_event()) != EV_MORE:
            if event == EV_HEAD:
                if 100 <= reader.status < 200:
                    interim.append(reader.status)
                    reader.next_head()
                    continue
                current = Message(reader.status, reader.version, reader.reason, reader.headers, reader.keep_alive,
                                  interim=interim)
                interim = []
                reader.expect_body(response_framing(reader.status, reader.headers, method, reader.version == 11))
            elif event == EV_BODY:
                assert current is not None
                current.body += reader.body
            else:
                assert event == EV_END and current is not None
                current.keep_alive = reader.keep_alive
                messages.append(current)
                current = None
                unread = reader.unread
                if unread and not sequence:
                    return messages, unread
                rest = reader.rest()
                reader.reset()
                reader.feed(rest)
    if eof and current is not None and reader.finish():
        current.keep_alive = reader.keep_alive
        messages.append(current)
    return messages, unread


def splits(raw: bytes) -> list[list[bytes]]:
    """The whole message, byte by byte, and cut in two at every offset."""
    out = [[raw], [raw[i : i + 1] for i in range(len(raw))]]
    out += [[raw[:i], raw[i:]] for i in range(1, len(raw))]
    return out


def every_split(raw: bytes) -> pytest.MarkDecorator:
    """Parametrize ``reads`` with :func:`splits` of ``raw``."""
    return pytest.mark.parametrize("reads", splits(raw), ids=lambda r: f"{len(r)}-reads-{len(r[0])}")


CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type:  text/plain \r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"X-Obs: caf\xc3\xa9\tbar\r\n"
    b"\r\n"
    b"5\r\nhello\r\n"
    b"6;name=value;other=\"q;\\\"\";flag\r\n world\r\n"
    b"A\r\n0123456789\r\n"
    b"0\r\n"
    b"Trailer-One: 1\r\n"
    b"Trailer-Two:2\r\n"
    b"\r\n"
)


@every_split(CHUNKED_RESPONSE)
def test_chunked_response_reads_the_same_however_it_is_split(reads: list[bytes]) -> None:
    messages, unread = read_all(reads)
    assert unread == 0
    (m,) = messages
    assert (m.status, m.version, m.reason, m.keep_alive) == (200, 11, b"OK", True)
    assert m.headers == [
        (b"Content-Type", b"text/plain"),  # optional whitespace around the value is not part of it
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Obs", b"caf\xc3\xa9\tbar"),  # obs-text and HTAB are field-value bytes
    ]
    assert m.body == b"hello world0123456789"  # the trailer section is read and dropped


LENGTH_THEN_NEXT = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\nhello world"
    b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n"
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
)


@every_split(LENGTH_THEN_NEXT)
def test_interim_length_and_bodiless_responses_in_sequence(reads: list[bytes]) -> None:
    messages, _ = read_all(reads, sequence=True)
    assert [(m.status, m.body, m.keep_alive, m.interim) for m in messages] == [
        (201, b"hello world", True, [100]),
        (204, b"", True, []),  # 204 has no body whatever Content-Length says (RFC 9112 §6.3)
        (200, b"ok", True, []),  # HTTP/1.0 persists when it says keep-alive
    ]
    assert messages[2].version == 10


def test_a_whole_read_of_body_is_passed_on_without_a_copy() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nabc")
    assert reader.next_event() == EV_HEAD
    reader.expect_body(8)
    assert reader.next_event() == EV_BODY and reader.body == b"abc"
    assert reader.next_event() == EV_MORE
    piece = b"defgh"
    reader.feed(piece)
    assert reader.next_event() == EV_BODY and reader.body is piece
    assert reader.next_event() == EV_END
    assert reader.unread == 0 and reader.keep_alive


def test_bytes_after_the_response_are_left_unread() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert reader.next_event() == EV_HEAD
    reader.expect_body(2)
    assert reader.next_event() == EV_BODY and reader.body == b"ok"
    assert reader.next_event() == EV_END
    assert reader.unread == 5 and reader.rest() == b"EXTRA"
    assert reader.next_event() == EV_MORE  # nothing more until reset()


@pytest.mark.parametrize(
    ("connection", "version", "keep_alive"),
    [
        (None, b"1.1", True),
        (b"close", b"1.1", False),
        (b"Upgrade, CLOSE", b"1.1", False),
        (b"keep-alive", b"1.1", True),
        (None, b"1.0", False),
        (b"Keep-Alive", b"1.0", True),
        (b"keep-alive, close", b"1.0", False),
    ],
)
def test_keep_alive_follows_version_and_connection(connection: bytes | None, version: bytes, keep_alive: bool) -> None:
    field_line = b"Connection: " + connection + b"\r\n" if connection else b""
    raw = b"HTTP/" + version + b" 200 OK\r\n" + field_line + b"Content-Length: 0\r\n\r\n"
    (m,), _ = read_all([raw])
    assert m.keep_alive is keep_alive


def test_body_until_close_ends_with_the_connection() -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst "
    messages, _ = read_all([raw, b"second"], eof=True)
    (m,) = messages
    assert m.body == b"first second" and m.keep_alive is False
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc")
    assert reader.next_event() == EV_HEAD
    reader.expect_body(5)
    assert reader.next_event() == EV_BODY
    assert reader.finish() is False  # a body with a length cut short is not complete


def test_status_line_without_reason_and_head_response() -> None:
    (m,), _ = read_all([b"HTTP/1.1 200\r\nContent-Length: 10\r\n\r\n"], method=b"HEAD")
    assert (m.status, m.reason, m.body) == (200, b"", b"")
    (m,), _ = read_all([b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n"])
    assert (m.status, m.reason) == (404, b"")


def test_switching_protocols_leaves_the_tunnel_bytes() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
    assert reader.next_event() == EV_HEAD and reader.status == 101
    assert reader.rest() == b"\x81\x02hi"


MALFORMED = {
    "bare LF in the status line": b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    "bare LF after a header": b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\r\n",
    "bare LF ends the head": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "tab before colon": b"HTTP/1.1 200 OK\r\nContent-Length\t: 0\r\n\r\n",
    "empty name": b"HTTP/1.1 200 OK\r\n: x\r\nContent-Length: 0\r\n\r\n",
    "no colon": b"HTTP/1.1 200 OK\r\nnot a header\r\nContent-Length: 0\r\n\r\n",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "CR in a value": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    "DEL in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\nContent-Length: 0\r\n\r\n",
    "non-token name": b"HTTP/1.1 200 OK\r\nX(A): a\r\nContent-Length: 0\r\n\r\n",
    "CTL in the reason": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
    "HTTP/2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.2": b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "lower-case protocol": b"http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status 099": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "two-digit status": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "four-digit status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "two spaces after version": b"HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n",
    "leading empty line": b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "not HTTP": b"SSH-2.0-OpenSSH\r\n\r\n",
    "chunk size not hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "empty chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n",
    "signed chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    "0x chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "space after chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
    "space before an extension": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 ;a=b\r\nhello\r\n0\r\n\r\n",
    "extension without a name": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;\r\nhello\r\n0\r\n\r\n",
    "space in an extension": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a = b\r\nhello\r\n0\r\n\r\n",
    "extension without a value": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\r\nhello\r\n0\r\n\r\n",
    "unterminated quote": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\"b\r\nhello\r\n0\r\n\r\n",
    "non-token extension": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a:b\r\nhello\r\n0\r\n\r\n",
    "overlong chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8000000000000000\r\nhello\r\n",
    "empty Transfer-Encoding element": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
    "CTL in a chunk extension": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\x01\r\nhello\r\n0\r\n\r\n",
    "bare LF after a chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "chunk data too long": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello!\r\n0\r\n\r\n",
    "chunk data without CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
    "obs-fold in a trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA: 1\r\n 2\r\n\r\n",
    "NUL in a trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA: \x00\r\n\r\n",
    "both framings": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    "signed length": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_responses_are_errors_however_they_are_split(raw: bytes) -> None:
    for reads in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
        with pytest.raises(HeaderError) as info:
            read_all(reads)
        assert info.value.status == 502


def test_head_and_header_count_limits() -> None:
    reader = ResponseReader(max_head=1024, max_headers=3)
    reader.feed(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 1100)
    with pytest.raises(HeaderError, match="too large"):
        reader.next_event()
    reader = ResponseReader(max_head=1024, max_headers=3)
    for piece in (b"HTTP/1.1 200 OK\r\n", b"X-Big: " + b"a" * 600):  # incomplete, under the limit
        reader.feed(piece)
        assert reader.next_event() == EV_MORE
    reader.feed(b"a" * 600)  # over it, still incomplete
    with pytest.raises(HeaderError, match="too large"):
        reader.next_event()
    reader = ResponseReader(max_head=1024, max_headers=3)
    reader.feed(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(4)) + b"\r\n")
    with pytest.raises(HeaderError, match="more than 3 header lines"):
        reader.next_event()
    reader = ResponseReader(max_head=1024, max_headers=3)
    reader.feed(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(3)) + b"\r\n")
    assert reader.next_event() == EV_HEAD and len(reader.headers) == 3


def test_chunk_line_and_trailer_limits() -> None:
    reader = ResponseReader(max_head=1024)
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"e" * 5000)
    assert reader.next_event() == EV_HEAD
    reader.expect_body(CHUNKED)
    with pytest.raises(HeaderError, match="chunk-size line too long"):
        reader.next_event()
    reader = ResponseReader(max_head=1024)
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"T: v\r\n" * 200)
    assert reader.next_event() == EV_HEAD
    reader.expect_body(CHUNKED)
    with pytest.raises(HeaderError, match="trailer section too large"):
        reader.next_event()


def test_misuse_is_a_clear_error() -> None:
    reader = ResponseReader()
    with pytest.raises(RuntimeError, match="expect_body"):
        reader.expect_body(0)
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    assert reader.next_event() == EV_HEAD
    with pytest.raises(RuntimeError, match="expect_body"):
        reader.next_event()
    with pytest.raises(ValueError, match="invalid framing"):
        reader.expect_body(-7)
    reader.expect_body(UNTIL_CLOSE)
    assert reader.next_event() == EV_MORE and reader.keep_alive is False


# --- requests ------------------------------------------------------------------------------------


@dataclass
class Request:
    method: bytes
    target: bytes
    version: int
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    upgrade: bool
    body: bytes = b""


def read_requests(reads: list[bytes], **limits: int) -> list[Request]:
    """Feed ``reads`` one by one, framing each request as the proxy does; pipelined requests are
    read on from where the previous one ended."""
    reader = RequestReader(**limits)
    out: list[Request] = []
    for data in reads:
        reader.feed(data)
        while (event := reader.next_event()) != EV_MORE:
            if event == EV_HEAD:
                out.append(Request(reader.method, reader.target, reader.version, reader.headers,
                                   reader.keep_alive, reader.upgrade))
                reader.expect_body(request_framing(reader.headers, reader.version == 11))
            elif event == EV_BODY:
                out[-1].body += reader.body
            else:
                assert event == EV_END
                reader.next_message()
    return out


PIPELINE = (
    b"\r\n"  # an empty line before a request line is skipped (RFC 9112 §2.2)
    b"GET /a?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;e=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
    b"\r\n"
    b"PUT /c HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello"
    b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\nProxy-Connection: close\r\nUpgrade: h2c\r\n\r\n"
)


@every_split(PIPELINE)
def test_pipelined_requests_read_the_same_however_they_are_split(reads: list[bytes]) -> None:
    requests = read_requests(reads)
    assert [(r.method, r.target, r.version, r.body, r.keep_alive, r.upgrade) for r in requests] == [
        (b"GET", b"/a?q=1", 11, b"", True, False),
        (b"POST", b"/b", 11, b"abcdefg", True, False),
        (b"PUT", b"/c", 10, b"hello", True, False),
        (b"GET", b"/chat", 11, b"", True, True),  # an Upgrade field and the "upgrade" option
        (b"OPTIONS", b"*", 11, b"", False, False),  # Proxy-Connection counts; Upgrade alone does not
    ]
    assert requests[1].headers == [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked")]  # no trailer


MALFORMED_REQUESTS = {
    "bare LF": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "bare LF before the request line": (b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "CR alone before the request line": (b"\rGET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "HTTP/0.9": (b"GET /\r\n\r\n", 400),
    "two spaces": (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "space in the target": (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "tab in the target": (b"GET /a\tb HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "NUL in the target": (b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "trailing space": (b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", 400),
    "non-token method": (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "lower-case protocol": (b"GET / http/1.1\r\nHost: x\r\n\r\n", 400),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 400),
    "HTTP/3.0": (b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 400),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "HTTP/1.10": (b"GET / HTTP/1.10\r\nHost: x\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    "space before the first header": (b"GET / HTTP/1.1\r\n Host: x\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "vertical tab in a value": (b"GET / HTTP/1.1\r\nHost: x\r\nX: \x0bv\r\n\r\n", 400),
    "Content-Length in a trailer": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n", 400),
    "Transfer-Encoding in a trailer": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\ntransfer-encoding: x\r\n\r\n", 400),
    "chunk size with a trailing space": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    "chunk data overrun": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_REQUESTS))
def test_malformed_requests_are_errors_however_they_are_split(name: str) -> None:
    raw, status = MALFORMED_REQUESTS[name]
    for reads in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
        with pytest.raises(HeaderError) as info:
            read_requests(reads)
        assert info.value.status == status, (name, str(info.value))


def test_request_size_limits_are_431_and_414() -> None:
    with pytest.raises(HeaderError, match="more than 3 header lines") as info:
        read_requests([b"GET / HTTP/1.1\r\n" + b"X: v\r\n" * 4 + b"\r\n"], max_headers=3)
    assert info.value.status == 431
    assert len(read_requests([b"GET / HTTP/1.1\r\n" + b"X: v\r\n" * 3 + b"\r\n"], max_headers=3)[0].headers) == 3
    with pytest.raises(HeaderError, match="request head too large") as info:
        read_requests([b"GET / HTTP/1.1\r\nX: " + b"v" * 600, b"v" * 600], max_head=1024)
    assert info.value.status == 431
    with pytest.raises(HeaderError, match="request head too large") as info:
        read_requests([b"GET / HTTP/1.1\r\nX: " + b"v" * 1100 + b"\r\n\r\n"], max_head=1024)
    assert info.value.status == 431
    with pytest.raises(HeaderError, match="request line too long") as info:
        read_requests([b"GET /" + b"a" * 700, b"a" * 700], max_head=1024)
    assert info.value.status == 414
    with pytest.raises(HeaderError, match="trailer section too large") as info:
        read_requests([b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"T: v\r\n" * 200],
                      max_head=1024)
    assert info.value.status == 431


def test_a_request_body_read_whole_is_not_copied() -> None:
    reader = RequestReader()
    reader.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    assert reader.next_event() == EV_HEAD
    reader.expect_body(10)
    assert reader.next_event() == EV_MORE and reader.head_pending == 0
    piece = b"0123456789"
    reader.feed(piece)
    assert reader.next_event() == EV_BODY and reader.body is piece
    assert reader.next_event() == EV_END


def test_head_pending_counts_an_incomplete_head() -> None:
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHo")
    assert reader.next_event() == EV_MORE and reader.head_pending == 18
    reader.feed(b"st: x\r\n\r\nGET /next")
    assert reader.next_event() == EV_HEAD and reader.method == b"GET"
    reader.expect_body(0)
    assert reader.next_event() == EV_END
    reader.next_message()
    assert reader.next_event() == EV_MORE and reader.head_pending == 9


def test_fields_are_made_into_a_list_only_when_asked_for() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nA: 1\r\nB:2 \r\n\r\n")
    assert reader.next_event() == EV_HEAD
    first = reader.headers
    assert first == [(b"A", b"1"), (b"B", b"2")] and reader.headers is first  # made once
    reader.release_head()
    assert reader.headers is first  # made before the release: kept
    reader.reset()
    reader.feed(b"HTTP/1.1 204 No Content\r\nC: 3\r\n\r\n")
    assert reader.next_event() == EV_HEAD
    reader.release_head()
    with pytest.raises(RuntimeError, match="released"):
        reader.headers  # noqa: B018 - asked for after its bytes were let go: an error, not []
    assert reader.fields.content_length is None and reader.status == 204


def test_leading_zeros_of_a_chunk_size_are_not_its_length() -> None:
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000000003\r\nabc\r\n0\r\n\r\n"
    assert read_requests([raw])[0].body == b"abc"


def test_empty_lines_before_a_request_count_as_its_head() -> None:
    reader = RequestReader(max_head=64)
    reader.feed(b"\r\n\r\n")
    assert reader.next_event() == EV_MORE and reader.head_pending == 4  # (the head timer keeps running)
    reader.feed(b"\r\n" * 40)
    with pytest.raises(HeaderError, match="too many empty lines") as info:
        reader.next_event()
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("value", "keep_alive"), [(b'", close', False), (b'"a\\", close', False), (b"keep-alive , x", True)]
)
def test_connection_options_are_split_at_every_comma(value: bytes, keep_alive: bool) -> None:
    """Options are tokens: a quote does not make a quoted-string that could hide "close"."""
    (r,) = read_requests([b"GET / HTTP/1.1\r\nHost: x\r\nConnection: " + value + b"\r\n\r\n"])
    assert r.keep_alive is keep_alive


def test_a_bad_final_head_after_an_interim_one_leaves_no_fields_of_either() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 100 Continue\r\n" + b"".join(b"X-Name-%02d: %s\r\n" % (i, b"v" * 40) for i in range(8)) + b"\r\n")
    assert reader.next_event() == EV_HEAD
    reader.next_head()
    reader.feed(b"HTTP/1.1 2x0 OK\r\n\r\n")
    with pytest.raises(HeaderError):
        reader.next_event()
    _ = [bytes(200) for _ in range(200)]  # reuse the interim head's memory, if it was freed
    assert reader.headers == []

"""Message framing (RFC 9112 §6): what delimits a body, and every ambiguous case refused."""

from __future__ import annotations

import pytest

from pyproxy.errors import HeaderError
from pyproxy.headers import CHUNKED, UNTIL_CLOSE, request_framing, response_framing

H = list[tuple[bytes, bytes]]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], 0),
        ([(b"Host", b"a")], 0),
        ([(b"Content-Length", b"42")], 42),
        ([(b"content-length", b" 0 ")], 0),
        ([(b"Content-Length", b"007")], 7),
        ([(b"Content-Length", b"999999999999999999")], 999_999_999_999_999_999),
        ([(b"Transfer-Encoding", b"chunked")], CHUNKED),
        ([(b"transfer-encoding", b"Chunked")], CHUNKED),
        ([(b"Transfer-Encoding", b" chunked ")], CHUNKED),
    ],
)
def test_request_framing(headers: H, expected: int) -> None:
    assert request_framing(headers) == expected


@pytest.mark.parametrize(
    ("headers", "status", "match"),
    [
        ([(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], 400, "both"),
        ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")], 400, "both"),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"5")], 400, "duplicate"),
        ([(b"Content-Length", b"5, 5")], 400, "invalid Content-Length"),
        ([(b"Content-Length", b"+5")], 400, "invalid"),
        ([(b"Content-Length", b"-1")], 400, "invalid"),
        ([(b"Content-Length", b"5 5")], 400, "invalid"),
        ([(b"Content-Length", b"0x10")], 400, "invalid"),
        ([(b"Content-Length", b"")], 400, "invalid"),
        ([(b"Content-Length", "５".encode())], 400, "invalid"),
        ([(b"Content-Length", b"9" * 19)], 400, "too large"),
        ([(b"Transfer-Encoding", b"gzip")], 400, "final"),
        ([(b"Transfer-Encoding", b"chunked, gzip")], 400, "final"),
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], 400, "more than once"),
        ([(b"Transfer-Encoding", b"gzip, chunked")], 501, "not supported"),
        # empty list elements: RFC 9110 would skip them, but parsers disagree (llhttp refuses)
        ([(b"Transfer-Encoding", b"")], 400, "empty element"),
        ([(b"Transfer-Encoding", b" chunked ,")], 400, "empty element"),
        ([(b"Transfer-Encoding", b"chunked,,")], 400, "empty element"),
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b" ")], 400, "empty element"),
        ([(b"Transfer-Encoding", b"xchunked")], 400, "final"),
    ],
)
def test_request_framing_refuses(headers: H, status: int, match: str) -> None:
    with pytest.raises(HeaderError, match=match) as e:
        request_framing(headers)
    assert e.value.status == status


def test_transfer_encoding_in_http10_request_is_refused() -> None:
    with pytest.raises(HeaderError, match="HTTP/1.0") as e:
        request_framing([(b"Transfer-Encoding", b"chunked")], http11=False)
    assert e.value.status == 400
    assert request_framing([(b"Content-Length", b"3")], http11=False) == 3


@pytest.mark.parametrize(
    ("status", "method", "headers", "expected"),
    [
        (200, b"GET", [(b"Content-Length", b"10")], 10),
        (200, b"GET", [(b"Transfer-Encoding", b"chunked")], CHUNKED),
        (200, b"GET", [], UNTIL_CLOSE),
        (200, b"HEAD", [(b"Content-Length", b"10")], 0),
        (204, b"GET", [(b"Content-Length", b"10")], 0),
        (304, b"GET", [(b"Transfer-Encoding", b"chunked")], 0),
        (101, b"GET", [], 0),
        (100, b"POST", [], 0),
        (200, b"CONNECT", [(b"Content-Length", b"10")], 0),
        (407, b"CONNECT", [(b"Content-Length", b"10")], 10),
        (500, b"POST", [(b"Content-Length", b"0")], 0),
    ],
)
def test_response_framing(status: int, method: bytes, headers: H, expected: int) -> None:
    assert response_framing(status, headers, method) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Content-Length", b"5"), (b"Content-Length", b"6")],
        [(b"Content-Length", b"five")],
        [(b"Transfer-Encoding", b"gzip")],
        [(b"Transfer-Encoding", b"gzip, chunked")],
    ],
)
def test_malformed_response_framing_is_a_502(headers: H) -> None:
    with pytest.raises(HeaderError) as e:
        response_framing(200, headers, b"GET")
    assert e.value.status == 502

"""pyproxy.headers: validation, lists, lookups, serialization and the forwarding rewrites.

Every behaviour test runs against both implementations (the Cython ``pyproxy._speedups`` and the
plain-Python ``py_*`` reference in ``pyproxy.headers``); hypothesis then feeds both the same random
inputs — invalid bytes included — and requires identical outputs or identical errors, and checks
with httptools (llhttp) that what the rewrite emits parses back with the promised headers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyproxy import _speedups, headers
from pyproxy.headers import HeaderError

NAMES = [
    "validate_name",
    "validate_value",
    "validate_headers",
    "split_list",
    "get_first",
    "get_all",
    "get_list",
    "connection_tokens",
    "reason_phrase",
    "new_request_id",
    "serialize_request_head",
    "serialize_response_head",
    "rewrite_request_head",
    "rewrite_response_head",
]
PY = SimpleNamespace(**{n: getattr(headers, "py_" + n) for n in NAMES})
CY = SimpleNamespace(**{n: getattr(_speedups, n) for n in NAMES})

TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
HOP = [b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE", b"Transfer-Encoding",
       b"Content-Length", b"Proxy-Authorization", b"Proxy-Authenticate", b"Upgrade"]
RID = re.compile(rb"[0-9a-f]{32}")


@pytest.fixture(params=["cython", "python"])
def h(request: pytest.FixtureRequest) -> Any:
    return CY if request.param == "cython" else PY


def lines(head: bytes) -> list[bytes]:
    """The header lines of a serialized head (no start line, no final CRLF)."""
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")[1:]


def req(h: Any, hdrs: list[tuple[bytes, bytes]], **kw: Any) -> tuple[bytes, bytes]:
    kw.setdefault("client", b"192.0.2.1")
    result: tuple[bytes, bytes] = h.rewrite_request_head(b"GET", b"/", hdrs, **kw)
    return result


# --- facade -------------------------------------------------------------------------------------

def test_facade_exports_the_cython_functions() -> None:
    assert headers.IMPLEMENTATION == "cython"
    for name in NAMES:
        assert getattr(headers, name) is getattr(_speedups, name)
    # Framing and request values are one implementation over the facade (not twinned); the rest
    # are the twins.
    single = {"CHUNKED", "UNTIL_CLOSE", "request_framing", "response_framing", "request_value"}
    assert set(headers.__all__) == set(NAMES) | {"IMPLEMENTATION", "HeaderError"} | single


def test_facade_falls_back_to_python_when_asked() -> None:
    code = (
        "from pyproxy import headers as h; "
        "print(h.IMPLEMENTATION, h.rewrite_request_head is h.py_rewrite_request_head)"
    )
    env = dict(os.environ, PYPROXY_NO_SPEEDUPS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["python", "True"]


def test_header_error_is_a_value_error_naming_the_header() -> None:
    with pytest.raises(HeaderError) as info:
        CY.validate_value(b"a\nb", b"X-Foo")
    assert isinstance(info.value, ValueError)
    assert info.value.name == b"X-Foo"
    assert str(info.value) == "invalid value for header b'X-Foo': LF (0x0a) at offset 1"


# --- validation ---------------------------------------------------------------------------------

def test_every_tchar_is_accepted(h: Any) -> None:
    h.validate_name(TCHARS)
    for b in TCHARS:
        h.validate_name(bytes([b]))
    h.validate_headers([(TCHARS, b"v")])


@pytest.mark.parametrize("b", [b for b in range(256) if b not in TCHARS])
def test_every_non_tchar_is_rejected_in_names(h: Any, b: int) -> None:
    name = b"X-" + bytes([b]) + b"y"
    with pytest.raises(HeaderError) as info:
        h.validate_name(name)
    assert info.value.name == name
    assert f"(0x{b:02x}) at offset 2 is not a token character" in str(info.value)
    with pytest.raises(HeaderError):
        h.validate_headers([(b"Ok", b"v"), (name, b"v")])


@pytest.mark.parametrize(
    ("name", "kind"),
    [(b"A B", "space"), (b"A:B", "separator"), (b"A\x00", "NUL"), (b"A\r", "CR"), (b"A\n", "LF"),
     (b"A\x7f", "DEL"), (b"A\x01", "control character"), (b"A\t", "HTAB"),
     (b"A\xe9", "non-ASCII byte"), (b'A"', "separator"), (b"A(", "separator")],
)
def test_name_errors_name_the_problem(h: Any, name: bytes, kind: str) -> None:
    with pytest.raises(HeaderError, match=re.escape(f"{kind} (0x{name[1]:02x}) at offset 1")):
        h.validate_name(name)


def test_empty_name_is_rejected(h: Any) -> None:
    with pytest.raises(HeaderError, match="^empty header name$"):
        h.validate_name(b"")
    with pytest.raises(HeaderError, match="^empty header name$"):
        h.validate_headers([(b"", b"v")])


@pytest.mark.parametrize("b", range(256))
def test_value_bytes(h: Any, b: int) -> None:
    value = b"ab" + bytes([b]) + b"cd"
    allowed = b == 0x09 or 0x20 <= b < 0x7F or b >= 0x80
    if allowed:
        h.validate_value(value)
        h.validate_headers([(b"X", value)])
        return
    with pytest.raises(HeaderError) as info:
        h.validate_value(value, b"X-Name")
    kind = {0: "NUL", 0x0D: "CR", 0x0A: "LF", 0x7F: "DEL"}.get(b, "control character")
    assert str(info.value) == (
        f"invalid value for header b'X-Name': {kind} (0x{b:02x}) at offset 2"
    )


@pytest.mark.parametrize("b", [b for b in range(256) if not (b == 0x09 or 0x20 <= b < 0x7F or b >= 0x80)] + [0x09, 0x20, 0x7E, 0x80, 0xFF])
def test_value_bytes_at_every_offset_of_long_values(h: Any, b: int) -> None:
    """The compiled check reads eight bytes at a time: a byte at any offset of a value longer than
    a word (before, inside, across and after the words), the first bad one reported; an HTAB or
    obs-text inside a word is fine."""
    allowed = b == 0x09 or 0x20 <= b < 0x7F or b >= 0x80
    for length in (8, 9, 16, 23, 24, 31):
        for at in range(length):
            value = bytearray(b"v\xe9" * length)[:length]
            value[at] = b
            if allowed:
                h.validate_value(bytes(value))
                continue
            if at + 3 < length:
                value[at + 3] = 0x00  # a second bad byte later: the first one is reported
            with pytest.raises(HeaderError, match=f"at offset {at}$"):
                h.validate_value(bytes(value), b"X")


def test_empty_and_whitespace_values_are_valid(h: Any) -> None:
    h.validate_headers([(b"A", b""), (b"B", b" \t "), (b"C", b"\x80\xff")])


def test_first_problem_is_reported(h: Any) -> None:
    with pytest.raises(HeaderError, match="b'Bad'"):
        h.validate_headers([(b"Ok", b"1"), (b"Bad", b"\x00\r"), (b"Bad Name", b"x")])


def test_non_bytes_are_type_errors(h: Any) -> None:
    with pytest.raises(TypeError):
        h.validate_headers([("Host", b"x")])
    with pytest.raises(TypeError):
        h.validate_headers([(b"Host", "x")])
    with pytest.raises(TypeError):
        h.validate_name("Host")
    with pytest.raises(TypeError):
        h.get_first([(b"a", b"b")], "a")


# --- lists and lookups --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "elements"),
    [
        (b"", []),
        (b"a", [b"a"]),
        (b" a ,\tb\t, c", [b"a", b"b", b"c"]),
        (b",, a ,, ,b,", [b"a", b"b"]),
        (b' , \t ,', []),
        (b'a, "b, c", d', [b"a", b'"b, c"', b"d"]),
        (b'x="a\\", b", y', [b'x="a\\", b"', b"y"]),
        (b'"unterminated, still one', [b'"unterminated, still one']),
        (b'a;q="1,2";r=3, b', [b'a;q="1,2";r=3', b"b"]),
    ],
)
def test_split_list(h: Any, value: bytes, elements: list[bytes]) -> None:
    assert h.split_list(value) == elements


HDRS = [
    (b"Host", b"example.com"),
    (b"Accept", b"text/html, application/json"),
    (b"ACCEPT", b"*/*;q=0.1"),
    (b"Connection", b"Keep-Alive, X-Trace"),
    (b"connection", b" close ,,"),
    (b"X-Empty", b""),
]


def test_lookups_are_case_insensitive(h: Any) -> None:
    assert h.get_first(HDRS, b"accept") == b"text/html, application/json"
    assert h.get_first(HDRS, b"HOST") == b"example.com"
    assert h.get_first(HDRS, b"missing") is None
    assert h.get_first(HDRS, b"x-empty") == b""
    assert h.get_all(HDRS, b"Accept") == [b"text/html, application/json", b"*/*;q=0.1"]
    assert h.get_all(HDRS, b"nothing") == []
    assert h.get_list(HDRS, b"accept") == [b"text/html", b"application/json", b"*/*;q=0.1"]
    assert h.connection_tokens(HDRS) == frozenset({b"keep-alive", b"x-trace", b"close"})
    assert h.connection_tokens([]) == frozenset()
    assert h.get_first(iter(HDRS), b"Host") == b"example.com"  # any iterable of pairs


def test_reason_phrases(h: Any) -> None:
    assert h.reason_phrase(200) == b"OK"
    assert h.reason_phrase(404) == b"Not Found"
    assert h.reason_phrase(599) == b""
    with pytest.raises(ValueError):
        h.reason_phrase(99)
    with pytest.raises(ValueError):
        h.reason_phrase(1000)
    with pytest.raises(TypeError):
        h.reason_phrase(True)


# --- serialization ------------------------------------------------------------------------------

def test_serialize_request_head_exact(h: Any) -> None:
    head = h.serialize_request_head(
        b"POST", b"/api/v1/items?x=1",
        [(b"Host", b"api.example"), (b"content-TYPE", b"application/json"), (b"X-A", b"1"),
         (b"x-a", b"2"), (b"Content-Length", b"2")],
    )
    assert head == (
        b"POST /api/v1/items?x=1 HTTP/1.1\r\nHost: api.example\r\n"
        b"content-TYPE: application/json\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 2\r\n\r\n"
    )
    assert h.serialize_request_head(b"OPTIONS", b"*", []) == b"OPTIONS * HTTP/1.1\r\n\r\n"


def test_serialize_response_head_exact(h: Any) -> None:
    assert h.serialize_response_head(404, None, [(b"Content-Length", b"0")]) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    )
    assert h.serialize_response_head(200, b"Fine\tthanks", []) == (
        b"HTTP/1.1 200 Fine\tthanks\r\n\r\n"
    )
    assert h.serialize_response_head(599, b"", []) == b"HTTP/1.1 599 \r\n\r\n"


@pytest.mark.parametrize(
    ("method", "target", "message"),
    [
        (b"", b"/", "empty method"),
        (b"GE T", b"/", "invalid method b'GE T': space (0x20) at offset 2"),
        (b"GET", b"", "empty request target"),
        (b"GET", b"/a b", "invalid request target: space (0x20) at offset 2"),
        (b"GET", b"/a\r\nX: y", "invalid request target: CR (0x0d) at offset 2"),
        (b"GET", b"/\x7f", "invalid request target: DEL (0x7f) at offset 1"),
    ],
)
def test_request_line_is_validated(h: Any, method: bytes, target: bytes, message: str) -> None:
    with pytest.raises(HeaderError, match="^" + re.escape(message)):
        h.serialize_request_head(method, target, [])
    with pytest.raises(HeaderError, match="^" + re.escape(message)):
        h.rewrite_request_head(method, target, [(b"Host", b"h")], client=b"c")


def test_status_line_is_validated(h: Any) -> None:
    with pytest.raises(HeaderError, match=re.escape("reason phrase: LF (0x0a) at offset 2")):
        h.serialize_response_head(200, b"OK\nX: y", [])
    with pytest.raises(ValueError, match="3-digit"):
        h.serialize_response_head(42, None, [])
    with pytest.raises(TypeError):
        h.serialize_response_head("200", None, [])
    with pytest.raises(TypeError):
        h.serialize_response_head(200, "OK", [])


def test_serialize_validates_headers(h: Any) -> None:
    with pytest.raises(HeaderError, match="b'X'"):
        h.serialize_request_head(b"GET", b"/", [(b"X", b"a\r\nInjected: 1")])
    with pytest.raises(HeaderError):
        h.serialize_response_head(200, None, [(b"Bad:Name", b"v")])


# --- request rewrite ----------------------------------------------------------------------------

def test_rewrite_request_exact(h: Any) -> None:
    head, rid = h.rewrite_request_head(
        b"POST", b"/upload",
        [
            (b"Host", b"app.example"),
            (b"User-Agent", b"curl/8"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"TE", b"trailers"),
            (b"X-Forwarded-For", b"198.51.100.1"),
            (b"X-Forwarded-Proto", b"ftp"),
            (b"Via", b"1.0 edge"),
            (b"Accept", b"*/*"),
        ],
        client=b"203.0.113.9", proto=b"https", request_id=b"req-1", content_length=12,
    )
    assert rid == b"req-1"
    assert head == (
        b"POST /upload HTTP/1.1\r\n"
        b"Host: app.example\r\n"
        b"User-Agent: curl/8\r\n"
        b"Accept: */*\r\n"
        b"X-Forwarded-For: 198.51.100.1, 203.0.113.9\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: app.example\r\n"
        b"Via: 1.0 edge, 1.1 pyproxy\r\n"
        b"X-Request-ID: req-1\r\n"
        b"Content-Length: 12\r\n"
        b"\r\n"
    )


def test_standard_hop_by_hop_headers_are_removed(h: Any) -> None:
    hdrs = [(b"Host", b"h")] + [(n, b"x") for n in HOP] + [(n.lower(), b"y") for n in HOP]
    hdrs += [(b"Trailer", b"Expires"), (b"Expect", b"100-continue")]
    head, _ = req(h, hdrs, request_id=b"r")
    names = [line.split(b":")[0].lower() for line in lines(head)]
    assert not set(names) & {n.lower() for n in HOP}
    assert b"trailer" in names and b"expect" in names  # end-to-end, passed through


def test_connection_named_headers_are_removed_in_any_case_and_order(h: Any) -> None:
    hdrs = [
        (b"Host", b"h"),
        (b"x-before", b"1"),          # named by a Connection line that comes later
        (b"Connection", b" , X-Before ,,\tX-AFTER ,"),
        (b"X-After", b"2"),
        (b"CONNECTION", b"x-second"),
        (b"X-Second", b"3"),
        (b"X-Kept", b"4"),
        (b"X-Before-Not", b"5"),      # a prefix match is not a match
    ]
    head, _ = req(h, hdrs, request_id=b"r")
    kept = [line for line in lines(head) if line.lower().startswith(b"x-") and b"forwarded" not in
            line.lower() and b"request-id" not in line.lower()]
    assert kept == [b"X-Kept: 4", b"X-Before-Not: 5"]


def test_connection_cannot_remove_managed_headers(h: Any) -> None:
    hdrs = [
        (b"Host", b"h"),
        (b"Connection", b"host, x-forwarded-for, forwarded, via, x-request-id, upgrade"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"Forwarded", b"for=10.0.0.1"),
        (b"Via", b"1.1 front"),
        (b"X-Request-ID", b"abc"),
        (b"Upgrade", b"websocket"),
    ]
    head, rid = req(h, hdrs, upgrade=True)
    assert rid == b"abc"
    assert lines(head) == [
        b"Host: h",
        b"Forwarded: for=10.0.0.1",
        b"Upgrade: websocket",
        b"X-Forwarded-For: 10.0.0.1, 192.0.2.1",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: h",
        b"Via: 1.1 front, 1.1 pyproxy",
        b"X-Request-ID: abc",
        b"Connection: upgrade",
    ]


def test_upgrade_is_dropped_unless_tunnelling(h: Any) -> None:
    hdrs = [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    head, _ = req(h, hdrs, request_id=b"r")
    assert b"pgrade" not in head
    head, _ = req(h, [(b"Host", b"h")], request_id=b"r", upgrade=True)
    assert b"Connection" not in head  # nothing to tunnel: no Connection: upgrade


def test_xff_combines_every_prior_line_in_order(h: Any) -> None:
    hdrs = [
        (b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2"),
        (b"Host", b"h"),
        (b"x-forwarded-for", b" 3.3.3.3 ,, "),
        (b"X-FORWARDED-FOR", b""),
        (b"X-Forwarded-For", b"2001:db8::1"),
    ]
    head, _ = req(h, hdrs, client=b"203.0.113.5", request_id=b"r")
    xff = [line for line in lines(head) if line.lower().startswith(b"x-forwarded-for")]
    assert xff == [b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 3.3.3.3, 2001:db8::1, 203.0.113.5"]
    head, _ = req(h, [(b"Host", b"h")], client=b"::1", request_id=b"r")
    assert b"\r\nX-Forwarded-For: ::1\r\n" in head


def test_forwarded_proto_and_host_are_set_not_trusted(h: Any) -> None:
    hdrs = [(b"Host", b"public.example"), (b"X-Forwarded-Host", b"evil"),
            (b"X-Forwarded-Proto", b"https")]
    head, _ = req(h, hdrs, proto=b"http", host=b"backend:8080", request_id=b"r")
    assert lines(head)[:4] == [
        b"Host: backend:8080",                  # replaced in place
        b"X-Forwarded-For: 192.0.2.1",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: public.example",    # the received Host
    ]


def test_via_appends_to_every_prior_value(h: Any) -> None:
    hdrs = [(b"Host", b"h"), (b"Via", b"1.0 a, 1.1 b (Apache/2)"), (b"via", b" "),
            (b"VIA", b"2 c")]
    head, _ = req(h, hdrs, via=b"1.1 gw", request_id=b"r")
    assert b"\r\nVia: 1.0 a, 1.1 b (Apache/2), 2 c, 1.1 gw\r\n" in head
    head, _ = req(h, hdrs, via=None, request_id=b"r")
    assert [line for line in lines(head) if line.lower().startswith(b"via")] == [
        b"Via: 1.0 a, 1.1 b (Apache/2)", b"via:  ", b"VIA: 2 c"]


def test_request_id_kept_replaced_or_generated(h: Any) -> None:
    base = [(b"Host", b"h")]
    head, rid = req(h, base + [(b"x-request-id", b" client-id "), (b"X-Request-ID", b"2nd")])
    assert rid == b"client-id"
    assert lines(head)[-1] == b"X-Request-ID: client-id"
    _, rid = req(h, base + [(b"X-Request-ID", b"client-id")], request_id=b"mine")
    assert rid == b"mine"
    head, rid = req(h, base + [(b"X-Request-ID", b"  ")])
    assert RID.fullmatch(rid)
    assert head.count(b"X-Request-ID") == 1 and head.endswith(b"X-Request-ID: " + rid + b"\r\n\r\n")
    ids = {req(h, base)[1] for _ in range(2000)}  # crosses several random-pool refills
    assert len(ids) == 2000 and all(RID.fullmatch(i) for i in ids)
    assert RID.fullmatch(h.new_request_id())
    head, rid = req(h, base + [(b"X-Correlation-ID", b"cid")], request_id_header=b"x-correlation-id")
    assert rid == b"cid" and lines(head)[-1] == b"x-correlation-id: cid"


def test_request_ids_differ_after_fork(h: Any) -> None:
    h.new_request_id()  # the pool is now filled in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.write(write, h.new_request_id())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    assert RID.fullmatch(child_id)
    assert child_id != h.new_request_id()


def test_request_ids_are_unique_across_threads(h: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda _: [h.new_request_id() for _ in range(3000)], range(4)))
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids) == 12000


def test_host_rules(h: Any) -> None:
    with pytest.raises(HeaderError, match="^multiple Host header lines$"):
        req(h, [(b"Host", b"a"), (b"host", b"a")])
    with pytest.raises(HeaderError, match="^missing Host header$"):
        req(h, [(b"Accept", b"*/*")])
    head, _ = req(h, [(b"Accept", b"*/*")], host=b"up:80", request_id=b"r")
    assert lines(head)[:2] == [b"Host: up:80", b"Accept: */*"]
    assert b"X-Forwarded-Host" not in head


def test_framing_is_the_callers_choice(h: Any) -> None:
    hdrs = [(b"Host", b"h"), (b"Content-Length", b"99")]
    assert req(h, hdrs, request_id=b"r")[0].endswith(b"X-Request-ID: r\r\n\r\n")
    assert req(h, hdrs, request_id=b"r", content_length=0)[0].endswith(b"Content-Length: 0\r\n\r\n")
    assert req(h, hdrs, request_id=b"r", content_length=2**63 - 1)[0].endswith(
        b"Content-Length: 9223372036854775807\r\n\r\n")
    assert req(h, hdrs, request_id=b"r", chunked=True)[0].endswith(
        b"Transfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(ValueError, match="mutually exclusive"):
        req(h, hdrs, content_length=1, chunked=True)
    with pytest.raises(ValueError, match="out of range"):
        req(h, hdrs, content_length=-1)
    with pytest.raises(ValueError, match="out of range"):
        req(h, hdrs, content_length=2**63)
    with pytest.raises(TypeError):
        req(h, hdrs, content_length=True)
    with pytest.raises(TypeError):
        req(h, hdrs, content_length=1.0)


def test_extra_headers_go_before_framing(h: Any) -> None:
    head, _ = req(h, [(b"Host", b"h")], request_id=b"r", chunked=True,
                  extra=[(b"TE", b"trailers"), (b"Connection", b"TE")])
    assert lines(head)[-3:] == [b"TE: trailers", b"Connection: TE", b"Transfer-Encoding: chunked"]


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"client": b"1.2.3.4\r\nX-Admin: 1"}, HeaderError),
        ({"client": b""}, ValueError),
        ({"proto": b"ht\ntp"}, HeaderError),
        ({"host": b"a\x00"}, HeaderError),
        ({"via": b"1.1 x\r"}, HeaderError),
        ({"request_id": b"id\n"}, HeaderError),
        ({"request_id": b""}, ValueError),
        ({"request_id_header": b"X Request"}, HeaderError),
        ({"extra": [(b"X-Ok", b"1"), (b"X-Bad", b"\x00")]}, HeaderError),
        ({"client": "1.2.3.4"}, TypeError),
    ],
)
def test_caller_values_cannot_inject(h: Any, kw: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        req(h, [(b"Host", b"h")], **kw)


def test_large_heads_use_the_heap_paths(h: Any) -> None:
    many = [(b"Host", b"h")] + [(b"X-H%d" % i, b"v" * 100) for i in range(300)]
    many.append((b"Connection", b", ".join(b"x-h%d" % i for i in range(0, 300, 3))))
    head, _ = req(h, many, request_id=b"r")
    assert len(head) > 4096 * 4
    kept = [line for line in lines(head) if line.startswith(b"X-H")]
    assert kept == [b"X-H%d: " % i + b"v" * 100 for i in range(300) if i % 3]
    assert head == req(PY, many, request_id=b"r")[0]


# --- response rewrite ---------------------------------------------------------------------------

def test_rewrite_response_exact(h: Any) -> None:
    head = h.rewrite_response_head(
        200, None,
        [
            (b"Server", b"gunicorn"),
            (b"Content-Type", b"application/json"),
            (b"Connection", b"keep-alive, X-Internal"),
            (b"X-Internal", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Content-Length", b"17"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Via", b"1.1 app"),
            (b"X-Request-ID", b"upstream-id"),
            (b"Cache-Control", b"no-store"),
        ],
        request_id=b"req-1", drop_server=True, content_length=17,
    )
    assert head == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"Cache-Control: no-store\r\n"
        b"Via: 1.1 app, 1.1 pyproxy\r\n"
        b"X-Request-ID: req-1\r\n"
        b"Content-Length: 17\r\n"
        b"\r\n"
    )


def test_response_keeps_what_it_does_not_manage(h: Any) -> None:
    hdrs = [(b"Server", b"s"), (b"X-Request-ID", b"up"), (b"Host", b"x"), (b"Via", b"1.0 v")]
    head = h.rewrite_response_head(502, b"Bad Gateway", hdrs, via=None)
    assert head == (b"HTTP/1.1 502 Bad Gateway\r\nServer: s\r\nX-Request-ID: up\r\nHost: x\r\n"
                    b"Via: 1.0 v\r\n\r\n")
    head = h.rewrite_response_head(101, None, [(b"Connection", b"Upgrade"),
                                               (b"Upgrade", b"websocket")], upgrade=True, via=None)
    assert head == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: upgrade\r\n\r\n")
    head = h.rewrite_response_head(200, None, [(b"Connection", b"server"), (b"Server", b"s")],
                                   via=None)
    assert head == b"HTTP/1.1 200 OK\r\n\r\n"


# --- Cython == Python on random inputs ----------------------------------------------------------

SPECIAL = [b"Host", b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE",
           b"Transfer-Encoding", b"Content-Length", b"Upgrade", b"Proxy-Authorization",
           b"Proxy-Authenticate", b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Host",
           b"Via", b"Server", b"Forwarded", b"X-Request-ID", b"X-Custom", b"Accept", b"Trailer"]


@st.composite
def any_case(draw: st.DrawFn, name: bytes) -> bytes:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(c ^ 0x20 if f and chr(c).isalpha() else c for c, f in zip(name, flips))


valid_names = st.one_of(
    st.sampled_from(SPECIAL).flatmap(any_case),
    st.binary(min_size=1, max_size=12).map(lambda b: bytes(TCHARS[c % len(TCHARS)] for c in b)),
)
list_values = st.lists(
    st.one_of(st.sampled_from([b"", b" ", b"close", b"keep-alive", b"Upgrade", b'"a,b"',
                               b"1.2.3.4", b"x-custom", b"ACCEPT", b"host", b"\\", b'"']),
              valid_names),
    max_size=5,
).map(lambda parts: b",".join(parts))
valid_values = st.binary(max_size=10).map(
    lambda b: bytes(c if (c == 9 or 0x20 <= c < 0x7F or c >= 0x80) else 0x61 for c in b).strip()
)


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Valid lists; some with one name or value corrupted by arbitrary bytes."""
    hdrs = draw(st.lists(st.tuples(valid_names, st.one_of(list_values, valid_values)),
                         max_size=14))
    if draw(st.booleans()):  # most requests carry a Host line
        hdrs.insert(draw(st.integers(0, len(hdrs))), (draw(any_case(b"Host")), b"example.com"))
    if hdrs and draw(st.sampled_from([False, False, False, True])):
        i = draw(st.integers(0, len(hdrs) - 1))
        part = draw(st.integers(0, 1))
        field = hdrs[i][part]
        at = draw(st.integers(0, len(field)))
        junk = draw(st.one_of(st.binary(min_size=1, max_size=3),
                              st.sampled_from([b"\r\n", b"\x00", b"\n", b" ", b":", b"\x7f"])))
        field = field[:at] + junk + field[at:]
        hdrs[i] = (field, hdrs[i][1]) if part == 0 else (hdrs[i][0], field)
    return hdrs


# Caller-supplied values: mostly valid, sometimes empty or carrying a CR.
opt_values = st.sampled_from([None] * 4 + [b"v", b"1.0 x", b"v2"] * 2 + [b"", b"a\rb"])


def outcome(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    try:
        return ("ok", fn(*args, **kw))
    except (ValueError, TypeError) as e:  # HeaderError is a ValueError
        return ("error", type(e), str(e), getattr(e, "name", None))


def same(fn: str, *args: Any, **kw: Any) -> Any:
    cy = outcome(getattr(CY, fn), *args, **kw)
    py = outcome(getattr(PY, fn), *args, **kw)
    if fn == "rewrite_request_head" and cy[0] == py[0] == "ok":
        (cy_head, cy_rid), (py_head, py_rid) = cy[1], py[1]
        if cy_rid != py_rid:  # both generated: random, compare the rest
            assert RID.fullmatch(cy_rid) and RID.fullmatch(py_rid)
            cy = ("ok", cy_head.replace(cy_rid, b"<id>"))
            py = ("ok", py_head.replace(py_rid, b"<id>"))
    assert cy == py
    return cy


fuzz = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(header_lists(), st.binary(max_size=6),
       st.sampled_from([b"GET", b"POST"] * 4 + [b"", b"G T"]),
       st.sampled_from([b"/", b"/a?b=c", b"*"] * 3 + [b"", b"/ x"]))
def test_same_validation_lookup_and_serialization(hdrs: list[tuple[bytes, bytes]], name: bytes,
                                                  method: bytes, target: bytes) -> None:
    same("validate_headers", hdrs)
    for n, v in hdrs[:3]:
        same("validate_name", n)
        same("validate_value", v, n)
        same("split_list", v)
    for fn in ("get_first", "get_all", "get_list"):
        same(fn, hdrs, name)
        if hdrs:
            same(fn, hdrs, hdrs[-1][0].upper())
    same("connection_tokens", hdrs)
    same("serialize_request_head", method, target, hdrs)
    same("serialize_response_head", 200, None, hdrs)


@fuzz
@given(
    hdrs=header_lists(),
    client=st.sampled_from([b"203.0.113.7", b"::1"] * 4 + [b"", b"1.2\r\n"]),
    host=opt_values, via=opt_values, request_id=opt_values,
    rid_header=st.sampled_from([b"X-Request-ID"] * 6 + [b"x-trace", b"Via", b"Bad Name"]),
    upgrade=st.booleans(),
    framing=st.sampled_from([(None, False), (None, True), (0, False), (7, False)] * 3
                           + [(10, True), (-1, False), (True, False)]),
    extra=st.one_of(st.just([]), header_lists().map(lambda x: x[:2])),
    drop_server=st.booleans(),
    status=st.sampled_from([101, 200, 404, 599] * 3 + [42]),
    reason=st.sampled_from([None, b"", b"Fine"] * 3 + [b"Bad\n"]),
)
def test_same_rewrites(hdrs: list[tuple[bytes, bytes]], client: bytes, host: bytes | None,
                       via: bytes | None, request_id: bytes | None, rid_header: bytes,
                       upgrade: bool, framing: tuple[int | None, bool],
                       extra: list[tuple[bytes, bytes]], drop_server: bool, status: int,
                       reason: bytes | None) -> None:
    content_length, chunked = framing
    common = dict(via=via, request_id=request_id, request_id_header=rid_header, upgrade=upgrade,
                  content_length=content_length, chunked=chunked, extra=extra)
    same("rewrite_request_head", b"GET", b"/p", hdrs, client=client, host=host, **common)
    same("rewrite_response_head", status, reason, hdrs, drop_server=drop_server, **common)


class _Collect:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(valid_names, st.one_of(list_values, valid_values)), max_size=12),
       st.booleans())
def test_rewritten_request_parses_with_llhttp(hdrs: list[tuple[bytes, bytes]],
                                              upgrade: bool) -> None:
    """The output of a successful rewrite is a valid head holding exactly what was promised."""
    if sum(n.lower() == b"host" for n, _ in hdrs) > 1:
        return
    head, rid = CY.rewrite_request_head(b"GET", b"/x", hdrs, client=b"198.51.100.2",
                                        host=b"up.internal", upgrade=upgrade, content_length=0)
    sink = _Collect()
    parser = httptools.HttpRequestParser(sink)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    assert sink.done
    out = sink.headers
    tokens = {e.lower() for n, v in hdrs if n.lower() == b"connection" for e in PY.split_list(v)}
    managed = {b"host", b"forwarded", b"x-forwarded-for", b"x-forwarded-proto",
               b"x-forwarded-host", b"via", b"x-request-id"}
    hop = {n.lower() for n in HOP} - ({b"upgrade"} if upgrade else set())
    for n, _ in out:
        assert n.lower() not in hop or (n, _) == (b"Connection", b"upgrade") or (
            n == b"Content-Length")
        assert n.lower() not in tokens or n.lower() in managed | {b"upgrade", b"connection",
                                                                  b"content-length"}
    assert [v for n, v in out if n.lower() == b"host"] == [b"up.internal"]
    prior = [e for n, v in hdrs if n.lower() == b"x-forwarded-for" for e in PY.split_list(v)]
    assert [v for n, v in out if n.lower() == b"x-forwarded-for"] == [
        b", ".join(prior + [b"198.51.100.2"])]
    assert [v for n, v in out if n.lower() == b"x-request-id"] == [rid]
    assert [v for n, v in out if n.lower() == b"content-length"] == [b"0"]


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        ("header", b"x-user", b"alice"),
        ("header", b"x-none", None),
        ("cookie", b"session", b"abc"),
        ("cookie", b"quoted", b"q v"),
        ("cookie", b"missing", None),
        ("query", b"id", b"7"),
        ("query", b"empty", b""),
        ("query", b"frag", None),
    ],
)
def test_request_value(kind: str, name: bytes, expected: bytes | None) -> None:
    fields = [(b"X-User", b" alice "), (b"Cookie", b"a=1; session=abc"), (b"cookie", b'quoted="q v"')]
    target = b"/p?x=1&id=7&empty=#frag=9"
    assert headers.request_value(fields, target, kind, name) == expected


def _outcome(call: Any) -> tuple[str, str]:
    try:
        return "ok", repr(call())
    except Exception as e:  # noqa: BLE001 - the exception's type and message are the outcome
        return type(e).__name__, str(e)


@pytest.mark.parametrize(
    "call",
    [
        lambda h: h.rewrite_response_head(99, None, [(b"A", "x")]),
        lambda h: h.rewrite_response_head(200, b"\x01", [(b"A", 1)]),
        lambda h: h.rewrite_response_head(200, None, [(b"A", 1)], via=b"\x00"),
        lambda h: h.rewrite_response_head(200, None, [(b"A", 1)], request_id=b"r", request_id_header=b""),
        lambda h: h.rewrite_response_head(200, None, [(b"A B", b"v"), (b"C", 1)]),
        lambda h: h.rewrite_response_head(99, None, [(b"C", b"1", b"2")]),
        lambda h: h.rewrite_request_head(b"GET", b"/", [(b"Host", b"a"), (b"Host", b"b"), (b"C", 1)], client=b"1"),
        lambda h: h.rewrite_request_head(b"GET", b"/", [(b"Host", b"a"), (b"C", 1)], client=b"1"),
    ],
)
def test_the_first_problem_in_the_references_order_is_reported(call: Any) -> None:
    """Status line, then the values added, then each field in order (its type, then its bytes):
    both implementations report the same first problem."""
    assert _outcome(lambda: call(CY)) == _outcome(lambda: call(PY))


def test_extra_fields_read_after_the_caller_emptied_its_list_change_nothing(h: Any) -> None:
    """``extra`` may be any iterable: reading it may run the caller's code, even code that
    empties the header list (the compiled rewrite keeps its own reference to every field)."""
    hl = [(b"A", b"b"), (b"Long-Name-" + b"x" * 40, b"value-" + b"y" * 60)]
    expected = h.rewrite_response_head(200, b"OK", list(hl), via=None, extra=[(b"X", b"1")])

    def extra() -> Iterator[tuple[bytes, bytes]]:
        hl.clear()
        _ = [bytes(100) for _ in range(100)]  # reuse freed memory, if any was freed
        yield (b"X", b"1")

    assert h.rewrite_response_head(200, b"OK", hl, via=None, extra=extra()) == expected

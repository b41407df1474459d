"""pyproxy._speedups (Cython) vs the plain-Python reference in pyproxy.headers, same run.

Run: ``python -m pytest bench/bench_headers.py -s -q``.
Heads are realistic: a browser navigation request (12 headers), an API call (6 headers) and an
upstream response (8 headers), as httptools hands them over (lists of bytes pairs).
Targets (the head-helpers issue): the forward rewrite >= 3x faster than the Python twin (ratio
<= 1/3); every other helper faster (ratio < 1). Outputs are checked equal before timing and
recorded in ``extra_info``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pyproxy import _speedups, headers
from ratio import compare, report

LOOPS = 200  # operations per timed call, so the loop and lambda overhead stay small

BROWSER = [
    (b"Host", b"www.example.com"),
    (b"Connection", b"keep-alive"),
    (b"Cache-Control", b"max-age=0"),
    (b"Upgrade-Insecure-Requests", b"1"),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                    b"Chrome/124.0.0.0 Safari/537.36"),
    (b"Accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
                b"image/webp,image/apng,*/*;q=0.8"),
    (b"Sec-Fetch-Site", b"same-origin"),
    (b"Sec-Fetch-Mode", b"navigate"),
    (b"Sec-Fetch-Dest", b"document"),
    (b"Referer", b"https://www.example.com/catalog?page=2"),
    (b"Accept-Encoding", b"gzip, deflate, br, zstd"),
    (b"Cookie", b"session=6f1c2a9e0b7d4e3f8a5c1d2e3f4a5b6c; theme=dark; _ga=GA1.2.1234567.89"),
]
API = [
    (b"Host", b"api.internal:8080"),
    (b"Authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZ2VudC03In0.c2lnbmF0dXJl"),
    (b"Content-Type", b"application/json"),
    (b"Content-Length", b"348"),
    (b"X-Request-ID", b"7b0f6c1e9a2d4c3b8e5f1a2b3c4d5e6f"),
    (b"X-Forwarded-For", b"198.51.100.23"),
]
RESPONSE = [
    (b"Server", b"uvicorn"),
    (b"Date", b"Tue, 26 Nov 2024 19:48:00 GMT"),
    (b"Content-Type", b"application/json; charset=utf-8"),
    (b"Content-Length", b"1532"),
    (b"Connection", b"keep-alive"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Cache-Control", b"private, max-age=0"),
    (b"ETag", b'"33a64df551425fcc55e4d42a148795d9f25f89d4"'),
]


def _loop(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        for _ in range(LOOPS):
            fn()
        return None

    return run


def _run(benchmark: Any, title: str, cy: Callable[[], object], py: Callable[[], object],
         target: float) -> float:
    assert cy() == py(), "the two implementations disagree"
    benchmark.extra_info["outputs_equal"] = True
    result = compare(title, {"cython": _loop(cy), "python": _loop(py)}, ops=LOOPS)
    ratios = report(result, "cython", benchmark)
    ratio = ratios["python"]
    print(f"  -> cython is {1 / ratio:.1f}x faster (target >= {1 / target:.0f}x)")
    benchmark(_loop(cy))
    assert ratio <= target, ratios
    return ratio


@pytest.mark.parametrize(
    ("label", "method", "target", "hdrs", "kw"),
    [
        ("browser GET, 12 headers", b"GET", b"/catalog/item/42?ref=home", BROWSER,
         {"proto": b"https"}),
        ("API POST, 6 headers", b"POST", b"/v1/agents/7/run", API,
         {"proto": b"http", "content_length": 348}),
    ],
)
def test_forward_request_rewrite(benchmark: Any, label: str, method: bytes, target: bytes,
                                 hdrs: list[tuple[bytes, bytes]], kw: dict[str, Any]) -> None:
    # A fixed id makes the outputs comparable; the browser head still pays for id generation below.
    def cy() -> object:
        return _speedups.rewrite_request_head(method, target, hdrs, client=b"203.0.113.7",
                                              request_id=b"id", **kw)

    def py() -> object:
        return headers.py_rewrite_request_head(method, target, hdrs, client=b"203.0.113.7",
                                               request_id=b"id", **kw)

    _run(benchmark, f"rewrite_request_head, {label}", cy, py, 1 / 3)


def test_forward_request_rewrite_generating_ids(benchmark: Any) -> None:
    def cy() -> object:
        return _speedups.rewrite_request_head(b"GET", b"/", BROWSER, client=b"203.0.113.7")[0][:10]

    def py() -> object:
        return headers.py_rewrite_request_head(b"GET", b"/", BROWSER, client=b"203.0.113.7")[0][:10]

    _run(benchmark, "rewrite_request_head + new X-Request-ID, browser GET", cy, py, 1 / 3)


def test_response_rewrite(benchmark: Any) -> None:
    kw: dict[str, Any] = {"request_id": b"7b0f6c1e9a2d4c3b8e5f1a2b3c4d5e6f", "drop_server": True,
                          "content_length": 1532}

    def cy() -> object:
        return _speedups.rewrite_response_head(200, b"OK", RESPONSE, **kw)

    def py() -> object:
        return headers.py_rewrite_response_head(200, b"OK", RESPONSE, **kw)

    _run(benchmark, "rewrite_response_head, 8 headers", cy, py, 1 / 3)


@pytest.mark.parametrize(
    ("label", "name", "args"),
    [
        ("validate_headers, browser", "validate_headers", (BROWSER,)),
        ("serialize_request_head, browser", "serialize_request_head",
         (b"GET", b"/catalog", BROWSER)),
        ("get_first (last header), browser", "get_first", (BROWSER, b"cookie")),
        ("connection_tokens, browser", "connection_tokens", (BROWSER,)),
    ],
)
def test_other_helpers(benchmark: Any, label: str, name: str, args: tuple[Any, ...]) -> None:
    cy_fn = getattr(_speedups, name)
    py_fn = getattr(headers, "py_" + name)
    _run(benchmark, label, lambda: cy_fn(*args), lambda: py_fn(*args), 1.0)

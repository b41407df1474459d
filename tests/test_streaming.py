"""1 GiB through the proxy each way with bounded memory: backpressure works end to end.

The proxy runs as its own process (``pyproxy run``) so its RSS can be read from /proc.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import free_port, proxy_process
from pyproxy.sample_server import SampleServer

GIB = 1 << 30
RSS_GROWTH_LIMIT = 64 << 20


def rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


@contextmanager
def streaming_proxy(upstream: SampleServer, tmp: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    config = tmp / "proxy.toml"
    config.write_text(
        f'[[listeners]]\nport = {port}\n[admin]\nenabled = false\n[limits]\nmax_body_size = "2GiB"\n'
        f'[pools.p]\nservers = ["{upstream.address}"]\n[[routes]]\npool = "p"\n'
    )
    with proxy_process(config, port) as proc:
        yield port, proc


class PeakRss:
    """Samples a process's RSS in the background while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss(pid), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRss:
        self.start = rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_one_gib_download_and_upload_keep_rss_growth_bounded(tmp_path: Path) -> None:
    upstream = SampleServer(record_body_limit=0)
    with upstream.running(), streaming_proxy(upstream, tmp_path) as (port, proc):
        # Warm up (imports, first connections) before taking the baseline.
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /bytes/10 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            while s.recv(65536):
                pass

        with PeakRss(proc.pid) as download:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % GIB)
                received = 0
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(65536)
                received = len(head.split(b"\r\n\r\n", 1)[1])
                while chunk := s.recv(1 << 20):
                    received += len(chunk)
        assert head.startswith(b"HTTP/1.1 200") and received == GIB
        assert download.peak - download.start < RSS_GROWTH_LIMIT, (download.start, download.peak)

        with PeakRss(proc.pid) as upload:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % GIB)
                piece = b"u" * (1 << 20)
                for _ in range(GIB // len(piece)):
                    s.sendall(piece)
                response = s.recv(65536)
        assert response.startswith(b"HTTP/1.1 200")
        assert upstream.requests[-1].body_size == GIB
        assert upload.peak - upload.start < RSS_GROWTH_LIMIT, (upload.start, upload.peak)

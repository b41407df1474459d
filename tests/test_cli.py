"""The command line: the demo answers a request and stops cleanly on Ctrl-C; run refuses bad configs."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from helpers import accepts_connections, children, eventually, free_port, proxy_process
from pyproxy.sample_server import SampleServer


def test_demo_answers_and_stops_on_sigint() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyproxy", "demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.search(r"proxy on (http://127\.0\.0\.1:\d+)", first)
        assert match, first
        url = match.group(1)
        names = set()
        for _ in range(6):
            with urllib.request.urlopen(f"{url}/hello", timeout=10) as resp:
                assert resp.status == 200 and resp.headers["Via"] == "1.1 pyproxy"
                names.add(resp.headers["Server"])
        assert names == {"pyproxy-sample/fast", "pyproxy-sample/medium", "pyproxy-sample/slow"}
        admin_line = next(line for line in iter(proc.stdout.readline, "") if "admin API" in line)
        admin_url = re.search(r"(http://127\.0\.0\.1:\d+)", admin_line).group(1)  # type: ignore[union-attr]
        with urllib.request.urlopen(f"{admin_url}/healthz", timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_refuses_an_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pools.a]\nservers = []\n")
    out = subprocess.run(
        [sys.executable, "-m", "pyproxy", "run", "--config", str(bad)],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 1
    assert "not starting" in out.stderr and "pools.a.servers" in out.stderr


def proxy_config(path: Path, port: int, upstream: str, workers: int = 1) -> Path:
    path.write_text(f"workers = {workers}\n[[listeners]]\nport = {port}\n[admin]\nenabled = false\n"
                    f'[pools.p]\nservers = ["{upstream}"]\n[[routes]]\npool = "p"\n')
    return path


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(tmp_path: Path) -> None:
    slow = SampleServer(latency=1.0)
    with slow.running():
        port = free_port()
        with proxy_process(proxy_config(tmp_path / "p.toml", port, slow.address), port) as proc:
            idle = socket.create_connection(("127.0.0.1", port), timeout=5)
            busy = socket.create_connection(("127.0.0.1", port), timeout=5)
            busy.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            eventually(lambda: slow.requests, "the request to reach the upstream")
            proc.send_signal(signal.SIGTERM)
            response = b""
            while chunk := busy.recv(65536):
                response += chunk
            assert response.startswith(b"HTTP/1.1 200") and b"connection: close" in response.lower()
            assert b'"/slow"' in response
            assert idle.recv(100) == b"", "an idle keep-alive connection is closed at once"
            assert proc.wait(timeout=15) == 0
            assert not accepts_connections(port)


def test_workers_share_the_port_and_a_crashed_worker_is_replaced(tmp_path: Path) -> None:
    up = SampleServer()
    with up.running():
        port = free_port()
        url = f"http://127.0.0.1:{port}/"

        def get() -> int:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status)

        def answers() -> bool:
            try:
                return get() == 200
            except OSError:
                return False

        with proxy_process(proxy_config(tmp_path / "p.toml", port, up.address, workers=2), port) as proc:
            eventually(lambda: len(children(proc.pid)) == 2 and answers(), "two workers answering")
            workers = children(proc.pid)
            assert all(get() == 200 for _ in range(20))
            assert up.accepts >= 2, "both workers took connections (each has its own upstream pool)"
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            eventually(lambda: len(children(proc.pid) - {victim}) == 2, "a replacement worker")
            assert victim not in children(proc.pid)
            eventually(answers, "answering after the crash")
            assert all(get() == 200 for _ in range(20))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert not children(proc.pid)

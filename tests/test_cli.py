"""The command line: the demo answers a request and stops cleanly on Ctrl-C; run refuses bad configs."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest


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


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(tmp_path: Path) -> None:
    import socket
    import time

    from pyproxy.sample_server import SampleServer

    slow = SampleServer(latency=1.0)
    with slow.running():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = tmp_path / "p.toml"
        config.write_text(f'[[listeners]]\nport = {port}\n[admin]\nenabled = false\n'
                          f'[pools.p]\nservers = ["{slow.address}"]\n[[routes]]\npool = "p"\n')
        proc = subprocess.Popen([sys.executable, "-m", "pyproxy", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    idle = socket.create_connection(("127.0.0.1", port), timeout=5)
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
            busy = socket.create_connection(("127.0.0.1", port), timeout=5)
            busy.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            time.sleep(0.3)  # the request is at the upstream now
            proc.send_signal(signal.SIGTERM)
            response = b""
            while chunk := busy.recv(65536):
                response += chunk
            assert response.startswith(b"HTTP/1.1 200") and b"connection: close" in response.lower()
            assert b'"/slow"' in response
            assert idle.recv(100) == b"", "an idle keep-alive connection is closed at once"
            assert proc.wait(timeout=15) == 0
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                kids.add(int(entry.name))
    return kids


def test_workers_share_the_port_and_a_crashed_worker_is_replaced(tmp_path: Path) -> None:
    import os
    import socket
    import time
    import urllib.request

    from pyproxy.sample_server import SampleServer

    up = SampleServer()
    with up.running():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = tmp_path / "p.toml"
        config.write_text(f'workers = 2\n[[listeners]]\nport = {port}\n[admin]\nenabled = false\n'
                          f'[pools.p]\nservers = ["{up.address}"]\n[[routes]]\npool = "p"\n')
        proc = subprocess.Popen([sys.executable, "-m", "pyproxy", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/"

        def get() -> int:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status)

        def wait_for(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
            deadline = time.monotonic() + 15
            while not predicate():
                assert time.monotonic() < deadline, what
                time.sleep(0.05)

        def answers() -> bool:
            try:
                return get() == 200
            except OSError:
                return False

        try:
            wait_for(lambda: len(_children(proc.pid)) == 2 and answers(), "two workers answering")
            workers = _children(proc.pid)
            assert all(get() == 200 for _ in range(20))
            assert up.accepts >= 2, "both workers took connections (each has its own upstream pool)"
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: len(_children(proc.pid) - {victim}) == 2, "a replacement worker")
            assert victim not in _children(proc.pid)
            wait_for(answers, "answering after the crash")
            assert all(get() == 200 for _ in range(20))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert not _children(proc.pid)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

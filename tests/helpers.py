"""Helpers shared by the tests that run real processes and sockets."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(predicate: Callable[[], object], what: str, seconds: float = 15) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def proxy_process(config: Path, port: int, stderr: int | None = subprocess.DEVNULL) -> Iterator[subprocess.Popen[bytes]]:
    """``pyproxy run --config`` as a child process, once it accepts on ``port``; stopped by PID after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyproxy", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        eventually(lambda: proc.poll() is not None or accepts_connections(port), "the proxy to listen")
        assert proc.poll() is None, f"the proxy exited with {proc.returncode}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def children(pid: int) -> set[int]:
    """PIDs of the live child processes of ``pid`` (read from /proc)."""
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


class ReloadableConfig:
    """A config file for a proxy with an admin listener and one route ``api`` to pool ``p`` (one
    server): :meth:`write` puts the route's extra lines in it, :meth:`reload` applies it through
    ``POST /reload``."""

    def __init__(self, path: Path, upstream: str) -> None:
        self.path = path
        self.upstream = upstream
        self.port, self.admin_port = free_port(), free_port()

    def write(self, route_lines: str) -> None:
        self.path.write_text(
            f'[[listeners]]\nport = {self.port}\n[admin]\nport = {self.admin_port}\n'
            f'[pools.p]\nservers = ["{self.upstream}"]\n[[routes]]\nname = "api"\npool = "p"\n{route_lines}\n'
        )

    def reload(self) -> None:
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/reload", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200

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

"""The command line: the demo answers a request and stops cleanly on Ctrl-C; run refuses bad configs."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path


def test_demo_answers_and_stops_on_sigint() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyproxy", "demo", "--listen", "127.0.0.1:0"],
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

"""Proxy load: pyproxy against nginx as a reverse proxy, in the same run, with wrk.

    python bench/proxy_load.py [--rounds 3] [--duration 5] [--connections 50] [--ratelimit local|hybrid] [--cache]

Needs ``nginx`` and ``wrk`` (Debian packages ``nginx-light``/``nginx`` and ``wrk``). One nginx serves
the upstream files (a ~100-byte body and a 16 KiB body); a second nginx (1 worker, upstream
keep-alive) and pyproxy (1 worker) proxy to it, and wrk drives each in turn, alternating, for several
rounds. For each round it reads the proxy's CPU time (utime + stime of its whole process tree, from
/proc) and prints rps, p50, p99, CPU seconds and **requests per proxy CPU-second**, each with its ratio
to nginx's figure of the same round, then the medians. Everything listens on 127.0.0.1 only; every
process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants (what the proxy spent, workers included)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
    total, frontier = 0.0, {pid}
    while frontier:
        total += sum(stats[p][1] for p in frontier if p in stats)
        frontier = {p for p, (ppid, _) in stats.items() if ppid in frontier}
    return total


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_s: float
    requests: int

    @property
    def per_cpu_second(self) -> float:
        return self.requests / self.cpu_s if self.cpu_s else float("nan")


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if m is None:
        raise RuntimeError(f"cannot read wrk's latency {text!r}")
    value, unit = m.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, pid: int, duration: int, connections: int) -> Result:
    before = tree_cpu_seconds(pid)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    cpu = tree_cpu_seconds(pid) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    return Result(
        rps=float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        p99_ms=_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        cpu_s=cpu,
        requests=requests,
    )


NGINX_UPSTREAM = """
worker_processes 1;
user root;
pid {dir}/upstream.pid;
error_log {dir}/upstream-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {dir}/www;
    {upstream_extra}
  }}
}}
"""

NGINX_PROXY = """
worker_processes {workers};
user root;
pid {dir}/proxy.pid;
error_log {dir}/proxy-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 1000000; }}
  {cache_zone}
  server {{
    listen 127.0.0.1:{port} backlog=4096 reuseport;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      {cache_use}
    }}
  }}
}}
"""

PYPROXY = """
workers = {workers}
[[listeners]]
host = "127.0.0.1"
port = {port}
[admin]
enabled = false
[pools.backend]
servers = ["127.0.0.1:{upstream}"]
max_idle_per_server = 64
[[routes]]
pool = "backend"
{cache}
{ratelimit}"""

# --cache: the upstream marks its answers cacheable for 10 minutes, nginx caches them (proxy_cache,
# in-memory keys, files in the page cache) and pyproxy too (L1 memory): wrk then measures hits.
NGINX_CACHE_ZONE = "proxy_cache_path {dir}/nginx-cache levels=1:2 keys_zone=hits:10m max_size=100m inactive=10m;"
NGINX_CACHE_USE = "proxy_cache hits; proxy_cache_valid 200 10m;"
UPSTREAM_CACHEABLE = 'add_header Cache-Control "max-age=600";'
PYPROXY_CACHE = "cache = {}"

# --ratelimit local: a global and a per-client limit no request reaches (every request checked and
# charged at two levels in the machine-wide table), to measure what limiting costs.
RATELIMIT_LOCAL = """[routes.ratelimit]
key = "client_ip"
key_limits = [{ limit = 1000000000, window = "1s" }]
[[ratelimit.global]]
limit = 1000000000
window = "1s"
"""


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="workers for both proxies")
    parser.add_argument("--ratelimit", choices=("off", "local", "hybrid"), default="off",
                        help="pyproxy with rate limiting (global + per-client level; hybrid: reconciled with "
                             "a redis-server this script starts) or without")
    parser.add_argument("--no-ratelimit-headers", action="store_true",
                        help="with --ratelimit: headers_on_allowed = false (RateLimit fields on 429s only)")
    parser.add_argument("--cache", action="store_true",
                        help="both proxies cache the (cacheable) answers: measures cache hits")
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install nginx-light wrk", file=sys.stderr)
            return 2

    started: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as services, tempfile.TemporaryDirectory(prefix="pyproxy-bench-") as tmp:
        redis = None
        if args.ratelimit == "hybrid":
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from services import RedisServer  # the tests' real-service fixture (redis-server by PID)

            redis = services.enter_context(RedisServer())
        d = Path(tmp)
        (d / "www").mkdir()
        (d / "www" / "small").write_bytes(b"s" * 100)
        (d / "www" / "16k").write_bytes(b"b" * 16384)
        up, ngx, pyx = free_port(), free_port(), free_port()
        (d / "upstream.conf").write_text(NGINX_UPSTREAM.format(
            dir=d, port=up, upstream_extra=UPSTREAM_CACHEABLE if args.cache else "",
        ))
        (d / "proxy.conf").write_text(NGINX_PROXY.format(
            dir=d, port=ngx, upstream=up, workers=args.workers,
            cache_zone=NGINX_CACHE_ZONE.format(dir=d) if args.cache else "",
            cache_use=NGINX_CACHE_USE if args.cache else "",
        ))
        (d / "pyproxy.toml").write_text(PYPROXY.format(
            port=pyx, upstream=up, workers=args.workers,
            ratelimit=(
                ""
                if args.ratelimit == "off"
                else RATELIMIT_LOCAL
                + "[ratelimit]\n"
                + (f'mode = "hybrid"\nredis_url = "{redis.url}"\n' if redis is not None else "")
                + ("headers_on_allowed = false\n" if args.no_ratelimit_headers else "")
            ),
            cache=PYPROXY_CACHE if args.cache else "",
        ))
        try:
            for conf in ("upstream.conf", "proxy.conf"):
                started.append(subprocess.Popen(
                    ["nginx", "-p", str(d), "-c", str(d / conf), "-g", "daemon off;"]
                ))
            started.append(subprocess.Popen(
                [sys.executable, "-m", "pyproxy", "run", "--config", str(d / "pyproxy.toml")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            upstream, nginx_proxy, pyproxy_proc = started
            wait_ready(f"http://127.0.0.1:{up}/small", upstream)
            wait_ready(f"http://127.0.0.1:{ngx}/small", nginx_proxy)
            wait_ready(f"http://127.0.0.1:{pyx}/small", pyproxy_proc)
            contestants = {"nginx": (ngx, nginx_proxy.pid), "pyproxy": (pyx, pyproxy_proc.pid)}
            print(f"wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} alternated rounds, "
                  f"{args.workers} worker(s) each{', cache hits' if args.cache else ''}; "
                  "ratios are pyproxy / nginx of the same round")
            for path in ("small", "16k"):
                ratios: dict[str, list[float]] = {k: [] for k in ("rps", "p50", "p99", "per_cpu")}
                print(f"\n/{path}")
                print(f"  {'round':<6}{'proxy':<9}{'rps':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu s':>8}{'req/cpu-s':>11}")
                for r in range(args.rounds):
                    results = {}
                    order = list(contestants) if r % 2 == 0 else list(reversed(contestants))
                    for name in order:
                        port, pid = contestants[name]
                        results[name] = run_wrk(f"http://127.0.0.1:{port}/{path}", pid, args.duration, args.connections)
                    for name in contestants:
                        res = results[name]
                        print(f"  {r:<6}{name:<9}{res.rps:>9.0f}{res.p50_ms:>9.2f}{res.p99_ms:>9.2f}"
                              f"{res.cpu_s:>8.2f}{res.per_cpu_second:>11.0f}")
                    n, p = results["nginx"], results["pyproxy"]
                    ratios["rps"].append(p.rps / n.rps)
                    ratios["p50"].append(p.p50_ms / n.p50_ms)
                    ratios["p99"].append(p.p99_ms / n.p99_ms)
                    ratios["per_cpu"].append(p.per_cpu_second / n.per_cpu_second)
                print("  median ratio pyproxy/nginx: " + ", ".join(
                    f"{k} {statistics.median(v):.2f}" for k, v in ratios.items()
                ))
        finally:
            for proc in reversed(started):
                stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

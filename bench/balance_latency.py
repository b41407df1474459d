"""Balancing under uneven latency: p50/p99 seen by clients, per algorithm, in one run.

    python bench/balance_latency.py [--rounds 3] [--duration 5] [--rate 400]

Four upstreams answer after 1, 5, 20 and 100 ms; the 5 ms one fails 5% of its requests (500).
For each algorithm a pyproxy (1 worker, retries on) balances over them, driven *open loop* at the
same fixed request rate for every algorithm (a closed-loop tool such as wrk would give the faster
algorithms more load, not the same load, and compare latencies at different throughputs): a
request is due every 1/rate s and its latency counts from when it was due, so waiting for a free
connection counts too (no coordinated omission). Each proxy first gets ``--warmup`` seconds of the
same load, unmeasured (a fresh proxy knows no latencies yet: this measures the steady state, not
the first second of its life). Algorithms alternate round by round. Printed per
algorithm: p50, p99, errors and the share of requests each upstream served, and each p99 as a ratio
to round robin's of the same round (target: latency-aware algorithms ≤ 0.5). Everything listens on
127.0.0.1; every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from proxy_load import free_port, stop, wait_ready
from ratio import percentile

UPSTREAMS = ((0.001, 0.0), (0.005, 0.05), (0.020, 0.0), (0.100, 0.0))  # (latency s, failure rate)
ALGORITHMS = {
    "round_robin": {"balance": "round_robin"},
    "dynamic_wrr": {"balance": "weighted_round_robin", "dynamic": True},
    "least_connections": {"balance": "least_connections"},
}


def serve_upstream(port: int, latency: float, failure_rate: float) -> None:
    """A minimal HTTP/1.1 keep-alive origin: answers every request after ``latency`` seconds,
    500 with probability ``failure_rate``; ``GET /count`` tells how many it answered."""
    import httptools

    answered = 0

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_message_complete(self) -> None:
            nonlocal answered
            if self.url == b"/count":
                body = str(answered).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # type: ignore[attr-defined]
                return
            answered += 1
            status = b"500 Internal Server Error" if random.random() < failure_rate else b"200 OK"
            asyncio.get_running_loop().call_later(
                latency, self.transport.write,  # type: ignore[attr-defined]
                b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok",
            )

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Conn, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    import uvloop

    uvloop.run(main())


async def _open_loop(port: int, rate: float, duration: float) -> tuple[list[float], int]:
    """Send ``GET /`` every 1/rate s for ``duration`` s over kept-alive connections (a new one
    when all are busy); latencies in seconds from when each request was due, and the non-200s."""
    import httptools

    loop = asyncio.get_running_loop()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []
    errors = 0

    async def one(due: float) -> None:
        nonlocal errors
        conn = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
        reader, writer = conn
        writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        done = asyncio.Event()

        class Response:
            def on_message_complete(self) -> None:
                done.set()

        parser = httptools.HttpResponseParser(Response())
        while not done.is_set():
            data = await reader.read(65536)
            if not data:
                errors += 1
                writer.close()
                return
            parser.feed_data(data)
        latencies.append(loop.time() - due)
        if parser.get_status_code() != 200:
            errors += 1
        idle.append(conn)

    start = loop.time()
    tasks = []
    n = int(rate * duration)
    for i in range(n):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return latencies, errors


def pyproxy_config(port: int, upstream_ports: list[int], options: dict[str, object]) -> str:
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    servers = ", ".join(f'"127.0.0.1:{p}"' for p in upstream_ports)
    return f"""
[[listeners]]
host = "127.0.0.1"
port = {port}
[admin]
enabled = false
[pools.backend]
servers = [{servers}]
{extra}
[pools.backend.retry]
attempts = 1
on_statuses = [500, 502, 503, 504]
[[routes]]
pool = "backend"
"""


def counts(ports: list[int]) -> list[int]:
    out = []
    for p in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{p}/count", timeout=5) as r:
            out.append(int(r.read()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rate", type=float, default=400.0, help="requests per second, every algorithm")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first")
    parser.add_argument("--upstream", nargs=3, metavar=("PORT", "LATENCY", "FAILURE_RATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        serve_upstream(int(args.upstream[0]), float(args.upstream[1]), float(args.upstream[2]))
        return 0
    started: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[tuple[int, float, float, list[float]]]] = {name: [] for name in ALGORITHMS}
    ratios: dict[str, list[float]] = {name: [] for name in ALGORITHMS}
    with tempfile.TemporaryDirectory(prefix="pyproxy-balance-") as tmp:
        try:
            ports = [free_port() for _ in UPSTREAMS]
            for port, (latency, failure) in zip(ports, UPSTREAMS):
                started.append(subprocess.Popen([sys.executable, __file__, "--upstream", str(port), str(latency), str(failure)]))
            for port, proc in zip(ports, started):
                wait_ready(f"http://127.0.0.1:{port}/count", proc)
            print(f"upstreams (latency s, failure rate): {UPSTREAMS}; {args.rate:g} requests/s open loop for "
                  f"{args.duration}s per algorithm, {args.rounds} alternated rounds")
            for r in range(args.rounds):
                order = list(ALGORITHMS) if r % 2 == 0 else list(reversed(ALGORITHMS))
                p99: dict[str, float] = {}
                for name in order:
                    port = free_port()
                    conf = Path(tmp) / f"{name}.toml"
                    conf.write_text(pyproxy_config(port, ports, ALGORITHMS[name]))
                    proc = subprocess.Popen([sys.executable, "-m", "pyproxy", "run", "--config", str(conf)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        wait_ready(f"http://127.0.0.1:{port}/", proc)
                        if args.warmup > 0:
                            asyncio.run(_open_loop(port, args.rate, args.warmup))
                        before = counts(ports)
                        latencies, errors = asyncio.run(_open_loop(port, args.rate, args.duration))
                        served = [a - b for a, b in zip(counts(ports), before)]
                    finally:
                        stop(proc)
                    p50 = 1000 * percentile(latencies, 0.50)
                    p99[name] = 1000 * percentile(latencies, 0.99)
                    total = sum(served) or 1
                    results[name].append((errors, p50, p99[name], [s / total for s in served]))
                for name in ALGORITHMS:
                    ratios[name].append(p99[name] / p99["round_robin"])
                time.sleep(0.2)
        finally:
            for proc in started:
                stop(proc)
    print(f"\n{'algorithm':<20}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99/rr':>8}  share of 1/5/20/100 ms upstreams")
    for name, rows in results.items():
        shares = [statistics.median(row[3][i] for row in rows) for i in range(len(UPSTREAMS))]
        print(f"{name:<20}{statistics.median(r[0] for r in rows):>8.0f}{statistics.median(r[1] for r in rows):>9.2f}"
              f"{statistics.median(r[2] for r in rows):>9.2f}{statistics.median(ratios[name]):>8.2f}  "
              + " / ".join(f"{100 * s:.1f}%" for s in shares))
    return 0


if __name__ == "__main__":
    sys.exit(main())

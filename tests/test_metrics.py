"""Metrics: counted per request, summed across workers, kept when a worker dies, scraped at /metrics."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from helpers import children, eventually, free_port, proxy_process
from pyproxy.config import load_config
from pyproxy.observe.metrics import SharedSnapshots, WorkerMetrics, merge
from pyproxy.sample_server import SampleServer
from pyproxy.server import ProxyServer


def scrape(admin_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def config_file(path: Path, port: int, admin_port: int, upstream: str, workers: int = 1) -> Path:
    path.write_text(
        f"workers = {workers}\n[[listeners]]\nport = {port}\n[admin]\nport = {admin_port}\n"
        f'[pools.p]\nservers = ["{upstream}"]\n'
        f'[[routes]]\nname = "api"\npool = "p"\npath_prefix = "/api"\n'
    )
    return path


def test_requests_errors_connections_and_latency_are_counted(tmp_path: Path) -> None:
    up = SampleServer()
    with up.running():
        port, admin_port = free_port(), free_port()
        cfg = config_file(tmp_path / "p.toml", port, admin_port, up.address)
        with ProxyServer(load_config(cfg), cfg).running():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(5):
                conn.request("GET", "/api/x")
                conn.getresponse().read()
            conn.request("GET", "/elsewhere")
            assert conn.getresponse().read()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\nHost: x\r\n\r\n")
                while s.recv(65536):
                    pass
            m = scrape(admin_port)
    assert m[("pyproxy_http_requests_total", (("code", "200"), ("pool", "p"), ("route", "api")))] == 5
    assert m[("pyproxy_http_requests_total", (("code", "404"), ("pool", ""), ("route", "")))] == 1
    assert m[("pyproxy_http_refused_total", (("code", "400"),))] == 1
    assert m[("pyproxy_http_refused_total", (("code", "404"),))] == 1
    assert m[("pyproxy_upstream_connections_total", (("kind", "new"), ("pool", "p")))] == 1
    assert m[("pyproxy_upstream_connections_total", (("kind", "reused"), ("pool", "p")))] == 4
    assert m[("pyproxy_http_request_duration_seconds_count", (("route", "api"),))] == 5
    assert m[("pyproxy_http_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "api")))] == 5
    assert m[("pyproxy_upstream_response_duration_seconds_count", (("pool", "p"),))] == 5
    assert m[("pyproxy_http_connections_total", ())] == 2
    assert m[("pyproxy_http_connections_open", ())] == 1  # the kept-alive http.client connection
    assert m[("pyproxy_http_requests_in_flight", ())] == 0


def test_metrics_are_summed_across_workers_and_survive_a_dead_worker(tmp_path: Path) -> None:
    up = SampleServer()
    with up.running():
        port, admin_port = free_port(), free_port()
        cfg = config_file(tmp_path / "p.toml", port, admin_port, up.address, workers=2)
        key = ("pyproxy_http_requests_total", (("code", "200"), ("pool", "p"), ("route", "api")))
        with proxy_process(cfg, port) as proc:
            for _ in range(20):  # a new connection each: both workers answer some
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/", timeout=5) as resp:
                    json.loads(resp.read())
            eventually(lambda: scrape(admin_port).get(key) == 20, "20 requests summed over workers")
            workers = [p for p in children(proc.pid)]
            os.kill(workers[0], signal.SIGKILL)
            eventually(lambda: len(children(proc.pid) - {workers[0]}) == 2, "a replacement worker")
            assert scrape(admin_port)[key] == 20, "a dead worker's counts are kept"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/", timeout=5) as resp:
                resp.read()
            eventually(lambda: scrape(admin_port).get(key) == 21, "counting goes on")


def test_shared_snapshots_cross_a_fork_and_merge() -> None:
    shared = SharedSnapshots(2, slot_size=4096)
    m = WorkerMetrics()
    m.request_done("r", "p", 200, 0.003)
    pid = os.fork()
    if pid == 0:
        m.request_done("r", "p", 200, 0.2)
        shared.write(1, m.snapshot())
        os._exit(0)
    os.waitpid(pid, 0)
    shared.write(0, m.snapshot())
    total = merge([s for s in (shared.read(0), shared.read(1)) if s is not None])
    assert total["requests"] == [["r", "p", "200", 3]]
    assert total["request_duration"]["r"][-1] == 3
    assert shared.read(1) is not None and SharedSnapshots(1).read(0) is None


def test_rate_limit_snapshots_merge_and_render() -> None:
    from pyproxy.observe.metrics import merge_ratelimit, render

    worker = {
        "mode": "redis", "decisions": [["api", "", "allowed", 5], ["api", "key", "denied", 2]],
        "fallbacks": 1, "blocks": 1, "adaptive": {"global[0]": {"pool": "p", "limit": 40}},
        "table_overflows": 0,
        "redis": {"healthy": True, "round_trips": 7, "errors": 1,
                  "latency_counts": [0, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0], "latency_sum": 0.004},
    }
    merged = merge_ratelimit([worker, {**worker, "redis": {**worker["redis"], "healthy": False}}])
    assert sorted(map(tuple, merged["decisions"])) == [("api", "", "allowed", 10), ("api", "key", "denied", 4)]
    assert merged["blocks"] == 2 and merged["fallbacks"] == 2 and merged["mode"] == "redis"
    assert merged["redis"]["round_trips"] == 14 and merged["redis"]["healthy"] is False
    text = render(lambda: {**merge([]), "ratelimit": merged}).decode()
    assert "pyproxy_ratelimit_blocks_total 2.0" in text
    assert 'pyproxy_ratelimit_redis_duration_seconds_bucket{le="0.001"} 14.0' in text
    assert "pyproxy_ratelimit_redis_duration_seconds_count 14.0" in text
    assert "pyproxy_ratelimit_redis_up 0.0" in text
    assert 'pyproxy_ratelimit_adaptive_limit{name="global[0]"} 40.0' in text

"""Load balancing, health and resilience end to end: real sample upstreams on 127.0.0.1, the proxy
on its own loop (``ProxyServer(config).running()``), requests over real sockets.

Upstreams are counted by what they recorded (``SampleServer.requests``, health-check probes left
out), so every share and every "no request reached it" below is what the servers saw.
Durations are kept short (health interval 50 ms, ejection and open times 0.5 s) so the whole file
runs in well under a minute and a half on two cores.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from helpers import eventually, free_port, proxy_process
from pyproxy.config import Config, load_config, parse_config
from pyproxy.sample_server import RecordedRequest, SampleServer
from pyproxy.server import ProxyServer

# ----------------------------------------------------------------------------------------- helpers


def is_probe(request: RecordedRequest) -> bool:
    return request.header(b"user-agent") == b"pyproxy-health"


def served(server: SampleServer, since: int = 0) -> int:
    """Requests ``server`` recorded from index ``since`` on, health-check probes left out."""
    return sum(1 for r in server.requests[since:] if not is_probe(r))


def probes(server: SampleServer, since: int = 0) -> int:
    return sum(1 for r in server.requests[since:] if is_probe(r))


def mark(*servers: SampleServer) -> list[int]:
    """Where each server's request log ends now (for :func:`served` ``since``)."""
    return [len(s.requests) for s in servers]


def counts(servers: list[SampleServer], since: list[int] | None = None) -> list[int]:
    since = since or [0] * len(servers)
    return [served(s, m) for s, m in zip(servers, since)]


def make_config(upstreams: list[SampleServer], pool: dict[str, Any] | None = None,
                routes: list[dict[str, Any]] | None = None, admin: bool = False) -> Config:
    return parse_config(
        {
            "listeners": [{"port": 0}],
            "admin": {"enabled": admin, "port": 0},
            "pools": {"p": {"servers": [u.address for u in upstreams], **(pool or {})}},
            "routes": routes or [{"pool": "p"}],
        }
    )


@contextmanager
def proxy(*upstreams: SampleServer, pool: dict[str, Any] | None = None,
          routes: list[dict[str, Any]] | None = None, admin: bool = False,
          start_upstreams: bool = True) -> Iterator[ProxyServer]:
    """Start the upstreams (unless already running) and a proxy in front of them."""
    with ExitStack() as stack:
        if start_upstreams:
            for u in upstreams:
                stack.enter_context(u.running())
        server = stack.enter_context(ProxyServer(make_config(list(upstreams), pool, routes, admin)).running())
        yield server


class Client:
    """One keep-alive client connection (a new one after the proxy answered ``Connection: close``)."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.conn = http.client.HTTPConnection(*address, timeout=timeout)

    def request(self, method: str = "GET", path: str = "/", body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body)."""
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.will_close:
            self.conn.close()  # http.client connects again for the next request
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def get(self, path: str = "/", headers: dict[str, str] | None = None) -> int:
        return self.request("GET", path, headers=headers)[0]

    def close(self) -> None:
        self.conn.close()


def send_until(client: Client, done: Callable[[], bool], what: str, seconds: float) -> None:
    """GET after GET until ``done()``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        client.get()


def share(values: list[int]) -> list[float]:
    total = sum(values)
    return [v / total for v in values]


# --------------------------------------------------------------------------- 1. static algorithms


def test_weighted_round_robin_random_and_round_robin_shares() -> None:
    a, b = SampleServer(name="a"), SampleServer(name="b")
    n = 2000
    results: dict[str, list[float]] = {}
    with a.running(), b.running():
        weighted = [{"address": a.address, "weight": 3}, {"address": b.address, "weight": 1}]
        for algorithm in ("weighted_round_robin", "random", "round_robin"):
            with proxy(a, b, pool={"balance": algorithm, "servers": weighted}, start_upstreams=False) as server:
                before = mark(a, b)
                client = Client(server.addresses[0])
                names = []
                for _ in range(n):
                    status, _, body = client.request("GET", "/")
                    assert status == 200
                    names.append(json.loads(body)["server"])
                client.close()
            got = counts([a, b], before)
            assert sum(got) == n and got == [names.count("a"), names.count("b")]
            results[algorithm] = share(got)
            if algorithm == "round_robin":
                assert names[:6] in (list("ababab"), list("bababa")), names[:6]  # weights ignored
                assert all(x != y for x, y in zip(names, names[1:])), "round robin alternates"
            if algorithm == "weighted_round_robin":
                # Smooth WRR spreads the heavy server's turns: never more than 3 in a row.
                assert "aaaa" not in "".join(names)
    print("share of a (weight 3 of 4):", {k: round(v[0], 3) for k, v in results.items()})
    assert abs(results["weighted_round_robin"][0] - 0.75) <= 0.05, results
    assert abs(results["random"][0] - 0.75) <= 0.10, results
    assert results["round_robin"] == [0.5, 0.5], results


# --------------------------------------------------------------- 2. latency-aware algorithms


class Load:
    """``threads`` clients, each on its own keep-alive connection, sending GETs back to back;
    every answer is logged as (time, server name)."""

    def __init__(self, address: tuple[str, int], threads: int = 8, headers: dict[str, str] | None = None) -> None:
        self.address = address
        self.log: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.headers = headers

    def _run(self) -> None:
        client = Client(self.address)
        try:
            while not self._stop.is_set():
                status, _, body = client.request("GET", "/", headers=self.headers)
                name = json.loads(body)["server"] if status == 200 else f"status {status}"
                with self._lock:
                    self.log.append((time.monotonic(), name))
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))
        finally:
            client.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def window(self, start: float, end: float) -> Counter[str]:
        with self._lock:
            return Counter(name for at, name in self.log if start <= at < end)


@pytest.mark.parametrize(("pool", "slow_share"), [
    # Weights × exp(-(latency/best - 1) / 2): a 5× slower server keeps ~12%.
    ({"balance": "weighted_round_robin", "dynamic": True}, 0.05),
    # Cost √latency × (in flight + 1): a 5× slower server settles near 1 / (1 + 5^1.5) ≈ 8%.
    ({"balance": "least_connections"}, 0.05),
], ids=["dynamic_wrr", "least_connections"])
def test_latency_aware_algorithms_favour_the_fast_server_and_follow_a_swap(pool: dict[str, Any], slow_share: float) -> None:
    fast, slow = SampleServer(name="fast", latency=0.01), SampleServer(name="slow", latency=0.05)
    with proxy(fast, slow, pool=pool) as server, Load(server.addresses[0], threads=8) as load:
        t0 = time.monotonic()
        time.sleep(2.5)
        before = load.window(t0 + 0.5, time.monotonic())  # after the first samples
        # Swap: the fast server turns slow and the slow one fast, while the load runs.
        fast.latency, slow.latency = 0.05, 0.01
        swapped = time.monotonic()
        time.sleep(3.0)
        after = load.window(swapped + 1.0, time.monotonic())  # shifted within a second
    assert not load.errors, load.errors
    assert set(before) <= {"fast", "slow"} and set(after) <= {"fast", "slow"}, (before, after)
    print(f"{pool['balance']}: before swap {dict(before)}, after swap {dict(after)}")
    assert before["fast"] >= 2 * before["slow"], before
    assert before["slow"] >= slow_share * (before["fast"] + before["slow"]), before
    # The server that is fast now ("slow" by name) gets the larger share, by as much.
    assert after["slow"] >= 2 * after["fast"], f"the shares follow the swap: {after}"
    assert after["fast"] >= slow_share * (after["fast"] + after["slow"]), after


# ------------------------------------------------------------------------- 3. consistent hashing


def admin_call(server: ProxyServer | int, method: str, path: str, body: object = None,
               raw_body: bytes | None = None) -> tuple[int, Any]:
    """One admin API request: (status, parsed JSON or text)."""
    if isinstance(server, int):
        port = server
    else:
        assert server.admin is not None and server.admin.address is not None
        port = server.admin.address[1]
    data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, text = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode()


def upstream_view(server: ProxyServer | int, pool: str = "p") -> dict[str, dict[str, Any]]:
    """``GET /upstreams``: pool ``pool``'s servers by id."""
    status, body = admin_call(server, "GET", "/upstreams")
    assert status == 200, body
    return {s["id"]: s for s in body[pool]["servers"]}


def key_map(address: tuple[str, int], keys: list[str]) -> dict[str, str]:
    """Which server answers each ``X-User`` key."""
    client = Client(address)
    out = {}
    for key in keys:
        status, _, body = client.request("GET", "/", headers={"X-User": key})
        assert status == 200, (key, status, body)
        out[key] = json.loads(body)["server"]
    client.close()
    return out


def test_consistent_hash_is_stable_remaps_minimally_and_fails_over() -> None:
    names = [f"s{i}" for i in range(5)]
    ups = {n: SampleServer(name=n) for n in names}
    keys = [f"user-{i}" for i in range(300)]
    with ExitStack() as outer:
        stacks = {n: outer.enter_context(ExitStack()) for n in names}
        for n, u in ups.items():
            stacks[n].enter_context(u.running())
        pool = {
            "balance": "consistent_hash",
            "hash_key": "header:X-User",
            "health_check": {"interval": "50ms", "timeout": "40ms", "fall": 1, "rise": 1},
        }
        upstreams = list(ups.values())
        with proxy(*upstreams, pool=pool, admin=True, start_upstreams=False) as server:
            addr = server.addresses[0]
            first = key_map(addr, keys)
            again = key_map(addr, keys)
            assert first == again, "the same key goes to the same server"
            per_server = Counter(first.values())
            assert set(per_server) == set(names), per_server  # 300 keys spread over all 5
            assert min(per_server.values()) >= 20, per_server

            # A key-less request uses the fallback (round robin): served, and spread out.
            client = Client(addr)
            fallback = Counter(json.loads(client.request("GET", "/")[2])["server"] for _ in range(10))
            client.close()
            assert sum(fallback.values()) == 10 and len(fallback) == 5, fallback

        # A new proxy (restart) maps every key the same way.
        with proxy(*upstreams, pool=pool, admin=True, start_upstreams=False) as server:
            addr = server.addresses[0]
            assert key_map(addr, keys) == first, "stable across restarts"

            # Remove s4 at run time: only its keys move.
            gone = ups["s4"]
            status, body = admin_call(server, "DELETE", f"/upstreams/p/servers/{gone.address}")
            assert status == 202, body
            eventually(lambda: gone.address not in upstream_view(server), "s4 to leave the pool", 5)
            before = served(gone)
            removed = key_map(addr, keys)
            assert served(gone) == before, "nothing reaches a removed server"
            moved = {k for k in keys if removed[k] != first[k]}
            assert moved == {k for k in keys if first[k] == "s4"}, "only the removed server's keys move"
            assert "s4" not in removed.values()

            # s1 goes down (its listener stops): health checks take it out, its keys go elsewhere,
            # every other key stays; when it is back its keys return.
            down = ups["s1"]
            down_id = down.address
            stacks["s1"].close()
            eventually(lambda: upstream_view(server)[down_id]["healthy"] is False, "s1 marked down", 5)
            failed_over = key_map(addr, keys)
            for k in keys:
                if removed[k] == "s1":
                    assert failed_over[k] not in ("s1", "s4"), k
                else:
                    assert failed_over[k] == removed[k], k
            revived = SampleServer(port=down.port, name="s1")
            stacks["s1"].enter_context(revived.running())
            eventually(lambda: upstream_view(server)[down_id]["healthy"] is True, "s1 back up", 5)
            assert key_map(addr, keys) == removed, "keys come back to the recovered server"
            assert served(revived) == sum(1 for k in keys if removed[k] == "s1")


# ----------------------------------------------------------------------- 4. active health checks


def test_health_checks_take_a_failing_server_out_after_fall_and_back_after_rise() -> None:
    a, b = SampleServer(name="a"), SampleServer(name="b")
    hc = {"interval": "50ms", "timeout": "40ms", "fall": 3, "rise": 2}
    with proxy(a, b, pool={"health_check": hc}, admin=True) as server:
        client = Client(server.addresses[0])
        assert Counter(client.get() for _ in range(20)) == {200: 20}
        assert served(b) == 10
        # b's checks start failing (its /healthz answers 500; so would everything else).
        start = len(b.requests)
        t0 = time.monotonic()
        b.mode = "error"
        eventually(lambda: upstream_view(server)[b.address]["healthy"] is False, "b to fail", 5)
        took = time.monotonic() - t0
        assert probes(b, start) >= 3, "out only after `fall` failed checks"
        assert took < 1.5, took
        assert upstream_view(server)[b.address]["state"] == "down"
        # No request reaches it while it is out.
        m = mark(b)
        assert Counter(client.get() for _ in range(100)) == {200: 100}
        assert counts([b], m) == [0]
        # Fixed: back after `rise` passed checks, and gets its share again.
        back_from = len(b.requests)
        b.mode = "ok"
        eventually(lambda: upstream_view(server)[b.address]["healthy"] is True, "b to recover", 5)
        assert probes(b, back_from) >= 2, "back only after `rise` passed checks"
        m = mark(a, b)
        assert Counter(client.get() for _ in range(100)) == {200: 100}
        assert counts([a, b], m) == [50, 50]
        client.close()


# -------------------------------------------------------------------- 5. passive outlier ejection


def test_outlier_ejection_keeps_a_failing_server_out_for_base_ejection_time() -> None:
    a, b = SampleServer(name="a"), SampleServer(name="b", mode="error")
    outlier = {"consecutive_failures": 3, "error_rate_threshold": 0, "base_ejection_time": "500ms",
               "max_ejection_time": "2s"}
    with proxy(a, b, pool={"outlier": outlier}, admin=True) as server:
        client = Client(server.addresses[0])
        statuses = Counter(client.get() for _ in range(6))  # round robin: 3 to b, all 500
        assert statuses == {200: 3, 500: 3}, statuses
        ejected_at = time.monotonic()
        view = upstream_view(server)[b.address]
        assert view["ejected"] is True and view["ejections"] == 1 and view["state"] == "down", view
        b.mode = "ok"  # fixed meanwhile: still out until the ejection ends
        m = mark(b)
        while time.monotonic() - ejected_at < 0.4:
            assert client.get() == 200
        assert counts([b], m) == [0], "no request during base_ejection_time"
        # Returned within base_ejection_time + the pool's tick (0.25 s).
        send_until(client, lambda: served(b, m[0]) > 0, "b to return", 3)
        returned = time.monotonic() - ejected_at
        assert 0.45 <= returned <= 1.2, returned
        assert upstream_view(server)[b.address]["ejected"] is False
        m = mark(a, b)
        assert Counter(client.get() for _ in range(20)) == {200: 20}
        assert counts([a, b], m) == [10, 10]
        client.close()


@pytest.mark.parametrize("mode", ["close", "silent", "truncate"])
def test_failures_that_are_not_retried_still_count_toward_ejection(mode: str) -> None:
    # POST is never retried: the failure is answered (502 / 504) or the response broken off, and
    # must still count against the server (it used to be fed to the detector as a success).
    a, b = SampleServer(name="a"), SampleServer(name="b", mode=mode)  # type: ignore[arg-type]
    outlier = {"consecutive_failures": 3, "error_rate_threshold": 0, "base_ejection_time": "5s",
               "max_ejection_time": "5s"}
    with proxy(a, b, pool={"outlier": outlier, "response_timeout": "100ms"}, admin=True) as server:
        outcomes: Counter[object] = Counter()
        for _ in range(20):
            client = Client(server.addresses[0])
            try:
                outcomes[client.request("POST", "/x", body=b"data")[0]] += 1
            except http.client.HTTPException:
                outcomes["broken"] += 1  # a truncated body: the connection is cut
            client.close()
        assert served(b) == 3, (served(b), outcomes)
        assert outcomes[200] == 17 and sum(outcomes.values()) == 20, outcomes
        view = upstream_view(server)[b.address]
        assert view["ejected"] is True and view["ejections"] == 1, view


def test_a_client_that_leaves_early_is_not_the_servers_failure() -> None:
    a, b = SampleServer(name="a"), SampleServer(name="b", latency=0.3)
    pool = {"outlier": {"consecutive_failures": 2, "error_rate_threshold": 0, "base_ejection_time": "5s",
                        "max_ejection_time": "5s"},
            "circuit_breaker": {"consecutive_failures": 2, "failure_ratio": 0}}
    with proxy(a, b, pool=pool, admin=True) as server:
        for _ in range(8):  # half of them to b, each given up on after 50 ms
            with socket.create_connection(server.addresses[0], timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.05)
        eventually(lambda: upstream_view(server)[b.address]["in_flight"] == 0, "abandoned requests released", 3)
        assert served(b) == 4
        view = upstream_view(server)[b.address]
        assert view["ejected"] is False and view["breaker"] == "closed" and view["state"] == "up", view
        client = Client(server.addresses[0])
        m = mark(a, b)
        assert Counter(client.get() for _ in range(4)) == {200: 4}
        assert counts([a, b], m) == [2, 2]
        client.close()


# ------------------------------------------------------------------------------ 6. circuit breaker


def test_circuit_breaker_opens_probes_half_open_and_closes() -> None:
    a, b = SampleServer(name="a"), SampleServer(name="b", mode="error")
    breaker = {"consecutive_failures": 3, "failure_ratio": 0, "base_open_time": "500ms",
               "max_open_time": "2s", "jitter": 0, "success_threshold": 2}
    with proxy(a, b, pool={"circuit_breaker": breaker}, admin=True) as server:
        client = Client(server.addresses[0])
        assert Counter(client.get() for _ in range(6)) == {200: 3, 500: 3}
        opened = time.monotonic()
        view = upstream_view(server)[b.address]
        assert view["breaker"] == "open" and view["state"] == "down", view
        # Open: nothing reaches b for base_open_time.
        m = mark(b)
        while time.monotonic() - opened < 0.4:
            assert client.get() == 200
        assert counts([b], m) == [0]
        # Half-open after base_open_time (+ the 0.25 s tick): exactly one probe; it fails
        # (still broken), so the breaker opens again, now for twice as long.
        send_until(client, lambda: served(b, m[0]) > 0, "a half-open probe", 3)
        assert 0.45 <= time.monotonic() - opened <= 1.2
        reopened = time.monotonic()
        assert served(b, m[0]) == 1, "one probe at a time"
        assert upstream_view(server)[b.address]["breaker"] == "open"
        m = mark(b)
        while time.monotonic() - reopened < 0.85:  # second opening: 1 s
            assert client.get() == 200
        assert counts([b], m) == [0], "open again after a failed probe"
        # Fixed: the next probes succeed; success_threshold (2) of them close the breaker.
        b.mode = "ok"
        send_until(client, lambda: served(b, m[0]) >= 2, "two successful probes", 3)
        eventually(lambda: upstream_view(server)[b.address]["breaker"] == "closed", "breaker closed", 2)
        m = mark(a, b)
        assert Counter(client.get() for _ in range(20)) == {200: 20}
        assert counts([a, b], m) == [10, 10]
        client.close()


# ------------------------------------------------------------------------------------ 7. bulkhead


def concurrently(address: tuple[str, int], n: int, path: str = "/", stagger: float = 0.0) -> list[tuple[int, dict[str, str], bytes, float]]:
    """``n`` GETs at once, each on its own connection: (status, headers, body, seconds) each,
    in the order they were sent."""
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        client = Client(address)
        t0 = time.monotonic()
        status, headers, body = client.request("GET", path)
        results[i] = (status, headers, body, time.monotonic() - t0)
        client.close()

    threads = []
    for i in range(n):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        time.sleep(stagger)
    for t in threads:
        t.join(timeout=15)
    assert all(r is not None for r in results), results
    return results


def test_bulkhead_limits_the_pool_and_each_server() -> None:
    slow = SampleServer(name="slow", latency=0.4)
    bulkhead = {"max_concurrent": 2, "max_queue": 1, "queue_timeout": "3s"}
    with proxy(slow, pool={"bulkhead": bulkhead}) as server:
        results = concurrently(server.addresses[0], 4, stagger=0.03)
    statuses = [r[0] for r in results]
    assert statuses == [200, 200, 200, 503], results
    assert results[3][3] < 0.3, "the one over queue + slots is refused at once"
    assert b"concurrency limit" in results[3][2]
    assert 0.7 <= results[2][3] < 1.5, "the queued one waited for a slot, then was served"
    assert served(slow) == 3

    a, b = SampleServer(name="a", latency=0.4), SampleServer(name="b", latency=0.4)
    with proxy(a, b, pool={"bulkhead": {"max_concurrent_per_server": 1}}) as server:
        results = concurrently(server.addresses[0], 3, stagger=0.03)
    assert sorted(r[0] for r in results) == [200, 200, 503], results
    refused = next(r for r in results if r[0] == 503)
    assert b"can take the request" in refused[2] and refused[3] < 0.3
    assert counts([a, b]) == [1, 1], "one request at a time per server"


# ------------------------------------------------------------------------------------- 8. retries


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text (``AssertionError`` when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    raise AssertionError(f"no series {name}{{{want}}} in /metrics")


def test_retries_go_to_another_server_within_the_budget_and_only_when_safe() -> None:
    bad, good = SampleServer(name="bad", mode="close"), SampleServer(name="good")
    routes: list[dict[str, Any]] = [{"pool": "p", "path_prefix": "/idem", "idempotent": True}, {"pool": "p"}]
    retry = {"attempts": 1, "budget_percent": 100, "backoff_base": "1ms", "backoff_max": "5ms"}
    with proxy(bad, good, pool={"retry": retry}, routes=routes, admin=True) as server:
        client = Client(server.addresses[0])
        # GETs: every one that went to the failing server first is sent again to the good one.
        assert Counter(client.get("/x") for _ in range(100)) == {200: 100}
        assert served(good) == 100
        assert served(bad) >= 40, "round robin sent about half to the bad server first"
        retried = served(bad)
        _, text = admin_call(server, "GET", "/metrics")
        assert metric(text, "pyproxy_upstream_retries_total", pool="p") == retried

        # POST with a body: never sent twice. Those that went to the bad server get a 502.
        m = mark(bad, good)
        statuses = Counter(client.request("POST", "/x", body=b"payload")[0] for _ in range(20))
        got_bad, got_good = counts([bad, good], m)
        assert statuses == {502: got_bad, 200: got_good} and got_bad > 0, (statuses, got_bad, got_good)
        # A route marked idempotent: a POST without a body is retried...
        m = mark(bad, good)
        statuses = Counter(client.request("POST", "/idem/x", body=b"")[0] for _ in range(20))
        assert statuses == {200: 20} and counts([bad], m)[0] > 0, statuses
        # ...but not one with a body (it was streamed; we no longer have it).
        m = mark(bad, good)
        statuses = Counter(client.request("POST", "/idem/x", body=b"data")[0] for _ in range(20))
        assert statuses[502] == counts([bad], m)[0] > 0, statuses
        client.close()

    # A 5xx listed in on_statuses is retried too (the error answer is not relayed).
    bad, good = SampleServer(name="bad", mode="error"), SampleServer(name="good")
    with proxy(bad, good, pool={"retry": {**retry, "on_statuses": [500, 502]}}) as server:
        client = Client(server.addresses[0])
        assert Counter(client.get("/x") for _ in range(40)) == {200: 40}
        assert served(bad) >= 15
        client.close()


def test_no_retry_when_no_other_server_can_take_it() -> None:
    # The only other server is draining: the failure is answered as it is (502), not turned into
    # a 503 "no server can take the request", and no retry is spent.
    bad, good = SampleServer(name="bad", mode="close"), SampleServer(name="good")
    with proxy(bad, good, admin=True) as server:
        assert admin_call(server, "PATCH", f"/upstreams/p/servers/{good.address}", {"drain": True})[0] == 200
        client = Client(server.addresses[0])
        status, headers, body = client.request("GET", "/x")
        client.close()
        assert status == 502 and b"closed the connection" in body and "retry-after" not in headers, body
        assert served(good) == 0
        _, text = admin_call(server, "GET", "/metrics")
        assert metric(text, "pyproxy_upstream_retries_total", pool="p") == 0


def test_retry_budget_caps_retries_while_a_server_fails() -> None:
    bad, good = SampleServer(name="bad", mode="close"), SampleServer(name="good")
    retry = {"attempts": 1, "budget_percent": 10, "min_retries_per_window": 0, "budget_window": "30s",
             "backoff_base": "1ms", "backoff_max": "5ms"}
    n = 400
    with proxy(bad, good, pool={"retry": retry}, admin=True) as server:
        client = Client(server.addresses[0])
        statuses = Counter(client.get("/x") for _ in range(n))
        _, text = admin_call(server, "GET", "/metrics")
        client.close()
    # Every request that went to the bad server first failed unless a retry was granted.
    first_to_bad = served(bad)
    retries = first_to_bad - statuses[502]
    print(f"budget: {n} requests, {first_to_bad} to the bad server, {retries} retried, {statuses}")
    assert statuses[200] + statuses[502] == n
    assert served(good) == statuses[200]
    assert 0 < retries <= 0.10 * n + 2, retries
    assert retries >= 0.10 * n - 5, "the budget is used, not just capped"
    assert metric(text, "pyproxy_upstream_retries_total", pool="p") == retries
    assert metric(text, "pyproxy_upstream_retry_budget_exhausted_total", pool="p") == statuses[502]


# ------------------------------------------------------------------------------ 9. all unhealthy


def test_all_unhealthy_reject_answers_503_with_retry_after_and_panic_still_serves() -> None:
    a, b = SampleServer(name="a"), SampleServer(name="b")
    # Every check fails (/status/503), every server is soon down.
    hc = {"path": "/status/503", "interval": "50ms", "timeout": "40ms", "fall": 1, "rise": 1}
    with a.running(), b.running():
        with proxy(a, b, pool={"health_check": hc, "on_all_unhealthy": "reject"}, admin=True,
                   start_upstreams=False) as server:
            eventually(lambda: all(not s["healthy"] for s in upstream_view(server).values()), "all down", 5)
            m = mark(a, b)
            client = Client(server.addresses[0])
            status, headers, body = client.request("GET", "/x")
            assert status == 503, (status, body)
            assert headers.get("retry-after", "").isdigit() and int(headers["retry-after"]) >= 1, headers
            assert b"no server of pool 'p' can take the request" in body
            assert not headers.get("connection") == "close", "the connection stays usable"
            assert client.get("/x") == 503
            client.close()
            assert counts([a, b], m) == [0, 0]
            _, text = admin_call(server, "GET", "/metrics")
            assert metric(text, "pyproxy_upstream_rejected_total", pool="p", reason="unhealthy") == 2
            assert metric(text, "pyproxy_upstream_server_up", pool="p", server=a.address) == 0
        # A breaker open on the only server: Retry-After says when it will let a probe through.
        with proxy(a, pool={"on_all_unhealthy": "reject", "circuit_breaker": {
                "consecutive_failures": 2, "failure_ratio": 0, "base_open_time": "3s", "jitter": 0}},
                start_upstreams=False) as server:
            a.mode = "error"
            client = Client(server.addresses[0])
            assert [client.get() for _ in range(2)] == [500, 500]
            status, headers, body = client.request("GET", "/x")
            assert status == 503 and headers.get("retry-after") == "3", (status, headers, body)
            client.close()
            a.mode = "ok"
        with proxy(a, b, pool={"health_check": hc, "on_all_unhealthy": "panic"}, admin=True,
                   start_upstreams=False) as server:
            eventually(lambda: all(not s["healthy"] for s in upstream_view(server).values()), "all down", 5)
            m = mark(a, b)
            client = Client(server.addresses[0])
            assert Counter(client.get("/x") for _ in range(10)) == {200: 10}
            client.close()
            assert counts([a, b], m) == [5, 5], "panic: every server is used anyway"
            _, text = admin_call(server, "GET", "/metrics")
            assert metric(text, "pyproxy_upstream_panics_total", pool="p") == 10


# ------------------------------------------------------------------- 10. run-time pool changes


def write_config(path: Path, port: int, admin_port: int, servers: list[str], *, workers: int = 1,
                 extra: str = "") -> Path:
    path.write_text(
        f"workers = {workers}\n[[listeners]]\nport = {port}\n[admin]\nport = {admin_port}\n"
        f'[pools.p]\nbalance = "weighted_round_robin"\nservers = {json.dumps(servers)}\n{extra}'
        f'[pools.q]\nservers = {json.dumps(servers[:1])}\n'
        '[[routes]]\npool = "p"\n'
    )
    return path


SERVER_FIELDS = {"id", "state", "healthy", "ejected", "ejections", "breaker", "weight", "effective_weight",
                 "ewma_latency_seconds", "error_rate", "in_flight", "workers"}


def test_admin_changes_pools_at_run_time_and_keeps_them_across_reloads(tmp_path: Path) -> None:
    # a and b answer after 3 ms: a latency the proxy's millisecond loop clock can see.
    a, b = SampleServer(name="a", latency=0.003), SampleServer(name="b", latency=0.003)
    c, d = SampleServer(name="c"), SampleServer(name="d")
    with a.running(), b.running(), c.running(), d.running():
        port, admin_port = free_port(), free_port()
        cfg = write_config(tmp_path / "p.toml", port, admin_port, [a.address, b.address])
        server = ProxyServer(load_config(cfg), cfg)
        with server.running():
            client = Client(("127.0.0.1", port))

            def send(n: int) -> list[int]:
                m = mark(a, b, c, d)
                assert Counter(client.get() for _ in range(n)) == {200: n}
                return counts([a, b, c, d], m)

            status, view = admin_call(admin_port, "GET", "/upstreams")
            assert status == 200 and set(view) == {"p", "q"}
            assert view["p"]["balance"] == "weighted_round_robin"
            assert {"retries", "rejected_unhealthy", "rejected_bulkhead", "panics"} <= set(view["p"]["counters"])
            send(10)
            servers = upstream_view(admin_port)
            assert set(servers) == {a.address, b.address}
            for s in servers.values():
                assert set(s) >= SERVER_FIELDS, s
                assert s["state"] == "up" and s["healthy"] is True and s["breaker"] == "disabled"
                assert s["ejections"] == 0 and s["in_flight"] == 0 and s["effective_weight"] == 1.0
                assert s["workers"] == 1
                assert 0.002 <= s["ewma_latency_seconds"] < 0.5, s

            # POST: a new server takes its share at once.
            status, body = admin_call(admin_port, "POST", "/upstreams/p/servers", {"address": c.address, "weight": 1})
            assert status == 201, body
            assert body["change"]["op"] == "add" and set(body["servers"]) == {a.address, b.address, c.address}
            assert send(30) == [10, 10, 10, 0]
            # PATCH weight: shares follow (1:1:4).
            status, body = admin_call(admin_port, "PATCH", f"/upstreams/p/servers/{c.address}", {"weight": 4})
            assert status == 200 and body["servers"][c.address]["weight"] == 4, body
            assert upstream_view(admin_port)[c.address]["weight"] == 4
            got = send(120)
            assert abs(got[2] - 80) <= 3 and abs(got[0] - 20) <= 2, got
            # PATCH drain: no new requests; undrain: back.
            assert admin_call(admin_port, "PATCH", f"/upstreams/p/servers/{c.address}", {"drain": True})[0] == 200
            assert upstream_view(admin_port)[c.address]["state"] == "draining"
            assert send(30)[2] == 0
            assert admin_call(admin_port, "PATCH", f"/upstreams/p/servers/{c.address}", {"drain": False})[0] == 200
            assert upstream_view(admin_port)[c.address]["state"] == "up"
            assert send(30)[2] >= 15

            # Errors.
            assert admin_call(admin_port, "POST", "/upstreams/nope/servers", {"address": d.address})[0] == 404
            assert admin_call(admin_port, "PATCH", "/upstreams/p/servers/127.0.0.1:1", {"weight": 2})[0] == 404
            assert admin_call(admin_port, "DELETE", "/upstreams/nope/servers/127.0.0.1:1")[0] == 404
            status, body = admin_call(admin_port, "POST", "/upstreams/p/servers", {"address": a.address})
            assert status == 409 and "already" in body["error"], body
            status, body = admin_call(admin_port, "POST", "/upstreams/p/servers", raw_body=b"{not json")
            assert status == 400 and "JSON" in body["error"], body
            assert admin_call(admin_port, "POST", "/upstreams/p/servers", {"address": "nonsense"})[0] == 400
            assert admin_call(admin_port, "PATCH", f"/upstreams/p/servers/{c.address}", {"weight": -1})[0] == 400
            assert admin_call(admin_port, "PATCH", f"/upstreams/p/servers/{c.address}", {"colour": 1})[0] == 400
            assert admin_call(admin_port, "DELETE", f"/upstreams/q/servers/{a.address}")[0] == 409  # last one
            assert admin_call(admin_port, "PUT", f"/upstreams/p/servers/{c.address}", {})[0] == 405

            # DELETE while a slow request is in flight on it: it finishes with 200, then the server
            # leaves the pool and gets nothing more.
            c.latency = 1.0
            results: list[Any] = []
            before_c = served(c)
            m = mark(a, b, c)
            flights = [threading.Thread(target=lambda: results.append(Client(("127.0.0.1", port)).request("GET", "/slow")))
                       for _ in range(3)]
            for t in flights:
                t.start()
            eventually(lambda: sum(counts([a, b, c], m)) == 3, "the three requests sent upstream", 5)
            assert served(c) > before_c, "c (weight 4 of 6) has at least one of them in flight"
            status, body = admin_call(admin_port, "DELETE", f"/upstreams/p/servers/{c.address}")
            assert status == 202 and c.address not in body["servers"], body
            view_c = upstream_view(admin_port)[c.address]
            assert view_c["state"] == "draining" and view_c["in_flight"] >= 1, view_c
            in_flight_on_c = served(c) - before_c
            for t in flights:
                t.join(timeout=10)
            assert [r[0] for r in results] == [200, 200, 200], results
            assert sum(json.loads(r[2])["server"] == "c" for r in results) == in_flight_on_c
            eventually(lambda: c.address not in upstream_view(admin_port), "c to leave the pool", 5)
            # ...and the connections the proxy kept alive to it are closed, not left for idle_timeout.
            eventually(lambda: not c._connections, "no connection left open to c", 3)
            assert send(30)[2] == 0
            assert admin_call(admin_port, "PATCH", f"/upstreams/p/servers/{c.address}", {"weight": 1})[0] == 404

            # Changes survive a reload that leaves the pool as it was...
            assert admin_call(admin_port, "POST", "/upstreams/p/servers", {"address": d.address})[0] == 201
            assert admin_call(admin_port, "POST", "/reload")[0] == 200
            assert set(upstream_view(admin_port)) == {a.address, b.address, d.address}
            assert send(30) == [10, 10, 0, 10]
            # ...and are dropped when the configuration changes the pool.
            write_config(cfg, port, admin_port, [a.address, b.address], extra="max_idle_per_server = 8\n")
            assert admin_call(admin_port, "POST", "/reload")[0] == 200
            assert set(upstream_view(admin_port)) == {a.address, b.address}
            assert send(30) == [15, 15, 0, 0]
            # The model the admin API validates against was reset too: d can be added again.
            assert admin_call(admin_port, "POST", "/upstreams/p/servers", {"address": d.address})[0] == 201
            assert send(30)[3] == 10
            client.close()


def test_a_server_added_again_while_its_removal_drains_stays_in_the_pool() -> None:
    a, c = SampleServer(name="a"), SampleServer(name="c", latency=0.6)
    with proxy(a, c, admin=True) as server:
        address = server.addresses[0]
        results: list[int] = []
        flights = [threading.Thread(target=lambda: results.append(Client(address).get())) for _ in range(2)]
        for t in flights:
            t.start()
        eventually(lambda: served(c) == 1 and served(a) == 1, "one request in flight on c", 5)
        assert admin_call(server, "DELETE", f"/upstreams/p/servers/{c.address}")[0] == 202
        status, body = admin_call(server, "POST", "/upstreams/p/servers", {"address": c.address, "weight": 2})
        assert status == 201 and c.address in body["servers"], body
        for t in flights:
            t.join(timeout=10)
        assert results == [200, 200]
        # The API said 201: the worker must agree once the in-flight request is done.
        view = upstream_view(server)
        assert c.address in view and view[c.address]["state"] == "up" and view[c.address]["weight"] == 2, view
        c.latency = 0
        client = Client(address)
        m = mark(a, c)
        assert Counter(client.get() for _ in range(10)) == {200: 10}
        assert counts([a, c], m) == [5, 5]  # round robin: weights ignored
        client.close()


def test_admin_changes_reach_every_worker(tmp_path: Path) -> None:
    a, b, c = (SampleServer(name=n) for n in "abc")
    with a.running(), b.running(), c.running():
        port, admin_port = free_port(), free_port()
        cfg = write_config(tmp_path / "p.toml", port, admin_port, [a.address, b.address], workers=2)

        def ready() -> bool:
            try:
                return admin_call(admin_port, "GET", "/readyz")[0] == 200
            except OSError:
                return False

        def send(n: int) -> Counter[str]:
            names: Counter[str] = Counter()
            for _ in range(n):  # a new connection each: both workers take some
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    names[json.loads(resp.read())["server"]] += 1
            return names

        with proxy_process(cfg, port):
            eventually(ready, "both workers up")
            eventually(lambda: set(upstream_view(admin_port)) == {a.address, b.address}, "workers' views")
            status, body = admin_call(admin_port, "POST", "/upstreams/p/servers", {"address": c.address})
            assert status == 201, body
            # Each worker publishes its view every second: c shows up in both.
            eventually(lambda: upstream_view(admin_port).get(c.address, {}).get("workers") == 2,
                       "c in both workers", 5)
            assert upstream_view(admin_port)[c.address]["state"] == "up"
            got = send(90)
            assert got["c"] >= 15, got
            # Every worker sends to c over its own kept-alive connection: two connections.
            assert c.accepts == 2, c.accepts
            status, _ = admin_call(admin_port, "DELETE", f"/upstreams/p/servers/{c.address}")
            assert status == 202
            eventually(lambda: c.address not in upstream_view(admin_port), "c gone from both workers", 5)
            eventually(lambda: not c._connections, "both workers closed their connections to c", 3)
            m = mark(c)
            assert send(30)["c"] == 0 and counts([c], m) == [0]


def test_consistent_hash_affinity_holds_across_workers(tmp_path: Path) -> None:
    """Placement is a fixed hash of the key (HashRing, MurmurHash64A seed 0): every worker process
    maps a key to the same server, whichever worker the kernel hands a connection to."""
    ups = [SampleServer(name=n) for n in "abcd"]
    with ExitStack() as stack:
        for u in ups:
            stack.enter_context(u.running())
        port, admin_port = free_port(), free_port()
        cfg = tmp_path / "hash.toml"
        cfg.write_text(
            f"workers = 2\n[[listeners]]\nport = {port}\n[admin]\nport = {admin_port}\n"
            f'[pools.p]\nbalance = "consistent_hash"\nhash_key = "cookie:session"\n'
            f"servers = {json.dumps([u.address for u in ups])}\n"
            '[[routes]]\npool = "p"\n'
        )
        keys = [f"s{i}" for i in range(40)]
        with proxy_process(cfg, port):
            eventually(lambda: admin_call(admin_port, "GET", "/readyz")[0] == 200, "both workers up")
            seen: dict[str, set[str]] = {k: set() for k in keys}
            for _ in range(3):
                for key in keys:  # a new connection per request: both workers take some
                    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Cookie": f"a=1; session={key}"})
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        seen[key].add(json.loads(resp.read())["server"])
        assert all(len(servers) == 1 for servers in seen.values()), seen
        used = {next(iter(v)) for v in seen.values()}
        assert len(used) >= 3, "keys spread over the servers"
        # Both workers served: each opens its own kept-alive connections, so the servers saw more
        # connections than one worker would open (one per server used).
        assert sum(u.accepts for u in ups) > len(used), [u.accepts for u in ups]


# --------------------------------------------------------------------------------------- hedging


def metrics_text(server: ProxyServer) -> str:
    status, text = admin_call(server, "GET", "/metrics")
    assert status == 200
    return str(text)


def test_hedging_sends_a_second_copy_and_the_first_answer_wins() -> None:
    slow, fast = SampleServer(name="slow", latency=0.4), SampleServer(name="fast")
    routes = [{"pool": "p", "hedge_after": "50ms"}]
    # Hedges count against the retry budget: a generous one here, the cap has its own test.
    pool = {"balance": "round_robin", "retry": {"budget_percent": 100}}
    with proxy(slow, fast, pool=pool, routes=routes, admin=True) as server:
        client = Client(server.addresses[0])
        m = mark(slow, fast)
        took = []
        for _ in range(6):
            start = time.monotonic()
            status, headers, body = client.request("GET", "/")
            took.append(time.monotonic() - start)
            assert status == 200 and json.loads(body)["server"] == "fast", body
        # Every request answered by the fast server: those sent to the slow one first were hedged
        # after 50 ms and won, well before the slow server's 400 ms.
        assert max(took) < 0.3, took
        first_tries, answered = counts([slow, fast], m)
        assert answered == 6 and first_tries >= 3, (first_tries, answered)
        text = metrics_text(server)
        assert metric(text, "pyproxy_upstream_hedges_total", pool="p") == first_tries
        assert metric(text, "pyproxy_upstream_hedge_wins_total", pool="p") == first_tries
        # The slow server's cancelled attempts are no verdict against it: still up, no failures.
        assert upstream_view(server)[slow.address]["state"] == "up"
        # A POST is not idempotent: never hedged; the one the slow server gets waits for it.
        m = mark(slow, fast)
        for _ in range(2):
            status, _, body = client.request("POST", "/")
            assert status == 200
        assert counts([slow, fast], m) == [1, 1]
        assert metric(metrics_text(server), "pyproxy_upstream_hedges_total", pool="p") == first_tries
        client.close()


def test_hedges_are_capped_by_the_retry_budget() -> None:
    slow, fast = SampleServer(name="slow", latency=0.15), SampleServer(name="fast")
    routes = [{"pool": "p", "hedge_after": "20ms"}]
    pool = {"balance": "round_robin", "retry": {"budget_percent": 10, "min_retries_per_window": 0}}
    with proxy(slow, fast, pool=pool, routes=routes, admin=True) as server:
        client = Client(server.addresses[0])
        for _ in range(40):
            assert client.get() == 200
        hedges = metric(metrics_text(server), "pyproxy_upstream_hedges_total", pool="p")
        assert 1 <= hedges <= 4, hedges  # 10% of 40 requests
        client.close()


def test_a_hedge_carries_the_request_when_the_first_attempt_fails() -> None:
    # The first attempt's server closes the connection after 200 ms; the hedge (sent at 50 ms) to a
    # slower-than-hedge-time but healthy server answers.
    dying = SampleServer(name="dying", latency=0.2, mode="close")
    ok = SampleServer(name="ok", latency=0.1)
    routes = [{"pool": "p", "hedge_after": "50ms"}]
    pool = {"balance": "round_robin", "retry": {"attempts": 0, "budget_percent": 100}}
    with proxy(dying, ok, pool=pool, routes=routes) as server:
        client = Client(server.addresses[0])
        for _ in range(4):
            status, _, body = client.request("GET", "/")
            assert status == 200 and json.loads(body)["server"] == "ok", (status, body)
        client.close()


def test_hedge_after_p95_waits_for_enough_samples_and_follows_the_pool() -> None:
    a, b = SampleServer(name="a", latency=0.02), SampleServer(name="b", latency=0.02)
    routes = [{"pool": "p", "hedge_after": "p95"}]
    pool = {"balance": "round_robin", "retry": {"budget_percent": 100}}
    with proxy(a, b, pool=pool, routes=routes, admin=True) as server:
        client = Client(server.addresses[0])
        for _ in range(30):  # samples at ~20 ms: the p95 settles near 20 ms
            assert client.get() == 200
        assert metric(metrics_text(server), "pyproxy_upstream_hedges_total", pool="p") == 0
        time.sleep(1.1)  # the p95 is recomputed at most once a second
        b.latency = 0.3  # b turns slow: its requests get hedged to a after ~p95
        m = mark(a, b)
        start = time.monotonic()
        for _ in range(4):
            assert client.get() == 200
        assert time.monotonic() - start < 0.8  # not 2 × 300 ms
        assert metric(metrics_text(server), "pyproxy_upstream_hedges_total", pool="p") >= 2
        assert counts([a, b], m)[0] == 4  # a answered every one
        client.close()


# ------------------------------------------------------------------------------------ 11. metrics


def test_metrics_show_servers_breakers_retries_and_ejections() -> None:
    a, b = SampleServer(name="a", latency=0.003), SampleServer(name="b", mode="error")
    pool = {
        "retry": {"attempts": 1, "on_statuses": [500, 502], "budget_percent": 100, "backoff_base": "1ms",
                  "backoff_max": "2ms"},
        "circuit_breaker": {"consecutive_failures": 3, "failure_ratio": 0, "base_open_time": "10s",
                            "max_open_time": "10s"},
    }
    with proxy(a, b, pool=pool, admin=True) as server:
        client = Client(server.addresses[0])
        assert Counter(client.get("/x") for _ in range(20)) == {200: 20}, "b's errors retried on a"
        client.close()
        assert served(b) == 3, "b is cut off after 3 failures"
        status, text = admin_call(server, "GET", "/metrics")
    assert status == 200
    sa, sb = a.address, b.address
    assert metric(text, "pyproxy_upstream_server_up", pool="p", server=sa) == 1
    assert metric(text, "pyproxy_upstream_server_up", pool="p", server=sb) == 0
    assert metric(text, "pyproxy_upstream_server_breaker_state", pool="p", server=sa) == 0
    assert metric(text, "pyproxy_upstream_server_breaker_state", pool="p", server=sb) == 1
    assert metric(text, "pyproxy_upstream_server_healthy", pool="p", server=sb) == 1  # no checks
    assert metric(text, "pyproxy_upstream_server_in_flight", pool="p", server=sa) == 0
    assert metric(text, "pyproxy_upstream_server_ejections_total", pool="p", server=sb) == 0
    assert metric(text, "pyproxy_upstream_server_effective_weight", pool="p", server=sa) == 1
    assert metric(text, "pyproxy_upstream_server_latency_ewma_seconds", pool="p", server=sa) >= 0.002
    assert metric(text, "pyproxy_upstream_retries_total", pool="p") == 3
    assert metric(text, "pyproxy_upstream_retry_budget_exhausted_total", pool="p") == 0
    assert metric(text, "pyproxy_upstream_rejected_total", pool="p", reason="unhealthy") == 0
    assert metric(text, "pyproxy_upstream_panics_total", pool="p") == 0
    assert metric(text, "pyproxy_http_requests_total", route="route-0", pool="p", code="200") == 20

"""Rate limiting in the proxy, end to end: real sockets, real upstreams, real Redis, two workers."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from helpers import ReloadableConfig, accepts_connections, eventually, free_port, proxy_process

# Windows are an hour long so that no test run straddles a window's start (counters are aligned
# on fixed windows: a count that straddles one is a sliding estimate, not a fixed number).
from pyproxy.config import parse_config
from pyproxy.sample_server import SampleServer
from pyproxy.server import ProxyServer


@contextmanager
def limited_proxy(ratelimit: dict[str, Any], route_limit: dict[str, Any] | None = None,
                  admin: bool = False) -> Iterator[ProxyServer]:
    up = SampleServer(name="up")
    with up.running():
        route: dict[str, Any] = {"pool": "p", "name": "api"}
        if route_limit is not None:
            route["ratelimit"] = route_limit
        config = parse_config({
            "listeners": [{"port": 0}],
            "admin": {"enabled": admin, "port": 0} if admin else {"enabled": False},
            "pools": {"p": {"servers": [up.address]}},
            "routes": [route],
            "ratelimit": ratelimit,
        })
        with ProxyServer(config).running() as server:
            yield server


def get(conn: http.client.HTTPConnection, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", "/", headers=headers or {})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_key_limit_answers_429_with_the_draft_headers_and_a_json_body() -> None:
    route_limit = {"key": "header:X-User", "key_limits": [{"limit": 5, "window": "1h"}]}
    with limited_proxy({}, route_limit) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        seen = [get(conn, {"X-User": "alice"}) for _ in range(7)]
        statuses = [s for s, _, _ in seen]
        assert statuses == [200] * 5 + [429] * 2, statuses
        status, headers, body = seen[0]
        assert headers["ratelimit-policy"] == '"key";q=5;w=3600'
        assert headers["ratelimit"].startswith('"key";r=4;t=')
        status, headers, body = seen[5]
        assert headers["content-type"] == "application/json"
        assert 1 <= int(headers["retry-after"]) <= 3600
        assert headers["ratelimit"].startswith('"key";r=0;t=')
        assert headers["x-request-id"]
        answer = json.loads(body)
        assert answer["error"] == "rate limited" and answer["level"] == "key" and answer["limit"] == 5
        # The connection stays usable after a 429 (nothing of the request was left unread), and
        # another key has its own budget.
        assert get(conn, {"X-User": "bob"})[0] == 200
        conn.close()


def test_route_and_global_levels_and_costs_add_up() -> None:
    ratelimit = {"global": [{"limit": 6, "window": "1h"}]}
    with limited_proxy(ratelimit, {"cost": 2, "key_limits": []}, admin=True) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        statuses = [get(conn)[0] for _ in range(5)]
        # Each request costs 2 of the global 6: three pass.
        assert statuses == [200, 200, 200, 429, 429], statuses
        status, headers, body = get(conn)
        assert json.loads(body)["level"] == "global"
        conn.close()
        admin = server.admin
        assert admin is not None and admin.address is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{admin.address[1]}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'pyproxy_ratelimit_requests_total{level="",result="allowed",route="api"} 3.0' in text
        assert 'pyproxy_ratelimit_requests_total{level="global",result="denied",route="api"} 3.0' in text
        with urllib.request.urlopen(f"http://127.0.0.1:{admin.address[1]}/ratelimits", timeout=5) as r:
            view = json.loads(r.read())
        assert view["mode"] == "local"
        assert sorted(map(tuple, view["decisions"])) == [("api", "", "allowed", 3), ("api", "global", "denied", 3)]


def test_the_penalty_box_blocks_a_key_that_keeps_violating() -> None:
    ratelimit = {"penalty": {"max_violations": 1, "violation_window": "1h", "block_for": "1h", "block_max": "2h"}}
    route_limit = {"key": "header:X-User", "key_limits": [{"limit": 1, "window": "1h"}]}
    with limited_proxy(ratelimit, route_limit, admin=True) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        seen = [get(conn, {"X-User": "mallory"}) for _ in range(4)]
        assert [status for status, _, _ in seen] == [200, 429, 429, 429]
        # The second violation boxed the key: from then on the answer says so, for an hour.
        assert not json.loads(seen[1][2])["blocked"]
        assert json.loads(seen[3][2])["blocked"]
        assert int(seen[3][1]["retry-after"]) > 3000
        assert get(conn, {"X-User": "trent"})[0] == 200  # other keys are not affected
        conn.close()
        admin = server.admin
        assert admin is not None and admin.address is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{admin.address[1]}/ratelimits", timeout=5) as r:
            assert json.loads(r.read())["blocks"] == 1
        # One process: the admin API runs on the worker's own loop, over its own limiter.
        key = "key:api:header:X-User:mallory"
        assert list(block_list(admin.address[1])) == [key]
        assert admin_call(admin.address[1], "DELETE", f"/ratelimits/blocked/{key}")[0] == 200
        assert block_list(admin.address[1]) == {}
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        status, _, body = get(conn, {"X-User": "mallory"})
        assert status == 429 and not json.loads(body)["blocked"]  # the hour-long key limit still counts
        conn.close()


def test_a_limit_holds_for_the_whole_proxy_across_two_workers(tmp_path: Path) -> None:
    up = SampleServer(name="up")
    with up.running():
        port = free_port()
        cfg = tmp_path / "rl.toml"
        cfg.write_text(
            f"workers = 2\n[[listeners]]\nport = {port}\n[admin]\nenabled = false\n"
            f'[pools.p]\nservers = ["{up.address}"]\n'
            '[[ratelimit.global]]\nlimit = 20\nwindow = "1h"\n'
            '[[routes]]\npool = "p"\n'
        )
        with proxy_process(cfg, port):
            statuses = []
            for _ in range(60):  # a new connection each: the kernel spreads them over both workers
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                        statuses.append(resp.status)
                except urllib.error.HTTPError as e:
                    statuses.append(e.code)
        assert statuses.count(200) == 20, statuses  # not 20 per worker
        assert statuses.count(429) == 40
        # Both workers served requests (each opened its own upstream connection).
        assert up.accepts >= 2


def test_redis_mode_shares_limits_and_falls_back_as_configured(redis_clean: Any) -> None:
    server_redis = redis_clean
    for mode, expect_when_down in (("local", {200, 429}), ("deny", {503})):
        ratelimit = {"mode": "redis", "redis_url": server_redis.url, "on_redis_error": mode, "timeout": "200ms"}
        route_limit = {"key": "header:X-User", "key_limits": [{"limit": 3, "window": "1h"}]}
        server_redis.flush()
        with limited_proxy(ratelimit, route_limit) as first, limited_proxy(ratelimit, route_limit) as second:
            # Two proxy instances share the counters through Redis: 3 in all, not 3 each.
            c1 = http.client.HTTPConnection(*first.addresses[0], timeout=10)
            c2 = http.client.HTTPConnection(*second.addresses[0], timeout=10)
            statuses = [get(c, {"X-User": "carol"})[0] for c in (c1, c2, c1, c2, c1, c2)]
            assert statuses.count(200) == 3 and statuses.count(429) == 3, statuses
            server_redis.stop()
            try:
                down = {get(c1, {"X-User": f"dave-{mode}"})[0] for _ in range(5)}
                assert down <= expect_when_down and 500 not in down, down
                if mode == "local":
                    assert 200 in down  # decided by this machine's counters meanwhile
            finally:
                server_redis.start()
            # Redis back: shared limiting resumes by itself (after the limiter's backoff).
            eventually(lambda: get(c2, {"X-User": f"erin-{mode}"})[0] == 200, "Redis answers again", 10)
            c1.close()
            c2.close()


def test_an_adaptive_limit_falls_when_the_pool_slows_down_and_recovers() -> None:
    up = SampleServer(name="up")
    with up.running():
        config = parse_config({
            "listeners": [{"port": 0}],
            "admin": {"enabled": True, "port": 0},
            "pools": {"p": {"servers": [up.address]}},
            "routes": [{"pool": "p", "name": "api", "ratelimit": {"key_limits": [], "limits": [{
                "window": "1s",
                "adaptive": {"min": 5, "max": 1000, "target_p99": "30ms", "decrease": 0.5,
                             "increase": 200, "interval": "100ms"},
            }]}}],
        })
        with ProxyServer(config).running() as server:
            admin = server.admin
            assert admin is not None and admin.address is not None

            def adaptive_limit() -> float:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin.address[1]}/metrics", timeout=5) as r:
                    for line in r.read().decode().splitlines():
                        if line.startswith("pyproxy_ratelimit_adaptive_limit{"):
                            return float(line.rsplit(" ", 1)[1])
                raise AssertionError("no adaptive limit in /metrics")

            conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
            assert adaptive_limit() == 1000
            up.latency = 0.06  # the pool turns slow: p99 60 ms > target 30 ms
            for _ in range(30):
                get(conn)
            eventually(lambda: adaptive_limit() <= 250, "the limit to fall", 10)
            up.latency = 0.0
            # Healthy again: additive increase once new samples bring the p99 down.
            def recovering() -> bool:
                for _ in range(40):
                    get(conn)
                return adaptive_limit() >= 600
            eventually(recovering, "the limit to recover", 20)
            conn.close()


def test_hybrid_mode_shares_limits_between_instances_within_its_bound(redis_clean: Any) -> None:
    ratelimit = {"mode": "hybrid", "redis_url": redis_clean.url, "sync_interval": "20ms"}
    route_limit = {"key": "header:X-User", "key_limits": [{"limit": 10, "window": "1h"}]}
    with limited_proxy(ratelimit, route_limit) as first, limited_proxy(ratelimit, route_limit) as second:
        c1 = http.client.HTTPConnection(*first.addresses[0], timeout=10)
        c2 = http.client.HTTPConnection(*second.addresses[0], timeout=10)
        statuses = []
        for i in range(30):
            statuses.append(get(c1 if i % 2 else c2, {"X-User": "frank"})[0])
            time.sleep(0.03)  # longer than a sync: each instance learns the other's usage
        allowed = statuses.count(200)
        # Decided locally, reconciled every 20 ms: 10 in all, give or take what one sync interval
        # lets through on the other instance before it hears (documented bound), not 10 each.
        assert 10 <= allowed <= 12, statuses
        assert set(statuses) <= {200, 429}
        c1.close()
        c2.close()


# -- the penalty box on the admin API ----------------------------------------------------------------

TOKEN = "s3cret"
PENALTY = '[ratelimit.penalty]\nmax_violations = 1\nviolation_window = "1h"\nblock_for = "1h"\nblock_max = "2h"\n'
# Two per second per user: a key that stops sending is allowed again after two seconds, so what
# still refuses it then is the penalty box alone.
KEY_LIMIT = '[[routes]]\npool = "p"\nname = "api"\n[routes.ratelimit]\nkey = "header:X-User"\n' \
            'key_limits = [{limit = 2, window = "1s"}]\n'


def admin_call(port: int, method: str, path: str, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def user_request(port: int, user: str) -> tuple[int, dict[str, Any]]:
    """One request on a new connection (the kernel spreads those over the workers): status, and the
    JSON body of a 429."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        status, _, body = get(conn, {"X-User": user})
        return status, json.loads(body) if status == 429 else {}
    finally:
        conn.close()


def block_list(admin_port: int) -> dict[str, dict[str, Any]]:
    status, body = admin_call(admin_port, "GET", "/ratelimits/blocked")
    assert status == 200 and body["complete"], body
    return {entry["key"]: entry for entry in body["blocked"]}


def box_key(port: int, user: str, admin_port: int, key: str) -> None:
    """Get ``user`` into the penalty box through ``port`` (limit 2 per 1 s, a block at the second
    violation): 2 requests allowed, then requests until the admin API lists the key, the first
    denial the limit's own (not the box's). Requests go on until then rather than exactly two more:
    a loaded machine may take long enough between two for the 1 s window to move on."""
    seen = [user_request(port, user) for _ in range(2)]
    assert [s for s, _ in seen] == [200, 200], seen
    denials: list[dict[str, Any]] = []

    def boxed() -> bool:
        status, body = user_request(port, user)
        if status == 429:
            denials.append(body)
        return key in block_list(admin_port)

    eventually(boxed, f"{key} in the block list", 10)
    assert denials and not denials[0]["blocked"], denials


def check_block_and_unblock(
    admin_port: int, port: int, user: str, boxed_via: int | None = None, strikes: int = 1, hybrid: bool = False
) -> None:
    """``user`` gets boxed (through ``boxed_via``, another instance, when given, else ``port``); the
    admin API at ``admin_port`` lists it (with ``strikes``) and unblocks it; it is allowed again on
    the admin API's instance (``port``) at once, and on the other instance."""
    key = f"key:api:header:X-User:{user}"
    path = "/ratelimits/blocked/" + urllib.parse.quote(key, safe="")
    via = port if boxed_via is None else boxed_via
    box_key(via, user, admin_port, key)
    entry = block_list(admin_port)[key]
    # (the local table keeps a block's end to 2.1 s beyond its 275 s record period: rounded up)
    assert entry["strikes"] == strikes and 3500 < entry["remaining"] <= 3603, entry
    assert abs(entry["until"] - (time.time() + entry["remaining"])) < 5, entry
    assert admin_call(admin_port, "GET", "/ratelimits/blocked", token=None)[0] == 401
    assert admin_call(admin_port, "DELETE", path, token="wrong")[0] == 401
    assert admin_call(admin_port, "POST", "/ratelimits/blocked")[0] == 405
    assert admin_call(admin_port, "GET", path)[0] == 405

    time.sleep(2.1)  # the key limit has forgotten the two requests: the box alone refuses now
    if hybrid:
        # An instance that never checked the key learns its block at the sync after its first check
        # (requests it allows meanwhile count against the key limit: let them age out).
        learning: list[int] = []
        eventually(lambda: learning.append(user_request(port, user)[0]) or learning[-1] == 429,
                   "the block to reach the admin's instance", 5)
        if 200 in learning:
            time.sleep(2.1)
    for p in (port, port, via):  # new connections: both workers
        status, body = user_request(p, user)
        assert status == 429 and body["blocked"], (p, status, body)

    assert admin_call(admin_port, "DELETE", path) == (200, {"unblocked": True, "key": key})
    assert key not in block_list(admin_port)
    status, body = admin_call(admin_port, "DELETE", path)
    assert status == 404 and body["key"] == key, body
    # Allowed again on every worker of the admin's instance at once ...
    statuses = [user_request(port, user)[0] for _ in range(2)]
    assert statuses == [200, 200], statuses
    if via != port:
        # ... and on the other instance (hybrid: once a sync that checks the key brings the unblock).
        time.sleep(2.1)
        eventually(lambda: user_request(via, user)[0] == 200, "the other instance to allow the key", 5)
    # Strikes were forgotten: boxed again, it is the first block again, not a doubled one.
    time.sleep(2.1)
    box_key(via, user, admin_port, key)
    entry = block_list(admin_port)[key]
    assert entry["strikes"] == strikes and 3500 < entry["remaining"] <= 3603, entry


@contextmanager
def two_worker_proxy(tmp_path: Path, upstream: str, ratelimit: str = "") -> Iterator[tuple[int, int]]:
    """``pyproxy run`` with 2 workers, the admin API (in the supervisor, with a token), the penalty
    box and the key limit; ``ratelimit``: more ``[ratelimit]`` lines. Yields (port, admin port)."""
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "rl.toml"
    cfg.write_text(
        f'workers = 2\n[[listeners]]\nport = {port}\n[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n'
        f'[pools.p]\nservers = ["{upstream}"]\n[ratelimit]\n{ratelimit}{PENALTY}{KEY_LIMIT}'
    )
    with proxy_process(cfg, port):
        eventually(lambda: accepts_connections(admin_port), "the admin API")
        yield port, admin_port


def test_admin_lists_and_unblocks_penalty_box_keys_across_two_workers(tmp_path: Path) -> None:
    up = SampleServer(name="up")
    with up.running():
        with two_worker_proxy(tmp_path, up.address) as (port, admin_port):
            status, body = admin_call(admin_port, "GET", "/ratelimits/blocked")
            assert (status, body) == (200, {"mode": "local", "blocked": [], "complete": True})
            # The admin API runs in the supervisor; blocks are made by the workers.
            check_block_and_unblock(admin_port, port, "mallory/1")
            # Both workers served (an upstream connection each): the allowed requests above may all
            # have gone to one of them, so other users' requests until both have.
            users = (f"other/{n}" for n in range(1000))
            eventually(lambda: user_request(port, next(users))[0] == 200 and up.accepts >= 2,
                       "both workers to serve", 10)


@pytest.mark.parametrize("mode", ["redis", "hybrid"])
def test_admin_unblocks_a_key_for_every_instance_sharing_redis(tmp_path: Path, redis_clean: Any, mode: str) -> None:
    """Instance A (2 workers, the admin API in its supervisor) and instance B (one process) share
    Redis; B's traffic gets the key boxed, A's admin API lists and lifts it, B allows it again."""
    up = SampleServer(name="up")
    with up.running():
        shared: dict[str, Any] = {"mode": mode, "redis_url": redis_clean.url, "timeout": "500ms"}
        if mode == "hybrid":
            shared["sync_interval"] = "20ms"
        toml = "".join(f'{k} = "{v}"\n' for k, v in shared.items())
        with two_worker_proxy(tmp_path, up.address, toml) as (port, admin_port):
            with limited_proxy(
                {**shared,
                 "penalty": {"max_violations": 1, "violation_window": "1h", "block_for": "1h", "block_max": "2h"}},
                {"key": "header:X-User", "key_limits": [{"limit": 2, "window": "1s"}]},
            ) as other:
                # Boxed through B, listed and lifted through A (from Redis), allowed on both. In
                # hybrid mode strikes are counted per machine: Redis, all A sees, has the block's end.
                check_block_and_unblock(
                    admin_port, port, f"oscar {mode}", boxed_via=other.addresses[0][1],
                    strikes=1 if mode == "redis" else 0, hybrid=mode == "hybrid",
                )
                status, body = admin_call(admin_port, "GET", "/ratelimits/blocked")
                assert body["mode"] == mode


def test_without_fields_on_allowed_responses_limits_still_hold_and_429s_keep_theirs() -> None:
    route_limit = {"key": "header:X-User", "key_limits": [{"limit": 3, "window": "1h"}]}
    with limited_proxy({"headers_on_allowed": False}, route_limit) as server:
        conn = http.client.HTTPConnection(*server.addresses[0], timeout=10)
        seen = [get(conn, {"X-User": "carol"}) for _ in range(5)]
        assert [status for status, _, _ in seen] == [200, 200, 200, 429, 429]
        assert all("ratelimit" not in headers and "ratelimit-policy" not in headers for _, headers, _ in seen[:3])
        assert seen[3][1]["ratelimit"].startswith('"key";r=0;t=') and "retry-after" in seen[3][1]
        conn.close()


def test_a_connection_keeps_its_plan_until_a_reload_changes_the_policy(tmp_path: Path) -> None:
    """A client_ip key (no trusted proxy) is decided by the connection's own prepared plan: the
    limit, the fields and the allowed count are those of the general path, and a reload that
    changes the limit reaches the connection already open."""
    from pyproxy.config import load_config

    up = SampleServer(name="up")

    def write(limit: int) -> None:
        config.write(f'[routes.ratelimit]\nkey = "client_ip"\nkey_limits = [{{ limit = {limit}, window = "1h" }}]')

    with up.running():
        config = ReloadableConfig(tmp_path / "proxy.toml", up.address)
        write(3)
        with ProxyServer(load_config(config.path), config.path).running():
            conn = http.client.HTTPConnection("127.0.0.1", config.port, timeout=10)
            seen = [get(conn) for _ in range(5)]
            assert [status for status, _, _ in seen] == [200, 200, 200, 429, 429]
            assert [h["ratelimit"].split(";t=")[0] for _, h, _ in seen] == [
                '"key";r=2', '"key";r=1', '"key";r=0', '"key";r=0', '"key";r=0'
            ]
            assert all(h["ratelimit-policy"] == '"key";q=3;w=3600' for _, h, _ in seen)
            assert 1 <= int(seen[0][1]["ratelimit"].split(";t=")[1]) <= 7200
            write(5)
            config.reload()
            # the new limit on the same connection (a limit of its own: counted afresh)
            seen = [get(conn) for _ in range(6)]
            assert [status for status, _, _ in seen] == [200] * 5 + [429]
            assert seen[0][1]["ratelimit-policy"] == '"key";q=5;w=3600'
            assert seen[0][1]["ratelimit"].startswith('"key";r=4;t=')
            conn.close()
            with urllib.request.urlopen(f"http://127.0.0.1:{config.admin_port}/ratelimits", timeout=5) as r:
                view = json.loads(r.read())
            assert sorted(map(tuple, view["decisions"])) == [("api", "", "allowed", 8), ("api", "key", "denied", 3)]

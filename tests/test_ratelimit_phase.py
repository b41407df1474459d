"""The rate-limit phase's short paths (what the data plane calls per request): ``allow_fast`` and a
connection's prepared plan answer exactly as ``decide_sync`` does, and are offered only where
their answer cannot differ."""

from __future__ import annotations

import json
from typing import Any

from pyproxy.config import parse_config
from pyproxy.ratelimit import Check, Penalty
from pyproxy.ratelimit.local import LocalLimiter
from pyproxy.ratelimit.phase import RateLimitPhase

PEER = "192.0.2.7"


def phase(routes: list[dict[str, Any]], **ratelimit: Any) -> RateLimitPhase:
    """A local-mode phase over a table of its own (the monotonic clock, as in the proxy)."""
    config = parse_config({
        "pools": {"p": {"servers": ["127.0.0.1:9000"]}},
        "routes": [{"pool": "p", **r} for r in routes],
        "ratelimit": ratelimit,
    })  # fmt: skip
    return RateLimitPhase(config, LocalLimiter(capacity=4096))


def split(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields without the RateLimit value's ``t=`` (two calls may fall either side of a second)."""
    return [(name, value.split(b";t=")[0]) for name, value in fields]


# Hour-long windows: no run straddles a window's start, so counts are whole numbers.
CLIENT_IP = {"name": "ip", "ratelimit": {"key": "client_ip", "key_limits": [{"limit": 4, "window": "1h"}]}}
BY_HEADER = {"name": "hdr", "path_prefix": "/h", "ratelimit": {"key": "header:X-User", "key_limits": [{"limit": 3, "window": "1h"}]}}
GLOBAL = [{"limit": 7, "window": "1h"}]


def test_connection_plan_and_allow_fast_answer_as_decide_sync() -> None:
    """Three phases in lockstep on tables of their own: the general path, ``allow_fast`` and the
    connection's plan give the same statuses, fields and counts; a denial is left to decide_sync."""
    general, fast, planned = (phase([CLIENT_IP], **{"global": GLOBAL}) for _ in range(3))
    plan = planned.connection_plan("ip", PEER)
    assert plan is not None
    for step in range(6):
        want = general.decide_sync("ip", [], b"/", PEER)
        got_fast = fast.allow_fast("ip", [], b"/", PEER)
        got_plan = plan.charge()
        if want.allowed:
            assert got_fast is not None and got_plan is not None, step
            assert split(got_fast) == split(got_plan) == split(want.headers), step
            planned.allowed["ip"] += 1  # the data plane counts what the plan allows
        else:
            assert got_fast is None and got_plan is None, step
            for p in (fast, planned):
                got = p.decide_sync("ip", [], b"/", PEER).response
                assert got is not None and want.response is not None
                assert got.status == want.response.status == 429
                assert json.loads(got.body)["level"] == json.loads(want.response.body)["level"] == "key"
    assert [h[1] for h in split(general.decide_sync("ip", [], b"/", "198.51.100.1").headers)] == [
        b'"key";q=4;w=3600, "global";q=7;w=3600', b'"global";r=2',  # another peer: the global level binds
    ]
    for p in (fast, planned):
        p.decide_sync("ip", [], b"/", "198.51.100.1")
        assert p.snapshot()["decisions"] == general.snapshot()["decisions"]
    assert sorted(map(tuple, general.snapshot()["decisions"])) == [("ip", "", "allowed", 5), ("ip", "key", "denied", 2)]
    # the limiter's own count includes its plans' charges
    assert planned.local.stats().allowed == general.local.stats().allowed == 5


def test_allow_fast_without_fields_and_for_header_keys() -> None:
    quiet = phase([BY_HEADER], headers_on_allowed=False)
    alice = [(b"X-User", b"alice")]
    assert quiet.connection_plan("hdr", PEER) is None  # the key is in each request, not the peer
    assert [quiet.allow_fast("hdr", alice, b"/h", PEER) for _ in range(4)] == [[], [], [], None]
    assert quiet.allow_fast("hdr", [(b"X-User", b"bob")], b"/h", PEER) == []
    assert quiet.decide_sync("hdr", alice, b"/h", PEER).response.status == 429


def test_plans_are_offered_only_where_the_checks_cannot_move() -> None:
    penalty = {"max_violations": 2}
    adaptive = {"min": 1, "max": 100, "target_p99": "1s"}
    routes = [
        CLIENT_IP,
        {"name": "global-only", "path_prefix": "/g", "ratelimit": {"key_limits": []}},
        {"name": "adaptive", "path_prefix": "/a", "ratelimit": {"key_limits": [], "limits": [{"limit": 50, "window": "1s", "adaptive": adaptive}]}},
        {"name": "log", "path_prefix": "/l", "ratelimit": {"key": "client_ip", "key_limits": [{"limit": 5, "window": "1s", "algorithm": "sliding_log"}]}},
    ]  # fmt: skip
    p = phase(routes, **{"global": GLOBAL})
    assert p.connection_plan("ip", PEER) is not None
    assert p.connection_plan("global-only", PEER) is not None
    assert p.connection_plan("adaptive", PEER) is None  # its limit follows the pool's health
    assert p.connection_plan("log", PEER) is None  # a sliding log is not a counter
    assert p.allow_fast("log", [], b"/l", PEER) is None and p.decide_sync("log", [], b"/l", PEER).allowed
    boxed = phase([CLIENT_IP], penalty=penalty)
    assert boxed.connection_plan("ip", PEER) is None  # blocks are read by the general path
    behind = phase([CLIENT_IP], trusted_proxies=["10.0.0.0/8"])
    assert behind.connection_plan("ip", "10.0.0.1") is None  # the key may come from X-Forwarded-For


def test_local_charge_plans_take_only_the_usual_checks_and_keep_their_counts() -> None:
    local = LocalLimiter(capacity=4096)
    usual = (Check("user:a", 3, 3600.0), Check("global", 10, 3600.0))
    plan = local.charge_plan(usual, True)
    assert plan is not None and local.charge_plan(usual, True) is plan  # kept per tuple
    assert local.charge_plan(usual, False) is not plan  # without fields: another plan
    assert local.charge_plan(list(usual), True) is None  # only tuples are kept, so only they get plans
    penalty = Penalty(max_violations=1, violation_window=60.0, block_for=60.0, block_max=60.0)
    assert local.charge_plan((Check("user:a", 3, 3600.0, penalty=penalty),), True) is None
    assert local.charge_plan((Check("user:a", 3, 3600.0, algorithm="sliding_log"),), True) is None
    assert local.charge_plan((Check("a", 3, 3600.0, cost=1), Check("b", 3, 3600.0, cost=2)), True) is None
    assert local.charge_plan((Check("a", 3, 3600.0), Check("a", 3, 3600.0)), True) is None
    assert [plan.charge() is not None for _ in range(4)] == [True, True, True, False]
    assert local.stats().allowed == 3
    # the memo is bounded: its plans' counts are kept when it is emptied
    for i in range(4100):
        local.charge_plan((Check(f"k{i}", 1, 3600.0),), False)
    assert local.stats().allowed == 3
    assert local.hit_sync(usual).allowed is False  # the plan charged the limiter's own counters

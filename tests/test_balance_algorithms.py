"""Balancing algorithms: measured shares against configured weights, latency-aware behaviour in a
discrete-event simulation, consistent-hash placement and failover, bounded loads, validation."""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyproxy.balance.algorithms import (
    ALGORITHMS,
    Balancer,
    ConsistentHash,
    WeightedRoundRobin,
    make_balancer,
)
from pyproxy.balance.upstream import SLOW_START_MIN, UpstreamServer
from pyproxy.config import Server
from pyproxy.core import HashRing

MS = 0.001


@dataclass
class Req:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    target: bytes = b"/"
    client_ip: str = "192.0.2.1"


def pool(*weights: float, since: float = float("-inf")) -> list[UpstreamServer]:
    return [
        UpstreamServer(Server(f"10.0.0.{i + 1}", 8000, max(int(w), 1)), weight=w, since=since)
        for i, w in enumerate(weights)
    ]


def ids(servers: Sequence[UpstreamServer]) -> list[str]:
    return [s.id for s in servers]


def shares(counts: Counter[str], servers: Sequence[UpstreamServer]) -> list[float]:
    total = sum(counts.values())
    return [counts[s.id] / total for s in servers]


def picks(b: Balancer, n: int, now: float = 0.0, req: Req | None = None) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        s = b.pick(req, now)
        assert s is not None
        out[s.id] += 1
    return out


def simulate(
    b: Balancer,
    latency: Callable[[UpstreamServer, float], float],
    n: int,
    *,
    interval: float,
    start: float = 0.0,
    rng: random.Random | None = None,
    ok: Callable[[UpstreamServer, float], bool] = lambda s, t: True,
) -> tuple[Counter[str], float]:
    """Discrete-event simulation: ``n`` requests arriving every ``interval`` seconds (exponential
    gaps when ``rng`` is given), each completing ``latency(server, t)`` seconds after it starts.
    Returns the picks per server id and the end time. In-flight counts are real."""
    counts: Counter[str] = Counter()
    pending: list[tuple[float, int, UpstreamServer, float, bool]] = []
    seq = itertools.count()
    t = start
    for _ in range(n):
        t += rng.expovariate(1.0 / interval) if rng else interval
        while pending and pending[0][0] <= t:
            done, _, p, lat, good = heapq.heappop(pending)
            p.finished(lat, good, done)
        s = b.pick(None, t)
        assert s is not None
        counts[s.id] += 1
        s.started()
        lat = latency(s, t)
        heapq.heappush(pending, (t + lat, next(seq), s, lat, ok(s, t)))
    while pending:
        done, _, p, lat, good = heapq.heappop(pending)
        p.finished(lat, good, done)
    return counts, t


def fixed(table: dict[str, float]) -> Callable[[UpstreamServer, float], float]:
    return lambda s, t: table[s.id]


# ------------------------------------------------------------------------------- UpstreamServer


def test_peak_ewma_jumps_up_and_decays_down_with_elapsed_time() -> None:
    (s,) = pool(1)
    assert s.id == "10.0.0.1:8000" and s.ewma == 0.0 and not s.sampled
    s.started()
    s.started()
    assert s.in_flight == 2
    s.finished(0.050, True, 100.0)
    assert s.ewma == 0.050 and s.in_flight == 1  # first sample: taken as is
    s.finished(0.010, True, 105.0)  # 5 s later, tau 10 s: w = exp(-0.5)
    w = math.exp(-0.5)
    assert s.ewma == pytest.approx(0.050 * w + 0.010 * (1 - w))
    s.finished(0.200, True, 105.0)  # above the estimate: jump to it at once
    assert s.ewma == 0.200
    assert s.in_flight == 0
    s.finished(0.010, True, 105.0)  # no time elapsed: a lower sample changes nothing
    assert s.ewma == 0.200 and s.in_flight == 0  # never negative
    s.finished(0.010, True, 1105.0)  # long silence: old observations have lost their weight
    assert s.ewma == pytest.approx(0.010, rel=1e-9)


def test_failures_only_raise_latency_and_feed_the_error_ewma() -> None:
    (s,) = pool(1)
    s.finished(0.050, True, 0.0)
    s.finished(0.001, False, 10.0)  # fast refusal: must not look fast
    assert s.ewma == 0.050
    assert s.error_ewma == pytest.approx(UpstreamServer.ERROR_ALPHA)
    s.finished(2.0, False, 11.0)  # timeout: the peak counts
    assert s.ewma == 2.0
    for i in range(200):
        s.finished(0.05, False, 12.0 + i)
    assert s.error_ewma > 0.99
    for i in range(200):
        s.finished(0.05, True, 300.0 + i)
    assert s.error_ewma < 0.01
    # Read decay: an idle server's old failures fade with tau.
    s.error_ewma = 0.5
    assert s.error_rate(s.stamp) == 0.5
    assert s.error_rate(s.stamp + s.tau) == pytest.approx(0.5 / math.e)
    assert s.latency(s.stamp + s.tau) == pytest.approx(s.ewma / math.e)


def test_slow_start_factor_ramps_linearly() -> None:
    (s,) = pool(1)
    assert s.slow_start_factor(0.0, 10.0) == 1.0  # in service since forever
    s.mark_returned(100.0)
    assert s.since == 100.0
    assert s.slow_start_factor(100.0, 0.0) == 1.0
    assert s.slow_start_factor(100.0, 10.0) == SLOW_START_MIN
    half = SLOW_START_MIN + (1 - SLOW_START_MIN) / 2
    assert s.slow_start_factor(105.0, 10.0) == pytest.approx(half)
    assert s.slow_start_factor(110.0, 10.0) == 1.0
    assert s.slow_start_factor(99.0, 10.0) == SLOW_START_MIN
    assert 0 < s.slow_start_factor(100.001, 10.0) <= 1


def test_upstream_server_has_slots() -> None:
    (s,) = pool(1)
    with pytest.raises(AttributeError):
        s.anything = 1  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------- round robin


def test_round_robin_rotates_ignoring_weights_and_skips_unavailable() -> None:
    servers = pool(5, 1, 1)
    b = make_balancer("round_robin", servers)
    seq = [b.pick(None, 0.0) for _ in range(6)]
    assert ids([s for s in seq if s]) == ids(servers) * 2
    servers[1].available = False
    seq = [b.pick(None, 0.0) for _ in range(4)]
    assert ids([s for s in seq if s]) == ids([servers[0], servers[2]] * 2)
    assert b.pick(None, 0.0, exclude={servers[0]}) is servers[2]
    assert b.pick(None, 0.0, exclude={servers[0], servers[2]}) is None


# --------------------------------------------------------------------------- weighted round robin


def test_wrr_smooth_sequence_5_1_1() -> None:
    servers = pool(5, 1, 1)
    a, b_, c = ids(servers)
    b = make_balancer("weighted_round_robin", servers)
    got = [s.id for s in (b.pick(None, 0.0) for _ in range(14)) if s]
    assert got == [a, a, b_, a, c, a, a] * 2


@pytest.mark.parametrize("weights", [(5, 1, 1), (3, 2, 1, 4), (1, 1), (7, 13)])
def test_wrr_hits_weights_within_5_percent(weights: tuple[int, ...]) -> None:
    servers = pool(*weights)
    b = make_balancer("weighted_round_robin", servers)
    got = shares(picks(b, 10_000), servers)
    for share, w in zip(got, weights):
        assert share == pytest.approx(w / sum(weights), rel=0.05)


def test_wrr_skips_unavailable_and_excluded_and_keeps_ratios() -> None:
    servers = pool(3, 1, 2)
    b = make_balancer("weighted_round_robin", servers)
    servers[2].available = False
    got = picks(b, 4000)
    assert servers[2].id not in got
    assert got[servers[0].id] == 3000 and got[servers[1].id] == 1000
    assert b.pick(None, 0.0, exclude=[servers[0]]) is servers[1]
    assert b.pick(None, 0.0, exclude=[servers[0], servers[1]]) is None


def test_wrr_run_time_add_remove_and_weight_change() -> None:
    servers = pool(1, 1)
    b = make_balancer("weighted_round_robin", servers)
    picks(b, 10)
    (new,) = pool(1, 1, 2)[2:]
    b.add(new)
    got = picks(b, 4000, now=1.0)
    assert shares(got, [*servers, new]) == pytest.approx([0.25, 0.25, 0.5], abs=0.01)
    b.remove(servers[0])
    got = picks(b, 3000, now=2.0)
    assert servers[0].id not in got
    assert got[new.id] == 2000
    with pytest.raises(ValueError, match="not in the pool"):
        b.remove(servers[0])
    with pytest.raises(ValueError, match="already in the pool"):
        b.add(UpstreamServer(servers[1].server))
    servers[1].weight = 2.0  # picked up at the next recompute (0.1 s)
    got = picks(b, 4000, now=3.0)
    assert got[new.id] == got[servers[1].id] == 2000
    servers[1].weight = 0.0  # weight 0: no traffic
    assert set(picks(b, 100, now=4.0)) == {new.id}


# ------------------------------------------------------------------------------------ dynamic WRR


def test_dynamic_wrr_prefers_the_fast_server_but_never_starves_the_slow_one() -> None:
    servers = pool(1, 1)
    fast, slow = servers
    b = make_balancer("weighted_round_robin", servers, dynamic=True)
    lat = {fast.id: 10 * MS, slow.id: 50 * MS}
    simulate(b, fixed(lat), 2000, interval=2 * MS)  # warm up
    got, _ = simulate(b, fixed(lat), 20_000, interval=2 * MS, start=4.0)
    f, s = shares(got, servers)
    assert f >= 2 * s
    assert s >= 0.05
    # Softmax on relative latency (temperature 2): 1 : exp(-(5 - 1) / 2).
    assert f == pytest.approx(1 / (1 + math.exp(-2)), abs=0.03)


def test_dynamic_wrr_floor_keeps_a_very_slow_server_measured() -> None:
    servers = pool(1, 1)
    b = make_balancer("weighted_round_robin", servers, dynamic=True)  # floor 0.002
    lat = {servers[0].id: 1 * MS, servers[1].id: 2000 * MS}
    _, t = simulate(b, fixed(lat), 5000, interval=2 * MS)  # both unmeasured for the first 2 s
    got, _ = simulate(b, fixed(lat), 20_000, interval=2 * MS, start=t)
    slow_share = shares(got, servers)[1]
    assert slow_share == pytest.approx(0.002 / 1.002, abs=0.001)  # floor × static share, no lower
    assert slow_share > 0  # measured still: never starved


def test_dynamic_wrr_shares_swap_back_when_latencies_swap() -> None:
    servers = pool(1, 1)
    a, c = servers
    b = make_balancer("weighted_round_robin", servers, dynamic=True)
    lat = {a.id: 10 * MS, c.id: 50 * MS}
    got, t = simulate(b, fixed(lat), 10_000, interval=2 * MS)
    assert got[a.id] > 2 * got[c.id]
    lat = {a.id: 50 * MS, c.id: 10 * MS}
    # a slows down: the peak EWMA notices on its first slow response.
    got, t = simulate(b, fixed(lat), 500, interval=2 * MS, start=t)
    assert got[a.id] < 0.6 * sum(got.values())
    # c's old 50 ms estimate decays with tau = 10 s: from 15 s after the swap (7500 picks at
    # 2 ms) on, c gets at least twice a's share.
    got, t = simulate(b, fixed(lat), 7000, interval=2 * MS, start=t)
    got, t = simulate(b, fixed(lat), 5000, interval=2 * MS, start=t)
    assert got[c.id] >= 2 * got[a.id]
    assert got[a.id] >= 0.05 * 5000


def test_dynamic_wrr_identical_servers_rotate_exactly() -> None:
    servers = pool(1, 1, 1, 1)
    b = make_balancer("weighted_round_robin", servers, dynamic=True)
    got, _ = simulate(b, lambda s, t: 20 * MS, 20_000, interval=MS)
    assert set(got.values()) == {5000}


@pytest.mark.parametrize("n", [2, 5])
def test_dynamic_wrr_identical_noisy_servers_get_identical_shares(n: int) -> None:
    servers = pool(*[1] * n)
    b = make_balancer("weighted_round_robin", servers, dynamic=True)
    rng = random.Random(7)
    # Lognormal jitter (σ 0.25). Heavier tails make the peak EWMA, and so the shares, noisier over
    # a minute (σ 0.5: up to ~6% apart over 60 s), though still equal on average.
    got, _ = simulate(
        b, lambda s, t: rng.lognormvariate(math.log(20 * MS), 0.25), 60_000, interval=MS, rng=rng
    )
    for share in shares(got, servers):
        assert share == pytest.approx(1 / n, rel=0.05)


def test_dynamic_wrr_recovers_after_early_slow_responses_traefik_12306() -> None:
    # Five identical servers; one answers its first three requests slowly. It must not be left
    # with a trickle of traffic forever (traefik#12306): the floor keeps it measured, the peak
    # EWMA decays with time, and it gets its fair share back.
    servers = pool(1, 1, 1, 1, 1)
    victim = servers[1]
    b = make_balancer("weighted_round_robin", servers, dynamic=True)
    slow_left = [3]

    def latency(s: UpstreamServer, t: float) -> float:
        if s is victim and slow_left[0]:
            slow_left[0] -= 1
            return 800 * MS
        return 20 * MS

    got, t = simulate(b, latency, 2000, interval=2 * MS)
    assert shares(got, servers)[1] < 0.19  # penalised at first (a fair share is 0.2)
    got, t = simulate(b, latency, 40_000, interval=2 * MS, start=t)  # 80 s
    got, t = simulate(b, latency, 20_000, interval=2 * MS, start=t)
    for share in shares(got, servers):
        assert share == pytest.approx(0.2, rel=0.05)


def test_dynamic_wrr_errors_lower_the_share() -> None:
    servers = pool(1, 1)
    b = make_balancer("weighted_round_robin", servers, dynamic=True)
    bad = servers[1]
    rng = random.Random(3)
    got, _ = simulate(
        b,
        fixed({s.id: 20 * MS for s in servers}),
        20_000,
        interval=2 * MS,
        ok=lambda s, t: s is not bad or rng.random() < 0.5,
    )
    good_share, bad_share = shares(got, servers)
    assert bad_share == pytest.approx(1 / 3, abs=0.05)  # factor ≈ 1 − 0.5
    assert good_share > bad_share


def test_dynamic_wrr_exploration_brings_an_unsampled_server_back() -> None:
    servers = pool(1, 1)
    fast, slow = servers
    b = WeightedRoundRobin(servers, dynamic=True)
    for i in range(10):
        fast.finished(10 * MS, True, i * 1.0)
    slow.finished(100 * MS, True, 9.0)
    w0 = b.effective_weights(9.0)
    assert w0[fast.id] == 1.0 and w0[slow.id] == pytest.approx(math.exp(-4.5))  # 10× slower
    fast.finished(10 * MS, True, 40.0)  # the fast server keeps getting samples, the slow one none
    w1 = b.effective_weights(40.0)
    # 31 s without a sample: 100 ms decays toward 10 ms with explore_tau 10 s.
    expect = math.exp(-((10 + 90 * math.exp(-3.1)) / 10 - 1) / 2)
    assert w1[slow.id] == pytest.approx(expect)
    assert w1[slow.id] > 0.6


def test_dynamic_wrr_unsampled_servers_count_as_the_best() -> None:
    servers = pool(2, 1)
    b = WeightedRoundRobin(servers, dynamic=True)
    servers[0].finished(30 * MS, True, 0.0)
    assert b.effective_weights(0.0) == {servers[0].id: 2.0, servers[1].id: 1.0}


# ------------------------------------------------------------------------------------------ random


@pytest.mark.parametrize("weights", [(1, 2, 3, 4), (10, 1)])
def test_random_honours_weights_within_5_percent(weights: tuple[int, ...]) -> None:
    servers = pool(*weights)
    b = make_balancer("random", servers, seed=1)
    got = shares(picks(b, 100_000), servers)
    for share, w in zip(got, weights):
        assert share == pytest.approx(w / sum(weights), rel=0.05)


def test_random_with_most_servers_unavailable_stays_weighted() -> None:
    servers = pool(*[1] * 18, 1, 3)
    for s in servers[:18]:
        s.available = False
    b = make_balancer("random", servers, seed=2)
    got = picks(b, 40_000)
    assert set(got) == {servers[18].id, servers[19].id}
    assert got[servers[19].id] / 40_000 == pytest.approx(0.75, rel=0.05)


# ------------------------------------------------------------------------------- least connections


def test_least_connections_fast_server_gets_more_slow_server_not_starved() -> None:
    servers = pool(1, 1)
    fast, slow = servers
    b = make_balancer("least_connections", servers, seed=4)
    rng = random.Random(4)
    lat = {fast.id: 10 * MS, slow.id: 50 * MS}
    got, _ = simulate(
        b, lambda s, t: rng.expovariate(1 / lat[s.id]), 30_000, interval=2 * MS, rng=rng
    )
    f, s = shares(got, servers)
    assert f >= 2 * s
    assert s >= 0.05


def test_least_connections_with_four_servers() -> None:
    servers = pool(1, 1, 1, 1)
    b = make_balancer("least_connections", servers, seed=5)
    rng = random.Random(5)
    lat = dict(zip(ids(servers), [10 * MS, 10 * MS, 10 * MS, 50 * MS]))
    got, _ = simulate(
        b, lambda s, t: rng.expovariate(1 / lat[s.id]), 40_000, interval=MS, rng=rng
    )
    sh = shares(got, servers)
    assert min(sh[:3]) >= 2 * sh[3]
    # Not starved: with three fast servers to choose from, the 5× slower one still gets a share.
    assert sh[3] >= 0.01
    for x in sh[:3]:  # identical servers, equal shares
        assert x == pytest.approx(sum(sh[:3]) / 3, rel=0.05)


def test_least_connections_honours_weights() -> None:
    servers = pool(3, 1)
    b = make_balancer("least_connections", servers, seed=6)
    rng = random.Random(6)
    got, _ = simulate(b, lambda s, t: rng.expovariate(1 / (20 * MS)), 40_000, interval=MS, rng=rng)
    heavy, light = shares(got, servers)
    assert heavy / light == pytest.approx(3.0, rel=0.15)


def test_least_connections_picks_fewer_in_flight_then_lower_latency() -> None:
    servers = pool(1, 1)
    a, c = servers
    b = make_balancer("least_connections", servers, seed=7)
    a.started()
    assert all(b.pick(None, 0.0) is c for _ in range(50))
    a.finished(50 * MS, True, 0.0)
    c.finished(10 * MS, True, 0.0)  # in_flight stays 0 (never negative)
    assert all(b.pick(None, 0.0) is c for _ in range(50))  # tie → lower peak EWMA
    # Read decay: the estimate of a server without new samples decays toward 0, so the slower
    # one is tried again after ~tau × ln(5) = 16 s even when nothing is ever in flight.
    c.finished(10 * MS, True, 10.0)
    assert b.pick(None, 10.0) is c  # a: 50 ms × e^-1 = 18 ms > 10 ms
    c.finished(10 * MS, True, 20.0)
    assert b.pick(None, 20.0) is a  # a: 50 ms × e^-2 = 6.8 ms < 10 ms


# -------------------------------------------------------------------------------- consistent hash

KEYS = [f"user-{i}" for i in range(3000)]


def hreq(value: str) -> Req:
    return Req(headers=[(b"Host", b"h"), (b"X-User", value.encode())])


def placement(b: Balancer, keys: Iterable[str] = KEYS) -> dict[str, str]:
    out = {}
    for k in keys:
        s = b.pick(hreq(k), 0.0)
        assert s is not None
        out[k] = s.id
    return out


def test_consistent_hash_same_key_same_server_across_instances_and_processes() -> None:
    first = placement(make_balancer("consistent_hash", pool(1, 1, 1, 1, 1), key="header:x-user"))
    again = placement(make_balancer("consistent_hash", pool(1, 1, 1, 1, 1), key="header:X-USER"))
    assert first == again
    assert set(first.values()) == set(ids(pool(1, 1, 1, 1, 1)))
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from test_balance_algorithms import make_balancer, placement, pool, KEYS;"
        "b = make_balancer('consistent_hash', pool(1, 1, 1, 1, 1), key='header:x-user');"
        "print(json.dumps(placement(b, KEYS[:500])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert json.loads(out.stdout) == {k: first[k] for k in KEYS[:500]}


def test_consistent_hash_removing_one_server_moves_only_its_keys() -> None:
    servers = pool(1, 1, 1, 1, 1)
    b = make_balancer("consistent_hash", servers, key="header:x-user")
    before = placement(b)
    gone = servers[2]
    b.remove(gone)
    after = placement(b)
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == gone.id}
    assert 0.1 < len(moved) / len(KEYS) < 0.3
    b.add(gone)  # back: exactly the old placement
    assert placement(b) == before


def test_consistent_hash_weights_map_to_ring_weights() -> None:
    servers = pool(3, 1, 1)
    b = make_balancer("consistent_hash", servers, key="header:x-user")
    got = Counter(placement(b).values())
    assert got[servers[0].id] / len(KEYS) == pytest.approx(0.6, abs=0.05)


def test_consistent_hash_unavailable_owner_fails_over_in_ring_order_and_back() -> None:
    servers = pool(1, 1, 1, 1, 1)
    b = make_balancer("consistent_hash", servers, key="header:x-user")
    ring = HashRing({s.id: 1.0 for s in servers})
    before = placement(b)
    down = servers[0]
    down.available = False
    during = placement(b)
    for k in KEYS:
        if before[k] == down.id:
            assert during[k] == ring.get_n(f"{k}".encode(), 2)[1]
        else:
            assert during[k] == before[k]
    down.available = True
    assert placement(b) == before
    # exclude works the same way, and None when nothing is left.
    k = KEYS[0]
    order = ring.get_n(k.encode(), 5)
    by_id = {s.id: s for s in servers}
    assert b.pick(hreq(k), 0.0, exclude={by_id[order[0]], by_id[order[1]]}) is by_id[order[2]]
    assert b.pick(hreq(k), 0.0, exclude=set(servers)) is None


def test_consistent_hash_missing_key_uses_the_fallback() -> None:
    servers = pool(1, 1, 1)
    b = make_balancer("consistent_hash", servers, key="header:x-user")
    got = [b.pick(Req(), 0.0) for _ in range(6)]
    assert ids([s for s in got if s]) == ids(servers) * 2  # round_robin
    assert all(b.pick(hreq(""), 0.0) is not None for _ in range(3))  # empty = missing
    b2 = make_balancer(
        "consistent_hash", servers, key="cookie:sid", fallback="weighted_round_robin"
    )
    assert isinstance(b2, ConsistentHash) and b2.fallback.name == "weighted_round_robin"
    assert b2.pick(None, 0.0) is not None


@pytest.mark.parametrize(
    ("key", "req", "expected"),
    [
        ("header:x-user", Req(headers=[(b"x-USER", b" bob ")]), b"bob"),
        ("header:x-user", Req(headers=[(b"X-Users", b"no")]), None),
        ("cookie:sid", Req(headers=[(b"Cookie", b"a=1; sid=abc; z=2")]), b"abc"),
        ("cookie:sid", Req(headers=[(b"cookie", b"a=1"), (b"Cookie", b"sid=x=y")]), b"x=y"),
        ("cookie:sid", Req(headers=[(b"Cookie", b"xsid=1")]), None),
        ("query:u", Req(target=b"/a?x=1&u=7&u=8"), b"7"),
        ("query:u", Req(target=b"/a?uu=1&u"), None),
        ("query:u%20v", Req(target=b"/a?u%20v=3"), b"3"),  # raw names, no percent-decoding
        ("query:u", Req(target=b"/a"), None),
        ("path", Req(target=b"/a/b?x=1"), b"/a/b"),
        ("client_ip", Req(client_ip="2001:db8::1"), b"2001:db8::1"),
    ],
)
def test_consistent_hash_request_keys(key: str, req: Req, expected: bytes | None) -> None:
    b = ConsistentHash(pool(1, 1), key=key)
    assert b.request_key(req) == expected


def zipf_keys(n: int, rng: random.Random, distinct: int = 1000, s: float = 1.2) -> list[str]:
    weights = [1 / (i + 1) ** s for i in range(distinct)]
    return [f"k{i}" for i in rng.choices(range(distinct), weights=weights, k=n)]


@pytest.mark.parametrize("factor", [1.25, 1.5])
def test_consistent_hash_bounded_loads_under_skewed_keys(factor: float) -> None:
    servers = pool(1, 1, 1, 1, 1)
    b = make_balancer("consistent_hash", servers, key="header:x-user", balance_factor=factor)
    rng = random.Random(8)
    keys = zipf_keys(3000, rng)
    # Without a bound the hottest key's server takes far more than its share.
    plain = make_balancer("consistent_hash", pool(1, 1, 1, 1, 1), key="header:x-user")
    unbounded = Counter(s.id for k in keys if (s := plain.pick(hreq(k), 0.0)))
    assert max(unbounded.values()) > 1.5 * len(keys) / 5
    # Requests pile up (none finishes): at every step no server holds more than ⌈c × mean⌉.
    for i, k in enumerate(keys, 1):
        s = b.pick(hreq(k), 0.0)
        assert s is not None
        s.started()
        assert max(x.in_flight for x in servers) <= math.ceil(factor * i / 5)
    # With completions (random order): the chosen server is within bound when it is chosen.
    inflight: list[UpstreamServer] = [s for s in servers for _ in range(s.in_flight)]
    rng.shuffle(inflight)
    for k in zipf_keys(5000, rng):
        if inflight and rng.random() < 0.5:
            inflight.pop().finished(0.01, True, 0.0)
        s = b.pick(hreq(k), 0.0)
        assert s is not None
        s.started()
        inflight.append(s)
        assert s.in_flight <= math.ceil(factor * sum(x.in_flight for x in servers) / 5)


def test_consistent_hash_bounded_loads_prefer_the_owner_when_under_capacity() -> None:
    servers = pool(1, 1, 1)
    b = make_balancer("consistent_hash", servers, key="header:x-user", balance_factor=1.25)
    plain = make_balancer("consistent_hash", pool(1, 1, 1), key="header:x-user")
    assert placement(b) == placement(plain)


# ------------------------------------------------------------------------------------ slow start


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("weighted_round_robin", {}),
        ("weighted_round_robin", {"dynamic": True}),
        ("random", {"seed": 9}),
    ],
)
def test_slow_start_ramps_the_share_of_a_new_server(name: str, options: dict[str, object]) -> None:
    servers = pool(1, 1)
    b = make_balancer(name, servers, slow_start=10.0, **options)
    (new,) = pool(1, 1, 1)[2:]
    new.mark_returned(100.0)
    b.add(new)
    window_shares = []
    for second in range(12):
        got = picks(b, 3000, now=100.0 + second + 0.5)
        window_shares.append(got[new.id] / 3000)
    full = 1 / 3
    # factor(0.5 s) = 0.145 → share 0.145 / 2.145
    assert window_shares[0] == pytest.approx(0.145 / 2.145, abs=0.025)
    ramp = window_shares[0:10:3]
    assert ramp == sorted(ramp) and ramp[-1] - ramp[0] > 0.2
    assert window_shares[5] == pytest.approx(0.595 / 2.595, abs=0.025)
    assert window_shares[-1] == pytest.approx(full, abs=0.025)


def test_slow_start_in_least_connections_scales_weight() -> None:
    servers = pool(1, 1)
    b = make_balancer("least_connections", servers, slow_start=10.0, seed=3)
    servers[1].mark_returned(0.0)
    rng = random.Random(3)
    early, t = simulate(b, lambda s, t: 20 * MS, 2000, interval=MS, rng=rng, start=0.0)
    late, _ = simulate(b, lambda s, t: 20 * MS, 2000, interval=MS, rng=rng, start=20.0)
    assert early[servers[1].id] < 0.3 * 2000
    assert late[servers[1].id] == pytest.approx(1000, rel=0.1)


# ------------------------------------------------------------------ common behaviour, validation

ALL = [
    ("round_robin", {}),
    ("random", {"seed": 1}),
    ("weighted_round_robin", {}),
    ("weighted_round_robin", {"dynamic": True}),
    ("least_connections", {"seed": 1}),
    ("consistent_hash", {"key": "header:x-user"}),
    ("consistent_hash", {"key": "header:x-user", "balance_factor": 1.25}),
]


@pytest.mark.parametrize(("name", "options"), ALL)
def test_every_algorithm_honours_exclude_and_availability(
    name: str, options: dict[str, object]
) -> None:
    servers = pool(1, 2, 3, 1)
    b = make_balancer(name, servers, **options)
    for i, k in enumerate(KEYS[:200]):
        req = hreq(k) if i % 2 else None  # consistent_hash: with a key and via the fallback
        s = b.pick(req, i * 0.01, exclude={servers[0], servers[1]})
        assert s in (servers[2], servers[3])
        servers[3].available = False
        assert b.pick(req, i * 0.01, exclude={servers[0], servers[1]}) is servers[2]
        assert b.pick(req, i * 0.01, exclude=[servers[0], servers[1], servers[2]]) is None
        servers[3].available = True
    for s in servers:
        s.available = False
    assert b.pick(hreq("a"), 5.0) is None
    assert b.pick(None, 5.0) is None
    assert make_balancer(name, [], **options).pick(hreq("a"), 0.0) is None


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("least_conn", {}, "unknown balancing algorithm 'least_conn'"),
        ("round_robin", {"slow_start": 5}, "round_robin: unknown option 'slow_start'"),
        ("random", {"weights": 1}, "random: unknown option 'weights'"),
        ("random", {"slow_start": -1}, "option 'slow_start' must be >= 0"),
        ("random", {"slow_start": "10"}, "option 'slow_start' must be a number"),
        ("random", {"seed": 1.5}, "option 'seed' must be an integer"),
        ("weighted_round_robin", {"floor": 0.2}, "option 'floor' needs dynamic = true"),
        ("weighted_round_robin", {"dynamic": True, "floor": 0}, "'floor' must be > 0 and <= 1"),
        ("weighted_round_robin", {"dynamic": "yes"}, "option 'dynamic' must be true or false"),
        ("weighted_round_robin", {"dynamic": True, "explore_tau": math.inf}, "'explore_tau'"),
        ("least_connections", {"recompute_interval": math.nan}, "'recompute_interval'"),
        ("consistent_hash", {"key": "header:"}, "option 'key' must be"),
        ("consistent_hash", {"key": "body:x"}, "option 'key' must be"),
        ("consistent_hash", {"balance_factor": 1.0}, "option 'balance_factor' must be > 1"),
        ("consistent_hash", {"fallback": "consistent_hash"}, "option 'fallback' must be one of"),
        ("consistent_hash", {"fallback": "nope"}, "option 'fallback'"),
        ("consistent_hash", {"vnodes": 0}, "option 'vnodes'"),
        ("consistent_hash", {"slow_start": 3}, "option 'slow_start' needs 'balance_factor'"),
    ],
)
def test_validation_names_the_option(name: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_balancer(name, pool(1, 1), **options)


def test_factory_names_and_duplicates() -> None:
    assert set(ALGORITHMS) == {
        "round_robin",
        "random",
        "weighted_round_robin",
        "least_connections",
        "consistent_hash",
    }
    servers = pool(1, 1)
    with pytest.raises(ValueError, match="already in the pool"):
        make_balancer("random", [servers[0], servers[0]])
    for name in ALGORITHMS:
        assert make_balancer(name, servers).name == name

"""Rate limits at scale (issue 5, section 4 "Tests"): real proxies (``pyproxy run``, 2 workers each),
real Redis and a real 3-master Redis Cluster, ~1000 requests/s for 3 s per run from 8 keep-alive
client connections per instance (4 on each worker), one user (key from the ``X-User`` header).

**What the counts must be, exactly** (limit ``L`` per window ``W`` per user; the offered rate,
~10·L/W, keeps every free unit taken within a millisecond or so):

- ``sliding_window_counter``: windows are fixed, ``[kW, (k+1)W)`` on the limiter's clock — Redis
  ``TIME`` (Unix time, the clock of this machine) in modes ``redis`` and ``hybrid``,
  ``CLOCK_MONOTONIC`` in mode ``local`` — and a request is allowed iff ``⌊P·(W−e)/W⌋ + C + 1 ≤ L``.
  For a new key the first window admits ``L`` at once (``P = 0``); every later one admits exactly
  ``L``, one unit each ``W/L`` as the previous window's weight fades (``P = L``: unit ``n`` is free
  from ``e > (n−1)·W/L``, the last in the window's final ``W/L``). So each run starts on a window
  boundary of the limiter's clock and lasts exactly 3 windows: ``3L`` allowed, plus at most one (a
  request sent just before the end and decided just after it, when the next window's first unit is
  already free). Started ``e0`` into a window, the same 3 s would admit ``3L + L·e0/W`` — up to a
  third more: that is why runs are aligned, not a tolerance.
- ``sliding_log``: never more than ``L`` in any interval of ``W``. Under this load the first ``L``
  pass at once and each unit frees its slot ``W`` after it was admitted (the local log up to ``W/16``
  later, never earlier), so 3 s from the first request hold 3 batches — ``3L`` — and the 4th cannot
  start before ``t0 + 3W``. *Any interval*: a request's decision lies between the client's send and
  receive times, on the client's ``CLOCK_MONOTONIC``, so ``L + 1`` allowed requests decided within
  less than ``W`` would show as ``L + 1`` allowed responses whose last receive comes less than
  ``W`` after their first send. Every such group is checked; no tolerance is needed: the limiter's
  clock runs at the same rate (``CLOCK_MONOTONIC`` itself in mode ``local``; Redis' ``TIME`` is
  ``CLOCK_REALTIME``, which NTP slews alike) and the loopback round trips around each decision are a
  margin on the safe side. One exception, documented in ``pyproxy/ratelimit/local.py``: two local
  workers crossing a sub-window boundary in the same microseconds may admit one unit more, so mode
  ``local`` is held to ``L + 1``.
- ``hybrid``: each fixed window holds at most ``overshoot_bound(L, N, R, sync_interval)`` (the bound
  ``pyproxy/ratelimit/hybrid.py`` documents: ``L + N·R·(2·sync_interval + RTT)``, N processes each
  admitting at most R/s — here every worker of both instances, ``N·R`` the offered rate), and the run
  as a whole no fewer than an exact limiter would admit, less 3%.

**Able to fail**: a limit kept per worker would admit 2× (local: 600) or 4× (redis, hybrid: 1200) —
each worker is offered ≥ 250/s, well above ``L`` —, per instance 2×; both caught by the ±3% bounds
(tried: workers given tables of their own → 600; two ``local`` instances → 600). The client checks
through ``/proc`` that every worker holds 4 of the connections.

**Measured** (2-vCPU development machine, five runs, two of them beside one and two busy-looping
processes): the client offered and got 998–1001 requests/s (it reaches ~8000/s against one local
instance, mostly 429s); 100 per 1 s: counter 300–301 allowed (per window 99–100), log 300 (densest
101 allowed spanning 1000.6–1001.2 ms in Redis and the Cluster, 1058.8–1061.2 ms locally); 10 per
100 ms (Redis): counter 299–301 (8–10 per window surely inside it), log 300 (densest 11: 100.5–100.6 ms); hybrid
342–365 allowed, 132–146 in the first window and 101–117 in the later ones, against a bound of 202.
The file takes 40–50 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import children, free_port, proxy_process
from pyproxy.loop import new_event_loop
from pyproxy.ratelimit.hybrid import overshoot_bound
from pyproxy.sample_server import SampleServer
from services import RedisCluster, RedisServer

RATE = 1000.0  # requests per second, all clients together
SECONDS = 3.0
PER_WORKER = 4  # client connections on each worker
LIMIT = 100
SUB_LIMIT = 10  # per 100 ms

ROUTES = {
    # route -> (limit, window, algorithm)
    "counter": (LIMIT, "1s", "sliding_window_counter"),
    "log": (LIMIT, "1s", "sliding_log"),
    "subcounter": (SUB_LIMIT, "100ms", "sliding_window_counter"),
    "sublog": (SUB_LIMIT, "100ms", "sliding_log"),
}


def config_text(port: int, upstream: str, ratelimit: str, routes: list[str]) -> str:
    text = (
        f'workers = 2\n[[listeners]]\nport = {port}\n[admin]\nenabled = false\n'
        f'[pools.p]\nservers = ["{upstream}"]\n[ratelimit]\n{ratelimit}'
    )
    for name in routes:
        limit, window, algorithm = ROUTES[name]
        text += (
            f'[[routes]]\npool = "p"\nname = "{name}"\npath_prefix = "/{name}"\n[routes.ratelimit]\n'
            f'key = "header:X-User"\n'
            f'key_limits = [{{limit = {limit}, window = "{window}", algorithm = "{algorithm}"}}]\n'
        )
    return text + '[[routes]]\npool = "p"\nname = "free"\n'  # no limits: to see where connections land


@contextlib.contextmanager
def instances(tmp_path: Path, count: int, ratelimit: str, routes: list[str]) -> Iterator[list[tuple[int, int]]]:
    """``count`` proxy instances of 2 workers (and one upstream for all); yields (port, pid) each."""
    up = SampleServer(name="up")
    with up.running(), contextlib.ExitStack() as stack:
        found = []
        for i in range(count):
            port = free_port()
            cfg = tmp_path / f"instance{i}.toml"
            cfg.write_text(config_text(port, up.address, ratelimit, routes))
            proc = stack.enter_context(proxy_process(cfg, port))
            found.append((port, proc.pid))
        yield found


# -- the client ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    sent: float  # time.monotonic() before the request was written
    received: float  # ... after its response was read
    status: int


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.local_port: int = writer.get_extra_info("sockname")[1]

    async def request(self, payload: bytes) -> tuple[float, float, int]:
        sent = time.monotonic()
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length:
            await self.reader.readexactly(length)
        return sent, time.monotonic(), int(head[9:12])

    def close(self) -> None:
        self.writer.close()


def _accepted_inodes(port: int) -> dict[int, int]:
    """Client port -> inode of the socket the proxy accepted for it (0 while not yet accepted)."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) != 0:
            found[int(remote.split(":")[1], 16)] = inode
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


async def connect_evenly(port: int, supervisor: int) -> list[Connection]:
    """``PER_WORKER`` keep-alive connections on each worker of the instance (the kernel spreads
    connections over the workers' SO_REUSEPORT listeners at random: open until each has its share,
    found through ``/proc``, and close the others)."""
    deadline = time.monotonic() + 15
    while len(children(supervisor)) < 2:
        assert time.monotonic() < deadline, "the supervisor did not start 2 workers"
        await asyncio.sleep(0.05)
    workers = sorted(children(supervisor))
    kept: dict[int, list[Connection]] = {w: [] for w in workers}
    extra: list[Connection] = []
    while not all(len(c) >= PER_WORKER for c in kept.values()):
        assert time.monotonic() < deadline, {w: len(c) for w, c in kept.items()}
        if len(extra) >= 8:  # a worker still starting (not listening yet): give it time
            await asyncio.sleep(0.1)
        conn = Connection(*await asyncio.open_connection("127.0.0.1", port))
        # a request on it (no limit) makes sure the worker has accepted it
        assert (await conn.request(b"GET /free HTTP/1.1\r\nHost: t\r\n\r\n"))[2] == 200
        inode = _accepted_inodes(port)[conn.local_port]
        owner = next(w for w in workers if inode in _socket_inodes(w))
        (kept[owner] if len(kept[owner]) < PER_WORKER else extra).append(conn)
    for conn in extra:
        conn.close()
    return [conn for conns in kept.values() for conn in conns]


@dataclass
class Run:
    replies: list[Reply]
    start: float  # monotonic: a whole second of the limiter's clock
    skew: float  # how far ``start`` may be from that second (converting Unix time to monotonic)
    rps: float  # achieved

    @property
    def allowed(self) -> list[Reply]:
        return sorted((r for r in self.replies if r.status == 200), key=lambda r: r.sent)

    def statuses(self) -> Counter[int]:
        return Counter(r.status for r in self.replies)

    def per_window(self, window: float, windows: int) -> list[int]:
        """Allowed requests surely decided in each fixed window ``[start + kW, start + (k+1)W)`` of
        the limiter's clock: those whose send-to-receive interval (widened by ``skew``) lies in one."""
        counts = Counter(
            k
            for r in self.allowed
            if (k := math.floor((r.sent - self.skew - self.start) / window))
            == math.floor((r.received + self.skew - self.start) / window)
        )
        return [counts[k] for k in range(windows)]


def next_boundary(clock: str, lead: float = 0.3) -> tuple[float, float]:
    """The next whole second at least ``lead`` from now on the limiter's clock as a
    ``time.monotonic()`` value, and how far off it may be (``clock``: ``"monotonic"``, exact; or
    ``"redis"``, Unix time, converted through a pair of clock reads bracketed by two monotonic ones)."""
    if clock == "monotonic":
        return float(math.ceil(time.monotonic() + lead)), 0.0
    best = (math.inf, 0.0)
    for _ in range(20):
        before = time.monotonic()
        wall = time.time()
        after = time.monotonic()
        best = min(best, (after - before, wall - (before + after) / 2))
    error, offset = best
    return math.ceil(time.monotonic() + offset + lead) - offset, error / 2 + 1e-6


async def _drive(conns: list[Connection], path: str, user: str, clock: str) -> Run:
    """``RATE`` requests/s for ``SECONDS`` over ``conns`` (each paced at its share, staggered),
    starting on a whole second of the limiter's clock."""
    payload = f"GET /{path} HTTP/1.1\r\nHost: t\r\nX-User: {user}\r\n\r\n".encode()
    start, skew = next_boundary(clock)
    end = start + SECONDS
    gap = len(conns) / RATE

    async def pace(j: int, conn: Connection) -> list[Reply]:
        out = []
        due = start + j / RATE
        while due < end:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            out.append(Reply(*await conn.request(payload)))
            due += gap  # behind schedule: send at once (catch up)
        return out

    replies = [r for part in await asyncio.gather(*(pace(j, c) for j, c in enumerate(conns))) for r in part]
    last = max(r.received for r in replies)
    return Run(replies, start, skew, len(replies) / (last - start))


def drive_all(targets: list[tuple[int, int]], runs: list[tuple[str, str]], clock: str) -> list[Run]:
    """Connect evenly to every instance, then one run per ``(route, user)``, one after the other."""

    async def main() -> list[Run]:
        conns = [c for port, pid in targets for c in await connect_evenly(port, pid)]
        try:
            return [await _drive(conns, path, user, clock) for path, user in runs]
        finally:
            for conn in conns:
                conn.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(asyncio.wait_for(main(), 60))


# -- what is checked --------------------------------------------------------------------------------


def densest(allowed: list[Reply], window: float, limit: int) -> float:
    """The shortest span (last receive − first send) of ``limit + 1`` allowed requests, chosen to
    make it shortest: must be ≥ ``window`` if no interval of ``window`` held more than ``limit``
    decisions (see the module doc). ``math.inf`` when there are not that many."""
    best = math.inf
    by_sent = sorted(allowed, key=lambda r: r.sent)
    for i, first in enumerate(by_sent):
        later = sorted(r.received for r in by_sent[i:])
        if len(later) > limit:
            best = min(best, later[limit] - first.sent)
    return best


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}", end="")


def check_load(run: Run, what: str) -> None:
    """Only 200s and 429s, and the load was there: the expectations need every free unit taken within
    a few ms (one frees every 10 ms here), which 70% of ``RATE`` still does on a busy machine."""
    statuses = run.statuses()
    assert set(statuses) <= {200, 429}, (what, statuses)
    assert run.rps >= 0.7 * RATE, f"{what}: the client reached only {run.rps:.0f} requests/s"


def check_total(run: Run, limit: int, window: float, what: str) -> int:
    """``limit`` per ``window`` over the run, ± 3% (see the module doc); the count."""
    allowed = len(run.allowed)
    expected = limit * SECONDS / window
    assert abs(allowed - expected) <= 0.03 * expected, f"{what}: {allowed} allowed, expected {expected:.0f} ± 3%"
    return allowed


def check_counter(run: Run, limit: int, window: float, what: str) -> str:
    """A ``sliding_window_counter`` run: the total, and never more than ``limit`` in a fixed window
    (``C ≤ L`` always). What it measured, for the report."""
    check_load(run, what)
    allowed = check_total(run, limit, window, what)
    windows = run.per_window(window, round(SECONDS / window))
    assert max(windows) <= limit, f"{what}: allowed per window {windows}"
    return f"{allowed} allowed of {len(run.replies)} at {run.rps:.0f}/s (per window {min(windows)}-{max(windows)})"


def check_log(run: Run, limit: int, window: float, what: str, slack: int = 0) -> str:
    """A ``sliding_log`` run: the total, and never more than ``limit`` (+ ``slack``) allowed in any
    interval of ``window``. What it measured, for the report."""
    check_load(run, what)
    allowed = check_total(run, limit, window, what)
    span = densest(run.allowed, window, limit + slack)
    assert span >= window, f"{what}: {limit + slack + 1} allowed within {span * 1000:.1f} ms < {window:g} s"
    strict = densest(run.allowed, window, limit)
    return (
        f"{allowed} allowed of {len(run.replies)} at {run.rps:.0f}/s (the densest {limit + 1} allowed "
        f"span {strict * 1000:.1f} ms)"
    )


def shared_runs(targets: list[tuple[int, int]], clock: str, label: str, log_slack: int = 0) -> str:
    """The two 100-per-second runs (counter, then log) over ``targets``, checked; the report line."""
    user = uuid.uuid4().hex[:12]
    counter, log = drive_all(targets, [("counter", f"c-{user}"), ("log", f"l-{user}")], clock)
    return (
        f"{label}: sliding_window_counter {check_counter(counter, LIMIT, 1.0, f'{label} counter')}; "
        f"sliding_log {check_log(log, LIMIT, 1.0, f'{label} log', log_slack)}"
    )


REDIS_MODE = 'mode = "redis"\nredis_url = "{url}"\ntimeout = "1s"\non_redis_error = "deny"\n{extra}'


# -- the tests --------------------------------------------------------------------------------------


def test_two_instances_share_limits_through_redis(
    tmp_path: Path, redis_clean: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    ratelimit = REDIS_MODE.format(url=redis_clean.url, extra="")
    with instances(tmp_path, 2, ratelimit, ["counter", "log", "subcounter", "sublog"]) as targets:
        report(capsys, shared_runs(targets, "redis", "redis, 2 instances x 2 workers, 100/1s"))
        # Sub-second: 10 per 100 ms, at that resolution (per 100 ms window, any 100 ms interval).
        user = uuid.uuid4().hex[:12]
        sub, sublog = drive_all(targets, [("subcounter", f"sc-{user}"), ("sublog", f"sl-{user}")], "redis")
    report(
        capsys,
        f"redis, 10/100ms: sliding_window_counter {check_counter(sub, SUB_LIMIT, 0.1, 'redis 10/100ms counter')}; "
        f"sliding_log {check_log(sublog, SUB_LIMIT, 0.1, 'redis 10/100ms log')}",
    )


def test_two_instances_share_limits_through_a_redis_cluster(
    tmp_path: Path, redis_cluster_clean: RedisCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    ratelimit = REDIS_MODE.format(url=redis_cluster_clean.url, extra="cluster = true\n")
    with instances(tmp_path, 2, ratelimit, ["counter", "log"]) as targets:
        report(capsys, shared_runs(targets, "redis", "redis cluster (3 masters), 2 instances x 2 workers, 100/1s"))


def test_local_limits_hold_across_two_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with instances(tmp_path, 1, 'mode = "local"\n', ["counter", "log"]) as targets:
        # the local log: one more allowed when two workers race at a sub-window boundary (module doc)
        report(capsys, shared_runs(targets, "monotonic", "local, 1 instance x 2 workers, 100/1s", log_slack=1))


def test_hybrid_overshoot_stays_within_its_documented_bound(
    tmp_path: Path, redis_clean: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    sync_interval = 0.05
    ratelimit = f'mode = "hybrid"\nredis_url = "{redis_clean.url}"\ntimeout = "1s"\nsync_interval = "50ms"\n'
    with instances(tmp_path, 2, ratelimit, ["counter"]) as targets:
        (run,) = drive_all(targets, [("counter", f"h-{uuid.uuid4().hex[:12]}")], "redis")
    check_load(run, "hybrid")
    # Every worker of both instances decides on its own (4 processes); together they were offered
    # the measured rate.
    bound = overshoot_bound(LIMIT, 4, run.rps / 4, sync_interval)
    windows = run.per_window(1.0, round(SECONDS))
    allowed = len(run.allowed)
    report(
        capsys,
        f"hybrid, 2 instances x 2 workers, sync 50 ms, 100/1s: {allowed} allowed of {len(run.replies)} at "
        f"{run.rps:.0f}/s (an exact limiter: {LIMIT * SECONDS:.0f}); per 1 s window {windows}, documented "
        f"bound {bound:.0f} per window",
    )
    assert max(windows) <= bound, (windows, bound)
    assert allowed >= 0.97 * LIMIT * SECONDS, allowed

"""Load-balancing algorithms for a pool: which :class:`UpstreamServer` serves the next request.

Every algorithm has the same interface (selection split from construction, as Pingora's
``pingora-load-balancing`` does it)::

    b = make_balancer("weighted_round_robin", servers, dynamic=True, slow_start=30)
    s = b.pick(request, now, exclude=tried)   # None when no available server outside ``exclude``
    s.started(); ...; s.finished(latency, ok, now)   # the caller records the outcome
    b.add(server); b.remove(server)                  # run-time pool changes; the others keep state

``pick`` never calls ``started``/``finished``: the request path does, so retries and cancellations
are counted where they happen. Servers whose ``available`` is False (health checks, outlier
ejection, circuit breakers, drain — other code) or whose weight is 0 are skipped, as are those in
``exclude`` (servers a retry already tried). ``now`` is monotonic seconds.

Algorithms:

* ``round_robin`` — plain rotation over the available servers, weights ignored.
* ``random`` — weighted random choice (weight × slow-start factor).
* ``weighted_round_robin`` — nginx's smooth weighted round robin
  (https://github.com/phusion/nginx/commit/27e94984486058d73157038f7950a0a36ecc6e35): each pick adds
  every eligible server's effective weight to its score, takes the highest score and subtracts the
  total, so weights 5, 1, 1 give ``a a b a c a a``. ``dynamic=True`` scales each weight by a latency
  factor ``exp(-(latency / best - 1) / temperature)`` (a softmax on latency relative to the
  fastest available server; latencies are plain per-request averages, ``UpstreamServer.avg``: a
  peak EWMA holds one spike for ~tau and would skew the ratios), an error factor
  ``1 - error_rate`` and slow start; the product of the latency and error factors is clamped to
  ``[floor, 1]``. With the default temperature 2 a server 1.2× slower keeps 90% of its weight, 2×
  slower 61%, 5× slower 14% (~12% of a two-server pool: measured, never starved), 15× slower
  0.1% — so under a spread of latencies the slowest few percent of requests, the p99, stop
  landing on a very slow server, which a power law (``(best/latency)^k``) cannot do without
  starving a moderately slow one.
  Identical servers get identical factors, so identical shares — no winner-takes-all feedback as in
  traefik#12306, where a server penalised for a few slow responses stopped getting the traffic that
  would have shown it had recovered. Here two things prevent that: the floor (every server keeps
  ``floor`` × its static share, so it keeps being measured) and exploration (an estimate with no new
  sample decays toward the pool's best with ``explore_tau``).
  Effective weights are recomputed at most every ``recompute_interval`` seconds; ``pick`` itself
  only adds and compares floats.
* ``least_connections`` — power of two choices (Mitzenmacher 2001, "The Power of Two Choices in
  Randomized Load Balancing"; Envoy's ``LEAST_REQUEST``): two distinct servers drawn at random
  (weighted by weight × slow-start factor); the lower cost wins, cost = √(peak-EWMA latency) ×
  (requests in flight + 1) / weight (Finagle's and Linkerd's P2C peak EWMA with the latency's
  square root, so a 5× slower server keeps ~8% of a two-server pool instead of ~4%), the latency read
  decayed toward 0 with the time since its last sample (tower's ``PeakEwma``), so a server nobody
  has measured lately gets tried again; equal costs go to fewer requests in flight.
* ``consistent_hash`` — :class:`pyproxy.core.HashRing` keyed by a header, cookie, query parameter,
  the client IP or the path; an unavailable or excluded owner hands over to the next server in ring
  order (``get_n``) and gets its keys back when it returns. ``balance_factor`` bounds loads
  (Mirrokni et al. 2016, https://arxiv.org/abs/1608.01350) over the servers' real ``in_flight``:
  a server takes a request only while ``in_flight < ceil(c × (L + 1) × w / W)`` (``L``, ``W``:
  in-flight total and weight total of the eligible servers), else the next one in ring order does.
  The ring's own ``acquire``/``release`` counts only loads it handed out itself and cannot skip
  unavailable or excluded nodes, so the same formula is applied here in Python instead.

Slow start: option ``slow_start`` (seconds) multiplies weights by
:meth:`UpstreamServer.slow_start_factor` for the weighted algorithms (for ``consistent_hash`` it
scales the bounded-load capacity; key placement never changes). Options are checked when the
balancer is built: an unknown name or a bad value raises :class:`ValueError` naming the option.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any, ClassVar, Protocol

from pyproxy._balance import Rotation
from pyproxy.balance.upstream import UpstreamServer
from pyproxy.core import HashRing
from pyproxy.headers import request_value

__all__ = [
    "ALGORITHMS",
    "Balancer",
    "ConsistentHash",
    "LeastConnections",
    "RequestInfo",
    "RoundRobin",
    "WeightedRandom",
    "WeightedRoundRobin",
    "make_balancer",
]

_INF = float("inf")
_DEFAULT_RECOMPUTE = 0.1
_RANDOM_TRIES = 4  # rejection-sampling draws before the exact O(n) scan


class RequestInfo(Protocol):
    """What the balancers read of a request (only ``consistent_hash`` reads anything)."""

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Raw header lines, names in any case."""
        ...

    @property
    def target(self) -> bytes:
        """Origin-form request target, e.g. ``b"/a/b?x=1"``."""
        ...

    @property
    def client_ip(self) -> str: ...


# ------------------------------------------------------------------------------------- validation


def _number(
    algorithm: str,
    option: str,
    value: object,
    *,
    low: float,
    high: float = _INF,
    low_open: bool = False,
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{algorithm}: option {option!r} must be a number, got {value!r}")
    x = float(value)
    bad = math.isnan(x) or math.isinf(x) or x > high or (x <= low if low_open else x < low)
    if bad:
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        hi = "" if high == _INF else f" and <= {high:g}"
        raise ValueError(f"{algorithm}: option {option!r} must be {lo}{hi}, got {value!r}")
    return x


def _seed(algorithm: str, value: object) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{algorithm}: option 'seed' must be an integer or None, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------- balancer


class Balancer:
    """Base class: the server list and its run-time changes. Subclasses implement :meth:`pick`."""

    name: ClassVar[str]
    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, servers: Sequence[UpstreamServer]) -> None:
        self._servers: list[UpstreamServer] = []
        for s in servers:
            self._check_new(s)
            self._servers.append(s)

    @property
    def servers(self) -> tuple[UpstreamServer, ...]:
        return tuple(self._servers)

    def __len__(self) -> int:
        return len(self._servers)

    def _index(self, server: UpstreamServer) -> int:
        for i, s in enumerate(self._servers):
            if s.id == server.id:
                return i
        return -1

    def _check_new(self, server: UpstreamServer) -> None:
        if not isinstance(server, UpstreamServer):
            raise TypeError(f"{self.name}: expected an UpstreamServer, got {server!r}")
        if self._index(server) >= 0:
            raise ValueError(f"{self.name}: server {server.id} is already in the pool")

    def add(self, server: UpstreamServer) -> None:
        """Add ``server`` to the pool. Adding a server already present (the same object) re-reads
        its weight now instead of at the next recompute."""
        i = self._index(server)
        if i < 0 or self._servers[i] is not server:
            self._check_new(server)
            self._servers.append(server)
            self._added()
        self._changed()

    def remove(self, server: UpstreamServer) -> None:
        """Remove the server with ``server.id``; ValueError if it is not in the pool."""
        i = self._index(server)
        if i < 0:
            raise ValueError(f"{self.name}: server {server.id} is not in the pool")
        del self._servers[i]
        self._removed(i)
        self._changed()

    # Hooks keeping per-server lists parallel to ``_servers``.
    def _added(self) -> None:
        """A server was appended."""

    def _removed(self, index: int) -> None:
        """The server at ``index`` was deleted."""

    def _changed(self) -> None:
        """The server list or a weight changed."""

    def pick(
        self,
        request: RequestInfo | None,
        now: float,
        exclude: Container[UpstreamServer] = (),
    ) -> UpstreamServer | None:
        """The server for this request, or None when no available server outside ``exclude``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({[s.id for s in self._servers]})"


# ------------------------------------------------------------------------------------- round robin


class RoundRobin(Rotation, Balancer):
    """Rotation over the available servers; weights ignored. O(1) per pick while all are up.

    ``pick`` is :class:`pyproxy._balance.Rotation`'s (compiled: it runs once per request): the
    next server from ``_next`` on that is available and not in ``exclude``."""

    name = "round_robin"

    def __init__(self, servers: Sequence[UpstreamServer]) -> None:
        super().__init__(servers)
        self._next = 0

    def _removed(self, index: int) -> None:
        if index < self._next:
            self._next -= 1  # the rotation continues with the same server


# ------------------------------------------------------------------------ weighted: shared part


class _Weighted(Balancer):
    """Effective weights (weight × slow-start factor [× dynamic factors]) cached in a list
    parallel to the servers, recomputed at most every ``recompute_interval`` seconds of ``now``."""

    def __init__(
        self,
        servers: Sequence[UpstreamServer],
        *,
        slow_start: float = 0.0,
        recompute_interval: float = _DEFAULT_RECOMPUTE,
    ) -> None:
        super().__init__(servers)
        self.slow_start = _number(self.name, "slow_start", slow_start, low=0.0)
        self.recompute_interval = _number(
            self.name, "recompute_interval", recompute_interval, low=0.0
        )
        self._eff: list[float] = [0.0] * len(self._servers)
        self._total = 0.0  # sum of _eff
        self._due = -_INF  # next recompute time

    def _added(self) -> None:
        self._eff.append(0.0)

    def _removed(self, index: int) -> None:
        del self._eff[index]

    def _changed(self) -> None:
        self._due = -_INF

    def _recompute(self, now: float) -> None:
        ss = self.slow_start
        eff = self._eff
        for i, s in enumerate(self._servers):
            w = s.weight
            if w > 0.0 and ss:
                w *= s.slow_start_factor(now, ss)
            eff[i] = w if w > 0.0 else 0.0
        self._finish_recompute(now)

    def _finish_recompute(self, now: float) -> None:
        self._total = math.fsum(self._eff)
        self._due = now + self.recompute_interval

    def effective_weights(self, now: float) -> dict[str, float]:
        """Current effective weight per server id (for the admin API and tests)."""
        if now >= self._due:
            self._recompute(now)
        return {s.id: w for s, w in zip(self._servers, self._eff)}


def _fastest(servers: Sequence[UpstreamServer]) -> float:
    """The lowest average latency among the measured servers that take requests (inf: none)."""
    best = _INF
    for s in servers:
        if s.available and s.weight > 0.0 and s.sampled and 0.0 < s.avg < best:
            best = s.avg
    return best


def _weighted_draw(
    servers: Sequence[UpstreamServer],
    eff: Sequence[float],
    exclude: Container[UpstreamServer],
    skip: int,
    rnd: Callable[[], float],
) -> int:
    """Index of one server drawn by ``eff`` among those that take requests, are not in
    ``exclude`` and are not ``skip``; -1 if none (an exact O(n) scan)."""
    ok = [
        i
        for i, s in enumerate(servers)
        if eff[i] > 0.0 and i != skip and s.available and (not exclude or s not in exclude)
    ]
    if not ok:
        return -1
    x = rnd() * math.fsum(eff[i] for i in ok)
    for i in ok:
        x -= eff[i]
        if x < 0.0:
            return i
    return ok[-1]  # float rounding left x at 0


class _RandomWeighted(_Weighted):
    """Weighted random draws: bisect on cumulative weights, rejecting ineligible servers a few
    times (exact: rejection sampling keeps the distribution), then an exact O(n) scan."""

    def __init__(
        self,
        servers: Sequence[UpstreamServer],
        *,
        slow_start: float = 0.0,
        recompute_interval: float = _DEFAULT_RECOMPUTE,
        seed: int | None = None,
    ) -> None:
        super().__init__(servers, slow_start=slow_start, recompute_interval=recompute_interval)
        self._rng = random.Random(_seed(self.name, seed))
        self._random = self._rng.random
        self._cum: list[float] = []

    def _finish_recompute(self, now: float) -> None:
        cum: list[float] = []
        t = 0.0
        for w in self._eff:
            t += w
            cum.append(t)
        self._cum = cum
        super()._finish_recompute(now)

    def _draw(self, exclude: Container[UpstreamServer], skip: int) -> int:
        """Index of one eligible server drawn by effective weight, never ``skip``; -1 if none."""
        servers, total = self._servers, self._total
        if total <= 0.0:
            return -1
        cum, rnd = self._cum, self._random
        n = len(servers)
        for _ in range(_RANDOM_TRIES):
            i = bisect_right(cum, rnd() * total)
            if i < n and i != skip:
                s = servers[i]
                if s.available and (not exclude or s not in exclude):
                    return i
        # Many ineligible servers (or one dominant ``skip``): draw exactly among the eligible ones.
        return _weighted_draw(servers, self._eff, exclude, skip, rnd)


# ---------------------------------------------------------------------------------------- random


class WeightedRandom(_RandomWeighted):
    """Random choice among the available servers, proportional to weight × slow-start factor."""

    name = "random"
    OPTIONS = frozenset({"slow_start", "recompute_interval", "seed"})

    def pick(
        self,
        request: RequestInfo | None,
        now: float,
        exclude: Container[UpstreamServer] = (),
    ) -> UpstreamServer | None:
        if now >= self._due:
            self._recompute(now)
        i = self._draw(exclude, -1)
        return None if i < 0 else self._servers[i]


# ---------------------------------------------------------------------------- least connections


class LeastConnections(_RandomWeighted):
    """Power of two choices on √latency × (in flight + 1) per unit of weight (see the module doc).

    The two candidates are drawn by weight × slow start × a latency factor (fastest average /
    this server's average, never below :data:`DRAW_FLOOR`), so in a large pool a much slower
    server seldom even gets into the pair; in a pool of two, both are always the pair and the cost
    alone decides."""

    name = "least_connections"
    OPTIONS = frozenset({"slow_start", "recompute_interval", "seed"})
    DRAW_FLOOR: ClassVar[float] = 0.01

    def __init__(
        self,
        servers: Sequence[UpstreamServer],
        *,
        slow_start: float = 0.0,
        recompute_interval: float = _DEFAULT_RECOMPUTE,
        seed: int | None = None,
    ) -> None:
        # weight × slow start per server: the "per unit of weight" of the cost (``_eff``, which
        # the draws use, also carries the latency factor)
        self._weights: list[float] = [0.0] * len(servers)
        super().__init__(servers, slow_start=slow_start, recompute_interval=recompute_interval, seed=seed)

    def _added(self) -> None:
        super()._added()
        self._weights.append(0.0)

    def _removed(self, index: int) -> None:
        super()._removed(index)
        del self._weights[index]

    def _recompute(self, now: float) -> None:
        ss, servers, eff, weights = self.slow_start, self._servers, self._eff, self._weights
        best = _fastest(servers)
        floor = self.DRAW_FLOOR
        for i, s in enumerate(servers):
            w = s.weight
            if w > 0.0 and ss:
                w *= s.slow_start_factor(now, ss)
            w = w if w > 0.0 else 0.0
            weights[i] = w
            f = best / s.avg if s.sampled and s.avg > best else 1.0
            eff[i] = w * (f if f > floor else floor)
        self._finish_recompute(now)

    def pick(
        self,
        request: RequestInfo | None,
        now: float,
        exclude: Container[UpstreamServer] = (),
    ) -> UpstreamServer | None:
        if now >= self._due:
            self._recompute(now)
        i = self._draw(exclude, -1)
        if i < 0:
            return None
        servers = self._servers
        j = self._draw(exclude, i)
        if j < 0:
            return servers[i]
        a, b = servers[i], servers[j]
        # Finagle/Linkerd's P2C + peak EWMA, softened: cost = sqrt(latency) × (in flight + 1) /
        # weight. With latency itself (Finagle's cost) a server r× slower settles near 1/(1+r²) of
        # a two-server pool (~4% at r = 5: close to starving); with sqrt near 1/(1+r^1.5) (~8% at
        # r = 5, ~0.1% at r = 100, so a very slow server stays out of the p99). Latency is read
        # decayed toward 0 since its last sample: an unmeasured or long-unused server costs little
        # and is tried again (exploration). Weights honoured by cross-multiplying.
        w = self._weights
        ca = math.sqrt(a.latency(now)) * (a.in_flight + 1) * w[j]
        cb = math.sqrt(b.latency(now)) * (b.in_flight + 1) * w[i]
        if ca < cb:
            return a
        if cb < ca:
            return b
        # Equal costs (both unmeasured): fewer in flight per unit of weight.
        return a if a.in_flight * w[j] <= b.in_flight * w[i] else b


# ---------------------------------------------------------------------------- weighted round robin


class WeightedRoundRobin(_Weighted):
    """Smooth weighted round robin (nginx), optionally with latency/error-aware weights."""

    name = "weighted_round_robin"
    OPTIONS = frozenset(
        {"slow_start", "recompute_interval", "dynamic", "floor", "temperature", "explore_tau"}
    )

    def __init__(
        self,
        servers: Sequence[UpstreamServer],
        *,
        slow_start: float = 0.0,
        recompute_interval: float = _DEFAULT_RECOMPUTE,
        dynamic: bool = False,
        floor: float | None = None,
        temperature: float | None = None,
        explore_tau: float | None = None,
    ) -> None:
        super().__init__(servers, slow_start=slow_start, recompute_interval=recompute_interval)
        if not isinstance(dynamic, bool):
            raise ValueError(
                f"{self.name}: option 'dynamic' must be true or false, got {dynamic!r}"
            )
        self.dynamic = dynamic
        if not dynamic:
            for option, value in (
                ("floor", floor),
                ("temperature", temperature),
                ("explore_tau", explore_tau),
            ):
                if value is not None:
                    raise ValueError(f"{self.name}: option {option!r} needs dynamic = true")
        # floor: lowest latency × error factor, i.e. the smallest fraction of its static share a
        # server can fall to. 0.002 keeps every server measured (a 100× slower server still gets
        # 0.2% of its share: a sample every few seconds at a few hundred requests per second) while
        # letting the client-visible p99 leave the slow server's latency (bench/balance_latency.py).
        self.floor = (
            0.002
            if floor is None
            else _number(self.name, "floor", floor, low=0.0, high=1.0, low_open=True)
        )
        self.temperature = (
            2.0
            if temperature is None
            else _number(self.name, "temperature", temperature, low=0.0, low_open=True)
        )
        self.explore_tau = (
            10.0
            if explore_tau is None
            else _number(self.name, "explore_tau", explore_tau, low=0.0, low_open=True)
        )
        self._scores: list[float] = [0.0] * len(self._servers)
        self._rng = random.Random()

    def _draw_excluding(self, exclude: Container[UpstreamServer]) -> UpstreamServer | None:
        """A pick that must skip some servers (a retry, a hedge, a full or open server): a random
        draw by effective weight, leaving the smooth sequence alone. Running the smooth sequence
        with servers left out lets a skipped turn fall to whichever eligible server holds the most
        credit — often a slow one with a small weight that has been saving it up — so retries
        would pile onto the slowest server."""
        i = _weighted_draw(self._servers, self._eff, exclude, -1, self._rng.random)
        return None if i < 0 else self._servers[i]

    # Scores follow their servers; a new server starts at 0, as in nginx.
    def _added(self) -> None:
        super()._added()
        self._scores.append(0.0)

    def _removed(self, index: int) -> None:
        super()._removed(index)
        del self._scores[index]

    def _recompute(self, now: float) -> None:
        if not self.dynamic:
            super()._recompute(now)
            return
        servers, eff = self._servers, self._eff
        ss, floor, temp, explore = self.slow_start, self.floor, self.temperature, self.explore_tau
        # Latencies compared here are the plain average (UpstreamServer.avg), not the peak EWMA.
        best = _fastest(servers)
        for i, s in enumerate(servers):
            w = s.weight
            if w <= 0.0:
                eff[i] = 0.0
                continue
            if ss:
                w *= s.slow_start_factor(now, ss)
            f = 1.0
            lat = s.avg
            if best < lat and s.sampled:
                # Exploration: without fresh samples the estimate drifts to the pool's best.
                age = now - s.stamp
                if age > 0.0:
                    lat = best + (lat - best) * math.exp(-age / explore)
                f = math.exp(-(lat / best - 1.0) / temp)
            f *= 1.0 - s.error_rate(now)
            eff[i] = w * (f if f > floor else floor)
        self._finish_recompute(now)

    def pick(
        self,
        request: RequestInfo | None,
        now: float,
        exclude: Container[UpstreamServer] = (),
    ) -> UpstreamServer | None:
        if now >= self._due:
            self._recompute(now)
        if exclude:
            return self._draw_excluding(exclude)
        servers, eff, scores = self._servers, self._eff, self._scores
        best = -1
        best_score = -_INF
        total = 0.0
        for i, s in enumerate(servers):
            w = eff[i]
            if w <= 0.0 or not s.available or (exclude and s in exclude):
                continue
            sc = scores[i] + w
            scores[i] = sc
            total += w
            if sc > best_score:
                best_score = sc
                best = i
        if best < 0:
            return None
        scores[best] = best_score - total
        return servers[best]


# ------------------------------------------------------------------------------- consistent hash

_KEY_KINDS = ("header", "cookie", "query")


class ConsistentHash(Balancer):
    """Consistent hashing on a request key, with failover in ring order and optional bounded loads.

    Keys: ``header:NAME`` (first header of that name, any case), ``cookie:NAME`` (from every
    ``Cookie`` header, ``a=1; b=2``), ``query:NAME`` (raw bytes of the first ``NAME=value`` after
    ``?``; names and values are compared and hashed as sent, no percent-decoding), ``client_ip``,
    ``path`` (the target before ``?``). A missing or empty key uses the ``fallback`` algorithm.
    """

    name = "consistent_hash"
    OPTIONS = frozenset({"key", "balance_factor", "fallback", "vnodes", "slow_start", "seed"})

    def __init__(
        self,
        servers: Sequence[UpstreamServer],
        *,
        key: str = "client_ip",
        balance_factor: float | None = None,
        fallback: str = "round_robin",
        vnodes: int | None = None,
        slow_start: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(servers)
        self.key = key
        self._kind, self._key_name = self._parse_key(key)
        self.balance_factor = (
            None
            if balance_factor is None
            else _number(self.name, "balance_factor", balance_factor, low=1.0, low_open=True)
        )
        self.slow_start = _number(self.name, "slow_start", slow_start, low=0.0)
        if self.slow_start and self.balance_factor is None:
            raise ValueError(
                f"{self.name}: option 'slow_start' needs 'balance_factor' "
                "(slow start scales the bounded-load capacity; placement never changes)"
            )
        if vnodes is not None and (
            isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1
        ):
            raise ValueError(
                f"{self.name}: option 'vnodes' must be a positive integer, got {vnodes!r}"
            )
        if not isinstance(fallback, str) or fallback not in ALGORITHMS or fallback == self.name:
            known = ", ".join(a for a in ALGORITHMS if a != self.name)
            raise ValueError(
                f"{self.name}: option 'fallback' must be one of {known}; got {fallback!r}"
            )
        fb_cls = ALGORITHMS[fallback]
        fb_options: dict[str, Any] = {}
        if "seed" in fb_cls.OPTIONS:
            fb_options["seed"] = _seed(self.name, seed)
        self.fallback: Balancer = fb_cls(self._servers, **fb_options)
        self._ring = HashRing((), vnodes=vnodes) if vnodes is not None else HashRing(())
        self._by_id: dict[str, UpstreamServer] = {}
        for s in self._servers:
            self._place(s)

    def _parse_key(self, key: object) -> tuple[str, bytes]:
        if key in ("client_ip", "path"):
            return str(key), b""
        if isinstance(key, str):
            kind, sep, name = key.partition(":")
            if sep and kind in _KEY_KINDS and name and name.isascii():
                raw = name.encode()
                return kind, raw.lower() if kind == "header" else raw
        raise ValueError(
            f"{self.name}: option 'key' must be 'header:NAME', 'cookie:NAME', 'query:NAME', "
            f"'client_ip' or 'path'; got {key!r}"
        )

    def _place(self, s: UpstreamServer) -> None:
        """Put ``s`` on the ring with its weight (off the ring while its weight is 0)."""
        self._by_id[s.id] = s
        if s.weight > 0.0:
            self._ring.add(s.id, s.weight)
        elif s.id in self._ring:
            self._ring.remove(s.id)

    def add(self, server: UpstreamServer) -> None:
        super().add(server)
        self.fallback.add(server)
        self._place(server)

    def remove(self, server: UpstreamServer) -> None:
        super().remove(server)
        self.fallback.remove(server)
        del self._by_id[server.id]
        if server.id in self._ring:
            self._ring.remove(server.id)

    def request_key(self, request: RequestInfo) -> bytes | None:
        """The hashed key of ``request``, or None when it has none (→ fallback)."""
        kind, name = self._kind, self._key_name
        value: bytes | None = None
        if kind == "client_ip":
            value = request.client_ip.encode()
        elif kind == "path":
            value = request.target.partition(b"?")[0]
        else:  # header, cookie, query
            value = request_value(request.headers, request.target, kind, name)
        return value or None

    def pick(
        self,
        request: RequestInfo | None,
        now: float,
        exclude: Container[UpstreamServer] = (),
    ) -> UpstreamServer | None:
        key = None if request is None else self.request_key(request)
        if key is None:
            return self.fallback.pick(request, now, exclude)
        ring, by_id = self._ring, self._by_id
        if not len(ring):
            return None
        home = by_id[ring.get(key)]
        factor = self.balance_factor
        if factor is None:
            if home.available and (not exclude or home not in exclude):
                return home
            for sid in ring.get_n(key, len(ring)):
                s = by_id[sid]
                if s.available and (not exclude or s not in exclude):
                    return s
            return None
        return self._bounded(key, home, factor, now, exclude)

    def _weight(self, s: UpstreamServer, now: float) -> float:
        w = s.weight
        if self.slow_start:
            w *= s.slow_start_factor(now, self.slow_start)
        return w

    def _bounded(
        self,
        key: bytes,
        home: UpstreamServer,
        factor: float,
        now: float,
        exclude: Container[UpstreamServer],
    ) -> UpstreamServer | None:
        load = 0
        weight = 0.0
        for s in self._servers:
            if s.weight > 0.0 and s.available and (not exclude or s not in exclude):
                load += s.in_flight
                weight += self._weight(s, now)
        if weight <= 0.0:
            return None
        # capacity(s) = ceil(c × (L + 1) × w_s / W); the capacities sum to more than L, so some
        # eligible server is always under its capacity.
        scale = factor * (load + 1) / weight
        if (
            home.available
            and (not exclude or home not in exclude)
            and home.in_flight < math.ceil(scale * self._weight(home, now))
        ):
            return home
        first: UpstreamServer | None = None
        for sid in self._ring.get_n(key, len(self._ring)):
            s = self._by_id[sid]
            if not s.available or (exclude and s in exclude):
                continue
            if s.in_flight < math.ceil(scale * self._weight(s, now)):
                return s
            if first is None:
                first = s
        return first  # not reached while loads are consistent; never refuse a request for it


# -------------------------------------------------------------------------------------- factory

ALGORITHMS: Mapping[str, type[Balancer]] = {
    "round_robin": RoundRobin,
    "random": WeightedRandom,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "consistent_hash": ConsistentHash,
}


def make_balancer(name: str, servers: Sequence[UpstreamServer], **options: Any) -> Balancer:
    """Build the balancer ``name`` over ``servers``; ValueError names a bad algorithm or option."""
    cls = ALGORITHMS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown balancing algorithm {name!r}; known: {', '.join(ALGORITHMS)}"
        )
    for option in options:
        if option not in cls.OPTIONS:
            takes = ", ".join(sorted(cls.OPTIONS)) or "no options"
            raise ValueError(f"{name}: unknown option {option!r} (it takes: {takes})")
    return cls(servers, **options)

"""Run-time state of one upstream server, as the balancing algorithms see it (one worker process).

Latency is a *peak EWMA* (Finagle's ``PeakEwma``, Linkerd/tower's ``peak_ewma``;
https://linkerd.io/2016/03/16/beyond-round-robin-load-balancing-for-latency/): a sample above the
current estimate replaces it at once, so a server that turns slow is noticed after one response; a
sample below decays the estimate toward it with time constant ``tau`` measured in *elapsed time*
between samples, ``w = exp(-elapsed / tau)``, ``ewma = ewma * w + sample * (1 - w)``. After a long
silence ``w`` is close to 0 and the next sample nearly replaces the estimate: old observations lose
weight with time, not with the number of requests. A failed request feeds only the peak side (a
timeout pushes the estimate up; a fast connection refusal must not make a broken server look fast).

``error_ewma`` is a per-request EWMA of failures (``alpha = ERROR_ALPHA``, about the last 20
requests). It is count-based on purpose: with a time-based weight one failure after an idle minute
would set it to ~1.0. Readers that care about staleness decay it on read (:meth:`error_rate`).

Nothing here allocates beyond floats; ``started``/``finished`` are called once per request and are
compiled (:class:`pyproxy._balance.ServerStats`, the base class holding the fields below as C values).
``available`` belongs to other code (health checks, outlier ejection, circuit breakers, drain);
the algorithms only read it.
"""

from __future__ import annotations

import math
from typing import ClassVar

from pyproxy._balance import AVG_ALPHA as _AVG_ALPHA
from pyproxy._balance import ERROR_ALPHA as _ERROR_ALPHA
from pyproxy._balance import ServerStats
from pyproxy.config import Server

__all__ = ["DEFAULT_TAU", "SLOW_START_MIN", "UpstreamServer"]

DEFAULT_TAU = 10.0
"""Seconds: time constant of the latency EWMA (Finagle's and Linkerd's default decay)."""

SLOW_START_MIN = 0.1
"""Share of its weight a server gets when slow start begins (Envoy's ``min_weight_percent``: 10)."""

_NEVER = float("-inf")


class UpstreamServer(ServerStats):
    """One server of a pool: configured weight, in-flight count, latency and error estimates."""

    __slots__ = ()  # the fields are ServerStats' C fields

    ERROR_ALPHA: ClassVar[float] = _ERROR_ALPHA
    """Weight of one request in ``error_ewma``."""
    AVG_ALPHA: ClassVar[float] = _AVG_ALPHA
    """Weight of one request in ``avg``, the plain latency average dynamic weights follow."""

    server: Server
    id: str
    weight: float
    in_flight: int
    ewma: float
    error_ewma: float
    available: bool
    since: float
    stamp: float
    tau: float
    avg: float

    def __init__(
        self,
        server: Server,
        *,
        weight: float | None = None,
        since: float = _NEVER,
        tau: float = DEFAULT_TAU,
    ) -> None:
        """``since`` is when the server entered service (monotonic seconds); the default, minus
        infinity, means "always was" (no slow start). Pass ``since=now`` (or call
        :meth:`mark_returned`) for a server added at run time. ``weight`` overrides the configured
        one.
        """
        if not tau > 0 or math.isinf(tau):
            raise ValueError(f"tau must be a positive number of seconds, got {tau!r}")
        self.server = server
        self.id = server.address
        self.weight = float(server.weight if weight is None else weight)
        self.in_flight = 0
        self.ewma = 0.0  # seconds; 0.0 until the first sample
        self.error_ewma = 0.0
        self.available = True
        self.since = since
        self.stamp = _NEVER  # time of the last latency sample
        self.tau = tau
        # A plain per-request EWMA of latency (~ the last 20 requests). The peak EWMA above is
        # right for comparing two servers now (P2C) but a single spike holds it up for ~tau, which
        # would distort weights derived from ratios of latencies (dynamic WRR uses this one).
        self.avg = 0.0

    def __repr__(self) -> str:
        return (
            f"UpstreamServer({self.id!r}, weight={self.weight:g}, in_flight={self.in_flight}, "
            f"ewma={self.ewma * 1000:.2f}ms, error_ewma={self.error_ewma:.3f}, "
            f"available={self.available})"
        )

    @property
    def sampled(self) -> bool:
        """Whether any latency sample has been recorded."""
        return self.stamp != _NEVER

    # started() and finished(latency, ok, now): ServerStats' (compiled; the peak EWMA above, the
    # per-request avg and error_ewma with AVG_ALPHA and ERROR_ALPHA).

    def latency(self, now: float) -> float:
        """``ewma`` decayed toward 0 by the time since the last sample (tower's ``PeakEwma`` read).

        A server nobody has sent to for a while looks fast again, so it gets tried again.
        """
        age = now - self.stamp
        if age <= 0.0:
            return self.ewma
        return self.ewma * math.exp(-age / self.tau)  # exp(-inf) = 0 before the first sample

    def error_rate(self, now: float) -> float:
        """``error_ewma`` decayed toward 0 by the time since the last sample (time constant
        ``tau``)."""
        age = now - self.stamp
        if age <= 0.0:
            return self.error_ewma
        return self.error_ewma * math.exp(-age / self.tau)

    def slow_start_factor(self, now: float, slow_start: float) -> float:
        """Multiplier in ``(0, 1]`` for the weight: a linear ramp from ``SLOW_START_MIN`` to 1 over
        the first ``slow_start`` seconds after :attr:`since`; 1.0 when ``slow_start`` is 0."""
        if slow_start <= 0.0:
            return 1.0
        elapsed = now - self.since
        if elapsed >= slow_start:
            return 1.0
        if elapsed <= 0.0:
            return SLOW_START_MIN
        return SLOW_START_MIN + (1.0 - SLOW_START_MIN) * (elapsed / slow_start)

    def mark_returned(self, now: float) -> None:
        """The server (re)enters service at ``now``: slow start begins again from here."""
        self.since = now

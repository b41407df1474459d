"""Passive outlier ejection: take a target out of its pool for a while when real traffic fails on it.

Modelled on Envoy's outlier detection
(https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/upstream/outlier), fed by the
proxy's own requests instead of probes (HAProxy's ``observe layer7`` + ``error-limit`` is the same
idea). The owner calls :meth:`OutlierDetector.record` with each request's outcome and asks
:meth:`OutlierDetector.is_ejected` before picking a target. Time is passed in (``now``, seconds on a
monotonic clock; ``time.monotonic()`` when omitted) so tests control it.

Detectors (a value of 0 turns one off):

* ``consecutive_failures`` (default 5) — Envoy's ``consecutive_5xx`` in its default mode, where
  local-origin errors (connect refused, connect timeout, reset) are folded into the 5xx count: a
  failure is any ``record(ok=False)``, a success resets the count.
* ``consecutive_connect_failures`` (default 0, off) — Envoy's ``consecutive_local_origin_failure``
  (which it only enforces once local-origin errors are split out): connect failures in a row; any
  request that reached the server, even one answered 5xx, resets it. Set it below
  ``consecutive_failures`` to eject faster on failures that are unambiguous.
* error rate — Envoy's ``failure_percentage`` detector: ejected when, over the last ``window``
  seconds, at least ``min_requests`` results arrived and the failed fraction is at least
  ``error_rate_threshold``. Envoy evaluates it every ``interval`` (10 s; threshold 85 %, volume
  50, not enforced by default); we evaluate at each failure, so ejection is immediate. The window is
  10 buckets of ``window / 10`` seconds in a ring with running sums: a record costs O(1) (advancing
  clears at most 10 buckets), and the window covers between ``0.9 × window`` and ``window``.
* Envoy's ``consecutive_gateway_failure`` (502/503/504 + local-origin) is left out: ``record`` does
  not see status codes, and Envoy does not enforce that detector by default either.

Ejection time. The ``k``-th ejection in a row lasts ``base_ejection_time × 2^(k-1)``, capped at
``max_ejection_time`` (Envoy grows it linearly, ``base × k``; doubling backs off faster from a target
that keeps failing). Like Envoy's multiplier, ``k`` decays: it drops by one for each
``base_ejection_time`` the target spends back in the pool, and stops growing at the cap.
:meth:`OutlierDetector.ejections` counts every ejection ever (a statistic, never decays).
Results recorded while a target is ejected (requests that were in flight) are ignored, and the
counters and window start fresh after an ejection.

Un-ejection is lazy: the first :meth:`~OutlierDetector.is_ejected`, :meth:`~OutlierDetector.record`
or :meth:`~OutlierDetector.tick` at or after the expiry returns the target to the pool and reports
it; the owner calls ``tick(now)`` periodically so that happens even for a target nobody asks about.

Ejection cap. At most ``floor(n × max_ejection_percent / 100)`` of the pool's ``n`` targets are
ejected at once, but at least one when ``n > 1`` and the percentage is not 0 (Envoy ejects at least
one host regardless of the percentage). A one-target pool is therefore never ejected unless
``max_ejection_percent`` is 100: ejecting its only target would turn its errors into "no upstream"
errors. An ejection the cap refuses is counted in :attr:`OutlierDetector.overflows` (Envoy's
``ejections_overflow``); the target stays eligible and is ejected at its next failure once a slot is
free. Removing targets never un-ejects others early, it only blocks new ejections.

One detector per pool per worker process; not thread-safe. ``on_change(target_id, ejected,
reason)`` is called on every ejection and return, and one log line written (logger
``pyproxy.outlier``); publishing that to shared state is the owner's job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["OnEjectionChange", "OutlierConfig", "OutlierDetector"]

logger = logging.getLogger("pyproxy.outlier")

OnEjectionChange = Callable[[str, bool, str], None]
"""``on_change(target_id, ejected, reason)``, called on each ejection and each return."""

_BUCKETS = 10


@dataclass(frozen=True)
class OutlierConfig:
    """When to eject and for how long; see the module docstring. Invalid values raise ``ValueError``."""

    consecutive_failures: int = 5
    consecutive_connect_failures: int = 0
    error_rate_threshold: float = 0.5
    window: float = 10.0
    min_requests: int = 20
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 50

    def __post_init__(self) -> None:
        if self.consecutive_failures < 0:
            raise ValueError(
                f"consecutive_failures: {self.consecutive_failures} must be >= 0 (0: off)"
            )
        if self.consecutive_connect_failures < 0:
            raise ValueError(
                f"consecutive_connect_failures: {self.consecutive_connect_failures} must be >= 0 (0: off)"
            )
        if not 0 <= self.error_rate_threshold <= 1:
            raise ValueError(
                f"error_rate_threshold: {self.error_rate_threshold} must be in [0, 1] (0: off)"
            )
        if not self.window > 0:
            raise ValueError(f"window: {self.window} must be > 0")
        if self.min_requests < 1:
            raise ValueError(f"min_requests: {self.min_requests} must be >= 1")
        if not self.base_ejection_time > 0:
            raise ValueError(f"base_ejection_time: {self.base_ejection_time} must be > 0")
        if not self.max_ejection_time >= self.base_ejection_time:
            raise ValueError(
                f"max_ejection_time: {self.max_ejection_time} must be >= base_ejection_time"
            )
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent: {self.max_ejection_percent} must be in [0, 100]")


class _Target:
    """Counters of one target: consecutive failures, the bucketed window, the ejection backoff."""

    __slots__ = (
        "consecutive", "consecutive_connect", "totals", "fails", "sum_total", "sum_fail", "epoch",
        "level", "released_at", "ejections", "duration",
    )

    def __init__(self) -> None:
        self.consecutive = 0
        self.consecutive_connect = 0
        self.totals = [0] * _BUCKETS
        self.fails = [0] * _BUCKETS
        self.sum_total = 0  # running sums over the ring: the window's totals without a scan
        self.sum_fail = 0
        self.epoch = 0  # absolute index of the newest bucket (time // bucket width)
        self.level = 0  # backoff exponent: the k of the next ejection is level + 1
        self.released_at: float | None = None
        self.ejections = 0
        self.duration = 0.0  # of the latest ejection

    def count(self, bucket: int, failed: bool) -> None:
        gap = bucket - self.epoch
        if gap > 0:  # time moved into a new bucket: clear those that fell out of the window
            if gap >= _BUCKETS:
                self.clear_window()
            else:
                totals, fails = self.totals, self.fails
                for b in range(self.epoch + 1, bucket + 1):
                    i = b % _BUCKETS
                    self.sum_total -= totals[i]
                    self.sum_fail -= fails[i]
                    totals[i] = fails[i] = 0
            self.epoch = bucket
        # gap < 0 (a clock that went back, or results recorded out of order): count it as now
        i = self.epoch % _BUCKETS
        self.totals[i] += 1
        self.sum_total += 1
        if failed:
            self.fails[i] += 1
            self.sum_fail += 1

    def clear_window(self) -> None:
        self.totals = [0] * _BUCKETS
        self.fails = [0] * _BUCKETS
        self.sum_total = self.sum_fail = 0


class OutlierDetector:
    """Outlier ejection for one pool's targets; see the module docstring."""

    def __init__(
        self,
        config: OutlierConfig | None = None,
        on_change: OnEjectionChange | None = None,
        targets: Iterable[str] = (),
    ) -> None:
        self.config = config if config is not None else OutlierConfig()
        self.on_change = on_change
        self._targets: dict[str, _Target] = {}
        self._ejected: dict[str, float] = {}  # target id -> ejected until; only ejected ones
        self._width = self.config.window / _BUCKETS
        # The level past which the doubled time is capped anyway: growing further would only make
        # the decay back to base slower.
        level, t = 1, self.config.base_ejection_time
        while t < self.config.max_ejection_time:
            level, t = level + 1, t * 2
        self._max_level = level
        self.overflows = 0
        for target_id in targets:
            self.add(target_id)

    # -- membership
    def add(self, target_id: str) -> None:
        """Track ``target_id``; ``ValueError`` if it is already tracked."""
        if target_id in self._targets:
            raise ValueError(f"target {target_id!r} is already tracked")
        self._targets[target_id] = _Target()

    def remove(self, target_id: str) -> None:
        """Forget ``target_id`` (ejected or not; no ``on_change``); ``KeyError`` if unknown."""
        del self._targets[target_id]
        self._ejected.pop(target_id, None)

    def targets(self) -> list[str]:
        return list(self._targets)

    # -- the hot path
    def is_ejected(self, target_id: str, now: float | None = None) -> bool:
        """Whether ``target_id`` is ejected at ``now``; returns it to the pool if its time is up.

        One dict lookup for a target that is not ejected; ``False`` for an unknown target.
        """
        until = self._ejected.get(target_id)
        if until is None:
            return False
        if now is None:
            now = time.monotonic()
        if now < until:
            return True
        self._release(target_id, now)
        return False

    def record(
        self, target_id: str, ok: bool, connect_failure: bool = False, now: float | None = None
    ) -> None:
        """Count one request's outcome: ``ok`` False for a 5xx or a local-origin failure, with
        ``connect_failure`` True when no connection reached the server (refused, connect timeout).

        Ignored for an unknown target (removed while its request was in flight) and while the
        target is ejected. ``ValueError`` for ``ok`` with ``connect_failure``.
        """
        if ok and connect_failure:
            raise ValueError("a request with a connect failure cannot be ok")
        st = self._targets.get(target_id)
        if st is None:
            return
        if now is None:
            now = time.monotonic()
        if target_id in self._ejected and not self._expire_one(target_id, now):
            return
        st.count(int(now // self._width), not ok)
        if ok:
            st.consecutive = 0
            st.consecutive_connect = 0
            return
        st.consecutive += 1
        if connect_failure:
            st.consecutive_connect += 1
        else:
            st.consecutive_connect = 0  # the server was reached: not a connect failure streak
        cfg = self.config
        connect_limit = cfg.consecutive_connect_failures
        if connect_limit and st.consecutive_connect >= connect_limit:
            self._eject(target_id, st, now, f"{st.consecutive_connect} consecutive connect failures")
        elif cfg.consecutive_failures and st.consecutive >= cfg.consecutive_failures:
            self._eject(target_id, st, now, f"{st.consecutive} consecutive failures")
        elif (
            cfg.error_rate_threshold
            and st.sum_total >= cfg.min_requests
            and st.sum_fail >= cfg.error_rate_threshold * st.sum_total
        ):
            rate = st.sum_fail / st.sum_total
            self._eject(
                target_id, st, now,
                f"error rate {rate:.2f} >= {cfg.error_rate_threshold:.2f}"
                f" ({st.sum_fail} of {st.sum_total} requests in {cfg.window:g}s)",
            )

    # -- periodic and inspection
    def tick(self, now: float | None = None) -> list[str]:
        """Return every target whose ejection has expired to the pool; their ids."""
        if now is None:
            now = time.monotonic()
        done = [t for t, until in self._ejected.items() if now >= until]
        for target_id in done:
            self._release(target_id, now)
        return done

    def ejected_until(self, target_id: str) -> float | None:
        """When the ejection of ``target_id`` ends (``None``: not ejected); ``KeyError`` if unknown.

        Does not check expiry: a time in the past means "returns at the next look".
        """
        if target_id not in self._targets:
            raise KeyError(target_id)
        return self._ejected.get(target_id)

    def ejections(self, target_id: str) -> int:
        """How many times ``target_id`` has been ejected; ``KeyError`` if unknown."""
        return self._targets[target_id].ejections

    def ejected(self) -> list[str]:
        """The targets ejected now (as of the last look: expiry is not checked)."""
        return list(self._ejected)

    def max_ejected(self) -> int:
        """How many targets may be ejected at once with the pool's current size."""
        n, pct = len(self._targets), self.config.max_ejection_percent
        limit = n * pct // 100
        if n > 1 and pct > 0:
            limit = max(limit, 1)
        return limit

    # -- transitions
    def _expire_one(self, target_id: str, now: float) -> bool:
        """Whether ``target_id`` is back in the pool at ``now`` (returning it if its time is up)."""
        if now < self._ejected[target_id]:
            return False
        self._release(target_id, now)
        return True

    def _eject(self, target_id: str, st: _Target, now: float, why: str) -> None:
        self.tick(now)  # expired ejections free their slots first
        if len(self._ejected) >= self.max_ejected():
            self.overflows += 1
            return
        cfg = self.config
        if st.released_at is not None:
            st.level = max(0, st.level - int((now - st.released_at) // cfg.base_ejection_time))
        st.level = min(st.level + 1, self._max_level)
        duration = min(cfg.base_ejection_time * 2.0 ** (st.level - 1), cfg.max_ejection_time)
        st.ejections += 1
        st.duration = duration
        st.consecutive = st.consecutive_connect = 0
        st.clear_window()
        self._ejected[target_id] = now + duration
        self._notify(target_id, True, f"{why}; ejected for {duration:g}s")

    def _release(self, target_id: str, now: float) -> None:
        del self._ejected[target_id]
        st = self._targets[target_id]
        st.released_at = now
        st.epoch = int(now // self._width)  # the window restarts empty (cleared at ejection)
        self._notify(target_id, False, f"ejection of {st.duration:g}s expired")

    def _notify(self, target_id: str, ejected: bool, reason: str) -> None:
        if ejected:
            logger.warning("upstream %s ejected: %s", target_id, reason)
        else:
            logger.info("upstream %s returned to the pool: %s", target_id, reason)
        if self.on_change is not None:
            try:
                self.on_change(target_id, ejected, reason)
            except Exception:  # the owner's bug must not break request accounting
                logger.exception("outlier on_change callback failed for upstream %s", target_id)

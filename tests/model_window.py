"""Pure-Python model of ``pyproxy.core.SlidingWindow`` and ``hit_all``, for the property tests.

It follows the same integer arithmetic as ``core_rs/src/window.rs`` (time in nanoseconds, the
counter's estimate scaled by the window), so every ``allowed``, ``remaining`` and ``retry_after``
must match exactly. It keeps idle keys until ``len()`` asks, then drops them by the same rule as the
Rust sweep (counter: no charge in the current or the previous fixed window; exact: last charge at
least one window ago); dropping is invisible except through ``len()``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

Key = str | bytes


def to_ns(seconds: float) -> int:
    """Seconds → nanoseconds exactly as ``clock::secs_to_ns`` does (multiply, truncate)."""
    return int(seconds * 1e9)


def to_secs(ns: int | None) -> float:
    return math.inf if ns is None else ns / 1e9


@dataclass
class _Counter:
    idx: int = 0
    prev: int = 0
    cur: int = 0
    last: int = 0


@dataclass
class _Log:
    entries: deque[list[int]] = field(default_factory=deque)  # [time, cost], oldest first
    last: int = 0


class ModelWindow:
    """``SlidingWindow(limit, window_ns, exact)`` with ``now`` in integer nanoseconds."""

    def __init__(self, limit: int, window_ns: int, exact: bool) -> None:
        self.limit = limit
        self.window = window_ns
        self.exact = exact
        self.clock = 0
        self.keys: dict[Key, _Counter | _Log] = {}

    def _observe(self, now: int) -> int:
        self.clock = max(self.clock, now)
        return self.clock

    # Counter mode ----------------------------------------------------------------------------

    def _counter_view(self, st: _Counter | None, now: int) -> tuple[int, int]:
        """(prev, cur) of a key as seen at ``now``."""
        if st is None:
            return 0, 0
        idx = now // self.window
        if idx == st.idx:
            return st.prev, st.cur
        if idx == st.idx + 1:
            return st.cur, 0
        return 0, 0

    def _counter_decide(self, prev: int, cur: int, cost: int, now: int) -> tuple[bool, int, int | None]:
        w, limit = self.window, self.limit
        e = now % w
        used = prev * (w - e) // w + cur
        if used + cost <= limit:
            return True, limit - used - cost, 0
        remaining = max(limit - used, 0)
        if cost > limit:
            return False, remaining, None

        def first_fit(p: int, s: int) -> int:
            # first offset e' with floor(p·(w−e')/w) <= s
            return max(w + 1 - -(-(s + 1) * w // p), 0)

        if cur + cost <= limit:
            wait = max(first_fit(prev, limit - cur - cost) - e, 0)
        else:
            wait = (w - e) + first_fit(cur, limit - cost)
        return False, remaining, wait

    # Exact mode ------------------------------------------------------------------------------

    def _log_view(self, st: _Log | None, now: int) -> list[list[int]]:
        if st is None:
            return []
        return [e for e in st.entries if e[0] + self.window > now]

    def _log_decide(self, entries: list[list[int]], cost: int, now: int) -> tuple[bool, int, int | None]:
        total = sum(c for _, c in entries)
        remaining = max(self.limit - total, 0)
        if cost <= remaining:
            return True, remaining - cost, 0
        if cost > self.limit:
            return False, remaining, None
        excess = cost - remaining
        freed = 0
        for t, c in entries:
            freed += c
            if freed >= excess:
                return False, remaining, max(t + self.window - now, 0)
        raise AssertionError("unreachable: cost <= limit frees enough")

    # API ---------------------------------------------------------------------------------------

    def _decide(self, key: Key, cost: int, now: int) -> tuple[bool, int, int | None]:
        st = self.keys.get(key)
        if self.exact:
            assert st is None or isinstance(st, _Log)
            return self._log_decide(self._log_view(st, now), cost, now)
        assert st is None or isinstance(st, _Counter)
        prev, cur = self._counter_view(st, now)
        return self._counter_decide(prev, cur, cost, now)

    def peek(self, key: Key, cost: int, now_ns: int) -> tuple[bool, int, float]:
        now = self._observe(now_ns)
        allowed, remaining, wait = self._decide(key, cost, now)
        return allowed, remaining, to_secs(wait)

    def hit(self, key: Key, cost: int, now_ns: int) -> tuple[bool, int, float]:
        now = self._observe(now_ns)
        allowed, remaining, wait = self._decide(key, cost, now)
        if allowed and cost > 0:
            self._charge(key, cost, now)
        return allowed, remaining, to_secs(wait)

    def _charge(self, key: Key, cost: int, now: int) -> None:
        if self.exact:
            log = self.keys.get(key)
            if not isinstance(log, _Log):
                log = self.keys[key] = _Log()
            log.entries = deque(self._log_view(log, now))
            if log.entries and log.entries[-1][0] == now:
                log.entries[-1][1] += cost
            else:
                log.entries.append([now, cost])
            log.last = now
        else:
            old = self.keys.get(key)
            prev, cur = self._counter_view(old if isinstance(old, _Counter) else None, now)
            self.keys[key] = _Counter(now // self.window, prev, cur + cost, now)

    def reset(self, key: Key) -> bool:
        st = self.keys.pop(key, None)
        return st is not None and not self._idle(st.last, self.clock)

    def _idle(self, last: int, now: int) -> bool:
        if self.exact:
            return last + self.window <= now
        return now // self.window >= last // self.window + 2

    def __len__(self) -> int:
        self.keys = {k: v for k, v in self.keys.items() if not self._idle(v.last, self.clock)}
        return len(self.keys)


def model_hit_all(
    checks: list[tuple[ModelWindow, Key]], cost: int, now_ns: int
) -> tuple[bool, int, float, int]:
    """``hit_all`` on models: a pair listed ``n`` times is checked with ``n * cost`` by its n-th entry."""
    decisions = []
    for i, (lim, key) in enumerate(checks):
        occurrences = sum(1 for l2, k2 in checks[: i + 1] if l2 is lim and k2 == key)
        decisions.append(lim.peek(key, cost * occurrences, now_ns))
    allowed = all(d[0] for d in decisions)
    if allowed:
        for lim, key in checks:
            lim.hit(key, cost, now_ns)
        return True, -1, 0.0, min(d[1] for d in decisions)
    first = next(i for i, d in enumerate(decisions) if not d[0])
    retry = max(d[2] for d in decisions if not d[0])
    remaining = min(lim.peek(key, 0, now_ns)[1] for lim, key in checks)
    return False, first, retry, remaining

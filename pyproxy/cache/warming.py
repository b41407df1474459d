"""Cache warming: keep hot entries fresh, fetch what is likely asked next, start warm.

Three mechanisms, all feeding the same background fetcher (the HTTP cache's refresh hook, a
request of its own to a server of the route's pool) within one budget — at most ``max_fetches``
at a time and ``max_fetch_rate`` per second (a token bucket), so warming never takes more than that
share of the upstreams:

* **refresh-ahead** — every hit adds to its key's hit count, decayed exponentially (``half_life``);
  a hit on an entry whose count makes it hot (``hot_hits``) and that has less than
  ``refresh_before`` of its lifetime left is refreshed in the background (with its validators,
  so an unchanged entry costs a 304), before anyone sees it expire;
* **prediction** — a first-order model of which request follows which from the same client
  (counts of ``previous → next``, bounded): when a request comes in, the requests that followed it
  with probability at least ``predict_threshold`` (over ``predict_min_samples`` observations) are
  fetched ahead if they are not cached; a later hit on a prefetched entry is counted
  (``prefetch_used``), so the model's worth is measured;
* **warm start** — at shutdown the hottest keys (``warm_keys``) are written to ``warm_file``; at
  start they are read and looked up, which copies them from L2/L3 into memory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from pyproxy._cachehit import HitCounts  # compiled: counted on the cache's hit path

__all__ = ["FetchBudget", "HitCounts", "Successors", "read_warm_keys", "write_warm_keys"]

MAX_KEYS = 100_000  # keys whose hit counts / successors are tracked (the coldest go first)
MAX_SUCCESSORS = 8  # next requests remembered per request


class Successors:
    """First-order model of the request that follows each request, per client."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._last: dict[str, str] = {}  # client → the key it asked last
        self._next: dict[str, dict[str, int]] = {}  # key → {next key: times}

    def observe(self, client: str, key: str) -> None:
        previous = self._last.get(client)
        self._last[client] = key
        if len(self._last) > self.max_keys:
            self._last.clear()
        if previous is None or previous == key:
            return
        following = self._next.setdefault(previous, {})
        following[key] = following.get(key, 0) + 1
        if len(following) > MAX_SUCCESSORS:
            del following[min(following, key=following.__getitem__)]
        if len(self._next) > self.max_keys:
            self._next.clear()  # rare: a fresh model beats a slow eviction scan per request

    def likely_next(self, key: str, threshold: float, min_samples: int) -> list[tuple[str, float]]:
        following = self._next.get(key)
        if not following:
            return []
        total = sum(following.values())
        if total < min_samples:
            return []
        return [(k, n / total) for k, n in following.items() if n / total >= threshold]


class FetchBudget:
    """At most ``concurrency`` background fetches at once and ``rate`` per second."""

    def __init__(self, concurrency: int, rate: float) -> None:
        self.concurrency = concurrency
        self.rate = rate
        self.tokens = float(min(concurrency, max(1.0, rate)))
        self.capacity = self.tokens
        self.updated = time.monotonic()
        self.running = 0
        self.refused = 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.running >= self.concurrency or self.tokens < 1:
            self.refused += 1
            return False
        self.tokens -= 1
        self.running += 1
        return True

    def give_back(self) -> None:
        self.running = max(0, self.running - 1)


def write_warm_keys(path: str | Path, keys: Iterable[tuple[str, float]], limit: int) -> None:
    """Merge ``keys`` (with their hit counts) into the warm file, keep the ``limit`` hottest;
    written atomically (several workers may write it)."""
    path = Path(path)
    merged = dict(read_warm_keys(path))
    for key, count in keys:
        merged[key] = max(count, merged.get(key, 0.0))
    ranked = sorted(merged.items(), key=lambda kc: -kc[1])[:limit]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps([[k, round(c, 3)] for k, c in ranked]))
    os.replace(tmp, path)


def read_warm_keys(path: str | Path) -> list[tuple[str, float]]:
    """The warm file's ``(key, count)`` pairs, hottest first (empty when absent or unreadable)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    out = []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int | float):
            out.append((item[0], float(item[1])))
    return out

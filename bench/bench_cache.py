"""LruCache vs cachebox, cachetools, lru-dict and functools.lru_cache, in the same run.

Run: ``python -m pytest bench/bench_cache.py -s -q`` (the README's benchmark section).
Targets (issue #2): faster than cachebox TTLCache / VTTLCache at get-hit, get-miss and
set-with-eviction (ratio < 1); >= 7x faster than cachetools.TTLCache; <= 100 bytes of overhead per
entry at 1M entries.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import cachebox
import cachetools
import lru
import pytest

from pyproxy.core import LruCache
from ratio import calls, compare, report

VALUE = b"v" * 100
TTL = 600.0


def _keys(n: int, prefix: str) -> list[str]:
    return [f"{prefix}/api/v1/items/{i:08d}" for i in range(n)]


def _filled(n: int, keys: list[str]) -> dict[str, object]:
    """One instance of each contestant holding ``keys`` (capacity 2n, so nothing is evicted)."""
    ours = LruCache(1 << 34, max_entries=2 * n, default_ttl=TTL)
    cb_ttl = cachebox.TTLCache(2 * n, TTL)
    cb_vttl = cachebox.VTTLCache(2 * n)
    ct_ttl = cachetools.TTLCache(2 * n, TTL)
    lru_dict = lru.LRU(2 * n)
    for k in keys:
        # Distinct value objects, as a real cache holds (bytes(VALUE) would return VALUE itself).
        v = bytes(bytearray(VALUE))
        ours.set(k, v)
        cb_ttl[k] = v
        cb_vttl.insert(k, v, TTL)
        ct_ttl[k] = v
        lru_dict[k] = v
    return {
        "pyproxy.LruCache": ours,
        "cachebox.TTLCache": cb_ttl,
        "cachebox.VTTLCache": cb_vttl,
        "cachetools.TTLCache": ct_ttl,
        "lru-dict.LRU": lru_dict,
    }


def _getter_case(cache: object, keys: list[str], keep: bool = True):  # type: ignore[no-untyped-def]
    """``keep``: the results stay alive until the round ends (a list of them); otherwise each is
    dropped at once, as a proxy does after writing it to a socket. The two differ for a cache that
    returns a fresh copy (ours): kept copies need fresh memory from the allocator every round."""
    get = cache.get  # type: ignore[attr-defined]
    if keep:
        return lambda: [get(k) for k in keys]
    return calls(get, keys)


def _lru_cache_case(keys: list[str]):  # type: ignore[no-untyped-def]
    @functools.lru_cache(maxsize=2 * len(keys))
    def load(k: str) -> bytes:
        return VALUE

    for k in keys:
        load(k)
    return lambda: [load(k) for k in keys]


def _check(ratios: dict[str, float]) -> None:
    assert ratios["cachebox.TTLCache"] < 1.0, ratios
    assert ratios["cachebox.VTTLCache"] < 1.0, ratios
    assert ratios["cachetools.TTLCache"] <= 1 / 7, ratios


@pytest.mark.parametrize("keep", [True, False], ids=["results-kept", "results-dropped"])
@pytest.mark.parametrize("n", [10_000, 100_000])
def test_get_hit(benchmark, n: int, keep: bool) -> None:  # type: ignore[no-untyped-def]
    keys = _keys(n, "hit")
    caches = _filled(n, keys)
    cases = {name: _getter_case(c, keys, keep) for name, c in caches.items()}
    cases["functools.lru_cache"] = _lru_cache_case(keys)
    pattern = "results kept" if keep else "results dropped"
    result = compare(f"get-hit, {n} entries, {pattern}", cases, ops=n)
    ratios = report(result, "pyproxy.LruCache", benchmark)
    assert all(caches["pyproxy.LruCache"].get(k) == VALUE for k in keys[:100])
    benchmark(cases["pyproxy.LruCache"])
    _check(ratios)


@pytest.mark.parametrize("n", [10_000, 100_000])
def test_get_miss(benchmark, n: int) -> None:  # type: ignore[no-untyped-def]
    caches = _filled(n, _keys(n, "hit"))
    missing = _keys(n, "miss")
    cases = {name: _getter_case(c, missing) for name, c in caches.items()}
    result = compare(f"get-miss, {n} entries", cases, ops=n)
    ratios = report(result, "pyproxy.LruCache", benchmark)
    assert caches["pyproxy.LruCache"].get(missing[0]) is None
    benchmark(cases["pyproxy.LruCache"])
    _check(ratios)


@pytest.mark.parametrize("n", [10_000, 100_000])
def test_set_with_eviction(benchmark, n: int) -> None:  # type: ignore[no-untyped-def]
    """Caches full at n entries; every set inserts a new key and evicts one."""
    stream = _keys(3 * n, "set")  # cycling through 3n keys: each set misses and evicts
    ours = LruCache(1 << 34, max_entries=n, default_ttl=TTL)
    cb_ttl = cachebox.TTLCache(n, TTL)
    cb_vttl = cachebox.VTTLCache(n)
    ct_ttl = cachetools.TTLCache(n, TTL)
    lru_dict = lru.LRU(n)
    cycle = [0]

    def chunk() -> list[str]:
        start = cycle[0] = (cycle[0] + n) % (3 * n)
        return stream[start : start + n]

    def ours_set() -> None:
        s = ours.set
        for k in chunk():
            s(k, VALUE)

    def cb_ttl_set() -> None:
        for k in chunk():
            cb_ttl[k] = VALUE

    def cb_vttl_set() -> None:
        ins = cb_vttl.insert
        for k in chunk():
            ins(k, VALUE, TTL)

    def ct_set() -> None:
        for k in chunk():
            ct_ttl[k] = VALUE

    def lru_set() -> None:
        for k in chunk():
            lru_dict[k] = VALUE

    cases = {
        "pyproxy.LruCache": ours_set,
        "cachebox.TTLCache": cb_ttl_set,
        "cachebox.VTTLCache": cb_vttl_set,
        "cachetools.TTLCache": ct_set,
        "lru-dict.LRU": lru_set,
    }
    for fill in cases.values():  # fill to capacity so every timed set evicts
        fill()
        fill()
    result = compare(f"set-with-eviction, {n} entries", cases, ops=n)
    ratios = report(result, "pyproxy.LruCache", benchmark)
    assert len(ours) == n and ours.stats()["evictions"] > 0
    benchmark(ours_set)
    _check(ratios)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, sys
    from pyproxy.core import LruCache

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    n = int(sys.argv[1]); kind = sys.argv[2]
    if kind == "pyproxy":
        c = LruCache(1 << 40, default_ttl=3600)
        put = c.set
    else:
        import cachebox
        c = cachebox.VTTLCache(n)
        put = lambda k, v, ttl: c.insert(k, v, ttl)
    gc.collect(); before = rss(); payload = 0
    for i in range(n):
        # Keys and values are made one at a time and dropped by the caller, so what stays is what
        # the cache keeps: its own structures plus, for a cache of Python objects, those objects.
        k = f"/api/v1/items/{i:08d}"; v = (b"%08d" % i) * 8
        payload += len(k) + len(v)
        put(k, v, 3600)
    gc.collect()
    print((rss() - before - payload) / n)
    """
)


def _overhead(kind: str, n: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(n), kind],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return float(out.stdout.strip())


def test_memory_overhead(benchmark) -> None:  # type: ignore[no-untyped-def]
    """Bytes per entry beyond key + value payload at 1M entries (RSS growth, in a fresh process).

    For cachebox, which keeps the caller's objects, their headers count as overhead; for us the
    native copies' allocation overhead does.
    """
    n = 1_000_000
    ours = _overhead("pyproxy", n)
    anchor = _overhead("cachebox", n)
    print(f"\nmemory overhead per entry at {n} entries: pyproxy {ours:.1f} B, cachebox.VTTLCache {anchor:.1f} B")
    benchmark.extra_info["overhead_bytes_per_entry"] = {"pyproxy": ours, "cachebox.VTTLCache": anchor}
    benchmark.pedantic(lambda: None, rounds=1)
    assert ours <= 100, ours

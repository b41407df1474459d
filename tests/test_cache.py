"""LruCache: behaviour, the hypothesis model check, threads and bad input."""

from __future__ import annotations

import math
import sys
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from model_cache import CacheModel, charge
from pyproxy.core import ENTRY_OVERHEAD, LruCache


class Clock:
    """An injectable timer: ``LruCache(..., timer=clock)``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_get_set_and_stats() -> None:
    c = LruCache(10_000)
    c.set("a", b"1")
    c["b"] = bytearray(b"22")
    assert c.get("a") == b"1"
    assert c["b"] == b"22" and type(c["b"]) is bytes
    assert c.get("zz") is None
    assert c.get("zz", b"dflt") == b"dflt"
    assert "a" in c and "zz" not in c
    assert len(c) == 2
    s = c.stats()
    assert s["hits"] == 3 and s["misses"] == 2
    assert s["entries"] == 2
    assert s["bytes"] == charge("a", b"1") + charge("b", b"22") == c.nbytes


def test_str_and_bytes_keys_are_distinct() -> None:
    c = LruCache(10_000)
    c.set("k", b"str")
    c.set(b"k", b"bytes")
    assert c.get("k") == b"str" and c.get(b"k") == b"bytes"
    assert len(c) == 2


def test_non_ascii_keys() -> None:
    c = LruCache(10_000)
    c.set("ключ-🔑", b"v")
    assert c.get("ключ-🔑") == b"v"
    assert c.keys() == ["ключ-🔑"]
    assert c.nbytes == len("ключ-🔑".encode()) + 1 + ENTRY_OVERHEAD


def test_memoryview_value_is_copied() -> None:
    buf = bytearray(b"abc")
    c = LruCache(10_000)
    c.set("k", memoryview(buf))
    buf[0] = ord("X")
    assert c.get("k") == b"abc"


def test_reads_return_one_shared_object_not_copies() -> None:
    # A value is kept as a bytes object from its first read on: every later get hands out that
    # object (a reference, no allocation), and the cache's accounting does not change.
    c = LruCache(1 << 20)
    c.set("k", bytearray(b"small value"))
    charged = c.nbytes
    first = c.get("k")
    assert first == b"small value" and type(first) is bytes
    assert c.get("k") is first and c["k"] is first and c.get_many(["k"])["k"] is first
    assert c.nbytes == charged
    # Replacing the value replaces the object; the old one is no longer referenced by the cache.
    before = sys.getrefcount(first)
    c.set("k", b"other")
    assert sys.getrefcount(first) == before - 1
    assert c.get("k") == b"other"


def test_large_bytes_values_are_kept_without_a_copy() -> None:
    big = bytes(range(256)) * 4
    c = LruCache(1 << 20)
    c.set("big", big)
    assert c.get("big") is big
    c.set_many({"also": big})
    assert c.get("also") is big
    # Only exact bytes: mutable buffers and small values are copied in.
    mutable = bytearray(big)
    c.set("mutable", mutable)
    mutable[0] = 255
    assert c.get("mutable") == big
    small = b"s" * 10
    c.set("small", small)
    assert c.get("small") == small
    # Evicting or deleting drops the cache's reference.
    before = sys.getrefcount(big)
    assert c.delete("big") and c.delete("also")
    assert sys.getrefcount(big) == before - 2


def test_lru_eviction_order_and_budget() -> None:
    per = charge("a", b"x" * 10)
    c = LruCache(per * 3)
    for k in "abc":
        c.set(k, b"x" * 10)
    assert c.get("a") == b"x" * 10  # a becomes most recent; b is least recent
    c.set("d", b"x" * 10)
    assert c.keys() == ["d", "a", "c"]
    assert c.stats()["evictions"] == 1
    assert c.nbytes <= c.max_bytes


def test_value_larger_than_budget_is_value_error_and_changes_nothing() -> None:
    c = LruCache(500)
    c.set("a", b"1")
    before = (c.stats(), c.keys())
    with pytest.raises(ValueError, match="exceeds max_bytes=500"):
        c.set("b", b"x" * 1000)
    assert (c.stats(), c.keys()) == before


def test_max_entries() -> None:
    c = LruCache(1 << 20, max_entries=2)
    for k in "abc":
        c.set(k, b"v")
    assert c.keys() == ["c", "b"]
    assert c.max_entries == 2


def test_ttl_expiry_with_injected_clock() -> None:
    clock = Clock()
    c = LruCache(1 << 20, default_ttl=10, timer=clock)
    c.set("default", b"1")
    c.set("short", b"1", ttl=1)
    c.set("forever", b"1", ttl=math.inf)
    assert c.ttl("default") == pytest.approx(10)
    assert c.ttl("forever") is None and c.ttl("missing") is None
    clock.now += 1
    assert c.get("short") is None, "expired exactly at its deadline"
    assert "short" not in c
    clock.now += 9
    assert "default" not in c
    assert c.get("forever") == b"1"
    assert c.stats()["expirations"] >= 1


def test_expired_entries_are_reclaimed_by_writes_without_reads() -> None:
    clock = Clock()
    c = LruCache(1 << 30, timer=clock)
    for i in range(1000):
        c.set(f"k{i}", b"v", ttl=1)
    clock.now += 2
    # Each write reclaims a bounded number of expired entries; 100 writes reclaim them all here.
    for i in range(100):
        c.set(f"n{i}", b"v")
    assert len(c) == 100
    assert c.stats()["expirations"] == 1000


def test_purge_expired_is_bounded() -> None:
    clock = Clock()
    c = LruCache(1 << 30, timer=clock)
    for i in range(100):
        c.set(f"k{i}", b"v", ttl=1)
    clock.now += 5
    assert c.purge_expired(limit=30) == 30
    assert c.purge_expired() == 70
    assert len(c) == 0 and c.nbytes == 0


def test_expired_entry_frees_budget_before_live_entries_are_evicted() -> None:
    clock = Clock()
    per = charge("a", b"x")
    c = LruCache(per * 2, timer=clock)
    c.set("a", b"x", ttl=1)
    c.set("b", b"x")
    clock.now += 2
    c.set("c", b"x")
    assert c.keys() == ["c", "b"]
    assert c.stats()["evictions"] == 0 and c.stats()["expirations"] == 1


def test_replacing_keeps_budget_and_does_not_evict_itself() -> None:
    per = charge("a", b"x" * 10)
    c = LruCache(per * 3)
    for k in "abc":
        c.set(k, b"x" * 10)
    c.set("a", b"y" * 40)
    assert c.get("a") == b"y" * 40
    assert c.nbytes <= c.max_bytes


def test_get_many_set_many_delete_clear() -> None:
    c = LruCache(1 << 20)
    c.set_many({"a": b"1", b"b": b"2"})
    c.set_many([("c", b"3")], ttl=60)
    assert c.get_many(["a", b"b", "c", "missing"]) == {"a": b"1", b"b": b"2", "c": b"3"}
    assert c.delete("a") is True and c.delete("a") is False
    with pytest.raises(KeyError):
        del c["a"]
    with pytest.raises(KeyError):
        c["a"]
    c.clear()
    assert len(c) == 0 and c.nbytes == 0 and c.keys() == []


def test_set_many_is_all_or_nothing_on_bad_items() -> None:
    c = LruCache(1000)
    with pytest.raises(TypeError):
        c.set_many([("a", b"1"), ("b", 2)])
    with pytest.raises(ValueError):
        c.set_many([("a", b"1"), ("b", b"x" * 5000)])
    assert len(c) == 0


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: LruCache(-1), ValueError, "max_bytes must be >= 1"),
        (lambda: LruCache(0), ValueError, "max_bytes"),
        (lambda: LruCache("10"), TypeError, "max_bytes"),  # type: ignore[arg-type]
        (lambda: LruCache(10.5), TypeError, "max_bytes"),  # type: ignore[arg-type]
        (lambda: LruCache(10, max_entries=0), ValueError, "max_entries"),
        (lambda: LruCache(10, default_ttl=-1), ValueError, "default_ttl"),
        (lambda: LruCache(10, default_ttl=math.nan), ValueError, "default_ttl"),
        (lambda: LruCache(100).set(1, b"v"), TypeError, "key must be str or bytes, not int"),  # type: ignore[arg-type]
        (lambda: LruCache(100).set("k", "v"), TypeError, "bytes-like, not str"),  # type: ignore[arg-type]
        (lambda: LruCache(100).set("k", 5), TypeError, "value must be bytes-like"),  # type: ignore[arg-type]
        (lambda: LruCache(100).set("k", b"v", ttl=0), ValueError, "ttl must be > 0"),
        (lambda: LruCache(100).set("k", b"v", ttl=-3), ValueError, "ttl"),
        (lambda: LruCache(100).get(None), TypeError, "key must be str or bytes"),  # type: ignore[arg-type]
        (lambda: LruCache(100).purge_expired(-1), ValueError, "limit"),
        (lambda: LruCache(100, timer=lambda: -5.0).get("k"), ValueError, "timer"),
    ],
)
def test_bad_input(call, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        call()


def test_timer_exception_propagates_and_leaves_cache_usable() -> None:
    def broken() -> float:
        raise RuntimeError("clock broke")

    c = LruCache(1000, timer=broken)
    with pytest.raises(RuntimeError, match="clock broke"):
        c.set("a", b"1")
    assert len(c) == 0


def test_threads_hammering_one_cache_keep_invariants() -> None:
    c = LruCache(64 * 1024, default_ttl=0.05)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(20_000):
                k = f"k{(i * 7 + seed) % 500}"
                if i % 3 == 0:
                    c.set(k, bytes([seed]) * (i % 200))
                elif i % 3 == 1:
                    v = c.get(k)
                    assert v is None or (len(v) == 0 or v == v[:1] * len(v))
                else:
                    c.delete(k) if i % 50 == 0 else (k in c)
                assert c.nbytes <= c.max_bytes
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    s = c.stats()
    assert s["bytes"] <= c.max_bytes
    assert s["entries"] == len(c.keys())


KEYS = st.sampled_from(["a", "b", "c", "d", "e", b"a", b"b", "ключ"])
VALUES = st.binary(max_size=120)
TTLS = st.one_of(st.none(), st.sampled_from([0.125, 0.5, 1.0, 2.0, math.inf]))


class CacheMachine(RuleBasedStateMachine):
    """Drive LruCache and the model with the same operations and an injected clock.

    Times and TTLs are multiples of 1/8 s, exact in binary and in nanoseconds, so deadlines compare
    identically in both.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.cache: LruCache | None = None
        self.model: CacheModel | None = None

    @precondition(lambda self: self.cache is None)
    @rule(
        max_bytes=st.integers(ENTRY_OVERHEAD + 130, 6 * (ENTRY_OVERHEAD + 60)),
        max_entries=st.one_of(st.none(), st.integers(1, 5)),
        default_ttl=st.one_of(st.none(), st.sampled_from([0.5, 1.0, 3.0])),
    )
    def create(self, max_bytes: int, max_entries: int | None, default_ttl: float | None) -> None:
        self.cache = LruCache(
            max_bytes, max_entries=max_entries, default_ttl=default_ttl, timer=self.clock
        )
        self.model = CacheModel(max_bytes, max_entries, default_ttl)

    @precondition(lambda self: self.cache is not None)
    @rule(key=KEYS, value=VALUES, ttl=TTLS)
    def set(self, key: str | bytes, value: bytes, ttl: float | None) -> None:
        assert self.cache is not None and self.model is not None
        ok = self.model.set(key, value, ttl, self.clock.now)
        if ok:
            self.cache.set(key, value, ttl)
        else:
            with pytest.raises(ValueError):
                self.cache.set(key, value, ttl)

    @precondition(lambda self: self.cache is not None)
    @rule(key=KEYS)
    def get(self, key: str | bytes) -> None:
        assert self.cache is not None and self.model is not None
        assert self.cache.get(key) == self.model.get(key, self.clock.now)

    @precondition(lambda self: self.cache is not None)
    @rule(key=KEYS)
    def delete(self, key: str | bytes) -> None:
        assert self.cache is not None and self.model is not None
        assert self.cache.delete(key) == self.model.delete(key, self.clock.now)

    @precondition(lambda self: self.cache is not None)
    @rule(key=KEYS)
    def ttl(self, key: str | bytes) -> None:
        assert self.cache is not None and self.model is not None
        got, want = self.cache.ttl(key), self.model.ttl(key, self.clock.now)
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, abs=1e-9)

    @precondition(lambda self: self.cache is not None)
    @rule(steps=st.integers(1, 12))
    def advance(self, steps: int) -> None:
        self.clock.now += steps * 0.125

    @invariant()
    def same_live_entries_in_same_order(self) -> None:
        if self.cache is None or self.model is None:
            return
        now = self.clock.now
        live = [k for k in self.cache.keys() if k in self.cache]
        assert live == self.model.live_keys_mru(now)
        assert self.cache.nbytes <= self.cache.max_bytes
        assert self.cache.nbytes >= self.model.bytes_live(now)
        assert len(self.cache) == len(self.cache.keys())


TestCacheModel = CacheMachine.TestCase
TestCacheModel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)

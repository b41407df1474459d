"""A tiny pure-Python model of ``HashRing``, for the hypothesis state machine in test_ring.py.

It applies the documented rules directly: MurmurHash64A (seed 0, little-endian words) positions,
``round(weight * vnodes)`` points per node (halves away from zero) at
``hash(name.encode() + i.to_bytes(4, "little"))``, points sorted by ``(point, name)``, a key owned
by the first point at or after its hash (wrapping), and bounded-load capacities
``ceil(c * (total_load + 1) / n * (points_i * n / total_points))`` — the same float operations in
the same order as the Rust code, so the two agree exactly.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

_M = 0xC6A4A7935BD1E995
_MASK = (1 << 64) - 1


def murmur64a(data: bytes, seed: int = 0) -> int:
    """MurmurHash64A as in SMHasher's reference C code, reading 8-byte words little-endian."""
    h = (seed ^ (len(data) * _M)) & _MASK
    full = len(data) - len(data) % 8
    for i in range(0, full, 8):
        k = (int.from_bytes(data[i : i + 8], "little") * _M) & _MASK
        k ^= k >> 47
        k = (k * _M) & _MASK
        h ^= k
        h = (h * _M) & _MASK
    if full < len(data):
        h ^= int.from_bytes(data[full:], "little")
        h = (h * _M) & _MASK
    h ^= h >> 47
    h = (h * _M) & _MASK
    h ^= h >> 47
    return h


def key_hash(key: str | bytes) -> int:
    return murmur64a(key.encode() if isinstance(key, str) else key)


def vnode_point(name: str, index: int) -> int:
    return murmur64a(name.encode() + index.to_bytes(4, "little"))


def points_for(weight: float, vnodes: int) -> int:
    """``round(weight * vnodes)`` with halves away from zero (Rust's ``f64::round``)."""
    x = weight * vnodes
    whole = math.floor(x)
    return whole + 1 if x - whole >= 0.5 else whole


@dataclass
class ModelNode:
    weight: float
    points: int
    load: int = 0


class RingModel:
    def __init__(self, vnodes: int, balance_factor: float | None = None) -> None:
        self.vnodes = vnodes
        self.balance_factor = balance_factor
        self.nodes: dict[str, ModelNode] = {}
        self._ring: list[tuple[int, str]] = []
        self._positions: list[int] = []

    def _rebuild(self) -> None:
        self._ring = sorted(
            (vnode_point(name, i), name)
            for name, node in self.nodes.items()
            for i in range(node.points)
        )
        self._positions = [p for p, _ in self._ring]

    def add(self, name: str, weight: float = 1.0) -> None:
        points = points_for(weight, self.vnodes)
        if points < 1:
            raise ValueError("weight gives 0 points")
        if name in self.nodes:
            self.nodes[name].weight = weight
            self.nodes[name].points = points
        else:
            self.nodes[name] = ModelNode(weight, points)
        self._rebuild()

    def remove(self, name: str) -> None:
        del self.nodes[name]  # KeyError for an unknown node, like the real ring
        self._rebuild()

    def _home(self, key: str | bytes) -> int:
        if not self._ring:
            raise LookupError("empty ring")
        i = bisect.bisect_left(self._positions, key_hash(key))
        return 0 if i == len(self._ring) else i

    def get(self, key: str | bytes) -> str:
        return self._ring[self._home(key)][1]

    def get_n(self, key: str | bytes, n: int) -> list[str]:
        start = self._home(key)
        out: list[str] = []
        for step in range(len(self._ring)):
            name = self._ring[(start + step) % len(self._ring)][1]
            if len(out) >= n:
                break
            if name not in out:
                out.append(name)
        return out

    @property
    def total_load(self) -> int:
        return sum(node.load for node in self.nodes.values())

    def capacity(self, name: str) -> float:
        assert self.balance_factor is not None
        n = len(self.nodes)
        base = self.balance_factor * (self.total_load + 1) / n
        rel = (self.nodes[name].points * n) / len(self._ring)
        return math.ceil(base * rel)

    def acquire(self, key: str | bytes) -> str:
        start = self._home(key)
        chosen = self._ring[start][1]
        if self.balance_factor is not None:
            for step in range(len(self._ring)):
                name = self._ring[(start + step) % len(self._ring)][1]
                if self.nodes[name].load < self.capacity(name):
                    chosen = name
                    break
        self.nodes[chosen].load += 1
        return chosen

    def release(self, name: str) -> None:
        node = self.nodes[name]  # KeyError for an unknown node
        if node.load == 0:
            raise ValueError("no load to release")
        node.load -= 1

    def weights(self) -> dict[str, float]:
        return {name: self.nodes[name].weight for name in sorted(self.nodes)}

    def loads(self) -> dict[str, int]:
        return {name: self.nodes[name].load for name in sorted(self.nodes)}

    @property
    def point_count(self) -> int:
        return len(self._ring)

"""Choosing an upstream server of a pool.

For now one algorithm: smooth weighted round robin, as nginx's ``upstream`` does it
(https://github.com/phusion/nginx/commit/27e94984486058d73157038f7950a0a36ecc6e35): each pick adds
every server's weight to its running score, takes the highest score and subtracts the total weight
from it. Over any ``sum(weights)`` consecutive picks each server is chosen exactly ``weight`` times,
spread out (weights 5, 1, 1 give ``a a b a c a a``, not ``a a a a a b c``). The latency-aware
algorithms, health and ejection of the balancing issue build on the same ``pick()`` interface.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyproxy.config import Server

__all__ = ["RoundRobin"]


class RoundRobin:
    """Smooth weighted round robin over a fixed list of servers (O(servers) per pick)."""

    def __init__(self, servers: Sequence[Server]) -> None:
        if not servers:
            raise ValueError("a pool needs at least one server")
        self.servers = tuple(servers)
        self._weights = [s.weight for s in self.servers]
        self._total = sum(self._weights)
        self._scores = [0] * len(self.servers)

    def pick(self) -> Server:
        """The next server."""
        scores, weights = self._scores, self._weights
        best = 0
        for i, w in enumerate(weights):
            scores[i] += w
            if scores[i] > scores[best]:
                best = i
        scores[best] -= self._total
        return self.servers[best]

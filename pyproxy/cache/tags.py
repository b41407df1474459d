"""Dependencies between cache tags: purging a tag purges every tag that depends on it, transitively.

An edge ``dependent → on`` ("pages tagged ``dependent`` are built from ``on``") comes from the
configuration or from a response's ``X-Cache-Depends`` header. :meth:`TagGraph.closure` walks the
edges breadth-first with a visited set, so cycles (``a`` depends on ``b`` depends on ``a``) end the
walk instead of looping, and a purge of either purges both. Edges a shared tier knows (Redis: made
by other instances) are asked for through ``more_dependents`` during the same walk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

__all__ = ["TagGraph"]

MAX_CLOSURE = 100_000  # a purge never walks more tags than this (a runaway graph is a config bug)


class TagGraph:
    """Tag → tags depending on it."""

    def __init__(self, edges: Iterable[tuple[str, str]] = ()) -> None:
        self._dependents: dict[str, set[str]] = {}
        for dependent, on in edges:
            self.add(dependent, on)

    def add(self, dependent: str, on: str) -> bool:
        """Record that ``dependent`` depends on ``on``; ``True`` if the edge is new."""
        if not dependent or not on:
            raise ValueError("tags in a dependency must be non-empty")
        known = self._dependents.setdefault(on, set())
        if dependent in known:
            return False
        known.add(dependent)
        return True

    def __len__(self) -> int:
        return sum(len(v) for v in self._dependents.values())

    async def closure(
        self, tags: Iterable[str], more_dependents: Callable[[list[str]], Awaitable[set[str]]] | None = None
    ) -> set[str]:
        """``tags`` and every tag depending on them, directly or not (cycle-safe)."""
        seen = set(tags)
        frontier = list(seen)
        while frontier and len(seen) < MAX_CLOSURE:
            found: set[str] = set()
            for tag in frontier:
                found |= self._dependents.get(tag, set())
            if more_dependents is not None:
                found |= await more_dependents(frontier)
            frontier = [t for t in found if t not in seen]
            seen.update(frontier)
        return seen

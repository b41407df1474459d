"""Type stubs for ``pyproxy._core`` (the PyO3 extension). Checked by ``python -m mypy.stubtest``."""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, final

from typing_extensions import Buffer, Self

__all__ = [
    "__version__",
    "PyproxyError",
    "LruCache",
    "ENTRY_OVERHEAD",
    "HashRing",
    "SlidingWindow",
    "hit_all",
    "SharedWindows",
    "ChargePlan",
    "Tally",
    "HybridCounter",
    "HybridClock",
    "HybridPlan",
    "hybrid_charge",
]

__version__: Final[str]

class PyproxyError(Exception):
    """Base class of every exception pyproxy raises of its own."""

# ---------------------------------------------------------------------------------------- LruCache

ENTRY_OVERHEAD: Final[int]
"""Bytes charged per entry on top of its key and value."""

@final
class LruCache:
    """LRU cache with per-entry TTL and a byte budget; keys ``str | bytes``, values bytes-like."""

    def __new__(
        cls,
        max_bytes: int,
        *,
        max_entries: int | None = None,
        default_ttl: float | None = None,
        timer: Callable[[], float] | None = None,
    ) -> LruCache: ...
    def get(self, key: str | bytes, default: bytes | None = None) -> bytes | None: ...
    def set(self, key: str | bytes, value: Buffer, ttl: float | None = None) -> None: ...
    def delete(self, key: str | bytes) -> bool: ...
    def ttl(self, key: str | bytes) -> float | None: ...
    def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, bytes]: ...
    def set_many(
        self,
        items: Mapping[str | bytes, Buffer] | Iterable[tuple[str | bytes, Buffer]],
        ttl: float | None = None,
    ) -> None: ...
    def purge_expired(self, limit: int = 1024) -> int: ...
    def clear(self) -> None: ...
    def keys(self) -> list[str | bytes]: ...
    def stats(self) -> dict[str, int]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def max_entries(self) -> int | None: ...
    @property
    def default_ttl(self) -> float | None: ...
    def __contains__(self, key: object, /) -> bool: ...
    def __getitem__(self, key: str | bytes, /) -> bytes: ...
    def __setitem__(self, key: str | bytes, value: Buffer, /) -> None: ...
    def __delitem__(self, key: str | bytes, /) -> None: ...
    def __len__(self) -> int: ...

# ---------------------------------------------------------------------------------------- HashRing

@final
class HashRing:
    """Consistent-hash ring of named nodes, with weights, virtual nodes and optional bounded loads."""

    def __new__(
        cls,
        nodes: Iterable[str] | Iterable[tuple[str, float]] | Mapping[str, float] = (),
        *,
        vnodes: int = 1000,
        balance_factor: float | None = None,
    ) -> HashRing: ...
    def add(self, node: str, weight: float = 1.0) -> None: ...
    def remove(self, node: str) -> None: ...
    def get(self, key: str | bytes) -> str: ...
    def get_n(self, key: str | bytes, n: int) -> list[str]: ...
    def acquire(self, key: str | bytes) -> str: ...
    def release(self, node: str) -> None: ...
    def load(self, node: str) -> int: ...
    def loads(self) -> dict[str, int]: ...
    @staticmethod
    def hash(key: str | bytes) -> int: ...
    @property
    def nodes(self) -> dict[str, float]: ...
    @property
    def vnodes(self) -> int: ...
    @property
    def balance_factor(self) -> float | None: ...
    @property
    def points(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, node: object, /) -> bool: ...

# ----------------------------------------------------------------------------------- SlidingWindow

@final
class SlidingWindow:
    """Rate-limit counters keyed by ``str | bytes``: at most ``limit`` units per ``window`` seconds.

    ``exact=False``: O(1) sliding-window counter (at most ``2*limit`` in a ``window``-long
    interval in the worst case, within one hit of exact for uniform traffic); ``exact=True``:
    per-key log, never more than ``limit`` in any interval ``[t, t + window)``. ``hit``/``peek``
    return ``(allowed, remaining, retry_after_seconds)``; ``retry_after`` is ``math.inf`` if
    ``cost > limit``.
    """

    def __new__(cls, limit: int, window: float, *, exact: bool = False) -> Self: ...
    def hit(
        self, key: str | bytes, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]: ...
    def peek(
        self, key: str | bytes, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]: ...
    def reset(self, key: str | bytes) -> bool: ...
    @property
    def limit(self) -> int: ...
    @property
    def window(self) -> float: ...
    @property
    def exact(self) -> bool: ...
    def __len__(self) -> int: ...

def hit_all(
    checks: Iterable[tuple[SlidingWindow, str | bytes]],
    cost: int = 1,
    now: float | None = None,
) -> tuple[bool, int, float, int]:
    """Check several ``(limiter, key)`` pairs; charge all or none.

    Returns ``(allowed, first_denied_index_or_-1, retry_after_max, remaining_min)``.
    """

# ----------------------------------------------------------------------------------- SharedWindows

@final
class SharedWindows:
    """Sliding-window counters in shared memory, one table for every worker process of a machine.

    Create it **before forking**: processes forked after it share it. Counts exactly as
    ``SlidingWindow(exact=False)``; a counter is identified by ``(window, key)``, ``limit`` is per
    call. A new key that finds the table full is allowed uncounted and ``overflows`` goes up.
    """

    def __new__(cls, capacity: int) -> Self: ...
    def hit(
        self,
        limit: int,
        window: float,
        key: str | bytes,
        cost: int = 1,
        now: float | None = None,
    ) -> tuple[bool, int, float]: ...
    def hit_all(
        self,
        checks: Iterable[tuple[int, float, str | bytes]],
        cost: int = 1,
        now: float | None = None,
    ) -> tuple[bool, int, float, int]:
        """Check several ``(limit, window, key)`` triples; charge all or none.

        Returns ``(allowed, first_denied_index_or_-1, retry_after_max, remaining_min)``.
        """
    def hit_all_binding(
        self,
        checks: Iterable[tuple[int, float, str | bytes]],
        cost: int = 1,
        now: float | None = None,
    ) -> tuple[bool, int, float, int, int, float]:
        """``hit_all``, and when allowed which triple a ``RateLimit`` header advertises.

        Returns ``(allowed, first_denied_index_or_-1, retry_after_max, remaining, binding, reset)``:
        allowed, ``binding`` is the index of the triple with the least remaining after the charge
        (on a tie, the one whose usage ages out last), ``remaining`` its remaining and ``reset``
        the seconds until its usage has aged out; denied, ``binding`` is -1 and ``reset`` 0.0.
        """
    def live(self, now: float | None = None) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def overflows(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def __len__(self) -> int: ...

@final
class ChargePlan:
    """A fixed set of ``hit_all`` triples on one table, prepared once and charged many times.

    ``fields``: ``(policy_field, state_name, state_prefixes)`` — the ``(name, value)`` pair an
    allowed response carries as is, and the name and per-check start of the field stating the
    binding check (``state_prefixes[i] + b"<remaining>;t=<seconds>"``).
    """

    def __new__(
        cls,
        table: SharedWindows,
        checks: Iterable[tuple[int, float, str | bytes]],
        cost: int = 1,
        fields: tuple[tuple[bytes, bytes], bytes, Sequence[bytes]] | None = None,
        tally: Tally | None = None,
    ) -> Self: ...
    def charge(self, now: float | None = None) -> list[tuple[bytes, bytes]] | None:
        """Decide and charge as ``hit_all_binding``: allowed → the fields (``[]`` without
        ``fields``) and one more in ``tally``; denied → ``None`` with nothing charged."""
    @property
    def tally(self) -> Tally: ...
    def __len__(self) -> int: ...

@final
class Tally:
    """A count several ``ChargePlan``s add their allowed charges to."""

    def __new__(cls) -> Self: ...
    @property
    def value(self) -> int: ...

# ------------------------------------------------------------------------------ hybrid limiting

@final
class HybridCounter:
    """One hybrid counter: global counts of two windows as Redis last reported them, plus this
    process's pending and in-flight units."""

    def __new__(cls, rkey: str, key: str, limit: int, window_us: int) -> Self: ...
    @property
    def rkey(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def limit(self) -> int: ...
    @property
    def w(self) -> int: ...
    @property
    def global_counts(self) -> tuple[int, int, int]: ...
    @property
    def used(self) -> bool: ...
    @property
    def idle(self) -> bool: ...
    @property
    def pending(self) -> list[tuple[int, int]]: ...
    def touch(self) -> None: ...
    def retire(self) -> None: ...
    def count(self, idx: int) -> int: ...
    def add(self, idx: int, units: int) -> None: ...
    def begin_sync(self) -> list[tuple[int, int]]: ...
    def sync_failed(self) -> None: ...
    def sync_done(self, now_us: int, previous: int, current: int) -> int: ...

@final
class HybridClock:
    """Redis' clock as this process estimates it (monotonic clock + offset, never backwards)."""

    def __new__(cls, offset: float) -> Self: ...
    def now_us(self, now: float | None = None) -> int: ...
    offset: float
    degraded: bool

@final
class HybridPlan:
    """Hybrid counters prepared for one tuple of checks, charged many times."""

    def __new__(
        cls,
        counters: Sequence[HybridCounter],
        cost: int,
        clock: HybridClock,
        fields: tuple[tuple[bytes, bytes], bytes, Sequence[bytes]] | None = None,
        tally: Tally | None = None,
    ) -> Self: ...
    def charge(self, now: float | None = None) -> list[tuple[bytes, bytes]] | None: ...
    @property
    def tally(self) -> Tally: ...
    def __len__(self) -> int: ...

def hybrid_charge(
    counters: Sequence[HybridCounter], cost: int, t_us: int
) -> tuple[int, list[tuple[int, int, int, int, int]]] | None:
    """All or none: ``(binding index, [(idx, e, cur, remaining, reset_us)] per counter)``, or ``None``."""

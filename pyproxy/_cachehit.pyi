"""Type stubs for ``pyproxy._cachehit`` (cython_ext/_cachehit.pyx). Checked by ``python -m mypy.stubtest``."""

from typing import Any, Final, final

READY_MAX: Final[int]

@final
class HitCounts:
    """Exponentially decayed hit counts per key (``count × 2^(−Δt / half_life) + 1`` per hit)."""

    @property
    def rate(self) -> float: ...
    @property
    def max_keys(self) -> int: ...
    def __init__(self, half_life: float, max_keys: int = 100_000) -> None: ...
    def hit(self, key: str, now: float) -> float: ...
    def count(self, key: str, now: float) -> float: ...
    def set(self, key: str, count: float, now: float) -> None: ...
    def hottest(self, n: int, now: float) -> list[tuple[str, float]]: ...
    def __len__(self) -> int: ...

@final
class Ready:
    """A stored response in memory, parsed once: what a fresh hit needs, nothing else."""

    @property
    def record(self) -> object: ...
    @property
    def status(self) -> int: ...
    @property
    def fields(self) -> tuple[tuple[bytes, bytes], ...]: ...
    @property
    def body(self) -> bytes | memoryview: ...
    @property
    def lifetime(self) -> float: ...
    @property
    def initial_age(self) -> float: ...
    @property
    def response_time(self) -> float: ...
    @property
    def stored(self) -> Any: ...
    @property
    def head(self) -> bytes: ...
    def __init__(
        self,
        record: object,
        status: int,
        fields: tuple[tuple[bytes, bytes], ...],
        body: bytes | memoryview,
        lifetime: float,
        initial_age: float,
        response_time: float,
        stored: Any,
        head: bytes,
    ) -> None: ...

@final
class HitPath:
    """What ``lookup_now`` reads of its phase, as C fields (made again when any of it changes)."""

    def __init__(self, phase: Any, memory: Any, tier_stats: Any) -> None: ...

def lookup_now(
    self: Any,
    route: str,
    method: bytes,
    scheme: str,
    host: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    client: str = "",
) -> Any:
    """``HttpCachePhase.lookup_now``: an ``Answer`` for a fresh hit in memory, or ``None``."""

def warm(
    self: Any,
    route: str,
    scheme: str,
    host: bytes,
    target: bytes,
    headers: Any,
    client: str,
    key: str,
    stored: Any,
    ttl: float,
    lifetime: float,
) -> None:
    """``HttpCachePhase._warm``: what a fresh hit feeds cache warming."""

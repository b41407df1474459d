# Stubs for the Cython module pyproxy._balance (cython_ext/_balance.pyx): the compiled bases of
# pyproxy.balance.upstream.UpstreamServer, pyproxy.balance.algorithms.RoundRobin,
# pyproxy.balance.pool.UpstreamPool and pyproxy.resilience.budget.RetryBudget, which document them,
# and pyproxy.resilience._buckets.BucketCounter.
from collections.abc import Container, Sequence
from typing import Any

from typing_extensions import disjoint_base

ERROR_ALPHA: float
AVG_ALPHA: float

@disjoint_base
class ServerStats:
    server: Any
    id: str
    weight: float
    in_flight: int
    ewma: float
    error_ewma: float
    avg: float
    stamp: float
    since: float
    tau: float
    available: bool
    def started(self) -> None: ...
    def finished(self, latency: float, ok: bool, now: float) -> None: ...
    # Cython's pickling support (the Python subclass pickles as the slots class it replaced did)
    def __reduce_cython__(self) -> Any: ...
    def __setstate_cython__(self, __pyx_state: Any) -> None: ...

@disjoint_base
class Rotation:
    _servers: list[Any]
    _next: int
    def pick(self, request: Any, now: Any, exclude: Container[Any] = ...) -> Any: ...
    def __reduce_cython__(self) -> Any: ...
    def __setstate_cython__(self, __pyx_state: Any) -> None: ...

@disjoint_base
class BucketCounter:
    a: int
    b: int
    def __init__(self, window: float, buckets: int = 10) -> None: ...
    def advance(self, now: float) -> None: ...
    def add(self, now: float, da: int, db: int) -> None: ...
    def clear(self) -> None: ...

@disjoint_base
class BudgetWindow:
    _window: BucketCounter
    def record_request(self, now: float) -> None: ...
    def __reduce_cython__(self) -> Any: ...
    def __setstate_cython__(self, __pyx_state: Any) -> None: ...

@disjoint_base
class PoolCore:
    balancer: Any
    states: dict[str, Any]
    retry_budget: BudgetWindow
    unlimited: bool
    outlier: Any
    _recent: Any
    _recent_at: Any
    _plain: bool
    def choose(self, request: Any, now: float, tried: Sequence[Any]) -> Any: ...
    def finished(self, server: ServerStats, latency: float, ok: bool | None, connect_failure: bool, now: float) -> None: ...
    def __reduce_cython__(self) -> Any: ...
    def __setstate_cython__(self, __pyx_state: Any) -> None: ...

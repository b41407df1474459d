# Stubs for the Cython module pyproxy._balance (cython_ext/_balance.pyx): the compiled bases of
# pyproxy.balance.upstream.UpstreamServer and pyproxy.balance.algorithms.RoundRobin, which document them.
from collections.abc import Container
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

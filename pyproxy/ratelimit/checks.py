"""What a rate-limit check asks and what a limiter answers: backend-neutral value types.

A request is decided by a list of :class:`Check` (one per limit that applies to it: global, route,
user key, several limits per level), all charged or none. The answer is a :class:`Decision` with a
:class:`CheckResult` per check, shaped for the IETF httpapi-ratelimit-headers draft:

- ``RateLimit-Policy``: per check ``"<name>";q=<limit>;w=<window seconds>``
- ``RateLimit``: for the check that binds (``Decision.denied_check`` when denied, else the one with
  the least ``remaining``) ``"<name>";r=<remaining>;t=<ceil(retry_after) if denied else ceil(reset)>``
- ``Retry-After``: ``ceil(Decision.retry_after)`` when denied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, TypeVar

__all__ = ["ALGORITHMS", "Algorithm", "Binding", "BlockedKey", "Check", "CheckResult", "Decision", "Penalty", "TupleMemo"]

Algorithm = Literal["sliding_window_counter", "sliding_log"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("sliding_window_counter", "sliding_log")

_MAX_INT: Final = 2**53  # every count and time stays an exact integer in Redis's Lua (doubles)


@dataclass(frozen=True, slots=True)
class Penalty:
    """The penalty box for a check's key ("circuit breaker on violations").

    A key whose own limit denies it more than ``max_violations`` times within ``violation_window``
    seconds (a window that starts at the first violation) is blocked for ``block_for`` seconds;
    each further block of the same key doubles the duration, up to ``block_max``. A key forgets
    its blocks ``max(block_max, violation_window)`` seconds after the last one ends. Requests
    denied because the key is already blocked are not violations (they do not extend the block).
    """

    max_violations: int
    violation_window: float
    block_for: float
    block_max: float

    def __post_init__(self) -> None:
        if not isinstance(self.max_violations, int) or self.max_violations < 0:
            raise ValueError(f"max_violations must be an int >= 0, got {self.max_violations!r}")
        for name in ("violation_window", "block_for", "block_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 1e-6 <= value <= 1e9:
                raise ValueError(f"{name} must be seconds in [1e-6, 1e9], got {value!r}")
        if self.block_max < self.block_for:
            raise ValueError(f"block_max ({self.block_max!r}) must be >= block_for ({self.block_for!r})")


@dataclass(frozen=True, slots=True)
class Check:
    """One limit applied to one key: at most ``limit`` units of cost per sliding ``window`` seconds.

    ``key`` names what is counted (``"global"``, ``"route:/api"``, ``"user:alice"``): checks with
    the same key, algorithm, limit and window share one counter (listed twice in one request, they
    are decided with their combined cost, as ``hit_all`` does). ``name`` labels the check in
    decisions and headers (defaults to ``key``). ``penalty`` puts the key under the penalty box.
    """

    key: str
    limit: int
    window: float
    cost: int = 1
    algorithm: Algorithm = "sliding_window_counter"
    name: str = ""
    penalty: Penalty | None = None
    # This check's item of the RateLimit-Policy field, made on first use (headers.policy_value).
    policy_item: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"key must be a non-empty str, got {self.key!r}")
        if not isinstance(self.limit, int) or not 0 <= self.limit < _MAX_INT // 2:
            raise ValueError(f"limit must be an int in [0, 2^52), got {self.limit!r}")
        if not isinstance(self.window, (int, float)) or not 1e-6 <= self.window <= 1e9:
            raise ValueError(f"window must be seconds in [1e-6, 1e9], got {self.window!r}")
        if not isinstance(self.cost, int) or not 0 <= self.cost <= 2**31:
            raise ValueError(f"cost must be an int in [0, 2^31], got {self.cost!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if not self.name:
            object.__setattr__(self, "name", self.key)


def add_penalty(penalties: dict[str, Penalty], key: str, check: Check) -> None:
    """Record ``check``'s penalty box under ``key`` (the check's key, or its Redis tag); one key
    cannot be given two different boxes in one request (``ValueError``)."""
    if check.penalty is None:
        return
    known = penalties.setdefault(key, check.penalty)
    if known != check.penalty:
        raise ValueError(f"checks on key {check.key!r} give different penalty boxes: {known} and {check.penalty}")


# Results are made per request: plain slotted dataclasses, read-only by convention (a frozen one
# costs ~0.5 µs more to construct: object.__setattr__ per field; measured 680 vs 160 ns).
@dataclass(slots=True)
class CheckResult:
    """One check's part of a decision.

    ``allowed``: this check alone admits the request (its limit has room and its key is not
    blocked). ``remaining``: units left after this request when the decision allowed it, else as
    they stand (nothing was charged). ``retry_after``: seconds until this check would admit the
    same request if no other came (0.0 when it does now; ``math.inf`` when it never can, cost >
    limit). ``reset``: seconds until the key's usage has aged out entirely (``remaining`` back to
    ``limit``). ``blocked``: the key is in the penalty box (before or because of this request).
    """

    check: Check
    allowed: bool
    remaining: int
    retry_after: float
    reset: float
    blocked: bool = False


@dataclass(slots=True)
class Decision:
    """The answer for a request's checks: all charged (``allowed``) or none.

    ``denied``: index (into the checks as given) of the first check that does not admit the
    request, ``None`` when allowed. ``retry_after``: the exact wait in seconds until the same
    request would be allowed if no other came (the largest over the checks; 0.0 when allowed;
    ``math.inf`` if it never can). ``blocked``: denied by the penalty box; ``newly_blocked``: keys
    this request put in the penalty box. ``server_time_us``: the Redis ``TIME`` (µs since the
    epoch) the decision was made at (the hybrid limiter: its estimate of it; 0 for local limiters).
    """

    allowed: bool
    results: tuple[CheckResult, ...]
    denied: int | None = None
    retry_after: float = 0.0
    blocked: bool = False
    newly_blocked: tuple[str, ...] = ()
    server_time_us: int = 0

    @property
    def denied_check(self) -> Check | None:
        """The first check that does not admit the request (``None`` when allowed)."""
        return None if self.denied is None else self.results[self.denied].check

    @property
    def remaining(self) -> int:
        """The least ``remaining`` over the checks (what the tightest limit still allows)."""
        return min((r.remaining for r in self.results), default=0)

    @property
    def binding(self) -> CheckResult | None:
        """The result to advertise in a ``RateLimit`` header: the denying check, else the tightest."""
        if not self.results:
            return None
        if self.denied is not None:
            return self.results[self.denied]
        return min(self.results, key=lambda r: (r.remaining, -r.reset))

    @property
    def retry_after_header(self) -> int | None:
        """``Retry-After`` in whole seconds (rounded up; at least 1) when denied and it can pass."""
        if self.allowed or math.isinf(self.retry_after):
            return None
        return max(1, math.ceil(self.retry_after))


V = TypeVar("V")


class TupleMemo(Generic[V]):
    """What was worked out for a tuple of checks, kept by the tuple's identity: a rate-limit policy
    hands out the same tuple per route and key, a tuple never changes, and the memo holds it (so
    its id cannot be reused). ``variant`` tells apart values made with other options for the same
    tuple. Other sequences are not kept. Bounded: emptied when full."""

    __slots__ = ("_items", "size")

    def __init__(self, size: int = 4096) -> None:
        self._items: dict[int, tuple[Sequence[Check], object, V]] = {}
        self.size = size

    def get(self, checks: Sequence[Check], variant: object = None) -> V:
        """The value kept for ``checks`` (and ``variant``); ``KeyError`` if none."""
        item = self._items.get(id(checks))
        if item is None or item[0] is not checks or item[1] != variant:
            raise KeyError(variant)
        return item[2]

    def put(self, checks: Sequence[Check], variant: object, value: V) -> None:
        """Keep ``value`` for ``checks`` (a tuple; anything else is not kept)."""
        if type(checks) is not tuple:
            return
        if len(self._items) >= self.size:
            self._items.clear()
        self._items[id(checks)] = (checks, variant, value)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


Binding = tuple[Check, int, float]
"""An allowed request's binding check as limiters' ``hit_binding`` answer it: the check, its
``remaining`` after the charge and its ``reset`` in seconds (what ``Decision.binding`` would say,
without building the whole decision)."""


@dataclass(frozen=True, slots=True)
class BlockedKey:
    """A key in the penalty box: blocked until ``until`` (Unix seconds on the limiter's clock: Redis
    ``TIME`` for the Redis-backed limiters, ``time.time()`` for the local one), ``remaining``
    seconds from when it was read, after ``strikes`` blocks."""

    key: str
    until: float
    remaining: float
    strikes: int

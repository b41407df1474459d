"""From configuration to checks: which limits apply to a request, under which counter keys.

:class:`RatePolicy` is built once per configuration (per worker) from ``[ratelimit]`` and the
routes' ``ratelimit`` tables; per request, :meth:`RatePolicy.checks` gives the
:class:`~pyproxy.ratelimit.Check` list a limiter decides (all charged or none), narrowest level
first so that a denial names the most specific limit that refused:

=========  ==========================================  ================================
level      counter key                                 limits
=========  ==========================================  ================================
``key``    ``key:<route>:<source>:<value>``            the route's ``key_limits``
``route``  ``route:<route>``                           the route's ``limits``
``global`` ``global``                                  ``[[ratelimit.global]]``
=========  ==========================================  ================================

Each check of a request costs the route's ``cost``; checks are named by
:func:`~pyproxy.ratelimit.headers.check_name` (``"key"``, or ``"key/1s"`` and ``"key/1h"`` for
two key limits) — the names the ``RateLimit-Policy`` header lists. The key's counter names its
source (``header:X-User-ID``, ``client_ip``...) so that a header value cannot collide with
another source's value. A request without the key (:class:`~pyproxy.ratelimit.keys.KeyResult`
says why) is counted under its client IP (``on_missing_key = "client_ip"``, the default: leaving
the header out does not escape the limit) or not at the key level (``"skip"``). Key-level checks
carry the ``[ratelimit.penalty]`` box when configured; global and route keys never do (blocking
them would block everyone).

Adaptive limits (:class:`~pyproxy.ratelimit.adaptive.AdaptiveLimit`) are one object per limit,
named ``global[i]`` and ``routes.<route>.limits[i]``; :meth:`RatePolicy.observe` feeds a pool's
health to every limit that follows that pool, and checks read the current values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from pyproxy.config import Config, RateLimitRule, RouteRateLimit
from pyproxy.ratelimit.adaptive import AdaptiveLimit
from pyproxy.ratelimit.checks import Check, Penalty
from pyproxy.ratelimit.headers import check_name
from pyproxy.ratelimit.keys import ClientAddress, Headers, JwtVerifier, KeyResult, KeySource

__all__ = ["RatePolicy", "RoutePolicy"]


MEMO_SIZE = 4096
"""Keys whose checks a route keeps ready."""


class _Limit:
    """One configured limit of a level: fixed, or read from its adaptive limit."""

    __slots__ = ("adaptive", "counter", "name", "rule")

    def __init__(
        self, rule: RateLimitRule, counter: str, name: str, adaptive: AdaptiveLimit | None
    ) -> None:
        self.rule = rule
        self.counter = counter
        self.name = name
        self.adaptive = adaptive

    @property
    def limit(self) -> int:
        return self.adaptive.limit if self.adaptive is not None else self.rule.limit


class RoutePolicy:
    """The rate limits of one route's requests (built by :class:`RatePolicy`)."""

    def __init__(
        self,
        name: str,
        config: RouteRateLimit,
        route_limits: Sequence[_Limit],
        global_limits: Sequence[_Limit],
        key: KeySource | None,
        client: ClientAddress,
        penalty: Penalty | None,
    ) -> None:
        self.name = name
        self.config = config
        self.cost = config.cost
        self.key = key if config.key_limits else None
        self._client = client
        self._penalty = penalty
        several = len(config.key_limits) > 1
        self._key_limits = [
            (rule, check_name("key", rule.window, several)) for rule in config.key_limits
        ]
        self._shared = [*route_limits, *global_limits]
        self._adaptive = [lim.adaptive for lim in self._shared if lim.adaptive is not None]
        self._version = -1
        self._static: tuple[Check, ...] = ()
        self._prefix = f"key:{name}:"
        # The checks of recent keys (building a validated Check costs more than deciding it);
        # bounded, emptied when full or when an adaptive limit moves (_shared_checks).
        self._memo: dict[str, tuple[Check, ...]] = {}
        # For a key that is the peer's address alone (client_ip, no trusted proxy): by peer.
        self._by_peer: dict[str, tuple[tuple[Check, ...], KeyResult]] = {}

    @property
    def enabled(self) -> bool:
        """Any limit applies to this route's requests."""
        return bool(self._shared or self.key is not None)

    @property
    def peer_bound(self) -> bool:
        """The checks of a request follow from its peer's address alone and never move: no
        adaptive limit, and no key level or a key that is the peer's address."""
        return not self._adaptive and (self.key is None or self.key.by_peer_only)

    def _shared_checks(self) -> tuple[Check, ...]:
        version = sum(a.version for a in self._adaptive) if self._adaptive else 0
        if version != self._version:
            # the limits moved: so do the checks made with them
            self._memo.clear()
            self._by_peer.clear()
            self._static = tuple(
                Check(
                    key=lim.counter,
                    limit=lim.limit,
                    window=lim.rule.window,
                    cost=self.cost,
                    algorithm=lim.rule.algorithm,
                    name=lim.name,
                )
                for lim in self._shared
            )
            self._version = version
        return self._static

    def checks(
        self, headers: Headers, target: bytes, peer: str
    ) -> tuple[tuple[Check, ...], KeyResult | None]:
        """The request's checks (key, route, global), and its key as found (``None`` when the
        route has no key level; a ``KeyResult`` without value when the request had no key)."""
        shared = self._shared_checks()
        source = self.key
        if source is None:
            return shared, None
        by_peer = source.by_peer_only
        if by_peer:
            # The key is the peer's address as it stands: the checks by peer, without resolving.
            known = self._by_peer.get(peer)
            if known is not None:
                return known
        found = source.resolve(headers, target, peer)
        if found.value is not None:
            counter = f"{self._prefix}{source.spec}:{found.value}"
        elif self.config.on_missing_key == "client_ip":
            counter = f"{self._prefix}client_ip:{self._client(peer, headers)}"
        else:
            return shared, found
        memo = self._memo
        checks = memo.get(counter)
        if checks is None:
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            key_checks = tuple(
                Check(
                    key=counter,
                    limit=rule.limit,
                    window=rule.window,
                    cost=self.cost,
                    algorithm=rule.algorithm,
                    name=name,
                    penalty=self._penalty,
                )
                for rule, name in self._key_limits
            )
            checks = memo[counter] = key_checks + shared
        if by_peer:
            if len(self._by_peer) >= MEMO_SIZE:
                self._by_peer.clear()
            self._by_peer[peer] = (checks, found)
        return checks, found


class RatePolicy:
    """Every route's rate limits for one configuration.

    ``clock`` drives the adaptive limits (monotonic seconds); ``jwt_clock`` the JWT verdict cache
    (Unix seconds).
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        jwt_clock: Callable[[], float] = time.time,
    ) -> None:
        rl = config.ratelimit
        self.config = rl
        self.client = ClientAddress(rl.trusted_proxies)
        self.jwt = JwtVerifier(rl.jwt, clock=jwt_clock) if rl.jwt is not None else None
        self.adaptive: dict[str, AdaptiveLimit] = {}
        self.adaptive_pools: dict[str, str] = {}

        def limits(
            rules: Sequence[RateLimitRule], level: str, counter: str, where: str
        ) -> list[_Limit]:
            out = []
            for i, rule in enumerate(rules):
                adaptive = None
                if rule.adaptive is not None:
                    adaptive = AdaptiveLimit.from_config(rule.adaptive, start=rule.limit, clock=clock)
                    self.adaptive[f"{where}[{i}]"] = adaptive
                    self.adaptive_pools[f"{where}[{i}]"] = rule.adaptive.pool
                name = check_name(level, rule.window, len(rules) > 1)
                out.append(_Limit(rule, counter, name, adaptive))
            return out

        global_limits = limits(rl.global_limits, "global", "global", "global")
        sources: dict[str, KeySource] = {}
        self.routes: dict[str, RoutePolicy] = {}
        for route in config.routes:
            own = route.ratelimit
            key = None
            if own.key_limits:
                if own.key not in sources:
                    sources[own.key] = KeySource(
                        own.key,
                        client=self.client,
                        jwt=self.jwt,
                        jwt_claim=rl.jwt.claim if rl.jwt is not None else "sub",
                    )
                key = sources[own.key]
            self.routes[route.name] = RoutePolicy(
                route.name,
                own,
                limits(own.limits, "route", f"route:{route.name}", f"routes.{route.name}.limits"),
                global_limits,
                key,
                self.client,
                rl.penalty,
            )

    def checks(
        self, route: str, headers: Headers, target: bytes, peer: str
    ) -> tuple[tuple[Check, ...], KeyResult | None]:
        """The checks of a request of ``route`` (see :meth:`RoutePolicy.checks`)."""
        return self.routes[route].checks(headers, target, peer)

    def observe(
        self, pool: str, p99: float | None, error_rate: float | None, now: float | None = None
    ) -> None:
        """Feed ``pool``'s recent health to every adaptive limit that follows it."""
        for name, limit in self.adaptive.items():
            if self.adaptive_pools[name] == pool:
                limit.observe(p99, error_rate, now)

    def snapshot(self) -> dict[str, Any]:
        """Adaptive limits as plain data, by name, with their pool (``GET /ratelimits``)."""
        return {
            name: {"pool": self.adaptive_pools[name], **limit.snapshot()}
            for name, limit in self.adaptive.items()
        }

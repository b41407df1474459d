"""Configuration: the TOML schema, loading and validation into typed, frozen objects.

Validation never stops at the first problem: every problem is collected with its key path
(``pools.api.servers[1].address``) and a reason, and :class:`ConfigError` lists them all, so one run
of ``pyproxy check`` shows everything to fix. Unknown keys are problems too (with a "did you mean"
when a known key is close), because a typo that silently falls back to a default is the worst kind
of configuration bug.

Durations are seconds as a number, or a string with a unit (``"250ms"``, ``"10s"``, ``"5m"``,
``"1h"``); sizes are bytes as an integer, or a string with a unit (``"16KiB"``, ``"1MiB"``,
``"2GiB"``, also ``"k"``/``"m"``/``"g"`` as nginx writes them). Defaults follow nginx and HAProxy
where they have one; each is named in ``deploy/example.toml``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from dataclasses import replace as replace_dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from pyproxy.balance.health import HealthCheckConfig
from pyproxy.balance.outlier import OutlierConfig
from pyproxy.errors import PyproxyError
from pyproxy.ratelimit.checks import ALGORITHMS as RATELIMIT_ALGORITHMS
from pyproxy.ratelimit.checks import Algorithm, Penalty

__all__ = [
    "ALL_UNHEALTHY_MODES",
    "BALANCE_ALGORITHMS",
    "JWT_ALGORITHMS",
    "MISSING_KEY_POLICIES",
    "RATELIMIT_MODES",
    "REDIS_ERROR_POLICIES",
    "AccessLogConfig",
    "AdaptiveLimitConfig",
    "AdminConfig",
    "BreakerConfig",
    "BulkheadConfig",
    "Config",
    "ConfigError",
    "JwtConfig",
    "Limits",
    "Listener",
    "Pool",
    "Problem",
    "RateLimitConfig",
    "RateLimitRule",
    "RetryConfig",
    "Route",
    "RouteRateLimit",
    "Server",
    "load_config",
    "parse_config",
    "reload_problems",
]

T = TypeVar("T")

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
BALANCE_ALGORITHMS = (
    "round_robin", "random", "weighted_round_robin", "least_connections", "consistent_hash"
)
ALL_UNHEALTHY_MODES = ("panic", "reject")
RATELIMIT_MODES = ("local", "redis", "hybrid")
REDIS_ERROR_POLICIES = ("local", "deny", "allow")
MISSING_KEY_POLICIES = ("client_ip", "skip")
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512",
    "EdDSA",
)  # "none" is not one: an unsigned token proves nothing


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration: where (a dotted key path) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path or '<top level>'}: {self.reason}"


class ConfigError(PyproxyError, ValueError):
    """An invalid configuration; ``problems`` lists every problem found, section by section."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


# --------------------------------------------------------------------------------- the schema


@dataclass(frozen=True, slots=True)
class Listener:
    """A client-facing listening socket."""

    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin API's listener (loopback by default) and its optional bearer token."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9901
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """One JSON line per request, buffered and written in batches off the request path."""

    enabled: bool = False
    path: str = "-"  # "-": standard output
    flush_interval: float = 1.0  # seconds between writes of the buffered lines
    buffer_lines: int = 1000  # written at once when this many are waiting


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection and per-request limits (defaults as nginx / HAProxy ship them)."""

    max_head_size: int = 16 * 1024  # request line + headers; HAProxy tune.bufsize
    max_header_count: int = 100  # Go net/http, HAProxy tune.http.maxhdr default 101
    max_body_size: int = 10 * 1024 * 1024  # nginx client_max_body_size is 1m; agents post more
    head_timeout: float = 10.0  # time to read a whole request head (slowloris); HAProxy http-request
    body_timeout: float = 60.0  # longest pause between two body reads; nginx client_body_timeout
    keepalive_timeout: float = 75.0  # idle client keep-alive; nginx keepalive_timeout
    send_timeout: float = 60.0  # a client that takes nothing of a response this long is dropped
    max_connections: int = 10_000  # per worker
    drain_timeout: float = 30.0  # SIGTERM: how long in-flight requests may finish


@dataclass(frozen=True, slots=True)
class Server:
    """One upstream server of a pool."""

    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Circuit breaker per server (``[pools.NAME.circuit_breaker]``); see
    :class:`pyproxy.resilience.CircuitBreaker` for the states. ``None`` turns a trip rule off."""

    consecutive_failures: int | None = 5
    failure_ratio: float | None = 0.5  # of the requests in the rolling window
    window: float = 10.0
    min_requests: int = 20  # in the window before the ratio counts
    base_open_time: float = 5.0  # × 2^(openings-1), capped, ± jitter
    max_open_time: float = 300.0
    jitter: float = 0.1
    success_threshold: int = 3  # successes in half-open that close it again
    half_open_max_probes: int = 1  # concurrent requests let through in half-open


@dataclass(frozen=True, slots=True)
class BulkheadConfig:
    """Concurrency limits (``[pools.NAME.bulkhead]``); 0 = unlimited. A request over the pool's
    limit waits in a bounded queue up to ``queue_timeout``, else 503."""

    max_concurrent: int = 0  # requests in flight to the whole pool
    max_queue: int = 0  # requests waiting for a pool slot (0: none wait, 503 at once)
    queue_timeout: float = 1.0
    max_concurrent_per_server: int = 0  # a full server is skipped by the balancer


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Retries (``[pools.NAME.retry]``): idempotent requests only (or routes marked idempotent),
    only before anything of the response reached the client, on another server, with full-jitter
    backoff, within a retry budget (Envoy's ``retry_budget``)."""

    attempts: int = 1  # retries after the first try (0: never retry)
    on_statuses: frozenset[int] = frozenset({502, 503, 504})  # responses worth another server
    budget_percent: float = 20.0  # retries ≤ this % of the pool's requests over the window...
    min_retries_per_window: int = 3  # ...plus this many (so a quiet pool can still retry)
    budget_window: float = 10.0
    backoff_base: float = 0.025  # seconds; attempt n waits uniform(0, min(max, base × 2^(n-1)))
    backoff_max: float = 0.25


@dataclass(frozen=True, slots=True)
class Pool:
    """A named group of upstream servers and how to talk to them."""

    name: str
    servers: tuple[Server, ...]
    balance: str = "round_robin"  # one of BALANCE_ALGORITHMS
    dynamic: bool = False  # weighted_round_robin: weights follow latency and errors
    hash_key: str = "client_ip"  # consistent_hash: header:NAME, cookie:NAME, query:NAME, client_ip, path
    balance_factor: float | None = None  # consistent_hash: bounded loads (e.g. 1.25)
    hash_fallback: str = "round_robin"  # consistent_hash: algorithm for requests without a key
    slow_start: float = 0.0  # seconds over which a joining/returning server ramps up its share
    on_all_unhealthy: str = "panic"  # "panic": use them all anyway; "reject": 503 + Retry-After
    connect_timeout: float = 5.0  # → 502
    response_timeout: float = 60.0  # time to the response head → 504; agents can be slow
    max_idle_per_server: int = 32  # kept-alive upstream connections per server
    idle_timeout: float = 60.0  # an idle upstream connection is closed after this
    health_check: HealthCheckConfig | None = None  # active checks; None: none
    outlier: OutlierConfig | None = None  # passive ejection; None: off
    circuit_breaker: BreakerConfig | None = None  # per server; None: off
    bulkhead: BulkheadConfig = BulkheadConfig()
    retry: RetryConfig = RetryConfig()


@dataclass(frozen=True, slots=True)
class AdaptiveLimitConfig:
    """An AIMD limit (``adaptive = {...}`` on a global or route limit) that follows a pool's
    health; see :class:`pyproxy.ratelimit.adaptive.AdaptiveLimit`. The rule's ``limit`` is where
    it starts (default ``max``)."""

    min: int
    max: int
    target_p99: float | None = None  # seconds; slower than this → decrease
    target_error_rate: float | None = None  # in (0, 1]; more errors than this → decrease
    decrease: float = 0.7  # × on an unhealthy interval, in (0, 1)
    increase: int = 1  # + on a healthy interval (the file's default: 5% of max, at least 1)
    interval: float = 1.0  # at most one adjustment per interval
    pool: str = ""  # whose health; a route's limits default to the route's pool


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """At most ``limit`` units of cost per sliding ``window`` seconds (one level's limit)."""

    limit: int
    window: float
    algorithm: Algorithm = "sliding_window_counter"
    adaptive: AdaptiveLimitConfig | None = None  # global and route limits only


@dataclass(frozen=True, slots=True)
class RouteRateLimit:
    """A route's rate limits (``ratelimit = {...}`` on a route, over ``[ratelimit.defaults]``).

    ``limits``: counted once for the whole route; ``key_limits``: counted per route and value of
    ``key`` (``header:NAME``, ``cookie:NAME``, ``query:NAME``, ``client_ip``, ``jwt`` or
    ``jwt:CLAIM``). A request without the key is counted by its client IP
    (``on_missing_key = "client_ip"``) or not at the key level (``"skip"``). ``cost``: units
    each request of the route takes from every limit that applies (global ones included).
    """

    cost: int = 1
    limits: tuple[RateLimitRule, ...] = ()
    key: str = "client_ip"
    key_limits: tuple[RateLimitRule, ...] = ()
    on_missing_key: str = "client_ip"  # one of MISSING_KEY_POLICIES


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """How ``jwt:CLAIM`` key sources verify bearer tokens (``[ratelimit.jwt]``, PyJWT).

    ``key`` holds the HMAC secret or the PEM public key (read from ``key_file`` when that is
    given); tokens must carry a valid signature by one of ``algorithms``, be within ``exp`` /
    ``nbf`` (± ``leeway``), and match ``audience`` (any of them) and ``issuer`` when set.
    Verified tokens are cached (``cache_size`` entries, at most ``cache_ttl`` and never past
    ``exp``).
    """

    key: str = field(default="", repr=False)
    key_file: str | None = None
    algorithms: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()  # empty: not checked
    issuer: str | None = None
    claim: str = "sub"  # what a bare "jwt" key source takes
    leeway: float = 0.0
    cache_size: int = 10_000  # 0: verify every request
    cache_ttl: float = 60.0


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """The top-level ``[ratelimit]`` table: where counters live and what applies to everything.

    ``mode``: ``local`` (this machine's workers share counters), ``redis`` (every instance shares
    them through Redis / Redis Cluster at ``redis_url``), ``hybrid`` (decided locally, reconciled
    with Redis every ``sync_interval``). ``on_redis_error``: what a request gets while Redis is
    unavailable (``local`` limits, ``deny`` → 503, ``allow``). ``global_limits`` (TOML
    ``[[ratelimit.global]]``) count every request of every route; ``defaults`` is what each route's
    own ``ratelimit`` table starts from; ``penalty`` puts key-level keys under the penalty box.
    """

    mode: str = "local"  # one of RATELIMIT_MODES
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    cluster: bool = False
    timeout: float = 0.05
    on_redis_error: str = "local"  # one of REDIS_ERROR_POLICIES
    sync_interval: float = 0.05  # hybrid only
    headers_on_allowed: bool = True  # RateLimit-Policy / RateLimit on allowed responses too
    trusted_proxies: tuple[str, ...] = ()  # networks ("10.0.0.0/8", "::1/128") whose XFF is believed
    algorithm: Algorithm = "sliding_window_counter"  # for limits that do not name their own
    jwt: JwtConfig | None = None
    penalty: Penalty | None = None
    global_limits: tuple[RateLimitRule, ...] = ()
    defaults: RouteRateLimit = RouteRateLimit()


CACHE_QUERY_MODES = ("keep", "sort", "drop")
CACHE_TIERS = ("memory", "redis", "sql")
COMPRESSION_CODECS = ("zstd", "lz4", "none")


@dataclass(frozen=True, slots=True)
class RouteCache:
    """A route's ``cache`` table (over ``[cache.defaults]``): whether and how its responses are
    cached. ``ttl``: freshness for responses that state none (never overrides ``no-store`` /
    ``private``); ``tiers``: which of the configured tiers keep its entries (empty: all)."""

    enabled: bool = False
    ttl: float | None = None
    tiers: tuple[str, ...] = ()
    max_object_size: int = 8 << 20
    cache_post: bool = False
    share_set_cookie: bool = False
    heuristic: bool = False
    query: str = "keep"  # one of CACHE_QUERY_MODES
    ignore_params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WarmingConfig:
    """``[cache.warming]`` (see ``pyproxy/cache/warming.py``)."""

    refresh_ahead: bool = True
    refresh_before: float = 0.1  # fraction of the lifetime left that triggers a refresh-ahead
    hot_hits: float = 3.0  # decayed hits that make an entry hot
    half_life: float = 60.0  # seconds for a hit count to halve
    predict: bool = False
    predict_threshold: float = 0.5
    predict_min_samples: int = 10
    max_fetches: int = 4  # background fetches at once (refresh-ahead, prefetch, stale-while-revalidate)
    max_fetch_rate: float = 20.0  # background fetches per second
    warm_file: str | None = None
    warm_keys: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.refresh_before < 1:
            raise ValueError("refresh_before: must be a fraction in (0, 1)")
        if self.hot_hits <= 0 or self.half_life <= 0 or self.max_fetch_rate <= 0:
            raise ValueError("hot_hits, half_life and max_fetch_rate must be > 0")
        if not 0 < self.predict_threshold <= 1:
            raise ValueError("predict_threshold: must be in (0, 1]")
        if self.max_fetches < 1 or self.predict_min_samples < 1 or self.warm_keys < 1:
            raise ValueError("max_fetches, predict_min_samples and warm_keys must be >= 1")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The top-level ``[cache]`` table: the tiers and what every route's ``cache`` starts from.

    L1 (memory, ``memory_size`` per worker) is always there; L2 when ``redis_url`` is set (Redis or,
    with ``cluster = true``, a Redis Cluster); L3 when ``sqlite_path`` or ``postgres_dsn`` is set.
    ``depends`` are ``{tag, on}`` pairs: purging ``on`` purges ``tag`` too.
    """

    memory_size: int = 256 << 20
    redis_url: str | None = field(default=None, repr=False)
    cluster: bool = False
    sqlite_path: str | None = None
    postgres_dsn: str | None = field(default=None, repr=False)
    timeout: float = 0.1
    compression: str = "zstd"  # one of COMPRESSION_CODECS
    compression_level: int | None = None
    compression_min_size: int = 1024
    coalesce_timeout: float = 10.0
    coalesce_max_waiters: int = 10_000
    depends: tuple[tuple[str, str], ...] = ()
    defaults: RouteCache = RouteCache()
    warming: WarmingConfig = WarmingConfig()


@dataclass(frozen=True, slots=True)
class Route:
    """Which requests go to which pool, with per-route overrides.

    ``host`` matches the request's Host (without port) exactly, or any subdomain with a leading
    ``*.``; ``None`` matches every host. ``path_prefix`` matches on whole segments' boundaries
    the way nginx's ``location /api/`` does: ``/api`` matches ``/api`` and ``/api/x``, not
    ``/apix``. ``methods`` is empty for any method. Routes are tried in file order.
    """

    name: str
    pool: str
    host: str | None = None
    path_prefix: str = "/"
    methods: frozenset[str] = frozenset()
    host_header: str | None = None  # replace Host towards the upstream; None passes it through
    response_timeout: float | None = None  # overrides the pool's
    max_body_size: int | None = None  # overrides limits.max_body_size
    idempotent: bool = False  # retries allowed for every method of this route (e.g. a pure POST API)
    # Hedging: no response head after this many seconds → a second copy goes to another server and
    # the first answer wins. "p95": the pool's recent 95th percentile. None: off. Idempotent,
    # body-less requests only; hedges count against the pool's retry budget.
    hedge_after: float | str | None = None
    # Rate limits of this route (its own ratelimit table over [ratelimit.defaults]); empty: none.
    ratelimit: RouteRateLimit = RouteRateLimit()
    # HTTP caching of this route's responses (its own cache table over [cache.defaults]).
    cache: RouteCache = RouteCache()


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration."""

    listeners: tuple[Listener, ...]
    pools: Mapping[str, Pool]
    routes: tuple[Route, ...]
    admin: AdminConfig = AdminConfig()
    limits: Limits = Limits()
    access_log: AccessLogConfig = AccessLogConfig()
    workers: int = 1
    ratelimit: RateLimitConfig = RateLimitConfig()
    cache: CacheConfig = CacheConfig()

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets replaced (for ``GET /config``):
        the admin token, the JWT key and the password in the Redis URL."""
        data: dict[str, Any] = _plain(asdict(self))
        if data["admin"]["token"] is not None:
            data["admin"]["token"] = "<redacted>"
        ratelimit = data["ratelimit"]
        ratelimit["global"] = ratelimit.pop("global_limits")  # as the file names it
        if ratelimit["redis_url"] is not None:
            ratelimit["redis_url"] = redact_url(ratelimit["redis_url"])
        if ratelimit["jwt"] is not None:
            ratelimit["jwt"]["key"] = "<redacted>"
        cache = data["cache"]
        if cache["redis_url"] is not None:
            cache["redis_url"] = redact_url(cache["redis_url"])
        if cache["postgres_dsn"] is not None:
            cache["postgres_dsn"] = redact_url(cache["postgres_dsn"])
        return data


_PASSWORD_PARAM = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with the password of its user info and any ``password=`` query value replaced
    (wholly replaced when it does not even split as a URL)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<redacted>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:<redacted>@{hostport}" if colon else netloc
    query = _PASSWORD_PARAM.sub(r"\1<redacted>", parts.query)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _plain(value: Any) -> Any:
    """``value`` as JSON data: sets → sorted lists, status ranges → ``"200-399"`` (inclusive, as
    the file writes them), bytes → text, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(_plain(v) for v in value)
    if isinstance(value, range):
        last = value.stop - 1
        return str(value.start) if last == value.start else f"{value.start}-{last}"
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


# ------------------------------------------------------------------------------- value parsers

_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class _Invalid(Exception):
    """A value's problem; the reader adds the key path."""


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``"250ms"``; must be finite and > 0."""
    seconds = _seconds(value)
    if seconds <= 0:
        raise _Invalid(f"must be a duration > 0, got {value!r}")
    return seconds


def _duration_or_zero(value: object) -> float:
    """A duration where 0 (or ``"0s"``) means "off" / "none"."""
    seconds = _seconds(value)
    if seconds < 0:
        raise _Invalid(f"must be a duration >= 0 (0: off), got {value!r}")
    return seconds


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise _Invalid(f"expected a duration (seconds or a string like '10s'), got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _QUANTITY.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _DURATION_UNITS:
            raise _Invalid(f"expected a duration like '250ms', '10s', '5m' or '1h', got {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    else:
        raise _Invalid(f"expected a duration (seconds or a string like '10s'), got {value!r}")
    if not math.isfinite(seconds):
        raise _Invalid(f"must be a finite duration, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like ``"16KiB"``; must be > 0."""
    if isinstance(value, bool):
        raise _Invalid(f"expected a size (bytes or a string like '16KiB'), got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _QUANTITY.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise _Invalid(f"expected a size like '512', '16KiB', '1MiB' or '10m', got {value!r}")
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise _Invalid(f"expected a size (bytes or a string like '16KiB'), got {value!r}")
    if size <= 0:
        raise _Invalid(f"must be a size > 0, got {value!r}")
    return size


def _int_between(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _number(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Callable[[object], float]:
    """A finite number in ``[low, high]``; ``low_open`` / ``high_open`` exclude that bound."""
    if math.isinf(high):
        interval = f"{'>' if low_open else '>='} {low:g}"
    else:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        interval = f"in {lo}{low:g}, {high:g}{hi}"

    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"expected a number {interval}, got {value!r}")
        x = float(value)
        below = x <= low if low_open else x < low
        above = x >= high if high_open else x > high
        if not math.isfinite(x) or below or above:
            raise _Invalid(f"must be {interval}, got {value!r}")
        return x

    return parse


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Invalid(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return parse


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a non-empty string, got {value!r}")
    return value


def _host(value: object) -> str:
    host = _text(value)
    if any(c.isspace() for c in host) or "/" in host:
        raise _Invalid(f"expected a host name or IP address, got {value!r}")
    return host.strip("[]")


_port = _int_between(1, 65535)
_listen_port = _int_between(0, 65535)  # 0: any free port (tests)


def parse_address(value: object) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host, port)."""
    text = _text(value)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:\s/\[\]]+):([0-9]+)", text)
    if not m:
        raise _Invalid(f"expected 'host:port' (or '[v6]:port'), got {value!r}")
    host = m.group(1) or m.group(3)
    return host, _port(int(m.group(2) or m.group(4)))


# ------------------------------------------------------------------------------------- reader


class _Reader:
    """Walks the parsed TOML, collecting problems instead of raising on the first one."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(Problem(path, reason))

    def table(self, value: object, path: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problem(path, f"expected a table, got {type(value).__name__}")
            return None
        return value

    def check_keys(self, table: Mapping[str, Any], path: str, known: set[str]) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known_list = ", ".join(sorted(known))
                self.problem(_join(path, key), f"unknown key{hint}; known keys: {known_list}")

    def get(
        self,
        table: Mapping[str, Any],
        path: str,
        key: str,
        parse: Callable[[object], T],
        default: T,
    ) -> T:
        if key not in table:
            return default
        try:
            return parse(table[key])
        except _Invalid as e:
            self.problem(_join(path, key), str(e))
            return default

    def require(
        self, table: Mapping[str, Any], path: str, key: str, parse: Callable[[object], T]
    ) -> T | None:
        if key not in table:
            self.problem(_join(path, key), "is required")
            return None
        try:
            return parse(table[key])
        except _Invalid as e:
            self.problem(_join(path, key), str(e))
            return None

    def items(
        self,
        table: Mapping[str, Any],
        path: str,
        key: str,
        parse: Callable[[object], T],
        default: tuple[T, ...],
        *,
        allow_empty: bool = True,
    ) -> tuple[T, ...]:
        """An array whose every item is parsed; a bad item is reported as ``key[i]``."""
        if key not in table:
            return default
        raw = table[key]
        if not isinstance(raw, list) or (not raw and not allow_empty):
            what = "an array" if allow_empty else "a non-empty array"
            self.problem(_join(path, key), f"expected {what}, got {raw!r}")
            return default
        out, ok = [], True
        for i, item in enumerate(raw):
            try:
                out.append(parse(item))
            except _Invalid as e:
                self.problem(f"{_join(path, key)}[{i}]", str(e))
                ok = False
        return tuple(out) if ok else default

    def build(self, path: str, make: Callable[[], T]) -> T | None:
        """``make()``, with a ``ValueError("field: reason")`` from a dataclass's own validation
        reported as a problem at ``path.field`` instead of escaping."""
        try:
            return make()
        except ValueError as e:
            name, sep, reason = str(e).partition(": ")
            if sep and name.isidentifier():
                self.problem(_join(path, name), reason)
            else:
                self.problem(path, str(e))
            return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _field_names(cls: type) -> set[str]:
    return {f for f in cls.__dataclass_fields__ if f != "name"}  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------- sections


def _read_listeners(r: _Reader, raw: object) -> tuple[Listener, ...]:
    if raw is None:
        return (Listener(),)
    if not isinstance(raw, list) or not raw:
        r.problem("listeners", "expected a non-empty array of tables ([[listeners]])")
        return (Listener(),)
    out = []
    seen: dict[tuple[str, int], int] = {}
    for i, item in enumerate(raw):
        path = f"listeners[{i}]"
        t = r.table(item, path)
        if t is None:
            continue
        r.check_keys(t, path, {"host", "port"})
        listener = Listener(
            host=r.get(t, path, "host", _host, "127.0.0.1"),
            port=r.get(t, path, "port", _listen_port, 8080),
        )
        key = (listener.host, listener.port)
        if listener.port and key in seen:
            r.problem(path, f"same host and port as listeners[{seen[key]}]")
        seen[key] = i
        out.append(listener)
    return tuple(out) or (Listener(),)


def _read_admin(r: _Reader, raw: object) -> AdminConfig:
    if raw is None:
        return AdminConfig()
    t = r.table(raw, "admin")
    if t is None:
        return AdminConfig()
    r.check_keys(t, "admin", {"enabled", "host", "port", "token"})
    return AdminConfig(
        enabled=r.get(t, "admin", "enabled", _bool, True),
        host=r.get(t, "admin", "host", _host, "127.0.0.1"),
        port=r.get(t, "admin", "port", _listen_port, 9901),
        token=r.get(t, "admin", "token", _text, None),
    )


def _read_access_log(r: _Reader, raw: object) -> AccessLogConfig:
    if raw is None:
        return AccessLogConfig()
    t = r.table(raw, "access_log")
    if t is None:
        return AccessLogConfig()
    d = AccessLogConfig()
    r.check_keys(t, "access_log", _field_names(AccessLogConfig))
    return AccessLogConfig(
        enabled=r.get(t, "access_log", "enabled", _bool, d.enabled),
        path=r.get(t, "access_log", "path", _text, d.path),
        flush_interval=r.get(t, "access_log", "flush_interval", parse_duration, d.flush_interval),
        buffer_lines=r.get(t, "access_log", "buffer_lines", _int_between(1, 1_000_000), d.buffer_lines),
    )


def _read_limits(r: _Reader, raw: object) -> Limits:
    if raw is None:
        return Limits()
    t = r.table(raw, "limits")
    if t is None:
        return Limits()
    d = Limits()
    r.check_keys(t, "limits", _field_names(Limits))
    return Limits(
        max_head_size=r.get(t, "limits", "max_head_size", parse_size, d.max_head_size),
        max_header_count=r.get(
            t, "limits", "max_header_count", _int_between(1, 10_000), d.max_header_count
        ),
        max_body_size=r.get(t, "limits", "max_body_size", parse_size, d.max_body_size),
        head_timeout=r.get(t, "limits", "head_timeout", parse_duration, d.head_timeout),
        body_timeout=r.get(t, "limits", "body_timeout", parse_duration, d.body_timeout),
        keepalive_timeout=r.get(
            t, "limits", "keepalive_timeout", parse_duration, d.keepalive_timeout
        ),
        send_timeout=r.get(t, "limits", "send_timeout", parse_duration, d.send_timeout),
        max_connections=r.get(
            t, "limits", "max_connections", _int_between(1, 10_000_000), d.max_connections
        ),
        drain_timeout=r.get(t, "limits", "drain_timeout", parse_duration, d.drain_timeout),
    )


def _read_server(r: _Reader, raw: object, path: str) -> Server | None:
    if isinstance(raw, str):
        try:
            host, port = parse_address(raw)
        except _Invalid as e:
            r.problem(path, str(e))
            return None
        return Server(host, port)
    t = r.table(raw, path)
    if t is None:
        return None
    r.check_keys(t, path, {"address", "weight"})
    address = r.require(t, path, "address", parse_address)
    weight = r.get(t, path, "weight", _int_between(1, 1_000_000), 1)
    return Server(address[0], address[1], weight) if address else None


# ---------------------------------------------------------- balancing, health and resilience

_HASH_KEY_FORMS = "'header:NAME', 'cookie:NAME', 'query:NAME', 'client_ip' or 'path'"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: header and cookie names
_STATUS_RANGE = re.compile(r"\s*([0-9]{3})\s*(?:-\s*([0-9]{3})\s*)?")


def _hash_key(value: object) -> str:
    """``header:NAME``, ``cookie:NAME``, ``query:NAME``, ``client_ip`` or ``path``."""
    key = _text(value)
    if key in ("client_ip", "path"):
        return key
    kind, sep, name = key.partition(":")
    if not sep or kind not in ("header", "cookie", "query"):
        raise _Invalid(f"expected {_HASH_KEY_FORMS}, got {value!r}")
    if kind != "query" and not _TOKEN.fullmatch(name):
        raise _Invalid(
            f"{name!r} is not a valid {kind} name (letters, digits and !#$%&'*+-.^_`|~), "
            f"in {value!r}"
        )
    if kind == "query" and (
        not name or not _printable(name) or any(c in name for c in "=&#?")
    ):
        raise _Invalid(
            f"{name!r} is not a query parameter name (visible ASCII without = & # ?), in {value!r}"
        )
    return key


def _printable(text: str) -> bool:
    return text.isascii() and all(0x21 <= ord(c) <= 0x7E for c in text)


def _hash_fallback(value: object) -> str:
    if value == "consistent_hash":
        raise _Invalid("cannot be consistent_hash: it serves the requests that have no hash key")
    options = tuple(a for a in BALANCE_ALGORITHMS if a != "consistent_hash")
    return _choice(options)(value)


def _status_range(value: object) -> range:
    """A status code (``200``, ``"200"``) or an inclusive range (``"200-299"``) → a half-open
    ``range`` (``range(200, 300)``), as :class:`HealthCheckConfig` takes them."""
    m = _STATUS_RANGE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif m:
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    else:
        raise _Invalid(
            f"expected a status code (200) or an inclusive range ('200-299'), got {value!r}"
        )
    if not 100 <= low <= high <= 599:
        raise _Invalid(f"must be status codes within 100-599, lowest first, got {value!r}")
    return range(low, high + 1)


def _retry_status(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected a status code (an integer), got {value!r}")
    if not 500 <= value <= 599:
        raise _Invalid(f"must be a 5xx status (500-599), only server errors are retried: {value}")
    return value


def _check_method(value: object) -> str:
    method = _text(value).upper()
    if method not in HTTP_METHODS or method == "CONNECT":
        raise _Invalid(f"expected an HTTP method such as GET, HEAD or OPTIONS, got {value!r}")
    return method


def _check_path(value: object) -> str:
    path = _path_prefix(value)
    if not _printable(path):
        raise _Invalid(f"must be visible ASCII only (percent-encode the rest), got {value!r}")
    return path


def _check_host_header(value: object) -> str:
    host = _text(value)
    if not _printable(host):
        raise _Invalid(f"must be visible ASCII only, got {value!r}")
    return host


def _check_buffer(value: object) -> int:
    size = parse_size(value)
    if size < 1024:
        raise _Invalid(f"must be at least 1024 bytes (1KiB), got {value!r}")
    return size


def _read_health_check(r: _Reader, raw: object, path: str) -> HealthCheckConfig | None:
    t = r.table(raw, path)
    if t is None:
        return None
    r.check_keys(t, path, set(HealthCheckConfig.__dataclass_fields__))
    d = HealthCheckConfig()
    before = len(r.problems)
    method = r.get(t, path, "method", _check_method, d.method)
    check_path = r.get(t, path, "path", _check_path, d.path)
    statuses = r.items(
        t, path, "expected_statuses", _status_range, d.expected_statuses, allow_empty=False
    )
    body = r.get(t, path, "body_contains", _text, None)
    interval = r.get(t, path, "interval", parse_duration, d.interval)
    timeout = r.get(t, path, "timeout", parse_duration, d.timeout)
    rise = r.get(t, path, "rise", _int_between(1, 1000), d.rise)
    fall = r.get(t, path, "fall", _int_between(1, 1000), d.fall)
    jitter = r.get(t, path, "jitter", _number(0.0, 1.0, high_open=True), d.jitter)
    host_header = r.get(t, path, "host_header", _check_host_header, d.host_header)
    initial_healthy = r.get(t, path, "initial_healthy", _bool, d.initial_healthy)
    max_bytes = r.get(t, path, "max_response_bytes", _check_buffer, d.max_response_bytes)
    if len(r.problems) > before:
        return None  # cross-field checks on defaults would only add noise
    if timeout >= interval:
        r.problem(
            _join(path, "timeout"),
            f"must be shorter than interval ({timeout:g}s >= {interval:g}s): "
            "checks would run back to back",
        )
        return None
    return r.build(
        path,
        lambda: HealthCheckConfig(
            method=method,
            path=check_path,
            expected_statuses=statuses,
            body_contains=None if body is None else body.encode(),
            interval=interval,
            timeout=timeout,
            rise=rise,
            fall=fall,
            jitter=jitter,
            host_header=host_header,
            initial_healthy=initial_healthy,
            max_response_bytes=max_bytes,
        ),
    )


def _read_outlier(r: _Reader, raw: object, path: str) -> OutlierConfig | None:
    t = r.table(raw, path)
    if t is None:
        return None
    r.check_keys(t, path, set(OutlierConfig.__dataclass_fields__))
    d = OutlierConfig()
    before = len(r.problems)
    count = _int_between(0, 1_000_000)
    consecutive = r.get(t, path, "consecutive_failures", count, d.consecutive_failures)
    connect = r.get(
        t, path, "consecutive_connect_failures", count, d.consecutive_connect_failures
    )
    rate = r.get(t, path, "error_rate_threshold", _number(0.0, 1.0), d.error_rate_threshold)
    window = r.get(t, path, "window", parse_duration, d.window)
    min_requests = r.get(t, path, "min_requests", _int_between(1, 1_000_000), d.min_requests)
    base = r.get(t, path, "base_ejection_time", parse_duration, d.base_ejection_time)
    cap = r.get(t, path, "max_ejection_time", parse_duration, d.max_ejection_time)
    percent = r.get(t, path, "max_ejection_percent", _int_between(0, 100), d.max_ejection_percent)
    if len(r.problems) > before:
        return None
    off = "; remove the table to turn passive ejection off"
    if not (consecutive or connect or rate):
        r.problem(
            path,
            "every detector is off (consecutive_failures, consecutive_connect_failures and "
            f"error_rate_threshold are 0){off}",
        )
    if percent == 0:
        r.problem(_join(path, "max_ejection_percent"), f"0 would never eject a server{off}")
    if cap < base:
        r.problem(
            _join(path, "max_ejection_time"),
            f"must be >= base_ejection_time ({cap:g}s < {base:g}s)",
        )
    if connect and consecutive and connect >= consecutive:
        r.problem(
            _join(path, "consecutive_connect_failures"),
            f"must be below consecutive_failures ({consecutive}) to have any effect: connect "
            "failures count toward consecutive_failures too",
        )
    if len(r.problems) > before:
        return None
    return r.build(
        path,
        lambda: OutlierConfig(
            consecutive_failures=consecutive,
            consecutive_connect_failures=connect,
            error_rate_threshold=rate,
            window=window,
            min_requests=min_requests,
            base_ejection_time=base,
            max_ejection_time=cap,
            max_ejection_percent=percent,
        ),
    )


def _read_breaker(r: _Reader, raw: object, path: str) -> BreakerConfig | None:
    t = r.table(raw, path)
    if t is None:
        return None
    r.check_keys(t, path, _field_names(BreakerConfig))
    d = BreakerConfig()
    before = len(r.problems)
    consecutive = r.get(
        t, path, "consecutive_failures", _int_between(0, 1_000_000), d.consecutive_failures
    )
    ratio = r.get(t, path, "failure_ratio", _number(0.0, 1.0), d.failure_ratio)
    window = r.get(t, path, "window", parse_duration, d.window)
    min_requests = r.get(t, path, "min_requests", _int_between(1, 1_000_000), d.min_requests)
    base = r.get(t, path, "base_open_time", parse_duration, d.base_open_time)
    cap = r.get(t, path, "max_open_time", parse_duration, d.max_open_time)
    jitter = r.get(t, path, "jitter", _number(0.0, 1.0, high_open=True), d.jitter)
    successes = r.get(t, path, "success_threshold", _int_between(1, 1_000_000), d.success_threshold)
    probes = r.get(
        t, path, "half_open_max_probes", _int_between(1, 1_000_000), d.half_open_max_probes
    )
    if len(r.problems) > before:
        return None
    if not consecutive and not ratio:
        r.problem(
            path,
            "both trip rules are off (consecutive_failures = 0 and failure_ratio = 0), so the "
            "breaker could never open; remove the table to turn circuit breakers off",
        )
    if cap < base:
        r.problem(
            _join(path, "max_open_time"), f"must be >= base_open_time ({cap:g}s < {base:g}s)"
        )
    if len(r.problems) > before:
        return None
    return BreakerConfig(
        consecutive_failures=consecutive or None,  # 0: that trip rule is off
        failure_ratio=ratio or None,
        window=window,
        min_requests=min_requests,
        base_open_time=base,
        max_open_time=cap,
        jitter=jitter,
        success_threshold=successes,
        half_open_max_probes=probes,
    )


def _read_bulkhead(r: _Reader, raw: object, path: str) -> BulkheadConfig:
    d = BulkheadConfig()
    t = r.table(raw, path)
    if t is None:
        return d
    r.check_keys(t, path, _field_names(BulkheadConfig))
    count = _int_between(0, 10_000_000)
    bulkhead = BulkheadConfig(
        max_concurrent=r.get(t, path, "max_concurrent", count, d.max_concurrent),
        max_queue=r.get(t, path, "max_queue", count, d.max_queue),
        queue_timeout=r.get(t, path, "queue_timeout", parse_duration, d.queue_timeout),
        max_concurrent_per_server=r.get(
            t, path, "max_concurrent_per_server", count, d.max_concurrent_per_server
        ),
    )
    if bulkhead.max_queue and not bulkhead.max_concurrent:
        r.problem(
            _join(path, "max_queue"),
            "needs max_concurrent > 0: requests wait only for a full pool, and 0 is unlimited",
        )
    return bulkhead


def _read_retry(r: _Reader, raw: object, path: str) -> RetryConfig:
    d = RetryConfig()
    t = r.table(raw, path)
    if t is None:
        return d
    r.check_keys(t, path, _field_names(RetryConfig))
    before = len(r.problems)
    base = r.get(t, path, "backoff_base", _duration_or_zero, d.backoff_base)
    cap = r.get(t, path, "backoff_max", _duration_or_zero, d.backoff_max)
    if len(r.problems) == before and cap < base:
        r.problem(_join(path, "backoff_max"), f"must be >= backoff_base ({cap:g}s < {base:g}s)")
    return RetryConfig(
        attempts=r.get(t, path, "attempts", _int_between(0, 10), d.attempts),
        on_statuses=frozenset(
            r.items(t, path, "on_statuses", _retry_status, tuple(sorted(d.on_statuses)))
        ),
        budget_percent=r.get(
            t, path, "budget_percent", _number(0.0, 100.0, low_open=True), d.budget_percent
        ),
        min_retries_per_window=r.get(
            t, path, "min_retries_per_window", _int_between(0, 1_000_000), d.min_retries_per_window
        ),
        budget_window=r.get(t, path, "budget_window", parse_duration, d.budget_window),
        backoff_base=base,
        backoff_max=cap,
    )


_WEIGHTED = ("random", "weighted_round_robin", "least_connections")  # what slow start scales


def _check_balance_options(
    r: _Reader, p: Mapping[str, Any], path: str, pool: Pool, reported: set[str]
) -> None:
    """Options that belong to another algorithm, or that cannot work together (``reported``:
    key paths that already have a problem)."""
    algorithm = pool.balance
    if reported & {_join(path, "balance"), _join(path, "balance_factor")}:
        return  # they fell back to their defaults: checking against those would only confuse
    p = {k: v for k, v in p.items() if _join(path, k) not in reported}
    if "dynamic" in p and algorithm != "weighted_round_robin":
        r.problem(
            _join(path, "dynamic"),
            f"only applies to balance = 'weighted_round_robin' (this pool's is {algorithm!r})",
        )
    for key in ("hash_key", "balance_factor", "hash_fallback"):
        if key in p and algorithm != "consistent_hash":
            r.problem(
                _join(path, key),
                f"only applies to balance = 'consistent_hash' (this pool's is {algorithm!r})",
            )
    if pool.slow_start and algorithm == "round_robin":
        r.problem(
            _join(path, "slow_start"),
            "has no effect with balance = 'round_robin', which ignores weights; use one of "
            f"{', '.join(_WEIGHTED)} (or consistent_hash with balance_factor)",
        )
    if pool.slow_start and algorithm == "consistent_hash" and pool.balance_factor is None:
        r.problem(
            _join(path, "slow_start"),
            "with balance = 'consistent_hash' needs balance_factor: slow start scales the "
            "bounded-load capacity (keys never move)",
        )


def _read_pools(r: _Reader, raw: object) -> dict[str, Pool]:
    if raw is None:
        r.problem("pools", "is required: at least one pool of upstream servers")
        return {}
    t = r.table(raw, "pools")
    if t is None:
        return {}
    if not t:
        r.problem("pools", "is empty: define at least one pool")
    pools = {}
    d = Pool("", ())
    known = _field_names(Pool)
    for name, item in t.items():
        path = f"pools.{name}"
        p = r.table(item, path)
        if p is None:
            continue
        r.check_keys(p, path, known)
        servers: list[Server] = []
        raw_servers = p.get("servers")
        if not isinstance(raw_servers, list) or not raw_servers:
            r.problem(_join(path, "servers"), "expected a non-empty array of servers")
        else:
            seen: dict[str, int] = {}
            for i, s in enumerate(raw_servers):
                server = _read_server(r, s, f"{path}.servers[{i}]")
                if server is None:
                    continue
                if server.address in seen:
                    r.problem(f"{path}.servers[{i}]", f"duplicate of servers[{seen[server.address]}]")
                seen[server.address] = i
                servers.append(server)

        def section(key: str, read: Callable[[_Reader, object, str], T], default: T) -> T:
            return read(r, p[key], _join(path, key)) if key in p else default

        before = len(r.problems)
        pool = Pool(
            name=name,
            servers=tuple(servers),
            balance=r.get(p, path, "balance", _choice(BALANCE_ALGORITHMS), d.balance),
            dynamic=r.get(p, path, "dynamic", _bool, d.dynamic),
            hash_key=r.get(p, path, "hash_key", _hash_key, d.hash_key),
            balance_factor=r.get(
                p, path, "balance_factor", _number(1.0, math.inf, low_open=True), d.balance_factor
            ),
            hash_fallback=r.get(p, path, "hash_fallback", _hash_fallback, d.hash_fallback),
            slow_start=r.get(p, path, "slow_start", _duration_or_zero, d.slow_start),
            on_all_unhealthy=r.get(
                p, path, "on_all_unhealthy", _choice(ALL_UNHEALTHY_MODES), d.on_all_unhealthy
            ),
            connect_timeout=r.get(p, path, "connect_timeout", parse_duration, d.connect_timeout),
            response_timeout=r.get(
                p, path, "response_timeout", parse_duration, d.response_timeout
            ),
            max_idle_per_server=r.get(
                p, path, "max_idle_per_server", _int_between(0, 100_000), d.max_idle_per_server
            ),
            idle_timeout=r.get(p, path, "idle_timeout", parse_duration, d.idle_timeout),
            health_check=section("health_check", _read_health_check, d.health_check),
            outlier=section("outlier", _read_outlier, d.outlier),
            circuit_breaker=section("circuit_breaker", _read_breaker, d.circuit_breaker),
            bulkhead=section("bulkhead", _read_bulkhead, d.bulkhead),
            retry=section("retry", _read_retry, d.retry),
        )
        _check_balance_options(r, p, path, pool, {q.path for q in r.problems[before:]})
        pools[name] = pool
    return pools


def _route_host(value: object) -> str:
    host = _text(value).lower()
    bare = host[2:] if host.startswith("*.") else host
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", bare):
        raise _Invalid(f"expected a host name, optionally starting with '*.', got {value!r}")
    return host


def _path_prefix(value: object) -> str:
    prefix = _text(value)
    if not prefix.startswith("/"):
        raise _Invalid(f"must start with '/', got {value!r}")
    return prefix


def _methods(value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise _Invalid(f"expected an array of method names, got {value!r}")
    unknown = [m for m in value if m.upper() not in HTTP_METHODS]
    if unknown:
        raise _Invalid(f"unknown HTTP method(s) {unknown}; known: {', '.join(sorted(HTTP_METHODS))}")
    return frozenset(m.upper() for m in value)


def _read_routes(
    r: _Reader,
    raw: object,
    pools: Mapping[str, Pool],
    ratelimit: _RateLimitContext,
    cache: CacheConfig,
) -> tuple[Route, ...]:
    if raw is None:
        r.problem("routes", "is required: at least one [[routes]] entry")
        return ()
    if not isinstance(raw, list) or not raw:
        r.problem("routes", "expected a non-empty array of tables ([[routes]])")
        return ()
    routes = []
    names: dict[str, int] = {}
    known = _field_names(Route) | {"name"}
    for i, item in enumerate(raw):
        path = f"routes[{i}]"
        t = r.table(item, path)
        if t is None:
            continue
        r.check_keys(t, path, known)
        name = r.get(t, path, "name", _text, f"route-{i}")
        if name in names:
            r.problem(_join(path, "name"), f"duplicate of routes[{names[name]}].name")
        names[name] = i
        pool = r.require(t, path, "pool", _text)
        if pool is not None and pools and pool not in pools:
            close = difflib.get_close_matches(pool, sorted(pools), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            r.problem(_join(path, "pool"), f"no pool named {pool!r}{hint}")
        own = _RouteLimitsRead()
        if "ratelimit" in t:
            own = _read_route_limits(
                r, t["ratelimit"], _join(path, "ratelimit"), pools,
                algorithm=ratelimit.config.algorithm, jwt_present=ratelimit.jwt_present,
            )
        routes.append(
            Route(
                name=name,
                pool=pool or "",
                host=r.get(t, path, "host", _route_host, None),
                path_prefix=r.get(t, path, "path_prefix", _path_prefix, "/"),
                methods=r.get(t, path, "methods", _methods, frozenset()),
                host_header=r.get(t, path, "host_header", _host, None),
                response_timeout=r.get(t, path, "response_timeout", parse_duration, None),
                max_body_size=r.get(t, path, "max_body_size", parse_size, None),
                idempotent=r.get(t, path, "idempotent", _bool, False),
                hedge_after=r.get(t, path, "hedge_after", _hedge_after, None),
                ratelimit=_route_rate_limit(r, own, ratelimit, pool or ""),
                cache=_read_route_cache(r, t.get("cache"), _join(path, "cache"), cache.defaults, cache),
            )
        )
    if not any(route.ratelimit.key_limits for route in routes):
        for key in ("key", "on_missing_key"):
            if key in ratelimit.defaults.paths:
                r.problem(ratelimit.defaults.paths[key], "has no effect: no route has key_limits")
    return tuple(routes)


def _hedge_after(value: object) -> float | str:
    if value == "p95":
        return "p95"
    try:
        seconds = parse_duration(value)
    except _Invalid as e:
        raise _Invalid(f'expected a duration (e.g. "50ms") or "p95": {e}') from None
    if seconds <= 0:
        raise _Invalid(f"must be > 0, got {value!r}")
    return seconds


# -------------------------------------------------------------------------------- rate limits

_KEY_SOURCE_FORMS = "'header:NAME', 'cookie:NAME', 'query:NAME', 'client_ip', 'jwt' or 'jwt:CLAIM'"
_MAX_RATE = 2**32 - 1  # the shared-memory counters' ceiling (core_rs SharedWindows)
_MAX_WINDOW = 366 * 86400.0
_RULE_KEYS = {"limit", "window", "algorithm", "adaptive"}
_ADAPTIVE_KEYS = set(AdaptiveLimitConfig.__dataclass_fields__)
_ROUTE_RATELIMIT_KEYS = set(RouteRateLimit.__dataclass_fields__)
_RATELIMIT_KEYS = (set(RateLimitConfig.__dataclass_fields__) - {"global_limits"}) | {"global"}
_REDIS_OPTIONS = ("redis_url", "cluster", "timeout", "on_redis_error")
_PENALTY_DEFAULTS = Penalty(max_violations=10, violation_window=60.0, block_for=60.0, block_max=3600.0)

_rate = _int_between(1, _MAX_RATE)


def _key_source(value: object) -> str:
    """A rate-limit key source: ``header:NAME``, ``cookie:NAME``, ``query:NAME``, ``client_ip``,
    ``jwt`` (the claim named by ``[ratelimit.jwt] claim``) or ``jwt:CLAIM``."""
    key = _text(value)
    if key in ("client_ip", "jwt"):
        return key
    kind, sep, name = key.partition(":")
    if not sep or kind not in ("header", "cookie", "query", "jwt"):
        raise _Invalid(f"unknown key source; expected {_KEY_SOURCE_FORMS}, got {value!r}")
    if kind == "jwt":
        if not name or not _printable(name):
            raise _Invalid(f"{name!r} is not a claim name (visible ASCII), in {value!r}")
        return key
    return _hash_key(key)  # the same names as consistent_hash keys


def _window(value: object) -> float:
    seconds = parse_duration(value)
    if not 0.001 <= seconds <= _MAX_WINDOW:
        raise _Invalid(f"must be between 1ms and 366 days, got {value!r}")
    return seconds


def _long_duration(value: object) -> float:
    seconds = parse_duration(value)
    if not 0.001 <= seconds <= 1e9:
        raise _Invalid(f"must be between 1ms and 1e9 seconds, got {value!r}")
    return seconds


def _redis_url(value: object) -> str:
    url = _text(value)
    shown = redact_url(url)  # problems are printed: never with the password
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _Invalid(f"not a valid URL ({e}): {shown!r}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise _Invalid(f"expected a redis://, rediss:// or unix:// URL, got {shown!r}")
    if parts.scheme == "unix":
        if not parts.path:
            raise _Invalid(f"a unix:// URL needs the socket's path, got {shown!r}")
        return url
    if not parts.hostname:
        raise _Invalid(f"needs a host (redis://host:6379/0), got {shown!r}")
    if port == 0:
        raise _Invalid(f"port must be between 1 and 65535, in {shown!r}")
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise _Invalid(f"the path must be a database number (redis://host:6379/0), got {shown!r}")
    return url


def _redis_db(url: str) -> int:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return 0
    db = parts.path.strip("/")
    for k, v in urllib.parse.parse_qsl(parts.query):
        if k == "db" and v.isdigit():
            db = v
    return int(db) if db.isdigit() else 0


def _network(value: object) -> str:
    """An IP address or CIDR network, normalized (``"10.0.0.0/8"``, ``"::1/128"``)."""
    text = _text(value).strip()
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _Invalid(
            f"expected an IP address or a CIDR network ('10.0.0.0/8', '::1'), got {value!r}"
        ) from None
    raise _Invalid(f"{value!r} has host bits set; did you mean {str(loose)!r}?")


def _audience(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_text(value),)
    if isinstance(value, list) and value and all(isinstance(a, str) and a for a in value):
        return tuple(value)
    raise _Invalid(f"expected a string or a non-empty array of strings, got {value!r}")


def _claim(value: object) -> str:
    claim = _text(value)
    if not _printable(claim):
        raise _Invalid(f"expected a claim name (visible ASCII), got {value!r}")
    return claim


def _pool_ref(r: _Reader, t: Mapping[str, Any], path: str, pools: Mapping[str, Pool]) -> str:
    pool = r.get(t, path, "pool", _text, "")
    if pool and pools and pool not in pools:
        close = difflib.get_close_matches(pool, sorted(pools), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        r.problem(_join(path, "pool"), f"no pool named {pool!r}{hint}")
    return pool


def _read_adaptive(
    r: _Reader, raw: object, path: str, pools: Mapping[str, Pool], *, pool_required: bool
) -> AdaptiveLimitConfig | None:
    t = r.table(raw, path)
    if t is None:
        return None
    r.check_keys(t, path, _ADAPTIVE_KEYS)
    before = len(r.problems)
    low = r.require(t, path, "min", _rate)
    high = r.require(t, path, "max", _rate)
    p99 = r.get(t, path, "target_p99", parse_duration, None)
    error_rate = r.get(t, path, "target_error_rate", _number(0.0, 1.0, low_open=True), None)
    decrease = r.get(t, path, "decrease", _number(0.0, 1.0, low_open=True, high_open=True), 0.7)
    increase = r.get(t, path, "increase", _rate, None)
    interval = r.get(t, path, "interval", parse_duration, 1.0)
    pool = _pool_ref(r, t, path, pools)
    if pool_required and "pool" not in t:
        r.problem(_join(path, "pool"), "is required: the pool whose health a global limit follows")
    if "target_p99" not in t and "target_error_rate" not in t:
        r.problem(path, "needs target_p99 and/or target_error_rate: the health it follows")
    if len(r.problems) > before or low is None or high is None:
        return None
    if high < low:
        r.problem(_join(path, "max"), f"must be >= min ({high} < {low})")
        return None
    return AdaptiveLimitConfig(
        min=low,
        max=high,
        target_p99=p99,
        target_error_rate=error_rate,
        decrease=decrease,
        increase=increase if increase is not None else max(1, high // 20),
        interval=interval,
        pool=pool,
    )


def _read_rule(
    r: _Reader,
    raw: object,
    path: str,
    pools: Mapping[str, Pool],
    *,
    algorithm: Algorithm,
    level: str,
) -> RateLimitRule | None:
    """One ``{limit = 20, window = "1s"}``; ``level``: "global", "route" or "key" (what may
    adapt, and whether an adaptive limit must name its pool)."""
    t = r.table(raw, path)
    if t is None:
        return None
    r.check_keys(t, path, _RULE_KEYS)
    before = len(r.problems)
    window = r.require(t, path, "window", _window)
    algo: Algorithm = r.get(t, path, "algorithm", _algorithm, algorithm)
    adaptive = None
    if "adaptive" in t:
        if level == "key":
            r.problem(
                _join(path, "adaptive"),
                "only global and route limits adapt to a pool's health (key limits are per client)",
            )
        else:
            adaptive = _read_adaptive(
                r, t["adaptive"], _join(path, "adaptive"), pools, pool_required=level == "global"
            )
    if adaptive is None and ("adaptive" not in t or level == "key"):
        limit = r.require(t, path, "limit", _rate)
    elif adaptive is None:  # a bad adaptive table: its problems say enough
        limit = r.get(t, path, "limit", _rate, None)
    else:
        limit = r.get(t, path, "limit", _rate, adaptive.max)
        if not adaptive.min <= limit <= adaptive.max:
            r.problem(
                _join(path, "limit"),
                f"an adaptive limit starts within [min, max] = [{adaptive.min}, {adaptive.max}], "
                f"got {limit}",
            )
    if len(r.problems) > before or window is None or limit is None:
        return None
    return RateLimitRule(limit=limit, window=window, algorithm=algo, adaptive=adaptive)


_algorithm = cast(Callable[[object], Algorithm], _choice(RATELIMIT_ALGORITHMS))


def _read_rules(
    r: _Reader,
    t: Mapping[str, Any],
    path: str,
    key: str,
    pools: Mapping[str, Pool],
    *,
    algorithm: Algorithm,
    level: str,
) -> tuple[tuple[RateLimitRule, ...], list[str]] | None:
    """An array of limits (``None`` if any is bad), and each one's key path."""
    raw = t[key]
    where = _join(path, key)
    if not isinstance(raw, list):
        r.problem(
            where, f'expected an array of limits like [{{limit = 20, window = "1s"}}], got {raw!r}'
        )
        return None
    rules: list[RateLimitRule] = []
    paths: list[str] = []
    windows: dict[float, int] = {}
    ok = True
    for i, item in enumerate(raw):
        item_path = f"{where}[{i}]"
        rule = _read_rule(r, item, item_path, pools, algorithm=algorithm, level=level)
        if rule is None:
            ok = False
            continue
        if rule.window in windows:
            r.problem(
                _join(item_path, "window"),
                f"same window as {where}[{windows[rule.window]}]: keep one limit per window "
                "(the tighter one decides anyway)",
            )
            ok = False
        windows.setdefault(rule.window, i)
        rules.append(rule)
        paths.append(item_path)
    return (tuple(rules), paths) if ok else None


@dataclass(slots=True)
class _RouteLimitsRead:
    """A route-level ratelimit table as read: the keys it set (valid ones), with their paths."""

    values: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    rule_paths: dict[str, list[str]] = field(default_factory=dict)


@dataclass(slots=True)
class _RateLimitContext:
    """What routes need from ``[ratelimit]`` to read and check their own ``ratelimit``."""

    config: RateLimitConfig
    jwt_present: bool  # [ratelimit.jwt] was written (even if it has problems)
    defaults: _RouteLimitsRead
    global_paths: list[str]
    reported: set[tuple[str, str]] = field(default_factory=set)

    def problem(self, r: _Reader, path: str, reason: str) -> None:
        """A problem found through a route that may come from the shared defaults: once."""
        if (path, reason) not in self.reported:
            self.reported.add((path, reason))
            r.problem(path, reason)


def _read_route_limits(
    r: _Reader,
    raw: object,
    path: str,
    pools: Mapping[str, Pool],
    *,
    algorithm: Algorithm,
    jwt_present: bool,
) -> _RouteLimitsRead:
    read = _RouteLimitsRead()
    t = r.table(raw, path)
    if t is None:
        return read
    r.check_keys(t, path, _ROUTE_RATELIMIT_KEYS)
    parsers: dict[str, Callable[[object], Any]] = {
        "cost": _int_between(0, 2**31),
        "key": _key_source,
        "on_missing_key": _choice(MISSING_KEY_POLICIES),
    }
    for key, parse in parsers.items():
        if key not in t:
            continue
        before = len(r.problems)
        value = r.get(t, path, key, parse, None)
        if len(r.problems) == before:
            read.values[key] = value
            read.paths[key] = _join(path, key)
    key_source = read.values.get("key")
    if isinstance(key_source, str) and key_source.startswith("jwt") and not jwt_present:
        r.problem(
            _join(path, "key"),
            f"{key_source!r} needs a [ratelimit.jwt] table (the key tokens are verified with)",
        )
        del read.values["key"], read.paths["key"]
    for key, level in (("limits", "route"), ("key_limits", "key")):
        if key not in t:
            continue
        got = _read_rules(r, t, path, key, pools, algorithm=algorithm, level=level)
        if got is not None:
            read.values[key], read.rule_paths[key] = got
            read.paths[key] = _join(path, key)
    return read


def _route_rate_limit(
    r: _Reader, own: _RouteLimitsRead, ctx: _RateLimitContext, route_pool: str
) -> RouteRateLimit:
    """A route's effective limits: its own keys over ``[ratelimit.defaults]``, adaptive limits
    bound to the route's pool, and the checks that need both (cost vs. limits, a key without
    key limits)."""
    d = ctx.defaults
    values = {**d.values, **own.values}
    paths = {**d.paths, **own.paths}
    rule_paths = {**d.rule_paths, **own.rule_paths}
    limits = tuple(
        replace_dataclass(rule, adaptive=replace_dataclass(rule.adaptive, pool=route_pool))
        if rule.adaptive is not None and not rule.adaptive.pool
        else rule
        for rule in values.get("limits", ())
    )
    limits_out = RouteRateLimit(**{**values, "limits": limits})  # what no table set: the defaults
    if not limits_out.key_limits:
        for key in ("key", "on_missing_key"):
            if key in own.paths:  # the defaults' are judged over all routes (_read_routes)
                ctx.problem(r, own.paths[key], "has no effect without key_limits")
    cost = limits_out.cost
    if cost > 1:
        levels = (
            (ctx.config.global_limits, ctx.global_paths),
            (limits_out.limits, rule_paths.get("limits", [])),
            (limits_out.key_limits, rule_paths.get("key_limits", [])),
        )
        for rules, where in levels:
            for rule, rule_path in zip(rules, where, strict=True):
                floor = rule.adaptive.min if rule.adaptive is not None else rule.limit
                if cost > floor:
                    what = "adaptive min " if rule.adaptive is not None else ""
                    ctx.problem(
                        r,
                        paths["cost"],
                        f"a request of cost {cost} could never pass {rule_path} "
                        f"({what}{floor} per {rule.window:g}s)",
                    )
    return limits_out


def _read_penalty(r: _Reader, raw: object, path: str) -> Penalty | None:
    t = r.table(raw, path)
    if t is None:
        return None
    r.check_keys(t, path, set(Penalty.__dataclass_fields__))
    d = _PENALTY_DEFAULTS
    before = len(r.problems)
    violations = r.get(t, path, "max_violations", _int_between(0, 1_000_000), d.max_violations)
    window = r.get(t, path, "violation_window", _long_duration, d.violation_window)
    block_for = r.get(t, path, "block_for", _long_duration, d.block_for)
    block_max = r.get(t, path, "block_max", _long_duration, d.block_max)
    if len(r.problems) > before:
        return None
    if block_max < block_for:
        r.problem(_join(path, "block_max"), f"must be >= block_for ({block_max:g}s < {block_for:g}s)")
        return None
    return r.build(
        path,
        lambda: Penalty(
            max_violations=violations,
            violation_window=window,
            block_for=block_for,
            block_max=block_max,
        ),
    )


def _read_jwt(r: _Reader, raw: object, path: str) -> JwtConfig | None:
    t = r.table(raw, path)
    if t is None:
        return None
    r.check_keys(t, path, set(JwtConfig.__dataclass_fields__))
    d = JwtConfig()
    before = len(r.problems)
    key = r.get(t, path, "key", _text, None)
    key_file = r.get(t, path, "key_file", _text, None)
    if "algorithms" not in t:
        r.problem(
            _join(path, "algorithms"),
            "is required: the algorithms tokens may be signed with (e.g. ['RS256'])",
        )
    algorithms = tuple(
        dict.fromkeys(
            r.items(t, path, "algorithms", _choice(JWT_ALGORITHMS), (), allow_empty=False)
        )
    )
    audience = r.get(t, path, "audience", _audience, d.audience)
    issuer = r.get(t, path, "issuer", _text, d.issuer)
    claim = r.get(t, path, "claim", _claim, d.claim)
    leeway = r.get(t, path, "leeway", _duration_or_zero, d.leeway)
    cache_size = r.get(t, path, "cache_size", _int_between(0, 10_000_000), d.cache_size)
    cache_ttl = r.get(t, path, "cache_ttl", parse_duration, d.cache_ttl)
    key_path = _join(path, "key")
    if "key" in t and "key_file" in t:
        r.problem(_join(path, "key_file"), "give key or key_file, not both")
    elif "key" not in t and "key_file" not in t:
        r.problem(path, "needs key (an HMAC secret or a PEM public key) or key_file (a PEM file)")
    elif key_file is not None:
        key_path = _join(path, "key_file")
        try:
            key = Path(key_file).read_text(encoding="utf-8")
        except OSError as e:
            r.problem(key_path, f"cannot read {key_file!r}: {e.strerror or e}")
        except UnicodeDecodeError:
            r.problem(key_path, f"{key_file!r} is not a PEM text file")
    if len(r.problems) > before or key is None or not algorithms:
        return None
    problem = _jwt_key_problem(key, algorithms)
    if problem is not None:
        r.problem(_join(path, "algorithms") if problem.startswith("mixes") else key_path, problem)
        return None
    return JwtConfig(
        key=key,
        key_file=key_file,
        algorithms=algorithms,
        audience=audience,
        issuer=issuer,
        claim=claim,
        leeway=leeway,
        cache_size=cache_size,
        cache_ttl=cache_ttl,
    )


def _jwt_key_problem(key: str, algorithms: tuple[str, ...]) -> str | None:
    """Why ``key`` cannot verify tokens of every one of ``algorithms`` (``None``: it can)."""
    hmac = [a for a in algorithms if a.startswith("HS")]
    if hmac and len(hmac) != len(algorithms):
        return (
            f"mixes HMAC ({', '.join(hmac)}) and public-key algorithms: one key cannot be both "
            "a shared secret and a public key"
        )
    if not hmac and "PRIVATE KEY" in key:
        return "is a private key; give the public key (the proxy only verifies tokens)"
    try:
        from jwt.algorithms import get_default_algorithms
        from jwt.exceptions import PyJWTError
    except ImportError:  # pragma: no cover - a dependency of pyproxy
        return "needs PyJWT (pip install 'pyjwt[crypto]')"
    known = get_default_algorithms()
    for name in algorithms:
        algorithm = known.get(name)
        if algorithm is None:  # pragma: no cover - PyJWT without cryptography
            return f"{name} needs the cryptography package (pip install 'pyjwt[crypto]')"
        try:
            prepared = algorithm.prepare_key(key)
        except (PyJWTError, ValueError, TypeError) as e:
            what = "an HMAC secret" if hmac else f"a PEM public key for {name}"
            return f"is not {what}: {e}"
        short = algorithm.check_key_length(prepared)
        if short:
            return f"too weak for {name}: {short}"
    return None


def _read_ratelimit(r: _Reader, raw: object, pools: Mapping[str, Pool]) -> _RateLimitContext:
    path = "ratelimit"
    d = RateLimitConfig()
    empty = _RateLimitContext(d, False, _RouteLimitsRead(), [])
    if raw is None:
        return empty
    t = r.table(raw, path)
    if t is None:
        return empty
    r.check_keys(t, path, _RATELIMIT_KEYS)
    before = len(r.problems)
    mode = r.get(t, path, "mode", _choice(RATELIMIT_MODES), d.mode)
    mode_ok = len(r.problems) == before
    redis_url = r.get(t, path, "redis_url", _redis_url, d.redis_url)
    cluster = r.get(t, path, "cluster", _bool, d.cluster)
    timeout = r.get(t, path, "timeout", parse_duration, d.timeout)
    on_error = r.get(t, path, "on_redis_error", _choice(REDIS_ERROR_POLICIES), d.on_redis_error)
    sync_interval = r.get(t, path, "sync_interval", _long_duration, d.sync_interval)
    headers = r.get(t, path, "headers_on_allowed", _bool, d.headers_on_allowed)
    trusted = r.items(t, path, "trusted_proxies", _network, d.trusted_proxies)
    algorithm: Algorithm = r.get(t, path, "algorithm", _algorithm, d.algorithm)
    jwt = _read_jwt(r, t["jwt"], _join(path, "jwt")) if "jwt" in t else None
    penalty = _read_penalty(r, t["penalty"], _join(path, "penalty")) if "penalty" in t else None
    global_limits: tuple[RateLimitRule, ...] = ()
    global_paths: list[str] = []
    if "global" in t:
        got = _read_rules(r, t, path, "global", pools, algorithm=algorithm, level="global")
        if got is not None:
            global_limits, global_paths = got
    defaults = _RouteLimitsRead()
    if "defaults" in t:
        defaults = _read_route_limits(
            r, t["defaults"], _join(path, "defaults"), pools,
            algorithm=algorithm, jwt_present="jwt" in t,
        )
    if mode_ok:
        if mode == "local":
            for key in (*_REDIS_OPTIONS, "sync_interval"):
                if key in t:
                    where = "'hybrid'" if key == "sync_interval" else "'redis' or 'hybrid'"
                    r.problem(_join(path, key), f"only applies to mode = {where} (mode is 'local')")
        elif "redis_url" not in t:
            r.problem(_join(path, "redis_url"), f"is required with mode = {mode!r}")
        if mode == "redis" and "sync_interval" in t:
            r.problem(_join(path, "sync_interval"), "only applies to mode = 'hybrid' (mode is 'redis')")
    if cluster and redis_url is not None:
        if redis_url.startswith("unix:"):
            r.problem(
                _join(path, "cluster"),
                "needs a redis:// or rediss:// URL (a cluster is reached over TCP)",
            )
        elif _redis_db(redis_url) != 0:
            r.problem(_join(path, "redis_url"), "Redis Cluster has only database 0")
    config = RateLimitConfig(
        mode=mode,
        redis_url=redis_url,
        cluster=cluster,
        timeout=timeout,
        on_redis_error=on_error,
        sync_interval=sync_interval,
        headers_on_allowed=headers,
        trusted_proxies=trusted,
        algorithm=algorithm,
        jwt=jwt,
        penalty=penalty,
        global_limits=global_limits,
        defaults=RouteRateLimit(**defaults.values),
    )
    return _RateLimitContext(config, "jwt" in t, defaults, global_paths)


# ------------------------------------------------------------------------------------ cache

_ROUTE_CACHE_KEYS = set(RouteCache.__dataclass_fields__)
_CACHE_KEYS = set(CacheConfig.__dataclass_fields__)


_tier_name = _choice(CACHE_TIERS)


def _param_name(value: object) -> str:
    name = _text(value)
    if not _printable(name):
        raise _Invalid(f"expected a query parameter name (visible ASCII), got {value!r}")
    return name


def _read_route_cache(
    r: _Reader, raw: object, path: str, base: RouteCache, cache: CacheConfig
) -> RouteCache:
    """A ``cache`` table over ``base`` (``[cache.defaults]``, or the built-in defaults)."""
    if raw is None:
        return base
    t = r.table(raw, path)
    if t is None:
        return base
    r.check_keys(t, path, _ROUTE_CACHE_KEYS)
    tiers = r.items(t, path, "tiers", _tier_name, base.tiers)
    configured = {"memory"} | ({"redis"} if cache.redis_url else set()) | (
        {"sql"} if cache.sqlite_path or cache.postgres_dsn else set()
    )
    for i, tier in enumerate(tiers):
        if tier not in configured:
            r.problem(f"{_join(path, 'tiers')}[{i}]", f"tier {tier!r} is not configured in [cache]")
    return RouteCache(
        # A route's cache table turns caching on unless it says otherwise; [cache.defaults] only
        # configures (each route opts in) unless it sets enabled itself.
        enabled=r.get(t, path, "enabled", _bool, path != "cache.defaults"),
        ttl=r.get(t, path, "ttl", _long_duration, base.ttl),
        tiers=tiers,
        max_object_size=r.get(t, path, "max_object_size", parse_size, base.max_object_size),
        cache_post=r.get(t, path, "cache_post", _bool, base.cache_post),
        share_set_cookie=r.get(t, path, "share_set_cookie", _bool, base.share_set_cookie),
        heuristic=r.get(t, path, "heuristic", _bool, base.heuristic),
        query=r.get(t, path, "query", _choice(CACHE_QUERY_MODES), base.query),
        ignore_params=r.items(t, path, "ignore_params", _param_name, base.ignore_params),
    )


def _dependency(value: object) -> tuple[str, str]:
    if not isinstance(value, dict) or set(value) != {"tag", "on"}:
        raise _Invalid(f"expected a table {{tag = \"...\", on = \"...\"}}, got {value!r}")
    return _text(value["tag"]), _text(value["on"])


def _postgres_dsn(value: object) -> str:
    dsn = _text(value)
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise _Invalid(f"expected a postgresql:// URL, got {redact_url(dsn)!r}")
    return dsn


def _read_cache(r: _Reader, raw: object) -> CacheConfig:
    path = "cache"
    d = CacheConfig()
    if raw is None:
        return d
    t = r.table(raw, path)
    if t is None:
        return d
    r.check_keys(t, path, _CACHE_KEYS)
    redis_url = r.get(t, path, "redis_url", _redis_url, d.redis_url)
    cluster = r.get(t, path, "cluster", _bool, d.cluster)
    sqlite_path = r.get(t, path, "sqlite_path", _text, d.sqlite_path)
    postgres_dsn = r.get(t, path, "postgres_dsn", _postgres_dsn, d.postgres_dsn)
    if sqlite_path is not None and postgres_dsn is not None:
        r.problem(_join(path, "postgres_dsn"), "L3 is one database: set sqlite_path or postgres_dsn, not both")
    if cluster and redis_url is None:
        r.problem(_join(path, "cluster"), "needs redis_url")
    codec = r.get(t, path, "compression", _choice(COMPRESSION_CODECS), d.compression)
    level = r.get(t, path, "compression_level", _int_between(-7, 22), d.compression_level)
    if level is not None and codec == "lz4" and not 0 <= level <= 16:
        r.problem(_join(path, "compression_level"), f"lz4 levels are 0..16, got {level}")
    if level is not None and codec == "none":
        r.problem(_join(path, "compression_level"), "has no effect with compression = 'none'")
    config = CacheConfig(
        memory_size=r.get(t, path, "memory_size", parse_size, d.memory_size),
        redis_url=redis_url,
        cluster=cluster,
        sqlite_path=sqlite_path,
        postgres_dsn=postgres_dsn,
        timeout=r.get(t, path, "timeout", _long_duration, d.timeout),
        compression=codec,
        compression_level=level,
        compression_min_size=r.get(t, path, "compression_min_size", _int_between(0, 1 << 30), d.compression_min_size),
        coalesce_timeout=r.get(t, path, "coalesce_timeout", _long_duration, d.coalesce_timeout),
        coalesce_max_waiters=r.get(t, path, "coalesce_max_waiters", _int_between(0, 1 << 20), d.coalesce_max_waiters),
        depends=r.items(t, path, "depends", _dependency, d.depends),
    )
    defaults = _read_route_cache(r, t.get("defaults"), _join(path, "defaults"), RouteCache(), config)
    warming = _read_warming(r, t.get("warming"), _join(path, "warming"))
    return replace_dataclass(config, defaults=defaults, warming=warming)


_WARMING_KEYS = set(WarmingConfig.__dataclass_fields__)


def _read_warming(r: _Reader, raw: object, path: str) -> WarmingConfig:
    d = WarmingConfig()
    if raw is None:
        return d
    t = r.table(raw, path)
    if t is None:
        return d
    r.check_keys(t, path, _WARMING_KEYS)
    fraction = _number(0.0, 1.0, low_open=True, high_open=True)
    positive = _number(0.0, math.inf, low_open=True)
    built = r.build(path, lambda: WarmingConfig(
        refresh_ahead=r.get(t, path, "refresh_ahead", _bool, d.refresh_ahead),
        refresh_before=r.get(t, path, "refresh_before", fraction, d.refresh_before),
        hot_hits=r.get(t, path, "hot_hits", positive, d.hot_hits),
        half_life=r.get(t, path, "half_life", _long_duration, d.half_life),
        predict=r.get(t, path, "predict", _bool, d.predict),
        predict_threshold=r.get(t, path, "predict_threshold", _number(0.0, 1.0, low_open=True), d.predict_threshold),
        predict_min_samples=r.get(t, path, "predict_min_samples", _int_between(1, 1 << 30), d.predict_min_samples),
        max_fetches=r.get(t, path, "max_fetches", _int_between(1, 1024), d.max_fetches),
        max_fetch_rate=r.get(t, path, "max_fetch_rate", positive, d.max_fetch_rate),
        warm_file=r.get(t, path, "warm_file", _text, d.warm_file),
        warm_keys=r.get(t, path, "warm_keys", _int_between(1, 1_000_000), d.warm_keys),
    ))
    return built or d


# ------------------------------------------------------------------------------------ loading

TOP_LEVEL_KEYS = {
    "listeners", "admin", "limits", "access_log", "pools", "routes", "workers", "ratelimit", "cache"
}


def parse_config(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate parsed TOML (a mapping) into a :class:`Config`, or raise :class:`ConfigError`
    listing every problem."""
    r = _Reader()
    r.check_keys(data, "", TOP_LEVEL_KEYS)
    listeners = _read_listeners(r, data.get("listeners"))
    admin = _read_admin(r, data.get("admin"))
    access_log = _read_access_log(r, data.get("access_log"))
    limits = _read_limits(r, data.get("limits"))
    pools = _read_pools(r, data.get("pools"))
    ratelimit = _read_ratelimit(r, data.get("ratelimit"), pools)
    cache = _read_cache(r, data.get("cache"))
    routes = _read_routes(r, data.get("routes"), pools, ratelimit, cache)
    workers = r.get(data, "", "workers", _int_between(1, 1024), 1)
    if workers > 1 and any(lst.port == 0 for lst in listeners):
        r.problem("workers", "several workers need fixed listener ports (port 0 would differ per worker)")
    if admin.enabled and any(
        admin.port and admin.port == lst.port and admin.host == lst.host for lst in listeners
    ):
        r.problem("admin.port", "the admin listener uses the same host and port as a listener")
    if r.problems:
        raise ConfigError(r.problems, source)
    return Config(
        listeners=listeners,
        pools=pools,
        routes=routes,
        admin=admin,
        limits=limits,
        access_log=access_log,
        workers=workers,
        ratelimit=ratelimit.config,
        cache=cache,
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; :class:`ConfigError` names every problem (or the file's
    syntax error, with its line and column)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem("", f"cannot read the file: {e.strerror or e}")], str(path)) from e
    except UnicodeDecodeError as e:
        raise ConfigError([Problem("", f"not UTF-8 text: {e}")], str(path)) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([Problem("", f"invalid TOML: {e}")], str(path)) from e
    return parse_config(data, str(path))


def reload_problems(running: Config, new: Config) -> list[Problem]:
    """What a reload cannot change without a restart (listening sockets and processes)."""
    problems = []
    if new.listeners != running.listeners:
        problems.append(Problem("listeners", "cannot change on reload; restart to rebind"))
    if new.workers != running.workers:
        problems.append(Problem("workers", "cannot change on reload; restart to change it"))
    if new.admin != running.admin:
        problems.append(Problem("admin", "cannot change on reload; restart to change it"))
    return problems

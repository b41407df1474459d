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
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyproxy.errors import PyproxyError

__all__ = [
    "AccessLogConfig",
    "AdminConfig",
    "Config",
    "ConfigError",
    "Limits",
    "Listener",
    "Pool",
    "Problem",
    "Route",
    "Server",
    "load_config",
    "parse_config",
    "reload_problems",
]

T = TypeVar("T")

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
BALANCE_ALGORITHMS = ("round_robin",)


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
class Pool:
    """A named group of upstream servers and how to talk to them."""

    name: str
    servers: tuple[Server, ...]
    balance: str = "round_robin"
    connect_timeout: float = 5.0  # → 502
    response_timeout: float = 60.0  # time to the response head → 504; agents can be slow
    max_idle_per_server: int = 32  # kept-alive upstream connections per server
    idle_timeout: float = 60.0  # an idle upstream connection is closed after this


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

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets replaced (for ``GET /config``)."""
        data = asdict(self)
        if data["admin"]["token"] is not None:
            data["admin"]["token"] = "<redacted>"
        for route in data["routes"]:
            route["methods"] = sorted(route["methods"])
        return data


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
    if not math.isfinite(seconds) or seconds <= 0:
        raise _Invalid(f"must be a duration > 0, got {value!r}")
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

        def balance(value: object) -> str:
            if value not in BALANCE_ALGORITHMS:
                raise _Invalid(f"expected one of {', '.join(BALANCE_ALGORITHMS)}, got {value!r}")
            return str(value)

        pools[name] = Pool(
            name=name,
            servers=tuple(servers),
            balance=r.get(p, path, "balance", balance, d.balance),
            connect_timeout=r.get(p, path, "connect_timeout", parse_duration, d.connect_timeout),
            response_timeout=r.get(
                p, path, "response_timeout", parse_duration, d.response_timeout
            ),
            max_idle_per_server=r.get(
                p, path, "max_idle_per_server", _int_between(0, 100_000), d.max_idle_per_server
            ),
            idle_timeout=r.get(p, path, "idle_timeout", parse_duration, d.idle_timeout),
        )
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


def _read_routes(r: _Reader, raw: object, pools: Mapping[str, Pool]) -> tuple[Route, ...]:
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
            )
        )
    return tuple(routes)


# ------------------------------------------------------------------------------------ loading

TOP_LEVEL_KEYS = {"listeners", "admin", "limits", "access_log", "pools", "routes", "workers"}


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
    routes = _read_routes(r, data.get("routes"), pools)
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

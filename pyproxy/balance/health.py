"""Active health checks: probe each upstream target over HTTP and mark it healthy or unhealthy.

What a check is. One HTTP/1.1 request on a *new* TCP connection with ``Connection: close`` (HAProxy's
``option httpchk``; Envoy's HTTP health checker). A new connection each time also catches a full
accept queue or a dead listener that a reused keep-alive connection would hide. One timeout covers
the whole check — connect, send, and the complete response — so a server that accepts and then
trickles bytes fails as surely as one that never answers.

Parsing. The response is read by the data plane's strict reader (``ResponseReader``) and framed by
:func:`pyproxy.headers.response_framing`, with the proxy's strictness: ``Content-Length``, chunked, or
read-until-close; no body for ``HEAD``, 1xx, 204 and 304; interim 1xx responses skipped; the status
line must say ``HTTP/1.0`` or ``HTTP/1.1``. At most ``max_response_bytes`` are read: when a response
is larger, its status and the body prefix that fit decide (HAProxy also judges what fits its check
buffer). A response cut short before its framing says it ends is a failure.

Results. A check passes when the status is in ``expected_statuses`` and, if ``body_contains`` is
set, the body holds those bytes. A failed check never raises: it yields a reason
``"<kind>: <detail>"`` with kind one of ``connect``, ``timeout``, ``closed``, ``malformed``,
``too large``, ``status``, ``body`` (``error`` for anything unforeseen).

States (HAProxy's rise/fall; Envoy's healthy/unhealthy thresholds). A target starts as
``initial_healthy`` (default healthy, as HAProxy servers start UP; ``False`` holds new targets out of
rotation until they pass, as Envoy does). ``fall`` consecutive failures make a healthy target
unhealthy, ``rise`` consecutive successes make an unhealthy one healthy. ``on_change`` is called and
one log line written (logger ``pyproxy.health``) per transition, never per failed check.

Scheduling. Each target's first check runs at ``uniform(0, interval)`` after it starts, and each next
one ``interval × (1 + uniform(-jitter, +jitter))`` after the previous check *ended* (so a slow target
never has two checks in flight), so many proxies — or many targets — do not probe in lock-step
(Envoy's ``interval_jitter_percent``, HAProxy's ``spread-checks``).

Where it runs. The checker is an engine on one asyncio loop; per the design, the supervisor runs it
once per machine and its owner publishes ``on_change`` transitions to the pool / shared state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, TypedDict


from pyproxy.errors import HeaderError
from pyproxy.headers import UNTIL_CLOSE

__all__ = [
    "CheckResult",
    "HealthCheckConfig",
    "HealthChecker",
    "HealthStatus",
    "OnHealthChange",
    "probe",
]

logger = logging.getLogger("pyproxy.health")

OnHealthChange = Callable[[str, bool, str], None]
"""``on_change(target_id, healthy, reason)``, called on each transition."""

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_READ_SIZE = 16 * 1024


@dataclass(frozen=True)
class HealthCheckConfig:
    """How to check a target. Invalid values raise ``ValueError`` naming the field.

    ``expected_statuses`` is a tuple of ``range`` objects, half-open like Envoy's
    ``expected_statuses`` ranges: ``(range(200, 400),)`` (the default, HAProxy's: 2xx and 3xx pass;
    Envoy's default is 200 only) or e.g. ``(range(200, 300), range(418, 419))``.
    ``jitter`` is a fraction of ``interval`` in ``[0, 1)``. ``host_header`` ``None`` sends the
    target's own ``host[:port]``. ``max_response_bytes`` bounds what one check reads.
    """

    method: str = "GET"
    path: str = "/healthz"
    expected_statuses: tuple[range, ...] = (range(200, 400),)
    body_contains: bytes | None = None
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    jitter: float = 0.1
    host_header: str | None = None
    initial_healthy: bool = True
    max_response_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        method = self.method.encode("latin-1", "replace")
        if not method or not all(b in _TCHAR for b in method):
            raise ValueError(f"method: {self.method!r} is not an HTTP method token")
        # The path and Host go into the request head: no byte that could end a line or a field.
        if not self.path.startswith("/") or not _printable(self.path):
            raise ValueError(f"path: {self.path!r} must start with '/' and hold visible ASCII only")
        if self.host_header is not None and (not self.host_header or not _printable(self.host_header)):
            raise ValueError(f"host_header: {self.host_header!r} must be non-empty visible ASCII")
        if not self.expected_statuses:
            raise ValueError("expected_statuses: at least one range of status codes")
        for r in self.expected_statuses:
            if not isinstance(r, range) or r.step != 1 or r.start < 100 or r.stop > 600 or not r:
                raise ValueError(
                    f"expected_statuses: {r!r} is not a non-empty range(start, stop) within 100..599"
                )
        if self.body_contains is not None and not self.body_contains:
            raise ValueError("body_contains: empty; use None to not look at the body")
        if not self.interval > 0:
            raise ValueError(f"interval: {self.interval} must be > 0")
        if not self.timeout > 0:
            raise ValueError(f"timeout: {self.timeout} must be > 0")
        if self.rise < 1:
            raise ValueError(f"rise: {self.rise} must be >= 1")
        if self.fall < 1:
            raise ValueError(f"fall: {self.fall} must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter: {self.jitter} must be in [0, 1)")
        if self.max_response_bytes < 1024:
            raise ValueError(f"max_response_bytes: {self.max_response_bytes} must be >= 1024")

    def status_expected(self, status: int) -> bool:
        """Whether ``status`` passes."""
        return any(status in r for r in self.expected_statuses)


def _printable(s: str) -> bool:
    return s.isascii() and all(0x21 <= ord(c) <= 0x7E for c in s)


class CheckResult(NamedTuple):
    """One check's outcome: ``reason`` is ``"status NNN"`` on success, ``"<kind>: <detail>"`` else."""

    ok: bool
    reason: str


class HealthStatus(TypedDict):
    """What :meth:`HealthChecker.status` reports for one target.

    ``last_error`` is the reason of the latest *failed* check (kept after recovery);
    ``last_checked`` the wall-clock time (``time.time()``) the latest check ended, ``None`` before
    the first; ``checks`` and ``failures`` count every check and every failed one.
    """

    healthy: bool
    consecutive_successes: int
    consecutive_failures: int
    last_error: str | None
    last_checked: float | None
    checks: int
    failures: int


class _Failed(Exception):
    """A check failed for ``reason`` (internal: :func:`probe` turns it into a result)."""


def _request(config: HealthCheckConfig, host: str, port: int) -> bytes:
    if config.host_header is not None:
        authority = config.host_header
    else:
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal
        authority = name if port == 80 else f"{name}:{port}"
    return (
        f"{config.method} {config.path} HTTP/1.1\r\n"
        f"Host: {authority}\r\n"
        "User-Agent: pyproxy-health\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


async def _exchange(config: HealthCheckConfig, host: str, port: int, request: bytes) -> CheckResult:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        raise _Failed(f"connect: {e.strerror or e}") from None
    try:
        writer.write(request)
        await writer.drain()
        # (imported here: it imports pyproxy._protocol, which imports pyproxy.config, which
        # imports this module)
        from pyproxy.upstream_response import UpstreamResponse

        # The check's own byte limit comes first ("too large", not a malformed head), and bounds
        # the header lines too.
        limit = config.max_response_bytes
        resp = UpstreamResponse(config.method.encode("ascii"), limit, limit + 1, limit)
        total = 0
        while not resp.complete:
            data = await reader.read(min(_READ_SIZE, config.max_response_bytes - total))
            if not data:
                if resp.framing == UNTIL_CLOSE:
                    break  # read-until-close body: the close is its end
                where = "before the end of the body" if resp.head_done else "before a complete head"
                raise _Failed(f"closed: connection closed {where} ({total} bytes read)")
            total += len(data)
            try:
                resp.feed(data)
            except HeaderError as e:
                raise _Failed(f"malformed: {e}") from None
            if total >= config.max_response_bytes and not resp.complete:
                if not resp.head_done:
                    raise _Failed(f"too large: no complete head in {config.max_response_bytes} bytes")
                break  # judge on the status and the body prefix that fit
        if not config.status_expected(resp.status):
            raise _Failed(f"status: {resp.status} is not an expected status")
        if config.body_contains is not None and config.body_contains not in resp.body:
            raise _Failed(f"body: no {config.body_contains!r} in the first {len(resp.body)} body bytes")
        return CheckResult(True, f"status {resp.status}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def probe(
    config: HealthCheckConfig, host: str, port: int, *, request: bytes | None = None
) -> CheckResult:
    """Run one check against ``host:port`` now; never raises (except on cancellation).

    ``request`` overrides the request bytes built from ``config`` (the checker builds them once per
    target).
    """
    if request is None:
        request = _request(config, host, port)
    try:
        async with asyncio.timeout(config.timeout):
            return await _exchange(config, host, port, request)
    except _Failed as e:
        return CheckResult(False, str(e))
    except TimeoutError:  # before OSError: TimeoutError is one
        return CheckResult(False, f"timeout: no complete response within {config.timeout:g}s")
    except OSError as e:
        return CheckResult(False, f"closed: {e.strerror or e}")
    except Exception as e:  # a health check must never take its task down: a reason, not a crash
        return CheckResult(False, f"error: {type(e).__name__}: {e}")


@dataclass
class _Target:
    host: str
    port: int
    request: bytes
    healthy: bool
    successes: int = 0  # consecutive
    failures_in_row: int = 0
    last_error: str | None = None
    last_checked: float | None = None
    checks: int = 0
    failures: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class HealthChecker:
    """Checks targets periodically on the running loop; see the module docstring.

    Not thread-safe: call every method from the loop's thread. Targets may be added before
    :meth:`start` (checked once it runs) or while running (checked at once, from a random offset).
    """

    def __init__(
        self, config: HealthCheckConfig, on_change: OnHealthChange, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.on_change = on_change
        self._rng = rng if rng is not None else random.Random()
        self._targets: dict[str, _Target] = {}
        self._running = False
        # Cancelled tasks (removed targets) that may still be closing a connection: stop() awaits them.
        self._retired: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> bool:
        return self._running

    def targets(self) -> list[str]:
        """The ids of the targets being checked, in the order they were added."""
        return list(self._targets)

    def add(self, target_id: str, host: str, port: int) -> None:
        """Check ``host:port`` as ``target_id``; ``ValueError`` if the id is already there."""
        if target_id in self._targets:
            raise ValueError(f"target {target_id!r} is already checked")
        if not 0 < port < 65536:
            raise ValueError(f"port: {port} is not a TCP port")
        target = _Target(host, port, _request(self.config, host, port), self.config.initial_healthy)
        self._targets[target_id] = target
        if self._running:
            self._spawn(target_id, target)

    def remove(self, target_id: str) -> None:
        """Stop checking ``target_id`` (a check in flight is abandoned); ``KeyError`` if unknown."""
        target = self._targets.pop(target_id)
        if target.task is not None:
            target.task.cancel()
            if not target.task.done():
                self._retired.add(target.task)
                target.task.add_done_callback(self._retired.discard)
            target.task = None

    def start(self) -> None:
        """Start checking every target; needs a running loop (``RuntimeError`` otherwise)."""
        asyncio.get_running_loop()
        if self._running:
            raise RuntimeError("the health checker is already running")
        self._running = True
        for target_id, target in self._targets.items():
            self._spawn(target_id, target)

    async def stop(self) -> None:
        """Stop every check and wait until their tasks are gone. Targets stay for a later start()."""
        self._running = False
        tasks = set(self._retired)
        for target in self._targets.values():
            if target.task is not None:
                tasks.add(target.task)
                target.task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._retired.clear()

    def status(self, target_id: str) -> HealthStatus:
        """The state and counters of ``target_id``; ``KeyError`` if unknown."""
        t = self._targets[target_id]
        return HealthStatus(
            healthy=t.healthy,
            consecutive_successes=t.successes,
            consecutive_failures=t.failures_in_row,
            last_error=t.last_error,
            last_checked=t.last_checked,
            checks=t.checks,
            failures=t.failures,
        )

    def is_healthy(self, target_id: str) -> bool:
        """Whether ``target_id`` is healthy now; ``KeyError`` if unknown."""
        return self._targets[target_id].healthy

    # -- scheduling
    def first_delay(self) -> float:
        """The offset of a target's first check: uniform in ``[0, interval]``."""
        return self._rng.uniform(0.0, self.config.interval)

    def next_delay(self) -> float:
        """The pause after a check: ``interval × (1 ± jitter)``, uniform."""
        cfg = self.config
        return cfg.interval * (1.0 + self._rng.uniform(-cfg.jitter, cfg.jitter))

    def _spawn(self, target_id: str, target: _Target) -> None:
        # The offset is drawn here, not in the task, so a seeded rng gives offsets in add() order.
        delay = self.first_delay()
        target.task = asyncio.get_running_loop().create_task(
            self._run(target_id, target, delay), name=f"pyproxy-health:{target_id}"
        )

    async def _run(self, target_id: str, target: _Target, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            result = await probe(self.config, target.host, target.port, request=target.request)
            self._record(target_id, target, result)
            delay = self.next_delay()

    def _record(self, target_id: str, target: _Target, result: CheckResult) -> None:
        target.checks += 1
        target.last_checked = time.time()
        if result.ok:
            target.successes += 1
            target.failures_in_row = 0
            if not target.healthy and target.successes >= self.config.rise:
                reason = f"{result.reason} ({target.successes} consecutive successes)"
                self._transition(target_id, target, True, reason)
        else:
            target.failures += 1
            target.failures_in_row += 1
            target.successes = 0
            target.last_error = result.reason
            if target.healthy and target.failures_in_row >= self.config.fall:
                reason = f"{result.reason} ({target.failures_in_row} consecutive failures)"
                self._transition(target_id, target, False, reason)

    def _transition(self, target_id: str, target: _Target, healthy: bool, reason: str) -> None:
        target.healthy = healthy
        level = logging.INFO if healthy else logging.WARNING
        logger.log(
            level,
            "upstream %s (%s:%d) is %s: %s",
            target_id, target.host, target.port, "healthy" if healthy else "unhealthy", reason,
        )
        try:
            self.on_change(target_id, healthy, reason)
        except Exception:  # the owner's bug must not stop the checks
            logger.exception("health on_change callback failed for upstream %s", target_id)

"""The admin API: a small HTTP/1.1 server on its own listener (loopback by default).

    GET  /healthz   200 while the process serves
    GET  /readyz    200 when every worker is up, else 503
    GET  /config    the effective configuration as JSON, secrets redacted
    GET  /metrics   Prometheus text format, summed over the workers
    POST /reload    re-read the configuration file: 200, or 400 listing every problem (the running
                    configuration stays in force)
    GET  /ratelimits rate limiting: mode, decisions by route and level, penalty-box blocks, Redis
                    fallbacks and round trips, the current value of every adaptive limit
    GET    /ratelimits/blocked       the keys in the penalty box now, for the whole proxy (every
                    worker; every instance through Redis in modes redis and hybrid)
    DELETE /ratelimits/blocked/{key} unblock a key (URL-encoded): 200, 404 when it was not blocked
    GET  /upstreams every pool's servers: state, health, breaker, ejections, weights, EWMA latency,
                    in-flight requests (summed over the workers), and the pool's counters
    POST   /upstreams/{pool}/servers          add a server: {"address": "host:port", "weight": 1}
    PATCH  /upstreams/{pool}/servers/{server} {"weight": 2} and/or {"drain": true|false}
    DELETE /upstreams/{pool}/servers/{server} drain it (in-flight requests finish), then remove it
                    Run-time changes apply to every worker and survive reloads that leave the pool's
                    configuration as it was.
    POST /cache/purge {"urls": [...], "keys": [...], "tags": [...]} (each a string or a list): drop
                    those entries, and everything carrying those tags or tags depending on them, from
                    every tier of every worker, and of every instance through Redis

With ``admin.token`` set, every request needs ``Authorization: Bearer <token>`` (else 401).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST

from pyproxy.balance.changes import ChangeError
from pyproxy.cache.purges import keys_for_urls, plain_strings
from pyproxy.config import AdminConfig, Config, Problem
from pyproxy._protocol import EV_BODY, EV_HEAD, EV_MORE, RequestReader
from pyproxy.errors import HeaderError
from pyproxy.headers import request_framing, serialize_response_head
from pyproxy.ratelimit.penalty_box import PenaltyBox

__all__ = ["AdminServer", "Controller"]

log = logging.getLogger("pyproxy.admin")

_MAX_REQUEST = 64 * 1024  # admin requests are tiny; anything bigger is refused
_BLOCKED = b"/ratelimits/blocked"
_PURGE = b"/cache/purge"


class Controller(Protocol):
    """What the admin API asks of the process it runs in (a worker or the supervisor)."""

    def current_config(self) -> Config: ...

    def ready(self) -> tuple[bool, str]: ...

    def reload(self) -> list[Problem]: ...

    def metrics_text(self) -> bytes: ...

    def upstreams(self) -> dict[str, Any]: ...

    def ratelimits(self) -> dict[str, Any]: ...

    def penalty_box(self) -> PenaltyBox | None:
        """The penalty box of the whole proxy, used on the admin API's loop (``None``: no rate
        limiting state in this process yet)."""
        ...

    def change_upstreams(self, method: str, pool: str, server: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """Apply a run-time pool change; :class:`ChangeError` (status, reason) when refused."""
        ...

    async def purge_cache(self, keys: list[str], tags: list[str]) -> dict[str, Any]:
        """Drop ``keys`` and the entries tagged ``tags`` (dependencies included) everywhere; runs on
        the admin API's loop."""
        ...


class _AdminConnection(asyncio.Protocol):
    """One admin request per connection (answered with ``Connection: close``), read by the data
    plane's strict request reader."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.reader = RequestReader(_MAX_REQUEST, _MAX_REQUEST)  # (bytes bound the header lines)
        self.transport: asyncio.Transport | None = None
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.received = 0
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return  # one request per connection: what follows it is not read
        self.received += len(data)
        if self.received > _MAX_REQUEST:
            self.done = True
            self._respond(413, {"error": "request too large"})
            return
        reader = self.reader
        reader.feed(data)
        try:
            while (event := reader.next_event()) != EV_MORE:
                if event == EV_HEAD:
                    self.method, self.url = reader.method, reader.target
                    self.headers = [(n.lower(), v) for n, v in reader.headers]
                    reader.expect_body(request_framing(reader.headers, reader.version == 11))
                elif event == EV_BODY:
                    self.body += reader.body
                else:
                    self.done = True
                    break
        except HeaderError as e:
            self.done = True
            self._respond(400, {"error": f"malformed request: {e}"})
            return
        if self.done:
            try:
                self._request()
            except Exception:  # noqa: BLE001 - a handler's failure is answered, never a dropped connection
                log.exception("admin request %s %s failed", self.method.decode("latin-1"), self.url.decode("latin-1"))
                self._respond(500, {"error": "internal error"})

    def _request(self) -> None:
        method = self.method
        path = self.url.split(b"?", 1)[0]
        headers = dict(self.headers)
        if path == b"/metrics" and method == b"GET" and self.server.authorized(headers):
            self._respond_raw(200, self.server.controller.metrics_text(), CONTENT_TYPE_LATEST.encode())
            return
        if path == _PURGE and self.server.authorized(headers):
            self.server.spawn(self.server.handle_purge(method, self.body), self._respond)
            return
        if (path == _BLOCKED or path.startswith(_BLOCKED + b"/")) and self.server.authorized(headers):
            # These wait for Redis (modes redis / hybrid): answered when the task ends.
            self.server.spawn(self.server.handle_blocked(method, path), self._respond)
            return
        status, body = self.server.handle(method, path, headers, self.body)
        self._respond(status, body)

    def _respond(self, status: int, body: dict[str, object]) -> None:
        payload = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
        self._respond_raw(status, payload, b"application/json")

    def _respond_raw(self, status: int, payload: bytes, content_type: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        headers = [
            (b"Content-Type", content_type),
            (b"Content-Length", str(len(payload)).encode()),
            (b"Cache-Control", b"no-store"),
            (b"Connection", b"close"),
        ]
        if status == 401:
            headers.append((b"WWW-Authenticate", b'Bearer realm="pyproxy-admin"'))
        if status == 405:
            headers.append((b"Allow", self.server.allowed(self.url.split(b"?", 1)[0]).replace(b" ", b", ")))
        self.transport.write(serialize_response_head(status, None, headers) + payload)
        self.transport.close()


class AdminServer:
    """Serves the admin API for a :class:`Controller`."""

    ROUTES = {
        b"/healthz": b"GET",
        b"/readyz": b"GET",
        b"/config": b"GET",
        b"/metrics": b"GET",
        b"/reload": b"POST",
        b"/upstreams": b"GET",
        b"/ratelimits": b"GET",
    }
    # /upstreams/{pool}/servers (POST) and /upstreams/{pool}/servers/{server} (PATCH, DELETE)
    SERVERS = b"POST"
    SERVER = b"PATCH DELETE"
    # /ratelimits/blocked (GET) and /ratelimits/blocked/{key} (DELETE)
    BLOCKED = b"GET"
    BLOCKED_KEY = b"DELETE"

    def __init__(self, controller: Controller, config: AdminConfig) -> None:
        self.controller = controller
        self.config = config
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[tuple[int, dict[str, object]]]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _AdminConnection(self), self.config.host, self.config.port, reuse_address=True
        )
        self.address = self._server.sockets[0].getsockname()[:2]
        log.info("admin API on %s:%d", *self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def allowed(self, path: bytes) -> bytes:
        parts = path.split(b"/")
        if len(parts) == 4 and parts[1] == b"upstreams" and parts[3] == b"servers":
            return self.SERVERS
        if len(parts) == 5 and parts[1] == b"upstreams" and parts[3] == b"servers":
            return self.SERVER
        if path == _BLOCKED:
            return self.BLOCKED
        if path.startswith(_BLOCKED + b"/"):
            return self.BLOCKED_KEY
        if path == _PURGE:
            return b"POST"
        return self.ROUTES.get(path, b"GET")

    def handle(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes = b""
    ) -> tuple[int, dict[str, object]]:
        """Answer one admin request: (status, JSON body)."""
        if not self.authorized(headers):
            return 401, {"error": "missing or wrong bearer token"}
        if path.startswith(b"/upstreams/"):
            return self._change(method, path, body)
        expected = self.ROUTES.get(path)
        if expected is None:
            return 404, {"error": f"no admin endpoint {path.decode('latin-1')}",
                         "endpoints": sorted([*(p.decode() for p in self.ROUTES), _BLOCKED.decode(), _PURGE.decode()])}
        if method != expected:
            return 405, {"error": f"{path.decode()} takes {expected.decode()}"}
        if path == b"/healthz":
            return 200, {"status": "ok"}
        if path == b"/readyz":
            ready, why = self.controller.ready()
            return (200, {"status": "ready"}) if ready else (503, {"status": "not ready", "why": why})
        if path == b"/config":
            return 200, self.controller.current_config().redacted()
        if path == b"/upstreams":
            return 200, self.controller.upstreams()
        if path == b"/ratelimits":
            return 200, self.controller.ratelimits()
        problems = self.controller.reload()
        if problems:
            return 400, {"reloaded": False, "problems": [str(p) for p in problems]}
        return 200, {"reloaded": True}

    def spawn(
        self,
        work: Coroutine[Any, Any, tuple[int, dict[str, object]]],
        respond: Callable[[int, dict[str, object]], None],
    ) -> None:
        """Run ``work`` on this loop and ``respond`` with its answer (500 if it raised)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)

        def done(task: asyncio.Task[tuple[int, dict[str, object]]]) -> None:
            self._tasks.discard(task)
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                log.error("admin request failed", exc_info=exc)
                respond(500, {"error": f"internal error: {exc}"})
            else:
                respond(*task.result())

        task.add_done_callback(done)

    async def handle_purge(self, method: bytes, body: bytes) -> tuple[int, dict[str, object]]:
        """``POST /cache/purge`` (authorized)."""
        if method != b"POST":
            return 405, {"error": "/cache/purge takes POST"}
        try:
            data = json.loads(body) if body.strip() else {}
            if not isinstance(data, dict) or set(data) - {"urls", "keys", "tags"} or not data:
                raise ValueError('expected a JSON object with "urls", "keys" and/or "tags"')
            keys = list(plain_strings(data.get("keys", []), "keys"))
            keys += keys_for_urls(plain_strings(data.get("urls", []), "urls"), self.controller.current_config())
            tags = list(plain_strings(data.get("tags", []), "tags"))
        except ValueError as e:
            return 400, {"error": str(e)}
        return 200, await self.controller.purge_cache(keys, tags)

    async def handle_blocked(self, method: bytes, path: bytes) -> tuple[int, dict[str, object]]:
        """``GET /ratelimits/blocked`` and ``DELETE /ratelimits/blocked/{key}`` (authorized)."""
        expected = self.allowed(path)
        if method != expected:
            return 405, {"error": f"{path.decode('latin-1')} takes {expected.decode()}"}
        box = self.controller.penalty_box()
        mode = self.controller.current_config().ratelimit.mode
        if path == _BLOCKED:
            if box is None:
                return 200, {"mode": mode, "blocked": [], "complete": True}
            keys, problem = await box.blocked()
            body: dict[str, object] = {
                "mode": mode,
                "blocked": [
                    {"key": b.key, "until": b.until, "remaining": round(b.remaining, 6), "strikes": b.strikes}
                    for b in keys
                ],
                # False: Redis did not answer, the list holds this machine's blocks only.
                "complete": problem is None,
            }
            if problem is not None:
                body["error"] = f"Redis unavailable: {problem}"
            return 200, body
        key = unquote(path[len(_BLOCKED) + 1 :].decode("latin-1"))
        if not key:
            return 404, {"error": "expected /ratelimits/blocked/{key}"}
        if box is None:
            return 404, {"error": f"{key!r} is not blocked", "key": key}
        was, problem = await box.unblock(key)
        if problem is not None:
            return 503, {"error": f"Redis unavailable: {problem}; unblocked on this machine only", "key": key}
        if not was:
            return 404, {"error": f"{key!r} is not blocked", "key": key}
        return 200, {"unblocked": True, "key": key}

    def _change(self, method: bytes, path: bytes, body: bytes) -> tuple[int, dict[str, object]]:
        parts = [unquote(p.decode("latin-1")) for p in path.split(b"/")]
        if len(parts) not in (4, 5) or parts[3] != "servers" or not parts[2] or (len(parts) == 5 and not parts[4]):
            return 404, {"error": "expected /upstreams/{pool}/servers or /upstreams/{pool}/servers/{server}"}
        allowed = self.allowed(path).split()
        if method not in allowed:
            return 405, {"error": f"{path.decode('latin-1')} takes {' or '.join(m.decode() for m in allowed)}"}
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError as e:
            return 400, {"error": f"the body is not JSON: {e}"}
        if not isinstance(data, dict):
            return 400, {"error": "the body must be a JSON object"}
        try:
            result = self.controller.change_upstreams(method.decode(), parts[2], parts[4] if len(parts) == 5 else None, data)
        except ChangeError as e:
            return e.status, {"error": str(e)}
        return (201 if method == b"POST" else 202 if method == b"DELETE" else 200), result

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        """No token configured, or the right bearer token sent (compared in constant time)."""
        if self.config.token is None:
            return True
        value = headers.get(b"authorization")
        if value is None or not value.lower().startswith(b"bearer "):
            return False
        return hmac.compare_digest(value[7:].strip(), self.config.token.encode())

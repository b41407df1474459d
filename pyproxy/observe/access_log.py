"""The access log: one JSON object per line per request, written in batches.

A request only formats its line and appends it to a list (a few microseconds, and only when the log
is on); the lines reach the file when ``buffer_lines`` are waiting or every ``flush_interval``
seconds, in one ``write`` each, so the request path never waits on the disk. Several workers may
share one file: it is opened with ``O_APPEND`` and each batch is one write.

Fields: ``time`` (UTC, RFC 3339, milliseconds), ``client``, ``method``, ``target``, ``host``,
``status``, ``bytes`` (response body bytes sent), ``duration_ms`` (head received → response done),
``route``, ``upstream`` (``null`` when the proxy answered itself), ``request_id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from pyproxy.config import AccessLogConfig

__all__ = ["AccessLog"]

log = logging.getLogger("pyproxy.access_log")


class AccessLog:
    """Buffered JSON-lines access log on a file descriptor."""

    def __init__(self, config: AccessLogConfig) -> None:
        self.config = config
        if config.path == "-":
            self.fd = os.dup(1)
        else:
            self.fd = os.open(config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lines: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self.dropped = 0

    def start(self) -> None:
        """Begin the periodic flush (call from the event loop)."""
        self.timer = asyncio.get_running_loop().call_later(self.config.flush_interval, self._tick)

    def record(
        self,
        *,
        client: bytes,
        method: bytes,
        target: bytes,
        host: bytes | None,
        status: int,
        body_bytes: int,
        duration: float,
        route: str | None,
        upstream: str | None,
        request_id: bytes,
    ) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        self.lines.append(
            json.dumps(
                {
                    "time": stamp,
                    "client": client.decode("latin-1"),
                    "method": method.decode("latin-1"),
                    "target": target.decode("latin-1"),
                    "host": host.decode("latin-1") if host is not None else None,
                    "status": status,
                    "bytes": body_bytes,
                    "duration_ms": round(duration * 1000, 3),
                    "route": route,
                    "upstream": upstream,
                    "request_id": request_id.decode("latin-1") or None,
                },
                separators=(",", ":"),
            )
            + "\n"
        )
        if len(self.lines) >= self.config.buffer_lines:
            self.flush()

    def flush(self) -> None:
        """Write every waiting line now."""
        if not self.lines:
            return
        data = "".join(self.lines).encode()
        self.lines.clear()
        try:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as e:
            # A full disk or a closed pipe must not take the proxy down: count, say so once.
            if not self.dropped:
                log.error("access log write failed (%s); lines are being dropped", e)
            self.dropped += len(data)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.flush()
        os.close(self.fd)

    def _tick(self) -> None:
        self.flush()
        self.timer = asyncio.get_running_loop().call_later(self.config.flush_interval, self._tick)

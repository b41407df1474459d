"""One upstream response read outside the data plane (active health checks, the cache's background
refreshes), with the data plane's strict :class:`~pyproxy._protocol.ResponseReader` and framed by
the same rules (:func:`~pyproxy.headers.response_framing`): interim 1xx heads skipped, a 101's head
ends it, the body kept up to a limit."""

from __future__ import annotations

from pyproxy._protocol import EV_BODY, EV_HEAD, EV_MORE, ResponseReader
from pyproxy.errors import HeaderError
from pyproxy.headers import response_framing

__all__ = ["UpstreamResponse"]


class UpstreamResponse:
    """Feed it the reads of one connection (``b""`` once it closes); a malformed response raises
    :class:`~pyproxy.errors.HeaderError`."""

    def __init__(self, method: bytes, body_limit: int, max_head: int, max_headers: int, *,
                 switch_allowed: bool = True) -> None:
        self.reader = ResponseReader(max_head, max_headers)
        self.method = method
        self.switch_allowed = switch_allowed  # False: a 101 is an error (nothing asked for one)
        self.body_limit = body_limit
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()  # the first body_limit bytes of the body
        self.size = 0  # of the whole body read
        self.head_done = False  # the final (non-1xx) head has been read
        self.framing: int | None = None  # of its body, once the head is read
        self.complete = False

    @property
    def too_big(self) -> bool:
        """More body than ``body_limit`` came: ``body`` is only its beginning."""
        return self.size > self.body_limit

    def feed(self, data: bytes) -> None:
        reader = self.reader
        if not data:
            self.complete = self.complete or (self.head_done and reader.finish())
            return
        reader.feed(data)
        while (event := reader.next_event()) != EV_MORE:
            if event == EV_HEAD:
                if 100 <= reader.status < 200 and reader.status != 101:
                    reader.next_head()  # 100 Continue, 103 Early Hints ...: a final response follows
                    continue
                self.status, self.headers, self.head_done = reader.status, reader.headers, True
                if reader.status == 101:
                    if not self.switch_allowed:
                        raise HeaderError("101 Switching Protocols to a request that did not ask", None, 502)
                    self.framing, self.complete = 0, True  # a tunnel follows: the head is all of it
                    return
                self.framing = response_framing(reader.status, reader.headers, self.method, reader.version == 11)
                reader.expect_body(self.framing)
            elif event == EV_BODY:
                body = reader.body
                self.size += len(body)
                room = self.body_limit - len(self.body)
                if room > 0:
                    self.body += body[:room]
            else:
                self.complete = True
                return

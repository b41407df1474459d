"""pyproxy's exceptions: one hierarchy, tagged by category (as redis-py's ``redis.exceptions``).

``PyproxyError`` is declared once, in the compiled core, so the Rust and Python sides raise the same
class; every exception of pyproxy's own derives from it. Invalid arguments to the core structures
raise the built-in ``TypeError`` / ``ValueError`` / ``LookupError`` that Python programmers expect,
with messages naming the argument.
"""

from __future__ import annotations

from pyproxy._core import PyproxyError

__all__ = ["CacheError", "CorruptEntry", "HeaderError", "ProtocolError", "PyproxyError", "TierUnavailable"]


class ProtocolError(PyproxyError):
    """Category: a peer broke the HTTP protocol (the proxy answers 4xx to a client, 502 upstream)."""


class HeaderError(ProtocolError, ValueError):
    """A head that a strict HTTP/1.1 proxy must refuse: the message names the problem.

    ``name`` is the offending header's name when the problem is in one header, else ``None``;
    ``status`` is what to answer: 400 for a client's request (501 for a transfer coding we do not
    implement), 502 for an upstream's response. Also a ``ValueError``, since it is raised for bad
    input to the header helpers.
    """

    def __init__(self, message: str, name: bytes | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.name = name
        self.status = status


class CacheError(PyproxyError):
    """Category: the response cache (a tier, or an entry read from one)."""


class CorruptEntry(CacheError, ValueError):
    """Bytes read from a cache tier that are not an intact entry of ours (wrong magic or version,
    truncated, checksum mismatch): the entry is dropped and refetched, never served."""


class TierUnavailable(CacheError):
    """A cache tier failed or timed out; the cache skips it for a while and serves from the others."""

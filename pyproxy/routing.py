"""The route phase: which configured route (and so which pool) serves a request.

Routes are tried in configuration order and the first whose host, path prefix and method all match
wins (as HAProxy's ``use_backend`` lines; nginx's longest-prefix rule is not used because an
explicit order is easier to reason about in one file).

Matching is done on a normalised copy of the path, never on the raw target, so that an encoded or
dotted path cannot slip past a route (``/api/../admin`` is ``/admin``; ``/%61dmin`` is ``/admin``).
Normalisation follows RFC 3986 §6.2.2 and what nginx does before ``location`` matching: the query is
dropped, percent-encoded *unreserved* characters are decoded (``%2F`` stays encoded: it is data, not a
separator), duplicate slashes are merged and dot segments removed. The request is still forwarded with
its original target.

Hosts compare case-insensitively, without port and trailing dot. Lookups for a host are cached: the
list of routes that can match a host is worked out once per distinct host (bounded, so a client
sending random Host headers cannot grow it without limit). The data plane asks with the raw bytes
of the request (:meth:`Router.match_raw`), and whole decisions are remembered per (method, target,
Host) — the same few URLs are asked for over and over, and a remembered decision costs one dict
lookup instead of ~1.5 µs of normalising (bounded too: emptied when full).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from pyproxy.config import Route

__all__ = ["Router", "normalize_host", "normalize_path"]

_UNRESERVED = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_SLASHES = re.compile(r"//+")


def normalize_host(host: str | bytes | None) -> str | None:
    """``Host`` header value → lower-case host without port or trailing dot (``None`` stays)."""
    if host is None:
        return None
    text = host.decode("latin-1") if isinstance(host, bytes) else host
    text = text.strip().lower()
    if text.startswith("["):  # IPv6 literal, maybe with a port
        end = text.find("]")
        return text[: end + 1] if end != -1 else text
    colon = text.rfind(":")
    if colon != -1 and text[colon + 1 :].isdigit():
        text = text[:colon]
    return text.rstrip(".")


def _decode_unreserved(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))


@lru_cache(maxsize=4096)
def normalize_path(target: str) -> str:
    """The path of a request target, normalised for matching (see the module doc)."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        # absolute-form ("http://host/x") or asterisk-form ("*")
        scheme_end = path.find("://")
        if scheme_end != -1:
            slash = path.find("/", scheme_end + 3)
            path = path[slash:] if slash != -1 else "/"
        else:
            return path
    if "%" in path:
        path = _UNRESERVED.sub(_decode_unreserved, path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _prefix_matches(prefix: str, path: str) -> bool:
    """``/api`` matches ``/api`` and ``/api/...`` but not ``/apix``; ``/api/`` only ``/api/...``."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


class Router:
    """First-match routing over a configuration's routes."""

    def __init__(
        self, routes: Sequence[Route], host_cache_size: int = 1024, decision_cache_size: int = 8192
    ) -> None:
        self.routes = tuple(routes)
        self._decisions: dict[tuple[bytes, bytes, bytes | None], Route | None] = {}
        self._decision_cache_size = decision_cache_size
        self._exact_hosts = {r.host for r in self.routes if r.host and not r.host.startswith("*.")}
        self._has_wildcards = any(r.host and r.host.startswith("*.") for r in self.routes)
        self._candidates = lru_cache(maxsize=host_cache_size)(self._routes_for_host)
        # The first route, when it takes every request whose target is a path (no host, no
        # methods, prefix "/"): the data plane then routes those without a lookup.
        first = self.routes[0] if self.routes else None
        self.catch_all: Route | None = (
            first if first is not None and first.host is None and not first.methods and first.path_prefix == "/" else None
        )

    def _routes_for_host(self, host: str | None) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if _host_matches(r.host, host))

    def match(self, method: str, target: str, host: str | bytes | None) -> Route | None:
        """The route for a request, or ``None`` (the data plane answers 404)."""
        h = normalize_host(host)
        if h and h not in self._exact_hosts and not self._has_wildcards:
            h = ""  # every other host sees the same routes: one cache entry for all of them
        path = normalize_path(target)
        for route in self._candidates(h):
            if route.methods and method not in route.methods:
                continue
            if _prefix_matches(route.path_prefix, path):
                return route
        return None

    def match_raw(self, method: bytes, target: bytes, host: bytes | None) -> Route | None:
        """:meth:`match` for the raw bytes of a request head, remembered (see the module doc)."""
        key = (method, target, host)
        try:
            return self._decisions[key]
        except KeyError:
            pass
        route = self.match(method.decode("latin-1"), target.decode("latin-1"), host)
        if len(self._decisions) >= self._decision_cache_size:
            self._decisions.clear()  # a flood of distinct URLs must not grow it without limit
        self._decisions[key] = route
        return route


def _host_matches(pattern: str | None, host: str | None) -> bool:
    if pattern is None:
        return True
    if not host:
        return False
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern

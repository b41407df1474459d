"""HTTP caching rules of a shared cache (RFC 9111), independent of the data plane.

The proxy asks this module four questions, each answered from heads alone:

* **Which key?** :func:`primary_key` — scheme, Host (lower-cased, default port dropped) and target
  (query normalised as the route says); a POST cached by opt-in adds a digest of its body.
  Responses with ``Vary`` are stored under a secondary key made of the request's values of the
  named fields (:func:`vary_key`); ``Vary: *`` never matches, so such responses are not stored.
* **May this response be stored?** :func:`storable` (§3, §3.5): a method we cache (GET, HEAD;
  POST by opt-in), a final status other than 206, no ``no-store`` on either side, not ``private``,
  ``Authorization`` only when the response allows sharing (``public``, ``s-maxage``,
  ``must-revalidate``), ``Set-Cookie`` only when the route allows it, and either explicit freshness
  (``s-maxage``, ``max-age``, ``Expires``), a route's forced TTL, a validator (stored stale and
  revalidated on use), or — only when enabled — heuristic freshness (10% of the time since
  ``Last-Modified``, at most a day, for heuristically cacheable statuses).
* **May this stored response answer this request?** :func:`select` (§4, §4.2, §5.2.1): fresh enough
  for the request's ``max-age`` / ``min-fresh``, or stale within ``max-stale`` or the response's
  ``stale-while-revalidate`` (RFC 5861; served, then refreshed in the background) unless
  ``must-revalidate`` / ``proxy-revalidate`` / ``s-maxage`` / ``no-cache`` forbid it — else
  revalidate with the stored validators. ``only-if-cached`` with nothing usable is a 504.
  ``Age`` is computed as §4.2.3 says, from the stored request/response times, ``Date`` and ``Age``.
* **What changes after a 304, an unsafe method, or a client's own conditional request?**
  :func:`merge_304` (§4.3.4), :func:`invalidated_targets` (§4.4), :func:`client_condition_met`
  (§4.3.2, RFC 9110 §13.1.2 / §13.1.3; weak comparison for ``If-None-Match``).

Also the ``Cache-Status`` response header (RFC 9211) and the stored form of a response
(:class:`StoredResponse`: the status, the times and the header block travel in the entry's
``meta``; the body is the entry's value).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from email.utils import formatdate, parsedate_to_datetime
from enum import Enum
from typing import Literal
from urllib.parse import parse_qsl, urlencode

from pyproxy.headers import get_first, get_list, split_list

__all__ = [
    "CachePolicy",
    "Directives",
    "Freshness",
    "Use",
    "StoredResponse",
    "cache_status",
    "client_condition_met",
    "conditional_headers",
    "current_age",
    "freshness_lifetime",
    "invalidated_targets",
    "merge_304",
    "parse_cache_control",
    "primary_key",
    "select",
    "storable",
    "vary_key",
]

Headers = Sequence[tuple[bytes, bytes]]

CACHEABLE_METHODS = frozenset({b"GET", b"HEAD"})
UNSAFE_METHODS = frozenset({b"POST", b"PUT", b"DELETE", b"PATCH"})
# Statuses a cache may store with heuristic freshness (RFC 9110 §15.1).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
HEURISTIC_FRACTION = 0.1
HEURISTIC_MAX = 86400.0
REVALIDATABLE_KEEP = 86400.0  # how long a response with a validator is kept for revalidation
# Fields a 304 must not overwrite in a stored response (RFC 9111 §3.2; the framing of the stored
# body is ours, not the 304's).
_NOT_UPDATED = frozenset({b"content-length", b"content-encoding", b"transfer-encoding", b"content-range", b"connection", b"keep-alive"})
# Fields a 304 generated from cache carries (RFC 9110 §15.4.5).
_304_FIELDS = (b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified")


# -- directives --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Directives:
    """Cache-Control directives of one message: name (lower case) → argument (``None`` if none).

    A delta-seconds directive that is repeated or not a non-negative integer is ``invalid`` for
    freshness (RFC 9111 §1.2.2, §4.2.1: treat the response as stale).
    """

    values: dict[str, str | None] = field(default_factory=dict)
    invalid: frozenset[str] = frozenset()

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def seconds(self, name: str) -> float | None:
        """A delta-seconds directive's value; ``0.0`` when it is present but invalid."""
        if name not in self.values:
            return None
        if name in self.invalid:
            return 0.0
        raw = self.values[name]
        return float(raw) if raw is not None else 0.0


def parse_cache_control(headers: Headers) -> Directives:
    """The directives of every ``Cache-Control`` line of ``headers`` (and ``Pragma: no-cache`` when
    there is no ``Cache-Control``, RFC 9111 §5.4)."""
    values: dict[str, str | None] = {}
    invalid: set[str] = set()
    elements = get_list(headers, b"cache-control")
    if not elements and b"no-cache" in (e.lower() for e in get_list(headers, b"pragma")):
        return Directives({"no-cache": None})
    for element in elements:
        name, eq, arg = element.partition(b"=")
        key = name.strip().lower().decode("latin-1")
        value: str | None = None
        if eq:
            raw = arg.strip()
            if raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
                raw = raw[1:-1].replace(b"\\", b"")
            value = raw.decode("latin-1")
        if key in _DELTA_SECONDS:
            # max-stale alone is valid ("any staleness"); the others need delta-seconds, once.
            valid = (value is not None and value.isdigit()) or (key == "max-stale" and value is None)
            if key in values or not valid:
                invalid.add(key)
        values.setdefault(key, value)
    return Directives(values, frozenset(invalid))


_DELTA_SECONDS = frozenset({"max-age", "s-maxage", "max-stale", "min-fresh", "stale-while-revalidate", "stale-if-error"})


# -- policy and keys -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachePolicy:
    """A route's caching settings (``[routes.cache]`` in the configuration)."""

    enabled: bool = True
    #: Freshness lifetime for responses that give none themselves (nginx's proxy_cache_valid).
    #: Never overrides ``no-store`` / ``private``.
    forced_ttl: float | None = None
    #: Heuristic freshness for responses with ``Last-Modified`` and no explicit lifetime.
    heuristic: bool = False
    max_object_size: int = 8 << 20
    #: Cache POST responses keyed by a digest of the body (idempotent agent calls).
    cache_post: bool = False
    #: Share responses carrying ``Set-Cookie`` (off: each user's cookie stays theirs).
    share_set_cookie: bool = False
    #: Query normalisation: ``keep`` as sent, ``sort`` parameters, or ``drop`` the query.
    query: Literal["keep", "sort", "drop"] = "keep"
    #: Query parameters left out of the key (tracking parameters and the like).
    ignore_params: frozenset[str] = frozenset()
    tiers: tuple[str, ...] | None = None


def _normal_host(host: bytes, scheme: str) -> str:
    text = host.decode("latin-1").strip().lower()
    default = ":443" if scheme == "https" else ":80"
    if text.endswith(default) and not text.endswith("]" + default[1:]):
        text = text[: -len(default)]
    return text


def primary_key(scheme: str, host: bytes, target: bytes, policy: CachePolicy, body_digest: str | None = None) -> str:
    """The cache key of a request: ``scheme://host/path?query``, the query normalised as the policy
    says; ``body_digest`` (a POST cached by opt-in) is appended."""
    path, sep, query = target.decode("latin-1").partition("?")
    if policy.query == "drop":
        query = ""
    elif policy.query == "sort" or policy.ignore_params:
        pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in policy.ignore_params]
        if policy.query == "sort":
            pairs.sort()
        query = urlencode(pairs)
    key = f"{scheme}://{_normal_host(host, scheme)}{path}"
    if query:
        key += "?" + query
    if body_digest is not None:
        key += "#body=" + body_digest
    return key


def body_digest(body: bytes) -> str:
    """The digest of a POST body that keys its cached response."""
    return hashlib.sha256(body).hexdigest()


def vary_names(response_headers: Headers) -> tuple[str, ...] | None:
    """The request fields a response varies on (lower case, sorted); ``None`` for ``Vary: *``."""
    names = sorted({e.strip().lower().decode("latin-1") for e in get_list(response_headers, b"vary")})
    if "*" in names:
        return None
    return tuple(names)


def vary_key(primary: str, names: Sequence[str], request_headers: Headers) -> str:
    """The secondary key of a request for a response varying on ``names``: its values of those
    fields, normalised (list elements joined with ", ", whitespace trimmed)."""
    if not names:
        return primary
    h = hashlib.sha256()
    for name in names:
        values = b", ".join(e.strip() for e in get_list(request_headers, name.encode()))
        h.update(name.encode() + b"\x00" + values + b"\x00")
    return f"{primary}#vary={h.hexdigest()[:32]}"


# -- the stored response ----------------------------------------------------------------------------------


_META = struct.Struct("<Hdd")  # status, request_time, response_time


@dataclass(frozen=True)
class StoredResponse:
    """A response as the cache keeps it: status, header fields (hop-by-hop ones already removed by
    the caller), and when it was requested and received (for ``Age``). The body is stored beside it."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    request_time: float
    response_time: float

    def to_meta(self) -> bytes:
        block = b"".join(n + b":" + v + b"\r\n" for n, v in self.headers)
        return _META.pack(self.status, self.request_time, self.response_time) + block

    @classmethod
    def from_meta(cls, meta: bytes) -> StoredResponse:
        status, request_time, response_time = _META.unpack_from(meta)
        headers = []
        for line in meta[_META.size :].split(b"\r\n"):
            if line:
                name, _, value = line.partition(b":")
                headers.append((name, value))
        return cls(status, tuple(headers), request_time, response_time)

    def header(self, name: bytes) -> bytes | None:
        return get_first(self.headers, name)


# -- freshness and age -------------------------------------------------------------------------------------


def _http_date(value: bytes | None) -> float | None:
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def freshness_lifetime(response: StoredResponse, policy: CachePolicy, directives: Directives | None = None) -> float:
    """Seconds the response is fresh for (§4.2.1): ``s-maxage``, ``max-age``, ``Expires`` − ``Date``,
    the route's forced TTL, then heuristics if enabled; 0 when none applies."""
    cc = directives if directives is not None else parse_cache_control(response.headers)
    for name in ("s-maxage", "max-age"):
        value = cc.seconds(name)
        if value is not None:
            return value
    expires_raw = response.header(b"expires")
    if expires_raw is not None:
        expires = _http_date(expires_raw)
        if expires is None:
            return 0.0  # an invalid Expires means "already expired" (§5.3)
        date = _http_date(response.header(b"date")) or response.response_time
        return max(0.0, expires - date)
    if policy.forced_ttl is not None:
        return policy.forced_ttl
    if policy.heuristic and response.status in HEURISTIC_STATUSES:
        modified = _http_date(response.header(b"last-modified"))
        if modified is not None:
            date = _http_date(response.header(b"date")) or response.response_time
            return min(HEURISTIC_MAX, max(0.0, (date - modified) * HEURISTIC_FRACTION))
    return 0.0


def current_age(response: StoredResponse, now: float) -> float:
    """The response's age now (§4.2.3)."""
    date = _http_date(response.header(b"date"))
    apparent = max(0.0, response.response_time - date) if date is not None else 0.0
    age_raw = response.header(b"age")
    age_value = float(age_raw) if age_raw is not None and age_raw.strip().isdigit() else 0.0
    corrected_age_value = age_value + max(0.0, response.response_time - response.request_time)
    corrected_initial = max(apparent, corrected_age_value)
    return corrected_initial + max(0.0, now - response.response_time)


@dataclass(frozen=True)
class Freshness:
    lifetime: float
    age: float

    @property
    def fresh(self) -> bool:
        return self.lifetime > self.age

    @property
    def ttl(self) -> float:
        """Seconds of freshness left (negative: stale by that much)."""
        return self.lifetime - self.age


def freshness(response: StoredResponse, policy: CachePolicy, now: float) -> Freshness:
    return Freshness(freshness_lifetime(response, policy), current_age(response, now))


# -- storing ---------------------------------------------------------------------------------------------------


def storable(
    method: bytes,
    request_headers: Headers,
    status: int,
    response_headers: Headers,
    policy: CachePolicy,
) -> str | None:
    """``None`` if the response may be stored by a shared cache, else the reason it may not."""
    if not policy.enabled:
        return "caching is off for the route"
    if method not in CACHEABLE_METHODS and not (method == b"POST" and policy.cache_post):
        return f"{method.decode('latin-1')} responses are not cached"
    if status < 200 or status == 206 or status == 304:
        return f"status {status} is not stored"
    request_cc = parse_cache_control(request_headers)
    response_cc = parse_cache_control(response_headers)
    if "no-store" in request_cc or "no-store" in response_cc:
        return "no-store"
    if "private" in response_cc:
        return "private"
    if vary_names(response_headers) is None:
        return "Vary: *"
    if get_first(request_headers, b"authorization") is not None and not (
        "public" in response_cc or "s-maxage" in response_cc or "must-revalidate" in response_cc
    ):
        return "a response to an authorized request that does not allow sharing"
    if get_first(response_headers, b"set-cookie") is not None and not policy.share_set_cookie:
        return "Set-Cookie (not shared unless the route allows it)"
    explicit = (
        "s-maxage" in response_cc
        or "max-age" in response_cc
        or get_first(response_headers, b"expires") is not None
        or policy.forced_ttl is not None
    )
    validator = get_first(response_headers, b"etag") is not None or get_first(response_headers, b"last-modified") is not None
    heuristic = policy.heuristic and status in HEURISTIC_STATUSES and get_first(response_headers, b"last-modified") is not None
    if not (explicit or validator or heuristic or "public" in response_cc):
        return "no freshness lifetime and no validator"
    return None


def store_ttl(response: StoredResponse, policy: CachePolicy, now: float) -> float:
    """How long the tiers should keep a response: its remaining freshness plus the stale windows it
    may still be used in (``stale-while-revalidate``, ``stale-if-error``); at least a day for one
    with a validator, which a 304 can renew once it is stale (the tiers' LRU bounds the memory)."""
    cc = parse_cache_control(response.headers)
    ttl = freshness(response, policy, now).ttl
    ttl += max(cc.seconds("stale-while-revalidate") or 0.0, cc.seconds("stale-if-error") or 0.0)
    if response.header(b"etag") is not None or response.header(b"last-modified") is not None:
        return max(ttl, REVALIDATABLE_KEEP)  # worth keeping after it goes stale: a 304 renews it
    return ttl


# -- using a stored response -------------------------------------------------------------------------------------


class Use(Enum):
    """What to do with a stored response for a request."""

    FRESH = "fresh"  # serve it
    STALE = "stale"  # serve it stale (the request's max-stale allows it)
    STALE_REVALIDATE = "stale-while-revalidate"  # serve it stale, refresh in the background
    REVALIDATE = "revalidate"  # ask upstream with the stored validators (or plainly, without)


def select(response: StoredResponse, request_headers: Headers, policy: CachePolicy, now: float) -> tuple[Use, Freshness]:
    """How ``response`` may answer a request with ``request_headers`` (§4.2, §5.2.1, RFC 5861)."""
    rc = parse_cache_control(request_headers)
    cc = parse_cache_control(response.headers)
    state = freshness(response, policy, now)
    if "no-cache" in rc or "no-cache" in cc:
        return Use.REVALIDATE, state
    max_age = rc.seconds("max-age")
    min_fresh = rc.seconds("min-fresh") or 0.0
    if state.fresh and (max_age is None or state.age <= max_age) and state.ttl >= min_fresh:
        return Use.FRESH, state
    must = "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
    if must:
        return Use.REVALIDATE, state
    stale_for = -state.ttl
    if "max-stale" in rc and max_age is None:
        limit = rc.values["max-stale"]
        if limit is None or stale_for <= (rc.seconds("max-stale") or 0.0):
            return Use.STALE, state
    swr = cc.seconds("stale-while-revalidate")
    if swr is not None and 0 <= stale_for <= swr and max_age is None and not min_fresh:
        return Use.STALE_REVALIDATE, state
    return Use.REVALIDATE, state


def stale_if_error_allows(response: StoredResponse, request_headers: Headers, policy: CachePolicy, now: float) -> bool:
    """Whether a stale response may answer instead of an upstream error (RFC 5861 §4)."""
    cc = parse_cache_control(response.headers)
    if "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc or "no-cache" in cc:
        return False
    window = parse_cache_control(request_headers).seconds("stale-if-error")
    if window is None:
        window = cc.seconds("stale-if-error")
    return window is not None and -freshness(response, policy, now).ttl <= window


def conditional_headers(response: StoredResponse) -> list[tuple[bytes, bytes]]:
    """Validators to revalidate ``response`` with (§4.3.1)."""
    out = []
    etag = response.header(b"etag")
    if etag is not None:
        out.append((b"If-None-Match", etag.strip()))
    modified = response.header(b"last-modified")
    if modified is not None:
        out.append((b"If-Modified-Since", modified.strip()))
    return out


def merge_304(stored: StoredResponse, not_modified_headers: Headers, request_time: float, response_time: float) -> StoredResponse:
    """The stored response refreshed by a 304 (§4.3.4): the 304's fields replace the stored ones of
    the same name (except framing fields), the others stay; the times are the 304's."""
    fresh = list(not_modified_headers)
    if get_first(fresh, b"date") is None:
        # The old Date would make the refreshed response look as old as the first one (§4.2.3's
        # apparent age); a 304 without one is dated when it arrived (RFC 9110 §6.6.1).
        fresh.append((b"Date", formatdate(response_time, usegmt=True).encode()))
    replaced = {n.lower() for n, _ in fresh if n.lower() not in _NOT_UPDATED}
    kept = [(n, v) for n, v in stored.headers if n.lower() not in replaced]
    added = [(n, v) for n, v in fresh if n.lower() in replaced]
    return replace(stored, headers=tuple(kept + added), request_time=request_time, response_time=response_time)


def _etags(value: bytes) -> list[bytes]:
    return [e.strip() for e in split_list(value)]


def _weak_match(a: bytes, b: bytes) -> bool:
    return a.removeprefix(b"W/") == b.removeprefix(b"W/")


def client_condition_met(method: bytes, request_headers: Headers, stored: StoredResponse) -> bool:
    """Whether a client's conditional GET/HEAD is answered with 304 by the stored response
    (``If-None-Match`` with weak comparison, else ``If-Modified-Since``)."""
    if method not in CACHEABLE_METHODS:
        return False
    inm = get_first(request_headers, b"if-none-match")
    if inm is not None:
        etag = stored.header(b"etag")
        if etag is None:
            return False
        tags = _etags(inm)
        return tags == [b"*"] or any(_weak_match(t, etag.strip()) for t in tags)
    ims = _http_date(get_first(request_headers, b"if-modified-since"))
    if ims is None:
        return False
    modified = _http_date(stored.header(b"last-modified")) or _http_date(stored.header(b"date"))
    return modified is not None and modified <= ims


def not_modified_headers(stored: StoredResponse) -> list[tuple[bytes, bytes]]:
    """The fields a 304 made from the stored response carries (RFC 9110 §15.4.5)."""
    return [(n, v) for n, v in stored.headers if n.lower() in _304_FIELDS]


# -- invalidation ---------------------------------------------------------------------------------------------


def invalidated_targets(method: bytes, status: int, host: bytes, response_headers: Headers) -> list[bytes]:
    """Targets (origin-form) an unsafe request invalidates once it succeeded (§4.4): its own, and
    ``Location`` / ``Content-Location`` when they point at the same host."""
    if method not in UNSAFE_METHODS or not (200 <= status < 400):
        return []
    out: list[bytes] = []
    own_host = host.strip().lower()
    for name in (b"location", b"content-location"):
        value = get_first(response_headers, name)
        if value is None:
            continue
        value = value.strip()
        if value.startswith(b"/"):
            out.append(value)
        elif b"://" in value:
            rest = value.split(b"://", 1)[1]
            other_host, slash, path = rest.partition(b"/")
            if other_host.lower() == own_host:
                out.append(b"/" + path if slash else b"/")
    return out


# -- Cache-Status (RFC 9211) ---------------------------------------------------------------------------------------


def cache_status(
    *,
    hit: bool,
    tier: str | None = None,
    ttl: float | None = None,
    fwd: str | None = None,
    fwd_status: int | None = None,
    stored: bool = False,
    collapsed: bool = False,
    cache: str = "pyproxy",
) -> bytes:
    """A ``Cache-Status`` member for this cache: ``pyproxy; hit; ttl=12; detail=memory`` or
    ``pyproxy; fwd=uri-miss; fwd-status=200; stored``."""
    params = [cache]
    if hit:
        params.append("hit")
    if fwd is not None:
        params.append(f"fwd={fwd}")
    if fwd_status is not None:
        params.append(f"fwd-status={fwd_status}")
    if ttl is not None:
        params.append(f"ttl={math.floor(ttl)}")  # stale: negative (RFC 9211 §2.7)
    if stored:
        params.append("stored")
    if tier is not None:
        params.append(f"detail={tier}")
    if collapsed:
        params.append("collapsed")
    return "; ".join(params).encode()

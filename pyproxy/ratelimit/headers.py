"""Rate-limit response fields and the 429 / 503 answers, from a :class:`~pyproxy.ratelimit.Decision`.

Fields follow the IETF draft "RateLimit header fields for HTTP"
(draft-ietf-httpapi-ratelimit-headers-09/-10, structured fields, RFC 9651):

- ``RateLimit-Policy``: every check of the decision, in order, as ``"<name>";q=<limit>;w=<window>``
  (a List of Items: a quoted policy name, the quota ``q`` and the window ``w`` in whole seconds).
  A sub-second window is advertised as ``w=1`` (the draft's ``w`` is an integer); a client that
  reads it so stays under the real limit. Checks sharing a name are listed once.
- ``RateLimit``: the check that binds — the one that denied, else the one with the least
  remaining (``Decision.binding``) — as ``"<name>";r=<remaining>;t=<seconds>``: ``r`` the units
  left (0 for a key in the penalty box), ``t`` the whole seconds (rounded up) until the request
  would pass when denied, else until the check's usage has aged out entirely.
- ``Retry-After``: on a 429, the whole seconds (rounded up, at least 1) until the same request
  would pass; left out when it never can (its cost is above a limit).

Example (allowed, 20/s per user and 1000/h per route)::

    RateLimit-Policy: "key/1s";q=20;w=1, "route/1h";q=1000;w=3600
    RateLimit: "key/1s";r=19;t=1

Policy names are the checks' names; :func:`check_name` makes them from the level and the window
(``"global"``, ``"route"``, ``"key"``, with ``/<window>`` when a level has several limits), and
:func:`level_of` reads the level back.

The 429 body (``application/json``) names what denied the request::

    {"error": "rate limited", "level": "key", "policy": "key/1s", "limit": 20, "window": 1.0,
     "retry_after": 1, "retry_after_ms": 250, "blocked": false}

``level``: ``global``, ``route`` or ``key``; ``policy``: the denying check's name; ``limit`` and
``window`` (seconds) its limit; ``retry_after``: as ``Retry-After`` (``null`` when it never
passes); ``retry_after_ms``: the exact wait in milliseconds, rounded up (sub-second windows);
``blocked``: the key is in the penalty box. With ``on_redis_error = "deny"`` and Redis
unavailable the answer is a 503 with ``Retry-After: 1`` and
``{"error": "rate limiter unavailable", "retry_after": 1}``.

Bodies come without ``Content-Length``: framing is the caller's (and a HEAD answer drops the
body).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple

from pyproxy.ratelimit.checks import Binding, Check, CheckResult, Decision, TupleMemo

__all__ = [
    "LEVELS",
    "RateLimitResponse",
    "binding_fields",
    "check_name",
    "denied_body",
    "denied_response",
    "format_window",
    "level_of",
    "policy_value",
    "rate_limit_headers",
    "state_value",
    "unavailable_response",
]

#: The levels a check can belong to, from the widest.
LEVELS: Final = ("global", "route", "key")

_JSON: Final = (b"Content-Type", b"application/json")


class RateLimitResponse(NamedTuple):
    """An answer of the limiter's own: status, header pairs (no framing), body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def format_window(seconds: float) -> str:
    """A window as config writes it: ``"100ms"``, ``"1s"``, ``"1.5s"``, ``"5m"``, ``"1h"``, ``"1d"``."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    if seconds < 1.0 and round(seconds * 1000, 6).is_integer():
        return f"{int(round(seconds * 1000))}ms"
    return f"{seconds:g}s"


def check_name(level: str, window: float, several: bool = False) -> str:
    """The name of a check of ``level``: the level alone, or ``level/<window>`` when the level
    has several limits (``"key/1s"``, ``"key/1h"``)."""
    return f"{level}/{format_window(window)}" if several else level


def level_of(check: Check) -> str:
    """The level of a check named by :func:`check_name` (other names are their own level)."""
    level = check.name.partition("/")[0]
    return level if level in LEVELS else check.name


def _sf_string(text: str) -> str:
    """``text`` as a structured-field String: quoted, ``\\`` and ``"`` escaped, and any character
    a String cannot hold (outside visible ASCII and space) replaced by ``?``."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return '"' + "".join(out) + '"'


def _whole_seconds(seconds: float) -> int:
    """Seconds rounded up to an integer (never negative)."""
    return max(0, math.ceil(seconds - 1e-9))


def policy_item(check: Check) -> str:
    """``check``'s item of ``RateLimit-Policy``: its name, quota and window (kept on the check)."""
    return f"{_sf_string(check.name)};q={check.limit};w={max(1, _whole_seconds(check.window))}"


def policy_value(results: Iterable[CheckResult]) -> bytes:
    """The ``RateLimit-Policy`` value: each check (once per name) with its quota and window."""
    return _policy_of(result.check for result in results)


def _policy_of(checks: Iterable[Check]) -> bytes:
    items: dict[str, str] = {}  # name → item: once per name, in order
    for check in checks:
        item = check.policy_item
        if not item:
            item = policy_item(check)
            object.__setattr__(check, "policy_item", item)  # frozen: made once, like the name
        items.setdefault(check.name, item)
    return ", ".join(items.values()).encode()


# binding_fields' memos: the policy value per tuple of checks, the start of the RateLimit value per
# check name. Both bounded: cleared when full.
_POLICIES: TupleMemo[bytes] = TupleMemo()
_STATE_PREFIXES: dict[str, bytes] = {}
_MEMO_SIZE: Final = 4096


def binding_fields(checks: Sequence[Check], binding: Binding) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` and ``RateLimit`` for an allowed request from a limiter's
    ``hit_binding`` answer: the fields :func:`rate_limit_headers` gives for the whole decision."""
    check, remaining, reset = binding
    state = b"%s%d;t=%d" % (_state_prefix(check), max(0, remaining), max(0, math.ceil(reset - 1e-9)))  # _whole_seconds
    return [(b"RateLimit-Policy", _policy_memo(checks)), (b"RateLimit", state)]


def plan_fields(checks: Sequence[Check]) -> tuple[tuple[bytes, bytes], bytes, list[bytes]]:
    """What a ``ChargePlan`` needs to write :func:`binding_fields`' fields itself: the
    ``RateLimit-Policy`` field, the ``RateLimit`` name, and each check's start of its value."""
    return (b"RateLimit-Policy", _policy_memo(checks)), b"RateLimit", [_state_prefix(c) for c in checks]


def _policy_memo(checks: Sequence[Check]) -> bytes:
    try:
        return _POLICIES.get(checks)
    except KeyError:
        pass
    policy = _policy_of(checks)
    _POLICIES.put(checks, None, policy)
    return policy


def _state_prefix(check: Check) -> bytes:
    """``"name";r=``: the start of the ``RateLimit`` value advertising ``check``."""
    prefix = _STATE_PREFIXES.get(check.name)
    if prefix is None:
        if len(_STATE_PREFIXES) >= _MEMO_SIZE:
            _STATE_PREFIXES.clear()
        prefix = _STATE_PREFIXES[check.name] = f"{_sf_string(check.name)};r=".encode()
    return prefix


def state_value(decision: Decision) -> bytes | None:
    """The ``RateLimit`` value for the binding check (``None`` for a decision without checks)."""
    result = decision.binding
    if result is None:
        return None
    remaining = 0 if result.blocked else max(0, result.remaining)
    if not result.allowed and not math.isinf(result.retry_after):
        reset = max(1, _whole_seconds(result.retry_after))
    else:
        reset = _whole_seconds(result.reset)
    return f"{_sf_string(result.check.name)};r={remaining};t={reset}".encode()


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` and ``RateLimit`` for ``decision``, and ``Retry-After`` if denied."""
    state = state_value(decision)
    if state is None:
        return []
    headers = [(b"RateLimit-Policy", policy_value(decision.results)), (b"RateLimit", state)]
    retry = decision.retry_after_header
    if retry is not None:
        headers.append((b"Retry-After", str(retry).encode()))
    return headers


def denied_body(decision: Decision) -> bytes:
    """The 429 JSON body for a denied ``decision`` (see the module's docstring)."""
    denied = decision.denied
    result = decision.results[denied] if denied is not None else decision.binding
    retry = decision.retry_after_header
    exact = decision.retry_after
    body: dict[str, object] = {"error": "rate limited"}
    if result is not None:
        check = result.check
        body |= {
            "level": level_of(check),
            "policy": check.name,
            "limit": check.limit,
            "window": float(check.window),
        }
    body |= {
        "retry_after": retry,
        "retry_after_ms": None if math.isinf(exact) else max(1, math.ceil(exact * 1000 - 1e-6)),
        "blocked": decision.blocked or (result is not None and result.blocked),
    }
    return json.dumps(body).encode()


def denied_response(decision: Decision) -> RateLimitResponse:
    """The 429 answer for a denied ``decision``: the rate-limit fields, ``Retry-After`` and the
    JSON body naming the level that denied."""
    return RateLimitResponse(429, [_JSON, *rate_limit_headers(decision)], denied_body(decision))


def unavailable_response(retry_after: int = 1) -> RateLimitResponse:
    """The 503 answer while the shared limiter is unavailable (``on_redis_error = "deny"``)."""
    body = json.dumps({"error": "rate limiter unavailable", "retry_after": retry_after}).encode()
    return RateLimitResponse(503, [_JSON, (b"Retry-After", str(retry_after).encode())], body)

"""HTTP/1.1 head helpers for the proxy's data plane: validate, look up, rewrite and serialize headers.

Headers are what the data plane's message readers (``pyproxy._protocol.RequestReader`` /
``ResponseReader``) make of a head: a list of ``(name, value)`` ``bytes`` pairs in arrival order,
duplicates kept, names in their original case. Every helper takes that
list as is; no dict is built on the hot path.

Two implementations with one behaviour (same outputs, same exceptions and messages):

* ``pyproxy._speedups`` — Cython, used when it imports (the normal, built case);
* the ``py_*`` functions below — the plain-Python reference, used when the extension is missing or
  ``PYPROXY_NO_SPEEDUPS=1`` is set, and held against the Cython module by ``tests/test_headers.py``.

(One difference, on misuse only: given items that are not 2-tuples, the Cython rewrites unpack
them all before validating, so an unpacking error may win over an earlier header's HeaderError.)

The public names (``rewrite_request_head`` ...) are bound to whichever is in use;
:data:`IMPLEMENTATION` says which (``"cython"`` or ``"python"``).

Rules (RFC 9110 §5.5, §5.6, §7.6; RFC 9112 §3, §5):

* **Validation.** A field name is a ``token`` (``tchar`` bytes only, non-empty). A field value may
  hold HTAB, SP, VCHAR and obs-text (0x80-0xFF); NUL, CR, LF, DEL and every other control byte are
  rejected with :class:`HeaderError` (a strict proxy answers 400). Leading/trailing whitespace is
  not an error (recipients strip it). Everything the rewrite and serialize helpers *write* is
  validated too — including values the caller supplies — so no CR/LF can ever be injected into a
  head we emit.
* **Hop-by-hop removal** (both directions): ``Connection``, ``Keep-Alive``, ``Proxy-Connection``,
  ``TE``, ``Transfer-Encoding``, ``Content-Length``, ``Proxy-Authorization``,
  ``Proxy-Authenticate``, ``Upgrade`` (kept when ``upgrade=True``, i.e. tunnelling), and every
  header named in a ``Connection`` line (comma-separated, case-insensitive, OWS and empty elements
  ignored) — except the headers this module manages itself: ``Host``, ``Forwarded``,
  ``X-Forwarded-For/-Proto/-Host``, ``Via`` and the request-id header. Choices and deviations:

  - ``Content-Length``/``Transfer-Encoding`` are always removed: the caller re-frames the body and
    says how with ``content_length=`` or ``chunked=True`` (neither: no body). Forgetting this would
    leave the body unframed, so it is explicit by design.
  - ``TE`` is removed entirely, ``trailers`` included (nginx does the same; Envoy keeps
    ``te: trailers`` for gRPC over HTTP/2). RFC 9110 §10.1.4 makes TE describe *this hop's*
    connection, which we re-frame and on which we promise no trailers; a caller that relays
    trailers can add ``(b"TE", b"trailers"), (b"Connection", b"TE")`` through ``extra``.
  - ``Proxy-Authorization``/``Proxy-Authenticate`` are removed as Go's ``httputil.ReverseProxy``
    does: as a reverse proxy we are the credentials' final recipient, and forwarding them would
    leak proxy credentials to the origin (nginx passes them through).
  - ``Trailer`` and ``Expect`` are end-to-end (RFC 9110 §6.6.2, §10.1.1) and pass through (nginx
    drops ``Expect`` because it answers ``100-continue`` itself; a caller doing that removes it).
  - Connection may not remove the managed headers above: RFC 9110 says remove every nominated
    field, but honouring ``Connection: X-Forwarded-For`` lets a client strip the entries added by a
    trusted front proxy (the "hop-by-hop header abuse" attack), and ``Connection: Host`` would
    leave an invalid HTTP/1.1 request. nginx ignores nominated fields altogether.
* **Request rewrite** (:func:`rewrite_request_head`): ``Host`` stays in place (its value replaced
  when ``host=`` is given; put first when the request had none); a second ``Host`` line is a
  :class:`HeaderError` (RFC 9112 §3.2 requires 400), and so is a head that would leave without one.
  Appended after the kept headers, in this order: ``X-Forwarded-For`` (all prior lines' elements
  combined into one line, in order, then the client address — HAProxy's ``option forwardfor``
  instead adds a separate line; RFC 9110 §5.3 makes the two equivalent), ``X-Forwarded-Proto``
  (replaces any sent), ``X-Forwarded-Host`` (the *received* Host; replaces any sent; omitted when
  the request had no Host), ``Via`` (prior values combined, then ours), the request id, the
  ``extra`` pairs, ``Connection: upgrade`` when tunnelling, and the framing header.
  The request id: the caller's ``request_id`` if given (replacing any sent), else the first
  non-empty one the client sent, else a new one from :func:`new_request_id` (32 lowercase hex digits
  from 16 random bytes — nginx's ``$request_id`` format). Envoy at the edge regenerates
  external requests' ids by default; pass ``request_id=new_request_id()`` for that behaviour.
* **Response rewrite** (:func:`rewrite_response_head`): the same hop-by-hop removal, ``Via``
  combined and appended, the request-id header replaced by ours when given, ``Server`` dropped on
  request, reason phrase from :func:`reason_phrase` when absent.
* **Lists** (:func:`split_list`): elements split on commas outside quoted-strings, OWS stripped,
  empty elements dropped (RFC 9110 §5.6.1).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from http import HTTPStatus
from typing import Final

from pyproxy.errors import HeaderError

__all__ = [
    "CHUNKED",
    "UNTIL_CLOSE",
    "request_framing",
    "response_framing",
    "IMPLEMENTATION",
    "HeaderError",
    "connection_tokens",
    "get_all",
    "get_first",
    "get_list",
    "new_request_id",
    "reason_phrase",
    "request_value",
    "rewrite_request_head",
    "rewrite_response_head",
    "serialize_request_head",
    "serialize_response_head",
    "split_list",
    "validate_headers",
    "validate_name",
    "validate_value",
]

Headers = Iterable[tuple[bytes, bytes]]


# --- error constructors, shared by both implementations (the Cython module calls these) ---------

def _byte_kind(b: int) -> str:
    if b == 0:
        return "NUL"
    if b == 0x0D:
        return "CR"
    if b == 0x0A:
        return "LF"
    if b == 0x09:
        return "HTAB"
    if b == 0x20:
        return "space"
    if b == 0x7F:
        return "DEL"
    if b < 0x20:
        return "control character"
    if b >= 0x80:
        return "non-ASCII byte"
    return "separator"


def _bad_token(what: str, token: bytes, offset: int, name: bytes | None) -> HeaderError:
    if not token:
        return HeaderError(f"empty {what}", name)
    b = token[offset]
    return HeaderError(
        f"invalid {what} {token!r}: {_byte_kind(b)} (0x{b:02x}) at offset {offset}"
        " is not a token character",
        name,
    )


def _bad_name(name: bytes, offset: int) -> HeaderError:
    return _bad_token("header name", name, offset, name)


def _bad_method(method: bytes, offset: int) -> HeaderError:
    return _bad_token("method", method, offset, None)


def _bad_value(name: bytes, value: bytes, offset: int) -> HeaderError:
    b = value[offset]
    return HeaderError(
        f"invalid value for header {name!r}: {_byte_kind(b)} (0x{b:02x}) at offset {offset}",
        name,
    )


def _bad_target(target: bytes, offset: int) -> HeaderError:
    if not target:
        return HeaderError("empty request target")
    b = target[offset]
    return HeaderError(f"invalid request target: {_byte_kind(b)} (0x{b:02x}) at offset {offset}")


def _bad_reason(reason: bytes, offset: int) -> HeaderError:
    b = reason[offset]
    return HeaderError(f"invalid reason phrase: {_byte_kind(b)} (0x{b:02x}) at offset {offset}")


def _multiple_host() -> HeaderError:
    return HeaderError("multiple Host header lines", b"Host")


def _missing_host() -> HeaderError:
    return HeaderError("missing Host header", b"Host")


# --- byte classes -------------------------------------------------------------------------------

_TCHAR: Final = (
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
# bytes.translate(None, delete) keeps only the bytes NOT in ``delete``: a non-empty result means
# the input holds a byte outside the allowed class (C speed; the offending offset is found only
# on the error path).
_VALUE_OK: Final = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
_TARGET_OK: Final = bytes([*range(0x21, 0x7F), *range(0x80, 0x100)])
_OWS: Final = b" \t"


def _first_outside(data: bytes, allowed: bytes) -> int:
    return next(i for i, b in enumerate(data) if b not in allowed)


def py_validate_name(name: bytes) -> None:
    """Raise :class:`HeaderError` unless ``name`` is a non-empty RFC 9110 ``token``."""
    if not isinstance(name, bytes):
        raise TypeError(f"header name must be bytes, not {type(name).__name__}")
    if not name or name.translate(None, _TCHAR):
        raise _bad_name(name, _first_outside(name, _TCHAR) if name else 0)


def py_validate_value(value: bytes, name: bytes = b"") -> None:
    """Raise :class:`HeaderError` if ``value`` holds NUL, CR, LF or another CTL other than HTAB.

    ``name`` only labels the error.
    """
    if not isinstance(value, bytes) or not isinstance(name, bytes):
        raise TypeError("header name and value must be bytes")
    if value.translate(None, _VALUE_OK):
        raise _bad_value(name, value, _first_outside(value, _VALUE_OK))


def _not_bytes(name: object, value: object) -> TypeError:
    return TypeError(
        "header names and values must be bytes, not "
        f"{type(name).__name__} and {type(value).__name__}"
    )


def _check_field(name: object, value: object) -> None:
    if not isinstance(name, bytes) or not isinstance(value, bytes):
        raise _not_bytes(name, value)
    if not name or name.translate(None, _TCHAR):
        raise _bad_name(name, _first_outside(name, _TCHAR) if name else 0)
    if value.translate(None, _VALUE_OK):
        raise _bad_value(name, value, _first_outside(value, _VALUE_OK))


def _check_method(method: object) -> None:
    if not isinstance(method, bytes):
        raise TypeError(f"method must be bytes, not {type(method).__name__}")
    if not method or method.translate(None, _TCHAR):
        raise _bad_method(method, _first_outside(method, _TCHAR) if method else 0)


def _check_target(target: object) -> None:
    if not isinstance(target, bytes):
        raise TypeError(f"target must be bytes, not {type(target).__name__}")
    if not target or target.translate(None, _TARGET_OK):
        raise _bad_target(target, _first_outside(target, _TARGET_OK) if target else 0)


def _check_param(value: object, header: bytes, what: str) -> None:
    """A caller-supplied header value: bytes, non-empty, valid."""
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if value.translate(None, _VALUE_OK):
        raise _bad_value(header, value, _first_outside(value, _VALUE_OK))


def _check_framing(content_length: object, chunked: object) -> int:
    """Return the Content-Length to write, -1 for chunked, -2 for no framing header."""
    if content_length is None:
        return -1 if chunked else -2
    if not isinstance(content_length, int) or isinstance(content_length, bool):
        raise TypeError(f"content_length must be int or None, not {type(content_length).__name__}")
    if chunked:
        raise ValueError("content_length and chunked are mutually exclusive")
    if content_length < 0 or content_length > 0x7FFF_FFFF_FFFF_FFFF:
        raise ValueError(f"content_length out of range: {content_length}")
    return content_length


def _check_status(status: object) -> int:
    if not isinstance(status, int) or isinstance(status, bool):
        raise TypeError(f"status must be int, not {type(status).__name__}")
    if not 100 <= status <= 999:
        raise ValueError(f"status must be a 3-digit code, got {status}")
    return status


def py_validate_headers(headers: Headers) -> None:
    """Validate every ``(name, value)`` pair in order; raise :class:`HeaderError` on the first bad one."""
    for name, value in headers:
        _check_field(name, value)


# --- lists and lookups --------------------------------------------------------------------------

def py_split_list(value: bytes) -> list[bytes]:
    """Split a list-based field value into its elements (RFC 9110 §5.6.1).

    Commas inside quoted-strings (with backslash escapes) do not split; OWS around elements is
    stripped and empty elements are dropped.
    """
    if not isinstance(value, bytes):
        raise TypeError(f"value must be bytes, not {type(value).__name__}")
    if b'"' not in value:
        return [e for e in (x.strip(_OWS) for x in value.split(b",")) if e]
    out: list[bytes] = []
    n = len(value)
    i = start = 0
    quoted = False
    while i < n:
        c = value[i]
        if quoted:
            if c == 0x5C:  # backslash: the next byte is literal
                i += 2
                continue
            if c == 0x22:
                quoted = False
        elif c == 0x22:
            quoted = True
        elif c == 0x2C:
            element = value[start:i].strip(_OWS)
            if element:
                out.append(element)
            start = i + 1
        i += 1
    element = value[start:].strip(_OWS)
    if element:
        out.append(element)
    return out


def _lookup_name(name: object) -> bytes:
    if not isinstance(name, bytes):
        raise TypeError(f"name must be bytes, not {type(name).__name__}")
    return name.lower()


def _item_name(n: object) -> bytes:
    if not isinstance(n, bytes):
        raise TypeError(f"header names must be bytes, not {type(n).__name__}")
    return n


def py_get_first(headers: Headers, name: bytes) -> bytes | None:
    """The value of the first header called ``name`` (case-insensitive), or ``None``."""
    lower = _lookup_name(name)
    for n, v in headers:
        if _item_name(n).lower() == lower:
            return v
    return None


def py_get_all(headers: Headers, name: bytes) -> list[bytes]:
    """The values of every header called ``name`` (case-insensitive), in order."""
    lower = _lookup_name(name)
    return [v for n, v in headers if _item_name(n).lower() == lower]


def py_get_list(headers: Headers, name: bytes) -> list[bytes]:
    """The list elements (:func:`split_list`) of every header called ``name``, in order."""
    lower = _lookup_name(name)
    out: list[bytes] = []
    for n, v in headers:
        if _item_name(n).lower() == lower:
            out += py_split_list(v)
    return out


def py_connection_tokens(headers: Headers) -> frozenset[bytes]:
    """The lower-cased connection options of every ``Connection`` line (``close``, header names ...)."""
    return frozenset(e.lower() for e in py_get_list(headers, b"connection"))


def py_reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (``b""`` for codes without one)."""
    return _REASONS.get(_check_status(status), b"")


_REASONS: Final[dict[int, bytes]] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


# --- request ids --------------------------------------------------------------------------------

_ID_BYTES: Final = 16
_POOL_BYTES: Final = 4096  # one getrandom() call per 256 ids
_pool = b""
_pool_pos = 0
# Threads could otherwise read the same slice between bytecodes (the Cython twin runs its
# check-take-advance without releasing the GIL, so it needs no lock).
_pool_lock = threading.Lock()


def _reset_pool() -> None:
    # A forked worker must not hand out the ids its parent already buffered.
    global _pool, _pool_pos, _pool_lock
    _pool = b""
    _pool_pos = 0
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_pool)


def py_new_request_id() -> bytes:
    """A fresh request id: 32 lowercase hex digits of 16 random bytes (``os.urandom``, batched)."""
    global _pool, _pool_pos
    with _pool_lock:
        if _pool_pos + _ID_BYTES > len(_pool):
            _pool = os.urandom(_POOL_BYTES)
            _pool_pos = 0
        pos = _pool_pos
        _pool_pos = pos + _ID_BYTES
        chunk = _pool[pos:pos + _ID_BYTES]
    return chunk.hex().encode("ascii")


# --- serialization and rewrite ------------------------------------------------------------------

# Header classes for the rewrite (the Cython module uses the same table).
_OTHER: Final = 0
_HOP: Final = 1
_CONNECTION: Final = 2
_UPGRADE: Final = 3
_HOST: Final = 4
_XFF: Final = 5
_XFWD: Final = 6  # X-Forwarded-Proto / X-Forwarded-Host: regenerated
_VIA: Final = 7
_SERVER: Final = 8
_FORWARDED: Final = 9
_RID: Final = 10

_CLASS: Final[dict[bytes, int]] = {
    b"connection": _CONNECTION,
    b"keep-alive": _HOP,
    b"proxy-connection": _HOP,
    b"te": _HOP,
    b"transfer-encoding": _HOP,
    b"content-length": _HOP,
    b"proxy-authorization": _HOP,
    b"proxy-authenticate": _HOP,
    b"upgrade": _UPGRADE,
    b"host": _HOST,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFWD,
    b"x-forwarded-host": _XFWD,
    b"via": _VIA,
    b"server": _SERVER,
    b"forwarded": _FORWARDED,
}

_CRLF: Final = b"\r\n"
_SEP: Final = b": "


def py_serialize_request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """``METHOD SP target SP HTTP/1.1 CRLF``, the headers in order and case as given, ``CRLF``.

    Everything is validated first (:class:`HeaderError` names the first problem).
    """
    _check_method(method)
    _check_target(target)
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        _check_field(name, value)
        parts += (name, _SEP, value, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def py_serialize_response_head(status: int, reason: bytes | None, headers: Headers) -> bytes:
    """``HTTP/1.1 SP status SP reason CRLF``, the headers in order and case as given, ``CRLF``.

    ``reason=None`` or ``b""`` uses :func:`reason_phrase`.
    """
    parts = [_status_line(status, reason)]
    for name, value in headers:
        _check_field(name, value)
        parts += (name, _SEP, value, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def _status_line(status: int, reason: bytes | None) -> bytes:
    code = _check_status(status)
    if reason is None or reason == b"":
        reason = _REASONS.get(code, b"")
    elif not isinstance(reason, bytes):
        raise TypeError(f"reason must be bytes or None, not {type(reason).__name__}")
    elif reason.translate(None, _VALUE_OK):
        raise _bad_reason(reason, _first_outside(reason, _VALUE_OK))
    return b"HTTP/1.1 %d %s\r\n" % (code, reason)


def _check_extra(extra: Headers) -> list[tuple[bytes, bytes]]:
    pairs = []
    for name, value in extra:
        _check_field(name, value)
        pairs.append((name, value))
    return pairs


def _rid_lower(request_id_header: object) -> bytes:
    if not isinstance(request_id_header, bytes):
        raise TypeError(
            f"request_id_header must be bytes, not {type(request_id_header).__name__}"
        )
    if not request_id_header or request_id_header.translate(None, _TCHAR):
        raise _bad_name(
            request_id_header,
            _first_outside(request_id_header, _TCHAR) if request_id_header else 0,
        )
    return request_id_header.lower()


def _tail(
    parts: list[bytes],
    extra: list[tuple[bytes, bytes]],
    tunnel: bool,
    framing: int,
) -> bytes:
    for name, value in extra:
        parts += (name, _SEP, value, _CRLF)
    if tunnel:
        parts.append(b"Connection: upgrade\r\n")
    if framing >= 0:
        parts.append(b"Content-Length: %d\r\n" % framing)
    elif framing == -1:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(_CRLF)
    return b"".join(parts)


def py_rewrite_request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    *,
    client: bytes,
    proto: bytes = b"http",
    host: bytes | None = None,
    via: bytes | None = b"1.1 pyproxy",
    request_id: bytes | None = None,
    request_id_header: bytes = b"X-Request-ID",
    upgrade: bool = False,
    content_length: int | None = None,
    chunked: bool = False,
    extra: Headers = (),
) -> tuple[bytes, bytes]:
    """Rewrite a received request head for the upstream; return ``(head, request_id)``.

    ``client`` is the peer address appended to ``X-Forwarded-For``; ``proto`` goes to
    ``X-Forwarded-Proto``; ``host`` replaces the Host value; ``via`` is the element appended to
    ``Via`` (``None``: leave Via alone); ``request_id`` replaces the client's id (``None``: keep the
    client's or generate one); ``upgrade=True`` keeps ``Upgrade`` for a tunnel; ``content_length``
    / ``chunked`` choose the framing header; ``extra`` pairs are appended. See the module
    docstring for the rules.
    """
    framing = _check_framing(content_length, chunked)
    _check_method(method)
    _check_target(target)
    _check_param(client, b"X-Forwarded-For", "client")
    _check_param(proto, b"X-Forwarded-Proto", "proto")
    if host is not None:
        _check_param(host, b"Host", "host")
    if via is not None:
        _check_param(via, b"Via", "via")
    rid_lower = _rid_lower(request_id_header)
    if request_id is not None:
        _check_param(request_id, request_id_header, "request_id")

    # Pass 1: validate and classify; Connection may name a header that came before it.
    kept: list[tuple[bytes, bytes, bytes | None]] = []  # lower is None: not removable
    tokens: set[bytes] = set()
    forwarded_for: list[bytes] = []
    vias: list[bytes] = []
    received_host: bytes | None = None
    client_rid: bytes | None = None
    tunnel = False
    for name, value in headers:
        _check_field(name, value)
        lower = name.lower()
        cls = _RID if lower == rid_lower else _CLASS.get(lower, _OTHER)
        if cls == _OTHER or cls == _SERVER:
            kept.append((name, value, lower))
        elif cls == _HOP:
            pass
        elif cls == _CONNECTION:
            tokens.update(e.lower() for e in py_split_list(value))
        elif cls == _HOST:
            if received_host is not None:
                raise _multiple_host()
            received_host = value
            kept.append((name, value if host is None else host, None))
        elif cls == _XFF:
            forwarded_for += py_split_list(value)
        elif cls == _VIA:
            if via is None:
                kept.append((name, value, None))
            else:
                value = value.strip(_OWS)
                if value:
                    vias.append(value)
        elif cls == _RID:
            if request_id is None and client_rid is None:
                value = value.strip(_OWS)
                if value:
                    client_rid = value
        elif cls == _UPGRADE:
            if upgrade:
                tunnel = True
                kept.append((name, value, None))
        elif cls == _FORWARDED:
            kept.append((name, value, None))
        # _XFWD: dropped, regenerated below
    extra_pairs = _check_extra(extra)

    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if received_host is None:
        if host is None:
            raise _missing_host()
        parts += (b"Host: ", host, _CRLF)
    for name, value, key in kept:
        if key is None or key not in tokens:
            parts += (name, _SEP, value, _CRLF)
    forwarded_for.append(client)
    parts += (b"X-Forwarded-For: ", b", ".join(forwarded_for), _CRLF)
    parts += (b"X-Forwarded-Proto: ", proto, _CRLF)
    if received_host is not None:
        parts += (b"X-Forwarded-Host: ", received_host, _CRLF)
    if via is not None:
        vias.append(via)
        parts += (b"Via: ", b", ".join(vias), _CRLF)
    rid = request_id if request_id is not None else client_rid
    if rid is None:
        rid = py_new_request_id()
    parts += (request_id_header, _SEP, rid, _CRLF)
    return _tail(parts, extra_pairs, tunnel, framing), rid


def py_rewrite_response_head(
    status: int,
    reason: bytes | None,
    headers: Headers,
    *,
    via: bytes | None = b"1.1 pyproxy",
    request_id: bytes | None = None,
    request_id_header: bytes = b"X-Request-ID",
    drop_server: bool = False,
    upgrade: bool = False,
    content_length: int | None = None,
    chunked: bool = False,
    extra: Headers = (),
) -> bytes:
    """Rewrite an upstream response head for the client; return the serialized head.

    Hop-by-hop removal as for requests; ``via`` appended to ``Via``; the request-id header
    replaced by ``request_id`` when given; ``Server`` removed when ``drop_server``; ``reason``
    ``None``/``b""`` takes the standard phrase; ``content_length`` / ``chunked`` / ``extra`` as for
    :func:`rewrite_request_head`.
    """
    framing = _check_framing(content_length, chunked)
    status_line = _status_line(status, reason)
    if via is not None:
        _check_param(via, b"Via", "via")
    rid_lower = _rid_lower(request_id_header)
    if request_id is not None:
        _check_param(request_id, request_id_header, "request_id")

    kept: list[tuple[bytes, bytes, bytes | None]] = []
    tokens: set[bytes] = set()
    vias: list[bytes] = []
    tunnel = False
    for name, value in headers:
        _check_field(name, value)
        lower = name.lower()
        cls = _RID if lower == rid_lower else _CLASS.get(lower, _OTHER)
        if cls == _OTHER:
            kept.append((name, value, lower))
        elif cls == _SERVER:
            if not drop_server:
                kept.append((name, value, lower))
        elif cls == _HOP:
            pass
        elif cls == _CONNECTION:
            tokens.update(e.lower() for e in py_split_list(value))
        elif cls == _VIA:
            if via is None:
                kept.append((name, value, None))
            else:
                value = value.strip(_OWS)
                if value:
                    vias.append(value)
        elif cls == _RID:
            if request_id is None:
                kept.append((name, value, None))
        elif cls == _UPGRADE:
            if upgrade:
                tunnel = True
                kept.append((name, value, None))
        else:  # Host, Forwarded, X-Forwarded-*: not ours to manage in a response
            kept.append((name, value, None))
    extra_pairs = _check_extra(extra)

    parts = [status_line]
    for name, value, key in kept:
        if key is None or key not in tokens:
            parts += (name, _SEP, value, _CRLF)
    if via is not None:
        vias.append(via)
        parts += (b"Via: ", b", ".join(vias), _CRLF)
    if request_id is not None:
        parts += (request_id_header, _SEP, request_id, _CRLF)
    return _tail(parts, extra_pairs, tunnel, framing)


# --- facade -------------------------------------------------------------------------------------

IMPLEMENTATION: str
"""``"cython"`` when the public names below are ``pyproxy._speedups``'s, ``"python"`` otherwise."""

try:
    if os.environ.get("PYPROXY_NO_SPEEDUPS") == "1":
        raise ImportError("PYPROXY_NO_SPEEDUPS=1")
    from pyproxy import _speedups
except ImportError:
    IMPLEMENTATION = "python"
    validate_name = py_validate_name
    validate_value = py_validate_value
    validate_headers = py_validate_headers
    split_list = py_split_list
    get_first = py_get_first
    get_all = py_get_all
    get_list = py_get_list
    connection_tokens = py_connection_tokens
    reason_phrase = py_reason_phrase
    new_request_id = py_new_request_id
    serialize_request_head = py_serialize_request_head
    serialize_response_head = py_serialize_response_head
    rewrite_request_head = py_rewrite_request_head
    rewrite_response_head = py_rewrite_response_head
else:
    IMPLEMENTATION = "cython"
    validate_name = _speedups.validate_name
    validate_value = _speedups.validate_value
    validate_headers = _speedups.validate_headers
    split_list = _speedups.split_list
    get_first = _speedups.get_first
    get_all = _speedups.get_all
    get_list = _speedups.get_list
    connection_tokens = _speedups.connection_tokens
    reason_phrase = _speedups.reason_phrase
    new_request_id = _speedups.new_request_id
    serialize_request_head = _speedups.serialize_request_head
    serialize_response_head = _speedups.serialize_response_head
    rewrite_request_head = _speedups.rewrite_request_head
    rewrite_response_head = _speedups.rewrite_response_head


# --- message framing (RFC 9112 §6) --------------------------------------------------------------
# One implementation over the facade above: a few lookups per message, which the compiled
# get_all/split_list already make cheap. (Move it into Cython if profiling ever says so.)

CHUNKED: Final = -1
"""Framing result: the body is chunked."""
UNTIL_CLOSE: Final = -2
"""Framing result: the body runs until the connection closes (responses only)."""

_MAX_LENGTH_DIGITS: Final = 18  # < 2**63, so a length always fits a signed 64-bit counter


def _content_length(lines: list[bytes], status: int) -> int:
    if len(lines) > 1:
        raise HeaderError("duplicate Content-Length header lines", b"Content-Length", status)
    value = lines[0].strip(_OWS)
    if not value.isdigit() or not value.isascii():
        raise HeaderError(f"invalid Content-Length {lines[0]!r}", b"Content-Length", status)
    if len(value.lstrip(b"0")) > _MAX_LENGTH_DIGITS:
        raise HeaderError(f"Content-Length {value!r} is too large", b"Content-Length", status)
    return int(value)


def _transfer_coding(lines: list[bytes], status: int, unsupported_status: int) -> int:
    for line in lines:
        # RFC 9110 §5.6.1 lets a list carry empty elements, but parsers disagree on
        # "chunked," and on an empty field (llhttp refuses both): a framing field must be
        # read one way only.
        if any(not part.strip(b" \t") for part in line.split(b",")):
            raise HeaderError(
                f"an empty element in Transfer-Encoding {line!r}", b"Transfer-Encoding", status
            )
    codings = [c.lower() for line in lines for c in split_list(line)]
    if codings == [b"chunked"]:
        return CHUNKED
    if not codings or codings[-1] != b"chunked":
        raise HeaderError(
            f"chunked is not the final transfer coding in {b', '.join(lines)!r}",
            b"Transfer-Encoding",
            status,
        )
    if b"chunked" in codings[:-1]:  # RFC 9112 §7: never applied more than once
        raise HeaderError(
            f"chunked applied more than once in {b', '.join(lines)!r}", b"Transfer-Encoding", status
        )
    raise HeaderError(
        f"transfer coding {b', '.join(codings[:-1])!r} is not supported",
        b"Transfer-Encoding",
        unsupported_status,
    )


def request_framing(headers: Headers, http11: bool = True) -> int:
    """How a request's body is delimited: its length (``0``: no body) or :data:`CHUNKED`.

    Strict, as a proxy in front of other parsers must be to prevent request smuggling
    (RFC 9112 §6.1, §6.3, §11.2): :class:`HeaderError` (``status`` 400) for both Content-Length and
    Transfer-Encoding, for Transfer-Encoding in an HTTP/1.0 request, for more than one
    Content-Length line (nginx does the same; RFC 9110 would allow identical ones), for a
    Content-Length that is not plain digits (no sign, list or inner space) or needs more than 63
    bits, and for a Transfer-Encoding whose final coding is not chunked; 501 for a coding before
    ``chunked`` (e.g. ``gzip, chunked``), which we do not decode.
    """
    te = get_all(headers, b"transfer-encoding")
    cl = get_all(headers, b"content-length")
    if te:
        if cl:
            raise HeaderError("both Content-Length and Transfer-Encoding", b"Transfer-Encoding")
        if not http11:
            raise HeaderError("Transfer-Encoding in an HTTP/1.0 request", b"Transfer-Encoding")
        return _transfer_coding(te, 400, 501)
    return _content_length(cl, 400) if cl else 0


def response_framing(
    status: int, headers: Headers, request_method: bytes, http11: bool = True
) -> int:
    """How a response's body is delimited: its length, :data:`CHUNKED` or :data:`UNTIL_CLOSE`.

    No body (``0``) for a response to HEAD, for 1xx, 204 and 304, and for a 2xx to CONNECT (a
    tunnel follows, which the caller handles), whatever the headers say (RFC 9112 §6.3 1-2).
    Otherwise as for requests, but every problem is a :class:`HeaderError` with ``status`` 502
    (the proxy must not relay a response it cannot frame), and a response with neither header
    runs until the connection closes.
    """
    if (
        request_method == b"HEAD"
        or 100 <= status < 200
        or status in (204, 304)
        or (request_method == b"CONNECT" and 200 <= status < 300)
    ):
        return 0
    te = get_all(headers, b"transfer-encoding")
    cl = get_all(headers, b"content-length")
    if te:
        if cl:
            raise HeaderError(
                "both Content-Length and Transfer-Encoding in a response", b"Transfer-Encoding", 502
            )
        if not http11:
            raise HeaderError("Transfer-Encoding in an HTTP/1.0 response", b"Transfer-Encoding", 502)
        return _transfer_coding(te, 502, 502)
    return _content_length(cl, 502) if cl else UNTIL_CLOSE


# --- values a request carries, for keys (balancing affinity, rate limits) -----------------------


def request_value(headers: Headers, target: bytes, kind: str, name: bytes) -> bytes | None:
    """A value of the request, or ``None`` when it has none.

    ``kind``: ``"header"`` — the first field named ``name`` (lower-case; compared case-
    insensitively), outer whitespace stripped; ``"cookie"`` — the first ``name=value`` of the
    ``Cookie`` fields, a DQUOTE-wrapped value unwrapped (RFC 6265 §4.1.1); ``"query"`` — the raw
    value of the first ``name=value`` of the target's query (no percent-decoding).
    """
    if kind == "header":
        n = len(name)
        for h, v in headers:
            if len(h) == n and h.lower() == name:
                return v.strip()
        return None
    if kind == "cookie":
        for h, v in headers:
            if len(h) == 6 and h.lower() == b"cookie":
                value = _find_pair(v, b";", name)
                if value is not None:
                    if len(value) >= 2 and value[0] == value[-1] == 0x22:  # "quoted"
                        value = value[1:-1]
                    return value
        return None
    if kind == "query":
        _, sep, query = target.partition(b"#")[0].partition(b"?")
        return _find_pair(query, b"&", name) if sep else None
    raise ValueError(f"unknown request value kind {kind!r}")


def _find_pair(data: bytes, sep: bytes, name: bytes) -> bytes | None:
    """The value of the first ``name=value`` among ``sep``-separated pairs (spaces stripped)."""
    for part in data.split(sep):
        k, eq, v = part.partition(b"=")
        if eq and k.strip() == name:
            return v.strip()
    return None

"""Rate-limit keys: what a request is counted by at the ``key`` level, taken from its raw head.

A :class:`KeySource` is built once per route from the route's ``key`` setting and asked per
request with what the data plane has at hand — the head's ``(name, value)`` byte pairs as
llhttp delivered them, the raw request target, and the peer's IP address:

- ``header:NAME``: the first header of that name (any case), whitespace stripped.
- ``cookie:NAME``: the first ``NAME=value`` in the ``Cookie`` headers (``a=1; b=2``), quotes
  around the value removed.
- ``query:NAME``: the first ``NAME=value`` of the query string, raw (names and values compared
  and returned as sent, no percent-decoding: ``a%20b`` and ``a b`` are different keys).
- ``client_ip``: :class:`ClientAddress` — the peer, or behind trusted proxies the client they
  name in ``X-Forwarded-For`` (below).
- ``jwt:CLAIM`` (``jwt``: the configured claim): a claim of the ``Authorization: Bearer`` token,
  verified by :class:`JwtVerifier` (PyJWT: signature, ``exp``/``nbf``, audience and issuer when
  configured).

A request without the key gets ``None`` with a reason (:class:`KeyResult`): ``missing`` (no such
header, cookie or parameter), ``empty`` (present but empty), and for JWTs ``no_token``,
``malformed``, ``bad_signature``, ``bad_algorithm``, ``expired``, ``not_yet_valid``,
``bad_audience``, ``bad_issuer``, ``invalid`` (another failed check, e.g. ``iat``),
``missing_claim``, ``bad_claim`` (the claim is not a string or an integer) — a small fixed set,
fit for a metrics label (:data:`REASONS`). What to do then is the caller's policy: the route's
``on_missing_key`` counts such requests under their client IP (``"client_ip"``, the default, so
a client cannot escape its limit by leaving the header out) or skips the key level (``"skip"``).

Values are text (``latin-1`` of the raw bytes: lossless); one longer than
:data:`MAX_KEY_LENGTH` is replaced by ``"#"`` + a 128-bit BLAKE2b digest of it, so a client cannot
make the counters' keys (in shared memory or in Redis) arbitrarily large.

**Client IP behind proxies.** ``X-Forwarded-For`` is believed only from a peer in
``trusted_proxies``; from any other peer it is ignored (anyone can send one). From a trusted peer,
the addresses of every ``X-Forwarded-For`` line (in order, comma-separated) are walked from the
right — each was appended by the hop to its right, trusted so far — and the first one that is not
itself a trusted proxy is the client. If every address is trusted, the left-most one is; an entry
that is not an IP address (``unknown``, garbage) stops the walk and the last trusted hop before
it is the client (nothing further left can be believed). Ports (``1.2.3.4:80``,
``[2001:db8::1]:443``) are dropped; IPv6 addresses are written in their compressed form and
IPv4-mapped ones (``::ffff:1.2.3.4``) as IPv4. This is the right-most-untrusted rule (nginx
``real_ip_recursive on``, MDN's "X-Forwarded-For: selecting an IP address").
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import jwt
from jwt.algorithms import get_default_algorithms
from jwt.types import Options

from pyproxy.headers import request_value

if TYPE_CHECKING:
    from pyproxy.config import JwtConfig

__all__ = [
    "MAX_KEY_LENGTH",
    "REASONS",
    "ClientAddress",
    "JwtStats",
    "JwtVerifier",
    "KeyResult",
    "KeySource",
    "bearer_token",
]

Headers = Sequence[tuple[bytes, bytes]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Longest key value kept as is (bytes of its text); longer ones are replaced by a digest.
MAX_KEY_LENGTH: Final = 128

MISSING: Final = "missing"
EMPTY: Final = "empty"
NO_TOKEN: Final = "no_token"
MALFORMED: Final = "malformed"
BAD_SIGNATURE: Final = "bad_signature"
BAD_ALGORITHM: Final = "bad_algorithm"
EXPIRED: Final = "expired"
NOT_YET_VALID: Final = "not_yet_valid"
BAD_AUDIENCE: Final = "bad_audience"
BAD_ISSUER: Final = "bad_issuer"
INVALID: Final = "invalid"
MISSING_CLAIM: Final = "missing_claim"
BAD_CLAIM: Final = "bad_claim"

#: Every reason a key can be missing (a closed set: usable as a metrics label).
REASONS: Final = (
    MISSING, EMPTY, NO_TOKEN, MALFORMED, BAD_SIGNATURE, BAD_ALGORITHM, EXPIRED, NOT_YET_VALID,
    BAD_AUDIENCE, BAD_ISSUER, INVALID, MISSING_CLAIM, BAD_CLAIM,
)  # fmt: skip

_KINDS: Final = ("header", "cookie", "query", "jwt")
_XFF: Final = b"x-forwarded-for"
_AUTHORIZATION: Final = b"authorization"
_CACHE_MAX: Final = 4096  # addresses remembered by ClientAddress (cleared when full)


class KeyResult(NamedTuple):
    """A request's key (``value``), or ``None`` and why (``reason``, one of :data:`REASONS`)."""

    value: str | None
    reason: str | None = None


def _text(raw: bytes) -> str:
    """A raw key value as text: latin-1 (every byte kept), or a digest when it is too long."""
    if len(raw) > MAX_KEY_LENGTH:
        return "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()
    return raw.decode("latin-1")


# --------------------------------------------------------------------------------- client IP


def _parse_ip(raw: bytes) -> IPAddress | None:
    """An address as ``X-Forwarded-For`` writes it (port and brackets allowed), or ``None``."""
    try:
        text = raw.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    if text.startswith("["):  # [v6] or [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ClientAddress:
    """The client's IP address: the peer, or the client named by trusted proxies.

    ``trusted_proxies``: addresses or CIDR networks (``"10.0.0.0/8"``, ``"::1"``) whose
    ``X-Forwarded-For`` is believed; none by default (the peer is always the client). See the
    module's docstring for the walk. Call it with the peer's address (as the socket gives it)
    and the request's headers.
    """

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in trusted_proxies
        )
        self._peers: dict[str, tuple[str, bool]] = {}  # peer as given → (normalized, trusted)

    def is_trusted(self, ip: IPAddress) -> bool:
        """``ip`` is one of the trusted proxies."""
        return any(ip in net for net in self.networks)

    def _peer(self, peer: str) -> tuple[str, bool]:
        known = self._peers.get(peer)
        if known is not None:
            return known
        ip = _parse_ip(peer.encode("ascii", "replace"))
        found = (peer, False) if ip is None else (str(ip), self.is_trusted(ip))
        if len(self._peers) >= _CACHE_MAX:
            self._peers.clear()
        self._peers[peer] = found
        return found

    def __call__(self, peer: str, headers: Headers) -> str:
        if not self.networks and ":" not in peer:
            return peer  # nothing trusted, and dotted IPv4 from a socket is canonical
        client, trusted = self._peer(peer)
        if not trusted:
            return client
        hops: list[bytes] = []
        for name, value in headers:
            if len(name) == 15 and name.lower() == _XFF:
                hops += value.split(b",")
        for raw in reversed(hops):
            ip = _parse_ip(raw)
            if ip is None:
                return client  # a trusted hop wrote something that is no address: stop here
            client = str(ip)
            if not self.is_trusted(ip):
                return client
        return client


# ----------------------------------------------------------------------------------------- JWT


def bearer_token(headers: Headers) -> str | None:
    """The token of the first ``Authorization: Bearer <token>`` header (scheme in any case)."""
    for name, value in headers:
        if len(name) == 13 and name.lower() == _AUTHORIZATION:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            token = token.strip()
            return token.decode("latin-1") if token else None
    return None


@dataclass(slots=True)
class JwtStats:
    """Counters of a :class:`JwtVerifier`: ``verifications`` (PyJWT calls), ``cache_hits``,
    ``rejected`` per reason (cache hits included)."""

    verifications: int = 0
    cache_hits: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))


@dataclass(slots=True)
class _Verdict:
    until: float  # clock time after which the entry is stale
    claims: Mapping[str, Any] | None
    reason: str | None


class JwtVerifier:
    """Verifies bearer tokens with PyJWT and remembers the verdicts for a while.

    A token is accepted when its signature is valid for the configured key with one of the
    configured algorithms, it is within ``exp`` and ``nbf`` (± ``leeway``), and its ``aud``
    (when ``audience`` is configured; otherwise ``aud`` is not looked at) and ``iss`` (when
    ``issuer`` is) match.

    Verdicts are cached per token in a bounded LRU (``cache_size`` entries; 0 turns it off) for at
    most ``cache_ttl`` seconds — a valid token never past its ``exp`` (+ leeway), so a cached
    token expires on time; a token refused for good (bad signature, expired, wrong audience...)
    stays refused without verifying it again; one that is not valid *yet* is not cached. The
    clock (``time.time`` by default) only drives the cache; PyJWT checks ``exp``/``nbf`` against
    the real time. One verifier per worker process, used from its event loop thread.
    """

    def __init__(self, config: JwtConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        algorithm = get_default_algorithms()[config.algorithms[0]]
        self._key: Any = algorithm.prepare_key(config.key)
        self._algorithms = list(config.algorithms)
        self._audience: list[str] | None = list(config.audience) or None
        self._options: Options = {"verify_aud": bool(config.audience)}
        self._clock = clock
        self._cache: OrderedDict[str, _Verdict] = OrderedDict()
        self._reasons: tuple[tuple[type[Exception], str], ...] = (
            (jwt.ExpiredSignatureError, EXPIRED),
            (jwt.ImmatureSignatureError, NOT_YET_VALID),
            (jwt.InvalidAudienceError, BAD_AUDIENCE),
            (jwt.InvalidIssuerError, BAD_ISSUER),
            (jwt.InvalidAlgorithmError, BAD_ALGORITHM),
            (jwt.InvalidSignatureError, BAD_SIGNATURE),
            (jwt.MissingRequiredClaimError, MISSING_CLAIM),
            (jwt.DecodeError, MALFORMED),
        )
        self.stats = JwtStats()

    def verify(self, token: str) -> tuple[Mapping[str, Any] | None, str | None]:
        """``(claims, None)`` for a valid token, else ``(None, reason)``."""
        now = self._clock()
        cache = self._cache
        entry = cache.get(token)
        if entry is not None:
            if now < entry.until:
                cache.move_to_end(token)
                self.stats.cache_hits += 1
                if entry.reason is not None:
                    self._reject(entry.reason)
                return entry.claims, entry.reason
            del cache[token]
        claims, reason = self._decode(token)
        ttl = self.config.cache_ttl
        if self.config.cache_size and reason != NOT_YET_VALID:
            until = now + ttl
            exp = claims.get("exp") if claims is not None else None
            if isinstance(exp, int | float) and not isinstance(exp, bool):
                until = min(until, now + (exp + self.config.leeway - time.time()))
            if until > now:
                if len(cache) >= self.config.cache_size:
                    cache.popitem(last=False)
                cache[token] = _Verdict(until, claims, reason)
        return claims, reason

    def _decode(self, token: str) -> tuple[Mapping[str, Any] | None, str | None]:
        self.stats.verifications += 1
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway,
                options=self._options,
            )
        except jwt.PyJWTError as e:
            reason = next((r for cls, r in self._reasons if isinstance(e, cls)), INVALID)
            self._reject(reason)
            return None, reason
        return claims, None

    def _reject(self, reason: str) -> None:
        rejected = self.stats.rejected
        rejected[reason] = rejected.get(reason, 0) + 1

    def claim(self, headers: Headers, claim: str) -> KeyResult:
        """The ``claim`` of the request's verified bearer token, as a key."""
        token = bearer_token(headers)
        if token is None:
            return KeyResult(None, NO_TOKEN)
        claims, reason = self.verify(token)
        if claims is None:
            return KeyResult(None, reason)
        value = claims.get(claim)
        if value is None:
            return KeyResult(None, MISSING_CLAIM)
        if isinstance(value, bool) or not isinstance(value, str | int):
            return KeyResult(None, BAD_CLAIM)
        text = str(value)
        if not text:
            return KeyResult(None, EMPTY)
        if len(text) > MAX_KEY_LENGTH // 4:  # may be too long in UTF-8
            raw = text.encode()
            if len(raw) > MAX_KEY_LENGTH:
                return KeyResult(_text(raw))
        return KeyResult(text)

    def __len__(self) -> int:
        return len(self._cache)


# ------------------------------------------------------------------------------------ sources


class KeySource:
    """Where a route's key comes from: ``header:NAME``, ``cookie:NAME``, ``query:NAME``,
    ``client_ip``, ``jwt`` or ``jwt:CLAIM`` (see the module's docstring).

    ``client`` resolves ``client_ip`` (default: no trusted proxy); ``jwt`` verifies tokens for
    the ``jwt`` sources (required by them), ``jwt_claim`` is what a bare ``jwt`` takes.
    """

    def __init__(
        self,
        spec: str,
        *,
        client: ClientAddress | None = None,
        jwt: JwtVerifier | None = None,
        jwt_claim: str = "sub",
    ) -> None:
        self.spec = spec
        self.client = client if client is not None else ClientAddress()
        self.jwt = jwt
        if spec == "client_ip":
            self.kind, name = "client_ip", ""
        elif spec == "jwt":
            self.kind, name = "jwt", jwt_claim
        else:
            kind, sep, name = spec.partition(":")
            if not sep or kind not in _KINDS or not name or not name.isascii():
                raise ValueError(
                    "key source must be 'header:NAME', 'cookie:NAME', 'query:NAME', 'client_ip', "
                    f"'jwt' or 'jwt:CLAIM', got {spec!r}"
                )
            self.kind = kind
        if self.kind == "jwt" and jwt is None:
            raise ValueError(f"key source {spec!r} needs a JwtVerifier ([ratelimit.jwt])")
        self.claim = name
        self._name = name.lower().encode() if self.kind == "header" else name.encode()
        # The key is a function of the peer's address alone (no header read): callers may keep
        # what they derive from it by peer.
        self.by_peer_only = self.kind == "client_ip" and not self.client.networks

    def resolve(self, headers: Headers, target: bytes, peer: str) -> KeyResult:
        """The request's key, or ``None`` and the reason it has none."""
        kind = self.kind
        if kind == "client_ip":
            return KeyResult(self.client(peer, headers))
        if kind == "jwt":
            assert self.jwt is not None
            return self.jwt.claim(headers, self.claim)
        value = request_value(headers, target, kind, self._name)
        if value is None:
            return KeyResult(None, MISSING)
        if not value:
            return KeyResult(None, EMPTY)
        return KeyResult(_text(value))

    def __call__(self, headers: Headers, target: bytes, peer: str) -> str | None:
        """The request's key, ``None`` when it has none."""
        return self.resolve(headers, target, peer).value

    def __repr__(self) -> str:
        return f"KeySource({self.spec!r})"

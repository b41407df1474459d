"""Rate-limit policy: request keys (headers, cookies, query, client IP behind proxies, verified
JWT claims), the RateLimit response fields and 429/503 bodies, adaptive (AIMD) limits, and the
checks a configuration gives a request."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pyproxy.config import AdaptiveLimitConfig, JwtConfig, parse_config
from pyproxy.ratelimit.adaptive import AdaptiveLimit
from pyproxy.ratelimit.checks import Check, CheckResult, Decision, Penalty
from pyproxy.ratelimit.headers import (
    check_name,
    denied_body,
    denied_response,
    format_window,
    level_of,
    policy_value,
    rate_limit_headers,
    state_value,
    unavailable_response,
)
from pyproxy.ratelimit.keys import (
    MAX_KEY_LENGTH,
    REASONS,
    ClientAddress,
    JwtVerifier,
    KeyResult,
    KeySource,
    bearer_token,
)
from pyproxy.ratelimit.policy import RatePolicy

Headers = list[tuple[bytes, bytes]]

# ------------------------------------------------------------------------------ header, cookie, query


def key(spec: str, headers: Sequence[tuple[bytes, bytes]] = (), target: bytes = b"/", peer: str = "192.0.2.1") -> KeyResult:
    return KeySource(spec).resolve(list(headers), target, peer)


def test_header_key_is_the_first_of_that_name_in_any_case() -> None:
    headers = [(b"Host", b"a"), (b"x-user-id", b"  alice \t"), (b"X-User-ID", b"bob")]
    assert key("header:X-User-ID", headers) == KeyResult("alice", None)
    assert key("header:x-user-id", headers).value == "alice"
    assert key("header:X-Tenant", headers) == KeyResult(None, "missing")
    assert key("header:X-User-ID", [(b"X-User-ID", b"  ")]) == KeyResult(None, "empty")
    # raw bytes kept (latin-1: lossless), so different byte strings stay different keys
    assert key("header:X-User-ID", [(b"X-User-ID", "zoë".encode())]).value == "zoÃ«"
    assert KeySource("header:X-User-ID")([(b"x-user-id", b"carol")], b"/", "::1") == "carol"


def test_cookie_key_reads_every_cookie_header() -> None:
    headers = [(b"Cookie", b"theme=dark; lang=en"), (b"cookie", b'sid="abc123"; sid=second')]
    assert key("cookie:sid", headers).value == "abc123"  # quotes around the value removed
    assert key("cookie:lang", headers).value == "en"
    assert key("cookie:session", headers) == KeyResult(None, "missing")
    assert key("cookie:sid", [(b"Cookie", b"sid=; x=1")]) == KeyResult(None, "empty")
    assert key("cookie:Theme", headers).reason == "missing"  # cookie names are case-sensitive


def test_query_key_is_raw_and_first() -> None:
    assert key("query:user", target=b"/v1/x?a=1&user=al%20ice&user=bob").value == "al%20ice"
    assert key("query:user", target=b"/v1/x?user=alice#user=frag").value == "alice"
    assert key("query:user", target=b"/v1/x#?user=alice").reason == "missing"
    assert key("query:user", target=b"/v1/x").reason == "missing"
    assert key("query:user", target=b"/v1/x?user=&x=1").reason == "empty"
    assert key("query:user", target=b"/v1/x?username=alice").reason == "missing"


def test_long_values_become_a_digest() -> None:
    long = b"u" * (MAX_KEY_LENGTH + 1)
    value = key("header:X-User-ID", [(b"X-User-ID", long)]).value
    assert value is not None and value.startswith("#") and len(value) == 33
    assert value == key("header:X-User-ID", [(b"X-User-ID", long)]).value
    assert value != key("header:X-User-ID", [(b"X-User-ID", long + b"v")]).value
    exact = b"u" * MAX_KEY_LENGTH
    assert key("header:X-User-ID", [(b"X-User-ID", exact)]).value == exact.decode()


def test_bad_sources_are_refused() -> None:
    for spec in ("ip", "header:", "body:x", "header", "path"):
        with pytest.raises(ValueError, match="key source must be"):
            KeySource(spec)
    with pytest.raises(ValueError, match="needs a JwtVerifier"):
        KeySource("jwt:sub")


# ------------------------------------------------------------------------------------ client IP


def xff(*values: str) -> Headers:
    return [(b"X-Forwarded-For", v.encode()) for v in values]


def test_client_ip_without_trusted_proxies_is_the_peer() -> None:
    client = ClientAddress()
    assert client("203.0.113.9", xff("1.2.3.4")) == "203.0.113.9"  # XFF ignored
    assert client("0:0:0:0:0:0:0:1", []) == "::1"  # IPv6 in its compressed form
    assert client("::ffff:198.51.100.7", []) == "198.51.100.7"  # IPv4-mapped → IPv4
    assert key("client_ip", xff("1.2.3.4"), peer="203.0.113.9") == KeyResult("203.0.113.9", None)


def test_spoofed_xff_from_an_untrusted_peer_is_ignored() -> None:
    client = ClientAddress(["10.0.0.0/8"])
    # a client sending X-Forwarded-For straight to the proxy does not choose its own key
    assert client("203.0.113.9", xff("10.0.0.1", "1.1.1.1")) == "203.0.113.9"
    assert client("203.0.113.9", []) == "203.0.113.9"


def test_trusted_proxy_chain_gives_the_right_most_untrusted_address() -> None:
    client = ClientAddress(["10.0.0.0/8", "192.168.0.1"])
    # client → LB (10.0.0.2) → proxy (192.168.0.1) → us; the client spoofed "6.6.6.6" first
    assert client("192.168.0.1", xff("6.6.6.6, 198.51.100.4, 10.0.0.2")) == "198.51.100.4"
    # several XFF lines are one list, in order
    assert client("10.0.0.9", xff("6.6.6.6", "198.51.100.4", "10.1.1.1")) == "198.51.100.4"
    # the peer alone is trusted and sends no XFF: the peer it is
    assert client("10.0.0.9", []) == "10.0.0.9"
    # every hop trusted: the left-most one
    assert client("10.0.0.9", xff("10.0.0.3, 10.0.0.2")) == "10.0.0.3"
    # garbage written by a trusted hop stops the walk at the last trusted address
    assert client("10.0.0.9", xff("198.51.100.4, unknown, 10.0.0.2")) == "10.0.0.2"
    assert client("10.0.0.9", xff("198.51.100.4, ")) == "10.0.0.9"
    # ports are dropped
    assert client("10.0.0.9", xff("198.51.100.4:5555")) == "198.51.100.4"
    assert client("10.0.0.9", xff("[2001:db8::7]:443")) == "2001:db8::7"


def test_trusted_proxies_over_ipv6() -> None:
    client = ClientAddress(["2001:db8:1::/48", "::1"])
    assert client("::1", xff("2001:DB8:0:0:0:0:0:9, 2001:db8:1::5")) == "2001:db8::9"
    assert client("2001:db8:1::1", xff("[2001:db8::9]")) == "2001:db8::9"
    assert client("2001:db8:2::1", xff("198.51.100.4")) == "2001:db8:2::1"  # not trusted
    assert client("::1", xff("::ffff:198.51.100.4")) == "198.51.100.4"
    # an IPv4 trusted network also trusts the same proxy seen over a dual-stack socket
    v4 = ClientAddress(["10.0.0.0/8"])
    assert v4("::ffff:10.0.0.2", xff("198.51.100.4")) == "198.51.100.4"
    source = KeySource("client_ip", client=client)
    assert source(xff("2001:db8::9"), b"/", "::1") == "2001:db8::9"


# ------------------------------------------------------------------------------------------ JWT

SECRET = "s" * 32
OTHER_SECRET = "t" * 32


def rsa_pair() -> tuple[Any, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


RSA_PRIVATE, RSA_PUBLIC = rsa_pair()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 300, **extra}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(token: str) -> Headers:
    return [(b"Authorization", f"Bearer {token}".encode())]


def verifier(**config: Any) -> JwtVerifier:
    return JwtVerifier(JwtConfig(**{"key": SECRET, "algorithms": ("HS256",), **config}))


def jwt_key(v: JwtVerifier, headers: Headers, spec: str = "jwt:sub") -> KeyResult:
    return KeySource(spec, jwt=v).resolve(headers, b"/", "192.0.2.1")


def test_hs256_token_gives_its_claim() -> None:
    v = verifier()
    assert jwt_key(v, bearer(hs256(claims()))) == KeyResult("alice", None)
    assert jwt_key(v, bearer(hs256(claims(tenant="acme"))), "jwt:tenant").value == "acme"
    assert jwt_key(v, bearer(hs256(claims(org=42))), "jwt:org").value == "42"  # integers as text
    assert jwt_key(v, bearer(hs256(claims())), "jwt:tenant") == KeyResult(None, "missing_claim")
    assert jwt_key(v, bearer(hs256(claims(org={"id": 1}))), "jwt:org") == KeyResult(None, "bad_claim")
    assert jwt_key(v, bearer(hs256(claims(org=True))), "jwt:org").reason == "bad_claim"
    assert jwt_key(v, bearer(hs256(claims(org=""))), "jwt:org").reason == "empty"
    long = "x" * 200
    digest = jwt_key(v, bearer(hs256(claims(org=long))), "jwt:org").value
    assert digest is not None and digest.startswith("#") and len(digest) == 33
    # a bare "jwt" source takes the configured claim
    tenant = JwtVerifier(JwtConfig(key=SECRET, algorithms=("HS256",), claim="tenant"))
    source = KeySource("jwt", jwt=tenant, jwt_claim="tenant")
    assert source(bearer(hs256(claims(tenant="acme"))), b"/", "::1") == "acme"


def test_rs256_token_checked_with_the_public_key() -> None:
    v = JwtVerifier(JwtConfig(key=RSA_PUBLIC, algorithms=("RS256",), audience=("api",), issuer="https://auth"))
    good = jwt.encode(claims(aud="api", iss="https://auth"), RSA_PRIVATE, algorithm="RS256")
    assert jwt_key(v, bearer(good)) == KeyResult("alice", None)
    other_private, _ = rsa_pair()
    forged = jwt.encode(claims(aud="api", iss="https://auth"), other_private, algorithm="RS256")
    assert jwt_key(v, bearer(forged)) == KeyResult(None, "bad_signature")
    # a token signed with HS256 using the public key as the secret (algorithm confusion) is refused
    header, payload, _ = good.split(".")
    import base64
    import hashlib
    import hmac

    sig = hmac.new(RSA_PUBLIC.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    confused_header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).rstrip(b"=").decode()
    confused = f"{confused_header}.{payload}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    assert jwt_key(v, bearer(confused)).reason == "bad_algorithm"
    wrong_audience = jwt.encode(claims(aud="admin", iss="https://auth"), RSA_PRIVATE, algorithm="RS256")
    assert jwt_key(v, bearer(wrong_audience)) == KeyResult(None, "bad_audience")
    no_audience = jwt.encode(claims(iss="https://auth"), RSA_PRIVATE, algorithm="RS256")
    assert jwt_key(v, bearer(no_audience)).reason == "missing_claim"
    wrong_issuer = jwt.encode(claims(aud="api", iss="https://evil"), RSA_PRIVATE, algorithm="RS256")
    assert jwt_key(v, bearer(wrong_issuer)) == KeyResult(None, "bad_issuer")
    assert v.stats.rejected["bad_signature"] == 1 and v.stats.rejected["bad_audience"] == 1


def test_expired_immature_and_forged_tokens_give_no_key() -> None:
    v = verifier()
    now = int(time.time())
    assert jwt_key(v, bearer(hs256(claims(exp=now - 10)))) == KeyResult(None, "expired")
    assert jwt_key(v, bearer(hs256(claims(nbf=now + 60)))) == KeyResult(None, "not_yet_valid")
    assert jwt_key(v, bearer(hs256(claims(), OTHER_SECRET))) == KeyResult(None, "bad_signature")
    assert jwt_key(v, bearer("not.a.token")) == KeyResult(None, "malformed")
    assert jwt_key(v, bearer("garbage")) == KeyResult(None, "malformed")
    unsigned = jwt.encode(claims(), "", algorithm="none")
    assert jwt_key(v, bearer(unsigned)).reason == "bad_algorithm"
    assert jwt_key(v, []) == KeyResult(None, "no_token")
    assert jwt_key(v, [(b"Authorization", b"Basic YWxhZGRpbjpvcGVuc2VzYW1l")]).reason == "no_token"
    assert jwt_key(v, [(b"Authorization", b"Bearer ")]).reason == "no_token"
    # with no audience configured, a token's aud is not looked at
    assert jwt_key(v, bearer(hs256(claims(aud="anything")))).value == "alice"
    # leeway admits a token that expired within it
    lenient = verifier(leeway=30.0)
    assert jwt_key(lenient, bearer(hs256(claims(exp=now - 10)))).value == "alice"
    assert set(v.stats.rejected) == set(REASONS)


def test_bearer_token_parsing() -> None:
    assert bearer_token([(b"authorization", b"bearer abc.def.ghi")]) == "abc.def.ghi"
    assert bearer_token([(b"AUTHORIZATION", b"BEARER   abc")]) == "abc"
    assert bearer_token([(b"Authorization", b"Token abc")]) is None
    assert bearer_token([(b"X-Auth", b"Bearer abc")]) is None


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_verdicts_are_cached_and_respect_exp() -> None:
    clock = FakeClock()
    v = JwtVerifier(JwtConfig(key=SECRET, algorithms=("HS256",), cache_ttl=60.0), clock=clock)
    token = hs256(claims(exp=int(time.time()) + 30))
    headers = bearer(token)
    for _ in range(5):
        assert jwt_key(v, headers).value == "alice"
    assert (v.stats.verifications, v.stats.cache_hits) == (1, 4)
    clock.now += 29.0  # still within exp
    assert jwt_key(v, headers).value == "alice" and v.stats.verifications == 1
    clock.now += 2.0  # past exp (by the cache's clock): verified again, never trusted stale
    jwt_key(v, headers)
    assert v.stats.verifications == 2
    # a long-lived token is re-verified after cache_ttl
    long_lived = bearer(hs256(claims(sub="bob", exp=int(time.time()) + 3600)))
    jwt_key(v, long_lived)
    clock.now += 59.0
    jwt_key(v, long_lived)
    assert v.stats.verifications == 3
    clock.now += 2.0
    jwt_key(v, long_lived)
    assert v.stats.verifications == 4
    # refusals are cached too (a forged token costs one verification), immature ones are not
    forged = bearer(hs256(claims(), OTHER_SECRET))
    for _ in range(3):
        assert jwt_key(v, forged).reason == "bad_signature"
    assert v.stats.verifications == 5 and v.stats.rejected["bad_signature"] == 3
    immature = bearer(hs256(claims(nbf=int(time.time()) + 60)))
    jwt_key(v, immature)
    jwt_key(v, immature)
    assert v.stats.verifications == 7


def test_the_cache_is_a_bounded_lru() -> None:
    v = verifier(cache_size=2)
    a, b, c = (bearer(hs256(claims(sub=s))) for s in "abc")
    jwt_key(v, a)
    jwt_key(v, b)
    jwt_key(v, a)  # a is now the most recent
    jwt_key(v, c)  # evicts b
    assert len(v) == 2 and v.stats.verifications == 3
    jwt_key(v, a)
    assert v.stats.verifications == 3
    jwt_key(v, b)
    assert v.stats.verifications == 4
    off = verifier(cache_size=0)
    jwt_key(off, a)
    jwt_key(off, a)
    assert off.stats.verifications == 2 and len(off) == 0


# -------------------------------------------------------------------------------------- headers


def result(name: str, limit: int, window: float, *, allowed: bool = True, remaining: int = 0,
           retry_after: float = 0.0, reset: float = 0.0, blocked: bool = False) -> CheckResult:  # fmt: skip
    return CheckResult(
        Check(key=f"k:{name}", limit=limit, window=window, name=name),
        allowed, remaining, retry_after, reset, blocked,
    )  # fmt: skip


def test_headers_of_an_allowed_request() -> None:
    decision = Decision(True, (result("default", 100, 60.0, remaining=50, reset=29.2),))
    assert rate_limit_headers(decision) == [
        (b"RateLimit-Policy", b'"default";q=100;w=60'),
        (b"RateLimit", b'"default";r=50;t=30'),
    ]
    several = Decision(
        True,
        (
            result("key/1s", 20, 1.0, remaining=19, reset=1.0),
            result("key/1h", 1000, 3600.0, remaining=500, reset=1800.0),
            result("route", 10, 0.1, remaining=3, reset=0.05),
            result("global", 10000, 1.0, remaining=9000, reset=0.5),
        ),
    )
    assert rate_limit_headers(several) == [
        (b"RateLimit-Policy", b'"key/1s";q=20;w=1, "key/1h";q=1000;w=3600, "route";q=10;w=1, "global";q=10000;w=1'),
        (b"RateLimit", b'"route";r=3;t=1'),  # the tightest (least remaining)
    ]
    assert rate_limit_headers(Decision(True, ())) == []
    assert state_value(Decision(True, ())) is None


def test_headers_of_a_denied_request() -> None:
    decision = Decision(
        False,
        (
            result("key", 20, 1.0, allowed=False, remaining=0, retry_after=0.25, reset=0.9),
            result("route", 1000, 3600.0, remaining=400, reset=3000.0),
        ),
        denied=0,
        retry_after=0.25,
    )
    assert rate_limit_headers(decision) == [
        (b"RateLimit-Policy", b'"key";q=20;w=1, "route";q=1000;w=3600'),
        (b"RateLimit", b'"key";r=0;t=1'),
        (b"Retry-After", b"1"),
    ]
    response = denied_response(decision)
    assert response.status == 429
    assert response.headers[0] == (b"Content-Type", b"application/json")
    assert response.headers[1:] == rate_limit_headers(decision)
    assert response.body == (
        b'{"error": "rate limited", "level": "key", "policy": "key", "limit": 20, "window": 1.0, '
        b'"retry_after": 1, "retry_after_ms": 250, "blocked": false}'
    )
    # a longer wait, at the route level, with units left but fewer than the cost
    route = Decision(
        False,
        (
            result("key", 20, 1.0, remaining=19, reset=0.1),
            result("route/1h", 1000, 3600.0, allowed=False, remaining=2, retry_after=61.5, reset=3500.0),
        ),
        denied=1,
        retry_after=61.5,
    )
    assert rate_limit_headers(route)[1:] == [(b"RateLimit", b'"route/1h";r=2;t=62'), (b"Retry-After", b"62")]
    body = json.loads(denied_body(route))
    assert (body["level"], body["policy"], body["limit"], body["window"], body["retry_after"], body["retry_after_ms"]) == (
        "route", "route/1h", 1000, 3600.0, 62, 61500
    )


def test_penalty_box_and_impossible_requests() -> None:
    blocked = Decision(
        False,
        (result("key", 20, 1.0, allowed=False, remaining=15, retry_after=42.0, reset=0.5, blocked=True),),
        denied=0,
        retry_after=42.0,
        blocked=True,
    )
    assert rate_limit_headers(blocked)[1:] == [(b"RateLimit", b'"key";r=0;t=42'), (b"Retry-After", b"42")]
    assert json.loads(denied_body(blocked))["blocked"] is True
    never = Decision(
        False,
        (result("global", 3, 1.0, allowed=False, remaining=3, retry_after=math.inf, reset=0.0),),
        denied=0,
        retry_after=math.inf,
    )
    assert rate_limit_headers(never) == [
        (b"RateLimit-Policy", b'"global";q=3;w=1'),
        (b"RateLimit", b'"global";r=3;t=0'),
    ]  # no Retry-After: waiting does not help
    body = json.loads(denied_body(never))
    assert body["retry_after"] is None and body["retry_after_ms"] is None and body["level"] == "global"


def test_policy_names_are_structured_field_strings_listed_once() -> None:
    odd = result('we"ird\\näme', 5, 2.0, remaining=1)
    assert policy_value([odd]) == b'"we\\"ird\\\\n?me";q=5;w=2'
    assert policy_value([result("a", 5, 1.0), result("a", 5, 1.0), result("b", 7, 0.001)]) == (
        b'"a";q=5;w=1, "b";q=7;w=1'
    )


def test_unavailable_response() -> None:
    assert unavailable_response() == (
        503,
        [(b"Content-Type", b"application/json"), (b"Retry-After", b"1")],
        b'{"error": "rate limiter unavailable", "retry_after": 1}',
    )
    assert unavailable_response(5).headers[1] == (b"Retry-After", b"5")


def test_check_names_and_levels() -> None:
    assert [format_window(w) for w in (0.1, 0.25, 1.0, 1.5, 60.0, 90.0, 3600.0, 86400.0, 0.0015)] == [
        "100ms", "250ms", "1s", "1.5s", "1m", "90s", "1h", "1d", "0.0015s"
    ]
    assert check_name("key", 1.0) == "key"
    assert check_name("key", 1.0, several=True) == "key/1s"
    assert check_name("route", 0.1, several=True) == "route/100ms"
    assert level_of(Check("x", 1, 1.0, name="key/1h")) == "key"
    assert level_of(Check("x", 1, 1.0, name="global")) == "global"
    assert level_of(Check("user:alice", 1, 1.0)) == "user:alice"  # not one of ours: its own name


# ------------------------------------------------------------------------------------- adaptive


def test_adaptive_limit_decreases_when_slow_and_recovers_when_healthy() -> None:
    limit = AdaptiveLimit(10, 100, target_p99=0.25, target_error_rate=0.05, decrease=0.5, increase=10, interval=1.0)
    assert limit.limit == 100
    assert limit.observe(0.5, 0.0, now=0.0) == 50  # slow: × 0.5
    assert limit.observe(0.5, 0.0, now=0.5) == 50  # within the interval: unchanged
    assert limit.observe(0.1, 0.2, now=1.0) == 25  # failing: × 0.5
    assert limit.observe(0.3, 0.0, now=2.0) == 12
    assert limit.observe(1.0, 0.9, now=3.0) == 10  # never below min
    assert limit.observe(1.0, 0.9, now=4.0) == 10
    assert limit.decreases == 4
    for i in range(5, 20):
        limit.observe(0.1, 0.01, now=float(i))  # healthy: + 10 each interval
    assert limit.limit == 100 and limit.increases == 9  # never above max
    assert limit.observe(0.25, 0.05, now=30.0) == 100  # at the targets is healthy
    snap = limit.snapshot()
    assert snap["limit"] == 100 and snap["min"] == 10 and snap["max"] == 100
    assert snap["last_p99"] == 0.25 and snap["decreases"] == 4 and snap["increases"] == 9


def test_adaptive_limit_ignores_missing_signals() -> None:
    clock = FakeClock(0.0)
    limit = AdaptiveLimit(1, 10, start=5, target_p99=1.0, clock=clock)
    assert limit.observe(None, None) == 5
    assert limit.observe(math.nan, 0.9) == 5  # no p99 data; error rate has no target here
    assert limit.version == 0
    assert limit.observe(2.0, None) == 3  # floor(5 × 0.7)
    assert limit.version == 1
    clock.now = 0.5
    assert limit.observe(0.1, None) == 3  # the interval runs on the clock
    clock.now = 1.0
    assert limit.observe(0.1, None) == 4
    errors_only = AdaptiveLimit(2, 10, target_error_rate=0.1)
    assert errors_only.observe(100.0, 0.0, now=0.0) == 10  # latency has no target: healthy
    assert errors_only.observe(0.0, 0.5, now=1.0) == 7


def test_adaptive_limit_from_config_and_validation() -> None:
    config = AdaptiveLimitConfig(min=5, max=50, target_p99=0.2, decrease=0.8, increase=3, interval=2.0, pool="p")
    limit = AdaptiveLimit.from_config(config, start=20)
    assert (limit.limit, limit.min, limit.max, limit.decrease, limit.increase, limit.interval) == (20, 5, 50, 0.8, 3, 2.0)
    assert limit.observe(0.3, None, now=0.0) == 16
    cases: list[tuple[dict[str, Any], str]] = [
        ({"min_limit": 0}, "min_limit"),
        ({"max_limit": 1}, "max_limit"),
        ({"start": 200}, "start"),
        ({"target_p99": None}, "target_p99 and/or"),
        ({"target_p99": -1.0}, "target_p99"),
        ({"target_error_rate": 2.0}, "target_error_rate"),
        ({"decrease": 1.0}, "decrease"),
        ({"increase": 0}, "increase"),
        ({"interval": 0.0}, "interval"),
    ]
    for bad, match in cases:
        kwargs: dict[str, Any] = {"min_limit": 5, "max_limit": 50, "target_p99": 0.2, **bad}
        with pytest.raises(ValueError, match=match):
            AdaptiveLimit(kwargs.pop("min_limit"), kwargs.pop("max_limit"), **kwargs)


# --------------------------------------------------------------------------------------- policy

POLICY: dict[str, Any] = {
    "ratelimit": {
        "trusted_proxies": ["10.0.0.0/8"],
        "penalty": {"max_violations": 3},
        "global": [{"limit": 10000, "window": "1s"}],
        "defaults": {"key_limits": [{"limit": 50, "window": "1s"}]},
    },
    "pools": {"api": {"servers": ["127.0.0.1:9000"]}, "slow": {"servers": ["127.0.0.1:9001"]}},
    "routes": [
        {
            "name": "agents",
            "pool": "api",
            "path_prefix": "/agents",
            "ratelimit": {
                "cost": 5,
                "key": "header:X-User-ID",
                "key_limits": [{"limit": 20, "window": "1s"}, {"limit": 1000, "window": "1h"}],
                "limits": [{"window": "1s", "adaptive": {"min": 10, "max": 200, "target_p99": "1s", "decrease": 0.5}}],
            },
        },
        {"name": "skip", "pool": "api", "path_prefix": "/skip",
         "ratelimit": {"key": "query:user", "on_missing_key": "skip"}},
        {"name": "free", "pool": "slow", "ratelimit": {"key_limits": []}},
    ],
}  # fmt: skip


def test_policy_builds_the_checks_of_a_request() -> None:
    policy = RatePolicy(parse_config(POLICY))
    headers = [(b"X-User-ID", b"alice"), (b"X-Forwarded-For", b"198.51.100.4")]
    checks, found = policy.checks("agents", headers, b"/agents/run", "10.0.0.2")
    assert found == KeyResult("alice", None)
    assert [(c.key, c.name, c.limit, c.window, c.cost) for c in checks] == [
        ("key:agents:header:X-User-ID:alice", "key/1s", 20, 1.0, 5),
        ("key:agents:header:X-User-ID:alice", "key/1h", 1000, 3600.0, 5),
        ("route:agents", "route", 200, 1.0, 5),
        ("global", "global", 10000, 1.0, 5),
    ]
    penalty = Penalty(max_violations=3, violation_window=60.0, block_for=60.0, block_max=3600.0)
    assert [c.penalty for c in checks] == [penalty, penalty, None, None]  # the box is for keys only
    # no header: counted under the client IP (behind the trusted proxy)
    checks, found = policy.checks("agents", headers[1:], b"/agents/run", "10.0.0.2")
    assert found == KeyResult(None, "missing")
    assert checks[0].key == "key:agents:client_ip:198.51.100.4"
    # on_missing_key = "skip": no key level for it; inherited key_limits apply with the key
    checks, found = policy.checks("skip", [], b"/skip?x=1", "192.0.2.1")
    assert found is not None and found.reason == "missing"
    assert [c.key for c in checks] == ["global"]
    checks, _ = policy.checks("skip", [], b"/skip?user=bob", "192.0.2.1")
    assert [(c.key, c.limit, c.name) for c in checks] == [("key:skip:query:user:bob", 50, "key"), ("global", 10000, "global")]
    # a route with its key level off still counts globally
    checks, found = policy.checks("free", [], b"/", "192.0.2.1")
    assert found is None and [c.key for c in checks] == ["global"]
    assert policy.routes["free"].enabled


def test_policy_adaptive_limits_follow_their_pool() -> None:
    policy = RatePolicy(parse_config(POLICY))
    assert list(policy.adaptive) == ["routes.agents.limits[0]"]
    assert policy.adaptive_pools == {"routes.agents.limits[0]": "api"}
    route_check = policy.checks("agents", [], b"/", "192.0.2.1")[0][2]
    assert route_check.limit == 200
    policy.observe("slow", 5.0, None, now=0.0)  # another pool: nothing changes
    assert policy.checks("agents", [], b"/", "192.0.2.1")[0][2].limit == 200
    policy.observe("api", 5.0, None, now=0.0)
    assert policy.checks("agents", [], b"/", "192.0.2.1")[0][2].limit == 100
    policy.observe("api", 0.1, None, now=1.0)
    assert policy.checks("agents", [], b"/", "192.0.2.1")[0][2].limit == 110  # + 5% of max
    snapshot = policy.snapshot()
    assert snapshot["routes.agents.limits[0]"]["pool"] == "api"
    assert snapshot["routes.agents.limits[0]"]["limit"] == 110


def test_policy_with_jwt_keys_and_no_limits() -> None:
    config = parse_config(
        {
            "ratelimit": {"jwt": {"key": SECRET, "algorithms": ["HS256"], "claim": "tenant"}},
            "pools": {"p": {"servers": ["127.0.0.1:9000"]}},
            "routes": [
                {"name": "t", "pool": "p", "ratelimit": {"key": "jwt", "key_limits": [{"limit": 5, "window": "1s"}]}},
                {"name": "none", "pool": "p"},
            ],
        }
    )
    policy = RatePolicy(config)
    checks, found = policy.checks("t", bearer(hs256(claims(tenant="acme"))), b"/", "192.0.2.1")
    assert found == KeyResult("acme", None) and checks[0].key == "key:t:jwt:acme"
    checks, found = policy.checks("t", bearer(hs256(claims(tenant="acme"), OTHER_SECRET)), b"/", "192.0.2.1")
    assert found == KeyResult(None, "bad_signature") and checks[0].key == "key:t:client_ip:192.0.2.1"
    assert policy.checks("none", [], b"/", "192.0.2.1") == ((), None)
    assert not policy.routes["none"].enabled and policy.jwt is not None

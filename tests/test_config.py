"""Configuration: the example file, values with units, every problem listed with its key path."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pyproxy import config as config_module
from pyproxy.balance.health import HealthCheckConfig
from pyproxy.balance.outlier import OutlierConfig
from pyproxy.config import (
    BreakerConfig,
    BulkheadConfig,
    ConfigError,
    Limits,
    RetryConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from pyproxy.errors import PyproxyError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "example.toml"

MINIMAL = {"pools": {"p": {"servers": ["127.0.0.1:9000"]}}, "routes": [{"pool": "p"}]}


def problems(data: dict) -> dict[str, str]:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return {p.path: p.reason for p in e.value.problems}


def test_example_file_is_valid_and_complete() -> None:
    config = load_config(EXAMPLE)
    assert [r.name for r in config.routes] == ["summarize", "default"]
    summarize = config.routes[0]
    assert summarize.methods == {"POST"} and summarize.response_timeout == 600.0
    assert summarize.max_body_size == 64 * 1024**2
    agents = config.pools["agents"]
    assert [(s.address, s.weight) for s in agents.servers] == [
        ("127.0.0.1:9001", 2),
        ("127.0.0.1:9002", 1),
        ("127.0.0.1:9003", 1),
    ]
    assert config.pools["summarizer"].servers[1].address == "[::1]:9102"
    assert config.limits == Limits(), "the example documents the defaults"
    assert agents.balance == "weighted_round_robin" and agents.slow_start == 30.0
    # The example's resilience tables show the defaults (and turn the optional ones on).
    assert agents.health_check == HealthCheckConfig()
    assert agents.outlier == OutlierConfig()
    assert agents.circuit_breaker == BreakerConfig()
    assert agents.bulkhead == BulkheadConfig() and agents.retry == RetryConfig()
    summarizer = config.pools["summarizer"]
    assert (summarizer.balance, summarizer.hash_key, summarizer.balance_factor) == (
        "consistent_hash", "header:X-User-ID", 1.25
    )
    assert summarizer.on_all_unhealthy == "reject" and summarizer.health_check is None
    assert summarize.idempotent and not config.routes[1].idempotent


def test_minimal_config_gets_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.listeners[0].host == "127.0.0.1" and config.listeners[0].port == 8080
    assert config.admin.port == 9901 and config.admin.host == "127.0.0.1"
    assert config.workers == 1
    assert config.routes[0].path_prefix == "/" and config.routes[0].name == "route-0"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), (0.25, 0.25), ("250ms", 0.25), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [(512, 512), ("16KiB", 16384), ("1MiB", 1 << 20), ("10m", 10 << 20), ("1MB", 10**6), ("2g", 2 << 30)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_every_problem_is_listed_with_its_path() -> None:
    found = problems(
        {
            "workrs": 2,
            "listeners": [{"port": 70000}],
            "limits": {"head_timeout": "-1s", "max_body_size": "10 parsecs", "max_header_count": 0},
            "pools": {
                "api": {
                    "servers": ["127.0.0.1:1", {"address": "nope"}, "127.0.0.1:1"],
                    "balance": "fastest",
                    "connect_timout": 1,
                }
            },
            "routes": [
                {"pool": "apj", "path_prefix": "api", "methods": ["GET", "FETCH"]},
                {"name": "route-0"},
            ],
        }
    )
    assert "did you mean 'workers'" in found["workrs"]
    assert "between 0 and 65535" in found["listeners[0].port"]
    assert "duration" in found["limits.head_timeout"]
    assert "size" in found["limits.max_body_size"]
    assert "between 1 and" in found["limits.max_header_count"]
    assert "host:port" in found["pools.api.servers[1].address"]
    assert "duplicate of servers[0]" in found["pools.api.servers[2]"]
    assert "round_robin" in found["pools.api.balance"]
    assert "did you mean 'connect_timeout'" in found["pools.api.connect_timout"]
    assert "did you mean 'api'" in found["routes[0].pool"]
    assert "must start with '/'" in found["routes[0].path_prefix"]
    assert "FETCH" in found["routes[0].methods"]
    assert found["routes[1].pool"] == "is required"
    assert "duplicate of routes[0].name" in found["routes[1].name"]
    assert len(found) == 14


def test_missing_sections_and_wrong_types() -> None:
    found = problems({"pools": [], "routes": {}, "admin": "yes"})
    assert set(found) == {"pools", "routes", "admin"}
    assert "is required" in problems({})["pools"]


def test_booleans_are_not_numbers() -> None:
    found = problems({**MINIMAL, "workers": True, "limits": {"max_body_size": True}})
    assert set(found) == {"workers", "limits.max_body_size"}


def test_admin_clash_and_token_redaction() -> None:
    assert "same host and port" in problems(
        {**MINIMAL, "listeners": [{"port": 9901}], "admin": {"port": 9901}}
    )["admin.port"]
    config = parse_config({**MINIMAL, "admin": {"token": "s3cret"}})
    assert config.admin.token == "s3cret"
    assert "s3cret" not in repr(config)
    assert config.redacted()["admin"]["token"] == "<redacted>"


def test_config_error_is_a_pyproxy_error_and_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pools.a\n")
    with pytest.raises(PyproxyError, match="invalid TOML") as e:
        load_config(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.toml")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyproxy", *args], capture_output=True, text=True, timeout=60
    )


def test_check_command_accepts_the_example() -> None:
    out = _cli("check", "--config", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert "OK (1 listener(s), 2 pool(s) with 5 server(s), 2 route(s)" in out.stdout


def test_check_command_lists_every_problem_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('workrs = 2\n[pools.a]\nservers = ["x"]\n[[routes]]\npool = "b"\n')
    out = _cli("check", "--config", str(bad))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[0] == f"{bad}: 3 problem(s)"
    assert any(line.strip().startswith("workrs: unknown key") for line in lines)
    assert any(line.strip().startswith("pools.a.servers[0]:") for line in lines)
    assert any(line.strip().startswith("routes[0].pool: no pool named 'b'") for line in lines)


def test_version_command() -> None:
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == "pyproxy 0.1.0"


def test_several_workers_need_fixed_ports() -> None:
    assert "fixed listener ports" in problems({**MINIMAL, "workers": 2, "listeners": [{"port": 0}]})["workers"]
    assert parse_config({**MINIMAL, "workers": 2, "listeners": [{"port": 8080}]}).workers == 2


# ------------------------------------------------- balancing, health checks and resilience

FULL_POOL = """
[pools.api]
servers = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3 }]
balance = "consistent_hash"
hash_key = "cookie:session"
balance_factor = 1.5
hash_fallback = "least_connections"
slow_start = "45s"
on_all_unhealthy = "reject"

[pools.api.health_check]
method = "head"
path = "/status?deep=1"
expected_statuses = [204, "200-299", "418"]
body_contains = "ok ✓"
interval = "3s"
timeout = "500ms"
rise = 4
fall = 2
jitter = 0
host_header = "api.internal:8080"
initial_healthy = false
max_response_bytes = "2KiB"

[pools.api.outlier]
consecutive_failures = 7
consecutive_connect_failures = 2
error_rate_threshold = 0.25
window = "30s"
min_requests = 10
base_ejection_time = "10s"
max_ejection_time = "5m"
max_ejection_percent = 100

[pools.api.circuit_breaker]
consecutive_failures = 0
failure_ratio = 0.3
window = "1m"
min_requests = 50
base_open_time = "2s"
max_open_time = "1m"
jitter = 0.5
success_threshold = 1
half_open_max_probes = 4

[pools.api.bulkhead]
max_concurrent = 200
max_queue = 50
queue_timeout = "250ms"
max_concurrent_per_server = 30

[pools.api.retry]
attempts = 3
on_statuses = [503, 500, 503]
budget_percent = 12.5
min_retries_per_window = 0
budget_window = "1m"
backoff_base = 0
backoff_max = "1s"

[[routes]]
pool = "api"
idempotent = true
"""


def pool_problems(**keys: Any) -> dict[str, str]:
    """The problems of the minimal config with ``keys`` added to its pool ``p``."""
    return problems({**MINIMAL, "pools": {"p": {"servers": ["127.0.0.1:9000"], **keys}}})


def pool_with(**keys: Any) -> config_module.Pool:
    config = parse_config({**MINIMAL, "pools": {"p": {"servers": ["127.0.0.1:9000"], **keys}}})
    return config.pools["p"]


def test_every_balancing_and_resilience_key_is_read() -> None:
    config = parse_config(tomllib.loads(FULL_POOL))
    api = config.pools["api"]
    assert (api.balance, api.hash_key, api.balance_factor, api.hash_fallback) == (
        "consistent_hash", "cookie:session", 1.5, "least_connections"
    )
    assert api.slow_start == 45.0 and api.on_all_unhealthy == "reject" and not api.dynamic
    assert api.health_check == HealthCheckConfig(
        method="HEAD",
        path="/status?deep=1",
        expected_statuses=(range(204, 205), range(200, 300), range(418, 419)),
        body_contains="ok ✓".encode(),
        interval=3.0,
        timeout=0.5,
        rise=4,
        fall=2,
        jitter=0.0,
        host_header="api.internal:8080",
        initial_healthy=False,
        max_response_bytes=2048,
    )
    assert api.health_check.status_expected(299) and not api.health_check.status_expected(300)
    assert api.outlier == OutlierConfig(
        consecutive_failures=7,
        consecutive_connect_failures=2,
        error_rate_threshold=0.25,
        window=30.0,
        min_requests=10,
        base_ejection_time=10.0,
        max_ejection_time=300.0,
        max_ejection_percent=100,
    )
    assert api.circuit_breaker == BreakerConfig(
        consecutive_failures=None,  # 0 in the file: that trip rule is off
        failure_ratio=0.3,
        window=60.0,
        min_requests=50,
        base_open_time=2.0,
        max_open_time=60.0,
        jitter=0.5,
        success_threshold=1,
        half_open_max_probes=4,
    )
    assert api.bulkhead == BulkheadConfig(
        max_concurrent=200, max_queue=50, queue_timeout=0.25, max_concurrent_per_server=30
    )
    assert api.retry == RetryConfig(
        attempts=3,
        on_statuses=frozenset({500, 503}),
        budget_percent=12.5,
        min_retries_per_window=0,
        budget_window=60.0,
        backoff_base=0.0,
        backoff_max=1.0,
    )
    assert config.routes[0].idempotent


def test_balancing_and_resilience_defaults() -> None:
    config = parse_config(MINIMAL)
    pool = config.pools["p"]
    assert (pool.balance, pool.slow_start, pool.on_all_unhealthy) == ("round_robin", 0.0, "panic")
    assert pool.health_check is None and pool.outlier is None and pool.circuit_breaker is None
    assert pool.bulkhead == BulkheadConfig() and pool.retry == RetryConfig()
    assert not config.routes[0].idempotent
    # An empty table turns the optional features on with their defaults.
    on = pool_with(health_check={}, outlier={}, circuit_breaker={}, bulkhead={}, retry={})
    assert on.health_check == HealthCheckConfig() and on.outlier == OutlierConfig()
    assert on.circuit_breaker == BreakerConfig()


@pytest.mark.parametrize("algorithm", ["round_robin", "random", "weighted_round_robin", "least_connections"])
def test_each_algorithm_and_its_own_options(algorithm: str) -> None:
    assert pool_with(balance=algorithm).balance == algorithm
    assert pool_with(balance="consistent_hash", hash_fallback=algorithm).hash_fallback == algorithm
    assert pool_with(balance="weighted_round_robin", dynamic=True).dynamic
    if algorithm != "round_robin":
        assert pool_with(balance=algorithm, slow_start="1m").slow_start == 60.0


@pytest.mark.parametrize(
    "key", ["client_ip", "path", "header:X-User-ID", "cookie:sid", "query:user_id", "query:a.b%5B%5D"]
)
def test_hash_keys(key: str) -> None:
    assert pool_with(balance="consistent_hash", hash_key=key).hash_key == key


@pytest.mark.parametrize(
    ("keys", "path", "reason"),
    [
        ({"balance": "least_conn"}, "balance", "expected one of round_robin, random, "),
        ({"balance": "weighted_round_robin", "dynamic": "yes"}, "dynamic", "true or false"),
        ({"balance": "consistent_hash", "hash_key": "header"}, "hash_key", "'header:NAME', 'cookie:NAME'"),
        ({"balance": "consistent_hash", "hash_key": "body:x"}, "hash_key", "'query:NAME', 'client_ip' or 'path'"),
        ({"balance": "consistent_hash", "hash_key": "header:X User"}, "hash_key", "not a valid header name"),
        ({"balance": "consistent_hash", "hash_key": "cookie:"}, "hash_key", "not a valid cookie name"),
        ({"balance": "consistent_hash", "hash_key": "query:a=b"}, "hash_key", "not a query parameter name"),
        ({"balance": "consistent_hash", "balance_factor": 1}, "balance_factor", "must be > 1, got 1"),
        ({"balance": "consistent_hash", "balance_factor": "1.5"}, "balance_factor", "expected a number"),
        ({"balance": "consistent_hash", "hash_fallback": "consistent_hash"}, "hash_fallback", "requests that have no hash key"),
        ({"balance": "consistent_hash", "hash_fallback": "fastest"}, "hash_fallback", "expected one of round_robin"),
        ({"balance": "random", "slow_start": "-5s"}, "slow_start", "duration like"),
        ({"balance": "random", "slow_start": -5}, "slow_start", "must be a duration >= 0 (0: off)"),
        ({"on_all_unhealthy": "fail"}, "on_all_unhealthy", "expected one of panic, reject, got 'fail'"),
        ({"health_check": "on"}, "health_check", "expected a table, got str"),
        ({"health_check": {"method": "CONNECT"}}, "health_check.method", "HTTP method such as GET"),
        ({"health_check": {"method": "FETCH"}}, "health_check.method", "got 'FETCH'"),
        ({"health_check": {"path": "healthz"}}, "health_check.path", "must start with '/'"),
        ({"health_check": {"path": "/a b"}}, "health_check.path", "visible ASCII only"),
        ({"health_check": {"expected_statuses": []}}, "health_check.expected_statuses", "non-empty array"),
        ({"health_check": {"expected_statuses": "200"}}, "health_check.expected_statuses", "non-empty array"),
        ({"health_check": {"expected_statuses": [200, "2xx"]}}, "health_check.expected_statuses[1]", "inclusive range ('200-299')"),
        ({"health_check": {"expected_statuses": ["299-200"]}}, "health_check.expected_statuses[0]", "lowest first"),
        ({"health_check": {"expected_statuses": [600]}}, "health_check.expected_statuses[0]", "within 100-599"),
        ({"health_check": {"body_contains": ""}}, "health_check.body_contains", "non-empty string"),
        ({"health_check": {"interval": "0s"}}, "health_check.interval", "duration > 0"),
        ({"health_check": {"timeout": "2 fortnights"}}, "health_check.timeout", "duration like"),
        ({"health_check": {"rise": 0}}, "health_check.rise", "between 1 and 1000"),
        ({"health_check": {"fall": 2.5}}, "health_check.fall", "expected an integer"),
        ({"health_check": {"jitter": 1}}, "health_check.jitter", "must be in [0, 1)"),
        ({"health_check": {"host_header": "a\nb"}}, "health_check.host_header", "visible ASCII"),
        ({"health_check": {"initial_healthy": 1}}, "health_check.initial_healthy", "true or false"),
        ({"health_check": {"max_response_bytes": 512}}, "health_check.max_response_bytes", "at least 1024 bytes"),
        ({"health_check": {"interval": "2s", "timeout": "2s"}}, "health_check.timeout", "shorter than interval (2s >= 2s)"),
        ({"health_check": {"intervall": "2s"}}, "health_check.intervall", "did you mean 'interval'"),
        ({"outlier": {"consecutive_failures": -1}}, "outlier.consecutive_failures", "between 0 and"),
        ({"outlier": {"error_rate_threshold": 1.5}}, "outlier.error_rate_threshold", "must be in [0, 1]"),
        ({"outlier": {"window": 0}}, "outlier.window", "duration > 0"),
        ({"outlier": {"min_requests": 0}}, "outlier.min_requests", "between 1 and"),
        ({"outlier": {"max_ejection_time": "10s"}}, "outlier.max_ejection_time", ">= base_ejection_time (10s < 30s)"),
        ({"outlier": {"max_ejection_percent": 101}}, "outlier.max_ejection_percent", "between 0 and 100"),
        ({"outlier": {"max_ejection_percent": 0}}, "outlier.max_ejection_percent", "never eject"),
        ({"outlier": {"consecutive_connect_failures": 5}}, "outlier.consecutive_connect_failures", "below consecutive_failures (5)"),
        ({"outlier": {"consecutive_failures": 0, "error_rate_threshold": 0}}, "outlier", "every detector is off"),
        ({"circuit_breaker": {"consecutive_failures": 0, "failure_ratio": 0}}, "circuit_breaker", "could never open"),
        ({"circuit_breaker": {"failure_ratio": -0.1}}, "circuit_breaker.failure_ratio", "must be in [0, 1]"),
        ({"circuit_breaker": {"min_requests": 0}}, "circuit_breaker.min_requests", "between 1 and"),
        ({"circuit_breaker": {"max_open_time": "1s"}}, "circuit_breaker.max_open_time", ">= base_open_time (1s < 5s)"),
        ({"circuit_breaker": {"jitter": 1.0}}, "circuit_breaker.jitter", "must be in [0, 1)"),
        ({"circuit_breaker": {"success_threshold": 0}}, "circuit_breaker.success_threshold", "between 1 and"),
        ({"circuit_breaker": {"half_open_max_probes": 0}}, "circuit_breaker.half_open_max_probes", "between 1 and"),
        ({"circuit_breaker": {"windw": "1s"}}, "circuit_breaker.windw", "did you mean 'window'"),
        ({"bulkhead": {"max_concurrent": -1}}, "bulkhead.max_concurrent", "between 0 and"),
        ({"bulkhead": {"queue_timeout": 0}}, "bulkhead.queue_timeout", "duration > 0"),
        ({"bulkhead": {"max_queue": 10}}, "bulkhead.max_queue", "needs max_concurrent > 0"),
        ({"bulkhead": {"max_concurrent_per_server": True}}, "bulkhead.max_concurrent_per_server", "expected an integer"),
        ({"retry": {"attempts": 11}}, "retry.attempts", "between 0 and 10"),
        ({"retry": {"on_statuses": 503}}, "retry.on_statuses", "expected an array"),
        ({"retry": {"on_statuses": [503, 404]}}, "retry.on_statuses[1]", "must be a 5xx status (500-599)"),
        ({"retry": {"on_statuses": ["503"]}}, "retry.on_statuses[0]", "expected a status code"),
        ({"retry": {"budget_percent": 0}}, "retry.budget_percent", "must be in (0, 100]"),
        ({"retry": {"budget_percent": 101}}, "retry.budget_percent", "must be in (0, 100]"),
        ({"retry": {"min_retries_per_window": -1}}, "retry.min_retries_per_window", "between 0 and"),
        ({"retry": {"budget_window": "0s"}}, "retry.budget_window", "duration > 0"),
        ({"retry": {"backoff_base": -1}}, "retry.backoff_base", "duration >= 0"),
        ({"retry": {"backoff_max": "10ms"}}, "retry.backoff_max", ">= backoff_base (0.01s < 0.025s)"),
    ],
)
def test_bad_balancing_and_resilience_values(keys: dict[str, Any], path: str, reason: str) -> None:
    found = pool_problems(**keys)
    assert set(found) == {f"pools.p.{path}"}, found
    assert reason in found[f"pools.p.{path}"]


@pytest.mark.parametrize(
    ("keys", "path", "reason"),
    [
        ({"dynamic": True}, "dynamic", "only applies to balance = 'weighted_round_robin' (this pool's is 'round_robin')"),
        ({"balance": "least_connections", "dynamic": False}, "dynamic", "(this pool's is 'least_connections')"),
        ({"hash_key": "path"}, "hash_key", "only applies to balance = 'consistent_hash'"),
        ({"balance": "random", "balance_factor": 1.25}, "balance_factor", "only applies to balance = 'consistent_hash'"),
        ({"hash_fallback": "random"}, "hash_fallback", "only applies to balance = 'consistent_hash'"),
        ({"slow_start": "30s"}, "slow_start", "no effect with balance = 'round_robin'"),
        ({"balance": "consistent_hash", "slow_start": "30s"}, "slow_start", "needs balance_factor"),
    ],
)
def test_options_of_another_algorithm(keys: dict[str, Any], path: str, reason: str) -> None:
    found = pool_problems(**keys)
    assert set(found) == {f"pools.p.{path}"}, found
    assert reason in found[f"pools.p.{path}"]


def test_slow_start() -> None:
    assert pool_with(slow_start=0).slow_start == pool_with(slow_start="0s").slow_start == 0.0
    bounded = pool_with(balance="consistent_hash", slow_start="30s", balance_factor=1.1)
    assert bounded.slow_start == 30.0 and bounded.balance_factor == 1.1


def test_a_bad_value_is_reported_once() -> None:
    # The bad hash_key is not also "only for consistent_hash"; a bad balance does not make the
    # consistent-hash options look misplaced; bad fields skip the cross-field checks they feed.
    assert set(pool_problems(hash_key="nope")) == {"pools.p.hash_key"}
    assert set(pool_problems(balance="hash", hash_key="path")) == {"pools.p.balance"}
    assert set(
        pool_problems(balance="consistent_hash", balance_factor=0.5, slow_start="1s")
    ) == {"pools.p.balance_factor"}
    assert set(pool_problems(health_check={"interval": "1s", "timeout": "x"})) == {
        "pools.p.health_check.timeout"
    }


def test_route_idempotent() -> None:
    assert parse_config({**MINIMAL, "routes": [{"pool": "p", "idempotent": True}]}).routes[0].idempotent
    found = problems({**MINIMAL, "routes": [{"pool": "p", "idempotent": "yes"}]})
    assert found == {"routes[0].idempotent": "expected true or false, got 'yes'"}


def test_every_resilience_problem_is_listed_at_once() -> None:
    found = problems(
        {
            "pools": {
                "api": {
                    "servers": ["127.0.0.1:1"],
                    "balance": "consistent_hash",
                    "hash_key": "cookie",
                    "dynamic": True,
                    "health_check": {"expected_statuses": ["200-299", 99], "rise": 0},
                    "outlier": {"max_ejection_percent": 150},
                    "circuit_breaker": {"failure_ratio": 2},
                    "bulkhead": {"max_queue": 5},
                    "retry": {"on_statuses": [404], "atempts": 2},
                },
                "web": {"servers": ["127.0.0.1:2"], "slow_start": "10s", "health_check": []},
            },
            "routes": [{"pool": "api", "idempotent": 1}],
        }
    )
    assert set(found) == {
        "pools.api.hash_key",
        "pools.api.dynamic",
        "pools.api.health_check.expected_statuses[1]",
        "pools.api.health_check.rise",
        "pools.api.outlier.max_ejection_percent",
        "pools.api.circuit_breaker.failure_ratio",
        "pools.api.bulkhead.max_queue",
        "pools.api.retry.on_statuses[0]",
        "pools.api.retry.atempts",
        "pools.web.slow_start",
        "pools.web.health_check",
        "routes[0].idempotent",
    }
    assert "did you mean 'attempts'" in found["pools.api.retry.atempts"]


def test_a_dataclass_validation_error_becomes_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the config classes' own checks refuse is a problem at its key, never an escape."""

    class Stricter(HealthCheckConfig):
        def __post_init__(self) -> None:
            if self.fall == 4:
                raise ValueError("fall: 4 is unlucky")

    class Odd(OutlierConfig):
        def __post_init__(self) -> None:
            if self.window == 1.0:
                raise ValueError("no field named here")

    monkeypatch.setattr(config_module, "HealthCheckConfig", Stricter)
    monkeypatch.setattr(config_module, "OutlierConfig", Odd)
    found = pool_problems(health_check={"fall": 4}, outlier={"window": "1s"})
    assert found == {
        "pools.p.health_check.fall": "4 is unlucky",
        "pools.p.outlier": "no field named here",
    }


def test_redacted_is_plain_json() -> None:
    config = parse_config(tomllib.loads(FULL_POOL))
    data = config.redacted()
    assert json.loads(json.dumps(data)) == data
    api = data["pools"]["api"]
    assert api["health_check"]["expected_statuses"] == ["204", "200-299", "418"]
    assert api["health_check"]["body_contains"] == "ok ✓"
    assert api["retry"]["on_statuses"] == [500, 503]
    assert api["circuit_breaker"]["consecutive_failures"] is None
    assert data["routes"][0]["idempotent"] is True
    # A status written back as the file writes it reads into the same configuration.
    statuses = api["health_check"]["expected_statuses"]
    again = pool_with(health_check={"expected_statuses": statuses}).health_check
    original = config.pools["api"].health_check
    assert again is not None and original is not None
    assert again.expected_statuses == original.expected_statuses
    defaults = parse_config(MINIMAL).redacted()
    assert json.loads(json.dumps(defaults)) == defaults
    assert defaults["pools"]["p"]["retry"]["on_statuses"] == [502, 503, 504]


def test_route_hedge_after_takes_a_duration_or_p95() -> None:
    base = {"listeners": [{"port": 0}], "pools": {"p": {"servers": ["127.0.0.1:1"]}}}
    assert parse_config({**base, "routes": [{"pool": "p", "hedge_after": "50ms"}]}).routes[0].hedge_after == 0.05
    assert parse_config({**base, "routes": [{"pool": "p", "hedge_after": "p95"}]}).routes[0].hedge_after == "p95"
    assert parse_config({**base, "routes": [{"pool": "p"}]}).routes[0].hedge_after is None
    for bad in ("soon", 0, "-5ms", "p99"):
        with pytest.raises(ConfigError) as e:
            parse_config({**base, "routes": [{"pool": "p", "hedge_after": bad}]})
        assert [p.path for p in e.value.problems] == ["routes[0].hedge_after"], bad


# ------------------------------------------------------------------------------- rate limits

HMAC_SECRET = "0123456789abcdef" * 4  # 64 bytes: HS512's minimum (HS256 needs 32)

FULL_RATELIMIT = f"""
[ratelimit]
mode = "hybrid"
redis_url = "redis://proxy:s3cret@127.0.0.1:6379/2"
cluster = false
timeout = "20ms"
on_redis_error = "deny"
sync_interval = "25ms"
headers_on_allowed = false
trusted_proxies = ["10.0.0.0/8", "192.168.1.7", "::1", "2001:db8::/32"]
algorithm = "sliding_log"

[ratelimit.jwt]
key = "{HMAC_SECRET}"
algorithms = ["HS256", "HS512", "HS256"]
audience = ["api", "admin"]
issuer = "https://auth.example.com"
claim = "tenant"
leeway = "5s"
cache_size = 500
cache_ttl = "30s"

[ratelimit.penalty]
max_violations = 3
violation_window = "30s"
block_for = "10s"
block_max = "10m"

[[ratelimit.global]]
limit = 5000
window = "1s"
algorithm = "sliding_window_counter"

[[ratelimit.global]]
window = "1m"
adaptive = {{ pool = "api", min = 1000, max = 100000, target_p99 = "500ms" }}

[ratelimit.defaults]
key = "client_ip"
key_limits = [{{ limit = 20, window = "1s" }}]
on_missing_key = "skip"

[pools.api]
servers = ["127.0.0.1:9001"]

[pools.other]
servers = ["127.0.0.1:9002"]

[[routes]]
name = "agents"
pool = "api"
[routes.ratelimit]
cost = 5
key = "jwt:sub"
key_limits = [{{ limit = 20, window = "1s" }}, {{ limit = 1000, window = "1h", algorithm = "sliding_window_counter" }}]
limits = [
    {{ limit = 200, window = "100ms", adaptive = {{ min = 10, max = 400, target_p99 = "250ms", target_error_rate = 0.05, decrease = 0.5, increase = 7, interval = "2s" }} }},
    {{ window = "1h", adaptive = {{ min = 100, max = 200, target_error_rate = 0.1, pool = "other" }} }},
]

[[routes]]
name = "inherits"
pool = "other"
ratelimit = {{ limits = [{{ limit = 50, window = "1s", adaptive = {{ min = 5, max = 50, target_p99 = 1 }} }}] }}

[[routes]]
name = "header"
pool = "api"
ratelimit = {{ key = "header:X-User-ID", on_missing_key = "client_ip" }}

[[routes]]
name = "off"
pool = "api"
ratelimit = {{ key_limits = [] }}
"""


def rl_problems(ratelimit: dict[str, Any] | None = None, route: dict[str, Any] | None = None) -> dict[str, str]:
    """Problems of the minimal config with a [ratelimit] table and/or a route ratelimit table."""
    data: dict[str, Any] = {**MINIMAL}
    if ratelimit is not None:
        data["ratelimit"] = ratelimit
    if route is not None:
        data["routes"] = [{"pool": "p", "ratelimit": route}]
    return problems(data)


def rl_config(ratelimit: dict[str, Any] | None = None, route: dict[str, Any] | None = None) -> config_module.Config:
    data: dict[str, Any] = {**MINIMAL}
    if ratelimit is not None:
        data["ratelimit"] = ratelimit
    if route is not None:
        data["routes"] = [{"pool": "p", "ratelimit": route}]
    return parse_config(data)


def test_every_ratelimit_key_is_read() -> None:
    from pyproxy.config import AdaptiveLimitConfig, JwtConfig, RateLimitRule, RouteRateLimit
    from pyproxy.ratelimit import Penalty

    config = parse_config(tomllib.loads(FULL_RATELIMIT))
    rl = config.ratelimit
    assert (rl.mode, rl.redis_url, rl.cluster, rl.timeout, rl.on_redis_error, rl.sync_interval) == (
        "hybrid", "redis://proxy:s3cret@127.0.0.1:6379/2", False, 0.02, "deny", 0.025
    )
    assert rl.headers_on_allowed is False and rl.algorithm == "sliding_log"
    assert rl.trusted_proxies == ("10.0.0.0/8", "192.168.1.7/32", "::1/128", "2001:db8::/32")
    assert rl.jwt == JwtConfig(
        key=HMAC_SECRET,
        key_file=None,
        algorithms=("HS256", "HS512"),
        audience=("api", "admin"),
        issuer="https://auth.example.com",
        claim="tenant",
        leeway=5.0,
        cache_size=500,
        cache_ttl=30.0,
    )
    assert rl.penalty == Penalty(max_violations=3, violation_window=30.0, block_for=10.0, block_max=600.0)
    # limits without their own algorithm take [ratelimit] algorithm
    assert rl.global_limits == (
        RateLimitRule(5000, 1.0, "sliding_window_counter"),
        RateLimitRule(
            100000, 60.0, "sliding_log",
            AdaptiveLimitConfig(min=1000, max=100000, target_p99=0.5, increase=5000, pool="api"),
        ),
    )
    key_default = (RateLimitRule(20, 1.0, "sliding_log"),)
    assert rl.defaults == RouteRateLimit(key="client_ip", key_limits=key_default, on_missing_key="skip")
    agents, inherits, header, off = (r.ratelimit for r in config.routes)
    assert agents == RouteRateLimit(
        cost=5,
        limits=(
            RateLimitRule(
                200, 0.1, "sliding_log",
                AdaptiveLimitConfig(
                    min=10, max=400, target_p99=0.25, target_error_rate=0.05,
                    decrease=0.5, increase=7, interval=2.0, pool="api",  # the route's pool
                ),
            ),
            RateLimitRule(
                200, 3600.0, "sliding_log",
                AdaptiveLimitConfig(min=100, max=200, target_error_rate=0.1, increase=10, pool="other"),
            ),
        ),
        key="jwt:sub",
        key_limits=(RateLimitRule(20, 1.0, "sliding_log"), RateLimitRule(1000, 3600.0, "sliding_window_counter")),
        on_missing_key="skip",  # from the defaults
    )
    # a route inherits what its own table leaves out
    assert inherits.key == "client_ip" and inherits.key_limits == key_default
    assert inherits.on_missing_key == "skip" and inherits.cost == 1
    assert inherits.limits[0].adaptive is not None and inherits.limits[0].adaptive.pool == "other"
    assert (header.key, header.on_missing_key, header.key_limits) == ("header:X-User-ID", "client_ip", key_default)
    assert off.key_limits == () and off.limits == ()


def test_ratelimit_defaults() -> None:
    from pyproxy.config import RateLimitConfig, RouteRateLimit

    config = parse_config(MINIMAL)
    assert config.ratelimit == RateLimitConfig()
    rl = config.ratelimit
    assert (rl.mode, rl.timeout, rl.on_redis_error, rl.sync_interval, rl.headers_on_allowed) == (
        "local", 0.05, "local", 0.05, True
    )
    assert rl.trusted_proxies == () and rl.algorithm == "sliding_window_counter"
    assert rl.jwt is None and rl.penalty is None and rl.global_limits == ()
    assert config.routes[0].ratelimit == RouteRateLimit()
    assert RouteRateLimit().key == "client_ip" and RouteRateLimit().on_missing_key == "client_ip"
    # an empty penalty table turns the box on with its defaults
    penalty = rl_config({"penalty": {}}).ratelimit.penalty
    assert penalty is not None
    assert (penalty.max_violations, penalty.violation_window, penalty.block_for, penalty.block_max) == (
        10, 60.0, 60.0, 3600.0
    )
    # redis mode: URL required, the rest defaulted; a cluster URL
    redis = rl_config({"mode": "redis", "redis_url": "rediss://h.example:6380", "cluster": True}).ratelimit
    assert (redis.mode, redis.cluster, redis.on_redis_error) == ("redis", True, "local")
    assert rl_config({"mode": "redis", "redis_url": "unix:///run/redis.sock"}).ratelimit.redis_url == "unix:///run/redis.sock"
    # an adaptive limit starts at its max unless given; increase defaults to 5% of max
    rule = rl_config(route={"limits": [{"window": "1s", "adaptive": {"min": 1, "max": 10, "target_p99": "1s"}}]}).routes[0].ratelimit.limits[0]
    assert rule.limit == 10 and rule.adaptive is not None
    assert (rule.adaptive.increase, rule.adaptive.decrease, rule.adaptive.interval, rule.adaptive.pool) == (1, 0.7, 1.0, "p")


def test_jwt_key_file_and_public_keys(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    pem = tmp_path / "jwt.pem"
    pem.write_text(public)
    jwt = rl_config({"jwt": {"key_file": str(pem), "algorithms": ["RS256", "PS256"]}}).ratelimit.jwt
    assert jwt is not None and jwt.key == public and jwt.key_file == str(pem)
    assert jwt.algorithms == ("RS256", "PS256") and jwt.audience == () and jwt.issuer is None
    assert rl_config({"jwt": {"key": public, "algorithms": ["RS512"], "audience": "api"}}).ratelimit.jwt.audience == ("api",)  # type: ignore[union-attr]
    ec_public = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert rl_config({"jwt": {"key": ec_public, "algorithms": ["ES256"]}}).ratelimit.jwt is not None
    found = rl_problems({"jwt": {"key": ec_public, "algorithms": ["RS256"]}})
    assert set(found) == {"ratelimit.jwt.key"} and "not a PEM public key for RS256" in found["ratelimit.jwt.key"]
    found = rl_problems({"jwt": {"key": private, "algorithms": ["RS256"]}})
    assert "is a private key; give the public key" in found["ratelimit.jwt.key"]
    # a PEM key given as an HMAC secret is refused by PyJWT (algorithm confusion)
    assert "not an HMAC secret" in rl_problems({"jwt": {"key": public, "algorithms": ["HS256"]}})["ratelimit.jwt.key"]
    found = rl_problems({"jwt": {"key_file": str(tmp_path / "nope.pem"), "algorithms": ["RS256"]}})
    assert "cannot read" in found["ratelimit.jwt.key_file"]
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert "too weak for RS256" in rl_problems({"jwt": {"key": small, "algorithms": ["RS256"]}})["ratelimit.jwt.key"]


GOOD_JWT = {"key": HMAC_SECRET, "algorithms": ["HS256"]}


@pytest.mark.parametrize(
    ("ratelimit", "path", "reason"),
    [
        ({"mode": "cluster"}, "mode", "expected one of local, redis, hybrid, got 'cluster'"),
        ({"mod": "redis"}, "mod", "did you mean 'mode'"),
        ({"mode": "redis"}, "redis_url", "is required with mode = 'redis'"),
        ({"mode": "hybrid"}, "redis_url", "is required with mode = 'hybrid'"),
        ({"redis_url": "redis://h:6379"}, "redis_url", "only applies to mode = 'redis' or 'hybrid' (mode is 'local')"),
        ({"cluster": True}, "cluster", "only applies to mode = 'redis' or 'hybrid'"),
        ({"timeout": "10ms"}, "timeout", "only applies to mode = 'redis' or 'hybrid'"),
        ({"on_redis_error": "deny"}, "on_redis_error", "only applies to mode = 'redis' or 'hybrid'"),
        ({"sync_interval": "10ms"}, "sync_interval", "only applies to mode = 'hybrid' (mode is 'local')"),
        ({"mode": "redis", "redis_url": "redis://h", "sync_interval": "10ms"}, "sync_interval", "only applies to mode = 'hybrid' (mode is 'redis')"),
        ({"mode": "redis", "redis_url": "http://h:6379"}, "redis_url", "expected a redis://, rediss:// or unix:// URL"),
        ({"mode": "redis", "redis_url": "redis://:pw@:6379"}, "redis_url", "needs a host"),
        ({"mode": "redis", "redis_url": "redis://h:99999"}, "redis_url", "not a valid URL"),
        ({"mode": "redis", "redis_url": "redis://h:6379/zero"}, "redis_url", "database number"),
        ({"mode": "redis", "redis_url": "unix://"}, "redis_url", "socket's path"),
        ({"mode": "redis", "redis_url": ""}, "redis_url", "non-empty string"),
        ({"mode": "redis", "redis_url": "redis://h/1", "cluster": True}, "redis_url", "only database 0"),
        ({"mode": "redis", "redis_url": "unix:///s.sock", "cluster": True}, "cluster", "reached over TCP"),
        ({"mode": "redis", "redis_url": "redis://h", "cluster": "yes"}, "cluster", "true or false"),
        ({"mode": "redis", "redis_url": "redis://h", "timeout": 0}, "timeout", "duration > 0"),
        ({"mode": "redis", "redis_url": "redis://h", "on_redis_error": "fail"}, "on_redis_error", "expected one of local, deny, allow"),
        ({"mode": "hybrid", "redis_url": "redis://h", "sync_interval": "0s"}, "sync_interval", "duration > 0"),
        ({"headers_on_allowed": "yes"}, "headers_on_allowed", "true or false"),
        ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies", "expected an array"),
        ({"trusted_proxies": ["10.0.0.1/8"]}, "trusted_proxies[0]", "has host bits set; did you mean '10.0.0.0/8'?"),
        ({"trusted_proxies": ["::1", "10.0.0.0/33"]}, "trusted_proxies[1]", "IP address or a CIDR network"),
        ({"trusted_proxies": ["proxy.internal"]}, "trusted_proxies[0]", "IP address or a CIDR network"),
        ({"algorithm": "token_bucket"}, "algorithm", "expected one of sliding_window_counter, sliding_log"),
        ({"jwt": "secret"}, "jwt", "expected a table"),
        ({"jwt": {"algorithms": ["HS256"]}}, "jwt", "needs key (an HMAC secret or a PEM public key) or key_file"),
        ({"jwt": {**GOOD_JWT, "key_file": "/x.pem"}}, "jwt.key_file", "give key or key_file, not both"),
        ({"jwt": {"key": HMAC_SECRET}}, "jwt.algorithms", "is required"),
        ({"jwt": {**GOOD_JWT, "algorithms": []}}, "jwt.algorithms", "non-empty array"),
        ({"jwt": {**GOOD_JWT, "algorithms": ["none"]}}, "jwt.algorithms[0]", "expected one of HS256"),
        ({"jwt": {**GOOD_JWT, "algorithms": ["HS256", "RS256"]}}, "jwt.algorithms", "mixes HMAC (HS256) and public-key"),
        ({"jwt": {**GOOD_JWT, "key": "short"}}, "jwt.key", "too weak for HS256"),
        ({"jwt": {**GOOD_JWT, "key": HMAC_SECRET[:40], "algorithms": ["HS512"]}}, "jwt.key", "too weak for HS512"),
        ({"jwt": {**GOOD_JWT, "key": "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"}}, "jwt.key", "not an HMAC secret"),
        ({"jwt": {**GOOD_JWT, "audience": []}}, "jwt.audience", "string or a non-empty array"),
        ({"jwt": {**GOOD_JWT, "audience": ["api", 3]}}, "jwt.audience", "string or a non-empty array"),
        ({"jwt": {**GOOD_JWT, "issuer": ""}}, "jwt.issuer", "non-empty string"),
        ({"jwt": {**GOOD_JWT, "claim": "a b"}}, "jwt.claim", "claim name"),
        ({"jwt": {**GOOD_JWT, "leeway": -1}}, "jwt.leeway", "duration >= 0"),
        ({"jwt": {**GOOD_JWT, "cache_size": -1}}, "jwt.cache_size", "between 0 and"),
        ({"jwt": {**GOOD_JWT, "cache_ttl": "0s"}}, "jwt.cache_ttl", "duration > 0"),
        ({"jwt": {**GOOD_JWT, "kee": "x"}}, "jwt.kee", "did you mean 'key'"),
        ({"penalty": {"max_violations": -1}}, "penalty.max_violations", "between 0 and"),
        ({"penalty": {"violation_window": 0}}, "penalty.violation_window", "duration > 0"),
        ({"penalty": {"block_for": "2h"}}, "penalty.block_max", "must be >= block_for (3600s < 7200s)"),
        ({"penalty": {"block_max": "1e10s"}}, "penalty.block_max", "duration like"),
        ({"penalty": {"block_for": 2e9}}, "penalty.block_for", "between 1ms and 1e9 seconds"),
        ({"penalty": {"blocks": 1}}, "penalty.blocks", "unknown key"),
        ({"global": {"limit": 1, "window": "1s"}}, "global", "expected an array of limits"),
        ({"global": [{"limit": -5, "window": "1s"}]}, "global[0].limit", "between 1 and 4294967295, got -5"),
        ({"global": [{"limit": 0, "window": "1s"}]}, "global[0].limit", "between 1 and"),
        ({"global": [{"limit": 2**32, "window": "1s"}]}, "global[0].limit", "between 1 and"),
        ({"global": [{"limit": 1.5, "window": "1s"}]}, "global[0].limit", "expected an integer"),
        ({"global": [{"window": "1s"}]}, "global[0].limit", "is required"),
        ({"global": [{"limit": 5}]}, "global[0].window", "is required"),
        ({"global": [{"limit": 5, "window": 0}]}, "global[0].window", "duration > 0"),
        ({"global": [{"limit": 5, "window": "0ms"}]}, "global[0].window", "duration > 0"),
        ({"global": [{"limit": 5, "window": "0.5ms"}]}, "global[0].window", "between 1ms and 366 days"),
        ({"global": [{"limit": 5, "window": "400d"}]}, "global[0].window", "duration like"),
        ({"global": [{"limit": 5, "window": "1s", "algorithm": "leaky"}]}, "global[0].algorithm", "sliding_window_counter, sliding_log"),
        ({"global": [{"limit": 5, "window": "1s", "burst": 2}]}, "global[0].burst", "unknown key"),
        ({"global": [{"limit": 5, "window": "1s"}, {"limit": 9, "window": 1}]}, "global[1].window", "same window as ratelimit.global[0]"),
        ({"global": [{"window": "1s", "adaptive": {"min": 1, "max": 5, "target_p99": 1}}]}, "global[0].adaptive.pool", "is required"),
        ({"global": [{"window": "1s", "adaptive": {"min": 1, "max": 5, "target_p99": 1, "pool": "pp"}}]}, "global[0].adaptive.pool", "no pool named 'pp' (did you mean 'p'?)"),
        ({"defaults": {"key": "jwt:sub"}}, "defaults.key", "'jwt:sub' needs a [ratelimit.jwt] table"),
        ({"defaults": {"key": "ip"}}, "defaults.key", "unknown key source"),
        ({"defaults": {"key": "header:X-User-ID"}}, "defaults.key", "has no effect: no route has key_limits"),
        ({"defaults": {"cost": 2, "limits": [{"limit": 1, "window": "1s"}]}}, "defaults.cost", "a request of cost 2 could never pass ratelimit.defaults.limits[0] (1 per 1s)"),
        ({"defaults": "on"}, "defaults", "expected a table"),
        ({"defaults": {"costs": 1}}, "defaults.costs", "did you mean 'cost'"),
    ],
)
def test_bad_ratelimit_values(ratelimit: dict[str, Any], path: str, reason: str) -> None:
    found = rl_problems(ratelimit)
    assert set(found) == {f"ratelimit.{path}"}, found
    assert reason in found[f"ratelimit.{path}"]


ADAPTIVE = {"min": 10, "max": 100, "target_p99": "200ms"}


@pytest.mark.parametrize(
    ("route", "path", "reason"),
    [
        ("on", "", "expected a table, got str"),
        ({"cost": -1}, "cost", "between 0 and"),
        ({"cost": 1.5}, "cost", "expected an integer"),
        ({"key": "body:user"}, "key", "unknown key source; expected 'header:NAME', 'cookie:NAME', 'query:NAME', 'client_ip', 'jwt' or 'jwt:CLAIM'"),
        ({"key": "path"}, "key", "unknown key source"),
        ({"key": "header:X User", "key_limits": [{"limit": 1, "window": 1}]}, "key", "not a valid header name"),
        ({"key": "cookie:", "key_limits": [{"limit": 1, "window": 1}]}, "key", "not a valid cookie name"),
        ({"key": "query:a=b", "key_limits": [{"limit": 1, "window": 1}]}, "key", "not a query parameter name"),
        ({"key": "jwt:", "key_limits": [{"limit": 1, "window": 1}]}, "key", "not a claim name"),
        ({"key": "jwt", "key_limits": [{"limit": 1, "window": 1}]}, "key", "'jwt' needs a [ratelimit.jwt] table"),
        ({"key": "client_ip"}, "key", "has no effect without key_limits"),
        ({"on_missing_key": "skip"}, "on_missing_key", "has no effect without key_limits"),
        ({"on_missing_key": "deny", "key_limits": [{"limit": 1, "window": 1}]}, "on_missing_key", "expected one of client_ip, skip"),
        ({"limits": [{"limit": -1, "window": "1s"}]}, "limits[0].limit", "between 1 and"),
        ({"limits": {"limit": 1, "window": "1s"}}, "limits", "expected an array of limits"),
        ({"limits": ["20/s"]}, "limits[0]", "expected a table, got str"),
        ({"key_limits": [{"limit": 20, "window": "1s"}, {"limit": 10, "window": "1000ms"}]}, "key_limits[1].window", "same window as routes[0].ratelimit.key_limits[0]"),
        ({"key_limits": [{"limit": 20, "window": "1s", "adaptive": ADAPTIVE}]}, "key_limits[0].adaptive", "only global and route limits adapt"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "max": 5}}]}, "limits[0].adaptive.max", "must be >= min (5 < 10)"),
        ({"limits": [{"window": "1s", "adaptive": {"min": 10, "target_p99": 1}}]}, "limits[0].adaptive.max", "is required"),
        ({"limits": [{"window": "1s", "adaptive": {"min": 0, "max": 5, "target_p99": 1}}]}, "limits[0].adaptive.min", "between 1 and"),
        ({"limits": [{"window": "1s", "adaptive": {"min": 1, "max": 5}}]}, "limits[0].adaptive", "needs target_p99 and/or target_error_rate"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "target_p99": "0s"}}]}, "limits[0].adaptive.target_p99", "duration > 0"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "target_error_rate": 0}}]}, "limits[0].adaptive.target_error_rate", "must be in (0, 1]"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "target_error_rate": 1.5}}]}, "limits[0].adaptive.target_error_rate", "must be in (0, 1]"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "decrease": 1}}]}, "limits[0].adaptive.decrease", "must be in (0, 1)"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "decrease": 0}}]}, "limits[0].adaptive.decrease", "must be in (0, 1)"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "increase": 0}}]}, "limits[0].adaptive.increase", "between 1 and"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "interval": -1}}]}, "limits[0].adaptive.interval", "duration > 0"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "pool": "nope"}}]}, "limits[0].adaptive.pool", "no pool named 'nope'"),
        ({"limits": [{"window": "1s", "adaptive": {**ADAPTIVE, "target": 1}}]}, "limits[0].adaptive.target", "unknown key"),
        ({"limits": [{"window": "1s", "adaptive": "on"}]}, "limits[0].adaptive", "expected a table"),
        ({"limits": [{"limit": 5, "window": "1s", "adaptive": ADAPTIVE}]}, "limits[0].limit", "starts within [min, max] = [10, 100], got 5"),
        ({"cost": 5, "limits": [{"limit": 3, "window": "1s"}]}, "cost", "a request of cost 5 could never pass routes[0].ratelimit.limits[0] (3 per 1s)"),
        ({"cost": 50, "limits": [{"window": "1s", "adaptive": ADAPTIVE}]}, "cost", "(adaptive min 10 per 1s)"),
        ({"cost": 30, "key_limits": [{"limit": 20, "window": "100ms"}]}, "cost", "routes[0].ratelimit.key_limits[0] (20 per 0.1s)"),
        ({"kee": "client_ip"}, "kee", "did you mean 'key'"),
    ],
)
def test_bad_route_ratelimit_values(route: Any, path: str, reason: str) -> None:
    found = rl_problems(route=route)
    where = f"routes[0].ratelimit.{path}" if path else "routes[0].ratelimit"
    assert set(found) == {where}, found
    assert reason in found[where]


def test_a_route_cost_is_checked_against_global_and_default_limits() -> None:
    found = rl_problems(
        {"global": [{"limit": 4, "window": "1s"}], "defaults": {"key_limits": [{"limit": 3, "window": "1m"}]}},
        {"cost": 5},
    )
    assert set(found) == {"routes[0].ratelimit.cost"}
    # one problem per limit it can never pass... reported under the same key: the last one kept
    assert "could never pass ratelimit." in found["routes[0].ratelimit.cost"]
    with pytest.raises(ConfigError) as e:
        rl_config({"global": [{"limit": 4, "window": "1s"}], "defaults": {"key_limits": [{"limit": 3, "window": "1m"}]}}, {"cost": 5})
    reasons = [p.reason for p in e.value.problems]
    assert any("ratelimit.global[0] (4 per 1s)" in r for r in reasons)
    assert any("ratelimit.defaults.key_limits[0] (3 per 60s)" in r for r in reasons)
    assert rl_config({"global": [{"limit": 5, "window": "1s"}]}, {"cost": 5}).routes[0].ratelimit.cost == 5


def test_a_problem_of_the_defaults_is_reported_once() -> None:
    data = {
        **MINIMAL,
        "ratelimit": {"defaults": {"key": "cookie:sid", "cost": 9, "limits": [{"limit": 3, "window": "1s"}]}},
        "routes": [{"pool": "p"}, {"pool": "p"}, {"pool": "p"}],
    }
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert [p.path for p in e.value.problems] == ["ratelimit.defaults.cost", "ratelimit.defaults.key"]


def test_every_ratelimit_problem_is_listed_at_once() -> None:
    found = problems(
        {
            **MINIMAL,
            "ratelimit": {
                "mode": "redis",
                "trusted_proxies": ["10.0.0.1/8"],
                "jwt": {"key": "short", "algorithms": ["HS256"]},
                "global": [{"limit": -1, "window": "1s"}],
            },
            "routes": [
                {"pool": "p", "ratelimit": {"key": "bogus", "key_limits": [{"limit": 1, "window": "0s"}]}},
            ],
        }
    )
    assert set(found) == {
        "ratelimit.redis_url",
        "ratelimit.trusted_proxies[0]",
        "ratelimit.jwt.key",
        "ratelimit.global[0].limit",
        "routes[0].ratelimit.key",
        "routes[0].ratelimit.key_limits[0].window",
    }
    # a jwt source is not also told to add [ratelimit.jwt] when that table exists with problems
    found = problems(
        {
            **MINIMAL,
            "ratelimit": {"jwt": {"key": "short", "algorithms": ["HS256"]}},
            "routes": [{"pool": "p", "ratelimit": {"key": "jwt:sub", "key_limits": [{"limit": 1, "window": 1}]}}],
        }
    )
    assert set(found) == {"ratelimit.jwt.key"}


def test_ratelimit_secrets_are_redacted() -> None:
    config = rl_config(
        {"mode": "redis", "redis_url": "redis://proxy:s3cret@10.0.0.5:6379/0?password=also&db=0", "jwt": GOOD_JWT}
    )
    assert "s3cret" not in repr(config) and HMAC_SECRET not in repr(config)
    data = config.redacted()
    assert json.loads(json.dumps(data)) == data
    rl = data["ratelimit"]
    assert rl["redis_url"] == "redis://proxy:<redacted>@10.0.0.5:6379/0?password=<redacted>&db=0"
    assert rl["jwt"]["key"] == "<redacted>" and rl["jwt"]["algorithms"] == ["HS256"]
    assert "s3cret" not in json.dumps(data) and HMAC_SECRET not in json.dumps(data)
    assert config.ratelimit.redis_url is not None and "s3cret" in config.ratelimit.redis_url  # the real one is kept
    assert config_module.redact_url("redis://:pw@h:1") == "redis://:<redacted>@h:1"
    assert config_module.redact_url("redis://h:1/0") == "redis://h:1/0"
    assert config_module.redact_url("redis://user@h") == "redis://user@h"
    # a bad URL is never echoed with its password in a problem
    found = rl_problems({"mode": "redis", "redis_url": "http://u:topsecret@h"})
    assert "topsecret" not in found["ratelimit.redis_url"] and "<redacted>" in found["ratelimit.redis_url"]
    full = parse_config(tomllib.loads(FULL_RATELIMIT)).redacted()["ratelimit"]
    assert full["global"][1]["adaptive"]["pool"] == "api" and "global_limits" not in full
    assert full["trusted_proxies"][0] == "10.0.0.0/8" and full["penalty"]["block_max"] == 600.0


def test_example_file_documents_the_ratelimit_defaults() -> None:
    from pyproxy.config import RateLimitConfig

    config = load_config(EXAMPLE)
    rl = config.ratelimit
    d = RateLimitConfig()
    assert (rl.mode, rl.on_redis_error, rl.headers_on_allowed, rl.algorithm) == (
        d.mode, d.on_redis_error, d.headers_on_allowed, d.algorithm
    )
    assert rl.penalty is not None and rl.global_limits
    summarize = config.routes[0].ratelimit
    assert summarize.cost == 5 and summarize.key == "header:X-User-ID"
    assert [(r.limit, r.window) for r in summarize.key_limits] == [(20, 1.0), (1000, 3600.0)]
    assert summarize.limits[0].adaptive is not None and summarize.limits[0].adaptive.pool == "summarizer"
    # the default route inherits [ratelimit.defaults]
    assert config.routes[1].ratelimit.key_limits == rl.defaults.key_limits != ()


def test_cache_section_and_route_cache_tables() -> None:
    from pyproxy.config import parse_config

    base = {"listeners": [{"port": 8080}], "pools": {"p": {"servers": ["127.0.0.1:9000"]}}}
    config = parse_config(
        {
            **base,
            "cache": {
                "redis_url": "redis://:secret@127.0.0.1:6379",
                "sqlite_path": "/var/lib/pyproxy/cache.sqlite3",
                "compression": "lz4",
                "depends": [{"tag": "page:home", "on": "user:7"}],
                "defaults": {"ttl": "30s", "query": "sort"},
            },
            "routes": [
                {"name": "cached", "pool": "p", "cache": {"tiers": ["memory", "sql"], "cache_post": True}},
                {"name": "plain", "pool": "p", "path_prefix": "/x"},
            ],
        }
    )
    cached, plain = config.routes
    assert cached.cache.enabled and cached.cache.ttl == 30 and cached.cache.query == "sort"
    assert cached.cache.tiers == ("memory", "sql") and cached.cache.cache_post
    assert not plain.cache.enabled, "[cache.defaults] configures; routes opt in"
    assert config.cache.depends == (("page:home", "user:7"),)
    assert config.redacted()["cache"]["redis_url"] == "redis://:<redacted>@127.0.0.1:6379"


def test_cache_config_problems_name_key_and_reason() -> None:
    from pyproxy.config import ConfigError, parse_config

    base = {"listeners": [{"port": 8080}], "pools": {"p": {"servers": ["127.0.0.1:9000"]}}}
    with pytest.raises(ConfigError) as e:
        parse_config(
            {
                **base,
                "cache": {"compression": "brotli", "cluster": True, "sqlite_path": "a", "postgres_dsn": "postgresql://x/y", "bogus": 1},
                "routes": [{"pool": "p", "cache": {"tiers": ["redis"], "ttl": "soon", "query": "shuffle"}}],
            }
        )
    text = str(e.value)
    for expected in (
        "cache.bogus: unknown key",
        "cache.cluster: needs redis_url",
        "cache.compression: expected one of zstd, lz4, none",
        "cache.postgres_dsn: L3 is one database",
        "routes[0].cache.tiers[0]: tier 'redis' is not configured in [cache]",
        "routes[0].cache.ttl:",
        "routes[0].cache.query: expected one of keep, sort, drop",
    ):
        assert expected in text, (expected, text)

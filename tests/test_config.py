"""Configuration: the example file, values with units, every problem listed with its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyproxy.config import (
    ConfigError,
    Limits,
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

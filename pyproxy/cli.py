"""The ``pyproxy`` command.

``pyproxy --version``; ``pyproxy run --config FILE`` runs the proxy; ``pyproxy check --config FILE`` validates a configuration and lists every
problem (exit status 1 if there is any); ``pyproxy demo`` runs a short tour of the core structures
(the proxy's own demo replaces it when the data plane lands).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence

from pyproxy import __version__


def _demo() -> int:
    from pyproxy.core import HashRing, LruCache, SlidingWindow

    print(f"pyproxy {__version__}: core structures (Rust, via pyproxy.core)\n")

    cache = LruCache(64 * 1024, default_ttl=30)
    cache.set("/v1/summarize?doc=42", b'{"summary": "..."}')
    print("LruCache    get hit  ->", cache.get("/v1/summarize?doc=42"))
    print("            get miss ->", cache.get("/v1/other"))
    print("            stats    ->", cache.stats())

    ring = HashRing(["agent-a:8000", "agent-b:8000", "agent-c:8000"])
    spread = Counter(ring.get(f"session-{i}") for i in range(30_000))
    print("\nHashRing    session-1 ->", ring.get("session-1"))
    print("            30k sessions ->", dict(sorted(spread.items())))

    limiter = SlidingWindow(5, 1.0)
    now = time.monotonic()
    results = [limiter.hit("user-7", now=now + i * 0.01)[0] for i in range(8)]
    print("\nSlidingWindow 5/s, 8 hits in 80 ms ->", ["allow" if r else "deny" for r in results])
    return 0


def _check(path: str) -> int:
    from pyproxy.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"{path}: {len(e.problems)} problem(s)", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    routes = len(config.routes)
    servers = sum(len(p.servers) for p in config.pools.values())
    print(
        f"{path}: OK ({len(config.listeners)} listener(s), {len(config.pools)} pool(s) with "
        f"{servers} server(s), {routes} route(s), {config.workers} worker(s))"
    )
    return 0


def _run(path: str) -> int:
    import logging

    from pyproxy.config import ConfigError, load_config
    from pyproxy.server import run

    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"{path}: {len(e.problems)} problem(s); not starting", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyproxy`` console script and ``python -m pyproxy``."""
    parser = argparse.ArgumentParser(prog="pyproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run a short tour of the core structures")
    check = sub.add_parser("check", help="validate a configuration file and list every problem")
    check.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    run_cmd = sub.add_parser("run", help="run the proxy with a configuration file")
    run_cmd.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo()
    if args.command == "check":
        return _check(args.config)
    if args.command == "run":
        return _run(args.config)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

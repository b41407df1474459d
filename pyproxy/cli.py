"""The ``pyproxy`` command (also ``python -m pyproxy``).

- ``pyproxy run --config FILE``: run the proxy;
- ``pyproxy check --config FILE``: validate a configuration, list every problem (exit 1 if any);
- ``pyproxy demo``: the proxy with an embedded configuration in front of three built-in sample
  upstreams;
- ``pyproxy --version``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyproxy import __version__

if TYPE_CHECKING:
    from pyproxy.config import Config


def _listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for ``--listen`` (port 0: any free port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _demo(listen: tuple[str, int], admin: tuple[str, int]) -> int:
    """The proxy with an embedded configuration in front of three built-in sample upstreams."""
    import logging

    from pyproxy.config import parse_config
    from pyproxy.loop import serve_until_signal
    from pyproxy.sample_server import SampleServer
    from pyproxy.server import ProxyServer

    upstreams = [
        SampleServer(name="fast", latency=0.001),
        SampleServer(name="medium", latency=0.01),
        SampleServer(name="slow", latency=0.05),
    ]
    proxy: list[ProxyServer] = []

    async def start() -> None:
        for u in upstreams:
            await u.start()
        config = parse_config(
            {
                "listeners": [{"host": listen[0], "port": listen[1]}],
                "admin": {"host": admin[0], "port": admin[1]},
                "pools": {"samples": {"servers": [u.address for u in upstreams]}},
                "routes": [{"name": "all", "pool": "samples"}],
            }
        )
        server = ProxyServer(config)
        await server.start()
        proxy.append(server)
        bound_host, bound_port = server.addresses[0]
        url = f"http://{bound_host}:{bound_port}"
        print(f"pyproxy {__version__} demo: proxy on {url}, in front of", flush=True)
        for u in upstreams:
            print(f"  {u.name:>6} upstream on {u.address} ({u.latency * 1000:g} ms per request)")
        if server.admin is not None and server.admin.address is not None:
            print(f"admin API on http://{server.admin.address[0]}:{server.admin.address[1]}"
                  " (/healthz /readyz /config)")
        print(f"\nTry:\n  curl -i {url}/hello\n  curl -i -X POST --data 'hi there' {url}/echo")
        print(f"  curl -s -o /dev/null -w '%{{http_code}} %{{size_download}} bytes\\n' {url}/bytes/10000000")
        print("\nCtrl-C stops the proxy and the sample upstreams.", flush=True)

    async def stop() -> None:
        for server in proxy:
            await server.stop()
        for u in upstreams:
            await u.stop()

    logging.basicConfig(level=logging.WARNING)
    serve_until_signal(start, stop)
    return 0


def _load(path: str, refusing: str = "") -> Config | None:
    """The configuration at ``path``, or ``None`` after listing every problem on stderr."""
    from pyproxy.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        print(f"{path}: {len(e.problems)} problem(s){refusing}", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _check(path: str) -> int:
    config = _load(path)
    if config is None:
        return 1
    servers = sum(len(p.servers) for p in config.pools.values())
    print(
        f"{path}: OK ({len(config.listeners)} listener(s), {len(config.pools)} pool(s) with "
        f"{servers} server(s), {len(config.routes)} route(s), {config.workers} worker(s))"
    )
    return 0


def _run(path: str) -> int:
    import logging
    from pathlib import Path

    from pyproxy.server import run

    config = _load(path, "; not starting")
    if config is None:
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(config, Path(path))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyproxy`` console script and ``python -m pyproxy``."""
    parser = argparse.ArgumentParser(prog="pyproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the proxy in front of three built-in sample upstreams")
    demo.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT", type=_listen_address,
                      help="where the demo proxy listens (default 127.0.0.1:8080; port 0: any free)")
    demo.add_argument("--admin", default="127.0.0.1:9901", metavar="HOST:PORT", type=_listen_address,
                      help="where the demo's admin API listens (default 127.0.0.1:9901)")
    check = sub.add_parser("check", help="validate a configuration file and list every problem")
    check.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    run_cmd = sub.add_parser("run", help="run the proxy with a configuration file")
    run_cmd.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args.listen, args.admin)
    if args.command == "check":
        return _check(args.config)
    if args.command == "run":
        return _run(args.config)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

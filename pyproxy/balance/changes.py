"""Run-time changes to pools (the admin API's ``/upstreams``): add a server, change its weight,
drain it, remove it — applied in every worker, kept across configuration reloads.

The process that serves the admin API (the single worker, or the supervisor) keeps a
:class:`ChangeLog`: an append-only list of numbered :class:`PoolChange` records, validated against
its model of each pool (the configured servers with the changes so far applied). Workers apply
the records they have not applied yet, in order (:func:`apply_change`): the supervisor writes the
whole log to a file it created before forking and signals the workers (``SIGUSR1``); a worker
started later applies the whole log at start.

A reload keeps the changes of every pool whose configuration did not change (its run-time pool,
changes included, lives on untouched); a pool the new configuration changes is rebuilt from it,
and the changes made to it are dropped — "until the configuration itself changes them".
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyproxy.balance.pool import UpstreamPool
from pyproxy.config import Config, Pool, Server, parse_address

__all__ = ["ChangeError", "ChangeLog", "PoolChange", "apply_change", "read_changes"]

log = logging.getLogger("pyproxy.balance")

OPS = ("add", "update", "remove")


class ChangeError(Exception):
    """A change the admin API refuses: ``status`` (400, 404, 409) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class PoolChange:
    """One change: ``add`` (server, weight), ``update`` (weight and/or drain), ``remove`` (drain,
    then drop once its in-flight requests finished)."""

    seq: int
    op: str
    pool: str
    server: str  # "host:port" (the server's id)
    weight: float | None = None
    drain: bool | None = None


def apply_change(pool: UpstreamPool, change: PoolChange) -> None:
    """Apply ``change`` to a worker's run-time pool (validated already; stale ones are skipped)."""
    try:
        if change.op == "add":
            host, port = parse_address(change.server)
            weight = change.weight if change.weight is not None else 1.0
            pool.add_server(Server(host, port, max(1, round(weight))), weight=weight)
        elif change.op == "update":
            if change.weight is not None:
                pool.set_weight(change.server, change.weight)
            if change.drain is True:
                pool.drain(change.server, remove=False)
            elif change.drain is False:
                pool.undrain(change.server)
        elif change.op == "remove":
            pool.drain(change.server, remove=True)
    except (KeyError, ValueError) as e:
        # A worker whose pool differs from the model (a change raced a restart): say so, go on.
        log.warning("pool %s: change %s not applied: %s", pool.name, change, e)


def read_changes(path: Path) -> list[PoolChange]:
    """The change log a supervisor wrote (empty when there is none yet)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return [PoolChange(**item) for item in raw]


class ChangeLog:
    """The admin side: validates changes against a model of the pools and numbers them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.changes: list[PoolChange] = []
        self._seq = 0

    def servers(self, pool: str) -> dict[str, dict[str, Any]]:
        """The model of ``pool``'s servers: configured ones with the changes applied."""
        if pool not in self.config.pools:
            raise ChangeError(404, f"no pool {pool!r}")
        model = {s.address: {"weight": float(s.weight), "draining": False} for s in self.config.pools[pool].servers}
        for c in self.changes:
            if c.pool != pool:
                continue
            if c.op == "add":
                model[c.server] = {"weight": c.weight if c.weight is not None else 1.0, "draining": False}
            elif c.op == "update" and c.server in model:
                if c.weight is not None:
                    model[c.server]["weight"] = c.weight
                if c.drain is not None:
                    model[c.server]["draining"] = c.drain
            elif c.op == "remove":
                model.pop(c.server, None)
        return model

    def add(self, pool: str, body: Mapping[str, Any]) -> PoolChange:
        """``POST /upstreams/{pool}/servers`` with ``{"address": "host:port", "weight": 1}``."""
        _only(body, {"address", "weight"})
        address = body.get("address")
        if not isinstance(address, str):
            raise ChangeError(400, "'address' (\"host:port\") is required")
        try:
            host, port = parse_address(address)
        except Exception as e:  # noqa: BLE001 - the config's own parse error: its message is the reason
            raise ChangeError(400, f"address: {e}") from None
        server = Server(host, port).address
        if server in self.servers(pool):
            raise ChangeError(409, f"server {server} is already in pool {pool!r}")
        return self._append("add", pool, server, weight=_weight(body.get("weight", 1)))

    def update(self, pool: str, server: str, body: Mapping[str, Any]) -> PoolChange:
        """``PATCH /upstreams/{pool}/servers/{server}`` with ``weight`` and/or ``drain``."""
        _only(body, {"weight", "drain"})
        if server not in self.servers(pool):
            raise ChangeError(404, f"no server {server} in pool {pool!r}")
        if not body:
            raise ChangeError(400, "nothing to change: give 'weight' and/or 'drain'")
        drain = body.get("drain")
        if drain is not None and not isinstance(drain, bool):
            raise ChangeError(400, "'drain' must be true or false")
        weight = _weight(body["weight"]) if "weight" in body else None
        return self._append("update", pool, server, weight=weight, drain=drain)

    def remove(self, pool: str, server: str) -> PoolChange:
        """``DELETE /upstreams/{pool}/servers/{server}``: drain, then remove."""
        servers = self.servers(pool)
        if server not in servers:
            raise ChangeError(404, f"no server {server} in pool {pool!r}")
        if len(servers) == 1:
            raise ChangeError(409, f"server {server} is the last of pool {pool!r}; a pool needs one")
        return self._append("remove", pool, server)

    def _append(self, op: str, pool: str, server: str, **fields: Any) -> PoolChange:
        self._seq += 1
        change = PoolChange(self._seq, op, pool, server, **fields)
        self.changes.append(change)
        log.info("pool change %d: %s %s %s %s", change.seq, op, pool, server, fields or "")
        return change

    def reloaded(self, new: Config) -> None:
        """Drop the changes of pools the new configuration changes or removes."""
        kept = [c for c in self.changes if _pool_unchanged(self.config.pools.get(c.pool), new.pools.get(c.pool))]
        dropped = len(self.changes) - len(kept)
        if dropped:
            log.info("reload: %d run-time pool change(s) dropped (their pools changed)", dropped)
        self.changes, self.config = kept, new

    def write(self, path: Path) -> None:
        """Replace ``path`` atomically with the whole log (for the workers)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(c) for c in self.changes]))
        os.replace(tmp, path)


def pending(changes: Iterable[PoolChange], applied: int) -> list[PoolChange]:
    """The changes numbered after ``applied``, in order."""
    return [c for c in changes if c.seq > applied]


def _only(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ChangeError(400, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _weight(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1_000_000:
        raise ChangeError(400, f"'weight' must be a number in [0, 1000000], got {value!r}")
    return float(value)


def _pool_unchanged(old: Pool | None, new: Pool | None) -> bool:
    return old is not None and old == new

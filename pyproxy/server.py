"""Listeners and the process around them: start, serve, stop.

``workers = 1`` serves every listener on one event loop (uvloop when installed) in this process.
``workers = N`` makes this process a supervisor that forks N workers; each binds the listeners
itself with SO_REUSEPORT (so the kernel spreads connections over the workers' own accept queues,
rather than waking them all on one shared queue), and a worker that dies is replaced.

SIGINT/SIGTERM stop accepting, let in-flight requests finish (answered with ``Connection: close``)
for up to ``limits.drain_timeout`` and exit 0; the supervisor passes the signal to its workers and
exits 0 when they have. SIGHUP (or ``POST /reload`` on the admin API) re-reads the configuration
file: a valid one is applied without dropping a connection (in every worker), an invalid one is
refused with every problem logged (and returned by the admin API) while the old one keeps running.

Run-time pool changes (admin ``/upstreams``) are validated by whoever serves the admin API (this
process with one worker, the supervisor with several) and applied in every worker: the supervisor
writes its change log to a file made before forking and sends the workers SIGUSR1; a worker
started later applies the whole log at start (see :mod:`pyproxy.balance.changes`).

The penalty box (admin ``/ratelimits/blocked``) needs no such message: blocks live in the machine's
shared rate-limit table and, in modes ``redis`` / ``hybrid``, in Redis, so whoever serves the admin
API reads and lifts them there itself (see :mod:`pyproxy.ratelimit.penalty_box`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pyproxy.admin import AdminServer
from pyproxy.cache import MemoryTier, TagGraph, TieredCache
from pyproxy.cache.phase import tiers_for
from pyproxy.cache.purges import PurgeRecord, append_purge, read_purges
from pyproxy.balance.changes import ChangeError, ChangeLog, PoolChange, apply_change, read_changes
from pyproxy.config import Config, ConfigError, Problem, load_config, reload_problems
from pyproxy.core import SharedWindows
from pyproxy.loop import in_thread, serve_until_signal
from pyproxy.observe.metrics import (
    PUBLISH_INTERVAL,
    SharedSnapshots,
    Snapshot,
    merge,
    merge_ratelimit,
    merge_upstreams,
    render,
    without_gauges,
)
from pyproxy.proxy import ClientConnection, ProxyState
from pyproxy.ratelimit.local import LocalLimiter
from pyproxy.ratelimit.penalty_box import PenaltyBox
from pyproxy.ratelimit.phase import TABLE_CAPACITY

__all__ = ["ProxyServer", "run"]

log = logging.getLogger("pyproxy.server")

PURGES_FILE = "cache-purges.jsonl"  # beside the pool change log: cache purges for the workers


class ProxyServer:
    """The proxy's listeners over one :class:`~pyproxy.proxy.ProxyState`, and (when ``admin``)
    the admin API, for which it is the :class:`~pyproxy.admin.Controller`."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        admin: bool = True,
        publish: tuple[SharedSnapshots, int] | None = None,
        changes_path: Path | None = None,
        ratelimit_local: LocalLimiter | None = None,
    ) -> None:
        self.config = config
        # The machine-wide rate-limit counters and journal of blocked keys: made by the supervisor
        # before forking (None: this process makes its own when a configuration needs one).
        self.ratelimit_local = ratelimit_local
        self._penalty_box: PenaltyBox | None = None
        self.config_path = config_path
        # Run-time pool changes: this process validates them (admin here), or a supervisor wrote
        # them to ``changes_path`` and signals SIGUSR1.
        self.changes = ChangeLog(config)
        self.changes_path = changes_path
        self._changes_applied = 0
        # Cache purges the supervisor made (see pyproxy/cache/purges.py), beside the change log.
        self.purges_path = changes_path.parent / PURGES_FILE if changes_path is not None else None
        self._purges_applied = 0
        # Where this worker publishes its metrics for the supervisor (several workers), if anywhere.
        self.publish = publish
        self._publisher: asyncio.TimerHandle | None = None
        self.state: ProxyState | None = None
        self._servers: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []
        self.admin: AdminServer | None = (
            AdminServer(self, config.admin) if admin and config.admin.enabled else None
        )

    async def start(self) -> None:
        """Bind every listener (port 0 takes a free port: see :attr:`addresses`)."""
        loop = asyncio.get_running_loop()
        self.state = state = ProxyState.from_config(self.config, self.ratelimit_local)
        state.open_access_log()
        state.start()
        if self.changes_path is not None:
            # Handler first, then read the log: a change announced in between is applied by the
            # signal (applying is idempotent); the other order would lose it (SIGUSR1 is ignored
            # until the handler is in place) until the next change.
            loop.add_signal_handler(signal.SIGUSR1, self.apply_pending_changes)
            self.apply_pending_changes()
        for listener in self.config.listeners:
            server = await loop.create_server(
                lambda: ClientConnection(state),
                listener.host,
                listener.port,
                reuse_address=True,
                reuse_port=self.config.workers > 1,
                backlog=1024,
            )
            self._servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            self.addresses.append((host, port))
            log.info("listening on %s:%d", host, port)
        if self.admin is not None:
            await self.admin.start()
        if self.publish is not None:
            self._publish()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``limits.drain_timeout``), close."""
        if self._publisher is not None:
            self._publisher.cancel()
        if self.admin is not None:
            await self.admin.stop()
        if self._penalty_box is not None:
            await self._penalty_box.aclose()
        for server in self._servers:
            server.close()
        if self.state is not None:
            await self.state.drain(self.config.limits.drain_timeout)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.publish is not None and self.state is not None:
            shared, slot = self.publish
            shared.write(slot, self.state.snapshot())

    def _publish(self) -> None:
        assert self.publish is not None and self.state is not None
        shared, slot = self.publish
        shared.write(slot, self.state.snapshot())
        self._publisher = asyncio.get_running_loop().call_later(PUBLISH_INTERVAL, self._publish)

    # -- admin Controller
    def current_config(self) -> Config:
        return self.state.config if self.state is not None else self.config

    def metrics_text(self) -> bytes:
        state = self.state
        return render(lambda: state.snapshot() if state is not None else merge([]))

    def upstreams(self) -> dict[str, Any]:
        # Through the same merge as the supervisor's, so GET /upstreams has one shape (with
        # "workers") whatever the number of workers.
        return merge_upstreams([self.state.upstream_view()]) if self.state is not None else {}

    def ratelimits(self) -> dict[str, Any]:
        snap = self.state.snapshot() if self.state is not None else {}
        return merge_ratelimit([snap["ratelimit"]] if "ratelimit" in snap else [])

    def penalty_box(self) -> PenaltyBox | None:
        # This process's own limiter (the admin API runs on its loop), once rate limiting made one.
        local = self.state.ratelimit_local if self.state is not None else None
        if local is not None and self._penalty_box is None:
            self._penalty_box = PenaltyBox(local, lambda: self.current_config().ratelimit)
        return self._penalty_box

    def change_upstreams(self, method: str, pool: str, server: str | None, body: dict[str, Any]) -> dict[str, Any]:
        change = _record_change(self.changes, method, pool, server, body)
        self._apply_change(change)
        return {"change": asdict(change), "servers": self.changes.servers(pool)}

    def _apply_change(self, change: PoolChange) -> None:
        if self.state is None:
            return
        upstream = self.state.upstreams.get(change.pool)
        if upstream is None:
            return
        apply_change(upstream, change)
        if change.op == "remove" and change.server not in upstream.states:
            # Removed at once (nothing in flight): its kept-alive connections go too, instead of
            # staying open for idle_timeout. (With requests in flight the last one closes them.)
            self.state.pools[change.pool].close_server(change.server)

    def apply_pending_changes(self) -> None:
        """Apply what the supervisor's change log and purge log hold beyond what this worker applied."""
        if self.changes_path is None or self.state is None:
            return
        for change in read_changes(self.changes_path):
            if change.seq > self._changes_applied:
                self._apply_change(change)
                self._changes_applied = change.seq
        if self.purges_path is not None:
            memory = self.state.cache.memory if self.state is not None and self.state.cache is not None else None
            for purge in read_purges(self.purges_path, self._purges_applied):
                if memory is not None:
                    memory.delete_now(list(purge.keys))
                    memory.purge_tags_now(purge.tags)
                self._purges_applied = purge.seq

    async def purge_cache(self, keys: list[str], tags: list[str]) -> dict[str, Any]:
        """One process: its own tiers (shared ones included; Redis tells the other instances)."""
        cache = self.state.cache if self.state is not None else None
        if cache is None:
            return {"keys": keys, "tags": sorted(tags), "removed": {}}
        removed: dict[str, int] = {}
        if keys:
            removed["keys"] = await cache.cache.delete(*keys)
        closure = set(tags)
        if tags:
            result = await cache.cache.purge_tags(*tags)
            closure = result.tags
            removed.update(result.removed)
        return {"keys": keys, "tags": sorted(closure), "removed": removed}

    def ready(self) -> tuple[bool, str]:
        if self.state is None:
            return False, "starting"
        if self.state.draining:
            return False, "shutting down"
        return True, ""

    def reload(self) -> list[Problem]:
        """Re-read the configuration file and apply it, or return why not (nothing changes)."""
        new, problems = _load_for_reload(self.config_path, self.current_config())
        if new is not None and self.state is not None:
            self.state.apply(new)
            self.changes.reloaded(new)
            log.info("configuration reloaded from %s", self.config_path)
        else:
            log.error("reload refused: %s", "; ".join(map(str, problems)))
        return problems

    @contextlib.contextmanager
    def running(self) -> Iterator[ProxyServer]:
        """Serve from a background thread (tests, embedding in synchronous code)."""
        with in_thread(self.start, self.stop, "pyproxy"):
            yield self


def _record_change(changes: ChangeLog, method: str, pool: str, server: str | None, body: dict[str, Any]) -> PoolChange:
    """Validate one admin pool change into the log (``ChangeError`` when refused)."""
    if method == "POST" and server is None:
        return changes.add(pool, body)
    if method == "PATCH" and server is not None:
        return changes.update(pool, server, body)
    if method == "DELETE" and server is not None:
        if body:
            raise ChangeError(400, "DELETE takes no body")
        return changes.remove(pool, server)
    raise ChangeError(405, f"{method} is not a pool change")


def _load_for_reload(path: Path | None, running: Config) -> tuple[Config | None, list[Problem]]:
    """The configuration a reload would switch to, or the problems that refuse it."""
    if path is None:
        return None, [Problem("", "no configuration file to reload (embedded configuration)")]
    try:
        new = load_config(path)
    except ConfigError as e:
        return None, e.problems
    problems = reload_problems(running, new)
    return (None, problems) if problems else (new, [])


def run(config: Config, config_path: Path | None = None) -> int:
    """Serve ``config`` until SIGINT or SIGTERM (SIGHUP reloads ``config_path``); exit status."""
    if config.workers == 1:
        serve_worker(config, config_path, admin=True)
        return 0
    return Supervisor(config, config_path).run()


def serve_worker(
    config: Config,
    config_path: Path | None,
    admin: bool,
    publish: tuple[SharedSnapshots, int] | None = None,
    changes_path: Path | None = None,
    ratelimit_local: LocalLimiter | None = None,
) -> None:
    """One worker: the listeners on one event loop until SIGINT or SIGTERM; SIGHUP reloads."""
    server = ProxyServer(
        config, config_path, admin=admin, publish=publish, changes_path=changes_path,
        ratelimit_local=ratelimit_local,
    )
    serve_until_signal(server.start, server.stop, on_hangup=server.reload)


class Supervisor:
    """Forks ``config.workers`` workers, replaces any that dies, stops them all on a signal."""

    # A worker that dies this soon after starting is crashing at start: wait before the next try,
    # so a broken deployment does not fork in a tight loop.
    FAST_CRASH_SECONDS = 1.0

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        # Created before any fork, so every worker shares it: one metrics slot per worker.
        self.snapshots = SharedSnapshots(config.workers)
        self.retired: Snapshot = merge([])  # what workers that died had counted
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at)
        self.changes = ChangeLog(config)
        # Rate-limit counters every worker shares (made now, before any fork; 4 MiB, so always:
        # a reload may turn limits on). The limiter, not only its table: its journal of blocked
        # keys is then shared too, so the admin API here lists what any worker blocked.
        self.ratelimit_local = LocalLimiter(SharedWindows(TABLE_CAPACITY))
        self._penalty_box: PenaltyBox | None = None
        self._changes_dir = Path(tempfile.mkdtemp(prefix="pyproxy-"))
        self.changes_path = self._changes_dir / "pool-changes.json"
        self.changes.write(self.changes_path)
        self.purges_path = self._changes_dir / PURGES_FILE
        self._purges_made = 0
        self._shared_cache: TieredCache | None = None  # the tiers the workers share, on the admin loop
        self.stopping = False
        self.restarts = 0

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reload())
        for slot in range(self.config.workers):
            self._spawn(slot)
        with contextlib.ExitStack() as stack:
            if self.config.admin.enabled:
                # The admin API lives here, once for all workers, on a thread of its own.
                admin = AdminServer(self, self.config.admin)
                stack.enter_context(in_thread(admin.start, self._stop_admin(admin), "pyproxy-admin"))
            stack.callback(shutil.rmtree, self._changes_dir, True)
            self._supervise()
        return 0

    def _stop_admin(self, admin: AdminServer) -> Callable[[], Awaitable[None]]:
        async def stop() -> None:
            await admin.stop()
            if self._penalty_box is not None:
                await self._penalty_box.aclose()  # on the admin API's loop, which opened it

        return stop

    # -- admin Controller
    def current_config(self) -> Config:
        return self.config

    def penalty_box(self) -> PenaltyBox:
        # Used on the admin API's thread only: this process's copy of the workers' limiter (its
        # caches are this copy's own; table and journal are shared) and a Redis client of its own.
        if self._penalty_box is None:
            self._penalty_box = PenaltyBox(self.ratelimit_local, lambda: self.config.ratelimit)
        return self._penalty_box

    def metrics_text(self) -> bytes:
        def snapshot() -> Snapshot:
            live = [self.snapshots.read(slot) for slot in range(self.config.workers)]
            return merge([self.retired, *(s for s in live if s is not None)])

        return render(snapshot)

    def upstreams(self) -> dict[str, Any]:
        live = [self.snapshots.read(slot) for slot in range(self.config.workers)]
        return merge_upstreams(s.get("upstreams", {}) for s in live if s is not None)

    def ratelimits(self) -> dict[str, Any]:
        live = [self.snapshots.read(slot) for slot in range(self.config.workers)]
        views = [s["ratelimit"] for s in (self.retired, *live) if s is not None and "ratelimit" in s]
        return merge_ratelimit(views)

    def change_upstreams(self, method: str, pool: str, server: str | None, body: dict[str, Any]) -> dict[str, Any]:
        change = _record_change(self.changes, method, pool, server, body)
        self._broadcast_changes()
        return {"change": asdict(change), "servers": self.changes.servers(pool)}

    async def purge_cache(self, keys: list[str], tags: list[str]) -> dict[str, Any]:
        """Purge the shared tiers here (Redis also tells the other instances), and the workers'
        memory through the purge log and SIGUSR1."""
        removed: dict[str, int] = {}
        closure = await TagGraph(self.config.cache.depends).closure(tags)
        shared = await self._shared_tiers()
        if shared is not None:
            if keys:
                removed["keys"] = await shared.delete(*keys)
            if tags:
                result = await shared.purge_tags(*tags)
                closure = result.tags
                removed.update(result.removed)
        self._purges_made += 1
        append_purge(self.purges_path, PurgeRecord(self._purges_made, tuple(keys), tuple(sorted(closure))))
        self._signal_workers()
        return {"keys": keys, "tags": sorted(closure), "removed": removed, "workers": len(self.children)}

    async def _shared_tiers(self) -> TieredCache | None:
        cache = self.config.cache
        if cache.redis_url is None and cache.sqlite_path is None and cache.postgres_dsn is None:
            return None
        if self._shared_cache is None:
            tiers = [t for t in tiers_for(cache) if not isinstance(t, MemoryTier)]
            self._shared_cache = await TieredCache(tiers, timeout=cache.timeout, dependencies=cache.depends).start()
        return self._shared_cache

    def _broadcast_changes(self) -> None:
        self.changes.write(self.changes_path)
        self._signal_workers()

    def _signal_workers(self) -> None:
        """Tell every worker to read the change and purge logs."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    def ready(self) -> tuple[bool, str]:
        alive = len(self.children)
        if self.stopping:
            return False, "shutting down"
        if alive < self.config.workers:
            return False, f"{alive} of {self.config.workers} workers running"
        return True, ""

    def reload(self) -> list[Problem]:
        """Validate the file here, then have every worker re-read it (SIGHUP)."""
        new, problems = _load_for_reload(self.config_path, self.config)
        if new is None:
            log.error("reload refused: %s", "; ".join(map(str, problems)))
            return problems
        self.config = new  # workers started from now on get it too
        self.changes.reloaded(new)
        self.changes.write(self.changes_path)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        log.info("configuration reloaded from %s in %d workers", self.config_path, len(self.children))
        return []

    def _supervise(self) -> None:
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid not in self.children:
                continue
            slot, started = self.children.pop(pid)
            last = self.snapshots.read(slot)
            if last is not None:  # its counts live on in the totals
                self.retired = merge([self.retired, without_gauges(last)])
                self.snapshots.clear(slot)
            if self.stopping:
                continue
            log.error("worker %d (pid %d) exited (%s); starting another", slot, pid, _describe(status))
            self.restarts += 1
            if time.monotonic() - started < self.FAST_CRASH_SECONDS:
                time.sleep(self.FAST_CRASH_SECONDS)
            if not self.stopping:
                self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                # Pool changes may be announced before the loop handles SIGUSR1; the log is read
                # at start anyway.
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                serve_worker(
                    self.config, self.config_path, admin=False, publish=(self.snapshots, slot),
                    changes_path=self.changes_path, ratelimit_local=self.ratelimit_local,
                )
                code = 0
            except BaseException:  # noqa: BLE001 - reported, then the supervisor replaces us
                log.exception("worker %d failed", slot)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (slot, time.monotonic())
        log.info("worker %d started (pid %d)", slot, pid)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"

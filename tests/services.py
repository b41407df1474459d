"""Real external services for the tests: Redis, a 3-master Redis Cluster and PostgreSQL.

Each class starts real server processes on free 127.0.0.1 ports, in a temporary directory of its own
(data, config and logs), waits a bounded time until the service answers, and stops exactly the PIDs it
started -- never by process name. They are context managers; ``tests/conftest.py`` wraps them in
session-scoped pytest fixtures started lazily.

A missing binary raises ``ServiceError`` naming the binary and the Debian package that provides it:
a test *error*, never a silent skip. A service that does not come up in time raises ``ServiceError``
with the tail of its log.

Not type-checked by mypy (``[tool.mypy] files`` is the package only), but written to pass ``--strict``.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

from helpers import free_port

if TYPE_CHECKING:
    import redis

START_TIMEOUT = 20.0  # seconds a service may take to answer after it was started
STOP_TIMEOUT = 10.0  # seconds a service may take to exit after SIGTERM / pg_ctl stop, before SIGKILL
LOG_TAIL = 4000  # characters of a log quoted in an error


class ServiceError(RuntimeError):
    """A test service could not be found, started or stopped."""


# -- shared helpers -----------------------------------------------------------------------------------


def find_binary(name: str, package: str, extra_dirs: Sequence[str] = ()) -> str:
    """The path of ``name`` on PATH (or in ``extra_dirs``); a clear error naming the Debian package."""
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceError(
        f"{name} not found on PATH{' or in ' + ', '.join(extra_dirs) if extra_dirs else ''}: the tests "
        f"that use it need a real server; install the Debian package {package!r} "
        f"(apt-get install -y {package}); .ci/run does this"
    )


def log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return text[-LOG_TAIL:] if text else f"(log {path} is empty)"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_pid_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM if the test process dies without tearing down (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _port_in_use(log: str) -> bool:
    return "Address already in use" in log or "could not bind" in log


# -- Redis --------------------------------------------------------------------------------------------


class RedisServer:
    """One ``redis-server`` on 127.0.0.1, no persistence, in a temporary directory.

    ``stop()`` and ``start()`` can be called any number of times: the server comes back on the same
    port with an empty data set (there is no persistence), so tests can simulate Redis going down.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        name: str = "redis",
    ) -> None:
        self.binary = find_binary("redis-server", "redis-server")
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self.name = name
        self._own_dir = workdir is None
        self.dir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix=f"pyproxy-{name}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "redis.log"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every PID this object started, for leak checks

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def command_line(self) -> list[str]:
        # --extra args override the defaults before them (redis keeps the last value of a directive).
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def client(self, **kwargs: object) -> redis.Redis:
        """A synchronous client (for set-up and checks outside an event loop), without retries."""
        # Imported when a service is used, so test runs without Redis tests don't need redis-py.
        from redis import Redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options: dict[str, object] = {"socket_timeout": 2, "socket_connect_timeout": 2, "retry": Retry(NoBackoff(), 0)}
        options.update(kwargs)
        return Redis(host=self.host, port=self.port, **options)  # type: ignore[arg-type]

    def ping(self) -> bool:
        """True when *this* process answers on the port (not some other server that took it)."""
        import redis

        try:
            with self.client(socket_timeout=1) as c:
                info = c.info("server")
        except redis.RedisError:
            return False
        return self.proc is not None and info.get("process_id") == self.proc.pid

    def start(self) -> None:
        """Start the server (no-op while it runs); return once it answers PING."""
        if self.running:
            return
        for attempt in range(3):
            try:
                self._start_once()
                return
            except ServiceError:
                # A free port can be taken between choosing and binding it: choose again, unless the
                # port is fixed (given by the caller, or kept for a restart).
                if self._fixed_port or attempt == 2 or not _port_in_use(log_tail(self.log)):
                    raise
                self.port = free_port()

    def _start_once(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.log.unlink()
        self.proc = subprocess.Popen(
            self.command_line(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
            preexec_fn=_die_with_parent,
        )
        self.pids.append(self.proc.pid)
        deadline = time.monotonic() + START_TIMEOUT
        while self.proc.poll() is not None or not self.ping():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ServiceError(
                    f"{self.binary} ({self.name}, port {self.port}) exited with {code} at start; "
                    f"log {self.log}:\n{log_tail(self.log)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"{self.binary} ({self.name}, port {self.port}) did not answer PING within "
                    f"{START_TIMEOUT:.0f} s; log {self.log}:\n{log_tail(self.log)}"
                )
            time.sleep(0.02)
        # From now on the port is this server's: restarts come back on it.
        self._fixed_port = True

    def stop(self) -> None:
        """Stop the process this object started (SIGTERM, then SIGKILL after a bound); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def flush(self) -> None:
        """Forget all data and cached scripts (FLUSHALL, SCRIPT FLUSH)."""
        with self.client() as c:
            c.flushall()
            c.script_flush()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisServer {self.name} {self.host}:{self.port} pid={self.pid}>"


class RedisCluster:
    """A Redis Cluster of ``masters`` masters and no replicas, all slots assigned, on 127.0.0.1.

    Each node has its own directory (its ``nodes.conf``) under one temporary directory, a free client
    port and a free cluster-bus port (``--cluster-port``, Redis >= 7). ``startup_nodes`` are
    ``(host, port)`` pairs for ``redis.asyncio.cluster.ClusterNode``.
    """

    def __init__(self, masters: int = 3, node_timeout_ms: int = 5000) -> None:
        self.redis_cli = find_binary("redis-cli", "redis-tools")
        self.dir = Path(tempfile.mkdtemp(prefix="pyproxy-redis-cluster-"))
        self.create_log = self.dir / "cluster-create.log"
        self.nodes: list[RedisServer] = []
        try:
            self._make_nodes(masters, node_timeout_ms)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _make_nodes(self, masters: int, node_timeout_ms: int) -> None:
        for i in range(masters):
            node_dir = self.dir / f"node{i}"
            self.nodes.append(
                RedisServer(
                    workdir=node_dir,
                    name=f"redis-cluster-node{i}",
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout", str(node_timeout_ms),
                        "--cluster-port", str(free_port()),
                    ],
                )  # fmt: skip
            )

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(node.host, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """One node's URL: ``redis.asyncio.RedisCluster.from_url`` discovers the others from it."""
        return self.nodes[0].url

    @property
    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        create = [
            self.redis_cli,
            "--cluster", "create",
            *(f"{host}:{port}" for host, port in self.startup_nodes),
            "--cluster-replicas", "0",
            "--cluster-yes",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                create,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=START_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:  # subprocess.run killed redis-cli
            output = (exc.stdout or b"") + (exc.stderr or b"")
            self.create_log.write_bytes(output)
            raise ServiceError(
                f"{shlex.join(create)} did not finish within {START_TIMEOUT:.0f} s; output "
                f"({self.create_log}):\n{log_tail(self.create_log)}"
            ) from None
        self.create_log.write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            raise ServiceError(
                f"{shlex.join(create)} exited with {done.returncode}; output ({self.create_log}):\n"
                f"{log_tail(self.create_log)}"
            )
        self._wait_ok()

    def cluster_info(self, node: RedisServer) -> dict[str, str]:
        with node.client() as c:
            raw = c.execute_command("CLUSTER INFO")
        if isinstance(raw, dict):  # redis-py parses CLUSTER INFO into a dict of str -> str | int
            return {str(k): str(v) for k, v in raw.items()}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def _wait_ok(self) -> None:
        """Until every node says cluster_state:ok, knows every node and sees every slot assigned."""
        want = {
            "cluster_state": "ok",
            "cluster_known_nodes": str(len(self.nodes)),
            "cluster_slots_assigned": "16384",
        }
        import redis

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            infos = []
            for node in self.nodes:
                try:
                    infos.append(self.cluster_info(node))
                except redis.RedisError as exc:
                    infos.append({"error": str(exc)})
            if all(all(info.get(k) == v for k, v in want.items()) for info in infos):
                return
            if time.monotonic() > deadline:
                states = "\n".join(
                    f"  {node.port}: {({k: info.get(k) for k in want} if 'error' not in info else info)}"
                    for node, info in zip(self.nodes, infos, strict=True)
                )
                logs = "\n".join(f"--- {n.log}:\n{log_tail(n.log)[-1000:]}" for n in self.nodes)
                raise ServiceError(
                    f"the Redis Cluster on ports {self.ports} did not reach cluster_state:ok within "
                    f"{START_TIMEOUT:.0f} s:\n{states}\n{logs}"
                )
            time.sleep(0.05)

    def flush(self) -> None:
        """FLUSHALL and SCRIPT FLUSH on every master."""
        for node in self.nodes:
            node.flush()

    def stop(self) -> None:
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # stop the others all the same
                errors.append(exc)
        if errors:
            raise errors[0]

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisCluster ports={self.ports}>"


# -- PostgreSQL ---------------------------------------------------------------------------------------

PG_BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]), reverse=True)
PG_USER = "pyproxy"  # the role the tests connect as (password auth over TCP)
PG_PASSWORD = "pyproxy"
PG_DATABASE = "pyproxy"
PG_SUPERUSER = "postgres"  # the bootstrap superuser; trusted on the unix socket only


class PostgresServer:
    """A PostgreSQL cluster made by ``initdb`` in a temporary directory and run by ``pg_ctl``.

    Listens on 127.0.0.1:``port`` (scram-sha-256 password auth for every role) and on a unix socket in
    its own directory (trust, used for administration as the ``postgres`` superuser). Durability is
    off (fsync, full_page_writes, synchronous_commit): this is a throw-away test server.

    initdb and postgres refuse to run as root: as root they run as the ``postgres`` system user
    (created with useradd if missing) through ``runuser`` (or ``su``), and the directory is theirs.
    The role ``pyproxy`` (password ``pyproxy``, CREATEDB) owns the database ``pyproxy``; ``dsn`` is
    its asyncpg/libpq URL. ``create_database()`` makes more (the per-test fixture uses it).
    """

    def __init__(self, port: int | None = None) -> None:
        package = "postgresql"
        self.initdb = find_binary("initdb", package, PG_BIN_DIRS)
        bindir = str(Path(self.initdb).resolve().parent)
        pg_ctl_here = Path(bindir) / "pg_ctl"  # the same major version as initdb
        self.pg_ctl = str(pg_ctl_here) if pg_ctl_here.is_file() else find_binary("pg_ctl", package, PG_BIN_DIRS)
        # The same major version's psql; Debian's /usr/bin/psql wrapper as a fallback.
        psql_here = Path(bindir) / "psql"
        self.psql = str(psql_here) if psql_here.is_file() else find_binary("psql", "postgresql-client")
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self.dir = Path(tempfile.mkdtemp(prefix="pyproxy-pg-"))
        self.data = self.dir / "data"
        self.sockets = self.dir / "sock"
        self.log = self.dir / "postgres.log"
        self.initdb_log = self.dir / "initdb.log"
        self.postmaster_pid: int | None = None
        self.pids: list[int] = []  # every postmaster PID this object started, for leak checks
        self._as_user: list[str] = []  # command prefix running a command as the postgres OS user
        self._su: str | None = None  # without runuser: su -s /bin/sh -c "exec COMMAND" postgres
        self._initialised = False

    @property
    def dsn(self) -> str:
        return self.dsn_for(PG_DATABASE)

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@{self.host}:{self.port}/{database}"

    # -- running commands as the right OS user

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            self._as_user = []
            return
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            useradd = find_binary("useradd", "passwd", ["/usr/sbin", "/sbin"])
            subprocess.run(
                [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/bin/sh", "postgres"],
                check=True,
                capture_output=True,
                timeout=30,
            )
        entry = pwd.getpwnam("postgres")
        for path in (self.dir, *self.dir.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
        if runuser:
            self._as_user = [runuser, "-u", "postgres", "--"]
        else:
            su = find_binary("su", "util-linux (runuser) or login (su)", ["/bin", "/usr/bin"])
            self._su = su
            self._as_user = [su]

    def _run(self, args: list[str], what: str, timeout: float, log: Path | None = None) -> str:
        if self._su is not None:
            cmd = [self._su, "-s", "/bin/sh", "-c", f"exec {shlex.join(args)}", "postgres"]
        else:
            cmd = [*self._as_user, *args]
        try:
            done = subprocess.run(
                cmd, cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(
                f"{what}: {shlex.join(cmd)} did not finish within {timeout:.0f} s"
                + (f"; log {log}:\n{log_tail(log)}" if log else "")
            ) from None
        output = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0:
            raise ServiceError(
                f"{what}: {shlex.join(cmd)} exited with {done.returncode}:\n{output[-LOG_TAIL:]}"
                + (f"\nlog {log}:\n{log_tail(log)}" if log else "")
            )
        return output

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run ``statement`` as the superuser over the unix socket (psql, no event loop needed)."""
        args = [
            self.psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.sockets), "-p", str(self.port), "-U", PG_SUPERUSER, "-d", database,
            "-c", statement,
        ]  # fmt: skip
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise ServiceError(f"psql on port {self.port}: {statement!r} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode().strip()

    # -- life cycle

    def _init(self) -> None:
        self.sockets.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        output = self._run(
            [
                self.initdb, "-D", str(self.data), "-U", PG_SUPERUSER, "--no-sync",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
            ],
            "initdb",
            timeout=60,
        )  # fmt: skip
        self.initdb_log.write_text(output)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'pyproxy_test.conf'\n")
        self._initialised = True

    def _write_conf(self) -> None:
        conf = self.data / "pyproxy_test.conf"
        conf.write_text(
            f"port = {self.port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.sockets}'\n"
            "fsync = off\n"
            "full_page_writes = off\n"
            "synchronous_commit = off\n"
            "max_connections = 100\n"
            "shared_buffers = 32MB\n"
            "logging_collector = off\n"
        )
        if self._as_user:
            entry = pwd.getpwnam("postgres")
            os.chown(conf, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        """initdb (first time), pg_ctl start, then create the test role and database (first time)."""
        if self.postmaster_pid is not None and pid_alive(self.postmaster_pid):
            return
        first = not self._initialised
        if first:
            self._init()
        for attempt in range(3):
            self._write_conf()
            try:
                self._start_once()
                break
            except ServiceError:
                if self._fixed_port or attempt == 2 or not _port_in_use(log_tail(self.log)):
                    raise
                self.port = free_port()
        self._fixed_port = True
        if first:
            self.sql(f"CREATE ROLE {PG_USER} LOGIN CREATEDB PASSWORD '{PG_PASSWORD}'")
            self.sql(f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER}")

    def _start_once(self) -> None:
        if self.log.exists():
            self.log.unlink()
        try:
            self._run(
                [self.pg_ctl, "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(START_TIMEOUT))],
                f"postgres on port {self.port}",
                timeout=START_TIMEOUT + 10,
                log=self.log,
            )
        finally:
            # pg_ctl daemonizes the postmaster: its PID is the first line of postmaster.pid. Recorded
            # even when pg_ctl failed, so a postmaster that is up but slow is still stopped.
            self._read_postmaster_pid()

    def _read_postmaster_pid(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            self.postmaster_pid = pid
            if pid not in self.pids:
                self.pids.append(pid)

    def stop(self) -> None:
        """pg_ctl stop -m fast, then make sure the postmaster PID is gone (SIGKILL after a bound)."""
        pid, self.postmaster_pid = self.postmaster_pid, None
        if pid is None or not pid_alive(pid):
            return
        error: ServiceError | None = None
        try:
            self._run(
                [self.pg_ctl, "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT))],
                "pg_ctl stop",
                timeout=STOP_TIMEOUT + 10,
                log=self.log,
            )
        except ServiceError as exc:
            error = exc
        if not wait_pid_gone(pid, STOP_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # the postmaster's children exit when it is gone
            if not wait_pid_gone(pid, STOP_TIMEOUT):
                raise ServiceError(f"postmaster PID {pid} still alive after pg_ctl stop and SIGKILL") from error
        if error is not None:
            raise error

    def create_database(self, name: str) -> str:
        """A new, empty database owned by the test role; its DSN."""
        self.sql(f"CREATE DATABASE {name} OWNER {PG_USER}")
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresServer {self.host}:{self.port} pid={self.postmaster_pid}>"


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False

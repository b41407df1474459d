"""Active health checks over real sockets (127.0.0.1) and passive outlier ejection with fake time."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from pyproxy.balance.health import CheckResult, HealthCheckConfig, HealthChecker, probe
from pyproxy.balance.outlier import OutlierConfig, OutlierDetector
from pyproxy.loop import new_event_loop
from pyproxy.sample_server import SampleServer


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on the proxy's production loop (uvloop), bounded in time."""

    async def bounded() -> None:
        await asyncio.wait_for(main(), 20)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(bounded())


def response(status: int, body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n%s"
        % (status, len(body), extra, body)
    )


class Upstream:
    """A tiny HTTP server the test steers: ``mode`` picks the answer, ``log`` records what it sent.

    Each request is logged (mode, head, arrival time) *before* it is answered, so at any moment the
    log holds exactly the checks the server has answered or is answering.
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.script: list[str] = []  # modes for the next requests, in order, before ``mode``
        self.answers: dict[str, bytes] = {"ok": response(200), "error": response(500, b"down")}
        self.log: list[str] = []
        self.heads: list[bytes] = []
        self.times: list[float] = []
        self.closed_by_peer = 0  # silent answers whose connection the checker closed
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener (new connections are refused) and every open connection."""
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            mode = self.script.pop(0) if self.script else self.mode
            self.times.append(time.monotonic())
            self.heads.append(head)
            self.log.append(mode)
            if mode == "silent":
                await reader.read()  # until the checker gives up and closes
                self.closed_by_peer += 1
            else:
                writer.write(self.answers[mode])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def upstreams(n: int) -> list[Upstream]:
    return [await Upstream().start() for _ in range(n)]


class Recorder:
    """``on_change`` that records calls, snapshots the upstream's log and wakes a waiter."""

    def __init__(self, upstream: Upstream | None = None) -> None:
        self.calls: list[tuple[str, bool, str]] = []
        self.snapshots: list[list[str]] = []
        self.upstream = upstream
        self.changed = asyncio.Event()

    def __call__(self, target_id: str, healthy: bool, reason: str) -> None:
        self.calls.append((target_id, healthy, reason))
        if self.upstream is not None:
            self.snapshots.append(list(self.upstream.log))
        self.changed.set()

    async def next(self, seconds: float = 5.0) -> tuple[str, bool, str]:
        await asyncio.wait_for(self.changed.wait(), seconds)
        self.changed.clear()
        return self.calls[-1]


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.005)


def health_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("pyproxy-health")]


class RecordingRandom(random.Random):
    """A seeded rng that records every ``uniform(a, b)`` draw as ``(a, b, value)``."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[tuple[float, float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        value = super().uniform(a, b)
        self.draws.append((a, b, value))
        return value


FAST = HealthCheckConfig(path="/healthz", interval=0.02, timeout=0.5, rise=2, fall=3, jitter=0.1)


# --- active checks: the request and the response parsing ------------------------------------------


def test_a_check_is_one_http11_request_with_host_and_connection_close() -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        assert await probe(FAST, "127.0.0.1", up.port) == CheckResult(True, "status 200")
        cfg = HealthCheckConfig(method="HEAD", path="/ping?x=1", host_header="api.example")
        await probe(cfg, "127.0.0.1", up.port)
        await up.stop()
        first, second = up.heads
        lines = first.decode().split("\r\n")
        assert lines[0] == "GET /healthz HTTP/1.1"
        assert f"Host: 127.0.0.1:{up.port}" in lines and "Connection: close" in lines
        assert second.startswith(b"HEAD /ping?x=1 HTTP/1.1\r\n") and b"\r\nHost: api.example\r\n" in second

    run(main)


@pytest.mark.parametrize(
    "raw, cfg, ok, reason",
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nall\r\n5\r\n good\r\n0\r\n\r\n",
         HealthCheckConfig(body_contains=b"all good"), True, "status 200"),
        (b"HTTP/1.0 200 OK\r\n\r\nread until close: healthy", HealthCheckConfig(body_contains=b"healthy"),
         True, "status 200"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", HealthCheckConfig(),
         True, "status 204"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", HealthCheckConfig(method="HEAD"),
         True, "status 200"),
        (b"HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n", HealthCheckConfig(),
         True, "status 301"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", HealthCheckConfig(expected_statuses=(range(200, 201),)),
         False, "status: 204"),
        (response(503), HealthCheckConfig(), False, "status: 503"),
        (response(200, b"degraded"), HealthCheckConfig(body_contains=b"ok"), False, "body: no b'ok'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", HealthCheckConfig(), False,
         "closed: connection closed before the end of the body"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", HealthCheckConfig(), False,
         "closed: connection closed before a complete head"),
        (b"", HealthCheckConfig(), False, "closed: connection closed before a complete head (0 bytes"),
        (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", HealthCheckConfig(), False, "malformed:"),
        (b"ICY 200 OK\r\n\r\n", HealthCheckConfig(), False, "malformed:"),
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", HealthCheckConfig(), False, "malformed:"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", HealthCheckConfig(),
         False, "malformed:"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         HealthCheckConfig(), False, "malformed:"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", HealthCheckConfig(),
         False, "malformed:"),
        # many header lines: only the check's byte limit bounds them (no count of its own)
        (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"Content-Length: 0\r\n\r\n",
         HealthCheckConfig(), True, "status 200"),
    ],
)
def test_responses_are_framed_and_judged_strictly(
    raw: bytes, cfg: HealthCheckConfig, ok: bool, reason: str
) -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        up.answers["raw"], up.mode = raw, "raw"
        result = await probe(cfg, "127.0.0.1", up.port)
        await up.stop()
        assert result.ok is ok and result.reason.startswith(reason), result

    run(main)


def test_reading_is_bounded_and_a_large_answer_is_judged_on_its_prefix() -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        limit = 4096
        big = b"x" * 1000 + b"NEEDLE" + b"y" * 100_000 + b"LATE"
        up.answers["big"], up.mode = response(200, big), "big"
        found_cfg = HealthCheckConfig(body_contains=b"NEEDLE", max_response_bytes=limit)
        found = await probe(found_cfg, "127.0.0.1", up.port)
        late_cfg = HealthCheckConfig(body_contains=b"LATE", max_response_bytes=limit)
        late = await probe(late_cfg, "127.0.0.1", up.port)
        up.answers["head"] = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 10_000 + b"\r\n\r\n"
        up.mode = "head"
        head = await probe(HealthCheckConfig(max_response_bytes=limit), "127.0.0.1", up.port)
        await up.stop()
        assert found == CheckResult(True, "status 200")
        assert not late.ok and late.reason.startswith("body: no b'LATE' in the first")
        assert not head.ok and head.reason == f"too large: no complete head in {limit} bytes"

    run(main)


def test_sample_server_failure_modes_become_reasons() -> None:
    async def main() -> None:
        cfg = HealthCheckConfig(path="/", timeout=0.2)
        async with SampleServer(name="h") as s:
            results: dict[str, CheckResult] = {}
            for mode in ("ok", "error", "close", "truncate", "malformed", "silent"):
                s.mode = mode
                results[mode] = await probe(cfg, s.host, s.port)
            s.mode = "ok"
            results["503"] = await probe(HealthCheckConfig(path="/status/503"), s.host, s.port)
            results["chunked"] = await probe(HealthCheckConfig(path="/chunked/100000"), s.host, s.port)
            head_cfg = HealthCheckConfig(method="HEAD", path="/bytes/5000")
            results["head"] = await probe(head_cfg, s.host, s.port)
            port = s.port
        results["refused"] = await probe(cfg, "127.0.0.1", port)
        assert results["ok"] == results["chunked"] == results["head"] == CheckResult(True, "status 200")
        expected = {
            "error": "status: 500", "close": "closed:", "truncate": "closed:", "malformed": "malformed:",
            "silent": "timeout: no complete response within 0.2s", "503": "status: 503",
            "refused": "connect:",
        }
        for name, prefix in expected.items():
            assert not results[name].ok and results[name].reason.startswith(prefix), (name, results[name])

    run(main)


def test_the_timeout_covers_the_whole_check() -> None:
    async def main() -> None:
        # A server that answers the head at once and then trickles the body never completes.
        handlers: list[asyncio.Task[Any]] = []

        async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.append(asyncio.current_task())  # type: ignore[arg-type]
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            try:
                for _ in range(100):
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.02)
            except ConnectionError:
                pass
            writer.close()

        server = await asyncio.start_server(trickle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        start = time.monotonic()
        result = await probe(HealthCheckConfig(timeout=0.15), "127.0.0.1", port)
        elapsed = time.monotonic() - start
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        server.close()
        await server.wait_closed()
        assert result == CheckResult(False, "timeout: no complete response within 0.15s")
        assert 0.14 <= elapsed < 1.0  # (uvloop's timers have millisecond resolution)

    run(main)


# --- active checks: states, transitions and scheduling ---------------------------------------------


def test_unhealthy_after_exactly_fall_failures_and_healthy_after_exactly_rise_successes() -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        rec = Recorder(up)
        checker = HealthChecker(FAST, rec)
        checker.add("a", "127.0.0.1", up.port)
        checker.start()
        await until(lambda: len(up.log) >= 3)
        assert checker.status("a")["healthy"] and rec.calls == []

        up.mode = "error"
        target, healthy, reason = await rec.next()
        assert (target, healthy) == ("a", False)
        assert reason == "status: 500 is not an expected status (3 consecutive failures)"
        seen = rec.snapshots[-1]
        assert seen[-3:] == ["error"] * 3 and seen[-4] == "ok"  # fall = 3, not one more or less
        status = checker.status("a")
        assert status["consecutive_failures"] == 3
        assert status["last_error"] == "status: 500 is not an expected status"

        up.mode = "ok"
        target, healthy, reason = await rec.next()
        assert (target, healthy, reason) == ("a", True, "status 200 (2 consecutive successes)")
        seen = rec.snapshots[-1]
        assert seen[-2:] == ["ok"] * 2 and seen[-3] == "error"  # rise = 2
        assert len(rec.calls) == 2  # one call per transition, none per check

        await checker.stop()
        status = checker.status("a")
        # (stop() may have abandoned one check the server already logged)
        assert status["healthy"] and len(up.log) - 1 <= status["checks"] <= len(up.log)
        assert status["failures"] == up.log.count("error")
        assert status["last_checked"] is not None and abs(status["last_checked"] - time.time()) < 5
        assert status["last_error"] == "status: 500 is not an expected status"  # kept after recovery
        await up.stop()

    run(main)


def test_a_failure_streak_shorter_than_fall_changes_nothing() -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        rec = Recorder(up)
        checker = HealthChecker(FAST, rec)
        checker.add("a", "127.0.0.1", up.port)
        checker.start()
        up.script = ["error", "error", "ok"] * 3 + ["error", "error"]  # a success resets the count
        await until(lambda: not up.script and checker.status("a")["consecutive_failures"] == 2)
        assert checker.status("a")["failures"] == 8
        await checker.stop()
        await up.stop()
        assert rec.calls == [] and checker.status("a")["healthy"]
        assert up.log.count("error") == 8  # failures happened, just never `fall` in a row

    run(main)


def test_initially_unhealthy_targets_need_rise_successes() -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        rec = Recorder(up)
        checker = HealthChecker(HealthCheckConfig(interval=0.02, rise=3, initial_healthy=False), rec)
        checker.add("a", "127.0.0.1", up.port)
        assert checker.status("a") == {
            "healthy": False, "consecutive_successes": 0, "consecutive_failures": 0, "last_error": None,
            "last_checked": None, "checks": 0, "failures": 0,
        }
        checker.start()
        assert await rec.next() == ("a", True, "status 200 (3 consecutive successes)")
        assert rec.snapshots[-1] == ["ok"] * 3
        await checker.stop()
        await up.stop()

    run(main)


def test_body_mismatch_marks_unhealthy_until_the_body_is_right() -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        up.answers["ok"] = response(200, b'{"status": "up"}')
        rec = Recorder(up)
        cfg = HealthCheckConfig(interval=0.02, fall=2, rise=1, body_contains=b'"status": "up"')
        checker = HealthChecker(cfg, rec)
        checker.add("a", "127.0.0.1", up.port)
        checker.start()
        await until(lambda: len(up.log) >= 2)
        up.answers["ok"] = response(200, b'{"status": "draining"}')
        target, healthy, reason = await rec.next()
        assert not healthy and reason.startswith("body: no b'\"status\": \"up\"'")
        assert reason.endswith("(2 consecutive failures)")
        up.answers["ok"] = response(200, b'{"status": "up"}')
        assert await rec.next() == ("a", True, "status 200 (1 consecutive successes)")
        await checker.stop()
        await up.stop()

    run(main)


def test_silent_server_times_out_and_closed_listener_refuses() -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        rec = Recorder(up)
        cfg = HealthCheckConfig(interval=0.02, timeout=0.1, fall=2, rise=1)
        checker = HealthChecker(cfg, rec)
        checker.add("a", "127.0.0.1", up.port)
        checker.start()
        await until(lambda: len(up.log) >= 1)

        up.mode = "silent"
        start = time.monotonic()
        target, healthy, reason = await rec.next()
        assert not healthy and reason == "timeout: no complete response within 0.1s (2 consecutive failures)"
        assert time.monotonic() - start >= 0.2  # two whole timeouts
        await until(lambda: up.closed_by_peer >= 2)  # the checker closed the connections it gave up on

        up.mode = "ok"
        assert (await rec.next())[1] is True

        await up.stop()  # the listener is gone: connections are refused
        target, healthy, reason = await rec.next()
        assert not healthy and reason.startswith("connect: ") and "refused" in reason.lower()
        assert checker.status("a")["consecutive_failures"] == 2

        await up.start()  # the same port again
        assert (await rec.next())[1] is True
        await checker.stop()
        await up.stop()

    run(main)


def test_first_checks_are_spread_over_the_interval() -> None:
    async def main() -> None:
        ups = await upstreams(8)
        rng = RecordingRandom(7)
        interval = 0.4
        checker = HealthChecker(HealthCheckConfig(interval=interval, jitter=0.1), lambda *a: None, rng)
        for i, up in enumerate(ups):
            checker.add(f"t{i}", "127.0.0.1", up.port)
        start = time.monotonic()
        checker.start()
        offsets = [v for _a, _b, v in rng.draws[:8]]
        assert all((a, b) == (0.0, interval) for a, b, _v in rng.draws[:8])
        await until(lambda: all(up.times for up in ups))
        await checker.stop()
        for up, offset in zip(ups, offsets):
            first = up.times[0] - start
            assert offset - 0.005 <= first <= offset + 0.15, (offset, first)
            await up.stop()
        # Spread, not lock-step: the offsets cover the interval.
        assert max(offsets) - min(offsets) > interval / 2 and len(set(offsets)) == 8

    run(main)


def test_delays_between_checks_are_interval_plus_minus_jitter() -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        rng = RecordingRandom(3)
        interval, jitter = 0.1, 0.5
        checker = HealthChecker(HealthCheckConfig(interval=interval, jitter=jitter), lambda *a: None, rng)
        checker.add("a", "127.0.0.1", up.port)
        checker.start()
        await until(lambda: len(up.times) >= 8)
        await checker.stop()
        await up.stop()
        draws = rng.draws[1:]  # after the first offset, one draw per pause
        assert all((a, b) == (-jitter, jitter) for a, b, _v in draws)
        for (_a, _b, u), earlier, later in zip(draws, up.times, up.times[1:]):
            delay = interval * (1 + u)
            assert interval * (1 - jitter) <= delay <= interval * (1 + jitter)
            gap = later - earlier  # the pause plus one check's connect and answer
            assert delay - 0.005 <= gap <= delay + 0.1, (delay, gap)

    run(main)


def test_delay_draws_stay_within_bounds() -> None:
    checker = HealthChecker(HealthCheckConfig(interval=2.0, jitter=0.25), lambda *a: None, random.Random(1))
    delays = [checker.next_delay() for _ in range(2000)]
    assert 1.5 <= min(delays) < 1.52 and 2.48 < max(delays) <= 2.5
    offsets = [checker.first_delay() for _ in range(2000)]
    assert 0 <= min(offsets) < 0.02 and 1.98 < max(offsets) <= 2.0
    steady = HealthChecker(HealthCheckConfig(interval=2.0, jitter=0.0), lambda *a: None, random.Random(1))
    assert {steady.next_delay() for _ in range(10)} == {2.0}
    # Same seed, same schedule; different seeds (N proxies), different schedules.
    a = HealthChecker(HealthCheckConfig(), lambda *a: None, random.Random(5))
    b = HealthChecker(HealthCheckConfig(), lambda *a: None, random.Random(5))
    c = HealthChecker(HealthCheckConfig(), lambda *a: None, random.Random(6))
    schedules = [[x.next_delay() for _ in range(5)] for x in (a, b, c)]
    assert schedules[0] == schedules[1] != schedules[2]


def test_remove_stops_checking_that_target_only() -> None:
    async def main() -> None:
        kept, removed, silent = await upstreams(3)
        silent.mode = "silent"
        checker = HealthChecker(HealthCheckConfig(interval=0.02, timeout=5.0), lambda *a: None)
        checker.add("kept", "127.0.0.1", kept.port)
        checker.add("removed", "127.0.0.1", removed.port)
        checker.add("silent", "127.0.0.1", silent.port)
        checker.start()
        await until(lambda: len(removed.log) >= 2 and len(silent.log) == 1)
        checker.remove("removed")
        checker.remove("silent")  # its check is in flight: abandoned, its connection closed
        assert checker.targets() == ["kept"]
        await until(lambda: silent.closed_by_peer == 1)
        seen, kept_seen = len(removed.log), len(kept.log)
        await asyncio.sleep(0.2)  # ten intervals
        assert len(removed.log) == seen and len(silent.log) == 1
        assert len(kept.log) >= kept_seen + 3
        with pytest.raises(KeyError):
            checker.status("removed")
        with pytest.raises(KeyError):
            checker.remove("removed")
        checker.add("removed", "127.0.0.1", removed.port)  # back, while running
        await until(lambda: len(removed.log) > seen)
        await checker.stop()
        for up in (kept, removed, silent):
            await up.stop()

    run(main)


def test_stop_leaves_no_tasks_even_with_checks_in_flight() -> None:
    async def main() -> None:
        ok, silent = await upstreams(2)
        silent.mode = "silent"
        checker = HealthChecker(HealthCheckConfig(interval=0.02, timeout=5.0), lambda *a: None)
        checker.add("ok", "127.0.0.1", ok.port)
        checker.add("silent", "127.0.0.1", silent.port)
        checker.start()
        assert checker.running and len(health_tasks()) == 2
        await until(lambda: len(ok.log) >= 2 and len(silent.log) == 1)
        checker.remove("ok")  # a retired task, stopped with the others
        await checker.stop()
        assert health_tasks() == [] and not checker.running
        await until(lambda: silent.closed_by_peer == 1)
        # Restartable: the targets stay.
        checker.start()
        await until(lambda: len(silent.log) == 2)
        await checker.stop()
        assert health_tasks() == []
        await ok.stop()
        await silent.stop()

    run(main)


def test_transitions_are_logged_once_each_not_per_failed_check(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        rec = Recorder(up)
        checker = HealthChecker(HealthCheckConfig(interval=0.02, fall=2, rise=1), rec)
        checker.add("a", "127.0.0.1", up.port)
        checker.start()
        up.mode = "error"
        await rec.next()
        n = len(up.log)
        await until(lambda: len(up.log) >= n + 5)  # five more failures while unhealthy
        up.mode = "ok"
        await rec.next()
        await checker.stop()
        await up.stop()

    with caplog.at_level(logging.DEBUG, logger="pyproxy.health"):
        run(main)
    records = [r for r in caplog.records if r.name == "pyproxy.health"]
    assert [(r.levelno, r.getMessage().split(":")[0]) for r in records] == [
        (logging.WARNING, "upstream a (127.0.0.1"),
        (logging.INFO, "upstream a (127.0.0.1"),
    ]
    assert "is unhealthy: status: 500" in records[0].getMessage()
    assert "is healthy: status 200" in records[1].getMessage()


def test_a_failing_callback_does_not_stop_the_checks(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        (up,) = await upstreams(1)
        up.mode = "error"
        calls: list[bool] = []

        def broken(target_id: str, healthy: bool, reason: str) -> None:
            calls.append(healthy)
            raise RuntimeError("owner bug")

        checker = HealthChecker(HealthCheckConfig(interval=0.02, fall=1, rise=1), broken)
        checker.add("a", "127.0.0.1", up.port)
        checker.start()
        await until(lambda: calls == [False])
        up.mode = "ok"
        await until(lambda: calls == [False, True])
        assert len(health_tasks()) == 1
        await checker.stop()
        await up.stop()

    with caplog.at_level(logging.ERROR, logger="pyproxy.health"):
        run(main)
    assert sum("callback failed" in r.getMessage() for r in caplog.records) == 2


def test_checker_misuse_is_refused() -> None:
    checker = HealthChecker(HealthCheckConfig(), lambda *a: None)
    checker.add("a", "127.0.0.1", 8080)
    with pytest.raises(ValueError, match="already"):
        checker.add("a", "127.0.0.1", 8081)
    with pytest.raises(ValueError, match="port"):
        checker.add("b", "127.0.0.1", 0)
    with pytest.raises(KeyError):
        checker.remove("nope")
    with pytest.raises(RuntimeError):
        checker.start()  # no running loop

    async def main() -> None:
        checker.start()
        with pytest.raises(RuntimeError, match="already running"):
            checker.start()
        await checker.stop()

    run(main)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "GET /x"}, "method"), ({"method": ""}, "method"),
        ({"path": "healthz"}, "path"), ({"path": "/a\r\nX: y"}, "path"), ({"path": "/a b"}, "path"),
        ({"host_header": "h\r\nX: y"}, "host_header"), ({"host_header": ""}, "host_header"),
        ({"expected_statuses": ()}, "expected_statuses"),
        ({"expected_statuses": (range(200, 300, 2),)}, "expected_statuses"),
        ({"expected_statuses": (range(0, 300),)}, "expected_statuses"),
        ({"body_contains": b""}, "body_contains"),
        ({"interval": 0}, "interval"), ({"timeout": -1}, "timeout"), ({"rise": 0}, "rise"),
        ({"fall": 0}, "fall"), ({"jitter": 1.0}, "jitter"), ({"jitter": -0.1}, "jitter"),
        ({"max_response_bytes": 10}, "max_response_bytes"),
    ],
)
def test_invalid_health_config_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        HealthCheckConfig(**kwargs)


def test_health_config_defaults() -> None:
    cfg = HealthCheckConfig()
    assert (cfg.method, cfg.path, cfg.interval, cfg.timeout, cfg.rise, cfg.fall, cfg.jitter) == (
        "GET", "/healthz", 5.0, 2.0, 2, 3, 0.1,
    )
    assert cfg.status_expected(200) and cfg.status_expected(399) and not cfg.status_expected(400)
    assert not cfg.status_expected(199) and cfg.body_contains is None and cfg.initial_healthy


# --- passive outlier ejection (fake time) ----------------------------------------------------------


class Changes:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, str]] = []

    def __call__(self, target_id: str, ejected: bool, reason: str) -> None:
        self.calls.append((target_id, ejected, reason))


def detector(n: int = 5, **kwargs: Any) -> tuple[OutlierDetector, Changes]:
    changes = Changes()
    return OutlierDetector(OutlierConfig(**kwargs), changes, [f"t{i}" for i in range(n)]), changes


def test_ejected_after_n_consecutive_failures() -> None:
    d, changes = detector()
    for i in range(4):
        d.record("t0", ok=False, now=100.0 + i)
    assert not d.is_ejected("t0", 104.0) and changes.calls == []
    d.record("t0", ok=False, now=104.0)
    assert d.is_ejected("t0", 104.0) and d.ejected_until("t0") == 134.0 and d.ejections("t0") == 1
    assert changes.calls == [("t0", True, "5 consecutive failures; ejected for 30s")]
    assert d.ejected() == ["t0"] and not d.is_ejected("t1", 104.0)


def test_a_success_resets_the_consecutive_count() -> None:
    d, _ = detector()
    for _ in range(4):
        d.record("t0", ok=False, now=1.0)
    d.record("t0", ok=True, now=1.0)
    for _ in range(4):
        d.record("t0", ok=False, now=1.0)
    assert not d.is_ejected("t0", 1.0)
    d.record("t0", ok=False, now=1.0)
    assert d.is_ejected("t0", 1.0)


def test_connect_failures_count_as_failures_and_have_their_own_optional_detector() -> None:
    d, changes = detector()  # Envoy's default: local-origin failures fold into consecutive_5xx
    for _ in range(5):
        d.record("t0", ok=False, connect_failure=True, now=1.0)
    assert d.is_ejected("t0", 1.0)

    d, changes = detector(consecutive_connect_failures=2)
    d.record("t1", ok=False, connect_failure=True, now=1.0)
    d.record("t1", ok=False, now=1.0)  # a 5xx: the server was reached, the connect streak ends
    d.record("t1", ok=False, connect_failure=True, now=1.0)
    assert not d.is_ejected("t1", 1.0)
    d.record("t1", ok=False, connect_failure=True, now=1.0)
    assert changes.calls == [("t1", True, "2 consecutive connect failures; ejected for 30s")]
    with pytest.raises(ValueError):
        d.record("t2", ok=True, connect_failure=True, now=1.0)


def test_error_rate_ejects_only_with_min_requests() -> None:
    d, changes = detector(consecutive_failures=0)
    t = 50.0
    for i in range(19):  # ok, fail, ok, fail ...: rate about 0.5 but fewer than 20 requests
        d.record("t0", ok=i % 2 == 0, now=t + i * 0.1)
    assert not d.is_ejected("t0", t + 2)
    d.record("t0", ok=False, now=t + 1.9)  # the 20th: 10 of 20 failed
    assert d.is_ejected("t0", t + 2)
    reason = "error rate 0.50 >= 0.50 (10 of 20 requests in 10s); ejected for 30s"
    assert changes.calls == [("t0", True, reason)]

    for i in range(300):  # one failure in three stays under the threshold however many requests
        d.record("t1", ok=i % 3 != 0, now=t + i * 0.01)
    assert not d.is_ejected("t1", t + 3)


def test_the_error_rate_window_slides() -> None:
    # 10 buckets of 1 s: the window covers the current bucket and the nine before it.
    d, _ = detector(consecutive_failures=0)
    for _ in range(12):
        d.record("t0", ok=False, now=0.5)
    for _ in range(8):
        d.record("t0", ok=False, now=10.5)  # bucket 0 has left the window: 8 requests, not 20
    assert not d.is_ejected("t0", 10.5)
    for _ in range(12):
        d.record("t1", ok=False, now=0.5)
    for _ in range(8):
        d.record("t1", ok=False, now=9.5)  # still in the window: 20 of 20 failed
    assert d.is_ejected("t1", 9.5)
    for _ in range(12):
        d.record("t2", ok=False, now=1.0)
    d.record("t2", ok=True, now=1e9)  # a long idle gap costs no more than a short one
    for _ in range(19):
        d.record("t2", ok=False, now=1e9)
    assert d.is_ejected("t2", 1e9)


def test_ejection_time_doubles_per_ejection_and_is_capped() -> None:
    d, changes = detector(base_ejection_time=30.0, max_ejection_time=300.0)
    now, durations = 0.0, []
    for _ in range(7):
        for _ in range(5):
            d.record("t0", ok=False, now=now)
        until = d.ejected_until("t0")
        assert until is not None
        durations.append(until - now)
        now = until  # fails again as soon as it is back
        assert not d.is_ejected("t0", now)
    assert durations == [30, 60, 120, 240, 300, 300, 300]
    assert d.ejections("t0") == 7


def test_the_backoff_decays_while_the_target_behaves() -> None:
    d, _ = detector(base_ejection_time=10.0, max_ejection_time=1000.0)

    def eject(now: float) -> float:
        for _ in range(5):
            d.record("t0", ok=False, now=now)
        until = d.ejected_until("t0")
        assert until is not None
        return until - now

    assert eject(0.0) == 10 and eject(10.0) == 20 and eject(30.0) == 40  # level 3
    assert not d.is_ejected("t0", 70.0)
    assert eject(70.0 + 10.0) == 40  # one base time back in the pool: level 3 -> 2, then 3 again
    assert not d.is_ejected("t0", 120.0)
    assert eject(120.0 + 50.0) == 10  # five base times: back to the first level
    assert d.ejections("t0") == 5


def test_un_ejection_after_the_time_lazily_or_by_tick() -> None:
    d, changes = detector()
    for target in ("t0", "t1"):
        for _ in range(5):
            d.record(target, ok=False, now=0.0)
    assert d.is_ejected("t0", 29.999)
    assert len(changes.calls) == 2
    assert not d.is_ejected("t0", 30.0)  # lazily, at the first look after expiry
    assert changes.calls[-1] == ("t0", False, "ejection of 30s expired")
    assert d.ejected_until("t0") is None and d.ejected() == ["t1"]
    assert d.tick(29.0) == [] and d.tick(31.0) == ["t1"]  # t1: nobody asked, the owner's tick
    assert changes.calls[-1] == ("t1", False, "ejection of 30s expired") and len(changes.calls) == 4
    assert not d.is_ejected("t1", 31.0) and len(changes.calls) == 4  # reported once


def test_results_while_ejected_are_ignored_and_counters_start_fresh() -> None:
    d, _ = detector()
    for _ in range(5):
        d.record("t0", ok=False, now=0.0)
    for _ in range(50):
        d.record("t0", ok=False, now=1.0)  # requests in flight when it was ejected
    assert d.ejections("t0") == 1 and d.ejected_until("t0") == 30.0
    for _ in range(4):
        d.record("t0", ok=False, now=31.0)  # back: a fresh streak, not 54
    assert not d.is_ejected("t0", 31.0)
    d.record("t0", ok=False, now=31.0)
    assert d.is_ejected("t0", 31.0)


def test_max_ejection_percent_is_respected() -> None:
    d, changes = detector(5, max_ejection_percent=50)
    assert d.max_ejected() == 2  # floor(5 × 50 %)
    for target in d.targets():
        for _ in range(5):
            d.record(target, ok=False, now=0.0)
    assert d.ejected() == ["t0", "t1"] and d.overflows == 3
    d.record("t2", ok=False, now=10.0)  # still over the threshold, still no slot
    assert not d.is_ejected("t2", 10.0) and d.overflows == 4
    d.record("t2", ok=False, now=30.0)  # t0 and t1 expire first: their slots are free again
    assert d.ejected() == ["t2"]
    assert [c[:2] for c in changes.calls] == [
        ("t0", True), ("t1", True), ("t0", False), ("t1", False), ("t2", True),
    ]


@pytest.mark.parametrize(
    "n, percent, limit",
    [(1, 50, 0), (1, 100, 1), (2, 10, 1), (5, 50, 2), (10, 10, 1), (10, 35, 3), (4, 0, 0), (0, 50, 0)],
)
def test_ejection_cap_rounding(n: int, percent: int, limit: int) -> None:
    d, _ = detector(n, max_ejection_percent=percent)
    assert d.max_ejected() == limit
    for target in d.targets():
        for _ in range(5):
            d.record(target, ok=False, now=0.0)
    assert len(d.ejected()) == limit


def test_targets_added_and_removed_at_run_time() -> None:
    d, changes = detector(2, max_ejection_percent=50)
    for _ in range(5):
        d.record("t0", ok=False, now=0.0)
    assert d.is_ejected("t0", 1.0)
    d.remove("t0")  # gone, with its ejection: no callback
    assert not d.is_ejected("t0", 1.0) and d.ejected() == [] and len(changes.calls) == 1
    d.record("t0", ok=False, now=1.0)  # a late result for a removed target: ignored
    with pytest.raises(KeyError):
        d.ejections("t0")
    with pytest.raises(KeyError):
        d.remove("t0")
    d.add("t9")
    with pytest.raises(ValueError):
        d.add("t9")
    for _ in range(5):
        d.record("t9", ok=False, now=2.0)
    assert d.is_ejected("t9", 2.0) and d.ejections("t9") == 1


def test_a_failing_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(target_id: str, ejected: bool, reason: str) -> None:
        raise RuntimeError("owner bug")

    d = OutlierDetector(OutlierConfig(), broken, ["a", "b"])
    with caplog.at_level(logging.INFO, logger="pyproxy.outlier"):
        for _ in range(5):
            d.record("a", ok=False, now=0.0)
        assert d.is_ejected("a", 0.0) and not d.is_ejected("a", 30.0)
    messages = [r.getMessage() for r in caplog.records if r.name == "pyproxy.outlier"]
    assert messages[0].startswith("upstream a ejected: 5 consecutive failures")
    assert sum("callback failed" in m for m in messages) == 2
    assert any(m.startswith("upstream a returned to the pool") for m in messages)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"consecutive_failures": -1}, "consecutive_failures"),
        ({"consecutive_connect_failures": -1}, "consecutive_connect_failures"),
        ({"error_rate_threshold": 1.5}, "error_rate_threshold"), ({"window": 0}, "window"),
        ({"min_requests": 0}, "min_requests"), ({"base_ejection_time": 0}, "base_ejection_time"),
        ({"max_ejection_time": 10.0}, "max_ejection_time"),
        ({"max_ejection_percent": 101}, "max_ejection_percent"),
    ],
)
def test_invalid_outlier_config_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        OutlierConfig(**kwargs)


def test_outlier_defaults_and_real_clock() -> None:
    cfg = OutlierConfig()
    assert cfg.consecutive_failures == 5 and cfg.consecutive_connect_failures == 0
    assert cfg.error_rate_threshold == 0.5 and cfg.window == 10.0 and cfg.min_requests == 20
    assert cfg.base_ejection_time == 30.0 and cfg.max_ejection_time == 300.0
    assert cfg.max_ejection_percent == 50
    d = OutlierDetector(targets=["a", "b"])
    for _ in range(5):
        d.record("a", ok=False)  # now = time.monotonic()
    until = d.ejected_until("a")
    assert until is not None and 29 < until - time.monotonic() <= 30 and d.is_ejected("a")

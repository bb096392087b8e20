"""``mesh serve --workers N`` as a supervised group (issue 14, items 2 and 3):
one summed /metrics and one /healthz from the supervisor; a worker killed
with SIGKILL is logged and replaced; SIGTERM stops the group cleanly; a
worker that cannot start ends the group with a non-zero exit; a second group
on the same port is refused in one line. Real processes, real redis-server."""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from mesh_core.cli import _parser
from mesh_supervisor._supervisor import Supervisor
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_process import ROOT, free_port, run_failing
from tests.helpers.wsclient import WSClient
from tests.redis.test_metrics_port import http, sample, wait_for_status

RUNTIMES = pytest.mark.parametrize("runtime", ["asyncio", "trio"])


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


class Group:
    """A ``mesh serve --workers 2`` process whose output is collected as it comes."""

    def __init__(
        self, *args: str, app: str = "examples.demo:app", env: dict[str, str] | None = None
    ) -> None:
        cmd = [sys.executable, "-m", "mesh_core.cli", "serve", app, "--workers", "2", *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, count: int = 1, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if re.search(pattern, line)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {count} line(s) matching {pattern!r} in:\n{self.output}")

    def worker_pids(self) -> list[int]:
        lines = self.wait_for_line(r"listening on .* pid \d+, worker \d", count=2)
        return [int(re.search(r"pid (\d+)", line).group(1)) for line in lines]  # type: ignore[union-attr]

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@RUNTIMES
def test_summed_metrics_and_a_killed_worker_replaced(
    redis_server: RedisServer, runtime: str
) -> None:
    port, metrics = free_port(), free_port()
    group = Group(
        "--runtime", runtime, "--port", str(port), "--redis", redis_server.url,
        "--metrics-port", str(metrics), "--ping-interval", "0", "--latency-interval", "0",
    )  # fmt: skip
    try:
        pids = group.worker_pids()
        wait_for_status(metrics, "/healthz", 200)

        async def commands() -> None:
            clients = [await WSClient.connect(port) for _ in range(8)]
            for c in clients:
                await c.request("echo", 1)
            text = http(metrics, "/metrics")[2]
            # one gauge per worker, counters summed over both
            per_worker = [sample(text, "mesh_connections", f'worker="{n}"') for n in (1, 2)]
            assert sum(per_worker) == 8
            assert sample(text, "mesh_worker_up", 'worker="1"') == 1
            assert sample(text, "mesh_worker_up", 'worker="2"') == 1
            assert sample(text, "mesh_commands_total", 'command="echo",outcome="ok"') == 8
            assert sample(text, "mesh_command_duration_seconds_count") == 8
            assert sample(text, "mesh_connections_total") == 8
            for c in clients:
                await c.close()

        anyio.run(commands)

        # kill -9 one worker: the death is logged, /healthz says so, a replacement serves
        os.kill(pids[0], signal.SIGKILL)
        death = group.wait_for_line(r"worker \d \(pid \d+\) killed by signal 9 \(SIGKILL\)")
        assert str(pids[0]) in death[0] and "replacement" in death[0]
        third = group.wait_for_line(r"listening on .* worker \d", count=3)[2]
        replacement = int(re.search(r"pid (\d+)", third).group(1))  # type: ignore[union-attr]
        assert replacement not in pids and _alive(replacement) and _alive(pids[1])
        wait_for_status(metrics, "/healthz", 200)

        async def served() -> None:
            for _ in range(6):
                c = await WSClient.connect(port)
                assert await c.request("echo", 2) == 2
                await c.close()

        anyio.run(served)
        text = http(metrics, "/metrics")[2]
        assert sample(text, "mesh_worker_up", 'worker="1"') == 1
        assert sample(text, "mesh_worker_up", 'worker="2"') == 1

        assert group.stop() == 0, group.output
        assert "Stopped" in group.output
        assert not _alive(replacement) and not _alive(pids[1])
    finally:
        group.kill()


def test_health_of_the_group_follows_the_store(redis_server: RedisServer) -> None:
    port, metrics = free_port(), free_port()
    group = Group(
        "--port", str(port), "--redis", redis_server.url, "--metrics-port", str(metrics),
        "--redis-command-timeout", "0.5",
    )  # fmt: skip
    try:
        group.worker_pids()
        wait_for_status(metrics, "/healthz", 200)
        redis_server.stop(kill=True)
        assert "store unreachable" in wait_for_status(metrics, "/healthz", 503)
        redis_server.start()
        wait_for_status(metrics, "/healthz", 200)
        assert group.stop() == 0, group.output
    finally:
        group.kill()


def test_a_second_group_on_the_same_port_is_refused(redis_server: RedisServer) -> None:
    port = free_port()
    group = Group("--port", str(port), "--redis", redis_server.url)
    try:
        group.worker_pids()
        proc = run_failing("--workers", "2", "--port", str(port), "--redis", redis_server.url)
        assert f"cannot listen on 127.0.0.1:{port}: address already in use" in proc.stderr
        proc = run_failing("--port", str(port), "--redis", redis_server.url)  # nor a single one
        assert "address already in use" in proc.stderr
        assert group.proc.poll() is None
        assert group.stop() == 0
    finally:
        group.kill()


def test_a_worker_that_cannot_start_ends_the_group(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The app loads in the supervisor but not in worker 2: the group exits
    non-zero with that worker's one line, and worker 1 is stopped too."""
    (tmp_path / "flaky_app.py").write_text(
        "import os\n"
        "from examples.demo import app as demo\n"
        "def app():\n"
        "    if os.environ.get('MESH_WORKER') == '2':\n"
        "        raise SystemExit('error: worker 2 cannot start')\n"
        "    return demo\n"
    )
    group = Group(
        "--port", str(free_port()), "--redis", redis_server.url, app="flaky_app:app",
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )  # fmt: skip
    try:
        code = group.proc.wait(30)
        group._reader.join(5)
        assert code != 0
        assert "error: worker 2 cannot start" in group.output
        assert "Traceback" not in group.output
    finally:
        group.kill()


def _gone(pid: int) -> bool:
    """Not running: exited, or a zombie nobody reaped yet (the test's
    container may have no init that reaps orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return not _alive(pid)


def _port_free(port: int) -> bool:
    """A plain bind, as a single server does it, succeeds: nothing listens."""
    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@RUNTIMES
def test_workers_stop_when_the_supervisor_is_killed(
    redis_server: RedisServer, runtime: str
) -> None:
    """SIGKILL leaves the supervisor no chance to stop its workers: each
    notices on its own (the lifeline pipe reads EOF), stops, and frees the port."""
    port = free_port()
    group = Group("--runtime", runtime, "--port", str(port), "--redis", redis_server.url)
    pids: list[int] = []
    try:
        pids = group.worker_pids()
        assert not _port_free(port)
        group.proc.kill()
        group.proc.wait(10)
        assert _wait(lambda: all(_gone(pid) for pid in pids), 15), group.output
        assert _wait(lambda: _port_free(port), 5)
    finally:
        group.kill()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_stop_before_the_workers_are_ready_is_clean(redis_server: RedisServer) -> None:
    """SIGTERM while the workers are still starting (importing, say, before
    their own handlers are in): a worker killed by that SIGTERM stopped as
    asked, so the group exits 0."""
    for _ in range(3):
        group = Group(
            "--port", str(free_port()), "--redis", redis_server.url,
            "--metrics-port", str(free_port()),
        )  # fmt: skip
        try:
            # logged after the supervisor's handlers are in, before any worker starts
            group.wait_for_line("Metrics of all workers on")
            assert group.stop() == 0, group.output
        finally:
            group.kill()


def _supervisor(*argv: str) -> Supervisor:
    """A supervisor in this process, for what a real group cannot be made to
    do on cue (a bug in the supervisor, a garbled report); its workers are
    real processes all the same."""
    args = ["serve", "examples.demo:app", "--workers", "2", *argv]
    return Supervisor(args, _parser().parse_args(args))


def test_a_supervisor_that_fails_stops_its_workers(redis_server: RedisServer) -> None:
    """A bug in the supervisor's loop ends ``run()`` with the exception, and
    not one worker keeps serving behind it."""
    port = free_port()
    pids: list[int] = []

    class Broken(Supervisor):
        def _read_reports(self) -> None:
            super()._read_reports()
            if self.slots and all(slot.ready for slot in self.slots):
                pids.extend(slot.process.pid for slot in self.slots)
                raise RuntimeError("a bug in the supervisor")

    args = ["serve", "examples.demo:app", "--workers", "2", "--port", str(port)]
    supervisor = Broken([*args, "--redis", redis_server.url], _parser().parse_args(args))
    assert supervisor.bind() is None
    with pytest.raises(RuntimeError, match="a bug in the supervisor"):
        supervisor.run()
    assert len(pids) == 2
    assert all(_gone(pid) for pid in pids)
    assert _port_free(port)


def test_a_garbled_report_is_logged_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = _supervisor("--port", "0")
    assert supervisor.bind() is None
    try:
        supervisor.writer.send_bytes(b"not a pickle")
        supervisor.writer.send(("ready", 7))  # no such worker
        supervisor.writer.send("ready")
        supervisor.writer.send(("ready", 2))
        with caplog.at_level(logging.ERROR, "mesh_supervisor"):
            supervisor._read_reports()
        assert [slot.ready for slot in supervisor.slots] == [False, True]
        assert caplog.text.count("dropped a garbled report") == 3
    finally:
        supervisor._close()


def test_a_busy_metrics_port_leaves_no_socket_open() -> None:
    """The worker sockets are bound before the metrics port is: when that
    one is taken, they are closed, not left to the garbage collector."""
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        supervisor = _supervisor("--port", str(port), "--metrics-port", str(busy.getsockname()[1]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            error = supervisor.bind()
            gc.collect()
        supervisor._close()
    assert error is not None and "address already in use" in error
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert _port_free(port)

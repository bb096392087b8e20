"""``mesh serve --workers N`` as a supervised group (issue 14, items 2 and 3):
one summed /metrics and one /healthz from the supervisor; a worker killed
with SIGKILL is logged and replaced; SIGTERM stops the group cleanly; a
worker that cannot start ends the group with a non-zero exit; a second group
on the same port is refused in one line. Real processes, real redis-server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

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

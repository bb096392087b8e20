"""``mesh serve --metrics-port``: /metrics and /healthz over real HTTP from a
real server process, with its real redis-server up, killed and back
(issue 14, item 2)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import anyio
import pytest

from examples.demo import app as demo_app
from mesh_core import MemoryStore
from mesh_core.redis import RedisReplyError
from mesh_supervisor._metrics_port import MAX_REQUESTS, SCRAPE_TIMEOUT, MetricsPort
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_process import free_port, start_server
from tests.helpers.wsclient import WSClient

RUNTIMES = pytest.mark.parametrize("runtime", ["asyncio", "trio"])


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def http(
    port: int, path: str, method: str = "GET", raw: bytes | None = None
) -> tuple[int, str, str]:
    """One request, the way a scraper sends it: status, head and body."""
    request = raw or f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), head, body


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of a Prometheus text page (0 if absent)."""
    pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_for_status(port: int, path: str, status: int, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = http(port, path)
        if last[0] == status:
            return last[2]
        time.sleep(0.1)
    raise AssertionError(f"{path} never answered {status}: {last}")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


@RUNTIMES
def test_metrics_and_health_follow_commands_and_the_store(
    redis_server: RedisServer, runtime: str
) -> None:
    port, metrics = free_port(), free_port()
    proc = start_server(
        runtime, port, "--redis", redis_server.url, "--metrics-port", str(metrics),
        "--ping-interval", "0", "--latency-interval", "0", "--redis-command-timeout", "0.5",
    )  # fmt: skip
    try:
        status, head, body = http(metrics, "/metrics")
        assert status == 200
        assert "Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert sample(body, "mesh_connections") == 0
        status, head, body = http(metrics, "/healthz")
        assert status == 200 and '"status": "ok"' in body

        async def commands() -> None:
            client = await WSClient.connect(port)
            assert await client.request("echo", {"x": 1}) == {"x": 1}
            await client.request("echo", 2)
            await client.request("mesh/join-room", {"roomName": "lobby"})
            await client.request("no-such-command")
            text = http(metrics, "/metrics")[2]
            assert sample(text, "mesh_connections") == 1
            await client.close()

        anyio.run(commands)
        text = http(metrics, "/metrics")[2]
        assert sample(text, "mesh_connections_total") == 1
        assert sample(text, "mesh_commands_total", 'command="echo",outcome="ok"') == 2
        assert sample(text, "mesh_commands_total", 'command="mesh/join-room",outcome="ok"') == 1
        assert sample(text, "mesh_commands_total", 'command="(unknown)",outcome="ENOTFOUND"') == 1
        assert sample(text, "mesh_command_duration_seconds_count") == 4
        assert sample(text, "mesh_command_duration_seconds_bucket", 'le="+Inf"') == 4
        assert sample(text, "mesh_received_bytes_total") > 0
        assert sample(text, "mesh_sent_bytes_total") > 0
        assert sample(text, "mesh_store_operations_total", 'op="AddToRoom"') == 1
        assert sample(text, "mesh_store_operations_total", 'op="RegisterConnection"') == 1
        assert sample(text, "mesh_closes_total", 'code="1000"') == 1
        assert sample(text, "mesh_redis_reconnects_total") == 0

        # the store goes away: /healthz says so; commands on it fail and count
        async def outage() -> None:
            client = await WSClient.connect(port)
            redis_server.stop(kill=True)
            body = wait_for_status(metrics, "/healthz", 503)
            assert "store unreachable" in body
            reply = await client.request("mesh/join-room", {"roomName": "lobby"})
            assert reply["code"] == "EUNAVAILABLE"
            await client.abort()

        anyio.run(outage)
        text = http(metrics, "/metrics")[2]
        errors = re.findall(r"^mesh_store_errors_total\{op=\"\w+\"\} (\d+)$", text, re.MULTILINE)
        assert sum(map(int, errors)) >= 1  # (the demo's middleware reads the store first)
        outcome = 'command="mesh/join-room",outcome="EUNAVAILABLE"'
        assert sample(text, "mesh_commands_total", outcome) == 1

        redis_server.start()
        wait_for_status(metrics, "/healthz", 200)
        text = http(metrics, "/metrics")[2]
        assert sample(text, "mesh_redis_reconnects_total") >= 1

        # what is not a scrape or a probe
        assert http(metrics, "/")[0] == 404
        assert http(metrics, "/metrics", method="POST")[0] == 405
        assert http(metrics, "", raw=b"\x16\x03\x01 not http\r\n\r\n")[0] == 400
        assert http(metrics, "", raw=b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000)[0] == 431
        status, head, body = http(metrics, "/healthz", method="HEAD")
        assert status == 200 and body == ""
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@RUNTIMES
def test_metrics_port_in_use_is_one_line(runtime: str) -> None:
    from tests.helpers.server_process import run_failing

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proc = run_failing("--runtime", runtime, "--port", "0", "--metrics-port", str(taken))
    assert f"cannot serve metrics on 127.0.0.1:{taken}: address already in use" in proc.stderr


class _LoadingStore(MemoryStore):
    """A store whose health check gets an error reply, as a Redis that is
    still loading its dataset answers PING (``-LOADING``)."""

    async def check(self) -> None:
        raise RedisReplyError("LOADING Redis is loading the dataset in memory")


async def test_healthz_answers_503_when_the_store_answers_an_error(server_cls: Any) -> None:
    server = server_cls(
        demo_app, storage=_LoadingStore(), metrics_port=0, ping_interval=0, latency_interval=0
    )
    async with server.listen():
        status, _, body = await anyio.to_thread.run_sync(http, server.metrics_port, "/healthz")
    assert status == 503 and "LOADING" in body


# -- the --workers supervisor's metrics port, in this process, against fake
# workers: real sockets, but workers that misbehave on cue


class FakeWorker:
    """A worker's private metrics port that answers ``/metrics.json`` (or
    ``/healthz``) only once ``gate`` lets it, or never (``gate`` None)."""

    def __init__(self, gate: threading.Barrier | None) -> None:
        self.gate = gate
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        from mesh_core._metrics import Metrics
        from mesh_core.app import health_response, http_response

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if self.gate is None:
                continue  # hung: never answers

            def answer(conn: socket.socket = conn) -> None:
                request = conn.recv(4096)
                try:
                    assert self.gate is not None
                    self.gate.wait(timeout=SCRAPE_TIMEOUT + 1)
                except threading.BrokenBarrierError:
                    return  # not everyone was asked at once: this one never answers
                if b"/healthz" in request:
                    conn.sendall(health_response(True, "serving"))
                else:
                    body = json.dumps(Metrics().snapshot(1, 0, 0))
                    conn.sendall(http_response(200, body, "application/json"))
                conn.close()

            threading.Thread(target=answer, daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@contextlib.contextmanager
def metrics_port(*workers: FakeWorker) -> Iterator[int]:
    """The supervisor's metrics port on a free port, in front of ``workers``."""
    slots = [SimpleNamespace(number=i + 1, metrics_port=w.port, ready=True)
             for i, w in enumerate(workers)]  # fmt: skip
    supervisor = SimpleNamespace(slots=slots, stopping=False, failed=None)
    port = MetricsPort(socket.create_server(("127.0.0.1", 0)), cast(Any, supervisor))
    port.start()
    try:
        yield port.sock.getsockname()[1]
    finally:
        port.close()
        for worker in workers:
            worker.close()


def test_the_workers_are_scraped_at_once() -> None:
    """Three workers that each answer only once all three have been asked,
    and one that never answers: a scrape gets the three (one after another,
    the first would wait for the others for ever) and still answers."""
    gate = threading.Barrier(3)
    with metrics_port(*(FakeWorker(gate) for _ in range(3)), FakeWorker(None)) as port:
        status, _, text = http(port, "/metrics")
        assert status == 200
        assert [sample(text, "mesh_worker_up", f'worker="{n}"') for n in (1, 2, 3, 4)] == [
            1, 1, 1, 0,
        ]  # fmt: skip
        assert [sample(text, "mesh_connections", f'worker="{n}"') for n in (1, 2, 3)] == [1, 1, 1]
        gate.reset()
        status, _, body = http(port, "/healthz")
        assert status == 503 and "worker 4 did not answer" in body


def test_a_flood_of_connections_is_capped_and_the_port_lives() -> None:
    with metrics_port() as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_REQUESTS)]
        try:
            # each holds a request thread; the next connection gets none
            with socket.create_connection(("127.0.0.1", port), timeout=3) as extra:
                extra.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):
                    assert extra.recv(4096) == b""
        finally:
            for sock in idle:
                sock.close()
        assert wait_for_status(port, "/healthz", 200)  # the threads were given back


def test_a_request_that_gets_no_thread_does_not_stop_the_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Thread.start()`` can fail (no threads left); that connection is
    dropped, and the port goes on answering the next ones."""
    with metrics_port() as port:
        start = threading.Thread.start
        failures: list[threading.Thread] = []

        def start_once(thread: threading.Thread) -> None:
            if not failures:
                failures.append(thread)
                raise RuntimeError("can't start new thread")
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", start_once)
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            sock.settimeout(3)
            if sock.recv(4096) == b"":
                raise ConnectionResetError  # closed unanswered, as a reset would be
        assert failures
        assert http(port, "/healthz")[0] == 200

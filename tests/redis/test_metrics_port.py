"""``mesh serve --metrics-port``: /metrics and /healthz over real HTTP from a
real server process, with its real redis-server up, killed and back
(issue 14, item 2)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from examples.demo import app as demo_app
from mesh_core import MemoryStore
from mesh_core.redis import RedisReplyError
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

"""``mesh serve`` as a user runs it: a real process, real sockets, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.wsclient import WSClient

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(runtime: str, port: int, *extra: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "mesh_core.cli",
        "serve",
        "examples.demo:app",
        "--runtime",
        runtime,
        "--port",
        str(port),
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                output = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"server exited early: {output}") from None
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start listening")


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_logs_serves_and_shuts_down_cleanly(runtime: str, sig: int) -> None:
    port = free_port()
    proc = start_server(runtime, port, "--ping-interval", "5", "--latency-interval", "2")
    result: dict[str, Any] = {}

    async def scenario() -> None:
        client = await WSClient.connect(port)
        result["echo"] = await client.request("echo", {"a": 1})
        result["meta"] = await client.request("mesh/get-my-connection-metadata")
        await client.request("mesh/join-room", {"roomName": "lobby"})
        os.kill(proc.pid, sig)
        result["closed"] = await client.wait_closed(timeout=10)
        await client.abort()

    try:
        anyio.run(scenario)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result["echo"] == {"a": 1}
    assert "connectedAt" in result["meta"]["metadata"]
    assert result["closed"].code == 1001
    assert proc.returncode == 0, out
    assert f"listening on ws://127.0.0.1:{port}" in out
    assert "Shutting down: closing 1 connection(s)" in out
    assert "Traceback" not in out


def test_serve_rejects_a_bad_app_spec() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh_core.cli", "serve", "examples.demo:nothing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "has no attribute 'nothing'" in proc.stderr

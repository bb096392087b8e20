"""``mesh serve`` as a user runs it: a real process, real sockets, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import anyio
import pytest

from tests.helpers.server_process import ROOT, free_port, start_server
from tests.helpers.wsclient import WSClient


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


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_sigterm_right_after_the_listening_line_is_a_clean_stop(runtime: str) -> None:
    """A supervisor (or a test) that stops the server the moment it says it
    listens gets a clean shutdown: the signal handlers are in place before
    the line is written, not an instant after. Repeated: the window was
    short, and a signal that lands in it kills the process outright."""
    for _ in range(8):
        port = free_port()
        cmd = [sys.executable, "-m", "mesh_core.cli", "serve", "examples.demo:app",
               "--runtime", runtime, "--port", str(port)]  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "listening on" in line:
                    proc.send_signal(signal.SIGTERM)
                    break
            out, _ = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out = "".join(lines) + out
        assert proc.returncode == 0, out
        assert "Stopped" in out, out


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

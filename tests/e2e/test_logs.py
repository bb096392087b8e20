"""What an operator reads (issue 14): a debug line per connection opened and
closed, one startup line that says what is running, and ``run()`` logging
like ``mesh serve``. On both runtimes, over real sockets."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import anyio
import pytest

from mesh_core import MeshApp
from tests.helpers.redis_server import free_port
from tests.helpers.server_process import ROOT
from tests.helpers.wsclient import WSClient

RUNTIMES = pytest.mark.parametrize("runtime", ["asyncio", "trio"])


@pytest.mark.anyio
async def test_connection_open_and_close_lines(
    server_cls: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mesh_core.server")
    server = server_cls(MeshApp(), ping_interval=0, latency_interval=0, max_message_size=1024)
    async with server.listen():
        c = await WSClient.connect(server.port)
        await c.send_text("x" * 2000)  # over the limit: closed with 1009
        assert (await c.wait_closed()).code == 1009
        await c.abort()
        for _ in range(100):
            if any("closed" in r.getMessage() for r in caplog.records):
                break
            await anyio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "mesh_core.server"]
    opened = [line for line in lines if " opened from 127.0.0.1:" in line]
    closed = [line for line in lines if " closed: 1009 " in line]
    assert len(opened) == 1 and len(closed) == 1, lines
    connection_id = opened[0].split()[1]
    assert connection_id.startswith("conn-") and connection_id in closed[0]
    assert "127.0.0.1:" in closed[0] and closed[0].endswith(" s")


def _first_line(proc: subprocess.Popen[str], needle: str, timeout: float = 20) -> str:
    """Read the process's output until a line contains ``needle``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if needle in line:
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line with {needle!r}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("runtime", "extra", "loop"),
    [("asyncio", [], "asyncio"), ("trio", [], "trio"), ("asyncio", ["--uvloop"], "uvloop")],
)
def test_one_startup_line_says_what_is_running(runtime: str, extra: list[str], loop: str) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "mesh_core.cli", "serve", "examples.demo:app",
           "--runtime", runtime, "--host", "::1", "--port", str(port), *extra]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        line = _first_line(proc, "listening on")
    finally:
        _stop(proc)
    assert f"listening on ws://[::1]:{port} (" in line
    assert f"({loop}, store memory, instance inst-" in line
    assert f"pid {proc.pid}" in line


@RUNTIMES
def test_run_logs_like_the_cli(runtime: str) -> None:
    """``mesh_asyncio.run(app)`` in a script that configured no logging still
    says where it listens and when it stops."""
    port = free_port()
    script = (
        f"import mesh_{runtime}; from examples.demo import app; "
        f"mesh_{runtime}.run(app, port={port})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = _first_line(proc, "listening on")
        assert f"INFO mesh_{runtime}: Mesh server listening on ws://127.0.0.1:{port}" in line
        time.sleep(0.5)  # the signal handlers are installed just after the line
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=15)
    finally:
        _stop(proc)
    assert "Stopped" in rest

"""Run ``mesh serve examples.demo:app`` as a real process, as a user would;
and the demo on the other servers (``examples/embedded.py``, ``examples/asgi_app.py``
under uvicorn and hypercorn's trio worker), as processes too."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

from .redis_server import free_port

__all__ = [
    "EXAMPLE_SERVERS",
    "ROOT",
    "DemoServer",
    "free_port",
    "run_failing",
    "serve_demo",
    "start_server",
]

ROOT = Path(__file__).resolve().parents[2]


def start_server(runtime: str, port: int, *extra: str) -> subprocess.Popen[str]:
    """Start the demo server and return once it accepts connections."""
    cmd = [sys.executable, "-m", "mesh_core.cli", "serve", "examples.demo:app",
           "--runtime", runtime, "--port", str(port), *extra]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_listening(proc, port)
    return proc


def _wait_listening(proc: subprocess.Popen[str], port: int, log: IO[str] | None = None) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None:
                if log is not None:
                    log.seek(0)
                output = (log or proc.stdout or io.StringIO()).read()
                raise AssertionError(f"server exited early: {output}") from None
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start listening")


#: the other servers of the demo app, as processes: a command for a port
#: and the ping/latency intervals, and the path Mesh is served at
EXAMPLE_SERVERS: dict[str, tuple[Callable[[int, float, float], list[str]], str]] = {
    "embedded": (
        lambda port, ping, latency: [sys.executable, "-m", "examples.embedded",
            "--port", str(port), "--ping-interval", str(ping), "--latency-interval", str(latency)],
        "",
    ),
    "uvicorn": (
        lambda port, ping, latency: [sys.executable, "-m", "uvicorn", "examples.asgi_app:app",
            "--port", str(port), "--log-level", "warning"],
        "/ws",
    ),
    "hypercorn-trio": (
        lambda port, ping, latency: [sys.executable, "-m", "hypercorn", "examples.asgi_app:app",
            "--worker-class", "trio", "--bind", f"127.0.0.1:{port}"],
        "/ws",
    ),
    # started from code, with Mesh's graceful shutdown first (examples/asgi_app.py)
    "asgi_app-uvicorn": (
        lambda port, ping, latency: [sys.executable, "-m", "examples.asgi_app",
            "--server", "uvicorn", "--port", str(port)],
        "/ws",
    ),
    "asgi_app-hypercorn-trio": (
        lambda port, ping, latency: [sys.executable, "-m", "examples.asgi_app",
            "--server", "hypercorn-trio", "--port", str(port)],
        "/ws",
    ),
}  # fmt: skip


class DemoServer:
    """Where a demo server listens: ``port``, and ``url`` for WebSocket clients."""

    def __init__(
        self, port: int, path: str = "", proc: subprocess.Popen[str] | None = None
    ) -> None:
        self.port = port
        self.path = path or "/"
        self.url = f"ws://127.0.0.1:{port}{path}"
        self.proc = proc  # the server process (None: a thread of this one)


@contextlib.contextmanager
def serve_demo(
    kind: str, ping_interval: float = 30.0, latency_interval: float = 5.0
) -> Iterator[DemoServer]:
    """The demo app served by ``kind``: ``asyncio`` / ``trio`` (``MeshServer``
    in a thread), or a process of :data:`EXAMPLE_SERVERS`."""
    if kind in ("asyncio", "trio"):
        from examples.demo import app

        from .server_thread import ServerThread

        intervals = {"ping_interval": ping_interval, "latency_interval": latency_interval}
        with ServerThread(kind, app, **intervals) as thread:  # type: ignore[arg-type]
            yield DemoServer(thread.port)
        return
    command, path = EXAMPLE_SERVERS[kind]
    port = free_port()
    env = {**os.environ, "MESH_PING_INTERVAL": str(ping_interval),
           "MESH_LATENCY_INTERVAL": str(latency_interval)}  # fmt: skip
    argv = command(port, ping_interval, latency_interval)
    # output to a file, not a pipe nobody reads while the test runs (a full pipe blocks the server)
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            _wait_listening(proc, port, output)
            yield DemoServer(port, path, proc)
        except BaseException:
            _stop(proc)
            output.seek(0)
            print(f"--- {kind} server output ---\n{output.read()[-4000:]}")
            raise
        _stop(proc)


def _stop(proc: subprocess.Popen[str], timeout: float = 10) -> None:
    """By pid: SIGTERM (each server's graceful shutdown), SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_failing(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``mesh serve examples.demo:app ARGS`` expecting it to fail at
    startup; assert the operator's contract (a non-zero exit and one line on
    stderr, no traceback) and return the finished process."""
    cmd = [sys.executable, "-m", "mesh_core.cli", "serve", "examples.demo:app", *args]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc

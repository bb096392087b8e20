"""Run ``mesh serve examples.demo:app`` as a real process, as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from .redis_server import free_port

__all__ = ["ROOT", "free_port", "run_failing", "start_server"]

ROOT = Path(__file__).resolve().parents[2]


def start_server(runtime: str, port: int, *extra: str) -> subprocess.Popen[str]:
    """Start the demo server and return once it accepts connections."""
    cmd = [sys.executable, "-m", "mesh_core.cli", "serve", "examples.demo:app",
           "--runtime", runtime, "--port", str(port), *extra]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 20
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

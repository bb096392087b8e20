"""The deployment examples in ``deploy/`` run: the systemd unit's
``ExecStart`` and the container's ``CMD`` are started as written (only the
install prefix, the port and the Redis URL swapped for the test's own), serve
a real client, and stop cleanly on the signal systemd and ``docker stop`` send."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_asyncio import MeshClient
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_process import ROOT, free_port

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def unit_settings(path: Path) -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), value.strip())
    return settings


def container_cmd(path: Path) -> list[str]:
    for line in path.read_text().splitlines():
        if line.startswith("CMD "):
            cmd: list[str] = json.loads(line[4:])  # the exec form: mesh is PID 1
            return cmd
    raise AssertionError("no CMD in the Dockerfile")


def swap(argv: list[str], flag: str, value: str) -> list[str]:
    assert flag in argv, f"{flag} not in {argv}"
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def run_until_stopped(
    argv: list[str], cwd: Path, port: int, stop: signal.Signals, processes: int = 1
) -> str:
    """Start ``argv``, wait until its ``processes`` servers listen, use it,
    stop it with ``stop`` and return what it logged."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    listening = threading.Semaphore(0)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                listening.release()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for _ in range(processes):
            assert listening.acquire(timeout=30), "".join(lines)

        async def use() -> object:
            async with MeshClient(f"ws://127.0.0.1:{port}") as client:
                await client.join_room("deploy-test")
                return await client.command("echo", {"n": 1})

        assert asyncio.run(use()) == {"n": 1}
        proc.send_signal(stop)
        proc.wait(timeout=30)
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    return output


def test_systemd_unit_runs_as_written(redis: RedisServer) -> None:
    unit = unit_settings(DEPLOY / "mesh.service")
    prefix = unit["WorkingDirectory"]
    argv = shlex.split(unit["ExecStart"])
    assert argv[0] == f"{prefix}/.venv/bin/mesh"
    argv[0] = str(BIN / "mesh")  # this checkout's virtualenv instead of /srv/mesh's
    port = free_port()
    argv = swap(swap(argv, "--port", str(port)), "--redis", redis.url)
    output = run_until_stopped(argv, ROOT, port, signal.Signals[unit["KillSignal"]], processes=2)
    assert output.count("Stopped") == 2, output  # --workers 2: both shut down cleanly


def test_container_cmd_runs_as_written() -> None:
    argv = container_cmd(DEPLOY / "Dockerfile")
    assert argv[0] == "mesh"
    port = free_port()
    run_until_stopped(swap(argv, "--port", str(port)), ROOT, port, signal.SIGTERM)

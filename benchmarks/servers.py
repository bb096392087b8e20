"""The servers under test: Mesh on each runtime, the other drivers of its
core (the embedded selectors loop, the ASGI app under uvicorn and hypercorn's
trio worker), and the bare
floors.

Every server runs in its own process, started here and measured from the
outside (/proc), so its CPU time and memory are its own.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ._util import RESULTS, free_port, log_tail, python, start_process, stop_process, wait_for_port

DEMO_APP = "examples.demo:app"
BENCH_APP = "benchmarks.app:app"

#: server kind -> (runtime, uvloop, bare)
KINDS: dict[str, tuple[str, bool, bool]] = {
    "mesh-asyncio": ("asyncio", False, False),
    "mesh-uvloop": ("asyncio", True, False),
    "mesh-trio": ("trio", False, False),
    "bare-asyncio": ("asyncio", False, True),
    "bare-uvloop": ("asyncio", True, True),
    "bare-trio": ("trio", False, True),
    # the other drivers of the core: examples/embedded.py's selectors loop, and
    # mesh_asgi under uvicorn (plain asyncio loop, wsproto, as mesh-asyncio)
    "mesh-embedded": ("selectors", False, False),
    "mesh-uvicorn": ("asyncio", False, False),
    "mesh-hypercorn-trio": ("trio", False, False),
    # the same ASGI servers around an app that only answers (benchmarks/bare_asgi.py)
    "bare-uvicorn": ("asyncio", False, True),
    "bare-hypercorn-trio": ("trio", False, True),
}

#: the servers that are not ``mesh serve``: their command for a port
OTHER_ARGV = {
    "mesh-embedded": lambda port: [python(), "-m", "examples.embedded", "--port", str(port),
        "--ping-interval", "0", "--latency-interval", "0"],
    "mesh-uvicorn": lambda port: [python(), "-m", "uvicorn", "benchmarks.asgi_app:app",
        "--port", str(port), "--loop", "asyncio", "--ws", "wsproto", "--http", "h11",
        "--log-level", "warning", "--no-access-log"],
    "mesh-hypercorn-trio": lambda port: [python(), "-m", "hypercorn", "benchmarks.asgi_app:app",
        "--worker-class", "trio", "--workers", "0", "--bind", f"127.0.0.1:{port}"],
    "bare-uvicorn": lambda port: [python(), "-m", "uvicorn", "benchmarks.bare_asgi:app",
        "--port", str(port), "--loop", "asyncio", "--ws", "wsproto", "--http", "h11",
        "--log-level", "warning", "--no-access-log"],
    "bare-hypercorn-trio": lambda port: [python(), "-m", "hypercorn", "benchmarks.bare_asgi:app",
        "--worker-class", "trio", "--workers", "0", "--bind", f"127.0.0.1:{port}"],
}  # fmt: skip

#: the bare server answering the same frames on the same runtime
FLOOR_OF = {"mesh-asyncio": "bare-asyncio", "mesh-uvloop": "bare-uvloop", "mesh-trio": "bare-trio"}


class Unavailable(Exception):
    """This configuration cannot be run here (says why)."""


@functools.cache
def redis_supported() -> bool:
    """Whether ``mesh serve`` has grown a ``--redis URL`` option yet."""
    out = subprocess.run(
        [python(), "-m", "mesh_core.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "--redis" in out.stdout


@dataclass
class ServerSpec:
    kind: str
    store: str = "memory"
    app: str = DEMO_APP
    redis_url: str = "redis://127.0.0.1:6379/0"

    def argv(self, port: int) -> list[str]:
        runtime, uvloop, bare = KINDS[self.kind]
        if bare and self.store != "memory":
            raise Unavailable("the bare servers keep no state")
        if self.kind in OTHER_ARGV:
            if self.store != "memory" or (self.app != DEMO_APP and not bare):
                raise Unavailable(f"{self.kind} serves the demo app on the memory store only")
            return OTHER_ARGV[self.kind](port)
        if bare:
            argv = [python(), "-m", f"benchmarks.bare_{runtime}", "--port", str(port)]
            return [*argv, "--uvloop"] if uvloop else argv
        argv = [
            python(),
            "-m",
            "mesh_core.cli",
            "serve",
            self.app,
            "--runtime",
            runtime,
            "--port",
            str(port),
            "--ping-interval",
            "0",
            "--latency-interval",
            "0",
            "--log-level",
            "warning",
        ]
        if uvloop:
            argv.append("--uvloop")
        if self.store == "redis":
            # the hook: used as soon as `mesh serve` has the option
            if not redis_supported():
                raise Unavailable("not available: `mesh serve` has no --redis URL option yet")
            argv += ["--redis", self.redis_url]
        elif self.store != "memory":
            raise Unavailable(f"unknown store {self.store!r}")
        return argv


class ServerFailed(RuntimeError):
    """The server under test failed; the message ends with its log's tail."""


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def running(spec: ServerSpec) -> Iterator[RunningServer]:
    """Run the server for the block; its output goes to
    ``benchmarks/results/server-KIND.log``. A failure inside the block comes
    out as :class:`ServerFailed` with the log's last lines."""
    port = free_port()
    log = RESULTS / f"server-{spec.kind}-{spec.store}.log"
    proc = start_process(spec.argv(port), log=log)
    try:
        wait_for_port(port, proc)
        yield RunningServer(spec, proc, port)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, ServerFailed):
            raise
        stop_process(proc)
        tail = log_tail(log)
        note = f" [server log: {tail}]" if tail else ""
        raise ServerFailed(f"{spec.kind}: {exc}{note}") from exc
    finally:
        stop_process(proc)

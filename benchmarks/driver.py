"""The coordinator's side of the load generator: start workers, time windows."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Callable
from typing import Any

from ._util import RESULTS, ROOT, log_tail, percentile, proc_cpu, python

#: where the workers' tracebacks go (the error raised here quotes the last line)
WORKER_LOG = RESULTS / "loadgen.log"


class WorkerError(RuntimeError):
    pass


class Workers:
    """``procs`` worker processes sharing ``conns`` connections to one port."""

    def __init__(self, port: int, mode: str, conns: int, procs: int, **extra: Any) -> None:
        procs = max(1, min(procs, conns))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._bufs: dict[int, bytes] = {}
        base = 0
        WORKER_LOG.parent.mkdir(parents=True, exist_ok=True)
        log = WORKER_LOG.open("ab")
        for i in range(procs):
            share = conns // procs + (1 if i < conns % procs else 0)
            cfg = {"port": port, "mode": mode, "conns": share, "base": base, **extra}
            base += share
            proc = subprocess.Popen(
                [python(), "-m", "benchmarks.loadgen", json.dumps(cfg)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
            self.procs.append(proc)
        log.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self, proc: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = self._bufs.get(fd, b"")
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError("a load generator did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise WorkerError(
                        f"a load generator exited (code {proc.wait()}: {log_tail(WORKER_LOG, 1)})"
                    )
                buf += chunk
        line, _, rest = buf.partition(b"\n")
        self._bufs[fd] = rest
        result: dict[str, Any] = json.loads(line)
        return result

    def read_all(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [self._readline(p, deadline) for p in self.procs]

    def send_line(self, text: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(text.encode() + b"\n")
            p.stdin.flush()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None and p.stdin is not None:
                try:
                    p.stdin.write(b"close\n")
                    p.stdin.close()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


def wait_idle(pid: int, timeout: float = 15.0, threshold: float = 0.05) -> None:
    """Wait until the process uses less than ``threshold`` of a core (over
    0.2 s), e.g. until a server has cleaned up connections that went away."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0 = proc_cpu(pid)
        time.sleep(0.2)
        if proc_cpu(pid) - c0 <= threshold * 0.2:
            return


def connect_span(ready: list[dict[str, Any]]) -> float:
    """Seconds from the first connect to the last connection being ready."""
    end: float = max(r["connect_end"] for r in ready)
    start: float = min(r["connect_start"] for r in ready)
    return end - start


def run_load(
    server_pid: int,
    port: int,
    *,
    mix: str,
    conns: int,
    inflight: int,
    procs: int,
    warmup: float,
    duration: float,
    on_window: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """One measured window of closed-loop load; figures for the window only."""
    with Workers(port, "load", conns, procs, mix=mix, inflight=inflight) as workers:
        workers.read_all(timeout=60.0)  # ready
        go = time.monotonic() + 0.05
        start = go + warmup
        end = start + duration
        workers.send_line(json.dumps({"go": go, "start": start, "end": end}))
        time.sleep(max(0.0, start - time.monotonic()))
        if on_window is not None:
            on_window(duration)
        cpu0 = proc_cpu(server_pid)
        t0 = time.monotonic()
        time.sleep(max(0.0, end - time.monotonic()))
        cpu1 = proc_cpu(server_pid)
        t1 = time.monotonic()
        results = workers.read_all(timeout=duration + 30.0)
    responses = sum(r["responses"] for r in results)
    unexpected = sum(r["unexpected_frames"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies_us"])
    gen_cpu = sum(r["cpu"] for r in results)
    server_cpu = cpu1 - cpu0
    span = t1 - t0
    per = max(responses, 1)
    return {
        "rps": responses / duration,
        "p50_ms": percentile(latencies, 50) / 1000,
        "p99_ms": percentile(latencies, 99) / 1000,
        "server_cpu_us": server_cpu / per * 1e6,
        "gen_cpu_us": gen_cpu / per * 1e6,
        "server_util": server_cpu / span,  # 1.0 = one core busy
        "gen_util": gen_cpu / duration,
        "responses": responses,
        "unexpected_frames": unexpected,
    }

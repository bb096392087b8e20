"""Part 3: idle memory, accepting connections, a room broadcast.

* RSS of the server process (``/proc/PID/statm``) when it has just started,
  with 1,000 idle connections and with 10,000; bytes per connection are the
  growth over the fresh server divided by the connections.
* Time to accept 1,000 connections: from the first ``connect`` to the last
  ``mesh/assign-id`` received, the load generator's workers opening them
  concurrently (at most 200 handshakes in progress per worker).
* A broadcast to a 1,000-member room: a separate client sends
  ``broadcast-room``; the time until the last member has the push, per
  round (the workers report when each of their members got it; the clock
  is the machine's monotonic clock, shared by all processes).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from ._util import HANDSHAKE, masked_text_frame, median, percentile, proc_rss
from .driver import Workers, connect_span, wait_idle
from .servers import BENCH_APP, ServerFailed, ServerSpec, running

ROOM = "bench"


def _settle(pid: int, seconds: float = 0.5) -> int:
    time.sleep(seconds)
    return proc_rss(pid)


def idle_memory(
    kind: str, counts: tuple[int, int], accept_rounds: int, procs: int, store: str
) -> dict[str, Any]:
    small, large = counts
    with running(ServerSpec(kind, store=store)) as server:
        base = _settle(server.pid, 1.0)
        wait_idle(server.pid)
        accept_times = []
        with Workers(server.port, "idle", small, procs) as first:
            accept_times.append(connect_span(first.read_all(timeout=120.0)))
            rss_small = _settle(server.pid)
            with Workers(server.port, "idle", large - small, procs) as rest:
                rest.read_all(timeout=300.0)
                rss_large = _settle(server.pid, 1.0)
        for _ in range(accept_rounds - 1):
            wait_idle(server.pid)  # let the server clean the last set up
            with Workers(server.port, "idle", small, procs) as again:
                accept_times.append(connect_span(again.read_all(timeout=120.0)))
    return {
        "server": kind,
        "rss_base_mb": base / 2**20,
        f"rss_{small}_mb": rss_small / 2**20,
        f"rss_{large}_mb": rss_large / 2**20,
        f"bytes_per_conn_{small}": (rss_small - base) / small,
        f"bytes_per_conn_{large}": (rss_large - base) / large,
        f"accept_{small}_ms": median(accept_times) * 1000,
        "accept_rounds_ms": [t * 1000 for t in accept_times],
    }


class _Sender:
    """A blocking client that asks the server to broadcast."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(HANDSHAKE)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        self.sock.settimeout(10.0)

    def broadcast(self, rid: int) -> float:
        body = json.dumps(
            {
                "id": rid,
                "command": "broadcast-room",
                "payload": {"roomName": ROOM, "event": "bench/tick", "data": {"round": rid}},
            },
            separators=(",", ":"),
        ).encode()
        frame = masked_text_frame(body)
        t = time.monotonic()
        self.sock.sendall(frame)
        return t

    def drain(self) -> None:
        self.sock.settimeout(0.0)
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass
        self.sock.settimeout(10.0)

    def close(self) -> None:
        self.sock.close()


def broadcast(kind: str, members: int, rounds: int, procs: int, store: str) -> dict[str, Any]:
    times = []
    with (
        running(ServerSpec(kind, store=store, app=BENCH_APP)) as server,
        Workers(server.port, "room", members, procs, room=ROOM) as workers,
    ):
        workers.read_all(timeout=120.0)  # connected
        workers.read_all(timeout=120.0)  # joined
        sender = _Sender(server.port)
        try:
            for r in range(rounds + 1):  # round 0 warms up
                workers.send_line("round")
                time.sleep(0.05)  # the workers are waiting in poll by now
                t_send = sender.broadcast(r + 1)
                results = workers.read_all(timeout=30.0)
                complete = sum(x["complete"] for x in results)
                if complete != members:
                    raise RuntimeError(f"only {complete} of {members} members got the push")
                if r:
                    times.append(max(x["last"] for x in results) - t_send)
                sender.drain()
        finally:
            sender.close()
    ordered = sorted(times)
    return {
        "server": kind,
        "members": members,
        "rounds": rounds,
        "p50_ms": percentile(ordered, 50) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def run(
    kinds: list[str],
    *,
    quick: bool,
    rounds: int,
    procs: int,
    store: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    counts = (1000, 2000) if quick else (1000, 10_000)
    memory = []
    casts = []
    failed = []
    for kind in kinds:
        try:
            row = idle_memory(kind, counts, max(1, rounds), procs, store)
        except ServerFailed as exc:
            failed.append({"server": kind, "part": "idle", "error": str(exc)})
            log(f"  {kind:14s} idle: FAILED: {exc}")
            continue
        memory.append(row)
        log(
            f"  {kind:14s} idle: {row['rss_base_mb']:.1f} MB fresh, "
            f"{row[f'bytes_per_conn_{counts[0]}'] / 1024:.1f} KiB/conn at {counts[0]}, "
            f"{row[f'bytes_per_conn_{counts[1]}'] / 1024:.1f} KiB/conn at {counts[1]}; "
            f"accept {counts[0]}: {row[f'accept_{counts[0]}_ms']:.0f} ms"
        )
    for kind in kinds:
        if kind.startswith("bare"):
            continue
        try:
            row = broadcast(kind, 1000, 5 if quick else 30, procs, store)
        except ServerFailed as exc:
            failed.append({"server": kind, "part": "broadcast", "error": str(exc)})
            log(f"  {kind:14s} broadcast: FAILED: {exc}")
            continue
        casts.append(row)
        log(
            f"  {kind:14s} broadcast to 1000: p50 {row['p50_ms']:.1f} ms, "
            f"p99 {row['p99_ms']:.1f} ms"
        )
    return {"counts": list(counts), "idle": memory, "broadcast": casts, "failed": failed}

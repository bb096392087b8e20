"""Presence: what a tracked join costs, and how soon a subscriber knows.

    python -m benchmarks.presence [--clients 1000] [--rounds 3]
                                  [--runtime asyncio,trio] [--store memory,redis]

In one run per (runtime, store), one server process (``mesh serve
benchmarks.presence:app``, measured from /proc) and, in this process, one
subscriber (``mesh/subscribe-presence``) and ``--clients`` clients on raw
sockets. Each round, every client joins an *untracked* room at once, then
(after the server went idle) every client joins a *tracked* room at once.
Reported per kind of join: server CPU per join (the process's CPU time over
the phase, until it is idle again, divided by the joins; the mean over the
rounds) and the time from
the first join sent to the last response; for tracked joins also the time
from the last join's response until the subscriber has every one of the
joins' events. The goal (issue 11): a tracked join costs at most 2x an
untracked one, and the subscriber has every event within 1 s of the last
join.

Joins go through ``bench/join-room`` (``server.rooms.add_to_room``, answering
``true``): the built-in ``mesh/join-room`` answers with every member's
metadata, quadratic work for one 1,000-member room that would hide what
presence costs. A Redis store is a private ``redis-server`` on a free port.
Not a timed test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from mesh_core import Context, MeshApp

from ._util import HANDSHAKE, RESULTS, masked_text_frame, median, private_redis, proc_cpu

app = MeshApp()
app.track_presence(re.compile(r"^p:"))


@app.command("bench/join-room")
async def join_room(ctx: Context) -> bool:
    await ctx.server.rooms.add_to_room(ctx.payload["roomName"], ctx.connection)
    return True


# -- a raw client ---------------------------------------------------------------------


class RawClient:
    """One connection: sends pre-masked frames, counts what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.responses = 0
        self.last_response = 0.0
        self.updates: list[tuple[float, dict[str, Any]]] = []
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HANDSHAKE)
        await reader.readuntil(b"\r\n\r\n")
        client = cls(reader, writer)
        await client._frame()  # mesh/assign-id
        client.task = asyncio.get_running_loop().create_task(client._read())
        return client

    async def _frame(self) -> bytes:
        head = await self.reader.readexactly(2)
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return await self.reader.readexactly(n)

    async def _read(self) -> None:
        try:
            while True:
                body = await self._frame()
                if body.startswith(b'{"id"'):
                    self.responses += 1
                    self.last_response = time.monotonic()
                elif b"mesh/presence-update" in body:
                    self.updates.append((time.monotonic(), json.loads(body)["payload"]))
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def send(self, rid: int, command: str, payload: Any) -> None:
        frame = json.dumps({"id": rid, "command": command, "payload": payload}).encode()
        self.writer.write(masked_text_frame(frame))

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.transport.abort()


async def _until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not answer in time")
        await asyncio.sleep(0.002)


async def _idle(pid: int, threshold: float = 0.05) -> None:
    """Wait until the server uses less than ``threshold`` of a core."""
    for _ in range(100):
        before = proc_cpu(pid)
        await asyncio.sleep(0.2)
        if proc_cpu(pid) - before <= threshold * 0.2:
            return


# -- one configuration -------------------------------------------------------------------


async def _measure(port: int, pid: int, clients: int, rounds: int) -> dict[str, Any]:
    watcher = await RawClient.open(port)
    members = [await RawClient.open(port) for _ in range(clients)]
    rid = 0
    figures: dict[str, list[float]] = {
        "untracked_cpu_us": [],
        "untracked_s": [],
        "tracked_cpu_us": [],
        "tracked_s": [],
        "events_after_last_join_s": [],
    }

    async def joins(room: str) -> tuple[float, float, float]:
        nonlocal rid
        await _idle(pid)
        answered = sum(m.responses for m in members)
        cpu0, t0 = proc_cpu(pid), time.monotonic()
        for member in members:
            rid += 1
            member.send(rid, "bench/join-room", {"roomName": room})
        await _until(lambda: sum(m.responses for m in members) == answered + clients, 120)
        last = max(m.last_response for m in members)
        await _idle(pid)
        return (proc_cpu(pid) - cpu0) / clients * 1e6, last - t0, last

    for r in range(rounds):
        cpu, span, _ = await joins(f"u:{r}")
        figures["untracked_cpu_us"].append(cpu)
        figures["untracked_s"].append(span)
        tracked = f"p:{r}"
        rid += 1
        watcher.send(rid, "mesh/subscribe-presence", {"roomName": tracked})
        await _until(lambda n=r + 1: watcher.responses == n, 30)
        before = len(watcher.updates)
        cpu, span, last = await joins(tracked)
        await _until(lambda b=before: len(watcher.updates) - b >= clients, 60)
        got = watcher.updates[before:]
        assert len(got) == clients and all(u["type"] == "join" for _, u in got), "not one each"
        figures["tracked_cpu_us"].append(cpu)
        figures["tracked_s"].append(span)
        figures["events_after_last_join_s"].append(max(0.0, max(t for t, _ in got) - last))
    for member in [watcher, *members]:
        member.close()
    result: dict[str, Any] = {name: median(values) for name, values in figures.items()}
    # CPU time is counted in clock ticks (10 ms): per join, the mean over
    # every round is finer than any one round's figure
    for kind in ("untracked", "tracked"):
        result[f"{kind}_cpu_us"] = sum(figures[f"{kind}_cpu_us"]) / rounds
    result["ratio"] = result["tracked_cpu_us"] / result["untracked_cpu_us"]
    result["rounds"] = figures
    return result


@contextmanager
def _store(store: str) -> Iterator[str]:
    if store == "redis":
        with private_redis() as url:
            yield url
    else:
        with nullcontext():
            yield ""


def run_one(runtime: str, store: str, clients: int, rounds: int) -> dict[str, Any]:
    from .servers import ServerSpec, running

    kind = f"mesh-{runtime}"
    with _store(store) as url:
        spec = ServerSpec(kind, store=store, app="benchmarks.presence:app")
        if url:
            spec.redis_url = url
        with running(spec) as server:
            return asyncio.run(_measure(server.port, server.pid, clients, rounds))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.presence")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", default="asyncio,trio")
    parser.add_argument("--store", default="memory,redis")
    args = parser.parse_args()
    from ._util import raise_fd_limit

    raise_fd_limit()
    results = []
    print(
        f"{'runtime':8} {'store':7} {'untracked µs/join':>18} {'tracked µs/join':>16} "
        f"{'ratio':>6} {'joins s':>8} {'events after last join s':>25}"
    )
    for runtime in args.runtime.split(","):
        for store in args.store.split(","):
            r = run_one(runtime, store, args.clients, args.rounds)
            results.append({"runtime": runtime, "store": store, "clients": args.clients, **r})
            print(
                f"{runtime:8} {store:7} {r['untracked_cpu_us']:18.1f} {r['tracked_cpu_us']:16.1f} "
                f"{r['ratio']:6.2f} {r['tracked_s']:8.3f} {r['events_after_last_join_s']:25.3f}",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "presence.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

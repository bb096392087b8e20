"""Channel fan-out across two instances on Redis, beside a room broadcast.

    python -m benchmarks.channels [--subscribers 1000] [--rate 200] [--seconds 10]
                                  [--kinds mesh-asyncio,mesh-asyncio] [--procs 2]

Two server processes (``--kinds``: the first is instance A, the second B) of
``benchmarks/app.py`` share a private redis-server. ``--subscribers``
connections, half on each instance, subscribe to the channel ``bench:ch``
(``mesh/subscribe-channel``) and join the room ``bench``. One writer, on A,
then sends ``--rate`` messages a second for ``--seconds``: first
``bench/write-channel`` (``write_channel(..., history=100)``: the Lua step
with offsets, the announcement and the bare copy on Redis), then, in the same
run and to the same connections, ``broadcast-room``. Each message carries its
send time; the subscribers (load-generator processes, ``listen`` mode) count
deliveries and their latency.

Reported per phase: delivered messages/s, p50/p99/max delivery latency, the
servers' CPU (both processes, user + system) per delivered message, and
messages lost. Goals (issue 12): channel p99 <= 50 ms, and channel CPU per
delivered message <= 1.5x the room broadcast's. Not a timed test: run it by
hand; results go to ``benchmarks/results/channels.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack
from typing import Any

from ._util import RESULTS, masked_text_frame, private_redis, proc_cpu, raise_fd_limit
from .driver import Workers
from .scale import _Sender
from .servers import ServerSpec, running

APP = "benchmarks.app:app"
CHANNEL = "bench:ch"
ROOM = "bench"


class Writer(_Sender):
    """One blocking WebSocket client that sends without waiting for answers
    (they are drained as it goes)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.sock.setblocking(False)
        self.rid = 0

    def send(self, command: str, payload: Any) -> None:
        self.rid += 1
        body = json.dumps(
            {"id": self.rid, "command": command, "payload": payload}, separators=(",", ":")
        ).encode()
        self.sock.setblocking(True)
        self.sock.sendall(masked_text_frame(body))
        self.sock.setblocking(False)
        self.drain()

    def drain(self) -> None:
        try:
            while self.sock.recv(262144):
                pass
        except BlockingIOError:
            pass


def _frame(phase: str, sent: float) -> tuple[str, Any]:
    mark = f"{phase}@@{sent:.6f}@@"
    if phase == "C":
        return "bench/write-channel", {"channel": CHANNEL, "message": mark}
    return "broadcast-room", {"roomName": ROOM, "event": "bench/tick", "data": mark}


def _percentile(hist: dict[int, int], total: int, q: float) -> float:
    """Milliseconds at percentile ``q`` of a 0.1 ms-bucket histogram."""
    rank = q / 100 * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 1) / 10
    return float("nan")


def run_phase(
    phase: str,
    writer: Writer,
    pids: list[int],
    workers: list[Workers],
    *,
    subscribers: int,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    cpu0 = sum(proc_cpu(pid) for pid in pids)
    start = time.monotonic()
    count = int(rate * seconds)
    for i in range(count):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        writer.send(*_frame(phase, time.monotonic()))
    time.sleep(1.0)  # the last messages' way out
    writer.drain()
    cpu1 = sum(proc_cpu(pid) for pid in pids)
    load = os.getloadavg()[0]
    delivered = 0
    hist: dict[int, int] = {}
    for group in workers:
        group.send_line("report")
        for report in group.read_all(timeout=60.0):
            delivered += report["counts"].get(phase, 0)
            for bucket, n in report["hist"].get(phase, {}).items():
                hist[int(bucket)] = hist.get(int(bucket), 0) + n
    cpu = cpu1 - cpu0
    return {
        "phase": "channel" if phase == "C" else "room",
        "sent": count,
        "delivered": delivered,
        "lost": count * subscribers - delivered,
        "delivered_per_s": delivered / seconds,
        "p50_ms": _percentile(hist, delivered, 50),
        "p99_ms": _percentile(hist, delivered, 99),
        "max_ms": max(hist) / 10 if hist else float("nan"),
        "server_cpu_s": cpu,
        "cpu_us_per_delivered": cpu / delivered * 1e6 if delivered else float("nan"),
        "load_average": load,  # the machine's, at the end of the phase
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--kinds", default="mesh-asyncio,mesh-asyncio")
    parser.add_argument("--procs", type=int, default=2, help="load generators per instance")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    if len(kinds) != 2:
        parser.error("--kinds names two servers: instance A and instance B")
    raise_fd_limit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    halves = [args.subscribers // 2, args.subscribers - args.subscribers // 2]
    subscribe = [
        ["mesh/subscribe-channel", {"channel": CHANNEL}],
        ["bench/join-room", {"roomName": ROOM}],
    ]
    with ExitStack() as stack:
        url = stack.enter_context(private_redis())
        servers = [
            stack.enter_context(running(ServerSpec(kind, store="redis", app=APP, redis_url=url)))
            for kind in kinds
        ]
        workers = [
            stack.enter_context(Workers(server.port, "listen", n, args.procs, subscribe=subscribe))
            for server, n in zip(servers, halves, strict=True)
        ]
        for group in workers:
            group.read_all(timeout=120.0)  # connected
        for group in workers:
            group.read_all(timeout=120.0)  # subscribed and joined
        writer = Writer(servers[0].port)
        stack.callback(writer.close)
        pids = [server.pid for server in servers]
        # a short warm-up of each path, not counted
        for phase in ("C", "R"):
            run_phase(
                phase, writer, pids, workers, subscribers=args.subscribers, rate=50, seconds=1
            )
        time.sleep(2.0)  # whatever the warm-up left queued is out
        results = [
            run_phase(
                phase,
                writer,
                pids,
                workers,
                subscribers=args.subscribers,
                rate=args.rate,
                seconds=args.seconds,
            )
            for phase in ("C", "R")
        ]
    channel, room = results
    summary = {
        "subscribers": args.subscribers,
        "rate": args.rate,
        "seconds": args.seconds,
        "kinds": kinds,
        "phases": results,
        "cpu_ratio_channel_to_room": channel["cpu_us_per_delivered"] / room["cpu_us_per_delivered"],
        "goal_p99_ms_50": channel["p99_ms"] <= 50,
        "goal_cpu_ratio_1_5": channel["cpu_us_per_delivered"] <= 1.5 * room["cpu_us_per_delivered"],
    }
    for row in results:
        print(
            f"{row['phase']:8s} {row['delivered_per_s']:9.0f} msg/s delivered  "
            f"p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
            f"max {row['max_ms']:6.1f} ms  {row['cpu_us_per_delivered']:5.2f} us CPU/msg  "
            f"lost {row['lost']}  (load average {row['load_average']:.1f})"
        )
    print(
        f"channel/room CPU per delivered message: {summary['cpu_ratio_channel_to_room']:.2f}x "
        f"(goal <= 1.5x: {'met' if summary['goal_cpu_ratio_1_5'] else 'NOT met'}); "
        f"channel p99 goal <= 50 ms: {'met' if summary['goal_p99_ms_50'] else 'NOT met'}"
    )
    (RESULTS / "channels.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()

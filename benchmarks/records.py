"""Records on Redis, two instances: fan-out of patches and concurrent writers.

    python -m benchmarks.records [--subscribers 1000] [--rate 100] [--seconds 10]
                                 [--writers 200] [--write-seconds 5]

Part 1, fan-out: an asyncio and a trio server (``mesh serve`` processes) on
one private redis-server; ``--subscribers`` connections subscribe to one
record in patch mode, half on each instance; a writer merges into the
record ``--rate`` times a second for ``--seconds`` (through instance A).
Measured: the servers' CPU time over the window per delivered update, and
the delivery latency (from the writer sending the write to a subscriber
having the patch) at p50/p99 over every delivery. The same setup then
broadcasts to a room of the same members at the same rate, for the CPU per
delivered push of a room broadcast to compare with.

Part 2, writers: ``--writers`` connections (half per instance) write merges
of their own key into one record, one in flight each, for
``--write-seconds``: writes per second, and whether every version is
accounted for (final version = successful writes; versions 1..N announced on
``mesh:record-updates`` exactly once each, in order; every writer's last
value present).

Subscribers and writers are raw sockets in worker processes (epoll), so the
servers' CPU is their own. Results: printed, and written to
``benchmarks/results/records.json``.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from ._util import (
    HANDSHAKE,
    RESULTS,
    ROOT,
    free_port,
    masked_text_frame,
    percentile,
    private_redis,
    proc_cpu,
    python,
    raise_fd_limit,
    start_process,
    stop_process,
    wait_for_port,
)

APP = "benchmarks.records_app:app"
RECORD = "bench:rec"
ROOM = "bench"
_LINGER_ABORT = struct.pack("ii", 1, 0)


def frame(command: str, payload: Any, rid: int) -> bytes:
    body = json.dumps({"id": rid, "command": command, "payload": payload}, separators=(",", ":"))
    return masked_text_frame(body.encode())


# -- the worker process ----------------------------------------------------------


class _Conn:
    __slots__ = ("arrivals", "buf", "frames", "sock", "upgraded")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.upgraded = False
        self.frames = 0  # frames received after the upgrade
        self.arrivals: list[float] = []


def _frames(conn: _Conn) -> list[bytes]:
    """Complete server frames in the buffer (unmasked, no fragments)."""
    out = []
    buf = conn.buf
    i = 0
    while len(buf) - i >= 2:
        n = buf[i + 1] & 0x7F
        head = 2
        if n == 126:
            if len(buf) - i < 4:
                break
            n = int.from_bytes(buf[i + 2 : i + 4], "big")
            head = 4
        elif n == 127:
            if len(buf) - i < 10:
                break
            n = int.from_bytes(buf[i + 2 : i + 10], "big")
            head = 10
        if len(buf) - i < head + n:
            break
        out.append(buf[i + head : i + head + n])
        i += head + n
    conn.buf = buf[i:]
    return out


def worker(cfg: dict[str, Any]) -> None:
    """Open connections, send each its first frame, then record pushes (mode
    ``subscribe``) or write as fast as answered (mode ``write``)."""
    raise_fd_limit()
    ep = select.epoll()
    conns: dict[int, _Conn] = {}
    for _ in range(cfg["conns"]):
        s = socket.create_connection(("127.0.0.1", cfg["port"]))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HANDSHAKE)
        c = _Conn(s)
        while b"\r\n\r\n" not in c.buf:
            c.buf += s.recv(65536)
        c.buf = c.buf.split(b"\r\n\r\n", 1)[1]
        s.setblocking(False)
        conns[s.fileno()] = c
        ep.register(s.fileno(), select.EPOLLIN)
    mode = cfg["mode"]
    first = cfg["first"]
    for i, c in enumerate(conns.values()):
        payload = json.loads(json.dumps(first).replace("$i", str(cfg["base"] + i)))
        c.sock.sendall(frame(payload["command"], payload["payload"], 1))
    # every connection's first answer (and its assign-id) before "ready"
    answered = 0
    while answered < len(conns):
        for fd, _ in ep.poll(10.0):
            c = conns[fd]
            c.buf += c.sock.recv(262144)
            for f in _frames(c):
                if f.startswith(b'{"id":1,'):
                    answered += 1
    _emit({"ready": True})
    if mode == "subscribe":
        _record_pushes(ep, conns)
    else:
        _write(ep, conns, cfg)


def _record_pushes(ep: Any, conns: dict[int, _Conn]) -> None:
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    while not stop.is_set():
        for fd, _ in ep.poll(0.2):
            c = conns[fd]
            data = c.sock.recv(262144)
            now = time.monotonic()
            c.buf += data
            for _f in _frames(c):
                c.arrivals.append(now)
    sends = json.loads(sys.stdin.readline() or "[]")
    latencies: list[int] = []
    counts = []
    for c in conns.values():
        counts.append(len(c.arrivals))
        for k, t in enumerate(c.arrivals[: len(sends)]):
            latencies.append(round((t - sends[k]) * 1e6))
    _emit({"counts": counts, "latencies_us": latencies})
    _abort(conns)


def _write(ep: Any, conns: dict[int, _Conn], cfg: dict[str, Any]) -> None:
    line = json.loads(sys.stdin.readline())
    start, end = line["start"], line["end"]
    while time.monotonic() < start:
        time.sleep(0.001)
    rid = 2
    done = {fd: 0 for fd in conns}
    errors = 0

    def send(fd: int) -> None:
        nonlocal rid
        c = conns[fd]
        index = cfg["base"] + list(conns).index(fd)
        payload = {
            "recordId": cfg["record"],
            "newValue": {f"w{index}": done[fd] + 1},
            "options": {"strategy": "merge"},
        }
        c.sock.sendall(frame("mesh/publish-record-update", payload, rid))
        rid += 1

    for fd in conns:
        send(fd)
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for fd, _ in ep.poll(0.05):
            c = conns[fd]
            c.buf += c.sock.recv(262144)
            for f in _frames(c):
                if not f.startswith(b'{"id":'):
                    continue
                if b'"success":true' in f:
                    done[fd] += 1
                else:
                    errors += 1
                if time.monotonic() < end:
                    send(fd)
    # let the writes in flight finish
    deadline = time.monotonic() + 5
    inflight = len(conns)
    while inflight and time.monotonic() < deadline:
        for fd, _ in ep.poll(0.05):
            c = conns[fd]
            c.buf += c.sock.recv(262144)
            for f in _frames(c):
                if f.startswith(b'{"id":'):
                    inflight -= 1
                    if b'"success":true' in f:
                        done[fd] += 1
                    else:
                        errors += 1
    _emit({"done": list(done.values()), "errors": errors, "base": cfg["base"]})
    _abort(conns)


def _abort(conns: dict[int, _Conn]) -> None:
    for c in conns.values():
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        c.sock.close()


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- the coordinator -------------------------------------------------------------


class _Proc:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [python(), "-m", "benchmarks.records", "worker", json.dumps(cfg)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a benchmark worker exited early")
        return json.loads(line)

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _Servers:
    """An asyncio and a trio ``mesh serve`` on one Redis."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []

    def __enter__(self) -> _Servers:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for runtime in ("asyncio", "trio"):
            port = free_port()
            argv = [
                python(), "-m", "mesh_core.cli", "serve", APP, "--runtime", runtime,
                "--port", str(port), "--ping-interval", "0", "--latency-interval", "0",
                "--log-level", "warning", "--redis", self.redis_url,
            ]  # fmt: skip
            proc = start_process(argv, log=RESULTS / f"server-records-{runtime}.log")
            wait_for_port(port, proc)
            self.procs.append(proc)
            self.ports.append(port)
        return self

    def cpu(self) -> float:
        return sum(proc_cpu(p.pid) for p in self.procs)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            stop_process(proc)


def _ticks(port: int, rate: float, seconds: float, command: str, payload_of: Any) -> list[float]:
    """Send ``rate`` commands a second for ``seconds``, each after the last
    was answered; return when each was sent."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(HANDSHAKE)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    conn = _Conn(s)
    conn.buf = buf.split(b"\r\n\r\n", 1)[1]
    sends = []
    n = int(rate * seconds)
    t0 = time.monotonic() + 0.1
    for i in range(n):
        due = t0 + i / rate
        while (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        sends.append(time.monotonic())
        s.sendall(frame(command, payload_of(i), i + 10))
        answered = False
        while not answered:
            conn.buf += s.recv(65536)
            answered = any(f.startswith(b'{"id":') for f in _frames(conn))
    s.close()
    return sends


def fan_out(servers: _Servers, subscribers: int, rate: float, seconds: float, room: bool) -> Any:
    first = (
        {"command": "bench/join-room", "payload": {"roomName": ROOM}}
        if room
        else {"command": "mesh/subscribe-record", "payload": {"recordId": RECORD, "mode": "patch"}}
    )
    half = subscribers // 2
    workers = [
        _Proc({"port": port, "conns": n, "mode": "subscribe", "first": first, "base": base})
        for port, n, base in (
            (servers.ports[0], half, 0),
            (servers.ports[1], subscribers - half, half),
        )
    ]
    try:
        for w in workers:
            w.read()
        time.sleep(0.5)
        cpu0 = servers.cpu()
        if room:
            sends = _ticks(
                servers.ports[0],
                rate,
                seconds,
                "broadcast-room",
                lambda i: {"roomName": ROOM, "event": "bench/tick", "data": {f"k{i % 100}": i}},
            )
        else:
            sends = _ticks(
                servers.ports[0],
                rate,
                seconds,
                "bench/write",
                lambda i: {"recordId": RECORD, "value": {f"k{i % 100}": i}},
            )
        time.sleep(1.0)  # the last deliveries
        cpu = servers.cpu() - cpu0
        results = []
        for w in workers:
            w.send("stop")
            w.send(sends)
        results = [w.read() for w in workers]
    finally:
        for w in workers:
            w.close()
    delivered = sum(sum(r["counts"]) for r in results)
    latencies = sorted(x for r in results for x in r["latencies_us"])
    return {
        "kind": "room broadcast" if room else "record patches",
        "subscribers": subscribers,
        "updates": len(sends),
        "delivered": delivered,
        "expected": len(sends) * subscribers,
        "server_cpu_s": cpu,
        "cpu_us_per_delivery": cpu / max(1, delivered) * 1e6,
        "p50_ms": percentile(latencies, 50) / 1000 if latencies else None,
        "p99_ms": percentile(latencies, 99) / 1000 if latencies else None,
        "max_ms": latencies[-1] / 1000 if latencies else None,
    }


def writers(servers: _Servers, redis_url: str, count: int, seconds: float) -> Any:
    import redis

    record = "bench:w"
    r: Any = redis.Redis.from_url(redis_url)
    # an independent subscriber that blocks (no read timeout to trip over on
    # a loaded machine); a message on its own stop channel ends it
    listener_client: Any = redis.Redis.from_url(redis_url, socket_timeout=None)
    pubsub = listener_client.pubsub()
    pubsub.subscribe("mesh:record-updates", "bench:stop")
    heard: list[int] = []

    def listen() -> None:
        for message in pubsub.listen():
            if message["type"] != "message":
                continue
            if message["channel"] == b"bench:stop":
                break
            body = json.loads(message["data"])
            if body.get("recordId") == record:
                heard.append(body["version"])
        pubsub.close()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    half = count // 2
    first = {"command": "mesh/noop", "payload": {}}
    procs = [
        _Proc(
            {
                "port": port,
                "conns": n,
                "mode": "write",
                "first": first,
                "base": base,
                "record": record,
            }
        )
        for port, n, base in ((servers.ports[0], half, 0), (servers.ports[1], count - half, half))
    ]
    try:
        for p in procs:
            p.read()
        start = time.monotonic() + 0.3
        for p in procs:
            p.send({"start": start, "end": start + seconds})
        results = [p.read() for p in procs]
    finally:
        for p in procs:
            p.close()
    r.publish("bench:stop", "1")
    listener.join(30)
    done: list[int] = []
    for res in results:
        done += res["done"]
    successes = sum(done)
    value = json.loads(r.get(f"mesh:record:{record}") or b"{}")
    version = int(r.get(f"mesh:record-version:{record}") or 0)
    every_key = all(value.get(f"w{i}") == n for i, n in enumerate(done) if n)
    return {
        "writers": count,
        "seconds": seconds,
        "writes": successes,
        "errors": sum(res["errors"] for res in results),
        "writes_per_s": successes / seconds,
        "final_version": version,
        "versions_exact": version == successes and heard == list(range(1, successes + 1)),
        "every_writer_last_value": every_key,
    }


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "worker":
        worker(json.loads(args[1]))
        return
    p = argparse.ArgumentParser(prog="python -m benchmarks.records", description=__doc__)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--writers", type=int, default=200)
    p.add_argument("--write-seconds", type=float, default=5.0)
    opts = p.parse_args(args)
    raise_fd_limit()
    out: dict[str, Any] = {}
    with private_redis() as url, _Servers(url) as servers:
        out["records"] = fan_out(servers, opts.subscribers, opts.rate, opts.seconds, room=False)
        print(json.dumps(out["records"]), flush=True)
        out["room"] = fan_out(servers, opts.subscribers, opts.rate, opts.seconds, room=True)
        print(json.dumps(out["room"]), flush=True)
        out["cpu_ratio"] = out["records"]["cpu_us_per_delivery"] / max(
            1e-9, out["room"]["cpu_us_per_delivery"]
        )
        out["writers"] = writers(servers, url, opts.writers, opts.write_seconds)
        print(json.dumps(out["writers"]), flush=True)
    print(
        f"records: p99 {out['records']['p99_ms']:.1f} ms, "
        f"{out['records']['cpu_us_per_delivery']:.2f} µs CPU per delivered patch "
        f"({out['cpu_ratio']:.2f}x a room broadcast's "
        f"{out['room']['cpu_us_per_delivery']:.2f} µs); "
        f"{out['writers']['writers']} writers: {out['writers']['writes_per_s']:.0f} writes/s, "
        f"versions exact: {out['writers']['versions_exact']}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "records.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

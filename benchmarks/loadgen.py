"""The load generator: one worker process of several, raw sockets and epoll.

Run as ``python -m benchmarks.loadgen CONFIG_JSON`` by the coordinator
(:func:`run_load` and friends below). A worker opens its connections (plain
non-blocking sockets, a fixed upgrade request), prints ``ready`` with the
times it took, and then, by mode:

``load``
    waits for a JSON line on stdin with the shared monotonic times ``go``,
    ``start`` and ``end``; from ``go`` keeps ``inflight`` requests in flight
    on every connection (frames pre-built and pre-masked, one per slot);
    counts the responses that arrive in ``[start, end)`` and their latency;
    prints its figures and its own CPU time over the window as JSON.
``idle``
    holds the connections until stdin says ``close`` (or closes).
``room``
    joins every connection to a room with ``bench/join-room``, then for each
    ``round`` line on stdin waits until every connection has one more push,
    and prints when the first and the last of them arrived.
``listen``
    sends every connection the ``subscribe`` requests (e.g. a channel
    subscription and a room join), then reads pushes until stdin says
    ``close``: a push carrying ``<phase>@@<monotonic send time>@@`` counts
    for that phase, with the delivery latency of the oldest mark of the
    read that brought it; each ``report`` line prints the counts and a
    latency histogram (0.1 ms buckets) since the last one.

Responses are counted by reading frame headers; the only bytes of a body
that are looked at are the digits of ``{"id":N`` (responses are encoded
``id`` first), so the worker stays cheap next to the server it loads.
Connections are aborted (RST) at the end, so no TIME_WAIT piles up.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ._util import HANDSHAKE, masked_text_frame, raise_fd_limit

_LINGER_ABORT = struct.pack("ii", 1, 0)
_ID_PREFIX = b'{"id":'
MAX_PENDING_CONNECTS = 200  # handshakes in progress at once, per worker


def request_bytes(command: str, payload: Any, rid: int) -> bytes:
    body = json.dumps(
        {"id": rid, "command": command, "payload": payload}, separators=(",", ":")
    ).encode()
    return masked_text_frame(body)


def mix_frames(mix: str, rid: int) -> list[bytes]:
    """The frames one slot cycles through for a mix."""
    if mix == "noop":
        return [request_bytes("mesh/noop", {}, rid)]
    if mix == "echo":
        return [request_bytes("echo", {"data": "x" * 53}, rid)]  # 64 B of JSON payload
    if mix == "echo4k":
        return [request_bytes("echo", {"data": "x" * 4085}, rid)]  # 4 KiB
    if mix == "meta":
        return [
            request_bytes(
                "mesh/set-my-connection-metadata",
                {"metadata": {f"k{rid % 4}": rid}, "options": {"strategy": "merge"}},
                rid,
            ),
            request_bytes("mesh/get-room-metadata", {"roomName": "bench"}, rid),
            request_bytes("mesh/get-my-connection-metadata", {}, rid),
        ]
    raise ValueError(f"unknown mix {mix!r}")


@dataclass(slots=True)
class Conn:
    sock: socket.socket
    index: int
    buf: bytes = b""
    upgraded: bool = False
    ready: bool = False  # got mesh/assign-id (or any first frame)
    pushes: int = 0
    last_push: float = 0.0
    first_push: float = 0.0
    slots: list[int] = field(default_factory=list)


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.host: str = cfg.get("host", "127.0.0.1")
        self.port: int = cfg["port"]
        self.n: int = cfg["conns"]
        self.inflight: int = cfg.get("inflight", 1)
        self.base: int = cfg.get("base", 0)  # index of this worker's first connection
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.order: list[Conn] = []

    # -- connecting -------------------------------------------------------

    def connect_all(self) -> tuple[float, float]:
        """Open ``n`` connections, at most MAX_PENDING_CONNECTS handshakes at a
        time; return (start, end) monotonic times."""
        t0 = time.monotonic()
        started = 0
        done = 0
        pending = 0
        ep = self.ep
        while done < self.n:
            while started < self.n and pending < MAX_PENDING_CONNECTS:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.setblocking(False)
                s.connect_ex((self.host, self.port))
                c = Conn(s, self.base + started)
                self.conns[s.fileno()] = c
                self.order.append(c)
                ep.register(s.fileno(), select.EPOLLOUT)
                started += 1
                pending += 1
            for fd, ev in ep.poll(10.0):
                c = self.conns[fd]
                if not c.upgraded and ev & select.EPOLLOUT:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, f"connect failed: {os.strerror(err)}")
                    c.sock.sendall(HANDSHAKE)
                    c.upgraded = True
                    ep.modify(fd, select.EPOLLIN)
                    continue
                data = c.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed a connection during the handshake")
                c.buf += data
                if not c.ready:
                    end = c.buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    if not c.buf.startswith(b"HTTP/1.1 101"):
                        raise ConnectionError(f"upgrade refused: {c.buf[:80]!r}")
                    c.buf = c.buf[end + 4 :]
                    c.ready = True
                    c.pushes = -1  # the first frame (mesh/assign-id) is not a push
                if c.pushes < 0 and self._count_frames(c) > 0:
                    c.pushes = 0
                    done += 1
                    pending -= 1
        return t0, time.monotonic()

    @staticmethod
    def _count_frames(c: Conn) -> int:
        buf = c.buf
        pos, n, count = 0, len(buf), 0
        while pos + 2 <= n:
            ln = buf[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if pos + 4 > n:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if pos + 10 > n:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            end = pos + hl + ln
            if end > n:
                break
            count += 1
            pos = end
        c.buf = buf[pos:]
        return count

    def abort_all(self) -> None:
        for c in self.order:
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
                c.sock.close()
            except OSError:
                pass
        self.order.clear()
        self.conns.clear()

    # -- load ---------------------------------------------------------------

    def run_load(self, go: float, start: float, end: float) -> dict[str, Any]:
        mix: str = self.cfg["mix"]
        inflight = self.inflight
        nslots = self.n * inflight
        frames: list[list[bytes]] = []
        for slot in range(nslots):
            frames.append(mix_frames(mix, slot + 1))
        cycle = len(frames[0])
        turn = [0] * nslots
        sent_at = [0.0] * nslots
        latencies: list[float] = []
        responses = 0
        total = 0
        errors = 0
        by_fd: dict[int, tuple[socket.socket, list[bytes]]] = {}
        for i, c in enumerate(self.order):
            by_fd[c.sock.fileno()] = (c.sock, [c.buf])
            c.slots = list(range(i * inflight, (i + 1) * inflight))
        ep = self.ep
        delay = go - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.monotonic()
        for c in self.order:
            out = []
            for slot in c.slots:
                out.append(frames[slot][0])
                turn[slot] = 1 % cycle
                sent_at[slot] = now
            c.sock.sendall(b"".join(out))
        cpu0 = cpu1 = -1.0
        in_window = False
        poll = ep.poll
        monotonic = time.monotonic
        id_prefix = _ID_PREFIX
        while True:
            events = poll(0.05)
            now = monotonic()
            if not in_window and now >= start:
                in_window = True
                t = os.times()
                cpu0 = t.user + t.system
            if now >= end:
                t = os.times()
                cpu1 = t.user + t.system
                break
            for fd, _ in events:
                sock, pend = by_fd[fd]
                try:
                    data = sock.recv(262144)
                except ConnectionError:
                    data = b""
                if not data:
                    raise ConnectionError("the server closed a connection under load")
                buf = pend[0] + data if pend[0] else data
                pos, n = 0, len(buf)
                out = []
                while pos + 2 <= n:
                    ln = buf[pos + 1] & 0x7F
                    hl = 2
                    if ln == 126:
                        if pos + 4 > n:
                            break
                        ln = (buf[pos + 2] << 8) | buf[pos + 3]
                        hl = 4
                    elif ln == 127:
                        if pos + 10 > n:
                            break
                        ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                        hl = 10
                    body = pos + hl
                    stop = body + ln
                    if stop > n:
                        break
                    pos = stop
                    if buf.startswith(id_prefix, body):
                        comma = buf.find(b",", body + 6, stop)
                        slot = int(buf[body + 6 : comma]) - 1
                        total += 1
                        if in_window:
                            responses += 1
                            latencies.append(now - sent_at[slot])
                        k = turn[slot]
                        out.append(frames[slot][k])
                        turn[slot] = (k + 1) % cycle
                        sent_at[slot] = now
                    else:
                        errors += 1  # a push or a frame we did not expect
                pend[0] = buf[pos:] if pos < n else b""
                if out:
                    payload = b"".join(out)
                    sent = sock.send(payload)
                    if sent < len(payload):
                        sock.setblocking(True)
                        sock.sendall(payload[sent:])
                        sock.setblocking(False)
        window = end - start
        return {
            "responses": responses,
            "total_responses": total,
            "unexpected_frames": errors,
            "window": window,
            "cpu": cpu1 - cpu0,
            # microseconds, rounded, to keep the pipe small
            "latencies_us": [round(x * 1e6) for x in latencies],
        }

    # -- room broadcast -------------------------------------------------------

    def join_room(self, room: str) -> None:
        frames = {
            c.sock.fileno(): request_bytes("bench/join-room", {"roomName": room}, 1)
            for c in self.order
        }
        waiting = set(frames)
        for fd, frame in frames.items():
            self.conns[fd].sock.sendall(frame)
        while waiting:
            for fd, _ in self.ep.poll(10.0):
                c = self.conns[fd]
                c.buf += c.sock.recv(65536)
                if self._count_frames(c):
                    waiting.discard(fd)

    def await_pushes(self, expected: int, timeout: float) -> tuple[float, float, int]:
        """Wait until every connection has ``expected`` pushes; return the
        first and the last arrival of the latest one, and how many arrived."""
        deadline = time.monotonic() + timeout
        missing = {c.sock.fileno() for c in self.order if c.pushes < expected}
        first = float("inf")
        last = 0.0
        while missing and time.monotonic() < deadline:
            events = self.ep.poll(0.5)
            now = time.monotonic()
            for fd, _ in events:
                c = self.conns[fd]
                data = c.sock.recv(262144)
                if not data:
                    raise ConnectionError("the server closed a member connection")
                c.buf += data
                got = self._count_frames(c)
                if got:
                    c.pushes += got
                    if c.pushes >= expected:
                        missing.discard(fd)
                        first = min(first, now)
                        last = max(last, now)
        return first, last, len(self.order) - len(missing)


def listen(worker: Worker, requests: list[list[Any]]) -> None:
    """The ``listen`` mode; see the module docstring."""
    for c in worker.order:
        for i, (command, payload) in enumerate(requests, start=1):
            c.sock.sendall(request_bytes(command, payload, i))
    waiting = {c.sock.fileno(): len(requests) for c in worker.order}
    while waiting:
        for fd, _ in worker.ep.poll(10.0):
            c = worker.conns[fd]
            c.buf += c.sock.recv(65536)
            left = waiting.get(fd, 0) - worker._count_frames(c)
            if left <= 0:
                waiting.pop(fd, None)
            else:
                waiting[fd] = left
    _emit({"joined": True})
    stdin = sys.stdin.fileno()
    worker.ep.register(stdin, select.EPOLLIN)
    counts: dict[str, int] = {}
    hist: dict[str, dict[int, int]] = {}
    pending = b""
    while True:
        for fd, _ in worker.ep.poll(1.0):
            if fd == stdin:
                pending += os.read(stdin, 4096)
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip() != b"report":
                        return
                    _emit({"counts": counts, "hist": hist})
                    counts, hist = {}, {}
                continue
            c = worker.conns[fd]
            data = c.sock.recv(262144)
            if not data:
                raise ConnectionError("the server closed a subscriber")
            now = time.monotonic()
            # The marks are counted, not parsed, by C-speed scans of the whole
            # chunk; the latency of its *oldest* mark stands for all of them
            # (an upper bound for the others), so a subscriber costs a few
            # Python operations per read, not per message.
            buf = c.buf + data
            cut = buf.rfind(b"@@")
            if cut < 1:
                c.buf = buf
                continue
            if buf[cut - 1] in b"CR":  # an opening: that mark is not complete yet
                cut -= 1
            else:
                cut += 2
            head, c.buf = buf[:cut], buf[cut:]
            opening = head.find(b"@@")
            if opening < 1:
                continue
            closing = head.find(b"@@", opening + 2)
            latency = now - float(head[opening + 2 : closing])
            bucket = int(latency * 10_000)  # 0.1 ms
            for phase in ("C", "R"):
                n = head.count(phase.encode() + b"@@")
                if n:
                    counts[phase] = counts.get(phase, 0) + n
                    per = hist.setdefault(phase, {})
                    per[bucket] = per.get(bucket, 0) + n


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    raise_fd_limit()
    cfg = json.loads(sys.argv[1])
    worker = Worker(cfg)
    mode = cfg["mode"]
    try:
        t0, t1 = worker.connect_all()
        _emit({"ready": True, "connect_start": t0, "connect_end": t1})
        if mode == "load":
            times = json.loads(sys.stdin.readline())
            _emit(worker.run_load(times["go"], times["start"], times["end"]))
        elif mode == "idle":
            sys.stdin.readline()
        elif mode == "listen":
            listen(worker, cfg["subscribe"])
        elif mode == "room":
            worker.join_room(cfg.get("room", "bench"))
            _emit({"joined": True})
            for expected, line in enumerate(sys.stdin, start=1):
                if line.strip() != "round":
                    break
                first, last, complete = worker.await_pushes(expected, cfg.get("timeout", 10.0))
                _emit({"first": first, "last": last, "complete": complete})
        else:
            raise ValueError(f"unknown mode {mode!r}")
    finally:
        worker.abort_all()


if __name__ == "__main__":
    main()

"""Part 1: frame handling in the sans-IO core, no sockets.

One :class:`mesh_core.ServerConnection` is handshaken in memory with a wsproto
client, accepted and opened, and wrapped in a :class:`mesh_core.Connection`
of a minimal :class:`mesh_core.ServerCore` whose task group only collects the
request coroutines. Each iteration feeds one pre-masked client frame to
``receive_data`` (wsproto parse, size check, msgspec decode, request event),
hands the events to the server (route, middleware, built-in or handler,
in-memory store), steps the request coroutine to completion with
``send(None)`` (the memory store never suspends) and drains
``data_to_send`` (msgspec encode, framing).

The floors are measured in the same run on the same bytes: msgspec alone
(decode the frame, encode a response) and wsproto alone (parse the frame,
serialize a response: what a wsproto-based server pays for framing).
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from mesh_core import Connection, MeshApp, ServerCore, UpgradeRequest
from mesh_core.protocol import ServerConnection, State
from mesh_core.protocol._server_connection import text_frame
from mesh_core.protocol._wsframes import scan
from mesh_core.runtime import CollectingTaskGroup, Runtime

from ._util import median
from .loadgen import request_bytes

ROOM = "bench"

#: case name -> (command, payload)
CASES: dict[str, tuple[str, Any]] = {
    "noop": ("mesh/noop", {}),
    "echo 64 B": ("echo", {"data": "x" * 53}),
    "echo 4 KiB": ("echo", {"data": "x" * 4085}),
    "set-my-connection-metadata (merge)": (
        "mesh/set-my-connection-metadata",
        {"metadata": {"k": 1}, "options": {"strategy": "merge"}},
    ),
    "get-my-connection-metadata": ("mesh/get-my-connection-metadata", {}),
    "get-room-metadata": ("mesh/get-room-metadata", {"roomName": ROOM}),
}


class _FixedClock:
    """The one runtime service the core uses outside serving(): a clock."""

    name = "bench"

    def now(self) -> float:
        return 1000.0


class BenchServer(ServerCore):
    """A server with a fixed clock whose started coroutines are stepped by hand."""

    def __init__(self, app: MeshApp) -> None:
        super().__init__(
            app,
            runtime=cast(Runtime, _FixedClock()),
            ping_interval=0,
            latency_interval=0,
            instance_id="inst-bench",
        )
        self._group = group = CollectingTaskGroup()
        self.spawned = group.started

    def step_all(self) -> None:
        spawned = self.spawned
        for coro in spawned:
            try:
                coro.send(None)
            except StopIteration:
                continue
            raise RuntimeError("a request suspended: the benchmark needs a store that does not")
        spawned.clear()


def open_connection(app: MeshApp) -> tuple[BenchServer, ServerConnection]:
    server = BenchServer(app)
    proto = ServerConnection(server.options)
    client = WSConnection(ConnectionType.CLIENT)
    proto.receive_data(client.send(Request(host="localhost", target="/")), server.runtime.now())
    proto.events()
    proto.accept("conn-bench")
    connection = Connection(server, proto, UpgradeRequest(target="/", headers=()))
    server._local[connection.id] = connection
    server.spawned.append(server._open(connection, None))
    server.step_all()
    if proto.state is not State.OPEN:
        raise RuntimeError(f"the connection did not open: {proto.state}")
    # room metadata for get-room-metadata to find
    coro = server.rooms.set_metadata(ROOM, {"topic": "benchmarks", "maxUsers": 1000})
    with contextlib.suppress(StopIteration):
        coro.send(None)
    proto.data_to_send()
    return server, proto


def _calibrate(fn: Callable[[int], None], target: float) -> int:
    """How many iterations of ``fn(n)`` take about ``target`` seconds."""
    n = 100
    while True:
        t0 = time.perf_counter()
        fn(n)
        elapsed = time.perf_counter() - t0
        if elapsed > target / 4 or n > 10_000_000:
            break
        n *= 4
    return max(1, int(n * target / max(elapsed, 1e-9)))


def _interleaved(
    fns: dict[str, Callable[[int], None]], target: float, rounds: int
) -> dict[str, list[float]]:
    """Seconds per iteration of each ``fn``, one figure per round; the rounds
    alternate between the functions, so drift on a shared machine hits all
    of them alike."""
    counts = {name: _calibrate(fn, target) for name, fn in fns.items()}
    out: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    for _ in range(rounds):
        for name, fn in fns.items():
            n = counts[name]
            t0 = time.perf_counter()
            fn(n)
            out[name].append((time.perf_counter() - t0) / n)
    return out


def core_fn(app: MeshApp, command: str, payload: Any) -> Callable[[int], None]:
    server, proto = open_connection(app)
    frame = request_bytes(command, payload, 7)
    handle_events = server.handle_events
    step_all = server.step_all
    receive = proto.receive_data
    events = proto.events
    drain = proto.data_to_send

    # one checked run: exactly one response with our id and command
    receive(frame, 1000.0)
    handle_events(proto, events())
    step_all()
    body = _unframe(drain())
    if body.get("id") != 7 or body.get("command") != command:
        raise RuntimeError(f"unexpected response to {command}: {body!r}")
    if isinstance(body.get("payload"), dict) and "error" in body["payload"]:
        raise RuntimeError(f"{command} failed: {body['payload']!r}")

    def run(n: int) -> None:
        for _ in range(n):
            receive(frame, 1000.0)
            handle_events(proto, events())
            step_all()
            drain()

    return run


def _unframe(data: bytes) -> Any:
    """The JSON of one unmasked server frame."""
    ln = data[1] & 0x7F
    offset = 2 if ln < 126 else 4 if ln == 126 else 10
    return json.loads(data[offset:])


class _Frame(msgspec.Struct):
    command: str
    payload: Any = None
    id: int | None = None


class _Response(msgspec.Struct):
    id: int | None
    command: str
    payload: Any


def msgspec_fn(command: str, payload: Any) -> Callable[[int], None]:
    body = json.dumps({"id": 7, "command": command, "payload": payload}).encode()
    decode = msgspec.json.Decoder(_Frame).decode
    encode = msgspec.json.Encoder().encode

    def run(n: int) -> None:
        for _ in range(n):
            frame = decode(body)
            encode(_Response(frame.id, frame.command, frame.payload))

    return run


def framing_fn(command: str, payload: Any) -> Callable[[int], None]:
    """The least WebSocket framing a server can do on the same bytes, with the
    core's own tools: scan and unmask the client frame, check its UTF-8, frame
    the reply. The part of the core's time that is not dispatch."""
    frame = request_bytes(command, payload, 7)
    reply = json.dumps({"id": 7, "command": command, "payload": payload}).encode()

    def run(n: int) -> None:
        for _ in range(n):
            buf = bytearray(frame)
            _kind, end, _opcode, body, _length = scan(buf, 0)
            assert body is not None
            body.isascii() or body.decode()
            del buf[:end]
            text_frame(reply)

    return run


def _open_wsproto() -> WSConnection:
    ws = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    ws.receive_data(client.send(Request(host="localhost", target="/")))
    ws.events()
    ws.send(AcceptConnection())
    return ws


def wsproto_fns(command: str, payload: Any) -> dict[str, Callable[[int], None]]:
    """wsproto parse + serialize, and each alone, of the same frame."""
    frame = request_bytes(command, payload, 7)
    reply = json.dumps({"id": 7, "command": command, "payload": payload})
    ws = _open_wsproto()

    def both(n: int) -> None:
        for _ in range(n):
            ws.receive_data(frame)
            for _event in ws.events():
                pass
            ws.send(TextMessage(data=reply))

    def parse(n: int) -> None:
        for _ in range(n):
            ws.receive_data(frame)
            for _event in ws.events():
                pass

    def serialize(n: int) -> None:
        for _ in range(n):
            ws.send(TextMessage(data=reply))

    return {"wsproto": both, "wsproto_parse": parse, "wsproto_serialize": serialize}


def run(quick: bool, rounds: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from examples.demo import app  # the demo app: `echo` is a custom command

    target = 0.03 if quick else 0.1
    rows = []
    for name, (command, payload) in CASES.items():
        fns = {
            "core": core_fn(app, command, payload),
            "msgspec": msgspec_fn(command, payload),
            "framing": framing_fn(command, payload),
            **wsproto_fns(command, payload),
        }
        t = {k: median(v) for k, v in _interleaved(fns, target, rounds).items()}
        core, floor = t["core"], t["msgspec"]
        row = {
            "case": name,
            "core_us": core * 1e6,
            "frames_per_s": 1 / core,
            "msgspec_us": floor * 1e6,
            "wsproto_us": t["wsproto"] * 1e6,
            "wsproto_parse_us": t["wsproto_parse"] * 1e6,
            "wsproto_serialize_us": t["wsproto_serialize"] * 1e6,
            "framing_us": t["framing"] * 1e6,
            "ratio_msgspec": core / floor,
            # the core's time beyond the least WebSocket framing of the same
            # bytes (decode, route, run, encode, bookkeeping), in units of
            # the msgspec floor (decode + encode alone)
            "overhead_us": (core - t["framing"]) * 1e6,
            "overhead_ratio": (core - t["framing"]) / floor,
        }
        rows.append(row)
        log(
            f"  {name:36s} core {row['core_us']:6.2f} µs/frame  msgspec {row['msgspec_us']:5.2f}"
            f"  framing {row['framing_us']:5.2f}"
            f"  wsproto {row['wsproto_us']:6.2f} (parse {row['wsproto_parse_us']:5.2f})"
        )
    return rows

"""Hostile traffic over real sockets, on both runtimes: a fuzz storm from many
sockets next to a well-behaved client, a slow consumer in a broadcast storm,
and a request flood next to a well-behaved client."""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from mesh_core import Context, MeshApp
from mesh_core.app import BUILTINS
from tests.helpers.wsclient import WSClient

pytestmark = pytest.mark.anyio

FAST = {"ping_interval": 0, "latency_interval": 0}
_GONE = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
    OSError,
)


def make_app() -> MeshApp:
    app = MeshApp()

    @app.command("echo")
    async def echo(ctx: Context) -> Any:
        return ctx.payload

    return app


def rss_bytes() -> int:
    """Resident set size of this process (server and clients share it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    head = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        return bytes((head, 0x80 | n)) + key + body
    return bytes((head, 0x80 | 126)) + n.to_bytes(2, "big") + key + body


class RawSocket:
    """A minimal WebSocket client that reads in the background and keeps
    nothing but counts (and the ``n`` of one push's payloads)."""

    def __init__(self, stream: SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.closed = False
        self.close_code: int | None = None
        self.frames = 0
        self.responses = 0
        self.pushes: list[Any] = []
        self.keep_command = ""
        self._text: list[str] = []

    @classmethod
    async def connect(cls, port: int) -> RawSocket:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(ws.send(Request(host="localhost", target="/")))
        sock = cls(stream, ws)
        accepted = False
        while not accepted:
            ws.receive_data(await stream.receive())
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, RejectConnection):
                    raise ConnectionError(f"rejected: {event.status_code}")
                elif isinstance(event, TextMessage):
                    sock._on_text(event)
        return sock

    async def read_forever(self) -> None:
        while not self.closed:
            try:
                data: bytes | None = await self.stream.receive()
            except _GONE:
                data = None
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    self._on_text(event)
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                    self.closed = True
                elif isinstance(event, Ping):
                    await self.send(self.ws.send(event.response()))
            if data is None:
                self.closed = True

    def _on_text(self, event: TextMessage | BytesMessage) -> None:
        data = event.data
        self._text.append(data if isinstance(data, str) else data.decode())
        if not event.message_finished:
            return
        text = "".join(self._text)
        self._text.clear()
        self.frames += 1
        if text.startswith('{"id"'):
            self.responses += 1
        if self.keep_command and self.keep_command in text:
            frame = json.loads(text)
            if frame.get("command") == self.keep_command:
                # keep the sequence number only: the client's memory is not
                # what the test measures
                self.pushes.append(frame["payload"]["n"])

    async def send(self, data: bytes) -> bool:
        if self.closed:
            return False
        try:
            await self.stream.send(data)
        except _GONE:
            self.closed = True
        return not self.closed

    async def send_event(self, event: Any) -> bool:
        try:
            data = self.ws.send(event)
        except LocalProtocolError:  # the server closed it: wsproto refuses
            self.closed = True
            return False
        return await self.send(data)

    async def aclose(self) -> None:
        self.closed = True
        await self.stream.aclose()


# -- the fuzz storm -------------------------------------------------------------------------

BUILTIN_COMMANDS = [
    *sorted(BUILTINS),
    "echo",
    "no-such-command",
    "pong",
    "latency:response",
    "",
]


def junk_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**63, -(2**64), 1e308, 0.5])
    if kind == 2:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.choice(["replace", "merge", "deepMerge", "roomName", "connectionId"])
    if kind == 4:
        return rng.randrange(-(10**6), 10**6)
    if kind == 5:
        return [junk_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["roomName", "connectionId", "metadata", "options", "strategy", "x"]
    return {rng.choice(keys): junk_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def junk_frames(rng: random.Random, max_message_size: int) -> list[tuple[str, Any]]:
    """One hostile act: ("event", wsproto event) or ("raw", bytes), a few of them
    for a fragmented message."""
    kind = rng.randrange(14)
    if kind == 0:  # binary garbage
        return [("event", BytesMessage(data=os.urandom(rng.randrange(200))))]
    if kind == 1:  # text that is not JSON
        text = "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(60)))
        return [("event", TextMessage(data=text))]
    if kind == 2:  # JSON that is not an object
        return [("event", TextMessage(data=json.dumps([junk_value(rng)])))]
    if kind == 3:  # an object without a usable command
        frame = {"id": rng.randrange(100), "command": junk_value(rng), "payload": 1}
        return [("event", TextMessage(data=json.dumps(frame)))]
    if kind == 4:  # ids that are not integers, or too big
        rid = rng.choice([1.5, "7", True, [1], {"a": 1}, 2**63, -(2**63) - 1, 10**25])
        return [("event", TextMessage(data=json.dumps({"id": rid, "command": "mesh/noop"})))]
    if kind == 5:  # nesting deeper than the limit
        n = rng.randrange(60, 300)
        text = '{"id": 1, "command": "echo", "payload": ' + "[" * n + "]" * n + "}"
        return [("event", TextMessage(data=text))]
    if kind in (6, 7, 8):  # well-formed requests with junk payloads
        frame = {
            "id": rng.randrange(10**8),
            "command": rng.choice(BUILTIN_COMMANDS),
            "payload": junk_value(rng),
        }
        return [("event", TextMessage(data=json.dumps(frame)))]
    if kind == 9:  # a fragmented message, valid or not
        text = json.dumps({"id": rng.randrange(10**8), "command": "echo", "payload": "frag"})
        if rng.random() < 0.5:
            text = text[:-1]
        cut = sorted(rng.sample(range(1, len(text)), 2))
        parts = [text[: cut[0]], text[cut[0] : cut[1]], text[cut[1] :]]
        return [
            ("event", TextMessage(data=part, message_finished=i == 2))
            for i, part in enumerate(parts)
        ]
    if kind == 10:  # frames without an id, and control frames
        return [
            ("event", TextMessage(data=json.dumps({"command": "echo", "payload": 1}))),
            ("event", Ping(payload=os.urandom(rng.randrange(20)))),
        ]
    if kind == 11 and rng.random() < 0.2:  # over the size limit: 1009
        return [("event", TextMessage(data="x" * (max_message_size + 1)))]
    if kind == 12 and rng.random() < 0.3:  # invalid UTF-8 in a text frame: 1007
        return [("raw", masked(0x1, b'{"command": "\xff\xfe"}'))]
    if kind == 13 and rng.random() < 0.2:  # not a WebSocket frame at all: 1002
        junk = bytearray(os.urandom(rng.randrange(1, 40)))
        # reserved bits set: random bytes must not happen to be a valid frame
        # (an empty close frame would be a clean close with 1005)
        junk[0] |= 0x70
        return [("raw", bytes(junk))]
    return [("event", TextMessage(data=json.dumps({"id": 3, "command": "mesh/noop"})))]


async def fuzzer(port: int, seed: int, acts: int, stats: dict[str, int]) -> None:
    rng = random.Random(seed)
    done = 0
    while done < acts:
        sock = await RawSocket.connect(port)
        stats["sockets"] += 1
        async with anyio.create_task_group() as tg:
            tg.start_soon(sock.read_forever)
            while done < acts and not sock.closed:
                for how, item in junk_frames(rng, 64 * 1024):
                    ok = await (sock.send_event(item) if how == "event" else sock.send(item))
                    if not ok:
                        break
                    stats["frames"] += 1
                done += 1
                await anyio.sleep(0)
            if sock.close_code is not None:
                stats[f"closed-{sock.close_code}"] = stats.get(f"closed-{sock.close_code}", 0) + 1
            tg.cancel_scope.cancel()
        await sock.aclose()


async def well_behaved(port: int, rounds: int) -> int:
    client = await WSClient.connect(port)
    ok = 0
    for i in range(rounds):
        assert await client.request("mesh/noop", timeout=20) is True
        assert await client.request("echo", {"i": i, "s": "é" * i}, timeout=20) == {
            "i": i,
            "s": "é" * i,
        }
        assert await client.request(
            "mesh/set-my-connection-metadata",
            {"metadata": {f"k{i}": i}, "options": {"strategy": "merge"}},
            timeout=20,
        ) == {"success": True}
        mine = await client.request("mesh/get-my-connection-metadata", timeout=20)
        assert mine["metadata"][f"k{i}"] == i and len(mine["metadata"]) == i + 1
        joined = await client.request("mesh/join-room", {"roomName": f"room{i % 3}"}, timeout=20)
        assert joined["success"] is True
        ok += 5
    assert client.closed is None
    await client.close()
    return ok


async def test_fuzz_storm_leaves_well_behaved_clients_untouched(
    server_cls: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = server_cls(make_app(), max_message_size=64 * 1024, max_violations=20, **FAST)
    stats: dict[str, int] = {"frames": 0, "sockets": 0}
    answered: list[int] = []
    async with server.listen():

        async def good() -> None:
            answered.append(await well_behaved(server.port, 60))

        async with anyio.create_task_group() as tg:
            for seed in range(12):
                tg.start_soon(fuzzer, server.port, seed, 400, stats)
            tg.start_soon(good)
        assert answered == [300]  # every valid command of the good client succeeded
        assert stats["frames"] >= 4000
        with anyio.fail_after(10):
            while server.connections.local_connections():
                await anyio.sleep(0.01)
        # the server is still fine, and can say what it saw
        assert await well_behaved(server.port, 2) == 10
        metrics = server.metrics()
    print(
        f"fuzz: {stats['frames']} hostile frames on {stats['sockets']} sockets, "
        f"{metrics['violations']} violations, closes {metrics['closes_by_code']}"
    )
    assert metrics["violations"] > 500
    assert metrics["connections_total"] == stats["sockets"] + 2
    closes = metrics["closes_by_code"]
    assert closes.get("1008", 0) > 0  # violation budgets ran out
    assert set(closes) <= {"1000", "1002", "1006", "1007", "1008", "1009"}
    # client errors never log a traceback
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert tracebacks == [], [r.getMessage() for r in tracebacks]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- a slow consumer in a broadcast storm -----------------------------------------------------

STORM_MESSAGES = 3000
STORM_PAYLOAD = 8 * 1024
SEND_BUFFER = 1024 * 1024
#: how much the process may grow while 24 MB are pushed at a client that reads nothing
RSS_BOUND = 16 * 1024 * 1024


async def test_slow_consumer_is_dropped_and_the_room_gets_everything(server_cls: Any) -> None:
    server = server_cls(make_app(), max_message_size=64 * 1024, max_send_buffer=SEND_BUFFER, **FAST)
    async with server.listen():
        fast = [await RawSocket.connect(server.port) for _ in range(3)]
        slow = await RawSocket.connect(server.port)
        for sock in (*fast, slow):
            sock.keep_command = "storm"
        async with anyio.create_task_group() as tg:
            for sock in fast:
                tg.start_soon(sock.read_forever)
            # the slow one never reads again
            with anyio.fail_after(5):
                while len(server.connections.local_connections()) < 4:
                    await anyio.sleep(0.01)
            for conn in server.connections.local_connections():
                await server.add_to_room("storm", conn)
            slow_id = next(
                c.id
                for c in server.connections.local_connections()
                if c.remote_address is not None
                and c.remote_address[1] == slow.stream.extra(anyio.abc.SocketAttribute.local_port)
            )
            filler = "x" * STORM_PAYLOAD
            baseline = peak = rss_bytes()
            dropped_at = None
            with anyio.fail_after(60):
                for n in range(STORM_MESSAGES):
                    await server.broadcast_room("storm", "storm", {"n": n, "data": filler})
                    # let the readers keep up, as a live room would: a reader is
                    # at most 80 messages (~650 KiB) behind, under the 1 MiB bound
                    if n % 50 == 49:
                        while min(len(s.pushes) for s in fast) < n - 30:
                            await anyio.sleep(0.001)
                        peak = max(peak, rss_bytes())
                    conn = server.connections.get_local_connection(slow_id)
                    if dropped_at is None and (conn is None or not conn.is_open):
                        dropped_at = n
                while min(len(s.pushes) for s in fast) < STORM_MESSAGES:
                    await anyio.sleep(0.005)
            peak = max(peak, rss_bytes())
            tg.cancel_scope.cancel()
        growth = peak - baseline
        print(
            f"slow consumer dropped after {dropped_at} of {STORM_MESSAGES} broadcasts of "
            f"{STORM_PAYLOAD} B; RSS growth {growth / 2**20:.1f} MiB "
            f"(bound {RSS_BOUND / 2**20:.0f} MiB)"
        )
        assert dropped_at is not None and dropped_at < STORM_MESSAGES
        # every other member got every message, in order
        for sock in fast:
            assert sock.pushes == list(range(STORM_MESSAGES))
        assert growth < RSS_BOUND
        metrics = server.metrics()
        assert metrics["slow_consumer_closes"] == 1
        assert metrics["closes_by_code"].get("1013") == 1
        assert server.connections.get_local_connection(slow_id) is None
        for sock in (*fast, slow):
            await sock.aclose()


# -- a request flood ---------------------------------------------------------------------------

FLOOD = 20_000
LIMIT = 16


async def test_flood_does_not_starve_another_connection(server_cls: Any) -> None:
    running = [0, 0]
    app = make_app()

    @app.command("work")
    async def work(ctx: Context) -> Any:
        running[0] += 1
        running[1] = max(running[1], running[0])
        await anyio.sleep(0)
        running[0] -= 1
        return ctx.id

    server = server_cls(app, max_requests_in_flight=LIMIT, max_queued_requests=64, **FAST)
    async with server.listen():
        flooder = await RawSocket.connect(server.port)
        flood = b"".join(
            flooder.ws.send(TextMessage(data=f'{{"id":{i},"command":"work","payload":{{}}}}'))
            for i in range(FLOOD)
        )
        other = await WSClient.connect(server.port)
        other_done = [0]

        async def send_flood() -> None:
            await flooder.stream.send(flood)  # as fast as the socket takes it

        async def polite() -> None:
            for i in range(50):
                assert await other.request("echo", i, timeout=20) == i
                other_done[0] += 1

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(flooder.read_forever)
                tg.start_soon(send_flood)
                await anyio.sleep(0.05)  # the flood is under way
                with anyio.fail_after(20):  # generous: completion is what counts
                    await polite()
                print(f"polite client done with the flood at {flooder.responses}/{FLOOD}")
                while flooder.responses < FLOOD:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert other_done == [50]
        assert running[1] <= LIMIT  # the flood never ran more than its share at once
        assert server.metrics()["requests_by_command"]["work"] == FLOOD
        await flooder.aclose()
        await other.close()

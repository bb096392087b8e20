"""Every limit and policy over real sockets, at the limit and one past it, on
both runtimes; graceful shutdown with a request in flight; the counters."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import anyio
import pytest

from mesh_core import Connection, Context, MeshApp, MeshError, UpgradeRequest
from tests.helpers.remote import importable
from tests.helpers.wsclient import Rejected, WSClient

pytestmark = pytest.mark.anyio

FAST = {"ping_interval": 0, "latency_interval": 0}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def masked_text(payload: bytes) -> bytes:
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + key + body


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


class Gate:
    """Handlers that wait until the test opens the gate, and count how many
    run at once."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.running = 0
        self.most = 0
        self.started = 0

    async def hold(self, ctx: Context) -> Any:
        self.started += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.event.wait()
        finally:
            self.running -= 1
        return ctx.payload


@importable
def make_app(gate: bool = False, auth: bool = False, record: bool = False) -> MeshApp:
    """The limits' app; with ``gate``, ``app.gate`` (a :class:`Gate` behind
    the command ``hold``); ``auth``: the query's ``name`` as the metadata;
    ``record``: ``app.calls``, the payloads of the command ``record``."""
    app = MeshApp()

    @app.command("echo")
    async def echo(ctx: Context) -> Any:
        return ctx.payload

    @app.command("sleep")
    async def sleep(ctx: Context) -> Any:
        await anyio.sleep(ctx.payload["delay"])
        return ctx.payload["n"]

    if gate:
        app.gate = Gate()  # type: ignore[attr-defined]
        app.expose_command("hold", app.gate.hold)  # type: ignore[attr-defined]
    if auth:

        @app.authenticate_connection
        async def name_from_query(request: UpgradeRequest) -> Any:
            return {"name": request.query_param("name")}

    if record:
        app.calls = calls = []  # type: ignore[attr-defined]

        @app.command("record")
        async def record_payload(ctx: Context) -> Any:
            calls.append(ctx.payload)
            return True

    return app


def append_x(old: Any) -> Any:
    return old + "x"


# -- metadata size -------------------------------------------------------------------


async def test_metadata_from_authentication_is_bounded_too(server_cls: Any) -> None:
    server = server_cls(make_app(auth=True), max_metadata_size=64, **FAST)
    async with server.listen():
        ok = await WSClient.connect(server.port, "/?name=ada")
        assert await ok.request("mesh/get-my-connection-metadata") == {"metadata": {"name": "ada"}}
        with pytest.raises(Rejected) as refused:
            await WSClient.connect(server.port, "/?name=" + "x" * 64)
        assert refused.value.status == 500
        assert len(server.connections.local_connections()) == 1
        assert len(await server.connections.get_all_metadata()) == 1
        await ok.close()


async def test_metadata_size_at_the_limit_is_stored_and_past_it_refused(server_cls: Any) -> None:
    server = server_cls(make_app(), max_metadata_size=1024, **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        at = "x" * 1022  # encodes to exactly 1024 bytes with its quotes
        past = "x" * 1023
        set_ = "mesh/set-my-connection-metadata"
        assert await c.request(set_, {"metadata": at}) == {"success": True}
        refused = await c.request(set_, {"metadata": past})
        assert refused["code"] == "ETOOLARGE" and refused["name"] == "MetadataTooLarge"
        assert "1025 bytes" in refused["error"]
        assert await server.connections.get_metadata(c.connection_id) == at  # nothing stored
        # a merge whose result would be too large is refused too
        assert await c.request(set_, {"metadata": {"a": "y" * 600}}) == {"success": True}
        merged = await c.request(
            set_, {"metadata": {"b": "z" * 600}, "options": {"strategy": "merge"}}
        )
        assert merged["code"] == "ETOOLARGE"
        assert await c.request("mesh/get-my-connection-metadata") == {"metadata": {"a": "y" * 600}}
        assert c.closed is None  # an error payload, not a close

        # the server API obeys the same limit, for connections and rooms
        await server.rooms.set_metadata("r", at)
        with pytest.raises(MeshError) as too_big:
            await server.rooms.set_metadata("r", past)
        assert too_big.value.code == "ETOOLARGE"
        with pytest.raises(MeshError):
            await server.rooms.update_metadata("r", append_x)
        with pytest.raises(MeshError):
            await server.connections.set_metadata(c.connection_id, {"k": past}, strategy="merge")
        assert await server.rooms.get_metadata("r") == at
        assert await server.connections.get_metadata(c.connection_id) == {"a": "y" * 600}
        assert server.metrics()["errors_by_code"]["ETOOLARGE"] == 2
        await c.close()


# -- requests in flight --------------------------------------------------------------


@pytest.mark.handlers_wait
async def test_requests_in_flight_at_the_limit_run_and_past_it_wait(server_cls: Any) -> None:
    server = server_cls(make_app(gate=True), max_requests_in_flight=3, **FAST)
    async with server.listen():
        gate = server.app.gate
        c = await WSClient.connect(server.port)
        other = await WSClient.connect(server.port)
        ids = [await c.send_request("hold", {"n": i}) for i in range(5)]
        await wait_until(lambda: gate.started == 3)  # at the limit: all three run
        # past it, the others wait; another connection is not held up meanwhile
        assert await other.request("echo", "free") == "free"
        assert await other.request("mesh/noop") is True
        await anyio.sleep(0.1)
        assert gate.started == 3 and gate.running == 3
        conn = server.connections.get_local_connection(c.connection_id)
        assert conn.proto.requests_in_flight == 3 and conn.proto.requests_queued == 2
        gate.event.set()
        for i, rid in enumerate(ids):
            assert await c.response(rid) == {"n": i}
        assert gate.started == 5 and gate.most == 3
        await c.close()
        await other.close()


# -- connections per server ----------------------------------------------------------


async def test_max_connections_at_the_limit_and_past_it_503(server_cls: Any) -> None:
    server = server_cls(make_app(), max_connections=2, **FAST)
    async with server.listen():
        a = await WSClient.connect(server.port)
        b = await WSClient.connect(server.port)  # at the limit
        with pytest.raises(Rejected) as refused:
            await WSClient.connect(server.port)  # one past it
        assert refused.value.status == 503
        assert await a.request("mesh/noop") is True
        await a.close()
        await wait_until(lambda: len(server.connections.local_connections()) == 1)
        c = await WSClient.connect(server.port)  # room again
        assert await c.request("mesh/noop") is True
        metrics = server.metrics()
        assert metrics["handshake_rejections_by_status"] == {"503": 1}
        assert metrics["connections_total"] == 3 and metrics["connections_current"] == 2
        await b.close()
        await c.close()


# -- handshake timeout ----------------------------------------------------------------


@pytest.mark.own_framing
async def test_handshake_timeout(server_cls: Any) -> None:
    timeout = 0.5
    server = server_cls(make_app(), handshake_timeout=timeout, **FAST)
    async with server.listen():
        # within the timeout: a slow but complete upgrade is accepted
        slow = await anyio.connect_tcp("127.0.0.1", server.port)
        await slow.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await anyio.sleep(timeout / 5)
        await slow.send(
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        with anyio.fail_after(5):
            answer = await slow.receive()
        assert answer.startswith(b"HTTP/1.1 101")
        await slow.aclose()
        # past it: a socket that never finishes the upgrade is dropped
        for partial in (b"", b"GET / HTTP/1.1\r\nHost: x\r\n"):
            idle = await anyio.connect_tcp("127.0.0.1", server.port)
            started = time.monotonic()
            if partial:
                await idle.send(partial)
            with anyio.fail_after(5):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await idle.receive()
            assert time.monotonic() - started >= timeout * 0.8
            await idle.aclose()
        assert server.connections.local_connections() == []


# -- origins --------------------------------------------------------------------------


async def test_allowed_origins(server_cls: Any) -> None:
    server = server_cls(make_app(), allowed_origins=["https://app.example"], **FAST)
    async with server.listen():
        ok = await WSClient.connect(server.port, headers=[(b"Origin", b"https://app.example")])
        assert await ok.request("mesh/noop") is True
        for headers in ([(b"Origin", b"https://evil.example")], []):
            with pytest.raises(Rejected) as refused:
                await WSClient.connect(server.port, headers=headers)
            assert refused.value.status == 403
        assert len(server.connections.local_connections()) == 1
        await ok.close()
    # None in the list admits clients that send no Origin (services, bots)
    server = server_cls(make_app(), allowed_origins=["https://app.example", None], **FAST)
    async with server.listen():
        service = await WSClient.connect(server.port)
        assert await service.request("mesh/noop") is True
        with pytest.raises(Rejected) as refused:
            await WSClient.connect(server.port, headers=[(b"Origin", b"https://evil.example")])
        assert refused.value.status == 403
        await service.close()


# -- read and write policies -----------------------------------------------------------


@importable
def make_policy_app(policy: str) -> MeshApp:
    """Reads by ``policy`` (a guard admits ``app.public_id``, and records in
    ``app.seen`` what it was asked), writes denied."""
    seen: list[tuple[str, str]] = []

    def guard(connection: Connection, target_id: str) -> bool:
        seen.append((connection.id, target_id))
        return target_id == app.public_id  # type: ignore[attr-defined,no-any-return]

    async def async_guard(connection: Connection, target_id: str) -> bool:
        await anyio.sleep(0)
        return guard(connection, target_id)

    reads: Any = {"deny": "deny", "guard": guard, "async-guard": async_guard}[policy]
    app = make_app()
    app.seen, app.public_id = seen, ""  # type: ignore[attr-defined]
    app.client_metadata_reads = reads
    app.client_metadata_writes = "deny"
    return app


@pytest.mark.parametrize(
    "policy", ["deny", "guard", pytest.param("async-guard", marks=pytest.mark.handlers_wait)]
)
async def test_client_metadata_read_policy(server_cls: Any, policy: str) -> None:
    server = server_cls(make_policy_app(policy), **FAST)
    async with server.listen():
        reader, public, private = [await WSClient.connect(server.port) for _ in range(3)]
        server.app.public_id = public.connection_id
        for client, value in ((reader, "me"), (public, "pub"), (private, "secret")):
            await server.connections.set_metadata(client.connection_id, {"v": value})
            await client.request("mesh/join-room", {"roomName": "r"})
        get = "mesh/get-connection-metadata"
        # its own metadata is always readable
        assert await reader.request(get, {"connectionId": reader.connection_id}) == {
            "metadata": {"v": "me"}
        }
        assert await reader.request("mesh/get-my-connection-metadata") == {"metadata": {"v": "me"}}
        assert await reader.request(get, {"connectionId": private.connection_id}) == {
            "metadata": None
        }
        expected_public = None if policy == "deny" else {"v": "pub"}
        assert await reader.request(get, {"connectionId": public.connection_id}) == {
            "metadata": expected_public
        }
        # join-room's member list is filtered the same way
        present = (await reader.request("mesh/join-room", {"roomName": "r"}))["present"]
        assert {p["id"]: p["metadata"] for p in present} == {
            reader.connection_id: {"v": "me"},
            public.connection_id: expected_public,
            private.connection_id: None,
        }
        if policy != "deny":
            seen = server.app.seen
            assert (reader.connection_id, private.connection_id) in seen
            assert all(target != reader_id for reader_id, target in seen)
        # the write policy (deny) holds too; the server itself still reads all
        assert await reader.request(
            "mesh/set-my-connection-metadata", {"metadata": {"v": "hacked"}}
        ) == {"success": False}
        assert await server.connections.get_metadata(private.connection_id) == {"v": "secret"}
        for client in (reader, public, private):
            await client.close()


# -- bad input --------------------------------------------------------------------------


async def test_violation_budget_at_the_limit_and_one_past_closes_1008(server_cls: Any) -> None:
    server = server_cls(make_app(), max_violations=3, **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        for junk in ("nope", "[]", '{"id": 1}'):
            await c.send_text(junk)
        assert await c.request("mesh/noop") is True  # at the budget: still served
        await c.send_bytes(b"\x00\xff")  # one past it
        closed = await c.wait_closed()
        assert closed.code == 1008 and "violations" in (closed.reason or "")
        await wait_until(lambda: not server.connections.local_connections())
        metrics = server.metrics()
        assert metrics["violations"] == 4 and metrics["closes_by_code"]["1008"] == 1
        await c.abort()


async def test_json_depth_at_the_limit_and_past_it(server_cls: Any) -> None:
    server = server_cls(make_app(), max_json_depth=8, **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        # the frame is level 1, "payload" of echo holds level 2 and below
        assert await c.request("echo", nested(7)) == nested(7)
        await c.send_json({"id": 500, "command": "echo", "payload": nested(8)})
        assert await c.request("mesh/noop") is True
        assert 500 not in c.responses
        conn = server.connections.get_local_connection(c.connection_id)
        assert conn.proto.violations == 1 and c.closed is None
        await c.close()


async def test_huge_request_ids(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        for rid in (2**63 - 1, -(2**63), 2**53 + 1, 99_999_999, 0):
            await c.send_json({"id": rid, "command": "echo", "payload": rid})
            await c.wait_for(lambda rid=rid: rid in c.responses)
            assert c.responses.pop(rid) == {"id": rid, "command": "echo", "payload": rid}
        for rid in (2**63, -(2**63) - 1, 10**30):
            await c.send_text(f'{{"id": {rid}, "command": "echo", "payload": "big"}}')
        assert await c.request("mesh/noop") is True
        conn = server.connections.get_local_connection(c.connection_id)
        assert conn.proto.violations == 3
        assert not any(m.get("payload") == "big" for m in c.messages)
        await c.close()


async def test_frames_after_close_are_ignored(server_cls: Any) -> None:
    server = server_cls(make_app(record=True), **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        assert await c.request("record", 1) is True
        from wsproto.events import CloseConnection

        close = c.ws.send(CloseConnection(code=1000))
        frame = masked_text(json.dumps({"id": 9, "command": "record", "payload": 2}).encode())
        await c.stream.send(close + frame + masked_text(b"junk"))
        closed = await c.wait_closed()
        assert closed.code == 1000
        await wait_until(lambda: not server.connections.local_connections())
        assert server.app.calls == [1]
        assert server.metrics()["violations"] == 0
        await c.abort()


# -- graceful shutdown ------------------------------------------------------------------


@pytest.mark.handlers_wait
async def test_shutdown_answers_the_request_in_flight_before_1001(server_cls: Any) -> None:
    server = server_cls(make_app(gate=True), shutdown_timeout=10, **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        idle = await WSClient.connect(server.port)
        await c.request("mesh/join-room", {"roomName": "r"})
        rid = await c.send_request("sleep", {"n": "done", "delay": 0.3})
        await wait_until(lambda: server.metrics()["requests_in_flight"] == 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.close)
            tg.start_soon(idle.wait_closed)
            await c.wait_closed(timeout=10)
        # the response came in before the close frame, on the same socket
        responses = [m for m in c.messages if m.get("id") == rid]
        assert responses == [{"id": rid, "command": "sleep", "payload": "done"}]
        assert c.closed is not None and c.closed.code == 1001
        assert idle.closed is not None and idle.closed.code == 1001
        assert server.connections.local_connections() == []
        assert await server.get_room_members("r") == []
        await c.abort()
        await idle.abort()


# -- counters -----------------------------------------------------------------------------


@pytest.mark.own_framing("hypercorn-trio")  # it reports every peer close as 1006
async def test_metrics_dict_and_prometheus_text(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        for _ in range(3):
            await c.request("mesh/noop")
        await c.request("echo", "hi")
        assert (await c.request("no-such-command"))["code"] == "ENOTFOUND"
        await c.send_text("garbage")
        assert await c.request("mesh/noop") is True
        metrics = server.metrics()
        assert metrics["connections_current"] == 1 and metrics["connections_total"] == 1
        assert metrics["requests_by_command"] == {"mesh/noop": 4, "echo": 1, "(unknown)": 1}
        assert metrics["requests_total"] == 6
        assert metrics["errors_by_code"] == {"ENOTFOUND": 1}
        assert metrics["violations"] == 1
        assert metrics["bytes_in"] > 200 and metrics["bytes_out"] > 200
        assert metrics["slow_consumer_closes"] == 0
        text = server.metrics_prometheus()
        assert 'mesh_requests_total{command="mesh/noop"} 4' in text
        assert "mesh_connections 1" in text.splitlines()
        assert json.loads(json.dumps(metrics)) == metrics  # plain data
        await c.close()
        await wait_until(lambda: server.metrics()["connections_current"] == 0)
        assert server.metrics()["closes_by_code"] == {"1000": 1}

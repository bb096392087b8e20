"""Protocol behaviour over real sockets, both runtimes: concurrency, errors,
heartbeat, handshake authentication, broadcasts, bad input."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

import anyio
import pytest

from mesh_core import Context, MeshApp, MeshError, Reject, UpgradeRequest
from mesh_core.storage import _ops as ops
from tests.helpers.remote import importable
from tests.helpers.wsclient import Rejected, WSClient

pytestmark = pytest.mark.anyio

FAST = {"ping_interval": 0, "latency_interval": 0}


@importable
def make_app() -> MeshApp:
    app = MeshApp()

    @app.command("sleep-echo")
    async def sleep_echo(ctx: Context) -> Any:
        await anyio.sleep(ctx.payload["delay"])
        return ctx.payload["n"]

    @app.command("merge-room")
    async def merge_room(ctx: Context) -> Any:
        await ctx.server.rooms.set_metadata(
            ctx.payload["room"], ctx.payload["data"], strategy="merge"
        )
        return True

    @app.command("fail")
    async def fail(ctx: Context) -> Any:
        kind = ctx.payload["kind"]
        if kind == "mesh":
            raise MeshError("nope", code="ENOPE")
        if kind == "value":
            raise ValueError("bad value")
        if kind == "json":
            return {"not": object()}
        return None

    return app


@pytest.mark.handlers_wait
async def test_many_in_flight_answered_out_of_order(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        client = await WSClient.connect(server.port)
        n = 30
        ids = {}
        for i in range(n):
            # later requests finish first
            ids[i] = await client.send_request("sleep-echo", {"n": i, "delay": (n - i) * 0.01})
        await client.wait_for(
            lambda: all(rid in client.responses for rid in ids.values()), timeout=10
        )
        order = [m["id"] for m in client.messages if "id" in m]
        assert order != sorted(order)  # really out of order
        for i, rid in ids.items():
            frame = client.responses[rid]
            assert frame == {"id": rid, "command": "sleep-echo", "payload": i}
        # the same id reused after its response is fine
        client.responses.clear()
        await client.send_json({"id": 5, "command": "mesh/noop", "payload": {}})
        await client.wait_for(lambda: 5 in client.responses)
        assert client.responses[5]["payload"] is True
        await client.close()


async def test_twenty_clients_merge_one_room_nothing_lost(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        clients = [await WSClient.connect(server.port) for _ in range(20)]
        sent = []
        for i, client in enumerate(clients):
            for j in range(5):
                rid = await client.send_request(
                    "merge-room", {"room": "shared", "data": {f"k{i}_{j}": i * j}}
                )
                sent.append((client, rid))
        for client, rid in sent:
            assert await client.response(rid) is True
        stored = await server.rooms.get_metadata("shared")
        assert stored == {f"k{i}_{j}": i * j for i in range(20) for j in range(5)}
        for client in clients:
            await client.close()


async def test_error_payloads(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        assert await c.request("fail", {"kind": "mesh"}) == {
            "error": "nope",
            "code": "ENOPE",
            "name": "Error",
        }
        assert await c.request("fail", {"kind": "value"}) == {
            "error": "bad value",
            "code": "ESERVER",
            "name": "ValueError",
        }
        bad_json = await c.request("fail", {"kind": "json"})
        assert bad_json["code"] == "ESERVER" and "error" in bad_json
        assert await c.request("fail", {"kind": "none"}) is None
        assert await c.request("nope") == {
            "error": 'Command "nope" not found',
            "code": "ENOTFOUND",
            "name": "CommandError",
        }
        # KeyError from a bad payload is still one response, not a crash
        broken = await c.request("sleep-echo", {})
        assert broken["code"] == "ESERVER" and broken["name"] == "KeyError"
        missing_room = await c.request("mesh/join-room", {})
        assert missing_room["code"] == "EINVAL"
        await c.close()


@importable
def make_middleware_app() -> MeshApp:
    """``app.calls``: what the middleware saw, in order."""
    app = make_app()
    app.calls = calls = []  # type: ignore[attr-defined]

    async def global_mw(ctx: Context) -> None:
        calls.append(f"global:{ctx.command}")

    async def room_mw(ctx: Context) -> None:
        calls.append("join")
        if ctx.payload.get("roomName") == "forbidden":
            raise MeshError("Not allowed here", code="EFORBIDDEN")

    app.use_middleware(global_mw)
    app.use_middleware_with_command("mesh/join-room", room_mw)
    return app


async def test_middleware_order_and_refusal(server_cls: Any) -> None:
    server = server_cls(make_middleware_app(), **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        assert (await c.request("mesh/join-room", {"roomName": "ok"}))["success"] is True
        assert await c.request("mesh/join-room", {"roomName": "forbidden"}) == {
            "error": "Not allowed here",
            "code": "EFORBIDDEN",
            "name": "Error",
        }
        assert await server.get_room_members("forbidden") == []
        assert server.app.calls == [
            "global:mesh/join-room", "join", "global:mesh/join-room", "join"
        ]  # fmt: skip
        await c.close()


async def test_pings_sent_and_pongs_tracked(server_cls: Any) -> None:
    server = server_cls(make_app(), ping_interval=0.1, latency_interval=0.05)
    async with server.listen():
        c = await WSClient.connect(server.port)
        # answering pings keeps the connection for many intervals
        await c.wait_for(
            lambda: sum(m.get("command") == "ping" for m in c.messages) >= 5, timeout=5
        )
        await c.wait_for(lambda: any(m.get("command") == "latency" for m in c.messages), timeout=5)
        latency = next(m for m in c.messages if m.get("command") == "latency")
        assert isinstance(latency["payload"], (int, float)) and 0 <= latency["payload"] < 1000
        assert all(
            "id" not in m
            for m in c.messages
            if m.get("command") in ("ping", "latency:request", "latency")
        )
        assert next(m for m in c.messages if m.get("command") == "ping")["payload"] == {}
        assert c.closed is None
        conn = server.connections.get_local_connection(c.connection_id)
        assert conn is not None and conn.latency is not None
        assert await c.request("mesh/noop") is True
        await c.close()


async def test_client_that_stops_answering_pings_is_closed_and_cleaned(server_cls: Any) -> None:
    server = server_cls(make_app(), ping_interval=0.1, latency_interval=0)
    async with server.listen():
        c = await WSClient.connect(server.port)
        await c.request("mesh/join-room", {"roomName": "lobby"})
        await c.request("mesh/set-my-connection-metadata", {"metadata": {"a": 1}})
        c.auto_pong = False
        closed = await c.wait_closed(timeout=5)
        assert closed.code == 1008
        with anyio.fail_after(5):
            while server.connections.local_connections() or await server.get_room_members("lobby"):
                await anyio.sleep(0.01)
        assert await server.connections.get_metadata(c.connection_id) is None
        await c.abort()


@importable
def make_auth_app() -> MeshApp:
    """``app.seen``: the upgrade requests authentication saw."""
    app = make_app()
    app.seen = seen = []  # type: ignore[attr-defined]

    @app.authenticate_connection
    async def auth(request: UpgradeRequest) -> Any:
        seen.append(request)
        token = request.query_param("token") or request.cookies.get("token")
        if token == "good":
            return {"userId": "user123", "via": request.path}
        if token == "teapot":
            raise Reject("I'm a teapot", status=418)
        return None

    return app


async def test_handshake_authentication(server_cls: Any) -> None:
    server = server_cls(make_auth_app(), **FAST)
    async with server.listen():
        ok = await WSClient.connect(
            server.port,
            "/ws/chat?token=good&x=1",
            headers=[(b"X-Trace", b"abc"), (b"Cookie", b"a=b")],
        )
        assert await ok.request("mesh/get-my-connection-metadata") == {
            "metadata": {"userId": "user123", "via": "/ws/chat"}
        }
        request = server.app.seen[-1]
        assert request.path == "/ws/chat" and request.query == {"token": ["good"], "x": ["1"]}
        assert request.header("x-trace") == "abc" and request.cookies == {"a": "b"}
        assert request.peer is not None and request.peer[0] == "127.0.0.1"
        by_cookie = await WSClient.connect(
            server.port, "/", headers=[(b"Cookie", b"token=good; theme=dark")]
        )
        assert (await by_cookie.request("mesh/get-my-connection-metadata"))["metadata"][
            "userId"
        ] == "user123"
        with pytest.raises(Rejected) as refused:
            await WSClient.connect(server.port, "/?token=bad")
        assert refused.value.status == 401
        with pytest.raises(Rejected) as teapot:
            await WSClient.connect(server.port, "/?token=teapot")
        assert teapot.value.status == 418 and b"teapot" in teapot.value.body
        # a refused upgrade never became a connection
        assert len(server.connections.local_connections()) == 2
        assert len(await server.connections.get_all_metadata()) == 2
        await ok.close()
        await by_cookie.close()


async def test_broadcasts(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        a, b, c = [await WSClient.connect(server.port) for _ in range(3)]
        await a.request("mesh/join-room", {"roomName": "r"})
        await b.request("mesh/join-room", {"roomName": "r"})
        await server.broadcast("hello", {"n": 1})
        for client in (a, b, c):
            assert await client.wait_push("hello") == {"command": "hello", "payload": {"n": 1}}
        await server.broadcast_room("r", "room-msg", [1, 2])
        for client in (a, b):
            assert (await client.wait_push("room-msg"))["payload"] == [1, 2]
        await server.broadcast_exclude("ex", None, [a.connection_id])
        for client in (b, c):
            assert await client.wait_push("ex") == {"command": "ex", "payload": None}
        await server.broadcast_room_exclude(
            "r", "rex", "x", server.connections.get_local_connection(b.connection_id)
        )
        assert (await a.wait_push("rex"))["payload"] == "x"
        # what the excluded ones did not get: a marker push sent after shows the order
        await server.broadcast("marker")
        for client in (a, b, c):
            await client.wait_push("marker")
        assert not any(p["command"] == "ex" for p in a.pushes)
        assert not any(p["command"] in ("room-msg", "rex") for p in c.pushes)
        assert not any(p["command"] == "rex" for p in b.pushes)
        conn = server.connections.get_local_connection(c.connection_id)
        assert conn.send("direct", {"to": "c"}) is True
        assert (await c.wait_push("direct"))["payload"] == {"to": "c"}
        for client in (a, b, c):
            await client.close()


async def test_bad_input_keeps_the_connection(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        for junk in [
            "not json",
            "[1,2]",
            "42",
            '{"payload": 1}',
            '{"command": 5, "id": 1}',
            '{"command": "x", "id": 1.5}',
            "{" * 10000,
        ]:
            await c.send_text(junk)
        await c.send_bytes(b"\xff\xfe garbage")
        # binary frames carrying JSON are decoded as UTF-8 text
        await c.send_bytes(json.dumps({"id": 77, "command": "mesh/noop", "payload": {}}).encode())
        # frames without an id are never dispatched
        await c.send_json({"command": "fail", "payload": {"kind": "value"}})
        assert await c.request("mesh/noop") is True
        assert c.responses.pop(77, None) is not None or await c.response(77) is True
        assert not any(m.get("command") == "fail" for m in c.messages)
        conn = server.connections.get_local_connection(c.connection_id)
        assert conn.proto.violations == 8
        assert c.closed is None
        await c.close()


@pytest.mark.handlers_wait
async def test_message_size_limit_closes_1009(server_cls: Any) -> None:
    server = server_cls(make_app(), max_message_size=64 * 1024, **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        # 1 KiB under the limit works
        payload = "x" * (63 * 1024)
        assert await c.request("sleep-echo", {"n": payload, "delay": 0}) == payload
        await c.send_json({"id": 1, "command": "mesh/noop", "payload": "y" * (65 * 1024)})
        closed = await c.wait_closed()
        assert closed.code == 1009
        await c.abort()


@pytest.mark.handlers_wait
async def test_one_mebibyte_payload_round_trip_by_default(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        payload = "z" * (1024 * 1024)
        assert await c.request("sleep-echo", {"n": payload, "delay": 0}, timeout=20) == payload
        await c.close()


async def test_graceful_close_sends_1001_and_cleans_store(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        clients = [await WSClient.connect(server.port) for _ in range(3)]
        for c in clients:
            await c.request("mesh/join-room", {"roomName": "lobby"})

        async def close_server() -> None:
            await server.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(close_server)
            for c in clients:
                tg.start_soon(c.wait_closed)
        for c in clients:
            assert c.closed is not None and c.closed.code == 1001
        assert server.connections.local_connections() == []
        assert await server.storage.execute(ops.GetAllConnectionIds()) == []
        for c in clients:
            await c.abort()


@pytest.mark.own_framing
async def test_invalid_utf8_text_frame_closes_1007(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        payload = b'{"command":"\xff"}'
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await c.stream.send(bytes((0x81, 0x80 | len(payload))) + mask + masked)
        closed = await c.wait_closed()
        assert closed.code == 1007
        with anyio.fail_after(5):
            while server.connections.local_connections():
                await anyio.sleep(0.01)
        await c.abort()


async def test_a_connection_arriving_during_shutdown_does_not_crash_the_server(
    server_cls: Any,
) -> None:
    for _ in range(40):
        server = server_cls(make_app(), **FAST, shutdown_timeout=0.1, close_timeout=0.1)
        async with server.listen():
            await anyio.sleep(0.005)  # the server waits for connections
            client = socket.socket()
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", server.port))
            # leaving the block closes the server while the connection is pending
        client.close()

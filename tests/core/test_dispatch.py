"""Command routing and the server API through ``ServerCore``, with no sockets.

A fake-clock subclass collects what the core would spawn; a real
``ServerConnection`` in the OPEN state is wrapped in a ``Connection`` and its
output is parsed by a wsproto client.
"""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request, TextMessage

import mesh_core
from mesh_core import (
    UNCHANGED,
    Connection,
    Context,
    MemoryStore,
    MeshApp,
    MeshError,
    ServerCore,
    UnknownConnection,
    ValidationError,
)
from mesh_core.protocol import (
    ConnectionLost,
    HandshakeReceived,
    RequestReceived,
    ServerConnection,
    State,
)
from mesh_core.runtime import CollectingTaskGroup, Runtime
from mesh_core.storage import _ops as ops

pytestmark = pytest.mark.anyio


class FakeRuntime:
    """The one runtime service the core uses outside serving(): a clock,
    here one the test sets."""

    name = "fake"

    def __init__(self) -> None:
        self.clock = 1000.0

    def now(self) -> float:
        return self.clock


class FakeServer(ServerCore):
    def __init__(self, app: MeshApp, **kwargs: Any) -> None:
        self.fake_runtime = FakeRuntime()
        super().__init__(
            app,
            ping_interval=0,
            latency_interval=0,
            runtime=cast(Runtime, self.fake_runtime),
            **kwargs,
        )
        self._group = group = CollectingTaskGroup()
        self.spawned = group.started

    async def run_spawned(self) -> None:
        while self.spawned:
            await self.spawned.pop(0)


class Client:
    """A wsproto client reading one server-side connection's output."""

    def __init__(self, server: FakeServer, proto: ServerConnection, conn: Connection) -> None:
        self.server = server
        self.proto = proto
        self.conn = conn
        self.ws = WSConnection(ConnectionType.CLIENT)

    def frames(self) -> list[Any]:
        self.ws.receive_data(self.proto.data_to_send())
        out = []
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                assert event.message_finished
                out.append(json.loads(event.data))
        return out

    async def request(self, command: str, payload: Any = None, rid: int = 1) -> Any:
        """Dispatch one request; return the payload of its single response."""
        now = self.server.runtime.now()
        await self.server._handle_request(self.conn, RequestReceived(rid, command, payload, now))
        frames = self.frames()
        assert len(frames) == 1, frames
        assert frames[0]["id"] == rid
        assert frames[0]["command"] == command
        assert set(frames[0]) == {"id", "command", "payload"}
        return frames[0]["payload"]


async def connect(server: FakeServer, cid: str = "conn-1", metadata: Any = None) -> Client:
    proto = ServerConnection(server.options)
    client_ws = WSConnection(ConnectionType.CLIENT)
    proto.receive_data(client_ws.send(Request(host="localhost", target="/")), server.runtime.now())
    (event,) = proto.events()
    assert isinstance(event, HandshakeReceived)
    proto.accept(cid)
    conn = Connection(server, proto, event.request)
    server._local[cid] = conn
    await server.execute(ops.RegisterConnection(cid, server.instance_id, metadata))
    conn._phase = "open"
    proto.opened(server.runtime.now())
    assert proto.state is State.OPEN
    client = Client(server, proto, conn)
    client.ws = client_ws
    assert client.frames() == [{"command": "mesh/assign-id", "payload": cid}]
    return client


def make(app: MeshApp | None = None) -> FakeServer:
    return FakeServer(app or MeshApp(), storage=MemoryStore(), instance_id="inst-test")


# -- routing and middleware -----------------------------------------------------


async def test_middleware_order_global_then_command_then_handler() -> None:
    app = MeshApp()
    log: list[str] = []

    async def g1(ctx: Context) -> None:
        log.append("g1")
        ctx.state["seen"] = ["g1"]

    async def g2(ctx: Context) -> None:
        log.append("g2")
        ctx.state["seen"].append("g2")

    async def c1(ctx: Context) -> None:
        log.append("c1")
        ctx.state["seen"].append("c1")

    async def c2(ctx: Context) -> None:
        log.append("c2")

    async def handler(ctx: Context) -> Any:
        log.append("h")
        return {
            "seen": ctx.state["seen"],
            "command": ctx.command,
            "payload": ctx.payload,
            "id": ctx.id,
            "conn": ctx.connection.id,
            "same_server": ctx.server is server,
        }

    app.use_middleware(g1, g2)
    app.expose_command("echo", handler, [c1])
    app.use_middleware_with_command("echo", c2)
    server = make(app)
    client = await connect(server)
    result = await client.request("echo", {"x": [1]}, rid=42)
    assert log == ["g1", "g2", "c1", "c2", "h"]
    assert result == {
        "seen": ["g1", "g2", "c1"],
        "command": "echo",
        "payload": {"x": [1]},
        "id": 42,
        "conn": "conn-1",
        "same_server": True,
    }


async def test_command_middleware_only_runs_for_its_command() -> None:
    app = MeshApp()
    log: list[str] = []

    @app.middleware("a")
    async def only_a(ctx: Context) -> None:
        log.append("mw-a")

    @app.command("a")
    async def a(ctx: Context) -> Any:
        return "A"

    @app.command("b")
    async def b(ctx: Context) -> Any:
        return "B"

    client = await connect(make(app))
    assert await client.request("b") == "B"
    assert log == []
    assert await client.request("a") == "A"
    assert log == ["mw-a"]


async def test_middleware_runs_for_builtins() -> None:
    app = MeshApp()
    log: list[str] = []

    @app.middleware()
    async def everywhere(ctx: Context) -> None:
        log.append(f"g:{ctx.command}")

    @app.middleware("mesh/noop")
    async def on_noop(ctx: Context) -> None:
        log.append("noop-mw")

    client = await connect(make(app))
    assert await client.request("mesh/noop", {}) is True
    assert log == ["g:mesh/noop", "noop-mw"]


async def test_middleware_raising_refuses_and_skips_handler() -> None:
    app = MeshApp()
    ran: list[str] = []

    async def guard(ctx: Context) -> None:
        raise MeshError("not allowed", code="EFORBIDDEN")

    async def handler(ctx: Context) -> Any:
        ran.append("h")
        return "nope"

    app.expose_command("secret", handler, [guard])
    client = await connect(make(app))
    assert await client.request("secret") == {
        "error": "not allowed",
        "code": "EFORBIDDEN",
        "name": "Error",
    }
    assert ran == []


async def test_global_middleware_raising_plain_exception() -> None:
    app = MeshApp()
    ran: list[str] = []

    @app.middleware()
    async def broken(ctx: Context) -> None:
        raise RuntimeError("boom")

    @app.command("x")
    async def x(ctx: Context) -> Any:
        ran.append("x")

    client = await connect(make(app))
    assert await client.request("x") == {"error": "boom", "code": "ESERVER", "name": "RuntimeError"}
    assert await client.request("mesh/noop") == {
        "error": "boom",
        "code": "ESERVER",
        "name": "RuntimeError",
    }
    assert ran == []


async def test_handler_mesh_error_payload() -> None:
    app = MeshApp()

    @app.command("fail")
    async def fail(ctx: Context) -> Any:
        raise MeshError("x", code="EFOO")

    client = await connect(make(app))
    assert await client.request("fail") == {"error": "x", "code": "EFOO", "name": "Error"}


async def test_mesh_error_wire_name_is_error_and_subclasses_keep_theirs() -> None:
    """A plain MeshError is named "Error" on the wire, as the reference names a
    plain application error; a subclass is named after itself."""

    class PermissionDenied(MeshError):
        code = "EPERM"

    app = MeshApp()

    @app.command("plain")
    async def plain(ctx: Context) -> Any:
        raise MeshError("Insufficient permissions")

    @app.command("sub")
    async def sub(ctx: Context) -> Any:
        raise PermissionDenied("no")

    @app.command("invalid")
    async def invalid(ctx: Context) -> Any:
        raise ValidationError("bad")

    client = await connect(make(app))
    assert await client.request("plain") == {
        "error": "Insufficient permissions",
        "code": "ESERVER",
        "name": "Error",
    }
    assert await client.request("sub") == {
        "error": "no",
        "code": "EPERM",
        "name": "PermissionDenied",
    }
    assert (await client.request("invalid"))["name"] == "ValidationError"
    assert MeshError("x", name="Custom").name == "Custom"


async def test_handler_mesh_error_with_custom_name() -> None:
    app = MeshApp()

    @app.command("fail")
    async def fail(ctx: Context) -> Any:
        raise MeshError("nope", code="EAUTH", name="AuthError")

    client = await connect(make(app))
    assert await client.request("fail") == {"error": "nope", "code": "EAUTH", "name": "AuthError"}


async def test_handler_command_error_default_code() -> None:
    app = MeshApp()

    @app.command("fail")
    async def fail(ctx: Context) -> Any:
        raise mesh_core.CommandError("bad")

    client = await connect(make(app))
    assert await client.request("fail") == {
        "error": "bad",
        "code": "ECOMMAND",
        "name": "CommandError",
    }


async def test_handler_value_error_payload() -> None:
    app = MeshApp()

    @app.command("fail")
    async def fail(ctx: Context) -> Any:
        raise ValueError("bad value")

    client = await connect(make(app))
    assert await client.request("fail") == {
        "error": "bad value",
        "code": "ESERVER",
        "name": "ValueError",
    }


async def test_exception_with_code_attribute() -> None:
    class Coded(Exception):
        code = "ECUSTOM"

    app = MeshApp()

    @app.command("fail")
    async def fail(ctx: Context) -> Any:
        raise Coded("c")

    client = await connect(make(app))
    assert await client.request("fail") == {"error": "c", "code": "ECUSTOM", "name": "Coded"}


async def test_unknown_command() -> None:
    client = await connect(make())
    assert await client.request("nope", {}) == {
        "error": 'Command "nope" not found',
        "code": "ENOTFOUND",
        "name": "CommandError",
    }


async def test_unknown_mesh_command() -> None:
    client = await connect(make())
    assert await client.request("mesh/not-a-builtin") == {
        "error": 'Command "mesh/not-a-builtin" not found',
        "code": "ENOTFOUND",
        "name": "CommandError",
    }


async def test_handler_returning_none_answers_null() -> None:
    app = MeshApp()

    @app.command("nothing")
    async def nothing(ctx: Context) -> None:
        return None

    client = await connect(make(app))
    await client.server._handle_request(client.conn, RequestReceived(9, "nothing", {}))
    data = client.proto.data_to_send()
    assert data.endswith(b'{"id":9,"command":"nothing","payload":null}')


@pytest.mark.parametrize(
    "value",
    [object(), {"k": object()}, [1, object()], "\ud800"],
    ids=["obj", "nested", "list", "surrogate"],
)
async def test_handler_returning_non_json_answers_one_error(value: Any) -> None:
    app = MeshApp()

    @app.command("weird")
    async def weird(ctx: Context) -> Any:
        return value

    client = await connect(make(app))
    payload = await client.request("weird")
    assert set(payload) == {"error", "code", "name"}
    assert payload["code"] == "ESERVER"
    assert payload["name"] == "EncodeError"
    assert payload["error"].startswith("response is not JSON-serialisable")
    assert client.proto.state is State.OPEN


async def test_handler_returning_cyclic_value_answers_one_error() -> None:
    app = MeshApp()
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic

    @app.command("cyclic")
    async def handler(ctx: Context) -> Any:
        return cyclic

    client = await connect(make(app))
    payload = await client.request("cyclic")
    assert payload["code"] == "ESERVER"


async def test_builtin_validation_error_payload() -> None:
    client = await connect(make())
    assert await client.request("mesh/join-room", {}) == {
        "error": "payload.roomName must be a non-empty string",
        "code": "EINVAL",
        "name": "ValidationError",
    }


async def test_builtins_through_dispatch() -> None:
    server = make()
    alice = await connect(server, "conn-a", {"name": "alice"})
    bob = await connect(server, "conn-b", {"name": "bob"})
    assert await alice.request("mesh/join-room", {"roomName": "r"}) == {
        "success": True,
        "present": [{"id": "conn-a", "metadata": {"name": "alice"}}],
    }
    assert await bob.request("mesh/join-room", {"roomName": "r"}) == {
        "success": True,
        "present": [
            {"id": "conn-a", "metadata": {"name": "alice"}},
            {"id": "conn-b", "metadata": {"name": "bob"}},
        ],
    }
    assert await bob.request("mesh/get-connection-metadata", {"connectionId": "conn-a"}) == {
        "metadata": {"name": "alice"}
    }
    assert await alice.request(
        "mesh/set-my-connection-metadata",
        {"metadata": {"status": "busy"}, "options": {"strategy": "merge"}},
    ) == {"success": True}
    assert await alice.request("mesh/get-my-connection-metadata", {}) == {
        "metadata": {"name": "alice", "status": "busy"}
    }
    assert await alice.request("mesh/leave-room", {"roomName": "r"}) == {"success": True}
    assert await server.rooms.get_room_members("r") == ["conn-b"]


async def test_bad_strategy_through_dispatch() -> None:
    client = await connect(make(), metadata={"a": 1})
    payload = await client.request(
        "mesh/set-my-connection-metadata", {"metadata": {}, "options": {"strategy": "nope"}}
    )
    assert payload["code"] == "EINVAL"
    assert payload["name"] == "ValidationError"
    assert await client.conn.get_metadata() == {"a": 1}


async def test_handle_events_spawns_request_handling() -> None:
    app = MeshApp()

    @app.command("double")
    async def double(ctx: Context) -> Any:
        return ctx.payload * 2

    server = make(app)
    client = await connect(server)
    server.handle_events(client.proto, [RequestReceived(1, "double", 21)])
    assert len(server.spawned) == 1
    assert client.frames() == []
    await server.run_spawned()
    assert client.frames() == [{"id": 1, "command": "double", "payload": 42}]


async def test_requests_answered_in_completion_order() -> None:
    app = MeshApp()

    @app.command("echo")
    async def echo(ctx: Context) -> Any:
        return ctx.payload

    server = make(app)
    client = await connect(server)
    server.handle_events(
        client.proto,
        [RequestReceived(i, "echo", i) for i in (3, 1, 2)],
    )
    assert len(server.spawned) == 3
    # run them in reverse order of arrival: each gets its own id back
    for coro in reversed(server.spawned):
        await coro
    server.spawned.clear()
    assert client.frames() == [
        {"id": 2, "command": "echo", "payload": 2},
        {"id": 1, "command": "echo", "payload": 1},
        {"id": 3, "command": "echo", "payload": 3},
    ]


async def test_response_to_a_closed_connection_is_dropped() -> None:
    app = MeshApp()

    @app.command("x")
    async def x(ctx: Context) -> Any:
        ctx.connection.close()
        return 1

    client = await connect(make(app))
    await client.server._handle_request(client.conn, RequestReceived(1, "x", None))
    assert client.proto.state is State.CLOSING
    assert client.frames() == []  # the close frame only, no response after it


# -- client metadata write policy -----------------------------------------------


async def test_client_writes_denied() -> None:
    app = MeshApp(client_metadata_writes="deny")
    client = await connect(make(app), metadata={"role": "user"})
    assert await client.request(
        "mesh/set-my-connection-metadata", {"metadata": {"role": "admin"}}
    ) == {"success": False}
    assert await client.conn.get_metadata() == {"role": "user"}
    # the server itself can still write
    await client.conn.set_metadata({"role": "mod"})
    assert await client.conn.get_metadata() == {"role": "mod"}


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_client_write_guard(is_async: bool) -> None:
    calls: list[tuple[Any, Any, str]] = []

    def decide(connection: Connection, value: Any, strategy: str) -> bool:
        calls.append((connection, value, strategy))
        return isinstance(value, dict) and "role" not in value

    async def decide_async(connection: Connection, value: Any, strategy: str) -> bool:
        return decide(connection, value, strategy)

    app = MeshApp(client_metadata_writes=decide_async if is_async else decide)
    client = await connect(make(app), metadata={"role": "user"})
    assert await client.request(
        "mesh/set-my-connection-metadata",
        {"metadata": {"role": "admin"}, "options": {"strategy": "merge"}},
    ) == {"success": False}
    assert await client.conn.get_metadata() == {"role": "user"}
    assert await client.request(
        "mesh/set-my-connection-metadata",
        {"metadata": {"status": "away"}, "options": {"strategy": "deepMerge"}},
    ) == {"success": True}
    assert await client.conn.get_metadata() == {"role": "user", "status": "away"}
    assert calls == [
        (client.conn, {"role": "admin"}, "merge"),
        (client.conn, {"status": "away"}, "deepMerge"),
    ]


async def test_client_write_guard_raising_is_an_error_payload() -> None:
    def guard(connection: Connection, value: Any, strategy: str) -> bool:
        raise MeshError("guard says no", code="EGUARD")

    client = await connect(make(MeshApp(client_metadata_writes=guard)), metadata={"a": 1})
    assert await client.request("mesh/set-my-connection-metadata", {"metadata": {"a": 2}}) == {
        "error": "guard says no",
        "code": "EGUARD",
        "name": "Error",
    }
    assert await client.conn.get_metadata() == {"a": 1}


# -- the connections API --------------------------------------------------------


async def test_update_metadata_with_a_function() -> None:
    server = make()
    client = await connect(server, metadata={"n": 1})
    seen: list[Any] = []

    def bump(old: Any) -> Any:
        seen.append(old)
        return {**old, "n": old["n"] + 1}

    assert await server.connections.update_metadata(client.conn, bump) == {"n": 2}
    assert await server.connections.update_metadata("conn-1", bump) == {"n": 3}
    assert seen == [{"n": 1}, {"n": 2}]
    assert await server.connections.get_metadata("conn-1") == {"n": 3}


async def test_update_metadata_unchanged() -> None:
    server = make()
    client = await connect(server, metadata={"n": 1})
    assert await server.connections.update_metadata(client.conn, lambda old: UNCHANGED) == {"n": 1}
    assert await server.connections.get_metadata(client.conn) == {"n": 1}


async def test_update_metadata_from_none() -> None:
    server = make()
    client = await connect(server)
    assert await server.connections.update_metadata(client.conn, lambda old: {"was": old}) == {
        "was": None
    }


async def test_set_metadata_strategies_via_api() -> None:
    server = make()
    client = await connect(server, metadata={"a": {"x": 1}, "b": 1})
    assert await client.conn.set_metadata({"a": {"y": 2}}, strategy="deepMerge") == {
        "a": {"x": 1, "y": 2},
        "b": 1,
    }
    assert await server.connections.set_metadata(client.conn, {"a": 0}, strategy="merge") == {
        "a": 0,
        "b": 1,
    }
    assert await server.connections.set_metadata("conn-1", [1]) == [1]
    with pytest.raises(mesh_core.ValidationError):
        await server.connections.set_metadata("conn-1", {}, strategy="bogus")
    assert await server.connections.get_metadata("conn-1") == [1]


async def test_set_metadata_of_unknown_connection_raises() -> None:
    server = make()
    with pytest.raises(UnknownConnection):
        await server.connections.set_metadata("ghost", {"a": 1})
    assert await server.connections.get_metadata("ghost") is None


async def test_unknown_connection_from_a_handler_is_an_error_payload() -> None:
    app = MeshApp()

    @app.command("poke")
    async def poke(ctx: Context) -> Any:
        await ctx.server.connections.set_metadata("ghost", 1)

    client = await connect(make(app))
    assert await client.request("poke") == {
        "error": "Connection 'ghost' is not connected",
        "code": "ENOCONN",
        "name": "UnknownConnection",
    }


async def test_all_connection_metadata() -> None:
    server = make()
    await connect(server, "c1", {"n": 1})
    await connect(server, "c2")
    assert await server.connections.get_all_metadata() == [
        {"id": "c1", "metadata": {"n": 1}},
        {"id": "c2", "metadata": None},
    ]
    assert [c.id for c in server.connections.local_connections()] == ["c1", "c2"]
    assert server.connections.get_local_connection("c2") is server._local["c2"]
    assert server.connections.get_local_connection("nope") is None


# -- the rooms API --------------------------------------------------------------


async def test_clear_room_keeps_metadata() -> None:
    server = make()
    a = await connect(server, "a")
    await connect(server, "b")
    await server.rooms.add_to_room("r", a.conn)
    await server.add_to_room("r", "b")
    await server.rooms.set_metadata("r", {"topic": "t"})
    assert sorted(await server.clear_room("r")) == ["a", "b"]
    assert await server.get_room_members("r") == []
    assert await server.rooms.get_connection_rooms("a") == []
    assert await server.rooms.get_metadata("r") == {"topic": "t"}
    assert await server.get_all_rooms() == []
    assert await server.rooms.get_all_metadata() == [{"id": "r", "metadata": {"topic": "t"}}]


async def test_delete_room_drops_metadata() -> None:
    server = make()
    a = await connect(server, "a")
    await server.rooms.add_to_room("r", a.conn)
    await server.rooms.set_metadata("r", {"topic": "t"})
    assert await server.delete_room("r") == ["a"]
    assert await server.rooms.get_metadata("r") is None
    assert await server.rooms.get_all_metadata() == []
    assert await server.is_in_room("r", "a") is False


async def test_delete_metadata_keeps_members() -> None:
    server = make()
    a = await connect(server, "a")
    await server.rooms.add_to_room("r", a.conn)
    await server.rooms.set_metadata("r", 5)
    assert await server.rooms.delete_metadata("r") is True
    assert await server.rooms.delete_metadata("r") is False
    assert await server.rooms.get_metadata("r") is None
    assert await server.rooms.get_room_members("r") == ["a"]


async def test_room_metadata_none_is_stored_as_null() -> None:
    server = make()
    assert await server.rooms.set_metadata("r", None) is None
    assert await server.rooms.get_metadata("r") is None
    assert await server.rooms.get_all_metadata() == [{"id": "r", "metadata": None}]
    assert await server.rooms.delete_metadata("r") is True
    assert await server.rooms.get_all_metadata() == []


async def test_room_metadata_strategies_and_update() -> None:
    server = make()
    await server.rooms.set_metadata("r", {"a": {"x": 1}})
    assert await server.rooms.set_metadata("r", {"a": {"y": 2}}, strategy="deepMerge") == {
        "a": {"x": 1, "y": 2}
    }
    assert await server.rooms.update_metadata("r", lambda old: UNCHANGED) == {"a": {"x": 1, "y": 2}}
    assert await server.rooms.update_metadata("r", lambda old: len(old["a"])) == 2
    assert await server.rooms.get_metadata("r") == 2


async def test_room_membership_api() -> None:
    server = make()
    a = await connect(server, "a", {"n": "A"})
    await connect(server, "b")
    assert await server.add_to_room("r", a.conn) is True
    assert await server.add_to_room("r", a.conn) is False
    assert await server.add_to_room("r", "b") is True
    assert await server.rooms.is_in_room("r", "b") is True
    assert await server.connections.get_all_metadata_for_room("r") == [
        {"id": "a", "metadata": {"n": "A"}},
        {"id": "b", "metadata": None},
    ]
    assert await server.remove_from_room("r", "b") is True
    assert await server.remove_from_room("r", "b") is False
    assert await server.rooms.get_all_rooms() == ["r"]
    with pytest.raises(TypeError):
        await server.rooms.add_to_room("r", 5)  # type: ignore[arg-type]


# -- broadcasts -----------------------------------------------------------------


async def test_broadcast_room_exclude() -> None:
    server = make()
    a = await connect(server, "a")
    b = await connect(server, "b")
    c = await connect(server, "c")
    for client in (a, b):
        await server.add_to_room("r", client.conn)
    await server.broadcast_room_exclude("r", "news", {"n": 1}, a.conn)
    assert a.frames() == []
    assert b.frames() == [{"command": "news", "payload": {"n": 1}}]
    assert c.frames() == []
    await server.broadcast("all", None)
    for client in (a, b, c):
        assert client.frames() == [{"command": "all", "payload": None}]


async def test_broadcast_reaches_another_instance_on_the_same_store() -> None:
    store = MemoryStore()
    one = FakeServer(MeshApp(), storage=store, instance_id="one")
    two = FakeServer(MeshApp(), storage=store, instance_id="two")
    await one.start_storage()
    await two.start_storage()
    a = await connect(one, "a")
    b = await connect(two, "b")
    await one.add_to_room("r", "a")
    await two.add_to_room("r", "b")
    await one.broadcast_room("r", "hello", [1])
    assert a.frames() == [{"command": "hello", "payload": [1]}]
    assert b.frames() == [{"command": "hello", "payload": [1]}]
    await one.stop_storage()
    await two.stop_storage()


# -- the connection lifecycle ---------------------------------------------------


def upgrade(server: FakeServer, target: str = "/") -> tuple[ServerConnection, WSConnection]:
    """A protocol object that has just received an upgrade request; the
    server's handshake task is spawned (not yet run)."""
    proto = ServerConnection(server.options)
    ws = WSConnection(ConnectionType.CLIENT)
    proto.receive_data(ws.send(Request(host="localhost", target=target)), server.runtime.now())
    server.handle_events(proto, proto.events())
    assert len(server.spawned) == 1
    return proto, ws


def client_frames(proto: ServerConnection, ws: WSConnection) -> list[Any]:
    ws.receive_data(proto.data_to_send())
    return [json.loads(e.data) for e in ws.events() if isinstance(e, TextMessage)]


async def test_handshake_authenticates_registers_and_assigns_id() -> None:
    app = MeshApp()
    order: list[str] = []

    @app.authenticate_connection
    async def auth(request: mesh_core.UpgradeRequest) -> Any:
        order.append("auth")
        return {"user": request.query_param("user")}

    @app.on_connection
    async def hello(connection: Connection) -> None:
        order.append("hook")
        # registered, with the authentication data as metadata, before assign-id
        assert await connection.get_metadata() == {"user": "ann"}
        assert connection.proto.state is State.OPENING

    server = make(app)
    proto, ws = upgrade(server, "/?user=ann")
    await server.run_spawned()
    assert order == ["auth", "hook"]
    assert proto.state is State.OPEN
    assert proto.id is not None
    assert proto.id.startswith("conn-")
    assert list(server._local) == [proto.id]
    assert client_frames(proto, ws) == [{"command": "mesh/assign-id", "payload": proto.id}]
    assert await server.connections.get_all_metadata() == [
        {"id": proto.id, "metadata": {"user": "ann"}}
    ]


@pytest.mark.parametrize(
    ("outcome", "status"),
    [("reject", 403), ("falsy", 401), ("crash", 500)],
)
async def test_handshake_refused(outcome: str, status: int) -> None:
    app = MeshApp()

    @app.authenticate_connection
    async def auth(request: mesh_core.UpgradeRequest) -> Any:
        if outcome == "reject":
            raise mesh_core.Reject("go away", status=403)
        if outcome == "crash":
            raise RuntimeError("bug in auth")
        return None

    server = make(app)
    proto, ws = upgrade(server)
    await server.run_spawned()
    assert proto.state is State.CLOSED
    assert server._local == {}
    assert await server.connections.get_all_metadata() == []
    ws.receive_data(proto.data_to_send())
    events = list(ws.events())
    assert [getattr(e, "status_code", None) for e in events[:1]] == [status]


async def test_connection_lost_runs_disconnection_hooks_then_cleans_up() -> None:
    app = MeshApp()
    seen: list[Any] = []

    @app.on_disconnection
    async def bye(connection: Connection) -> None:
        # the hook still sees the metadata and the rooms
        seen.append(await connection.get_metadata())
        seen.append(await connection.server.rooms.get_connection_rooms(connection))

    server = make(app)
    client = await connect(server, "c1", {"n": 1})
    await server.add_to_room("r", "c1")
    client.proto.receive_data(None, server.runtime.now())
    server.handle_events(client.proto, client.proto.events())
    assert client.conn.is_open is False
    assert len(server.spawned) == 1
    await server.run_spawned()
    assert seen == [{"n": 1}, ["r"]]
    assert server._local == {}
    assert await server.connections.get_all_metadata() == []
    assert await server.get_all_rooms() == []
    # a second loss report changes nothing
    server.handle_events(client.proto, [ConnectionLost(1006, "again")])
    assert server.spawned == []


# -- built-ins answered inline ------------------------------------------------------


async def test_builtins_on_the_memory_store_are_answered_without_a_task() -> None:
    server = make()
    client = await connect(server)
    server.handle_events(client.proto, [RequestReceived(7, "mesh/noop", {})])
    server.handle_events(client.proto, [RequestReceived(8, "mesh/join-room", {"roomName": "r"})])
    assert server.spawned == []
    frames = client.frames()
    assert [(f["id"], f["payload"]) for f in frames] == [
        (7, True),
        (8, {"success": True, "present": [{"id": "conn-1", "metadata": None}]}),
    ]
    assert server._inflight == 0


async def test_application_code_on_the_path_means_a_task() -> None:
    app = MeshApp()
    seen: list[str] = []

    async def mw(ctx: Context) -> None:
        seen.append(ctx.command)

    app.use_middleware_with_command("mesh/noop", mw)

    async def guard(connection: Connection, value: Any, strategy: str) -> bool:
        return True

    app.client_metadata_writes = guard
    server = make(app)
    client = await connect(server)
    server.handle_events(client.proto, [RequestReceived(1, "mesh/noop", {})])
    server.handle_events(
        client.proto,
        [RequestReceived(2, "mesh/set-my-connection-metadata", {"metadata": {"a": 1}})],
    )
    server.handle_events(client.proto, [RequestReceived(3, "mesh/get-room-metadata", {})])
    assert len(server.spawned) == 2  # noop (middleware) and the guarded write
    frames = client.frames()
    assert [f["id"] for f in frames] == [3]  # no application code: inline
    await server.run_spawned()
    assert sorted(f["id"] for f in client.frames()) == [1, 2]
    assert seen == ["mesh/noop"]


class _OtherStore(MemoryStore):
    """Any store but the in-memory one: its operations may wait."""

    answers_inline = False


async def test_on_other_stores_only_builtins_without_storage_are_inline() -> None:
    server = FakeServer(MeshApp(), storage=_OtherStore(), instance_id="inst-test")
    client = await connect(server)
    server.handle_events(client.proto, [RequestReceived(1, "mesh/noop", {})])
    server.handle_events(client.proto, [RequestReceived(2, "mesh/get-room-metadata", {})])
    assert [(f["id"], f["payload"]) for f in client.frames()] == [(1, True)]
    assert len(server.spawned) == 1  # the read waits on the store: a task
    await server.run_spawned()
    assert [f["id"] for f in client.frames()] == [2]


def test_storeless_builtins_yield_no_operation() -> None:
    from mesh_core.app import BUILTINS

    for name in [name for name, builtin in BUILTINS.items() if builtin.storeless]:
        with pytest.raises(StopIteration):
            next(BUILTINS[name]("conn-1", {}))


# -- counters -------------------------------------------------------------------


async def test_counters_are_one_table_summed_at_snapshot() -> None:
    app = MeshApp()

    @app.command("fail")
    async def fail(ctx: Context) -> Any:
        raise MeshError("no", code="ECUSTOM")

    @app.command("slow")
    async def slow(ctx: Context) -> Any:
        server.fake_runtime.clock += 0.03  # the handler takes 30 ms
        return 1

    server = make(app)
    client = await connect(server)
    await client.request("mesh/join-room", {"roomName": "r"})
    await client.request("fail")
    await client.request("fail")
    await client.request("nope")
    # the latency counts from the read that brought the request in
    client.proto.receive_data(
        client.ws.send(TextMessage(json.dumps({"id": 9, "command": "slow"}))), 1000.0
    )
    (request,) = client.proto.events()
    assert isinstance(request, RequestReceived) and request.received_at == 1000.0
    server.fake_runtime.clock = 1000.02  # it waited 20 ms before its handling began
    await server._handle_request(client.conn, request)
    metrics = server.metrics()
    assert metrics["commands"] == {
        "mesh/join-room": {"ok": 1},
        "fail": {"ECUSTOM": 2},
        "(unknown)": {"ENOTFOUND": 1},
        "slow": {"ok": 1},
    }
    assert metrics["requests_by_command"] == {
        "mesh/join-room": 1,
        "fail": 2,
        "(unknown)": 1,
        "slow": 1,
    }
    assert metrics["requests_total"] == 5
    assert metrics["errors_by_code"] == {"ECUSTOM": 2, "ENOTFOUND": 1}
    assert metrics["latency_sum"] == pytest.approx(0.05)
    bucket = mesh_core._metrics.LATENCY_BUCKETS.index(0.05)
    assert metrics["latency_counts"][bucket] == 1
    assert metrics["store_operations_by_op"] == {
        "RegisterConnection": 1,
        "AddToRoom": 1,
        "GetRoomMembersMetadata": 1,  # what join-room answers with
    }
    assert metrics["store_errors_by_op"] == {}


def test_past_the_label_cap_errors_stay_errors() -> None:
    from mesh_core._metrics import MAX_LABELS, OTHER, Metrics

    metrics = Metrics()
    for i in range(MAX_LABELS):
        metrics.answered(f"c{i}", "ok", 0.0)
        metrics.answered(f"c{i}", "EFULL", 0.0)
    metrics.answered("late", "ok", 0.0)
    metrics.answered("late", "ELATE", 0.0)
    metrics.answered("later", "ELATER", 0.0)
    snapshot = metrics.snapshot(0, 0)
    assert snapshot["requests_by_command"][OTHER] == 3
    assert snapshot["requests_total"] == 2 * MAX_LABELS + 3
    assert snapshot["errors_by_code"] == {"EFULL": MAX_LABELS, OTHER: 2}
    assert snapshot["commands"][OTHER] == {"ok": 1, OTHER: 2}
    assert snapshot["commands"]["c0"] == {"ok": 1, "EFULL": 1}
    assert snapshot["latency_counts"][0] == 2 * MAX_LABELS + 3  # 0 s: the first bucket

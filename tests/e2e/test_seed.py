"""The seed document's examples, end to end over real sockets, both runtimes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from mesh_core import MeshApp
from tests.helpers.wsclient import WSClient

pytestmark = pytest.mark.anyio

FAST = {"ping_interval": 0, "latency_interval": 0}


def make_app() -> MeshApp:
    app = MeshApp()

    @app.command("whoami")
    async def whoami(ctx: Any) -> Any:
        return ctx.connection.id

    return app


async def test_set_and_get_connection_metadata_with_strategies(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        client = await WSClient.connect(server.port)
        conn = server.connections.get_local_connection(client.connection_id)
        assert conn is not None
        connections = server.connections
        await connections.set_metadata(conn, {"userId": "user123", "role": "admin", "at": 1})
        assert await connections.get_metadata(conn) == {
            "userId": "user123",
            "role": "admin",
            "at": 1,
        }
        # by id as well as by Connection object
        assert await connections.get_metadata(conn.id) == {
            "userId": "user123",
            "role": "admin",
            "at": 1,
        }
        # replace (default)
        await connections.set_metadata(
            conn, {"userId": "u2", "prefs": {"theme": "dark", "lang": "en"}}
        )
        assert await connections.get_metadata(conn) == {
            "userId": "u2",
            "prefs": {"theme": "dark", "lang": "en"},
        }
        # merge: top-level keys of new win, nested objects replaced
        await connections.set_metadata(
            conn, {"prefs": {"theme": "light"}, "x": 1}, strategy="merge"
        )
        assert await connections.get_metadata(conn) == {
            "userId": "u2",
            "prefs": {"theme": "light"},
            "x": 1,
        }
        # deepMerge: nested objects merged, arrays replaced
        await connections.set_metadata(
            conn, {"prefs": {"lang": "fr"}, "tags": [1]}, strategy="merge"
        )
        await connections.set_metadata(
            conn, {"prefs": {"theme": "dark"}, "tags": [2, 3]}, strategy="deepMerge"
        )
        assert await connections.get_metadata(conn) == {
            "userId": "u2",
            "prefs": {"lang": "fr", "theme": "dark"},
            "x": 1,
            "tags": [2, 3],
        }
        # what the client sees of itself is the same value
        assert (await client.request("mesh/get-my-connection-metadata"))["metadata"] == (
            await connections.get_metadata(conn)
        )
        await client.close()


async def test_all_connections_and_room_members_metadata(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        alice = await WSClient.connect(server.port)
        bob = await WSClient.connect(server.port)
        carol = await WSClient.connect(server.port)
        api = server.connections
        await api.set_metadata(alice.connection_id, {"userId": "user123", "username": "Alice"})
        await api.set_metadata(bob.connection_id, {"userId": "user456", "username": "Bob"})
        await api.set_metadata(carol.connection_id, {"userId": "user789", "username": "Carol"})
        everyone = await api.get_all_metadata()
        expected: list[dict[str, Any]] = [
            {"id": alice.connection_id, "metadata": {"userId": "user123", "username": "Alice"}},
            {"id": bob.connection_id, "metadata": {"userId": "user456", "username": "Bob"}},
            {"id": carol.connection_id, "metadata": {"userId": "user789", "username": "Carol"}},
        ]
        assert sorted(everyone, key=lambda row: row["id"]) == sorted(
            expected, key=lambda row: row["id"]
        )
        await alice.request("mesh/join-room", {"roomName": "lobby"})
        await bob.request("mesh/join-room", {"roomName": "lobby"})
        in_lobby = await api.get_all_metadata_for_room("lobby")
        assert sorted(in_lobby, key=lambda row: row["metadata"]["username"]) == [
            {"id": alice.connection_id, "metadata": {"userId": "user123", "username": "Alice"}},
            {"id": bob.connection_id, "metadata": {"userId": "user456", "username": "Bob"}},
        ]
        # filtering as in the seed's "Metadata-based filtering"
        admins = [c for c in everyone if c["metadata"]["username"].startswith("A")]
        assert [c["id"] for c in admins] == [alice.connection_id]
        for client in (alice, bob, carol):
            await client.close()


async def test_metadata_and_membership_removed_on_disconnect(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        leaver = await WSClient.connect(server.port)
        stayer = await WSClient.connect(server.port)
        cid = leaver.connection_id
        await leaver.request("mesh/set-my-connection-metadata", {"metadata": {"name": "gone soon"}})
        await leaver.request("mesh/join-room", {"roomName": "lobby"})
        assert await server.rooms.get_room_members("lobby") == [cid]
        await leaver.abort()  # no close frame: the socket just goes away

        async def gone() -> bool:
            return await server.connections.get_metadata(
                cid
            ) is None and not await server.rooms.get_room_members("lobby")

        with anyio.fail_after(5):
            while not await gone():
                await anyio.sleep(0.01)
        assert cid not in [row["id"] for row in await server.connections.get_all_metadata()]
        assert await stayer.request("mesh/get-connection-metadata", {"connectionId": cid}) == {
            "metadata": None
        }
        assert await server.rooms.get_all_rooms() == []
        await stayer.close()


async def test_room_metadata_set_get_all_strategies(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        rooms = server.rooms
        await rooms.set_metadata(
            "lobby", {"topic": "General Discussion", "createdBy": "user123", "maxUsers": 10}
        )
        assert await rooms.get_metadata("lobby") == {
            "topic": "General Discussion",
            "createdBy": "user123",
            "maxUsers": 10,
        }
        await rooms.set_metadata("lobby", {"topic": "New"}, strategy="merge")
        assert await rooms.get_metadata("lobby") == {
            "topic": "New",
            "createdBy": "user123",
            "maxUsers": 10,
        }
        await rooms.set_metadata(
            "dev", {"topic": "Development Chat", "cfg": {"a": 1, "b": {"c": 1}}}
        )
        await rooms.set_metadata("dev", {"cfg": {"b": {"d": 2}}}, strategy="deepMerge")
        assert await rooms.get_metadata("dev") == {
            "topic": "Development Chat",
            "cfg": {"a": 1, "b": {"c": 1, "d": 2}},
        }
        await rooms.set_metadata("dev", {"only": True}, strategy="replace")
        assert await rooms.get_metadata("dev") == {"only": True}
        assert sorted(await rooms.get_all_metadata(), key=lambda r: r["id"]) == [
            {"id": "dev", "metadata": {"only": True}},
            {"id": "lobby", "metadata": {"topic": "New", "createdBy": "user123", "maxUsers": 10}},
        ]
        assert await rooms.get_metadata("nowhere") is None
        with pytest.raises(Exception) as info:
            await rooms.set_metadata("lobby", {}, strategy="append")
        assert getattr(info.value, "code", None) == "EINVAL"


async def test_clear_room_keeps_metadata_delete_room_drops_it(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        a = await WSClient.connect(server.port)
        b = await WSClient.connect(server.port)
        for client in (a, b):
            await client.request("mesh/join-room", {"roomName": "r1"})
            await client.request("mesh/join-room", {"roomName": "r2"})
        await server.rooms.set_metadata("r1", {"keep": 1})
        await server.rooms.set_metadata("r2", {"drop": 1})
        assert sorted(await server.clear_room("r1")) == sorted([a.connection_id, b.connection_id])
        assert await server.get_room_members("r1") == []
        assert await server.rooms.get_metadata("r1") == {"keep": 1}
        await server.delete_room("r2")
        assert await server.get_room_members("r2") == []
        assert await server.rooms.get_metadata("r2") is None
        assert not await server.is_in_room("r1", a.connection_id)
        # dropping only the metadata leaves the members
        await a.request("mesh/join-room", {"roomName": "r3"})
        await server.rooms.set_metadata("r3", {"x": 1})
        assert await server.rooms.delete_metadata("r3") is True
        assert await server.get_room_members("r3") == [a.connection_id]
        assert await server.rooms.get_metadata("r3") is None
        await a.close()
        await b.close()


async def test_null_metadata_is_stored_as_json_null(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        client = await WSClient.connect(server.port)
        await server.rooms.set_metadata("lobby", {"a": 1})
        await server.rooms.set_metadata("lobby", None)
        assert await server.rooms.get_metadata("lobby") is None
        # still there, as JSON null, until the room is deleted
        assert {"id": "lobby", "metadata": None} in await server.rooms.get_all_metadata()
        assert await client.request("mesh/get-room-metadata", {"roomName": "lobby"}) == {
            "metadata": None
        }
        await server.delete_room("lobby")
        assert await server.rooms.get_all_metadata() == []
        await client.close()


async def test_exposing_metadata_to_clients(server_cls: Any) -> None:
    server = server_cls(make_app(), **FAST)
    async with server.listen():
        a = await WSClient.connect(server.port)
        b = await WSClient.connect(server.port)
        assert await a.request(
            "mesh/set-my-connection-metadata", {"metadata": {"name": "a", "p": {"x": 1}}}
        ) == {"success": True}
        assert await a.request(
            "mesh/set-my-connection-metadata",
            {"metadata": {"p": {"y": 2}}, "options": {"strategy": "deepMerge"}},
        ) == {"success": True}
        mine = await a.request("mesh/get-my-connection-metadata")
        assert mine == {"metadata": {"name": "a", "p": {"x": 1, "y": 2}}}
        assert (
            await b.request("mesh/get-connection-metadata", {"connectionId": a.connection_id})
            == mine
        )
        await server.rooms.set_metadata("lobby", {"topic": "hello"})
        assert await b.request("mesh/get-room-metadata", {"roomName": "lobby"}) == {
            "metadata": {"topic": "hello"}
        }
        # unknown strategy is an error payload, and nothing is stored
        bad = await a.request(
            "mesh/set-my-connection-metadata",
            {"metadata": {"name": "zzz"}, "options": {"strategy": "sideways"}},
        )
        assert bad["code"] == "EINVAL" and "sideways" in bad["error"]
        assert (await a.request("mesh/get-my-connection-metadata"))["metadata"]["name"] == "a"
        # clients cannot set room metadata: there is no such built-in
        nope = await a.request("mesh/set-room-metadata", {"roomName": "lobby", "metadata": {}})
        assert nope == {
            "error": 'Command "mesh/set-room-metadata" not found',
            "code": "ENOTFOUND",
            "name": "CommandError",
        }
        await a.close()
        await b.close()


async def test_client_write_policy_deny_and_guard(server_cls: Any) -> None:
    app = make_app()
    app.client_metadata_writes = "deny"
    server = server_cls(app, **FAST)
    async with server.listen():
        c = await WSClient.connect(server.port)
        assert await c.request(
            "mesh/set-my-connection-metadata", {"metadata": {"role": "admin"}}
        ) == {"success": False}
        assert await c.request("mesh/get-my-connection-metadata") == {"metadata": None}
        seen: list[Any] = []

        async def guard(connection: Any, value: Any, strategy: str) -> bool:
            seen.append((connection.id, value, strategy))
            return isinstance(value, dict) and "role" not in value

        app.client_metadata_writes = guard
        assert await c.request(
            "mesh/set-my-connection-metadata", {"metadata": {"role": "admin"}}
        ) == {"success": False}
        assert await c.request(
            "mesh/set-my-connection-metadata",
            {"metadata": {"name": "ok"}, "options": {"strategy": "merge"}},
        ) == {"success": True}
        assert await c.request("mesh/get-my-connection-metadata") == {"metadata": {"name": "ok"}}
        assert seen == [
            (c.connection_id, {"role": "admin"}, "replace"),
            (c.connection_id, {"name": "ok"}, "merge"),
        ]
        await c.close()

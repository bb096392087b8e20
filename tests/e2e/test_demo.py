"""examples/demo.py (the seed's "Useful patterns") end to end, both runtimes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from examples.demo import app
from tests.helpers.wsclient import WSClient

pytestmark = pytest.mark.anyio


async def test_demo_patterns(server_cls: Any) -> None:
    server = server_cls(app, ping_interval=0, latency_interval=0)
    async with server.listen():
        mod = await WSClient.connect(server.port)
        user = await WSClient.connect(server.port)
        meta = (await mod.request("mesh/get-my-connection-metadata"))["metadata"]
        assert set(meta) == {"connectedAt"} and isinstance(meta["connectedAt"], int)
        assert meta["connectedAt"] > 1_600_000_000_000  # milliseconds since the epoch

        assert await mod.request(
            "create-room", {"roomName": "lobby", "type": "public", "maxUsers": 2}
        ) == {"success": True}
        assert await mod.request(
            "create-room", {"roomName": "vip", "type": "private", "maxUsers": 5}
        ) == {"success": True}
        lobby = await server.rooms.get_metadata("lobby")
        assert lobby["name"] == "lobby" and lobby["type"] == "public" and lobby["maxUsers"] == 2
        assert lobby["createdBy"] == mod.connection_id and lobby["memberCount"] == 0
        assert isinstance(lobby["createdAt"], int)

        # update-room-topic needs role == moderator
        denied = await user.request("update-room-topic", {"roomName": "lobby", "topic": "x"})
        assert denied["error"] == "Insufficient permissions" and denied["code"] == "ESERVER"
        await server.connections.set_metadata(
            mod.connection_id, {"role": "moderator"}, strategy="merge"
        )
        assert await mod.request(
            "update-room-topic", {"roomName": "lobby", "topic": "New Topic"}
        ) == {"success": True}
        lobby = await server.rooms.get_metadata("lobby")
        assert lobby["topic"] == "New Topic" and lobby["updatedBy"] == mod.connection_id
        assert lobby["name"] == "lobby"  # merged, not replaced

        assert await user.request("update-user-status", {"status": "away"}) == {"success": True}
        umeta = await server.connections.get_metadata(user.connection_id)
        assert (
            umeta["status"] == "away"
            and "connectedAt" in umeta
            and isinstance(umeta["lastActivity"], int)
        )

        # list-public-rooms: public with space only
        listed = await user.request("list-public-rooms", {})
        assert [room["id"] for room in listed["rooms"]] == ["lobby"]

        # join/leave keep memberCount exact
        joined = await mod.request("mesh/join-room", {"roomName": "lobby"})
        assert joined["success"] is True and [p["id"] for p in joined["present"]] == [
            mod.connection_id
        ]
        await mod.request("mesh/join-room", {"roomName": "lobby"})  # twice: still one member
        await user.request("mesh/join-room", {"roomName": "lobby"})
        assert (await server.rooms.get_metadata("lobby"))["memberCount"] == 2
        assert (await user.request("list-public-rooms", {}))["rooms"] == []  # full now
        await user.request("mesh/leave-room", {"roomName": "lobby"})
        assert (await server.rooms.get_metadata("lobby"))["memberCount"] == 1
        # a room without metadata gets none from the counter
        await user.request("mesh/join-room", {"roomName": "plain"})
        assert await server.rooms.get_metadata("plain") is None

        assert await user.request("echo", {"deep": [1, {"x": None}], "s": "é"}) == {
            "deep": [1, {"x": None}],
            "s": "é",
        }
        assert await user.request("echo", "just a string") == "just a string"

        await user.request("mesh/join-room", {"roomName": "lobby"})
        assert await mod.request(
            "broadcast-room", {"roomName": "lobby", "event": "chat", "data": {"text": "yo"}}
        ) == {"success": True}
        for client in (mod, user):
            assert await client.wait_push("chat") == {"command": "chat", "payload": {"text": "yo"}}

        # disconnecting without leaving still decrements
        await user.abort()
        with anyio.fail_after(5):
            while (await server.rooms.get_metadata("lobby"))["memberCount"] != 1:
                await anyio.sleep(0.01)
        await mod.close()


async def test_concurrent_joins_count_exactly(server_cls: Any) -> None:
    server = server_cls(app, ping_interval=0, latency_interval=0)
    async with server.listen():
        clients = [await WSClient.connect(server.port) for _ in range(20)]
        await clients[0].request(
            "create-room", {"roomName": "busy", "type": "public", "maxUsers": 100}
        )
        ids = [await c.send_request("mesh/join-room", {"roomName": "busy"}) for c in clients]
        async with anyio.create_task_group() as tg:
            for client, rid in zip(clients, ids, strict=True):
                tg.start_soon(client.response, rid)
        assert (await server.rooms.get_metadata("busy"))["memberCount"] == 20
        assert len(await server.get_room_members("busy")) == 20
        for client in clients:
            await client.close()

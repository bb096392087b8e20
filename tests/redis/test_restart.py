"""Redis restarts empty under a running server (issue 14, item 7): the
instance puts its state back the moment it reconnects, before it serves a
single read, instead of at its next heartbeat. Both runtimes, a real
redis-server without persistence, killed and started again on its port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import mesh_asyncio
import mesh_trio
from mesh_core import Connection, Context, MeshApp
from tests.helpers.redis_server import RedisServer
from tests.helpers.wsclient import WSClient

pytestmark = pytest.mark.anyio

UNAVAILABLE = "EUNAVAILABLE"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def make_app() -> MeshApp:
    app = MeshApp()

    @app.on_connection
    async def stamp(connection: Connection) -> None:
        await connection.server.connections.set_metadata(connection, {"user": "ada"})

    @app.command("members")
    async def members(ctx: Context) -> Any:
        return sorted(await ctx.server.rooms.get_room_members(ctx.payload["room"]))

    @app.command("rooms-of")
    async def rooms_of(ctx: Context) -> Any:
        return sorted(await ctx.server.rooms.get_connection_rooms(ctx.payload["id"]))

    @app.command("count")
    async def count(ctx: Context) -> Any:
        return len(await ctx.server.connections.get_all_metadata())

    return app


def unavailable(answer: Any) -> bool:
    return isinstance(answer, dict) and answer.get("code") == UNAVAILABLE


async def first_answer(client: WSClient, command: str, payload: Any) -> Any:
    """Ask until the answer is no longer "storage unavailable": the first
    real answer after Redis is back."""
    with anyio.fail_after(20):
        while unavailable(answer := await client.request(command, payload, timeout=10)):
            await anyio.sleep(0.02)
    return answer


@pytest.mark.parametrize(
    "first",
    ["mesh/get-connection-metadata", "members", "count"],
)
async def test_reads_after_an_empty_restart_see_the_live_state(
    redis_server: RedisServer, server_cls: Any, anyio_backend: str, first: str
) -> None:
    """The first command answered after the restart (whichever read it is)
    already sees the connection, its latest metadata and its room: the
    heartbeat is a minute away, so only the reconnect can have put them
    back."""
    store_cls = mesh_trio.RedisStore if anyio_backend == "trio" else mesh_asyncio.RedisStore
    store = store_cls(
        redis_server.url, command_timeout=0.5, connect_timeout=0.5, heartbeat_interval=60
    )
    server = server_cls(make_app(), storage=store, ping_interval=0, latency_interval=0)
    async with server.listen("127.0.0.1", 0):
        c = await WSClient.connect(server.port)
        cid = c.connection_id
        await c.request("mesh/join-room", {"roomName": "lobby"})
        # the value to come back is the last one written, not the first
        latest = {"user": "ada", "status": "away"}
        assert await c.request("mesh/set-my-connection-metadata", {"metadata": latest}) == {
            "success": True
        }

        await anyio.to_thread.run_sync(lambda: redis_server.stop(kill=True))
        await anyio.to_thread.run_sync(redis_server.start)  # empty, same port

        reads: dict[str, tuple[str, Any, Any]] = {
            "mesh/get-connection-metadata": (
                "mesh/get-connection-metadata",
                {"connectionId": cid},
                {"metadata": latest},
            ),
            "members": ("members", {"room": "lobby"}, [cid]),
            "count": ("count", {}, 1),
        }
        command, payload, expected = reads[first]
        assert await first_answer(c, command, payload) == expected
        for command, payload, expected in reads.values():
            assert await c.request(command, payload) == expected
        assert await c.request("rooms-of", {"id": cid}) == ["lobby"]
        assert await c.request("mesh/get-my-connection-metadata") == {"metadata": latest}
        await c.close()


async def test_a_room_left_while_joining_is_not_put_back(
    redis_server: RedisServer, server_cls: Any, anyio_backend: str
) -> None:
    """A join and a leave of one room in flight together: Redis runs the
    leave last, so the connection is not in the room, and a restart must
    not put it back there (the join's answer comes after the leave was sent)."""
    store_cls = mesh_trio.RedisStore if anyio_backend == "trio" else mesh_asyncio.RedisStore
    store = store_cls(
        redis_server.url, command_timeout=0.5, connect_timeout=0.5, heartbeat_interval=60
    )
    server = server_cls(make_app(), storage=store, ping_interval=0, latency_interval=0)
    async with server.listen("127.0.0.1", 0):
        c = await WSClient.connect(server.port)
        cid = c.connection_id
        await c.request("mesh/join-room", {"roomName": "kept"})
        for _ in range(20):  # pipelined: each leave is sent before its join is answered
            joined = await c.send_request("mesh/join-room", {"roomName": "flicker"})
            left = await c.send_request("mesh/leave-room", {"roomName": "flicker"})
            await c.response(joined)
            await c.response(left)
        # requests of one connection run concurrently, so the leave may have
        # reached Redis first: whatever Redis has is what must come back
        before = await c.request("rooms-of", {"id": cid})
        assert "kept" in before

        await anyio.to_thread.run_sync(lambda: redis_server.stop(kill=True))
        await anyio.to_thread.run_sync(redis_server.start)  # empty, same port

        assert await first_answer(c, "rooms-of", {"id": cid}) == before
        members = await c.request("members", {"room": "flicker"})
        assert members == ([cid] if "flicker" in before else [])
        await c.close()

"""The seed's "Useful patterns" as one runnable app.

    mesh serve examples.demo:app                   # asyncio
    mesh serve examples.demo:app --runtime trio    # the same app on trio

Handlers only await the Mesh API they are given, so this module runs on
either runtime unchanged.
"""

from __future__ import annotations

import re
import time
from typing import Any

from mesh_core import UNCHANGED, Connection, Context, MeshApp, MeshError

app = MeshApp()

# -- presence -------------------------------------------------------------------
# Who is in a room, and what each member is doing: rooms named "p:..." are
# tracked for as long as a member stays; in rooms named "pt:..." a member that
# answers no ping for 3 s leaves (and comes back at its next pong).
app.track_presence(re.compile(r"^p:"))
app.track_presence(re.compile(r"^pt:"), ttl=3000)


def now_ms() -> int:
    return int(time.time() * 1000)


@app.on_connection
async def stamp_connection(connection: Connection) -> None:
    await connection.server.connections.set_metadata(connection, {"connectedAt": now_ms()})


def _require(payload: Any, *names: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise MeshError("payload must be an object", code="EINVAL")
    missing = [name for name in names if name not in payload]
    if missing:
        raise MeshError(f"missing field(s): {', '.join(missing)}", code="EINVAL")
    return payload


@app.command("update-room-topic")
async def update_room_topic(ctx: Context) -> dict[str, Any]:
    payload = _require(ctx.payload, "roomName", "topic")
    metadata = await ctx.server.connections.get_metadata(ctx.connection)
    if not (isinstance(metadata, dict) and metadata.get("role") == "moderator"):
        raise MeshError("Insufficient permissions")
    await ctx.server.rooms.set_metadata(
        payload["roomName"],
        {"topic": payload["topic"], "updatedAt": now_ms(), "updatedBy": ctx.connection.id},
        strategy="merge",
    )
    return {"success": True}


@app.command("create-room")
async def create_room(ctx: Context) -> dict[str, Any]:
    payload = _require(ctx.payload, "roomName", "type", "maxUsers")
    await ctx.server.rooms.set_metadata(
        payload["roomName"],
        {
            "name": payload["roomName"],
            "type": payload["type"],
            "maxUsers": payload["maxUsers"],
            "createdBy": ctx.connection.id,
            "createdAt": now_ms(),
            "memberCount": 0,
        },
    )
    return {"success": True}


@app.command("update-user-status")
async def update_user_status(ctx: Context) -> dict[str, Any]:
    payload = _require(ctx.payload, "status")
    await ctx.server.connections.set_metadata(
        ctx.connection, {"status": payload["status"], "lastActivity": now_ms()}, strategy="merge"
    )
    return {"success": True}


def _has_space(metadata: Any) -> bool:
    if not isinstance(metadata, dict) or metadata.get("type") != "public":
        return False
    count, limit = metadata.get("memberCount", 0), metadata.get("maxUsers")
    return isinstance(count, int | float) and isinstance(limit, int | float) and count < limit


@app.command("list-public-rooms")
async def list_public_rooms(ctx: Context) -> dict[str, Any]:
    rooms = await ctx.server.rooms.get_all_metadata()
    return {"rooms": [room for room in rooms if _has_space(room["metadata"])]}


@app.command("echo")
async def echo(ctx: Context) -> Any:
    return ctx.payload


@app.command("broadcast-room")
async def broadcast_room(ctx: Context) -> dict[str, Any]:
    payload = _require(ctx.payload, "roomName", "event")
    await ctx.server.broadcast_room(payload["roomName"], payload["event"], payload.get("data"))
    return {"success": True}


# -- member counts, exact under concurrency ------------------------------------
# The seed reads the metadata and merges memberCount + 1 back, which loses
# increments when two joins interleave; update_metadata is an atomic
# read-modify-write, and it leaves rooms without metadata alone.


def _add_members(delta: int) -> Any:
    def update(metadata: Any) -> Any:
        if not isinstance(metadata, dict):
            return UNCHANGED
        count = metadata.get("memberCount") or 0
        return {**metadata, "memberCount": max(0, count + delta)}

    return update


def _room_of(ctx: Context) -> str | None:
    room = ctx.payload.get("roomName") if isinstance(ctx.payload, dict) else None
    return room if isinstance(room, str) and room else None


@app.middleware("mesh/join-room")
async def count_join(ctx: Context) -> None:
    room = _room_of(ctx)
    # a second join by the same connection is not a new member
    if room is not None and not await ctx.server.rooms.is_in_room(room, ctx.connection):
        await ctx.server.rooms.update_metadata(room, _add_members(+1))


@app.middleware("mesh/leave-room")
async def count_leave(ctx: Context) -> None:
    room = _room_of(ctx)
    if room is not None and await ctx.server.rooms.is_in_room(room, ctx.connection):
        await ctx.server.rooms.update_metadata(room, _add_members(-1))


@app.on_disconnection
async def count_disconnect(connection: Connection) -> None:
    # a client that goes away without leaving still stops being a member
    for room in await connection.server.rooms.get_connection_rooms(connection):
        await connection.server.rooms.update_metadata(room, _add_members(-1))

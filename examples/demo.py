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


# -- channels ----------------------------------------------------------------
# Every chat:* channel is open to any client, except chat:admin: only a
# connection whose metadata says role "admin" may subscribe to it or read
# its history (the guard is asked on every subscribe and every read).


async def chat_guard(connection: Connection, channel: str) -> bool:
    if channel != "chat:admin":
        return True
    metadata = await connection.get_metadata()
    return isinstance(metadata, dict) and metadata.get("role") == "admin"


app.expose_channel(re.compile(r"^chat:"), guard=chat_guard)


@app.command("post")
async def post(ctx: Context) -> dict[str, Any]:
    """Write ``message`` (a string) to ``channel``, keeping the last
    ``history`` (default 50) messages."""
    payload = _require(ctx.payload, "channel", "message")
    await ctx.server.write_channel(
        payload["channel"], payload["message"], payload.get("history", 50)
    )
    return {"success": True}


# -- records and collections -----------------------------------------------------
# doc:* any client may read; note:* any client may read and write; secret:*
# only a connection whose metadata says role == "admin" may read, and no
# client may write. The server writes, deletes and reads any of them through
# the commands below. Collection "docs": every doc:* record, sorted by id.

app.expose_record(re.compile(r"^doc:"))
app.expose_record(re.compile(r"^note:"))
app.expose_writable_record(re.compile(r"^note:"))


async def _is_admin(connection: Connection, record_id: str) -> bool:
    metadata = await connection.server.connections.get_metadata(connection)
    return isinstance(metadata, dict) and metadata.get("role") == "admin"


app.expose_record(re.compile(r"^secret:"), _is_admin)


def _record_id(payload: Any) -> str:
    record_id = _require(payload, "recordId")["recordId"]
    if not isinstance(record_id, str) or not record_id:
        raise MeshError("recordId must be a non-empty string", code="EINVAL")
    return record_id


@app.command("write-record")
async def write_record(ctx: Context) -> dict[str, Any]:
    record_id = _record_id(ctx.payload)
    payload = _require(ctx.payload, "value")
    await ctx.server.records.write(
        record_id, payload["value"], strategy=payload.get("strategy") or "replace"
    )
    return {"success": True}


@app.command("delete-record")
async def delete_record(ctx: Context) -> dict[str, Any]:
    await ctx.server.records.delete(_record_id(ctx.payload))
    return {"success": True}


@app.command("get-record")
async def get_record(ctx: Context) -> dict[str, Any]:
    return {"record": await ctx.server.records.get(_record_id(ctx.payload))}


async def _docs(connection: Connection, collection_id: str) -> list[str]:
    return [record_id for record_id, _ in await connection.server.records.list_matching("doc:*")]


app.expose_collection("docs", _docs)

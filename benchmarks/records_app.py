"""The app for ``python -m benchmarks.records``: one readable record, one
writable record, a server-side merge, and a room to compare with."""

from __future__ import annotations

from typing import Any

from mesh_core import Context, MeshApp

app = MeshApp()
app.expose_record("bench:rec")
app.expose_writable_record("bench:w")


@app.command("bench/write")
async def write(ctx: Context) -> bool:
    await ctx.server.records.write(ctx.payload["recordId"], ctx.payload["value"], "merge")
    return True


@app.command("bench/join-room")
async def join_room(ctx: Context) -> bool:
    await ctx.server.rooms.add_to_room(ctx.payload["roomName"], ctx.connection)
    return True


@app.command("broadcast-room")
async def broadcast_room(ctx: Context) -> dict[str, Any]:
    payload = ctx.payload
    await ctx.server.broadcast_room(payload["roomName"], payload["event"], payload.get("data"))
    return {"success": True}

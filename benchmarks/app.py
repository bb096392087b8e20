"""The app for the room-broadcast benchmark: ``mesh serve benchmarks.app:app``.

``bench/join-room`` adds the caller to a room and answers ``true`` (the
built-in ``mesh/join-room`` answers with every member's metadata, which is
quadratic work when 1,000 clients join one room); ``broadcast-room`` is the
demo's: push ``event``/``data`` to every member of ``roomName``;
``bench/write-channel`` writes ``message`` to ``channel`` keeping 100 (every
``bench:*`` channel is exposed), for ``benchmarks/channels.py``.
"""

from __future__ import annotations

import re
from typing import Any

from mesh_core import Context, MeshApp

app = MeshApp()


@app.command("echo")
async def echo(ctx: Context) -> Any:
    return ctx.payload


@app.command("bench/join-room")
async def join_room(ctx: Context) -> bool:
    await ctx.server.rooms.add_to_room(ctx.payload["roomName"], ctx.connection)
    return True


@app.command("broadcast-room")
async def broadcast_room(ctx: Context) -> dict[str, Any]:
    payload = ctx.payload
    await ctx.server.broadcast_room(payload["roomName"], payload["event"], payload.get("data"))
    return {"success": True}


app.expose_channel(re.compile(r"^bench:"))


@app.command("bench/write-channel")
async def write_channel(ctx: Context) -> bool:
    payload = ctx.payload
    await ctx.server.write_channel(payload["channel"], payload["message"], history=100)
    return True

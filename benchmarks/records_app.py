"""The app for ``python -m benchmarks.records``: the room-broadcast
benchmark's app (``bench/join-room``, ``broadcast-room``, to compare with)
plus one readable record, one writable record and a server-side merge."""

from __future__ import annotations

from mesh_core import Context

from .app import app

app.expose_record("bench:rec")
app.expose_writable_record("bench:w")


@app.command("bench/write")
async def write(ctx: Context) -> bool:
    await ctx.server.records.write(ctx.payload["recordId"], ctx.payload["value"], "merge")
    return True

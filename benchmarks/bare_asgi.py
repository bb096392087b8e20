"""The floor under ASGI: an ASGI app that answers every text frame with
``{"id", "command", "payload": true}`` (as ``bare_asyncio``), nothing else.

``uvicorn benchmarks.bare_asgi:app`` and ``hypercorn benchmarks.bare_asgi:app
--worker-class trio``: what the ASGI server itself costs per command, so that
``mesh-uvicorn`` and ``mesh-hypercorn-trio`` can be read as that plus Mesh.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .bare_asyncio import ASSIGN_ID, DECODER, ENCODER, Response

Message = MutableMapping[str, Any]


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": ASSIGN_ID})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        frame = DECODER.decode(message.get("text") or message.get("bytes") or b"")
        reply = ENCODER.encode(Response(frame.id, frame.command, True))
        await send({"type": "websocket.send", "text": reply.decode()})

"""Run a server until Ctrl-C / SIGTERM, then shut it down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from mesh_core import MeshApp, ServerOptions, Storage

from ._server import MeshServer

__all__ = ["run"]

log = logging.getLogger("mesh_asyncio")


def run(
    app: MeshApp,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    storage: Storage | Callable[[], Storage] | None = None,
    options: ServerOptions | None = None,
    use_uvloop: bool = False,
    reuse_port: bool = False,
    **option_overrides: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; every client then gets a close
    frame and every connection is cleaned out of the store. ``storage`` may
    be a factory, called inside the event loop (the Redis store's client
    belongs to the loop that runs it)."""

    async def main() -> None:
        store = storage() if callable(storage) and not isinstance(storage, Storage) else storage
        server = MeshServer(app, storage=store, options=options, **option_overrides)
        await server.start(host, port, reuse_port=reuse_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info(
                "Shutting down: closing %d connection(s)",
                len(server.connections.local_connections()),
            )
            await server.close()
            log.info("Stopped")

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())

"""Run a server until Ctrl-C / SIGTERM, then shut it down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
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
    storage: Storage | None = None,
    options: ServerOptions | None = None,
    use_uvloop: bool = False,
    **option_overrides: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; every client then gets a close
    frame and every connection is cleaned out of the store."""

    async def main() -> None:
        server = MeshServer(app, storage=storage, options=options, **option_overrides)
        await server.start(host, port)
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

"""Run a server until Ctrl-C / SIGTERM, then shut it down cleanly."""

from __future__ import annotations

import logging
import signal
from typing import Any

import trio

from mesh_core import MeshApp, ServerOptions, Storage

from ._server import MeshServer

__all__ = ["run"]

log = logging.getLogger("mesh_trio")


def run(
    app: MeshApp,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    storage: Storage | None = None,
    options: ServerOptions | None = None,
    **option_overrides: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; every client then gets a close
    frame and every connection is cleaned out of the store."""

    async def main() -> None:
        server = MeshServer(app, storage=storage, options=options, **option_overrides)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, host, port)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            log.info(
                "Shutting down: closing %d connection(s)",
                len(server.connections.local_connections()),
            )
            await server.close()
            log.info("Stopped")

    trio.run(main)

"""Run a server until Ctrl-C / SIGTERM, then shut it down cleanly."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from functools import partial
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
    storage: Storage | Callable[[], Storage] | None = None,
    options: ServerOptions | None = None,
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
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve, reuse_port=reuse_port), host, port)
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

"""The runtime-neutral half of ``mesh_asyncio.run`` / ``mesh_trio.run``:
build the server, serve until a stop signal, shut down cleanly, log it.

What stays in each adapter is runtime idiom only: how to wait for SIGINT or
SIGTERM (``loop.add_signal_handler`` / ``trio.open_signal_receiver``) and how
to enter the event loop (``asyncio.run``, ``uvloop.run``, ``trio.run``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from ..storage import Storage
from ._api import ConnectionsAPI

__all__ = ["ListeningServer", "serve_until"]


class ListeningServer(Protocol):
    """What :func:`serve_until` needs of an adapter's ``MeshServer``."""

    @property
    def connections(self) -> ConnectionsAPI: ...

    def listen(
        self, host: str = ..., port: int = ..., *, reuse_port: bool = ...
    ) -> AbstractAsyncContextManager[Any]: ...


async def serve_until(
    new_server: Callable[..., ListeningServer],
    storage: Storage | Callable[[], Storage] | None,
    stop_signal: Callable[[], Awaitable[None]],
    host: str,
    port: int,
    reuse_port: bool,
    log: logging.Logger,
) -> None:
    """Serve until ``stop_signal()`` returns (the adapter's wait for SIGINT or
    SIGTERM); every client then gets a close frame and every connection is
    cleaned out of the store. ``new_server(storage=...)`` makes the adapter's
    server; ``storage`` may be a factory, called here, inside the event loop
    (the Redis store's client belongs to the loop that runs it)."""
    store = storage() if callable(storage) and not isinstance(storage, Storage) else storage
    server = new_server(storage=store)
    async with server.listen(host, port, reuse_port=reuse_port):
        try:
            await stop_signal()
        finally:
            log.info(
                "Shutting down: closing %d connection(s)",
                len(server.connections.local_connections()),
            )
    log.info("Stopped")

"""Run a server until Ctrl-C / SIGTERM, then shut it down cleanly; the
runtime-neutral part is :func:`mesh_core.app.serve_until`."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from mesh_core import MeshApp, ServerOptions, Storage
from mesh_core.app import serve_until

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
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    sock: Any = None,
    on_listening: Callable[[], None] | None = None,
    **option_overrides: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; every client then gets a close
    frame and every connection is cleaned out of the store. ``storage`` may
    be a factory, called inside the event loop (the Redis store's client
    belongs to the loop that runs it). ``metrics_port`` (on ``metrics_host``)
    serves ``/metrics`` and ``/healthz`` over HTTP; ``sock``: serve on this
    listening socket instead of binding ``host:port``; ``on_listening()`` is
    called once serving."""
    new_server = partial(
        MeshServer,
        app,
        options=options,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        **option_overrides,
    )
    trio.run(
        serve_until,
        new_server,
        storage,
        _stop_signals,
        host,
        port,
        reuse_port,
        log,
        sock,
        on_listening,
    )


@asynccontextmanager
async def _stop_signals() -> AsyncIterator[Callable[[], Awaitable[object]]]:
    """SIGINT and SIGTERM caught from here on (trio queues them); yields the
    wait for the first."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def stopped() -> None:
            async for _ in signals:
                return

        yield stopped

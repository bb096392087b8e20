"""The runtime-neutral half of ``mesh_asyncio.run`` / ``mesh_trio.run``:
build the server, serve until a stop signal, shut down cleanly, log it.

What stays in each adapter is runtime idiom only: how to catch SIGINT and
SIGTERM (``loop.add_signal_handler`` / ``trio.open_signal_receiver``) and how
to enter the event loop (``asyncio.run``, ``uvloop.run``, ``trio.run``).

The handlers are installed before the server starts, so before it logs
that it listens: a supervisor (or a test) that sends SIGTERM the moment it
reads that line gets a clean shutdown, not a process killed by the
signal's default action. A signal during the start is kept, and the server
stops as soon as it has started.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, Protocol

from .._errors import ServerStartupError, StorageUnavailable
from ..storage import Storage
from ._api import ConnectionsAPI
from ._logging import ensure_logging

__all__ = ["ListeningServer", "StopSignals", "describe_startup_failure", "serve_until"]

#: an adapter's catcher of SIGINT and SIGTERM: entering it installs the
#: handlers, it yields the wait for the first signal (which returns at once
#: if one came already), leaving it restores the previous handlers
StopSignals = Callable[[], AbstractAsyncContextManager[Callable[[], Awaitable[object]]]]


class ListeningServer(Protocol):
    """What :func:`serve_until` needs of an adapter's ``MeshServer``."""

    @property
    def connections(self) -> ConnectionsAPI: ...

    def listen(
        self, host: str = ..., port: int = ..., *, reuse_port: bool = ..., sock: Any = ...
    ) -> AbstractAsyncContextManager[Any]: ...


async def serve_until(
    new_server: Callable[..., ListeningServer],
    storage: Storage | Callable[[], Storage] | None,
    stop_signals: StopSignals,
    host: str,
    port: int,
    reuse_port: bool,
    log: logging.Logger,
    sock: Any = None,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (caught by the adapter's
    ``stop_signals`` from before the start); every client then gets a close
    frame and every connection is cleaned out of the store.
    ``new_server(storage=...)`` makes the adapter's server; ``storage`` may
    be a factory, called here, inside the event loop (the Redis store's
    client belongs to the loop that runs it). ``sock``: a listening socket
    to serve on instead of binding ``host:port`` (what the ``--workers``
    supervisor hands each worker); ``on_listening()`` is called once the
    server serves (a worker tells its supervisor so)."""
    ensure_logging()
    async with AsyncExitStack() as stack:
        # first in, last out: a second signal during the shutdown is caught too
        stopped = await stack.enter_async_context(stop_signals())
        try:
            store = storage() if callable(storage) and not isinstance(storage, Storage) else storage
            server = new_server(storage=store)
            await stack.enter_async_context(
                server.listen(host, port, reuse_port=reuse_port, sock=sock)
            )
        except Exception as exc:
            raise ServerStartupError(describe_startup_failure(exc, host, port)) from exc
        if on_listening is not None:
            on_listening()
        try:
            await stopped()
        finally:
            log.info(
                "Shutting down: closing %d connection(s)",
                len(server.connections.local_connections()),
            )
    log.info("Stopped")


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups: trio reports a failed
    bind as an ``ExceptionGroup`` around the ``OSError``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def describe_startup_failure(exc: BaseException, host: str, port: int) -> str:
    """One line for an operator: what went wrong at startup and what to do."""
    leaves = _leaves(exc)
    said = next((e for e in leaves if isinstance(e, ServerStartupError)), None)
    if said is not None:  # already one line for the operator (the metrics port)
        return str(said)
    first = next((e for e in leaves if isinstance(e, (OSError, StorageUnavailable))), leaves[0])
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(first, StorageUnavailable):
        return f"cannot reach the store: {first} (is Redis running at the --redis URL?)"
    if isinstance(first, OSError) and first.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: address already in use "
            "(another server is running there: stop it or choose another --port)"
        )
    if isinstance(first, OSError) and first.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    if isinstance(first, OSError):
        return f"cannot listen on {where}: {first.strerror or first} (check --host and --port)"
    return f"{type(first).__name__}: {first}"

"""The asyncio binding of the client role: a TCP (or TLS) stream on asyncio's
streams, and background tasks as free asyncio tasks, so that ``await
client.connect()`` works outside any block. The lifecycle itself (connect,
reconnect, re-join, timeouts, dead-link detection, close) is written once, in
:class:`mesh_core.client.ClientCore`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from mesh_core.client import ClientBinding, ClientCore, Endpoint
from mesh_core.runtime import TLSContext

from ._runtime import RUNTIME

__all__ = ["MeshClient"]


class _Stream:
    """asyncio's reader and writer as the core's ``ClientStream``."""

    __slots__ = ("_reader", "_writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            return await self._reader.read(max_bytes)
        except OSError:
            return b""

    async def send_all(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("the stream is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def aclose(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()

    async def abort(self) -> None:
        self._writer.transport.abort()


async def _open_stream(endpoint: Endpoint, ssl_context: TLSContext | None) -> _Stream:
    assert ssl_context is None or isinstance(ssl_context, ssl.SSLContext)
    reader, writer = await asyncio.open_connection(
        endpoint.host,
        endpoint.port,
        ssl=ssl_context,
        server_hostname=endpoint.host if ssl_context is not None else None,
        limit=2**20,
    )
    return _Stream(reader, writer)


#: strong references: the loop keeps only weak ones to running tasks
_TASKS: set[asyncio.Task[Any]] = set()


def _start_task(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
    task = asyncio.get_running_loop().create_task(fn(*args))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


class MeshClient(ClientCore):
    """A Mesh client on asyncio; same API as ``mesh_trio.MeshClient``.

    ``async with MeshClient(url) as client:`` or ``await client.connect()`` …
    ``await client.close()``. Commands issued while the client reconnects wait
    (within their timeout) and are sent once the rooms are re-joined.
    """

    binding = ClientBinding(RUNTIME, _open_stream, _start_task, ssl.create_default_context)

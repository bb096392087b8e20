"""The trio binding of the client role: a TCP (or TLS) stream on trio's
streams, and background tasks in a nursery the client opens itself. The
lifecycle itself (connect, reconnect, re-join, timeouts, dead-link detection,
close) is written once, in :class:`mesh_core.client.ClientCore`.

trio wants every task in a nursery, so use the client as ``async with
MeshClient(url) as client:``; ``connect()``/``close()`` are for use inside that
block (to close early, or to connect again after a close).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from mesh_core.client import ClientBinding, ClientCore, Endpoint
from mesh_core.runtime import TLSContext

from ._runtime import RUNTIME

__all__ = ["MeshClient"]

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Stream:
    """A trio stream as the core's ``ClientStream``."""

    __slots__ = ("_stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            return bytes(await self._stream.receive_some(max_bytes))
        except _GONE:
            return b""

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except _GONE as exc:
            raise ConnectionResetError(str(exc)) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def abort(self) -> None:
        await trio.aclose_forcefully(self._stream)


async def _open_stream(endpoint: Endpoint, ssl_context: TLSContext | None) -> _Stream:
    assert ssl_context is None or isinstance(ssl_context, ssl.SSLContext)
    tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    if ssl_context is None:
        return _Stream(tcp)
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=endpoint.host, https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException as exc:
        await trio.aclose_forcefully(stream)
        if isinstance(exc, _GONE):
            raise ConnectionError(str(exc)) from exc
        raise
    return _Stream(stream)


_USE_ASYNC_WITH = (
    "a trio MeshClient runs its tasks in its own nursery: "
    "use `async with MeshClient(url) as client:`"
)


def _outside_block(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
    raise RuntimeError(_USE_ASYNC_WITH)


#: outside ``async with`` no task can start; inside, the block's nursery
_OUTSIDE = ClientBinding(RUNTIME, _open_stream, _outside_block, ssl.create_default_context)


class MeshClient(ClientCore):
    """A Mesh client on trio; same API as ``mesh_asyncio.MeshClient``.

    ``async with MeshClient(url) as client:`` connects on entry and closes on
    exit; the client's tasks run in a nursery of its own, opened there.
    Commands issued while the client reconnects wait (within their timeout)
    and are sent once the rooms are re-joined.
    """

    binding = _OUTSIDE
    _nursery: trio.Nursery | None = None
    _nursery_cm: AbstractAsyncContextManager[trio.Nursery] | None = None

    async def __aenter__(self) -> MeshClient:
        if self._nursery is not None:
            raise RuntimeError("this MeshClient is already in use")
        cm = trio.open_nursery()
        nursery = await cm.__aenter__()
        self._nursery_cm, self._nursery = cm, nursery
        self.binding = dataclasses.replace(_OUTSIDE, start_task=nursery.start_soon)
        try:
            await self.connect()
        except BaseException:
            await self._exit_nursery()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.close()
        finally:
            await self._exit_nursery()

    async def _exit_nursery(self) -> None:
        nursery, cm = self._nursery, self._nursery_cm
        self._nursery = self._nursery_cm = None
        self.binding = _OUTSIDE
        if nursery is None or cm is None:
            return
        # the block's body has ended, so cancelling the nursery only stops our
        # own tasks; the body's exception (if any) propagates from __aexit__
        # as it is, never wrapped in an ExceptionGroup
        nursery.cancel_scope.cancel()
        await cm.__aexit__(None, None, None)

    async def connect(self) -> None:
        """Connect; returns once the server assigned the connection id.
        Raises :class:`MeshConnectionError` (or ``ConnectionRejected``) when
        this first attempt fails: only an established client reconnects.
        Only inside ``async with MeshClient(...)`` (which calls it)."""
        if self._nursery is None:
            raise RuntimeError(_USE_ASYNC_WITH)
        await super().connect()

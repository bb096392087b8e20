"""The asyncio binding of the core: sockets, timers and tasks.

Built on asyncio's protocol/transport layer rather than streams: bytes go
straight from ``data_received`` into the core, and everything the core queued
during one loop iteration (responses, broadcasts) leaves in one
``transport.write``. Back-pressure comes from ``pause_writing``: while the
socket is full, output stays in the core, whose bound drops slow consumers.
The other way round, while the core has too many of a client's requests
waiting (``reading_paused``), the transport stops reading from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, cast

from mesh_core import ServerCore
from mesh_core.protocol import ServerConnection, State
from mesh_core.runtime import Event

from ._runtime import RUNTIME

__all__ = ["MeshServer"]

log = logging.getLogger("mesh_asyncio")


class _WebSocketProtocol(asyncio.Protocol):
    __slots__ = (
        "_flush_pending",
        "_loop",
        "_paused",
        "_reading_paused",
        "_server",
        "_timer",
        "_timer_at",
        "proto",
        "transport",
    )

    def __init__(self, server: MeshServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.proto: ServerConnection
        self._flush_pending = False
        self._paused = False
        self._reading_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        self.proto = self._server._new_protocol(peer, self._loop.time())
        self.proto.wake = self._wake
        self._server._protocols.add(self)
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data, self._loop.time())
        self._pump()

    def eof_received(self) -> bool:
        self.proto.receive_data(None, self._loop.time())
        self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.proto.receive_data(None, self._loop.time())
        self._pump()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server._protocols.discard(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    # -- driving the core -----------------------------------------------------

    def _wake(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._flush_pending = False
        proto = self.proto
        events = proto.events()
        if events:
            self._server._handle_events(proto, events)
        transport = self.transport
        if transport is None:
            return
        if not self._paused:
            data = proto.data_to_send()
            if data:
                transport.write(data)
        if proto.reading_paused != self._reading_paused:
            self._reading_paused = proto.reading_paused
            if self._reading_paused:
                transport.pause_reading()
            else:
                transport.resume_reading()
        if proto.state is State.CLOSED:
            if proto.aborted:
                transport.abort()
            else:
                # flush what is buffered, then close; a peer that never reads
                # does not keep the socket open past close_timeout
                transport.close()
                self._loop.call_later(self._server.options.close_timeout, transport.abort)
            self.transport = None
            return
        deadline = proto.next_deadline()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = deadline
            if deadline is not None:
                self._timer = self._loop.call_at(max(deadline, self._loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.proto.tick(self._loop.time())
        self._pump()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class MeshServer(ServerCore):
    """A Mesh server on asyncio. Same constructor and API as
    ``mesh_trio.MeshServer``; see :class:`mesh_core.ServerCore`."""

    runtime = RUNTIME

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Server | None = None
        self._protocols: set[_WebSocketProtocol] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed: asyncio.Event | None = None
        self._storage_task: asyncio.Task[Any] | None = None
        self._closing = False

    # -- runtime hooks for the core -------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _new_event(self) -> Event:
        return RUNTIME.event()

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        assert self._loop is not None
        task: asyncio.Task[Any] = self._loop.create_task(fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually bound (useful after listening on port 0)."""
        if self._listener is None or not self._listener.sockets:
            raise RuntimeError("the server is not listening")
        return int(self._listener.sockets[0].getsockname()[1])

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
    ) -> None:
        """Start listening and return; the server runs until :meth:`close`."""
        if self._listener is not None:
            raise RuntimeError("the server is already listening")
        loop = self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._closing = False
        await self._start_storage()
        duties = getattr(self.storage, "run", None)  # heartbeats, sweeps (Redis)
        self._storage_task = loop.create_task(duties()) if callable(duties) else None

        def factory() -> _WebSocketProtocol:
            return _WebSocketProtocol(self, loop)

        if sock is not None:
            self._listener = await loop.create_server(factory, sock=sock, backlog=1024)
        else:
            self._listener = await loop.create_server(
                factory, host, port, reuse_port=reuse_port or None, backlog=1024
            )
        for s in self._listener.sockets:
            name = s.getsockname()
            log.info("Mesh server (asyncio) listening on ws://%s:%d", name[0], name[1])

    async def serve(self, host: str = "127.0.0.1", port: int = 8765) -> None:
        """Listen and run until :meth:`close` is called (from another task)."""
        await self.start(host, port)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await self._closed.wait()

    @asynccontextmanager
    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[MeshServer]:
        """``async with server.listen(host, port):`` serve inside the block."""
        await self.start(host, port)
        try:
            yield self
        finally:
            await self.close()

    async def close(self) -> None:
        """Graceful shutdown: stop accepting, let requests in flight finish
        (up to ``shutdown_timeout``), send every client close 1001, wait for
        them to be cleaned out of the store, then stop."""
        if self._listener is None or self._closing:
            await self.wait_closed()
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        self._listener.close()
        deadline = loop.time() + self.options.shutdown_timeout
        await self._wait_until(lambda: self._inflight == 0, deadline)
        self._close_all()
        for protocol in list(self._protocols):
            if protocol.proto.state is State.HANDSHAKE:
                protocol.proto.close()  # not upgraded yet: nothing to say goodbye with
        close_deadline = min(deadline, loop.time() + self.options.close_timeout) + 0.5
        await self._wait_until(lambda: not self._protocols and not self._tasks, close_deadline)
        for protocol in list(self._protocols):
            protocol.abort()
        await self._wait_until(lambda: not self._tasks, loop.time() + 1.0)
        for task in list(self._tasks):
            task.cancel()
        if self._storage_task is not None:
            self._storage_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._storage_task
            self._storage_task = None
        await self._stop_storage()
        await self._listener.wait_closed()
        self._listener = None
        assert self._closed is not None
        self._closed.set()

    @staticmethod
    async def _wait_until(done: Callable[[], bool], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while not done() and loop.time() < deadline:
            await asyncio.sleep(0.01)

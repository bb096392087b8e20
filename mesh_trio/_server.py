"""The trio binding of the core: sockets, timers and tasks.

Each connection is two tasks: a reader that feeds the core and a writer that
flushes what the core queued and runs its timers (the writer sleeps until the
core's next deadline or until the core wakes it). Request handlers run in the
server's nursery, so a slow handler never blocks a connection's reads. While
the core has too many of a client's requests waiting (``reading_paused``),
the reader waits for a wake-up instead of reading.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import trio

from mesh_core import ServerConnection, ServerCore, State

__all__ = ["MeshServer"]

log = logging.getLogger("mesh_trio")

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Link:
    """One accepted socket and its core state machine."""

    __slots__ = ("proto", "readable", "send_scope", "stream", "wakeup")

    def __init__(self, stream: trio.SocketStream, proto: ServerConnection) -> None:
        self.stream = stream
        self.proto = proto
        self.wakeup = trio.Event()
        self.readable = trio.Event()
        self.send_scope: trio.CancelScope | None = None
        proto.wake = self.wake

    def wake(self) -> None:
        self.wakeup.set()
        self.readable.set()
        if self.proto.aborted and self.send_scope is not None:
            self.send_scope.cancel()  # the peer is not reading: stop waiting on it


class MeshServer(ServerCore):
    """A Mesh server on trio. Same constructor and API as
    ``mesh_asyncio.MeshServer``; see :class:`mesh_core.ServerCore`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nursery: trio.Nursery | None = None
        self._listeners: list[trio.SocketListener] = []
        self._links: set[_Link] = set()
        self._stop_requested: trio.Event | None = None
        self._stopped: trio.Event | None = None

    # -- runtime hooks for the core -------------------------------------------

    def _now(self) -> float:
        return trio.current_time()

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # -- lifecycle ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually bound (useful after listening on port 0)."""
        if not self._listeners:
            raise RuntimeError("the server is not listening")
        return int(self._listeners[0].socket.getsockname()[1])

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        *,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[MeshServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and run until :meth:`close`. With ``nursery.start`` it
        returns once listening: ``server = await nursery.start(srv.serve, h, p)``."""
        if self._stop_requested is not None:
            raise RuntimeError("the server is already running")
        self._stop_requested = trio.Event()
        self._stopped = trio.Event()
        try:
            await self._start_storage()
            if reuse_port:
                self._listeners = [await _reuse_port_listener(host, port)]
            else:
                self._listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
            for listener in self._listeners:
                name = listener.socket.getsockname()
                log.info("Mesh server (trio) listening on ws://%s:%d", name[0], name[1])
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                accepting = trio.CancelScope()
                nursery.start_soon(self._accept, accepting)
                duties = getattr(self.storage, "run", None)  # heartbeats, sweeps (Redis)
                if callable(duties):
                    nursery.start_soon(duties)
                task_status.started(self)
                await self._stop_requested.wait()
                accepting.cancel()
                for listener in self._listeners:
                    await listener.aclose()
                await self._shutdown()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._listeners = []
            with trio.CancelScope(shield=True):
                await self._stop_storage()
            self._stopped.set()
            self._stop_requested = None

    async def _accept(self, scope: trio.CancelScope) -> None:
        assert self._nursery is not None
        with scope:
            await trio.serve_listeners(
                self._handle_stream, self._listeners, handler_nursery=self._nursery
            )

    async def _shutdown(self) -> None:
        deadline = trio.current_time() + self.options.shutdown_timeout
        with trio.move_on_at(deadline):
            while self._inflight:
                await trio.sleep(0.01)
        self._close_all()
        with trio.move_on_at(min(deadline, trio.current_time() + self.options.close_timeout) + 0.5):
            while self._links or self._local:
                await trio.sleep(0.01)

    async def close(self) -> None:
        """Graceful shutdown: stop accepting, let requests in flight finish
        (up to ``shutdown_timeout``), send every client close 1001, wait for
        them to be cleaned out of the store, then stop."""
        if self._stop_requested is None or self._stopped is None:
            return
        stopped = self._stopped
        self._stop_requested.set()
        await stopped.wait()

    @asynccontextmanager
    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[MeshServer]:
        """``async with server.listen(host, port):`` serve inside the block."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serve, host, port)
            try:
                yield self
            finally:
                await self.close()

    # -- one connection -------------------------------------------------------

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            address = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        except OSError:
            address = None
        link = _Link(stream, self._new_protocol(address, trio.current_time()))
        self._links.add(link)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, link)
                await self._write(link)
                nursery.cancel_scope.cancel()
        finally:
            self._links.discard(link)
            link.proto.receive_data(None, trio.current_time())
            self._feed(link)
            with trio.CancelScope(shield=True):
                if link.proto.aborted:
                    await trio.aclose_forcefully(stream)
                else:
                    await _close(stream)

    def _feed(self, link: _Link) -> None:
        events = link.proto.events()
        if events:
            self._handle_events(link.proto, events)

    async def _read(self, link: _Link) -> None:
        proto = link.proto
        while True:
            while proto.reading_paused:
                link.readable = trio.Event()
                await link.readable.wait()
            try:
                data = await link.stream.receive_some(65536)
            except _GONE:
                data = b""
            proto.receive_data(data or None, trio.current_time())
            self._feed(link)
            link.wake()
            if not data:
                return

    async def _write(self, link: _Link) -> None:
        proto = link.proto
        while True:
            self._feed(link)
            data = proto.data_to_send()
            if data:
                with trio.CancelScope() as scope:
                    link.send_scope = scope
                    try:
                        await link.stream.send_all(data)
                    except _GONE:
                        proto.receive_data(None, trio.current_time())
                link.send_scope = None
                continue
            if proto.state is State.CLOSED:
                return
            now = trio.current_time()
            deadline = proto.next_deadline()
            if deadline is not None and deadline <= now:
                proto.tick(now)
                continue
            link.wakeup = trio.Event()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await link.wakeup.wait()


async def _close(stream: trio.SocketStream) -> None:
    with trio.move_on_after(1.0):
        await stream.aclose()


async def _reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    """One listening socket with SO_REUSEPORT, so several worker processes
    can accept on the same port (``mesh serve --workers``)."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)

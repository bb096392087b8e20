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
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, cast

from mesh_core import ServerCore
from mesh_core.app import reset_on_close
from mesh_core.protocol import ServerConnection, State

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
        "_sockets",
        "_timer",
        "_timer_at",
        "proto",
        "transport",
    )

    def __init__(
        self, server: MeshServer, sockets: _Sockets, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._server = server
        self._sockets = sockets
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
        self.proto = self._server.new_protocol(peer, self._loop.time())
        self.proto.wake = self._wake
        self._sockets.open.add(self)
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
        self._sockets.open.discard(self)

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
            self._server.handle_events(proto, events)
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
                _reset(transport)
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


def _reset(transport: asyncio.Transport) -> None:
    """Drop a slow consumer: reset the connection rather than close it
    (:func:`mesh_core.app.reset_on_close`). With TLS the socket is the one
    under the TLS layer."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        reset_on_close(sock.setsockopt, socket.SOL_SOCKET, socket.SO_LINGER)
    transport.abort()


class _Sockets:
    """The listener and the sockets it accepted, as the core's shutdown
    sequence sees them (:class:`mesh_core.app.ServerSockets`)."""

    def __init__(self, listener: asyncio.Server) -> None:
        self.listener = listener
        self.open: set[_WebSocketProtocol] = set()

    async def stop_accepting(self) -> None:
        self.listener.close()

    def protocols(self) -> list[ServerConnection]:
        return [protocol.proto for protocol in self.open]

    def abort(self) -> None:
        for protocol in list(self.open):
            protocol.abort()


class _MonitorStream:
    """An accepted metrics-port connection as the core's ``MonitorStream``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self._reader.read(max_bytes)

    async def send_all(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def aclose(self) -> None:
        self._writer.close()


class MeshServer(ServerCore):
    """A Mesh server on asyncio. Same constructor and API as
    ``mesh_trio.MeshServer``; see :class:`mesh_core.ServerCore`.

    The server's life (storage, the core's tasks, the shutdown) runs in one
    task started by :meth:`start`, inside :meth:`ServerCore.serving`, so
    that ``start`` can return while the server runs, as asyncio servers do.
    """

    tls_context_type = ssl.SSLContext
    new_tls_context = staticmethod(partial(ssl.create_default_context, ssl.Purpose.CLIENT_AUTH))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, runtime=RUNTIME, **kwargs)
        self._listener: asyncio.Server | None = None
        self._main: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None

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
        if self._main is not None:
            raise RuntimeError("the server is already listening")
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._closed = asyncio.Event()
        listening: asyncio.Future[None] = loop.create_future()
        self._main = loop.create_task(self._run(host, port, sock, reuse_port, listening))
        await listening

    async def _run(
        self,
        host: str,
        port: int,
        sock: socket.socket | None,
        reuse_port: bool,
        listening: asyncio.Future[None],
    ) -> None:
        loop = asyncio.get_running_loop()
        assert self._stop is not None and self._closed is not None
        try:
            await self.start_storage()
            try:
                async with self.serving():
                    monitor = await self._listen_monitor()
                    try:
                        sockets = await self._listen(loop, host, port, sock, reuse_port)
                        listening.set_result(None)
                        await self._stop.wait()
                        await self.shutdown(sockets)  # /healthz says 503 meanwhile
                    finally:  # also when listening or the shutdown failed
                        if monitor is not None:
                            monitor.close()
                    await sockets.listener.wait_closed()
            finally:
                await self.stop_storage()
        except BaseException as exc:
            if listening.done():
                raise
            listening.set_exception(exc)  # start() raises it
        finally:
            self._listener = None
            self._main = None
            self._closed.set()

    async def _listen(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        sock: socket.socket | None,
        reuse_port: bool,
    ) -> _Sockets:
        sockets: _Sockets | None = None

        def factory() -> _WebSocketProtocol:
            assert sockets is not None
            return _WebSocketProtocol(self, sockets, loop)

        # with TLS, asyncio runs each handshake on its own (accepts go on),
        # bounded by the same timeout as the WebSocket upgrade after it
        tls: dict[str, Any] = {}
        if self.ssl is not None:
            tls = {"ssl": self.ssl, "ssl_handshake_timeout": self.options.handshake_timeout}
        if sock is not None:
            listener = await loop.create_server(factory, sock=sock, backlog=1024, **tls)
        else:
            listener = await loop.create_server(
                factory, host, port, reuse_port=reuse_port or None, backlog=1024, **tls
            )
        sockets = _Sockets(listener)
        self._listener = listener
        uvloop = type(loop).__module__.startswith("uvloop")
        names = [s.getsockname() for s in listener.sockets]
        log.info(self.listening_line(names, "uvloop" if uvloop else "asyncio"))
        return sockets

    async def _listen_monitor(self) -> asyncio.Server | None:
        """The metrics port (``/metrics``, ``/healthz``), if one was asked
        for; each connection is one task of :meth:`ServerCore.serve_monitor`."""
        if self.metrics_port is None and self.metrics_sock is None:
            return None

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.serve_monitor(_MonitorStream(reader, writer))

        try:
            if self.metrics_sock is not None:
                monitor = await asyncio.start_server(answer, sock=self.metrics_sock)
            else:
                monitor = await asyncio.start_server(answer, self.metrics_host, self.metrics_port)
        except OSError as exc:
            raise self.monitor_bind_failed(exc) from exc
        self.monitor_listening(monitor.sockets[0].getsockname())
        return monitor

    async def serve(self, host: str = "127.0.0.1", port: int = 8765) -> None:
        """Listen and run until :meth:`close` is called (from another task)."""
        await self.start(host, port)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await self._closed.wait()

    @asynccontextmanager
    async def listen(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
    ) -> AsyncIterator[MeshServer]:
        """``async with server.listen(host, port):`` serve inside the block
        (``sock``: on a listening socket made elsewhere instead)."""
        await self.start(host, port, reuse_port=reuse_port, sock=sock)
        try:
            yield self
        finally:
            await self.close()

    async def close(self) -> None:
        """Graceful shutdown (:meth:`ServerCore.shutdown`): stop accepting, let
        requests in flight finish (up to ``shutdown_timeout``), send every
        client close 1001, wait for them to be cleaned out of the store, then
        stop."""
        main = self._main
        if main is not None and self._stop is not None:
            self._stop.set()
            await asyncio.shield(main)
        await self.wait_closed()

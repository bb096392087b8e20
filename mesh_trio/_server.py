"""The trio binding of the core: sockets, timers and tasks.

Each connection is one task on a plain non-blocking socket: it waits (through
``trio.lowlevel``) until the socket is readable, its next timer is due, or
the core woke it, and feeds the core what it read. Output does not need a
task of its own: whatever the core queues is written straight away with a
non-blocking ``send``, by the connection's task when it produced the output
itself, and otherwise by one flusher task for the whole server, so a room
broadcast to a thousand members costs one task switch, not a thousand. Only
when a socket is full does its task wait for it to drain (and stop reading
from it meanwhile: the core drops consumers that fall too far behind).

Request handlers run in the server's nursery, so a slow handler never blocks
a connection's reads. While the core has too many of a client's requests
waiting (``reading_paused``), the connection's task stops reading.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from mesh_core import ServerCore
from mesh_core.app import reset_on_close
from mesh_core.protocol import ServerConnection, State

from ._runtime import RUNTIME
from ._tls import TLSSocket

__all__ = ["MeshServer"]

log = logging.getLogger("mesh_trio")

_READ_SIZE = 65536
# what a connection's task waits for (besides its next timer and a wake-up)
_RUN, _READABLE, _WRITABLE, _TIMER = range(4)
# accept() errors that mean "out of resources right now": wait and retry
# (as trio.serve_listeners does), instead of ending the accept loop
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept() errors about that one connection (a reset before it was accepted,
# a firewall, pending network errors Linux reports here): skip it. The list
# trio.SocketListener ignores.
_ACCEPT_SKIP = {
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
}


class _Link:
    """One accepted socket, its core state machine, and what is left to send."""

    __slots__ = (
        "cancel_scope",
        "closed_at",
        "dirty",
        "done",
        "eof",
        "out",
        "proto",
        "scope",
        "server",
        "sock",
        "waiting_for",
        "woken",
    )

    def __init__(
        self, server: MeshServer, sock: socket.socket | TLSSocket, proto: ServerConnection
    ) -> None:
        self.server = server
        self.sock = sock
        self.proto = proto
        # the wait the connection's task is in (None while it runs)
        self.scope: trio.CancelScope | None = None
        self.out: memoryview | None = None  # output the socket did not take yet
        self.dirty = False  # queued for the flusher
        self.woken = False  # the core queued something since the last pump
        self.done = False  # the socket is closed
        self.eof = False  # the peer sent everything it will send
        self.closed_at: float | None = None  # when the core reached CLOSED
        self.waiting_for = _RUN
        self.cancel_scope = trio.CancelScope()  # the whole task: aborts the socket
        proto.wake = self.wake

    def wanted(self) -> int:
        """What the connection's task has to wait for next."""
        if self.out is not None:
            return _WRITABLE
        if self.eof or self.proto.reading_paused or self.proto.state is State.CLOSED:
            return _TIMER
        return _READABLE

    def wake(self) -> None:
        self.woken = True
        if self.scope is not None and not self.dirty:
            # the task is waiting: the flusher writes for it
            self.dirty = True
            self.server._to_flush.append(self)
            self.server._flush_needed.set()


class _Sockets:
    """The listeners and the sockets they accepted, as the core's shutdown
    sequence sees them (:class:`mesh_core.app.ServerSockets`)."""

    def __init__(self, server: MeshServer) -> None:
        self._server = server
        self.accepting = trio.CancelScope()
        self.accepted_all = trio.Event()
        self.links: set[_Link] = set()

    async def stop_accepting(self) -> None:
        self.accepting.cancel()
        await self.accepted_all.wait()  # no accept() on a closed listener
        self._server._close_listeners()

    def protocols(self) -> list[ServerConnection]:
        return [link.proto for link in self.links]

    def abort(self) -> None:
        for link in list(self.links):
            link.cancel_scope.cancel()


class MeshServer(ServerCore):
    """A Mesh server on trio. Same constructor and API as
    ``mesh_asyncio.MeshServer``; see :class:`mesh_core.ServerCore`."""

    tls_context_type = ssl.SSLContext
    new_tls_context = staticmethod(partial(ssl.create_default_context, ssl.Purpose.CLIENT_AUTH))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, runtime=RUNTIME, **kwargs)
        self._nursery: trio.Nursery | None = None
        self._listeners: list[socket.socket] = []
        self._monitor: list[trio.SocketListener] = []
        self._sockets: _Sockets | None = None
        self._to_flush: list[_Link] = []
        self._flush_needed = trio.Event()
        self._stop_requested: trio.Event | None = None
        self._stopped: trio.Event | None = None

    # -- lifecycle ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually bound (useful after listening on port 0)."""
        if not self._listeners:
            raise RuntimeError("the server is not listening")
        return int(self._listeners[0].getsockname()[1])

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
        task_status: trio.TaskStatus[MeshServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and run until :meth:`close`. With ``nursery.start`` it
        returns once listening: ``server = await nursery.start(srv.serve, h, p)``.
        ``sock``: serve on this listening socket instead of binding ``host:port``."""
        if self._stop_requested is not None:
            raise RuntimeError("the server is already running")
        self._stop_requested = trio.Event()
        self._stopped = trio.Event()
        try:
            await self.start_storage()
            monitor = self._monitor = await self._listen_monitor()
            if sock is not None:
                sock.setblocking(False)
                self._listeners = [sock]
            elif reuse_port:
                self._listeners = [_reuse_port_socket(host, port)]
            else:
                self._listeners = [
                    _plain(listener.socket)
                    for listener in await trio.open_tcp_listeners(port, host=host, backlog=1024)
                ]
            names = [listener.getsockname() for listener in self._listeners]
            log.info(self.listening_line(names, "trio"))
            sockets = self._sockets = _Sockets(self)
            async with trio.open_nursery() as nursery, self.serving():
                self._nursery = nursery
                if monitor:  # /healthz answers (503) during the shutdown too
                    nursery.start_soon(trio.serve_listeners, self._answer_monitor, monitor)
                nursery.start_soon(self._accept_all, sockets)
                nursery.start_soon(self._flusher)
                task_status.started(self)
                await self._stop_requested.wait()
                await self.shutdown(sockets)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._sockets = None
            self._close_listeners()
            for listener in self._monitor:
                listener.socket.close()
            self._monitor = []
            with trio.CancelScope(shield=True):
                await self.stop_storage()
            self._stopped.set()
            self._stop_requested = None

    async def _listen_monitor(self) -> list[trio.SocketListener]:
        """The metrics port (``/metrics``, ``/healthz``), if one was asked for."""
        if self.metrics_sock is not None:
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(self.metrics_sock))]
        elif self.metrics_port is not None:
            try:
                listeners = await trio.open_tcp_listeners(self.metrics_port, host=self.metrics_host)
            except OSError as exc:
                raise self.monitor_bind_failed(exc) from exc
        else:
            return []
        self.monitor_listening(listeners[0].socket.getsockname())
        return listeners

    async def _answer_monitor(self, stream: trio.SocketStream) -> None:
        await self.serve_monitor(stream)

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        self._listeners = []

    async def _accept_all(self, sockets: _Sockets) -> None:
        try:
            with sockets.accepting:
                async with trio.open_nursery() as nursery:
                    for sock in self._listeners:
                        nursery.start_soon(self._accept, sock)
        finally:
            sockets.accepted_all.set()

    async def _accept(self, listener: socket.socket) -> None:
        nursery = self._nursery
        assert nursery is not None
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(64):  # a burst of connections does not starve the others
                try:
                    sock, peer = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_SKIP:
                        continue
                    if exc.errno not in _ACCEPT_RETRY:
                        raise
                    log.error("accept() failed: %s; retrying in 100 ms", exc)
                    await trio.sleep(0.1)
                    break
                try:
                    sock.setblocking(False)
                    if sock.family != socket.AF_UNIX:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:  # reset already (some systems say so here)
                    sock.close()
                    continue
                nursery.start_soon(self._serve_link, sock, peer)

    async def close(self) -> None:
        """Graceful shutdown (:meth:`ServerCore.shutdown`): stop accepting, let
        requests in flight finish (up to ``shutdown_timeout``), send every
        client close 1001, wait for them to be cleaned out of the store, then
        stop."""
        if self._stop_requested is None or self._stopped is None:
            return
        stopped = self._stopped
        self._stop_requested.set()
        await stopped.wait()

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
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(self.serve, reuse_port=reuse_port, sock=sock), host, port)
            try:
                yield self
            finally:
                await self.close()

    # -- output ---------------------------------------------------------------

    async def _flusher(self) -> None:
        """Writes for connections whose task is waiting (broadcasts, replies
        from handler tasks): one task switch for any number of them."""
        while True:
            await self._flush_needed.wait()
            self._flush_needed = trio.Event()
            links, self._to_flush = self._to_flush, []
            for link in links:
                link.dirty = False
                if link.scope is None or link.done:
                    continue  # its own task is running and pumps it
                deadline = self._pump(link)
                scope = link.scope
                if link.wanted() != link.waiting_for or link.proto.state is State.CLOSED:
                    scope.cancel()  # its task has to wait for another thing
                elif scope.deadline != deadline:
                    scope.deadline = deadline

    def _pump(self, link: _Link) -> float:
        """Feed the core's events to the server, write what the core queued
        (as far as the socket takes it without blocking); return the time at
        which the core's next timer is due."""
        proto = link.proto
        while True:
            link.woken = False
            events = proto.events()
            if events:
                self.handle_events(proto, events)
            if link.out is None and not link.done:
                data = proto.data_to_send()
                if data:
                    self._send(link, data)
            if not link.woken:
                break
        deadline = proto.next_deadline()
        return math.inf if deadline is None else deadline

    def _send(self, link: _Link, data: bytes | memoryview) -> None:
        try:
            sent = link.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            link.out = None
            link.proto.receive_data(None, trio.current_time())  # the peer is gone
            link.woken = True
            return
        link.out = memoryview(data)[sent:] if sent < len(data) else None

    # -- one connection -------------------------------------------------------

    async def _serve_link(self, sock: socket.socket, peer: Any) -> None:
        address = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        conn: socket.socket | TLSSocket = sock
        try:
            if self.ssl is not None:
                conn = await self._tls_handshake(sock, address)
                if conn is sock:
                    return
            try:
                early = conn.received_early() if isinstance(conn, TLSSocket) else b""
            except OSError as exc:  # a bad record behind the handshake, a reset
                log.debug("TLS connection from %s failed: %s", address, exc)
                return
            await self._serve_socket(conn, address, early)
        except Exception:
            # this task runs in the server's nursery: one connection's failure
            # must end that connection, never the server
            log.exception("connection from %s failed", address)
        finally:
            conn.close()

    async def _tls_handshake(
        self, sock: socket.socket, address: tuple[str, int] | None
    ) -> socket.socket | TLSSocket:
        """TLS first, in the connection's own task (accepts go on), bounded
        by the upgrade's timeout; ``sock`` itself if the handshake failed."""
        assert isinstance(self.ssl, ssl.SSLContext)
        tls = TLSSocket(sock, self.ssl)
        with trio.move_on_after(self.options.handshake_timeout):
            try:
                await tls.handshake()
            except OSError as exc:
                log.debug("TLS handshake with %s failed: %s", address, exc)
                return sock
            return tls
        log.debug("TLS handshake with %s timed out", address)
        return sock

    async def _serve_socket(
        self, sock: socket.socket | TLSSocket, address: Any, early: bytes = b""
    ) -> None:
        link = _Link(self, sock, self.new_protocol(address, trio.current_time()))
        proto = link.proto
        if early:
            proto.receive_data(early, trio.current_time())
        sockets = self._sockets
        assert sockets is not None
        sockets.links.add(link)
        try:
            with link.cancel_scope:
                await self._run_link(link)
        finally:
            sockets.links.discard(link)
            proto.receive_data(None, trio.current_time())
            link.done = True
            self._pump(link)
            if proto.aborted:
                # a dropped slow consumer: reset, so the kernel frees what it
                # still holds for it and the client learns of it at once
                raw = sock.raw if isinstance(sock, TLSSocket) else sock
                reset_on_close(raw.setsockopt, socket.SOL_SOCKET, socket.SO_LINGER)

    async def _run_link(self, link: _Link) -> None:
        proto, sock = link.proto, link.sock
        while True:
            deadline = self._pump(link)
            now = trio.current_time()
            if proto.state is State.CLOSED:
                if link.out is None or proto.aborted:
                    return
                # flush the close frame, but not for longer than close_timeout
                if link.closed_at is None:
                    link.closed_at = now
                deadline = min(deadline, link.closed_at + self.options.close_timeout)
                if deadline <= now:
                    return
            elif deadline <= now:
                proto.tick(now)
                continue
            wanted = link.wanted()
            with trio.CancelScope(deadline=deadline) as scope:
                link.scope = scope
                link.waiting_for = wanted
                try:
                    if wanted == _READABLE:
                        await trio.lowlevel.wait_readable(sock)
                    elif wanted == _WRITABLE:
                        await trio.lowlevel.wait_writable(sock)
                    else:
                        await trio.sleep_forever()
                finally:
                    link.scope = None
                    link.waiting_for = _RUN
            if scope.cancelled_caught:
                continue  # a timer is due, or the flusher wants another wait
            if wanted == _WRITABLE:
                if link.out is not None:
                    self._send(link, link.out)
                continue
            try:
                data = sock.recv(_READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                link.eof = True
            proto.receive_data(data or None, trio.current_time())


def _plain(sock: trio.socket.SocketType) -> socket.socket:
    """The listening socket as a plain non-blocking socket (trio sockets own
    their file descriptor; ``detach`` hands it over)."""
    plain = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    plain.setblocking(False)
    return plain


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """One listening socket with SO_REUSEPORT, so several worker processes
    can accept on the same port (``mesh serve --workers``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock

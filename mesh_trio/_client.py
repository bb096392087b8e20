"""The trio binding of the client role: a socket served by a reader, a writer
and a heartbeat watchdog, under a supervisor task that reconnects.

Mirrors ``mesh_asyncio/_client.py``: same public API, same lifecycle. trio
wants every task in a nursery, so the client's background work lives in a
nursery the client opens itself: use it as ``async with MeshClient(url) as
client:``; ``connect()``/``close()`` are for use inside that block (to close
early, or to connect again after a close).
"""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections.abc import Awaitable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from mesh_core import (
    ClientOptions,
    CommandTimeout,
    ConnectionRejected,
    MeshClientError,
    MeshConnectionError,
)
from mesh_core.client import ClientCore, ClientStatus, PushBuffer, reconnect_delay
from mesh_core.protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ClientConnection,
    ClientState,
    Closed,
    Connected,
    Push,
    Rejected,
    Response,
)

__all__ = ["MeshClient"]

log = logging.getLogger("mesh_trio.client")

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Waiter:
    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _Link:
    """One socket and its connection state machine."""

    def __init__(self, stream: trio.abc.Stream, conn: ClientConnection) -> None:
        self.stream = stream
        self.conn = conn
        self.waiters: dict[int, _Waiter] = {}
        self.closed: Closed | None = None
        self.wakeup = trio.Event()
        self.done = trio.Event()

    def wake(self) -> None:
        self.wakeup.set()

    def fail_waiters(self, error: BaseException) -> None:
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            if not waiter.event.is_set():
                waiter.error = error
                waiter.event.set()


class _PushIterator:
    """``async for push in client.pushes():`` ends when the client closes."""

    def __init__(self, client: MeshClient, maxlen: int) -> None:
        self._client = client
        self._buffer = PushBuffer(maxlen)
        self._ready = trio.Event()
        self._buffer.wake = self._ready.set
        client._buffers.add(self._buffer)

    def __aiter__(self) -> _PushIterator:
        return self

    async def __anext__(self) -> Push:
        buffer = self._buffer
        while True:
            if buffer.items:
                return buffer.items.popleft()
            if buffer.closed:
                raise StopAsyncIteration
            self._ready = trio.Event()
            buffer.wake = self._ready.set
            await self._ready.wait()

    async def aclose(self) -> None:
        """Stop buffering pushes for this iterator."""
        self._client._buffers.discard(self._buffer)
        self._buffer.close()


class MeshClient(ClientCore):
    """A Mesh client on trio; same API as ``mesh_asyncio.MeshClient``.

    ``async with MeshClient(url) as client:`` connects on entry and closes on
    exit; the client's tasks run in a nursery of its own, opened there.
    Commands issued while the client reconnects wait (within their timeout)
    and are sent once the rooms are re-joined.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ping_timeout: float = 30.0,
        max_missed_pings: int = 1,
        reconnect: bool = True,
        reconnect_interval: float = 2.0,
        max_reconnect_interval: float = 30.0,
        max_reconnect_attempts: int | None = None,
        reconnect_jitter: float = 0.25,
        raise_errors: bool = True,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 10.0,
        close_timeout: float = 5.0,
        push_buffer: int = 1024,
    ) -> None:
        options = ClientOptions(
            ping_timeout=ping_timeout,
            max_missed_pings=max_missed_pings,
            reconnect=reconnect,
            reconnect_interval=reconnect_interval,
            max_reconnect_interval=max_reconnect_interval,
            max_reconnect_attempts=max_reconnect_attempts,
            reconnect_jitter=reconnect_jitter,
            raise_errors=raise_errors,
            max_message_size=max_message_size,
            connect_timeout=connect_timeout,
            close_timeout=close_timeout,
            push_buffer=push_buffer,
        )
        super().__init__(url, headers=headers, options=options)
        if ssl_context is None and self.endpoint.secure:
            ssl_context = ssl.create_default_context()
        self._ssl = ssl_context
        self._link: _Link | None = None
        self._status_changed = trio.Event()
        self._nursery_cm: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._supervisor_scope: trio.CancelScope | None = None
        self._supervisor_done: trio.Event | None = None
        self._callbacks: dict[trio.lowlevel.Task, trio.CancelScope] = {}
        self._closing = False

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> MeshClient:
        if self._nursery is not None:
            raise RuntimeError("this MeshClient is already in use")
        cm = trio.open_nursery()
        nursery = await cm.__aenter__()
        self._nursery_cm, self._nursery = cm, nursery
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
            raise RuntimeError(
                "a trio MeshClient runs its tasks in its own nursery: "
                "use `async with MeshClient(url) as client:`"
            )
        if self.status is ClientStatus.ONLINE:
            return
        if self.status in (ClientStatus.CONNECTING, ClientStatus.RECONNECTING):
            await self._ready()
            return
        self._closing = False
        self._set_status(ClientStatus.CONNECTING)
        try:
            link, backlog = await self._open_link()
        except BaseException:
            self._set_status(ClientStatus.IDLE)
            raise
        if self._closing:  # close() was called meanwhile
            await trio.aclose_forcefully(link.stream)
            self._set_status(ClientStatus.CLOSED)
            raise MeshConnectionError("the client was closed while connecting")
        self._install(link)
        scope, done = self._supervisor_scope, self._supervisor_done = (
            trio.CancelScope(),
            trio.Event(),
        )
        self._nursery.start_soon(self._supervise, link, backlog, scope, done)
        self._set_status(ClientStatus.ONLINE)
        self._emit("connect")

    async def close(self) -> None:
        """Send a close frame, wait (``close_timeout``) for the server's, stop
        reconnecting, fail waiting commands, end ``pushes()`` iterators and
        leave no task running. Idempotent."""
        if self.status in (ClientStatus.IDLE, ClientStatus.CLOSED) or self._closing:
            return
        self._closing = True
        was_online = self.status is ClientStatus.ONLINE
        link, scope, done = self._link, self._supervisor_scope, self._supervisor_done
        if link is not None and link.conn.state is ClientState.OPEN and done is not None:
            link.conn.close(1000, "")
            link.wake()
            with trio.move_on_after(self.options.close_timeout):
                await link.done.wait()
        if scope is not None:
            scope.cancel()
        if done is not None:
            await done.wait()
        await self._shut_down(disconnected=was_online)

    async def _shut_down(self, *, disconnected: bool = False) -> None:
        if self._link is not None:
            self._drop(self._link, MeshConnectionError("the client was closed"))
        self._supervisor_scope = self._supervisor_done = None
        self._rooms.clear()
        self.connection_id = None
        self._set_status(ClientStatus.CLOSED)
        self._close_buffers()
        current = trio.lowlevel.current_task()
        for task, scope in list(self._callbacks.items()):
            if task is not current:
                scope.cancel()
        # the last listeners run to completion before close() returns
        for name in ("disconnect", "close") if disconnected else ("close",):
            for awaitable in self._emit(name, collect=True):
                try:
                    await awaitable
                except Exception:
                    log.exception("Mesh client %r listener failed", name)
        with trio.move_on_after(self.options.close_timeout):
            while any(task is not current for task in self._callbacks):
                await trio.sleep(0.001)

    # -- commands -------------------------------------------------------------

    async def command(self, command: str, payload: Any = None, timeout: float | None = 30.0) -> Any:
        """Send a request and return the response payload. Raises
        :class:`CommandTimeout`, :class:`MeshConnectionError`, and with
        ``raise_errors`` :class:`MeshCommandError` for an error payload."""
        with trio.move_on_after(math.inf if timeout is None else timeout):
            link = await self._ready()
            return self._check(command, await self._call(link, command, payload))
        raise CommandTimeout(command, timeout or 0.0)

    async def _call(self, link: _Link, command: str, payload: Any) -> Any:
        id = link.conn.send_request(command, payload)
        waiter = _Waiter()
        link.waiters[id] = waiter
        link.wake()
        try:
            await waiter.event.wait()
        finally:
            if link.waiters.pop(id, None) is not None:
                link.conn.discard_request(id)
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    async def _ready(self) -> _Link:
        """Wait until the client is online (rooms re-joined after a reconnect)."""
        while True:
            if self.status is ClientStatus.ONLINE and self._link is not None:
                return self._link
            if self.status is ClientStatus.IDLE:
                raise MeshConnectionError("the client is not connected: call connect()")
            if self.status is ClientStatus.CLOSED:
                raise MeshConnectionError("the client is closed")
            await self._status_changed.wait()

    def _set_status(self, status: ClientStatus) -> None:
        self.status = status
        changed, self._status_changed = self._status_changed, trio.Event()
        changed.set()

    # -- pushes ---------------------------------------------------------------

    def pushes(self, maxlen: int | None = None) -> _PushIterator:
        """An async iterator of :class:`Push` events from now on; it ends when
        the client closes. Buffers up to ``maxlen`` (default ``push_buffer``)
        unread pushes, dropping the oldest beyond."""
        return _PushIterator(self, maxlen or self.options.push_buffer)

    def __aiter__(self) -> _PushIterator:
        return self.pushes()

    def _spawn_awaitable(self, awaitable: Awaitable[Any]) -> None:
        if self._nursery is None:
            close = getattr(awaitable, "close", None)
            if callable(close):
                close()  # never started: avoid "coroutine was never awaited"
            return
        self._nursery.start_soon(self._run_callback, awaitable)

    async def _run_callback(self, awaitable: Awaitable[Any]) -> None:
        task = trio.lowlevel.current_task()
        with trio.CancelScope() as scope:
            self._callbacks[task] = scope
            try:
                await awaitable
            except Exception:
                log.exception("Mesh client listener failed")
            finally:
                self._callbacks.pop(task, None)

    # -- links ----------------------------------------------------------------

    async def _open_link(self) -> tuple[_Link, list[Any]]:
        """TCP (+TLS), upgrade, and wait for ``mesh/assign-id``; returns the
        link and any events that came in the same read as the id."""
        endpoint = self.endpoint
        opts = self.options
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(opts.connect_timeout):
                stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
                if self._ssl is not None:
                    stream = trio.SSLStream(
                        stream, self._ssl, server_hostname=endpoint.host, https_compatible=True
                    )
                    await stream.do_handshake()
                conn = ClientConnection(
                    ping_timeout=opts.ping_timeout,
                    max_missed_pings=opts.max_missed_pings,
                    max_message_size=opts.max_message_size,
                )
                link = _Link(stream, conn)
                conn.initiate(endpoint.host_header, endpoint.target, self.headers)
                return link, await self._handshake(link)
        except BaseException as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(exc, MeshClientError):
                raise
            if isinstance(exc, trio.TooSlowError):
                raise MeshConnectionError(f"timed out connecting to {self.url}") from None
            if isinstance(exc, (OSError, *_GONE)):
                raise MeshConnectionError(f"cannot connect to {self.url}: {exc}") from exc
            raise

    async def _handshake(self, link: _Link) -> list[Any]:
        await link.stream.send_all(link.conn.data_to_send())
        while True:
            data = await link.stream.receive_some(65536)
            events = link.conn.receive_data(bytes(data) or None, trio.current_time())
            out = link.conn.data_to_send()
            if out:
                await link.stream.send_all(out)
            for i, event in enumerate(events):
                if isinstance(event, Connected):
                    return events[i + 1 :]
                if isinstance(event, Rejected):
                    raise ConnectionRejected(event.status, event.body)
                if isinstance(event, Closed):
                    raise MeshConnectionError(
                        f"connection closed during the handshake ({event.code} {event.reason})"
                    )

    def _install(self, link: _Link) -> None:
        self._link = link
        self.connection_id = link.conn.connection_id

    async def _serve(self, link: _Link, backlog: list[Any]) -> None:
        """Run the link's reader, writer and watchdog until the link ends."""
        self._dispatch(link, backlog)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, link)
                nursery.start_soon(self._watchdog, link, nursery.cancel_scope)
                await self._write(link)
                nursery.cancel_scope.cancel()
        finally:
            # wake whoever waits on this link (a re-join in progress, commands)
            link.fail_waiters(MeshConnectionError("connection lost before the response"))
            with trio.CancelScope(shield=True):
                if link.conn.state is ClientState.CLOSED:
                    with trio.move_on_after(1.0):
                        await link.stream.aclose()
                await trio.aclose_forcefully(link.stream)
            link.done.set()

    async def _read(self, link: _Link) -> None:
        conn = link.conn
        while link.closed is None:
            try:
                data = await link.stream.receive_some(65536)
            except _GONE:
                data = b""
            self._dispatch(link, conn.receive_data(bytes(data) or None, trio.current_time()))
            link.wake()

    async def _write(self, link: _Link) -> None:
        conn = link.conn
        while True:
            data = conn.data_to_send()
            if data:
                try:
                    await link.stream.send_all(data)
                except _GONE:
                    self._dispatch(link, conn.receive_data(None, trio.current_time()))
                    return
                continue
            if link.closed is not None:
                return
            link.wakeup = trio.Event()
            await link.wakeup.wait()

    async def _watchdog(self, link: _Link, scope: trio.CancelScope) -> None:
        conn = link.conn
        while (deadline := conn.next_deadline()) is not None:
            await trio.sleep_until(deadline)
            if conn.is_dead(trio.current_time()):
                log.info("Mesh client: no ping from %s, reconnecting", self.url)
                link.closed = Closed(1006, "ping timeout")
                scope.cancel()
                return

    def _dispatch(self, link: _Link, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Response):
                waiter = link.waiters.pop(event.id, None)
                if waiter is not None and not waiter.event.is_set():
                    waiter.value = event.payload
                    waiter.event.set()
            elif isinstance(event, Closed):
                link.closed = event
                link.wake()
            else:
                self._deliver(event)

    def _drop(self, link: _Link, error: BaseException) -> None:
        link.fail_waiters(error)
        if self._link is link:
            self._link = None

    async def _supervise(
        self, link: _Link | None, backlog: list[Any], scope: trio.CancelScope, done: trio.Event
    ) -> None:
        """Serve the link; when it ends, reconnect (unless closing)."""
        try:
            with scope:
                try:
                    await self._supervise_links(link, backlog)
                except Exception:  # a bug: never leave commands hanging on it
                    log.exception("Mesh client supervisor failed")
                if not self._closing:
                    self._closing = True
                    await self._shut_down()
        finally:
            done.set()

    async def _supervise_links(self, link: _Link | None, backlog: list[Any]) -> None:
        rejoin = False
        while link is not None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve, link, backlog)
                if rejoin:
                    await self._rejoin(link)
                    if link.closed is None and not link.done.is_set():
                        self._set_status(ClientStatus.ONLINE)
                        self._emit("connect")
                        self._emit("reconnect")
            self._drop(link, MeshConnectionError("connection lost before the response"))
            if self._closing:
                return
            self._set_status(ClientStatus.RECONNECTING)
            self._emit("disconnect")
            if not self.options.reconnect:
                return
            link, backlog = await self._reconnect()
            rejoin = True
            if link is None:
                self._emit("reconnect_failed")

    async def _reconnect(self) -> tuple[_Link | None, list[Any]]:
        opts = self.options
        attempt = 0
        while opts.max_reconnect_attempts is None or attempt < opts.max_reconnect_attempts:
            if attempt:
                await trio.sleep(reconnect_delay(attempt, opts, random.random()))
            attempt += 1
            try:
                link, backlog = await self._open_link()
            except MeshConnectionError as exc:
                log.debug("Mesh client: reconnect attempt %d failed: %s", attempt, exc)
                continue
            self._install(link)
            return link, backlog
        return None, []

    async def _rejoin(self, link: _Link) -> None:
        """Re-join the rooms before any queued command goes out."""

        async def join(room: str) -> None:
            with trio.move_on_after(self.options.connect_timeout):
                try:
                    result = await self._call(link, "mesh/join-room", {"roomName": room})
                except MeshConnectionError:
                    return
                if not (isinstance(result, dict) and result.get("success")):
                    log.warning("Mesh client: could not re-join room %r: %r", room, result)
                    self._rooms.pop(room, None)

        async with trio.open_nursery() as nursery:
            for room in list(self._rooms):
                nursery.start_soon(join, room)

"""The asyncio binding of the client role: a socket, a reader task and a
supervisor task that reconnects.

Mirrors ``mesh_trio/_client.py``: same public API, same lifecycle. One
:class:`_Link` per socket; the supervisor owns the current link, and when it
goes away fails what was in flight on it, reconnects with backoff, re-joins
the rooms and only then lets queued commands through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

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

log = logging.getLogger("mesh_asyncio.client")


class _Link:
    """One socket and its connection state machine."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: ClientConnection
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.waiters: dict[int, asyncio.Future[Any]] = {}
        self.closed: Closed | None = None

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def fail_waiters(self, error: BaseException) -> None:
        waiters, self.waiters = self.waiters, {}
        for future in waiters.values():
            if not future.done():
                future.set_exception(error)

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()


class _PushIterator:
    """``async for push in client.pushes():`` ends when the client closes."""

    def __init__(self, client: MeshClient, maxlen: int) -> None:
        self._client = client
        self._buffer = PushBuffer(maxlen)
        self._ready = asyncio.Event()
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
            self._ready.clear()
            await self._ready.wait()

    async def aclose(self) -> None:
        """Stop buffering pushes for this iterator."""
        self._client._buffers.discard(self._buffer)
        self._buffer.close()


class MeshClient(ClientCore):
    """A Mesh client on asyncio; same API as ``mesh_trio.MeshClient``.

    ``async with MeshClient(url) as client:`` or ``await client.connect()`` …
    ``await client.close()``. Commands issued while the client reconnects wait
    (within their timeout) and are sent once the rooms are re-joined.
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
        self._status_changed = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> MeshClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect; returns once the server assigned the connection id.
        Raises :class:`MeshConnectionError` (or ``ConnectionRejected``) when
        this first attempt fails: only an established client reconnects."""
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
            link.abort()
            self._set_status(ClientStatus.CLOSED)
            raise MeshConnectionError("the client was closed while connecting")
        self._install(link)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(link, backlog))
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
        link, supervisor = self._link, self._supervisor
        if link is not None and link.conn.state is ClientState.OPEN and supervisor is not None:
            link.conn.close(1000, "")
            link.flush()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(supervisor), self.options.close_timeout)
        if supervisor is not None and supervisor is not asyncio.current_task():
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        await self._shut_down(disconnected=was_online)

    async def _shut_down(self, *, disconnected: bool = False) -> None:
        if self._link is not None:
            self._drop(self._link, MeshConnectionError("the client was closed"))
        self._supervisor = None
        self._rooms.clear()
        self.connection_id = None
        self._set_status(ClientStatus.CLOSED)
        self._close_buffers()
        current = asyncio.current_task()
        for task in list(self._callbacks):
            if task is not current:
                task.cancel()
        # the last listeners run to completion before close() returns
        for name in ("disconnect", "close") if disconnected else ("close",):
            for awaitable in self._emit(name, collect=True):
                try:
                    await awaitable
                except Exception:
                    log.exception("Mesh client %r listener failed", name)
        pending = [task for task in self._callbacks if task is not current]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # -- commands -------------------------------------------------------------

    async def command(self, command: str, payload: Any = None, timeout: float | None = 30.0) -> Any:
        """Send a request and return the response payload. Raises
        :class:`CommandTimeout`, :class:`MeshConnectionError`, and with
        ``raise_errors`` :class:`MeshCommandError` for an error payload."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline) as scope:
                link = await self._ready()
                result = await self._call(link, command, payload)
        except TimeoutError:
            if scope.expired():
                raise CommandTimeout(command, timeout or 0.0) from None
            raise
        return self._check(command, result)

    async def _call(self, link: _Link, command: str, payload: Any) -> Any:
        id = link.conn.send_request(command, payload)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.waiters[id] = future
        link.flush()
        try:
            return await future
        finally:
            if link.waiters.pop(id, None) is not None:
                link.conn.discard_request(id)

    async def _ready(self) -> _Link:
        """Wait until the client is online (rooms re-joined after a reconnect)."""
        while True:
            if self.status is ClientStatus.ONLINE and self._link is not None:
                return self._link
            if self.status is ClientStatus.IDLE:
                raise MeshConnectionError("the client is not connected: call connect()")
            if self.status is ClientStatus.CLOSED:
                raise MeshConnectionError("the client is closed")
            changed = self._status_changed
            await changed.wait()

    def _set_status(self, status: ClientStatus) -> None:
        self.status = status
        changed, self._status_changed = self._status_changed, asyncio.Event()
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
        task = asyncio.get_running_loop().create_task(_run_callback(awaitable))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    # -- links ----------------------------------------------------------------

    async def _open_link(self) -> tuple[_Link, list[Any]]:
        """TCP (+TLS), upgrade, and wait for ``mesh/assign-id``; returns the
        link and any events that came in the same read as the id."""
        endpoint = self.endpoint
        opts = self.options
        try:
            async with asyncio.timeout(opts.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    endpoint.host,
                    endpoint.port,
                    ssl=self._ssl,
                    server_hostname=endpoint.host if self._ssl is not None else None,
                    limit=2**20,
                )
                conn = ClientConnection(
                    ping_timeout=opts.ping_timeout,
                    max_missed_pings=opts.max_missed_pings,
                    max_message_size=opts.max_message_size,
                )
                link = _Link(reader, writer, conn)
                try:
                    conn.initiate(endpoint.host_header, endpoint.target, self.headers)
                    return link, await self._handshake(link)
                except BaseException:
                    link.abort()
                    raise
        except MeshClientError:
            raise
        except TimeoutError:
            raise MeshConnectionError(f"timed out connecting to {self.url}") from None
        except OSError as exc:
            raise MeshConnectionError(f"cannot connect to {self.url}: {exc}") from exc

    async def _handshake(self, link: _Link) -> list[Any]:
        loop = asyncio.get_running_loop()
        link.flush()
        while True:
            data = await link.reader.read(65536)
            events = link.conn.receive_data(data or None, loop.time())
            link.flush()
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
        """Read until the link ends; abort it when no ping came in time."""
        loop = asyncio.get_running_loop()
        conn = link.conn
        self._dispatch(link, backlog)
        while link.closed is None:
            try:
                async with asyncio.timeout_at(conn.next_deadline()):
                    data = await link.reader.read(65536)
            except TimeoutError:
                if conn.is_dead(loop.time()):
                    log.info("Mesh client: no ping from %s, reconnecting", self.url)
                    link.closed = Closed(1006, "ping timeout")
                    break
                continue
            except OSError:
                data = b""
            self._dispatch(link, conn.receive_data(data or None, loop.time()))
            link.flush()
        # wake whoever waits on this link (a re-join in progress, commands)
        link.fail_waiters(MeshConnectionError("connection lost before the response"))
        if conn.state is ClientState.CLOSED:
            link.writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await link.writer.wait_closed()
        link.abort()

    def _dispatch(self, link: _Link, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Response):
                future = link.waiters.pop(event.id, None)
                if future is not None and not future.done():
                    future.set_result(event.payload)
            elif isinstance(event, Closed):
                link.closed = event
            else:
                self._deliver(event)

    def _drop(self, link: _Link, error: BaseException) -> None:
        link.fail_waiters(error)
        link.abort()
        if self._link is link:
            self._link = None

    async def _supervise(self, link: _Link | None, backlog: list[Any]) -> None:
        """Serve the link; when it ends, reconnect (unless closing)."""
        rejoin = False
        try:
            while link is not None:
                reader = asyncio.get_running_loop().create_task(self._serve(link, backlog))
                try:
                    if rejoin:
                        await self._rejoin(link)
                        if link.closed is None and not reader.done():
                            self._set_status(ClientStatus.ONLINE)
                            self._emit("connect")
                            self._emit("reconnect")
                    await reader
                finally:
                    if not reader.done():
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reader
                self._drop(link, MeshConnectionError("connection lost before the response"))
                if self._closing:
                    return
                self._set_status(ClientStatus.RECONNECTING)
                self._emit("disconnect")
                if not self.options.reconnect:
                    break
                link, backlog = await self._reconnect()
                rejoin = True
                if link is None:
                    self._emit("reconnect_failed")
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: never leave commands hanging on it
            log.exception("Mesh client supervisor failed")
        if not self._closing:
            self._closing = True
            await self._shut_down()

    async def _reconnect(self) -> tuple[_Link | None, list[Any]]:
        opts = self.options
        attempt = 0
        while opts.max_reconnect_attempts is None or attempt < opts.max_reconnect_attempts:
            if attempt:
                await asyncio.sleep(reconnect_delay(attempt, opts, random.random()))
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
            try:
                async with asyncio.timeout(self.options.connect_timeout):
                    result = await self._call(link, "mesh/join-room", {"roomName": room})
            except (TimeoutError, MeshConnectionError):
                return
            if not (isinstance(result, dict) and result.get("success")):
                log.warning("Mesh client: could not re-join room %r: %r", room, result)
                self._rooms.pop(room, None)

        await asyncio.gather(*(join(room) for room in list(self._rooms)))


async def _run_callback(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("Mesh client listener failed")

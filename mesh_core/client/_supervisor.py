"""The client's life over sockets, written once for every runtime: connect,
serve a link, notice that it died (the peer closed, the socket broke, or no
ping came in time), reconnect with backoff and jitter, re-join the rooms
before any queued command goes out, time commands out (freeing their ids),
deliver pushes, close.

Nothing here imports a runtime or a socket. What waits, starts a task or
reads the clock goes through the adapter's :class:`~mesh_core.runtime.Runtime`;
the bytes go through a :class:`ClientStream` the adapter opens (TCP or TLS:
read, write, close). Both come in a :class:`ClientBinding`, so an adapter's
``MeshClient`` is a binding and nothing else (plus trio's nursery).

Tasks. The long-lived ones (the supervisor, async listeners) are started with
the binding's ``start_task``: free tasks on asyncio, so that ``await
client.connect()`` works outside any block; the nursery the trio client opens
in ``async with``. Each can be cancelled and waited for (:class:`_Task`: the
runtime's task group doubles as a cancel scope). Below the supervisor all is
structured: one task group per link runs its reader, writer and watchdog.
A link is never torn down by cancelling it: closing the stream ends a pending
read, so the three tasks return by themselves and the stream is closed
gracefully when the closing handshake completed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import ConnectionRejected, MeshClientError, MeshConnectionError
from ..protocol import (
    ClientConnection,
    ClientEvent,
    ClientState,
    CloseCode,
    Closed,
    Connected,
    Rejected,
    Response,
)
from ..runtime import Event, Runtime
from ._options import ClientStatus, Endpoint, reconnect_delay

if TYPE_CHECKING:
    from ..runtime import TLSContext
    from ._core import ClientCore

__all__ = ["ClientBinding", "ClientStream", "Link", "OpenStream", "StartTask", "Supervisor"]

log = logging.getLogger("mesh_client")

#: bytes asked of the stream per read
READ_SIZE = 65536


class ClientStream(Protocol):
    """One byte stream to the server, opened by the adapter (TCP, or TLS over
    it). The supervisor runs at most one reader and one writer on it, and may
    close it while they wait."""

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes``; ``b""`` once the stream ended: the peer closed
        it, it broke, or it was closed here (a pending read returns then)."""
        ...

    async def send_all(self, data: bytes) -> None:
        """Raises ``OSError`` when the stream is broken or closed."""
        ...

    async def aclose(self) -> None:
        """Close gracefully: flush, end TLS, let the OS finish (the caller
        bounds the time)."""
        ...

    async def abort(self) -> None:
        """Close at once, without waiting for anything; idempotent, and safe
        while being cancelled."""
        ...


#: ``await open_stream(endpoint, ssl_context)``: a connected stream to
#: ``endpoint.host``/``port``, TLS over TCP when ``ssl_context`` is not
#: ``None``; raises ``OSError`` when it cannot connect
OpenStream = Callable[[Endpoint, "TLSContext | None"], Awaitable["ClientStream"]]

#: ``start_task(async_fn, *args)``: run it in the background; raises
#: ``RuntimeError`` when the client cannot run tasks now (trio outside ``async
#: with``)
StartTask = Callable[..., None]


@dataclass(frozen=True, slots=True)
class ClientBinding:
    """What an adapter gives ``ClientCore``: its runtime, how to open a
    stream, how to start a background task, and the TLS context a ``wss://``
    URL gets when none is given (``ssl.create_default_context``: the core
    imports no ``ssl``)."""

    runtime: Runtime
    open_stream: OpenStream
    start_task: StartTask
    default_tls: Callable[[], TLSContext]


class _Waiter:
    """A command's wait for its response (or for the link's loss)."""

    __slots__ = ("error", "event", "value")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.value: Any = None
        self.error: BaseException | None = None


class Link:
    """One stream and its connection state machine, for the life of one
    socket. ``out`` is what the state machine produced and the writer has not
    taken yet; ``ended`` is set with :attr:`closed`; ``done`` once the stream
    is closed."""

    __slots__ = (
        "_runtime",
        "_wakeup",
        "closed",
        "conn",
        "done",
        "ended",
        "out",
        "stream",
        "waiters",
    )

    def __init__(self, stream: ClientStream, conn: ClientConnection, runtime: Runtime) -> None:
        self.stream = stream
        self.conn = conn
        self.waiters: dict[int, _Waiter] = {}
        self.closed: Closed | None = None
        self.out = bytearray()
        self.ended = runtime.event()
        self.done = runtime.event()
        self._runtime = runtime
        self._wakeup = runtime.event()

    def flush(self) -> None:
        """Take what the state machine queued and wake the writer for it."""
        data = self.conn.data_to_send()
        if data:
            self.out += data
            self._wakeup.set()

    def end(self, closed: Closed) -> None:
        """The link is over (the first reason wins); the writer sends what is
        left and returns."""
        if self.closed is None:
            self.closed = closed
            self.ended.set()
            self._wakeup.set()

    async def next_output(self) -> bytes | None:
        """The next bytes to write; ``None`` once the link ended and all is
        written."""
        while True:
            self.out += self.conn.data_to_send()
            if self.out:
                data = bytes(self.out)
                self.out.clear()
                return data
            if self.closed is not None:
                return None
            self._wakeup = self._runtime.event()
            await self._wakeup.wait()

    def fail_waiters(self, error: BaseException) -> None:
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            if not waiter.event.is_set():
                waiter.error = error
                waiter.event.set()


class _Task:
    """A background task that another task can cancel and wait for. The
    runtime's task group is its cancel scope: cancelling the group ends the
    body quietly, on both runtimes."""

    __slots__ = ("_cancelled", "_on_done", "_scope", "done")

    def __init__(self, runtime: Runtime, on_done: Callable[[_Task], None] | None = None) -> None:
        self.done = runtime.event()
        self._cancelled = False
        self._scope: Any = None
        self._on_done = on_done

    async def run(
        self, runtime: Runtime, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any
    ) -> None:
        try:
            if not self._cancelled:
                _CURRENT_TASK.set(self)  # this task's own context: no reset needed
                async with runtime.open_task_group() as scope:
                    self._scope = scope
                    await fn(*args)
        finally:
            self._scope = None
            self.done.set()
            if self._on_done is not None:
                self._on_done(self)

    def cancel(self) -> None:
        self._cancelled = True
        if self._scope is not None:
            self._scope.cancel()


#: the :class:`_Task` the current task runs, if any (``close()`` called from an
#: async listener must not cancel that listener)
_CURRENT_TASK: ContextVar[_Task | None] = ContextVar("mesh_client_task", default=None)


class Supervisor:
    """Drives one client's links. ``ClientCore`` owns one and forwards
    ``connect``, ``close`` and ``command`` to it; the state that outlives a
    socket (options, rooms, listeners, status) stays on the client."""

    def __init__(self, client: ClientCore) -> None:
        self.client = client
        #: the link commands go out on (``None`` while offline)
        self.link: Link | None = None
        self.closing = False
        #: how the last connection ended, for the disconnect and close events
        self.last_closed: Closed | None = None
        #: where the jitter of each reconnect delay comes from (in [0, 1))
        self.rand: Callable[[], float] = random.random
        self._status_changed = self._runtime.event()
        self._task: _Task | None = None
        self._listeners: set[_Task] = set()

    @property
    def _runtime(self) -> Runtime:
        return self.client.binding.runtime

    # -- lifecycle ------------------------------------------------------------

    async def connect(self) -> None:
        client = self.client
        if client.status is ClientStatus.ONLINE:
            return
        if client.status in (ClientStatus.CONNECTING, ClientStatus.RECONNECTING):
            await self.ready()
            return
        self.closing = False
        self._set_status(ClientStatus.CONNECTING)
        try:
            link, backlog = await self._open_link()
        except BaseException:
            self._set_status(ClientStatus.IDLE)
            raise
        if self.closing:  # close() was called meanwhile
            await link.stream.abort()
            self._set_status(ClientStatus.CLOSED)
            raise MeshConnectionError("the client was closed while connecting")
        self._install(link)
        self._task = self._start(None, self._supervise, link, backlog)
        self._set_status(ClientStatus.ONLINE)
        client._emit("connect")

    async def close(self) -> None:
        client = self.client
        if client.status in (ClientStatus.IDLE, ClientStatus.CLOSED) or self.closing:
            return
        self.closing = True
        was_online = client.status is ClientStatus.ONLINE
        link, task = self.link, self._task
        if link is not None and link.conn.state is ClientState.OPEN and task is not None:
            link.conn.close(CloseCode.NORMAL, "")
            link.flush()
            with suppress(TimeoutError):
                async with self._runtime.timeout(client.options.close_timeout):
                    await link.done.wait()
        if task is not None:
            task.cancel()
            await task.done.wait()
        await self._shut_down(disconnected=was_online)

    async def _shut_down(self, *, disconnected: bool = False) -> None:
        client = self.client
        closed = (self.link.closed if self.link is not None else None) or self.last_closed
        closed = closed or Closed(CloseCode.NORMAL, "")
        if self.link is not None:
            self._drop(self.link, MeshConnectionError("the client was closed"))
        self._task = None
        client._rooms.clear()
        client.connection_id = None
        self._set_status(ClientStatus.CLOSED)
        client._close_buffers()
        current = _CURRENT_TASK.get()
        for listener in list(self._listeners):
            if listener is not current:
                listener.cancel()
        # the last listeners run to completion before close() returns
        for name in ("disconnect", "close") if disconnected else ("close",):
            for awaitable in client._emit(name, closed, collect=True):
                try:
                    await awaitable
                except Exception:
                    log.exception("Mesh client %r listener failed", name)
        with suppress(TimeoutError):
            async with self._runtime.timeout(client.options.close_timeout):
                for listener in list(self._listeners):
                    if listener is not current:
                        await listener.done.wait()

    # -- commands -------------------------------------------------------------

    async def request(self, command: str, payload: Any, timeout: float | None) -> Any:
        """Wait until online, send, and return the response's payload; the
        timeout covers both. Raises ``TimeoutError`` (the caller makes it a
        ``CommandTimeout``) and ``MeshConnectionError``."""
        scope: AbstractAsyncContextManager[object] = (
            nullcontext() if timeout is None else self._runtime.timeout(timeout)
        )
        async with scope:
            return await self._call(await self.ready(), command, payload)

    async def _call(self, link: Link, command: str, payload: Any) -> Any:
        id = link.conn.send_request(command, payload)
        waiter = _Waiter(self._runtime.event())
        link.waiters[id] = waiter
        link.flush()
        try:
            await waiter.event.wait()
        finally:
            if link.waiters.pop(id, None) is not None:
                link.conn.discard_request(id)  # timed out or cancelled: free the id
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    async def ready(self) -> Link:
        """Wait until the client is online (rooms re-joined after a reconnect)."""
        while True:
            status = self.client.status
            if status is ClientStatus.ONLINE and self.link is not None:
                return self.link
            if status is ClientStatus.IDLE:
                raise MeshConnectionError("the client is not connected: call connect()")
            if status is ClientStatus.CLOSED:
                raise MeshConnectionError("the client is closed")
            await self._status_changed.wait()

    def _set_status(self, status: ClientStatus) -> None:
        self.client.status = status
        changed, self._status_changed = self._status_changed, self._runtime.event()
        changed.set()

    # -- tasks ----------------------------------------------------------------

    def _start(
        self,
        on_done: Callable[[_Task], None] | None,
        fn: Callable[..., Coroutine[Any, Any, None]],
        *args: Any,
    ) -> _Task:
        runtime = self._runtime
        task = _Task(runtime, on_done)
        self.client.binding.start_task(task.run, runtime, fn, *args)
        return task

    def spawn_listener(self, awaitable: Awaitable[Any]) -> None:
        """Run an async listener as a task of the client, cancelled when the
        client closes."""
        try:
            task = self._start(self._listeners.discard, self._run_listener, awaitable)
        except RuntimeError:  # no task can run now (trio outside its block)
            close = getattr(awaitable, "close", None)
            if callable(close):
                close()  # never started: avoid "coroutine was never awaited"
            return
        self._listeners.add(task)

    async def _run_listener(self, awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("Mesh client listener failed")

    # -- links ----------------------------------------------------------------

    async def _open_link(self) -> tuple[Link, list[ClientEvent]]:
        """TCP (+TLS), upgrade, and wait for ``mesh/assign-id``; returns the
        link and any events that came in the same read as the id."""
        client = self.client
        options, endpoint, binding = client.options, client.endpoint, client.binding
        stream: ClientStream | None = None
        try:
            async with binding.runtime.timeout(options.connect_timeout):
                stream = await binding.open_stream(endpoint, client._ssl_context)
                conn = ClientConnection(
                    ping_timeout=options.ping_timeout,
                    max_missed_pings=options.max_missed_pings,
                    max_message_size=options.max_message_size,
                )
                link = Link(stream, conn, binding.runtime)
                conn.initiate(endpoint.host_header, endpoint.target, client.headers)
                return link, await self._handshake(link)
        except BaseException as exc:
            if stream is not None:
                await stream.abort()
            if isinstance(exc, MeshClientError):
                raise
            if isinstance(exc, TimeoutError):  # an OSError too: first
                raise MeshConnectionError(f"timed out connecting to {client.url}") from None
            if isinstance(exc, OSError):
                raise MeshConnectionError(f"cannot connect to {client.url}: {exc}") from exc
            raise

    async def _handshake(self, link: Link) -> list[ClientEvent]:
        conn, stream = link.conn, link.stream
        await stream.send_all(conn.data_to_send())
        while True:
            data = await stream.receive_some(READ_SIZE)
            events = conn.receive_data(data or None, self._runtime.now())
            out = conn.data_to_send()
            if out:
                await stream.send_all(out)
            for i, event in enumerate(events):
                if isinstance(event, Connected):
                    return events[i + 1 :]
                if isinstance(event, Rejected):
                    raise ConnectionRejected(event.status, event.body)
                if isinstance(event, Closed):
                    raise MeshConnectionError(
                        f"connection closed during the handshake ({event.code} {event.reason})"
                    )
            if not data:
                raise MeshConnectionError("connection closed during the handshake")

    def _install(self, link: Link) -> None:
        self.link = link
        self.client.connection_id = link.conn.connection_id

    def _drop(self, link: Link, error: BaseException) -> None:
        link.fail_waiters(error)
        if self.link is link:
            self.link = None

    async def _serve(self, link: Link, backlog: list[ClientEvent]) -> None:
        """Run the link's reader, writer and watchdog until the link ends,
        then close its stream."""
        self._dispatch(link, backlog)
        graceful = False
        try:
            async with self._runtime.open_task_group() as group:
                group.start_soon(self._read, link)
                group.start_soon(self._watch, link)
                await self._write(link)
                # the closing handshake completed: the reader has returned
                graceful = link.conn.state is ClientState.CLOSED
                if not graceful:
                    await link.stream.abort()  # ends the reader's pending read
        finally:
            # wake whoever waits on this link (a re-join in progress, commands)
            link.fail_waiters(MeshConnectionError("connection lost before the response"))
            try:
                if graceful:
                    with suppress(Exception):
                        async with self._runtime.timeout(1.0):
                            await link.stream.aclose()
            finally:
                await link.stream.abort()
                link.done.set()

    async def _read(self, link: Link) -> None:
        conn, stream, runtime = link.conn, link.stream, self._runtime
        while link.closed is None:
            data = await stream.receive_some(READ_SIZE)
            self._dispatch(link, conn.receive_data(data or None, runtime.now()))
            link.flush()  # pong, latency:response, the close reply

    async def _write(self, link: Link) -> None:
        while (data := await link.next_output()) is not None:
            try:
                await link.stream.send_all(data)
            except OSError:
                self._dispatch(link, link.conn.receive_data(None, self._runtime.now()))
                return

    async def _watch(self, link: Link) -> None:
        """Dead-link detection: end the link when no ping came in time (a
        black-holed socket stays open, so only the missing pings tell)."""
        conn, runtime = link.conn, self._runtime
        while link.closed is None and (deadline := conn.next_deadline()) is not None:
            with suppress(TimeoutError):
                async with runtime.timeout(max(0.0, deadline - runtime.now())):
                    await link.ended.wait()
            if link.closed is None and conn.is_dead(runtime.now()):
                log.info("Mesh client: no ping from %s, reconnecting", self.client.url)
                link.end(Closed(CloseCode.ABNORMAL, "ping timeout"))
                await link.stream.abort()
                return

    def _dispatch(self, link: Link, events: list[ClientEvent]) -> None:
        for event in events:
            if isinstance(event, Response):
                waiter = link.waiters.pop(event.id, None)
                if waiter is not None and not waiter.event.is_set():
                    waiter.value = event.payload
                    waiter.event.set()
            elif isinstance(event, Closed):
                link.end(event)
            else:
                self.client._deliver(event)

    # -- the supervisor -------------------------------------------------------

    async def _supervise(self, link: Link, backlog: list[ClientEvent]) -> None:
        """Serve the link; when it ends, reconnect (unless closing)."""
        try:
            await self._supervise_links(link, backlog)
        except Exception:  # a bug: never leave commands hanging on it
            log.exception("Mesh client supervisor failed")
        if not self.closing:
            self.closing = True
            await self._shut_down()

    async def _supervise_links(self, first: Link, backlog: list[ClientEvent]) -> None:
        client, runtime = self.client, self._runtime
        link: Link | None = first
        rejoin = False
        while link is not None:
            async with runtime.open_task_group() as group:
                group.start_soon(self._serve, link, backlog)
                if rejoin:
                    await self._rejoin(link)
                    if link.closed is None and not link.done.is_set():
                        self._set_status(ClientStatus.ONLINE)
                        client._emit("connect")
                        client._emit("reconnect")
            self._drop(link, MeshConnectionError("connection lost before the response"))
            self.last_closed = link.closed
            if self.closing:
                return
            self._set_status(ClientStatus.RECONNECTING)
            client._emit("disconnect", link.closed or Closed(CloseCode.ABNORMAL, ""))
            if not client.options.reconnect:
                return
            link, backlog = await self._reconnect()
            rejoin = True
            if link is None:
                client._emit("reconnect_failed")

    async def _reconnect(self) -> tuple[Link | None, list[ClientEvent]]:
        options = self.client.options
        attempt = 0
        while options.max_reconnect_attempts is None or attempt < options.max_reconnect_attempts:
            if attempt:
                await self._runtime.sleep(reconnect_delay(attempt, options, self.rand()))
            attempt += 1
            try:
                link, backlog = await self._open_link()
            except MeshConnectionError as exc:
                log.debug("Mesh client: reconnect attempt %d failed: %s", attempt, exc)
                continue
            self._install(link)
            return link, backlog
        return None, []

    async def _rejoin(self, link: Link) -> None:
        """Re-join the rooms before any queued command goes out (they wait in
        :meth:`ready` until the status is ONLINE again)."""
        client, runtime = self.client, self._runtime

        async def join(room: str) -> None:
            if link.closed is not None:  # lost already: send_request would refuse
                return
            try:
                async with runtime.timeout(client.options.connect_timeout):
                    result = await self._call(link, "mesh/join-room", {"roomName": room})
            except (TimeoutError, MeshConnectionError):
                return
            if not (isinstance(result, dict) and result.get("success")):
                log.warning("Mesh client: could not re-join room %r: %r", room, result)
                client._rooms.pop(room, None)

        await runtime.gather([partial(join, room) for room in list(client._rooms)])

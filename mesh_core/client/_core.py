"""``ClientCore``: the whole Mesh client but its sockets and tasks, which an
adapter's ``MeshClient`` supplies through a :class:`ClientBinding`.

What outlives one socket lives here (options, listeners, push buffers, joined
rooms, status, the helper commands); the life over sockets (connect,
reconnect, re-join, timeouts, close) is the :class:`Supervisor`'s, in
``_supervisor.py``.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self, overload

from .._errors import CommandTimeout
from ..protocol import DEFAULT_MAX_MESSAGE_SIZE, ClientEvent, LatencyUpdated, Push
from ._channels import ClientChannels
from ._options import LIFECYCLE_EVENTS, ClientOptions, ClientStatus, check_response, parse_url
from ._presence import PresenceCallback, PresenceClient
from ._records import RecordsClientMixin
from ._supervisor import ClientBinding, Supervisor

if TYPE_CHECKING:
    from ..runtime import TLSContext

__all__ = ["ClientCore", "PushBuffer", "PushIterator"]

log = logging.getLogger("mesh_client")


class PushBuffer:
    """The queue behind one ``pushes()`` iterator. Bounded: a consumer that
    stops reading loses the oldest pushes instead of growing memory. ``wake``
    resumes the iterator waiting on it."""

    __slots__ = ("closed", "dropped", "items", "wake")

    def __init__(self, maxlen: int) -> None:
        self.items: deque[Push] = deque(maxlen=maxlen)
        self.closed = False
        self.dropped = 0
        self.wake: Callable[[], None] = _noop

    def put(self, push: Push) -> None:
        if self.closed:
            return
        if len(self.items) == self.items.maxlen:
            self.dropped += 1
        self.items.append(push)
        self.wake()

    def close(self) -> None:
        self.closed = True
        self.wake()


def _noop() -> None:
    pass


Callback = Callable[..., Any]

#: lifecycle events that carry the ``Closed`` (code, reason) of the connection
_CLOSE_EVENTS = frozenset({"disconnect", "close"})


def _takes_an_argument(callback: Callback) -> bool:
    """Whether ``callback`` asks for an argument (a required positional
    parameter, or ``*args``): ``lambda: ...`` and ``lambda n=n: ...``, the
    callbacks written before these events carried one, do not."""
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(
        p.kind is inspect.Parameter.VAR_POSITIONAL
        or (p.kind in positional and p.default is inspect.Parameter.empty)
        for p in parameters
    )


class PushIterator:
    """``async for push in client.pushes():`` ends when the client closes."""

    def __init__(self, client: ClientCore, maxlen: int) -> None:
        self._client = client
        self._buffer = PushBuffer(maxlen)
        self._ready = client.binding.runtime.event()
        self._buffer.wake = self._ready.set
        client._buffers.add(self._buffer)

    def __aiter__(self) -> PushIterator:
        return self

    async def __anext__(self) -> Push:
        buffer = self._buffer
        while True:
            if buffer.items:
                return buffer.items.popleft()
            if buffer.closed:
                raise StopAsyncIteration
            self._ready = self._client.binding.runtime.event()
            buffer.wake = self._ready.set
            await self._ready.wait()

    async def aclose(self) -> None:
        """Stop buffering pushes for this iterator."""
        self._client._buffers.discard(self._buffer)
        self._buffer.close()


class ClientCore(ClientChannels, RecordsClientMixin, PresenceClient):
    """The Mesh client, for every runtime: ``mesh_asyncio.MeshClient`` and
    ``mesh_trio.MeshClient`` are this class with a :attr:`binding` (the
    runtime, how to open a TCP/TLS stream, how to start a background task).

    Commands issued while the client reconnects wait (within their timeout)
    and are sent once the rooms are re-joined.
    """

    #: set by each adapter's subclass (trio swaps in its nursery's per block)
    binding: ClientBinding

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        ssl_context: TLSContext | None = None,
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
        self.options = ClientOptions(
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
        self.url = url
        self.endpoint = parse_url(url)
        if headers is None:
            self.headers: list[tuple[str, str]] = []
        elif isinstance(headers, Mapping):
            self.headers = list(headers.items())
        else:
            self.headers = list(headers)
        self.connection_id: str | None = None
        #: last round trip the server measured, in milliseconds
        self.latency: float | None = None
        self.status = ClientStatus.IDLE
        if ssl_context is None and self.endpoint.secure:
            ssl_context = self.binding.default_tls()
        self._ssl_context = ssl_context
        self._rooms: dict[str, None] = {}  # insertion-ordered set
        self._listeners: dict[str, list[Callback]] = {}
        self._buffers: set[PushBuffer] = set()
        self._init_presence()
        self._init_channels()
        self._supervisor = Supervisor(self)

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect; returns once the server assigned the connection id.
        Raises :class:`MeshConnectionError` (or ``ConnectionRejected``) when
        this first attempt fails: only an established client reconnects."""
        await self._supervisor.connect()

    async def close(self) -> None:
        """Send a close frame, wait (``close_timeout``) for the server's, stop
        reconnecting, fail waiting commands, end ``pushes()`` iterators and
        leave no task running. Idempotent."""
        await self._supervisor.close()

    # -- commands and pushes --------------------------------------------------

    async def command(self, command: str, payload: Any = None, timeout: float | None = 30.0) -> Any:
        """Send a request and return the response payload. Raises
        :class:`CommandTimeout`, :class:`MeshConnectionError`, and with
        ``raise_errors`` :class:`MeshCommandError` for an error payload."""
        try:
            result = await self._supervisor.request(command, payload, timeout)
        except TimeoutError:
            raise CommandTimeout(command, timeout or 0.0) from None
        return self._check(command, result)

    def pushes(self, maxlen: int | None = None) -> PushIterator:
        """An async iterator of :class:`Push` events from now on; it ends when
        the client closes. Buffers up to ``maxlen`` (default ``push_buffer``)
        unread pushes, dropping the oldest beyond."""
        return PushIterator(self, maxlen or self.options.push_buffer)

    def __aiter__(self) -> PushIterator:
        return self.pushes()

    def _spawn_awaitable(self, awaitable: Awaitable[Any]) -> None:
        self._supervisor.spawn_listener(awaitable)

    # -- listeners ------------------------------------------------------------

    @property
    def rooms(self) -> frozenset[str]:
        """Rooms joined through this client (re-joined after a reconnect)."""
        return frozenset(self._rooms)

    @overload
    def on(self, name: str) -> Callable[[Callback], Callback]: ...

    @overload
    def on(self, name: str, callback: Callback) -> Callback: ...

    def on(
        self, name: str, callback: Callback | None = None
    ) -> Callback | Callable[[Callback], Callback]:
        """Call ``callback`` for a push named ``name`` (with its payload), or
        for a lifecycle event (:data:`LIFECYCLE_EVENTS`; ``latency`` gets the
        value in ms; ``disconnect`` and ``close`` a ``Closed`` with the close
        ``code`` and ``reason``, 1001 for a server shutting down, 1006 for a
        lost network, if the callback has a required argument; the others
        none).
        A callback may be ``async``: it then runs as a task of the client,
        cancelled when the client closes. Without ``callback``, a decorator:
        ``@client.on("chat")``."""
        if callback is None:
            return lambda fn: self.on(name, fn)
        self._listeners.setdefault(name, []).append(callback)
        return callback

    def off(self, name: str, callback: Callback) -> None:
        listeners = self._listeners.get(name, [])
        if callback in listeners:
            listeners.remove(callback)

    def _emit(self, name: str, *args: Any, collect: bool = False) -> list[Awaitable[Any]]:
        """Call listeners; async ones are spawned, or returned when
        ``collect`` (so that ``close`` can await its own listeners)."""
        pending: list[Awaitable[Any]] = []
        for callback in list(self._listeners.get(name, ())):
            try:
                if name in _CLOSE_EVENTS and not _takes_an_argument(callback):
                    result = callback()  # written before these events carried the code
                else:
                    result = callback(*args)
            except Exception:
                log.exception("Mesh client listener for %r failed", name)
                continue
            if inspect.isawaitable(result):
                if collect:
                    pending.append(result)
                else:
                    self._spawn_awaitable(result)
        return pending

    def _deliver(self, event: ClientEvent) -> None:
        """Hand a push or a latency report to listeners and iterators."""
        if isinstance(event, Push):
            if event.command not in LIFECYCLE_EVENTS:
                self._emit(event.command, event.payload)
            for buffer in list(self._buffers):
                buffer.put(event)
        elif isinstance(event, LatencyUpdated):
            self.latency = event.latency
            self._emit("latency", event.latency)

    def _close_buffers(self) -> None:
        for buffer in list(self._buffers):
            buffer.close()
        self._buffers.clear()

    def _check(self, command: str, payload: Any) -> Any:
        return check_response(command, payload, self.options.raise_errors)

    # -- helpers (the reference client's names, in snake_case) ---------------

    async def join_room(
        self, room: str, on_presence: PresenceCallback | None = None
    ) -> list[dict[str, Any]]:
        """Join ``room`` and return its members after the join (``present``).
        A joined room is re-joined after every reconnect. With
        ``on_presence``, also follow the room's presence (see
        :meth:`subscribe_presence`)."""
        result = await self.command("mesh/join-room", {"roomName": room})
        if not (isinstance(result, dict) and result.get("success")):
            return []
        self._rooms[room] = None
        if on_presence is not None:
            await self.subscribe_presence(room, on_presence)
        present = result.get("present")
        return list(present) if isinstance(present, list) else []

    async def leave_room(self, room: str) -> bool:
        result = await self.command("mesh/leave-room", {"roomName": room})
        ok = isinstance(result, dict) and result.get("success") is True
        if ok:
            self._rooms.pop(room, None)
            if room in self._presence:
                await self.unsubscribe_presence(room)
        return ok

    async def get_connection_metadata(self, connection_id: str | None = None) -> Any:
        """Metadata of ``connection_id`` (any instance's), or of this client."""
        if connection_id is None:
            result = await self.command("mesh/get-my-connection-metadata", {})
        else:
            result = await self.command(
                "mesh/get-connection-metadata", {"connectionId": connection_id}
            )
        return result.get("metadata") if isinstance(result, dict) else None

    async def set_connection_metadata(self, value: Any, strategy: str = "replace") -> bool:
        """Write this connection's metadata (``replace``, ``merge`` or
        ``deepMerge``); ``False`` when the server's policy refuses it."""
        result = await self.command(
            "mesh/set-my-connection-metadata",
            {"metadata": value, "options": {"strategy": strategy}},
        )
        return isinstance(result, dict) and result.get("success") is True

    async def get_room_metadata(self, room: str) -> Any:
        result = await self.command("mesh/get-room-metadata", {"roomName": room})
        return result.get("metadata") if isinstance(result, dict) else None

"""The client role of the protocol (sans-IO).

``MeshClient``.

:class:`ClientConnection` is one WebSocket connection seen from the client, in
the style of :class:`~mesh_core.ServerConnection`: the adapter feeds it bytes
with :meth:`~ClientConnection.receive_data` (which returns events) and writes
what :meth:`~ClientConnection.data_to_send` returns. Heartbeat replies (``pong``,
``latency:response``) are queued by the core itself, so no adapter can forget
one. Time is always passed in.

A ``ClientConnection`` lives for one socket. What outlives a socket (the rooms
to re-join, listeners, push buffers, the options) lives in :class:`ClientCore`,
the base class of ``mesh_asyncio.MeshClient`` and ``mesh_trio.MeshClient``,
which add sockets, tasks and the reconnect loop.

The states, and which call is valid in which, are the table in
:mod:`._state`: a call in a wrong state raises
:class:`~mesh_core.protocol.LocalProtocolError`. Incoming messages are assembled and
decoded by :mod:`._messages`, the path the server role takes too (the size
limit counts UTF-8 bytes on both ends).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState as WSState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

from .._errors import MessageTooLarge
from ._close_codes import CloseCode
from ._frames import DEFAULT_MAX_MESSAGE_SIZE, Frame, Violation, encode_response
from ._messages import MessageAssembler, Refusal
from ._state import CLIENT_CALLS, ClientState, transition

__all__ = [
    "ClientConnection",
    "ClientEvent",
    "ClientState",
    "Closed",
    "Connected",
    "LatencyUpdated",
    "Push",
    "Rejected",
    "Response",
]

log = logging.getLogger("mesh_client")

# -- events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """Base class of what :meth:`ClientConnection.receive_data` returns."""


@dataclass(frozen=True, slots=True)
class Connected(ClientEvent):
    """``mesh/assign-id`` arrived: only now may the client send requests."""

    connection_id: str


@dataclass(frozen=True, slots=True)
class Response(ClientEvent):
    """The answer to a request in flight; its id is already free again."""

    id: int
    command: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Push(ClientEvent):
    """A server-initiated frame (a broadcast, a room message...)."""

    command: str
    payload: Any


@dataclass(frozen=True, slots=True)
class LatencyUpdated(ClientEvent):
    """The server measured the round trip (milliseconds)."""

    latency: float


@dataclass(frozen=True, slots=True)
class Closed(ClientEvent):
    """The connection stopped being usable (emitted once). 1006 means the
    socket went away without a closing handshake."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Rejected(ClientEvent):
    """The server answered the upgrade with an HTTP error instead."""

    status: int
    body: bytes = b""


# -- the connection state machine ----------------------------------------------


#: frames the client answers itself; never surfaced as pushes
_SYSTEM: Final = frozenset({"ping", "pong", "latency", "latency:request", "latency:response"})
#: the reference's ids are below 10^8; stay in the same range
_MAX_ID: Final = 100_000_000

# a request has exactly the response's shape: {"id", "command", "payload"}
_encode_request: Final = encode_response


class ClientConnection:
    """One WebSocket connection, client side.

    ``ping_timeout <= 0`` disables dead-link detection (for servers that do
    not ping; the reference server always does)."""

    def __init__(
        self,
        *,
        ping_timeout: float = 30.0,
        max_missed_pings: int = 1,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if max_missed_pings < 0:
            raise ValueError("max_missed_pings must be >= 0")
        if max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        #: incoming messages, decoded with no nesting bound (the server is trusted)
        self._messages = MessageAssembler(max_message_size)
        self.ping_timeout = ping_timeout
        self.max_missed_pings = max_missed_pings
        self.state = ClientState.IDLE
        self.connection_id: str | None = None
        #: last latency the server reported, in milliseconds
        self.latency: float | None = None
        #: when the last ``ping`` (or, before any, the upgrade) was seen
        self.last_ping_at: float | None = None
        self.violations = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._out = bytearray()
        self._in_flight: dict[int, str] = {}
        self._next_id = 0
        self._reject_status = 0
        self._reject_body = bytearray()
        self._finished = False

    @property
    def max_message_size(self) -> int:
        """The largest message taken, in UTF-8 bytes (the server counts the
        same), and sent: servers default to the same limit."""
        return self._messages.max_size

    # -- output ---------------------------------------------------------------

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def initiate(
        self,
        host: str,
        target: str = "/",
        extra_headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    ) -> None:
        """Queue the HTTP upgrade request. ``target`` carries the query string
        (handshake authentication reads it); ``host`` is the Host header."""
        after = transition(CLIENT_CALLS, "initiate", self.state)
        assert after is not None  # never late: raises unless IDLE
        headers = [(_latin1(name), _latin1(value)) for name, value in extra_headers]
        self._out += self._ws.send(Request(host=host, target=target, extra_headers=headers))
        self.state = after

    def send_request(self, command: str, payload: Any = None) -> int:
        """Queue a request and return its id (unique among those in flight).

        ``None`` is sent as ``{}``, like the reference client. Raises
        :class:`~mesh_core.protocol.LocalProtocolError` (a ``RuntimeError``) unless
        OPEN, ``TypeError``/``msgspec.EncodeError`` for a payload that is
        not JSON and :class:`~mesh_core.MessageTooLarge` for a request over
        ``max_message_size`` (no id is consumed then)."""
        transition(CLIENT_CALLS, "send_request", self.state)
        id = self._allocate_id()
        data = _encode_request(id, command, {} if payload is None else payload)
        if len(data) > self.max_message_size:  # the server would close with 1009
            raise MessageTooLarge(command, len(data), self.max_message_size)
        self._send_frame(data)
        self._in_flight[id] = command
        return id

    def discard_request(self, id: int) -> bool:
        """Forget a request (timed out, cancelled): its id becomes free and a
        late response to it is dropped."""
        return self._in_flight.pop(id, None) is not None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; :class:`Closed` comes with the peer's
        answer (or with the socket's loss). Valid in every state: once closing
        it does nothing."""
        if self.state in (ClientState.IDLE, ClientState.CONNECTING):
            self.state = ClientState.CLOSED
            self._finished = True
            return
        if self.state not in (ClientState.OPENING, ClientState.OPEN):
            return
        if self._ws.state is WSState.OPEN:
            self._out += self._ws.send(CloseConnection(code=code, reason=reason))
        self.state = ClientState.CLOSING

    def _allocate_id(self) -> int:
        for _ in range(len(self._in_flight) + 1):
            self._next_id = self._next_id % (_MAX_ID - 1) + 1
            if self._next_id not in self._in_flight:
                return self._next_id
        raise RuntimeError("no free request id")  # pragma: no cover - 10^8 in flight

    def _send_frame(self, data: bytes) -> None:
        self._out += self._ws.send(TextMessage(data=data.decode()))

    def _fire_and_forget(self, command: str, payload: Any) -> None:
        # the reference sends pong and latency:response with an id; nothing
        # answers them, so the id need not stay reserved
        try:
            self._send_frame(_encode_request(self._allocate_id(), command, payload))
        except (TypeError, ValueError):  # an echoed payload we cannot re-encode
            self._send_frame(_encode_request(self._allocate_id(), command, {}))

    # -- heartbeat ------------------------------------------------------------

    @property
    def dead_after(self) -> float | None:
        """Seconds without a ping after which the link counts as dead."""
        if self.ping_timeout <= 0:
            return None
        return self.ping_timeout * (self.max_missed_pings + 1)

    def next_deadline(self) -> float | None:
        """When :meth:`is_dead` may next turn true (``None``: never)."""
        limit = self.dead_after
        if limit is None or self.last_ping_at is None or self.state is not ClientState.OPEN:
            return None
        return self.last_ping_at + limit

    def is_dead(self, now: float) -> bool:
        deadline = self.next_deadline()
        return deadline is not None and now >= deadline

    # -- input ----------------------------------------------------------------

    def receive_data(self, data: bytes | None, now: float) -> list[ClientEvent]:
        """Feed bytes from the socket (``None``: the socket went away)."""
        events: list[ClientEvent] = []
        if self.state in (ClientState.CLOSED, ClientState.IDLE):
            return events
        if data is None:
            if self.state is ClientState.CONNECTING and self._reject_status:
                self._reject(events)
            else:
                self._finish(events, CloseCode.ABNORMAL, "connection lost")
            return events
        try:
            self._ws.receive_data(data)
        except (WSRemoteProtocolError, WSLocalProtocolError) as exc:
            self._finish(events, CloseCode.PROTOCOL_ERROR, f"protocol error: {exc}")
            return events
        for event in self._ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._on_message_part(event, now, events)
            elif isinstance(event, AcceptConnection):
                self.state = ClientState.OPENING
                self.last_ping_at = now
            elif isinstance(event, RejectConnection):
                self._reject_status = event.status_code
                if not event.has_body:
                    self._reject(events)
            elif isinstance(event, RejectData):
                self._reject_body += event.data
                if event.body_finished:
                    self._reject(events)
            elif isinstance(event, CloseConnection):
                if self._ws.state is WSState.REMOTE_CLOSING:
                    self._out += self._ws.send(event.response())
                self._finish(events, event.code, event.reason or "")
            elif isinstance(event, Ping) and self._ws.state is WSState.OPEN:
                self._out += self._ws.send(event.response())
            if self.state is ClientState.CLOSED:
                break
        return events

    def _on_message_part(
        self, event: TextMessage | BytesMessage, now: float, events: list[ClientEvent]
    ) -> None:
        if self.state not in (ClientState.OPENING, ClientState.OPEN):
            return
        result = self._messages.feed(event.data, event.message_finished)
        if result is None:
            return
        if isinstance(result, Refusal):
            self.close(result.code, result.reason)
            # unusable from now on, whatever the peer does with our close
            self._finish(events, result.code, result.reason, closing=True)
        else:
            self._on_frame(result, now, events)

    def _on_frame(self, frame: Frame | Violation, now: float, events: list[ClientEvent]) -> None:
        if not isinstance(frame, Frame):
            self.violations += 1
            return
        command = frame.command
        if frame.id is not None:
            if self._in_flight.pop(frame.id, None) is not None:
                events.append(Response(frame.id, command, frame.payload))
            return  # a late answer to a discarded request
        if command == "mesh/assign-id" and self.state is ClientState.OPENING:
            self.connection_id = str(frame.payload)
            self.state = ClientState.OPEN
            self.last_ping_at = now
            events.append(Connected(self.connection_id))
        elif command == "ping":
            self.last_ping_at = now
            self._fire_and_forget("pong", {})
        elif command == "latency:request":
            self._fire_and_forget("latency:response", frame.payload)
        elif command == "latency":
            if isinstance(frame.payload, int | float) and not isinstance(frame.payload, bool):
                self.latency = float(frame.payload)
                events.append(LatencyUpdated(self.latency))
            else:
                self.violations += 1
        elif command not in _SYSTEM:
            events.append(Push(command, frame.payload))

    def _reject(self, events: list[ClientEvent]) -> None:
        self.state = ClientState.CLOSED
        self._finished = True
        events.append(Rejected(self._reject_status, bytes(self._reject_body)))

    def _finish(
        self, events: list[ClientEvent], code: int, reason: str, *, closing: bool = False
    ) -> None:
        self.state = ClientState.CLOSING if closing else ClientState.CLOSED
        self._in_flight.clear()
        if self._finished:
            return
        self._finished = True
        self.close_code = code
        self.close_reason = reason
        events.append(Closed(code, reason))


def _latin1(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")

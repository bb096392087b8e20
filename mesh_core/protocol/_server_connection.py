"""The per-connection state machine, server role (sans-IO).

The adapter feeds bytes with :meth:`ServerConnection.receive_data`, calls
:meth:`~ServerConnection.tick` when :meth:`~ServerConnection.next_deadline`
comes, and after any call drains :meth:`~ServerConnection.events` and
:meth:`~ServerConnection.data_to_send`. ``wake`` is the one hook back into the
adapter: the core calls it whenever it queued output or an event from outside
a receive (a response, a broadcast, a timer), so the adapter can schedule a
flush. Time is always passed in; nothing here blocks or reads a clock.

The states, and which call is valid in which, are the table in
:mod:`._state`; a call in a wrong state raises
:class:`~mesh_core.protocol.LocalProtocolError`, except one that only comes late
(``accept`` after the peer left during authentication) which does nothing.
Incoming messages are assembled and decoded by :mod:`._messages`, the same
path the client role takes.

``ConnectionLost`` is emitted exactly once, when a connection that was
accepted stops being usable; that is the adapter's cue to clean it up.

**Message level.** Made with ``framed=False``, a connection is for a server
that owns the upgrade and the framing (ASGI): :meth:`~ServerConnection.receive_upgrade`,
:meth:`~ServerConnection.receive_message` (one whole message, through the
same assembly path and rules: size limit, violations, in-flight limits),
:meth:`~ServerConnection.receive_closed` replace the bytes;
:meth:`~ServerConnection.messages_to_send`, :attr:`~ServerConnection.rejection`
and :attr:`~ServerConnection.close_to_send` replace the bytes out.

Requests are released as ``RequestReceived`` events at most
``max_requests_in_flight`` at a time; the server reports each one finished
with :meth:`~ServerConnection.request_done`. The rest wait in a queue, and
while that queue is full :attr:`~ServerConnection.reading_paused` tells the
adapter to stop reading the socket, so a flood pushes back on its sender.
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState as WSState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WSRemoteProtocolError

from .._config import ServerOptions
from .._errors import LocalProtocolError
from .._metrics import Metrics, bump
from ._close_codes import CloseCode
from ._frames import Frame, Violation, decode_frame, encode_push, encode_response
from ._handshake import UpgradeRequest, send_rejection, upgrade_request
from ._messages import TOO_BIG, MessageAssembler, Refusal, is_utf8, utf8_size
from ._state import SERVER_CALLS, State, transition
from ._wsframes import FAST, INCOMPLETE, scan

__all__ = [
    "CloseCode",
    "ConnectionLost",
    "Event",
    "PongReceived",
    "HandshakeReceived",
    "RequestReceived",
    "ServerConnection",
    "State",
    "text_frame",
]


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of what the core tells the adapter."""


@dataclass(frozen=True, slots=True)
class HandshakeReceived(Event):
    """Answer with :meth:`ServerConnection.accept` or ``reject``."""

    request: UpgradeRequest


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    """A request to dispatch; answer it with ``respond(id, command, ...)``."""

    id: int
    command: str
    payload: Any
    #: the ``now`` of the call that brought it in (``receive_data`` or
    #: ``receive_message``): the command latency histogram measures from it,
    #: so a request costs one clock read (when answered), and the time it
    #: waited in the queue counts
    received_at: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """The client answered a ping: it is alive (presence refreshes on it)."""


_PONG_RECEIVED = PongReceived()


@dataclass(frozen=True, slots=True)
class ConnectionLost(Event):
    """The connection is no longer usable: clean it up (emitted once)."""

    code: int
    reason: str


_PING = encode_push("ping", {})
_LATENCY_REQUEST = encode_push("latency:request", {})


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, unfragmented server-to-client text frame.

    Servers never mask and we negotiate no extension, so the bytes on the wire
    are the same for every recipient: a broadcast is encoded and framed once,
    not once per member (wsproto frames control messages and handshakes)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 0x10000:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def _noop() -> None:
    pass


#: the response to a request still queued when its connection closes
_NOT_RUN = {
    "error": "the connection closed before this request ran",
    "code": "EUNAVAILABLE",
    "name": "ConnectionClosing",
}


_SCANNING = (State.OPEN, State.OPENING)
_TEXT_PLAIN = ((b"content-type", b"text/plain; charset=utf-8"),)


class ServerConnection:
    """One WebSocket connection, server side."""

    def __init__(
        self,
        options: ServerOptions,
        *,
        peer: tuple[str, int] | None = None,
        now: float | None = None,
        metrics: Metrics | None = None,
        framed: bool = True,
    ) -> None:
        self.options = options
        #: False: the server around us frames messages (the message-level entry point)
        self.framed = framed
        #: message level: the HTTP refusal to send, ``(status, reason)``, once CLOSED
        self.rejection: tuple[int, str] | None = None
        #: message level: the close to send, ``(code, reason)``, once CLOSED
        self.close_to_send: tuple[int, str] | None = None
        self.peer = peer
        #: counters shared with the server (a private set when standalone)
        self.metrics = metrics if metrics is not None else Metrics()
        self.state = State.HANDSHAKE
        self.id: str | None = None
        self.wake: Callable[[], None] = _noop
        #: last measured round trip, in milliseconds (None until measured)
        self.latency: float | None = None
        self.violations = 0
        #: the connection was dropped without a closing handshake (slow
        #: consumer): the adapter should abort the transport, not flush it
        self.aborted = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._ws = WSConnection(ConnectionType.SERVER)
        self._out = bytearray()
        self._events: list[Event] = []
        # requests not released yet: those that came while OPENING, and
        # those past max_requests_in_flight
        self._queued: deque[RequestReceived] = deque()
        self._running = 0  # released requests not yet reported done
        self._messages = MessageAssembler(options.max_message_size, options.max_json_depth)
        self._inbuf = bytearray()  # bytes of frames not yet complete
        self._answered = False  # accept() or reject() was called
        self._lost = False
        # heartbeat
        self._next_ping: float | None = None
        self._awaiting_pong = False
        self._missed_pongs = 0
        #: emit :class:`PongReceived` for each pong (presence refreshes on it)
        self.report_pongs = False
        self._next_latency: float | None = None
        self._latency_sent_at: float | None = None
        self._latency_fresh = False
        self._close_deadline: float | None = None
        self._handshake_deadline = (
            None
            if now is None or options.handshake_timeout <= 0
            else now + options.handshake_timeout
        )

    # -- what the adapter drains ---------------------------------------------

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        self.metrics.bytes_out += len(data)
        return data

    def messages_to_send(self) -> list[str]:
        """Message level: the text messages queued (what :meth:`data_to_send`
        would return as frames, unframed; one output path for both)."""
        data = self.data_to_send()
        messages = []
        pos, end = 0, len(data)
        while pos < end:
            n = data[pos + 1] & 0x7F
            pos += 2
            if n >= 126:
                width = 2 if n == 126 else 8
                n = int.from_bytes(data[pos : pos + width], "big")
                pos += width
            messages.append(data[pos : pos + n].decode("utf-8"))
            pos += n
        return messages

    @property
    def reading_paused(self) -> bool:
        """Too many requests wait for a slot: stop reading until this is
        false again (the core wakes the adapter when a slot frees up)."""
        return len(self._queued) >= self.options.max_queued_requests

    @property
    def requests_in_flight(self) -> int:
        return self._running

    @property
    def requests_queued(self) -> int:
        return len(self._queued)

    @property
    def pending_bytes(self) -> int:
        return len(self._out)

    @property
    def has_work(self) -> bool:
        return bool(self._out or self._events)

    # -- input ----------------------------------------------------------------

    def receive_data(self, data: bytes | None, now: float) -> None:
        """Feed bytes from the socket; ``None`` means the peer went away."""
        if self.state is State.CLOSED:
            return
        if data is None:
            self._lose(CloseCode.ABNORMAL, "connection lost")
            self.state = State.CLOSED
            return
        self.metrics.bytes_in += len(data)
        if self.state in _SCANNING and self._ws.state is WSState.OPEN:
            self._inbuf += data
            self._scan_frames(now)
            return
        if self._inbuf:  # closing: what the scanner held back is wsproto's now
            data = bytes(self._inbuf) + data
            self._inbuf.clear()
        self._feed_ws(data, now)

    def receive_upgrade(self, request: UpgradeRequest) -> None:
        """Message level: the server around us received this upgrade request;
        answer it as usual (``HandshakeReceived``)."""
        if self.state is State.HANDSHAKE and not self._answered:
            self._events.append(HandshakeReceived(request))

    def receive_message(self, data: str | bytes, now: float) -> None:
        """Message level: one whole message (text as ``str``, binary as
        ``bytes``), taken by the same rules as a frame's."""
        if self.state not in _SCANNING:
            return
        self.metrics.bytes_in += utf8_size(data)
        self._on_message(data, True, now)

    def receive_closed(self, code: int = CloseCode.ABNORMAL, reason: str = "") -> None:
        """Message level: the peer closed (or the server around us lost it)."""
        if self.state is not State.CLOSED:
            self._lose(code, reason)
            self.state = State.CLOSED

    def _scan_frames(self, now: float) -> None:
        """Take whole masked data frames off the buffer ourselves (the common
        case, see :mod:`mesh_core._wsframes`) and hand every other frame to
        wsproto whole, in order."""
        buf = self._inbuf
        messages = self._messages
        # loaded once per read, not per frame: this loop is the hot path
        limit = messages.max_size
        depth = messages.max_depth
        parts = messages.parts
        pos = 0
        while True:
            if self.state not in _SCANNING:
                rest = bytes(buf[pos:])
                buf.clear()
                if rest:
                    self._feed_ws(rest, now)
                return
            if pos == len(buf):
                break
            kind, end, opcode, payload, length = scan(buf, pos)
            # a frame too big is refused from its header, before its payload
            # is buffered (messages.refuses(), the first half inline)
            if length > limit:
                self._refuse_buffered()
                return
            if kind == INCOMPLETE:
                if parts and messages.refuses(opcode, length):  # a continuation
                    self._refuse_buffered()
                    return
                break
            if (
                kind == FAST
                and payload is not None
                and not parts
                and (opcode == 2 or payload.isascii() or is_utf8(payload))
            ):
                # messages.whole(payload), inline
                self._on_frame(decode_frame(payload, depth), now)
            else:  # control frames, fragments, bad UTF-8, anything odd
                self._feed_ws(bytes(buf[pos:end]), now)
            pos = end
        del buf[:pos]

    def _feed_ws(self, data: bytes, now: float) -> None:
        try:
            self._ws.receive_data(data)
        except WSRemoteProtocolError as exc:  # a malformed HTTP request
            self._reject_bad_request(exc)
            return
        except WSLocalProtocolError:
            return
        for event in self._ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._on_message(event.data, event.message_finished, now)
            elif isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, CloseConnection):
                self._on_close(event)
            elif isinstance(event, Ping) and self._ws.state is WSState.OPEN:
                self._out += self._ws.send(event.response())
            if self._finished():
                break

    def _finished(self) -> bool:
        return self.state is State.CLOSED

    def _on_request(self, event: Request) -> None:
        request = upgrade_request(event, self.peer)
        if self.options.forwarded_allow_ips:
            # every X-Forwarded-For line, in order (RFC 9110: one list): a
            # proxy that adds a line of its own must not leave the client's
            # line to be read as the proxy's
            hops = [value for name, value in request.headers if name == "x-forwarded-for"]
            peer = self.options.client_peer(self.peer, ",".join(hops) if hops else None)
            if peer != self.peer:
                self.peer = peer
                request = replace(request, peer=peer)
        self._events.append(HandshakeReceived(request))

    def _reject_bad_request(self, exc: WSRemoteProtocolError) -> None:
        hint = exc.event_hint
        if self.state is State.HANDSHAKE and isinstance(hint, RejectConnection):
            bump(self.metrics.handshake_rejections, hint.status_code)
            with contextlib.suppress(WSLocalProtocolError):
                send_rejection(
                    self._ws, self._out, hint.status_code, hint.headers, str(exc).encode()
                )
        self.state = State.CLOSED

    def _on_message(self, data: bytes | bytearray | str, finished: bool, now: float) -> None:
        if self.state not in _SCANNING:
            return
        result = self._messages.feed(data, finished)
        if result is None:
            return
        if isinstance(result, Refusal):
            self._refuse(result)
        else:
            self._on_frame(result, now)

    def _refuse(self, refusal: Refusal) -> None:
        self.close(refusal.code, refusal.reason)

    def _refuse_buffered(self) -> None:
        """A frame's header declared too big a message: drop it unread."""
        self._inbuf.clear()
        self._messages.reset()
        self._refuse(TOO_BIG)

    def _on_frame(self, frame: Frame | Violation, now: float) -> None:
        if not isinstance(frame, Frame):
            self._violation()
            return
        command = frame.command
        if command == "pong":
            self._awaiting_pong = False
            self._missed_pongs = 0
            if self.report_pongs:
                self._events.append(_PONG_RECEIVED)
            return
        if command == "latency:response":
            if self._latency_sent_at is not None:
                self.latency = max(0.0, (now - self._latency_sent_at) * 1000.0)
                self._latency_sent_at = None
                self._latency_fresh = True
            return
        if frame.id is None:
            return  # the reference drops id-less frames silently
        request = RequestReceived(frame.id, command, frame.payload, now)
        if self._queued or self.state is State.OPENING:
            self._queued.append(request)
        elif self._running < self.options.max_requests_in_flight:
            self._running += 1
            self._events.append(request)
        else:
            self._queued.append(request)

    def _violation(self) -> None:
        self.violations += 1
        self.metrics.violations += 1
        if self.violations > self.options.max_violations:
            self.close(CloseCode.POLICY_VIOLATION, "too many protocol violations")

    def request_done(self) -> None:
        """The server answered (or dropped) one ``RequestReceived``: release
        the next queued request, if any."""
        if self._running > 0:
            self._running -= 1
        self._release()

    def _release(self) -> None:
        if self.state is not State.OPEN or not self._queued:
            return
        limit = self.options.max_requests_in_flight
        released = False
        while self._queued and self._running < limit:
            self._running += 1
            self._events.append(self._queued.popleft())
            released = True
        if released:
            self.wake()

    def _on_close(self, event: CloseConnection) -> None:
        if self._ws.state is WSState.REMOTE_CLOSING:
            self._out += self._ws.send(event.response())
        elif self._ws.state is WSState.OPEN:
            # wsproto reports the peer's framing error (bad UTF-8, bad opcode,
            # unmasked frame...) as a close with the RFC's code: send it
            self._out += self._ws.send(CloseConnection(code=event.code, reason=event.reason))
        self._lose(event.code, event.reason or "")
        self.state = State.CLOSED

    # -- handshake ------------------------------------------------------------

    def _answer(self, call: str) -> State | None:
        """The state answering the upgrade with ``call`` leads to (``None``:
        the peer left first, do nothing); raises if it was answered already."""
        if self._answered:
            raise LocalProtocolError(f"{call}(): the upgrade was already answered")
        after = transition(SERVER_CALLS, call, self.state)
        if after is not None:
            self._answered = True
        return after

    def accept(self, connection_id: str) -> None:
        """Accept the upgrade; the connection is OPENING until :meth:`opened`.

        Does nothing if the socket is already gone (the peer left while the
        server authenticated it): :attr:`id` stays ``None`` then."""
        after = self._answer("accept")
        if after is None:
            return
        self.id = connection_id
        if self.framed:
            self._out += self._ws.send(AcceptConnection())
        self.state = after
        self.wake()

    def reject(self, status: int = 401, reason: str = "Unauthorized") -> None:
        """Refuse the upgrade with an HTTP error (nothing if the peer left)."""
        after = self._answer("reject")
        if after is None:
            return
        bump(self.metrics.handshake_rejections, status)
        if self.framed:
            send_rejection(self._ws, self._out, status, _TEXT_PLAIN, reason.encode())
        else:
            self.rejection = (status, reason)
        self.state = after
        self.wake()

    def opened(self, now: float) -> None:
        """Registration and connect hooks are done: send ``mesh/assign-id``
        as the first frame, start the heartbeat, release held requests.

        Does nothing if the connection closed while it was opening (by the
        peer, a connect hook or a shutdown); raises before :meth:`accept` or
        a second time."""
        after = transition(SERVER_CALLS, "opened", self.state)
        if after is None:
            return
        self.state = after
        self.send_push("mesh/assign-id", self.id)
        if self.options.ping_interval > 0:
            self._next_ping = now + self.options.ping_interval
        if self.options.latency_interval > 0:
            self._next_latency = now + self.options.latency_interval
        self._release()
        self.wake()

    # -- output ---------------------------------------------------------------

    def send_message(self, payload: bytes) -> bool:
        """Queue one encoded JSON message; ``False`` if the connection is not
        open. A client whose queue passes ``max_send_buffer`` is dropped as a
        slow consumer (code 1013, socket dropped) rather than let memory grow."""
        return self.send_frame(text_frame(payload))

    def send_frame(self, frame: bytes) -> bool:
        """:meth:`send_message` for a message already framed by
        :func:`text_frame`, so a broadcast is framed once for every member."""
        if self.state is not State.OPEN:
            return False
        was_idle = not self._out
        self._out += frame
        if len(self._out) > self.options.max_send_buffer:
            # the client is not reading: a close frame would queue behind the
            # backlog it ignores, so drop the socket instead
            self._out.clear()
            self.aborted = True
            self.metrics.slow_consumer_closes += 1
            self._lose(CloseCode.TRY_AGAIN_LATER, "slow consumer: send buffer full")
            self.state = State.CLOSED
            self.wake()
            return False
        if was_idle:
            self.wake()
        return True

    def send_push(self, command: str, payload: Any) -> bool:
        return self.send_message(encode_push(command, payload))

    def respond(self, id: int, command: str, payload: Any) -> bool:
        return self.send_message(encode_response(id, command, payload))

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake (or finish an unfinished upgrade)."""
        if self.state in (State.OPEN, State.OPENING):
            if not self.framed:  # the server around us does the closing handshake
                self._answer_queued()
                self.close_to_send = (code, reason)
                self._lose(code, reason)
                self.state = State.CLOSED
            else:
                if self._ws.state is WSState.OPEN:
                    self._answer_queued()
                    self._out += self._ws.send(CloseConnection(code=code, reason=reason))
                self.state = State.CLOSING
                self._close_deadline = None  # set by the next tick
                self._lose(code, reason)
        elif self.state is State.HANDSHAKE:
            self.state = State.CLOSED
        self.wake()

    def _answer_queued(self) -> None:
        """Every request gets one response: those still queued (never run)
        are answered before the close, so a client knows to send them again
        elsewhere."""
        for request in self._queued:
            self._out += text_frame(encode_response(request.id, request.command, _NOT_RUN))
        self._queued.clear()

    def _lose(self, code: int, reason: str) -> None:
        if self._lost or self.id is None:
            return
        self._lost = True
        self.close_code = code
        self.close_reason = reason
        self._queued.clear()
        bump(self.metrics.closes, code)
        self._events.append(ConnectionLost(code, reason))

    # -- timers ---------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`tick` should next be called (``None``: no timer)."""
        if self.state is State.HANDSHAKE:
            return self._handshake_deadline
        if self.state is State.CLOSING:
            # no deadline yet: tick now, and the tick sets it from its ``now``
            return self._close_deadline if self._close_deadline is not None else float("-inf")
        if self.state is not State.OPEN:
            return None
        candidates = [t for t in (self._next_ping, self._next_latency) if t is not None]
        return min(candidates) if candidates else None

    def tick(self, now: float) -> None:
        if self.state is State.HANDSHAKE:
            if self._handshake_deadline is not None and now >= self._handshake_deadline:
                self.state = State.CLOSED  # never upgraded: just drop the socket
                self.wake()
            return
        if self.state is State.CLOSING:
            if self._close_deadline is None:
                self._close_deadline = now + self.options.close_timeout
            elif now >= self._close_deadline:
                self.state = State.CLOSED
                self.wake()
            return
        if self.state is not State.OPEN:
            return
        if self._next_ping is not None and now >= self._next_ping:
            self._next_ping = now + self.options.ping_interval
            if self._awaiting_pong:
                self._missed_pongs += 1
                if self._missed_pongs >= self.options.max_missed_pongs:
                    self.close(CloseCode.POLICY_VIOLATION, "missed pongs")
                    return
            self._awaiting_pong = True
            self.send_message(_PING)
        if self._next_latency is not None and now >= self._next_latency:
            self._next_latency = now + self.options.latency_interval
            if self._latency_fresh and self.latency is not None:
                self._latency_fresh = False
                self.send_push("latency", round(self.latency, 3))
            self._latency_sent_at = now
            self.send_message(_LATENCY_REQUEST)

"""Message assembly, shared by both roles, and misuse of the state machines.

The same message bytes, cut into the same fragments, go through a server
machine (from a wsproto client) and a client machine (from a wsproto server):
both must decode the same frame, or both refuse it with the same close code,
because both take the one path in ``mesh_core.protocol._messages``. Then each
API call of each machine in every state it can be in: valid, late (ignored),
or misuse (``LocalProtocolError``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState as WSState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    Message,
    Request,
    TextMessage,
)

from mesh_core import CloseCode, ServerOptions
from mesh_core.protocol import (
    ClientConnection,
    ClientState,
    Closed,
    ConnectionLost,
    Frame,
    LocalProtocolError,
    RequestReceived,
    Response,
    ServerConnection,
    State,
    Violation,
)
from mesh_core.protocol._messages import TOO_BIG, MessageAssembler, Refusal

LIMIT = 1024
OPTIONS = ServerOptions(ping_interval=0, latency_interval=0, max_message_size=LIMIT)

# -- the assembler alone ---------------------------------------------------------


def test_a_whole_message_decodes() -> None:
    messages = MessageAssembler(LIMIT)
    assert messages.feed('{"command":"x","payload":1}', True) == Frame("x", 1)
    assert messages.whole(b'{"command":"x","payload":1}') == Frame("x", 1)


def test_fragments_are_joined_text_and_binary() -> None:
    messages = MessageAssembler(LIMIT)
    assert messages.feed('{"command":', False) is None
    assert messages.feed('"x"}', True) == Frame("x")
    assert messages.parts == [] and messages.size == 0
    assert messages.feed(bytearray(b'{"command":'), False) is None
    assert messages.feed(b'"y"}', True) == Frame("y")


def test_not_a_frame_is_a_violation() -> None:
    assert isinstance(MessageAssembler(LIMIT).feed("nope", True), Violation)


def test_the_nesting_bound_is_the_roles() -> None:
    deep = json.dumps({"command": "x", "payload": [[[[1]]]]})
    assert isinstance(MessageAssembler(LIMIT, max_depth=3).feed(deep, True), Violation)
    assert MessageAssembler(LIMIT).feed(deep, True) == Frame("x", [[[[1]]]])


def test_the_limit_counts_utf8_bytes() -> None:
    messages = MessageAssembler(8)
    assert messages.feed("éé", False) is None  # 2 characters, 4 bytes
    assert messages.size == 4
    assert messages.feed("ééé", True) is TOO_BIG  # 10 bytes > 8, 5 characters < 8
    assert messages.parts == [] and messages.size == 0  # nothing kept
    assert Refusal(CloseCode.MESSAGE_TOO_BIG, "message too big") == TOO_BIG


def test_refuses_from_a_header() -> None:
    messages = MessageAssembler(100)
    assert not messages.refuses(1, 100)
    assert messages.refuses(1, 101)
    assert not messages.refuses(0, 60)  # no message in progress
    messages.feed(b"x" * 50, False)
    assert messages.refuses(0, 51)  # a continuation crossing the limit
    assert not messages.refuses(0, 50)
    assert not messages.refuses(9, 60)  # a ping is not part of the message


def test_a_positive_limit_is_required() -> None:
    with pytest.raises(ValueError):
        MessageAssembler(0)


# -- the same message through both roles -----------------------------------------


def _fragments(message: str | bytes, cuts: list[int]) -> list[Message[Any]]:
    points = sorted({c % (len(message) + 1) for c in cuts} | {0, len(message)})
    pieces = [message[a:b] for a, b in itertools.pairwise(points)] or [message[:0]]
    last = len(pieces) - 1
    return [
        TextMessage(data=p, message_finished=i == last)
        if isinstance(p, str)
        else BytesMessage(data=p, message_finished=i == last)
        for i, p in enumerate(pieces)
    ]


def through_server(fragments: list[Message[Any]]) -> object:
    """What a server machine makes of the message: the frame's payload, a
    violation, or the close code."""
    server, peer = _open_server()
    for fragment in fragments:
        server.receive_data(peer.send(fragment), 0.0)
    return _outcome(server.violations, server.events())


def through_client(fragments: list[Message[Any]]) -> object:
    """What a client machine makes of the same message (as the response to
    its request 1)."""
    client = ClientConnection(max_message_size=LIMIT)
    peer = WSConnection(ConnectionType.SERVER)
    client.initiate("h")
    peer.receive_data(client.data_to_send())
    list(peer.events())
    data = peer.send(AcceptConnection())
    data += peer.send(TextMessage(data='{"command":"mesh/assign-id","payload":"c"}'))
    client.receive_data(data, 0.0)
    assert client.send_request("x") == 1
    events: list[Any] = []
    for fragment in fragments:
        events += client.receive_data(peer.send(fragment), 0.0)
    return _outcome(client.violations, events)


def _outcome(violations: int, events: list[Any]) -> object:
    """The one thing a machine made of one message, in role-neutral terms."""
    if violations:
        return "violation"
    [event] = events
    if isinstance(event, (ConnectionLost, Closed)):
        return event.code
    assert isinstance(event, (RequestReceived, Response))
    return event.payload


def frame_text(payload: str) -> str:
    return json.dumps({"id": 1, "command": "x", "payload": payload}, ensure_ascii=False)


@settings(max_examples=60, deadline=None)
@given(
    payload=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=700),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=4),
    binary=st.booleans(),
)
def test_both_roles_assemble_alike(payload: str, cuts: list[int], binary: bool) -> None:
    text = frame_text(payload)
    message: str | bytes = text.encode() if binary else text
    fragments = _fragments(message, cuts)
    expected: object = CloseCode.MESSAGE_TOO_BIG if len(text.encode()) > LIMIT else payload
    assert through_server(fragments) == expected
    assert through_client(fragments) == expected


def test_the_client_limit_is_in_bytes_like_the_servers() -> None:
    # fewer characters than the limit, more bytes: both roles refuse it
    payload = "é" * 600
    assert len(frame_text(payload)) < LIMIT < len(frame_text(payload).encode())
    for fragments in (_fragments(frame_text(payload), []), _fragments(frame_text(payload), [300])):
        assert through_server(fragments) == CloseCode.MESSAGE_TOO_BIG
        assert through_client(fragments) == CloseCode.MESSAGE_TOO_BIG


def _open_server() -> tuple[ServerConnection, WSConnection]:
    server = ServerConnection(OPTIONS, now=0.0)
    peer = WSConnection(ConnectionType.CLIENT)
    server.receive_data(peer.send(Request(host="h", target="/")), 0.0)
    server.events()
    server.accept("c")
    server.opened(0.0)
    peer.receive_data(server.data_to_send())
    list(peer.events())
    return server, peer


def test_the_server_refuses_a_continuation_from_its_header() -> None:
    server, peer = _open_server()
    server.receive_data(peer.send(TextMessage(data="x" * 1000, message_finished=False)), 0.0)
    assert server.events() == []
    frame = peer.send(TextMessage(data="y" * 100, message_finished=True))
    server.receive_data(frame[:6], 0.0)  # the header and mask only
    assert server.events() == [ConnectionLost(CloseCode.MESSAGE_TOO_BIG, "message too big")]


def test_both_roles_close_1007_on_text_that_is_not_utf8() -> None:
    server, _ = _open_server()
    server.receive_data(bytes((0x81, 0x82, 0, 0, 0, 0)) + b"\xff\xfe", 0.0)
    assert [e.code for e in server.events() if isinstance(e, ConnectionLost)] == [1007]
    client = ClientConnection()
    client.initiate("h")
    peer = WSConnection(ConnectionType.SERVER)
    peer.receive_data(client.data_to_send())
    list(peer.events())
    client.receive_data(peer.send(AcceptConnection()), 0.0)
    events = client.receive_data(bytes((0x81, 2)) + b"\xff\xfe", 0.0)
    assert [e.code for e in events if isinstance(e, Closed)] == [CloseCode.INVALID_PAYLOAD]


def test_both_roles_count_a_bad_frame_as_a_violation() -> None:
    fragments = _fragments('{"id": 1, "command": 5}', [7])
    assert through_server(fragments) == "violation"
    assert through_client(fragments) == "violation"


def test_the_client_closes_with_close_codes() -> None:
    client = ClientConnection()
    client.initiate("h")
    assert client.receive_data(b"garbage\r\n\r\n", 0.0) == [Closed(1002, client.close_reason)]
    assert type(client.close_code) is CloseCode
    client = ClientConnection()
    client.initiate("h")
    assert client.receive_data(None, 0.0) == [Closed(CloseCode.ABNORMAL, "connection lost")]


# -- misuse ------------------------------------------------------------------------


def test_local_protocol_error_is_a_runtime_error() -> None:
    assert issubclass(LocalProtocolError, RuntimeError)


def _server(reach: str) -> ServerConnection:
    """A server machine brought to a state, the way the server meets it."""
    server = ServerConnection(OPTIONS, now=0.0)
    peer = WSConnection(ConnectionType.CLIENT)
    server.receive_data(peer.send(Request(host="h", target="/")), 0.0)
    server.events()
    if reach == "handshake":
        return server
    if reach == "peer left during the handshake":
        server.receive_data(None, 0.0)
    elif reach == "handshake timed out":
        server.tick(OPTIONS.handshake_timeout + 1)
    elif reach == "closed before the upgrade":
        server.close()
    elif reach == "rejected":
        server.reject()
    else:
        server.accept("c")
        if reach == "opening":
            pass
        elif reach == "closed while opening":
            server.close(CloseCode.INTERNAL_ERROR)
        elif reach == "peer left while opening":
            server.receive_data(None, 0.0)
        else:
            server.opened(0.0)
            assert reach == "open"
    server.data_to_send()
    server.events()
    return server


ACCEPT: Callable[[ServerConnection], None] = lambda s: s.accept("d")  # noqa: E731
REJECT: Callable[[ServerConnection], None] = lambda s: s.reject()  # noqa: E731
OPENED: Callable[[ServerConnection], None] = lambda s: s.opened(1.0)  # noqa: E731

#: (state reached, call, "ok" / "late" / "misuse")
SERVER_CASES = [
    ("handshake", ACCEPT, "ok"),
    ("handshake", REJECT, "ok"),
    ("handshake", OPENED, "misuse"),
    ("peer left during the handshake", ACCEPT, "late"),
    ("peer left during the handshake", REJECT, "late"),
    ("handshake timed out", ACCEPT, "late"),
    ("handshake timed out", REJECT, "late"),
    ("closed before the upgrade", ACCEPT, "late"),
    ("closed before the upgrade", REJECT, "late"),
    ("rejected", ACCEPT, "misuse"),
    ("rejected", REJECT, "misuse"),
    ("opening", ACCEPT, "misuse"),
    ("opening", REJECT, "misuse"),
    ("opening", OPENED, "ok"),
    ("closed while opening", OPENED, "late"),
    ("closed while opening", ACCEPT, "misuse"),
    ("peer left while opening", OPENED, "late"),
    ("open", ACCEPT, "misuse"),
    ("open", REJECT, "misuse"),
    ("open", OPENED, "misuse"),
]


@pytest.mark.parametrize(("reach", "call", "outcome"), SERVER_CASES)
def test_server_calls_by_state(
    reach: str, call: Callable[[ServerConnection], None], outcome: str
) -> None:
    server = _server(reach)
    before = (server.state, server.id)
    if outcome == "misuse":
        with pytest.raises(LocalProtocolError):
            call(server)
    else:
        call(server)
    if outcome != "ok":  # nothing changed, nothing sent
        assert (server.state, server.id) == before
        assert server.data_to_send() == b""
        assert server.events() == []
    else:
        assert server.state is not before[0]


@pytest.mark.parametrize(
    "reach", ["handshake", "rejected", "opening", "open", "closed while opening", "peer left"]
)
def test_server_close_is_valid_in_every_state(reach: str) -> None:
    server = _server("peer left during the handshake" if reach == "peer left" else reach)
    server.close()
    server.close()
    assert server.state in (State.CLOSING, State.CLOSED)


def test_client_calls_by_state() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.send_request("x")  # not connected
    client.initiate("h")
    assert client.state is ClientState.CONNECTING
    with pytest.raises(LocalProtocolError):
        client.initiate("h")
    with pytest.raises(LocalProtocolError):
        client.send_request("x")  # not open yet
    client.close()
    client.close()  # valid in every state
    assert client.state in {ClientState.CLOSED}  # (mypy narrowed it)
    with pytest.raises(LocalProtocolError):
        client.send_request("x")


# -- every call in every state the server can reach (hypothesis walks it) ----------


class ServerCalls(RuleBasedStateMachine):
    """Random sequences of the server's API calls and the peer's and timers'
    inputs. A call either does what the table says, does nothing (late), or
    raises ``LocalProtocolError`` without changing anything; nothing else
    escapes, and ``ConnectionLost`` comes at most once."""

    def __init__(self) -> None:
        super().__init__()
        self.server = ServerConnection(OPTIONS, now=0.0)
        self.peer = WSConnection(ConnectionType.CLIENT)
        self.server.receive_data(self.peer.send(Request(host="h", target="/")), 0.0)
        self.answered = False
        self.lost = 0

    def _call(self, call: Callable[[], None], misuse: bool) -> None:
        before = (self.server.state, self.server.id)
        if misuse:
            with pytest.raises(LocalProtocolError):
                call()
            assert (self.server.state, self.server.id) == before
        else:
            call()

    @rule(accept=st.booleans())
    def answer(self, accept: bool) -> None:
        state = self.server.state
        misuse = self.answered or state not in (State.HANDSHAKE, State.CLOSED)
        late = not misuse and state is State.CLOSED
        self._call(lambda: self.server.accept("c") if accept else self.server.reject(), misuse)
        if late:
            assert self.server.id is None and self.server.data_to_send() == b""
        self.answered = self.answered or not (misuse or late)

    @rule()
    def opened(self) -> None:
        misuse = self.server.state in (State.HANDSHAKE, State.OPEN)
        self._call(lambda: self.server.opened(0.0), misuse)

    @rule()
    def close(self) -> None:
        self.server.close()

    @rule()
    def peer_leaves(self) -> None:
        self.server.receive_data(None, 0.0)

    @rule()
    def time_passes(self) -> None:
        self.server.tick(1e9)
        self.server.tick(2e9)

    @rule()
    def peer_sends(self) -> None:
        if self.peer.state is WSState.OPEN:
            self.server.receive_data(
                self.peer.send(TextMessage(data='{"id":1,"command":"a"}')), 0.0
            )

    @invariant()
    def drained(self) -> None:
        data = self.server.data_to_send()
        if data and self.peer.state is not WSState.CLOSED:
            self.peer.receive_data(data)
            list(self.peer.events())
        self.lost += sum(isinstance(e, ConnectionLost) for e in self.server.events())
        assert self.lost <= 1


test_server_calls_walk = ServerCalls.TestCase
test_server_calls_walk.settings = settings(max_examples=150, stateful_step_count=12, deadline=None)

"""The per-connection state machine, driven in memory by a wsproto client.

No sockets: client bytes go into ``ServerConnection.receive_data`` and the
server's ``data_to_send`` goes back into the wsproto client. Time is a plain
number passed in by the test.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.events import Event as WSEvent

from mesh_core import CloseCode, ServerOptions, UpgradeRequest
from mesh_core.protocol import (
    ConnectionLost,
    HandshakeReceived,
    LocalProtocolError,
    RequestReceived,
    ServerConnection,
    State,
)

QUIET = ServerOptions(ping_interval=0, latency_interval=0)


class Peer:
    """A wsproto client wired to a ``ServerConnection``."""

    def __init__(
        self,
        options: ServerOptions = QUIET,
        *,
        now: float | None = 0.0,
        peer: tuple[str, int] | None = ("10.0.0.7", 51234),
    ) -> None:
        self.server = ServerConnection(options, peer=peer, now=now)
        self.client = WSConnection(ConnectionType.CLIENT)
        self.wakes = 0
        self.server.wake = self._wake
        #: every decoded JSON message the client got, in order
        self.frames: list[Any] = []
        #: every other wsproto event the client got, in order
        self.client_events: list[WSEvent] = []
        self._text: list[str] = []

    def _wake(self) -> None:
        self.wakes += 1

    def state(self) -> State:
        return self.server.state

    # -- client -> server ------------------------------------------------------

    def feed(self, data: bytes | None, now: float = 0.0) -> None:
        self.server.receive_data(data, now)

    def send(self, event: WSEvent, now: float = 0.0) -> None:
        self.feed(self.client.send(event), now)

    def send_json(self, frame: Any, now: float = 0.0) -> None:
        self.send(TextMessage(data=json.dumps(frame)), now)

    def handshake(
        self,
        target: str = "/",
        headers: list[tuple[bytes, bytes]] | None = None,
        host: str = "example.com",
    ) -> HandshakeReceived:
        self.send(Request(host=host, target=target, extra_headers=headers or []))
        events = self.server.events()
        assert len(events) == 1
        assert isinstance(events[0], HandshakeReceived)
        return events[0]

    def open(self, connection_id: str = "conn-1", now: float = 0.0) -> None:
        """Handshake, accept, opened; drain everything."""
        self.handshake()
        self.server.accept(connection_id)
        self.server.opened(now)
        self.pump()
        assert self.server.events() == []
        assert self.frames == [{"command": "mesh/assign-id", "payload": connection_id}]
        assert [type(e) for e in self.client_events] == [AcceptConnection]
        self.frames.clear()
        self.client_events.clear()

    # -- server -> client ------------------------------------------------------

    def pump(self) -> list[Any]:
        """Move the server's output into the client; return new JSON frames."""
        data = self.server.data_to_send()
        before = len(self.frames)
        if data:
            self.client.receive_data(data)
        for event in self.client.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                assert isinstance(event, TextMessage), "the server sends text frames only"
                self._text.append(event.data)
                if event.message_finished:
                    self.frames.append(json.loads("".join(self._text)))
                    self._text.clear()
            else:
                self.client_events.append(event)
        return self.frames[before:]

    def closes(self) -> list[CloseConnection]:
        return [e for e in self.client_events if isinstance(e, CloseConnection)]


def lost(events: list[Any]) -> list[ConnectionLost]:
    return [e for e in events if isinstance(e, ConnectionLost)]


# -- handshake ------------------------------------------------------------------


def test_handshake_received_carries_the_request() -> None:
    p = Peer()
    assert p.server.state is State.HANDSHAKE
    event = p.handshake(
        "/chat/room?token=abc&tag=a&tag=b&empty=",
        headers=[
            (b"Cookie", b"sid=s3cr3t; theme=dark"),
            (b"X-Custom", b"Value"),
            (b"User-Agent", b"pytest"),
        ],
    )
    request = event.request
    assert isinstance(request, UpgradeRequest)
    assert request.target == "/chat/room?token=abc&tag=a&tag=b&empty="
    assert request.path == "/chat/room"
    assert request.query == {"token": ["abc"], "tag": ["a", "b"], "empty": [""]}
    assert request.query_param("tag") == "a"
    assert request.query_param("missing", "d") == "d"
    assert request.cookies == {"sid": "s3cr3t", "theme": "dark"}
    assert request.header("host") == "example.com"
    assert request.header("X-CUSTOM") == "Value"
    assert request.header("user-agent") == "pytest"
    assert request.header("nope") is None
    assert request.peer == ("10.0.0.7", 51234)
    # header names are lower-case
    assert all(name == name.lower() for name, _ in request.headers)
    assert ("x-custom", "Value") in request.headers
    assert p.server.state is State.HANDSHAKE
    assert p.server.data_to_send() == b""


def test_handshake_root_path_without_query() -> None:
    p = Peer()
    request = p.handshake("/").request
    assert request.path == "/"
    assert request.query == {}
    assert request.cookies == {}


def test_handshake_split_across_reads() -> None:
    p = Peer()
    data = p.client.send(Request(host="h", target="/x"))
    for i in range(len(data)):
        p.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert p.server.events() == []
    (event,) = p.server.events()
    assert isinstance(event, HandshakeReceived)
    assert event.request.path == "/x"


def test_accept_sends_101_and_is_opening() -> None:
    p = Peer()
    p.handshake()
    p.server.accept("conn-abc")
    assert p.server.state is State.OPENING
    assert p.server.id == "conn-abc"
    assert p.wakes == 1
    raw = p.server.data_to_send()
    assert raw.startswith(b"HTTP/1.1 101 ")
    p.client.receive_data(raw)
    assert [type(e) for e in p.client.events()] == [AcceptConnection]
    # no frame before opened(): the client must not see its id yet
    assert p.server.data_to_send() == b""


def test_opened_sends_assign_id_first() -> None:
    p = Peer()
    p.handshake()
    p.server.accept("conn-abc")
    p.server.opened(0.0)
    assert p.server.state is State.OPEN
    assert p.pump() == [{"command": "mesh/assign-id", "payload": "conn-abc"}]


def test_requests_while_opening_are_held_until_opened() -> None:
    p = Peer()
    p.handshake()
    p.server.accept("conn-1")
    p.pump()  # the client sees the 101 and starts talking at once
    p.send_json({"id": 1, "command": "a", "payload": {"x": 1}})
    p.send_json({"id": 2, "command": "b"})
    assert p.server.events() == []
    assert p.server.state is State.OPENING
    p.server.opened(0.0)
    assert p.server.events() == [
        RequestReceived(1, "a", {"x": 1}),
        RequestReceived(2, "b", None),
    ]
    # the assign-id frame went out before any response could be written
    p.server.respond(1, "a", "r1")
    assert p.pump() == [
        {"command": "mesh/assign-id", "payload": "conn-1"},
        {"id": 1, "command": "a", "payload": "r1"},
    ]


def test_accept_twice_and_opened_twice_raise() -> None:
    # misuse raises, as in h11 (they were silently ignored before issue 10)
    p = Peer()
    p.handshake()
    p.server.accept("conn-1")
    with pytest.raises(LocalProtocolError):
        p.server.accept("conn-2")
    assert p.server.id == "conn-1"
    p.server.opened(0.0)
    with pytest.raises(LocalProtocolError):
        p.server.opened(0.0)
    assert p.pump() == [{"command": "mesh/assign-id", "payload": "conn-1"}]


def test_opened_before_accept_raises() -> None:
    p = Peer()
    p.handshake()
    with pytest.raises(LocalProtocolError):
        p.server.opened(0.0)
    assert p.server.state is State.HANDSHAKE
    assert p.server.data_to_send() == b""


def test_send_before_open_is_refused() -> None:
    p = Peer()
    p.handshake()
    assert p.server.send_push("x", 1) is False
    p.server.accept("c")
    assert p.server.send_push("x", 1) is False
    assert p.server.respond(1, "x", 1) is False


def test_reject_answers_http_401_and_closes_without_connection_lost() -> None:
    p = Peer()
    p.handshake()
    p.server.reject(401, "Unauthorized")
    assert p.server.state is State.CLOSED
    assert p.server.events() == []
    assert p.wakes == 1
    p.pump()
    reject, *body = p.client_events
    assert isinstance(reject, RejectConnection)
    assert reject.status_code == 401
    assert reject.has_body is True
    assert all(isinstance(part, RejectData) for part in body)
    assert b"".join(bytes(part.data) for part in body if isinstance(part, RejectData)) == (
        b"Unauthorized"
    )
    assert isinstance(body[-1], RejectData)
    assert body[-1].body_finished is True
    # further input and a lost socket produce nothing
    p.feed(b"garbage")
    p.feed(None)
    assert p.server.events() == []
    assert p.server.state is State.CLOSED


def test_reject_with_custom_status() -> None:
    p = Peer()
    p.handshake()
    p.server.reject(403, "Forbidden")
    p.pump()
    reject = p.client_events[0]
    assert isinstance(reject, RejectConnection)
    assert reject.status_code == 403


def test_reject_after_accept_raises() -> None:
    p = Peer()
    p.handshake()
    p.server.accept("c")
    p.server.data_to_send()
    with pytest.raises(LocalProtocolError):
        p.server.reject()
    assert p.server.state is State.OPENING
    assert p.server.data_to_send() == b""


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not an upgrade
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
    ids=["not-http", "plain-get", "missing-key"],
)
def test_malformed_http_request_is_rejected_with_4xx(request_bytes: bytes) -> None:
    p = Peer()
    p.feed(request_bytes)
    assert p.server.state is State.CLOSED
    assert p.server.events() == []
    out = p.server.data_to_send()
    status_line = out.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), out
    # nothing afterwards
    p.feed(b"more")
    assert p.server.events() == []


# -- requests -------------------------------------------------------------------


def test_request_received_for_frames_with_id() -> None:
    p = Peer()
    p.open()
    p.send_json({"id": 5, "command": "do", "payload": [1, "two", {"3": None}]})
    assert p.server.events() == [RequestReceived(5, "do", [1, "two", {"3": None}])]


def test_several_frames_in_one_read() -> None:
    p = Peer()
    p.open()
    data = b"".join(
        p.client.send(TextMessage(data=json.dumps({"id": i, "command": "c"}))) for i in range(3)
    )
    p.feed(data)
    assert p.server.events() == [RequestReceived(i, "c", None) for i in range(3)]


def test_frames_without_id_are_ignored() -> None:
    p = Peer()
    p.open()
    p.send_json({"command": "do", "payload": {}})
    p.send_json({"command": "do", "id": None})
    assert p.server.events() == []
    assert p.server.violations == 0
    assert p.server.state is State.OPEN


@pytest.mark.parametrize("command", ["pong", "latency:response"])
def test_pong_and_latency_response_are_never_dispatched(command: str) -> None:
    p = Peer()
    p.open()
    p.send_json({"id": 99, "command": command, "payload": {}})
    p.send_json({"command": command, "payload": {}})
    assert p.server.events() == []
    assert p.pump() == []


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '"str"',
        "{}",
        '{"id": 1}',
        '{"id": 1, "command": 5}',
        '{"id": 1.5, "command": "x"}',
        '{"id": "1", "command": "x"}',
    ],
)
def test_invalid_frames_are_counted_and_connection_stays_open(text: str) -> None:
    p = Peer()
    p.open()
    p.send(TextMessage(data=text))
    assert p.server.events() == []
    assert p.server.violations == 1
    assert p.server.state is State.OPEN
    assert p.pump() == []
    assert p.client_events == []
    # and the connection still works
    p.send_json({"id": 2, "command": "ok"})
    assert p.server.events() == [RequestReceived(2, "ok", None)]


def test_violations_accumulate() -> None:
    p = Peer()
    p.open()
    for _ in range(5):
        p.send(TextMessage(data="{"))
    assert p.server.violations == 5
    assert p.server.state is State.OPEN


def test_binary_frame_is_decoded_as_utf8_json() -> None:
    p = Peer()
    p.open()
    p.send(BytesMessage(data='{"id": 3, "command": "bin", "payload": "é😀"}'.encode()))
    assert p.server.events() == [RequestReceived(3, "bin", "é😀")]


def test_binary_frame_with_invalid_utf8_is_a_violation() -> None:
    p = Peer()
    p.open()
    p.send(BytesMessage(data=b'{"id": 3, "command": "\xff"}'))
    p.send(BytesMessage(data=b"\xff\xfe not json"))
    assert p.server.events() == []
    assert p.server.violations == 2
    assert p.server.state is State.OPEN


def test_fragmented_text_message_is_reassembled() -> None:
    p = Peer()
    p.open()
    text = json.dumps({"id": 4, "command": "frag", "payload": "é" * 50 + "😀"})
    p.send(TextMessage(data=text[:10], message_finished=False))
    p.send(TextMessage(data=text[10:30], message_finished=False))
    assert p.server.events() == []
    p.send(TextMessage(data=text[30:], message_finished=True))
    assert p.server.events() == [RequestReceived(4, "frag", "é" * 50 + "😀")]


def test_fragmented_binary_message_is_reassembled() -> None:
    p = Peer()
    p.open()
    data = json.dumps({"id": 6, "command": "frag", "payload": "é😀"}, ensure_ascii=False).encode()
    # split inside a multi-byte UTF-8 sequence on purpose
    cut = data.index("😀".encode()) + 2
    p.send(BytesMessage(data=data[:cut], message_finished=False))
    p.send(BytesMessage(data=data[cut:], message_finished=True))
    assert p.server.events() == [RequestReceived(6, "frag", "é😀")]


def test_fragmented_message_interleaved_with_ping() -> None:
    p = Peer()
    p.open()
    p.send(TextMessage(data='{"id": 1, ', message_finished=False))
    p.send(Ping(b"hb"))
    p.send(TextMessage(data='"command": "x"}', message_finished=True))
    assert p.server.events() == [RequestReceived(1, "x", None)]
    p.pump()
    assert p.client_events == [Pong(payload=b"hb")]


def test_client_ping_is_answered_with_pong() -> None:
    p = Peer()
    p.open()
    p.send(Ping(b"abc"))
    assert p.server.events() == []
    assert p.pump() == []
    assert p.client_events == [Pong(payload=b"abc")]


# -- message size ---------------------------------------------------------------

SMALL = ServerOptions(ping_interval=0, latency_interval=0, max_message_size=1024)


def test_message_at_the_limit_is_accepted() -> None:
    p = Peer(SMALL)
    p.open()
    prefix = '{"id":1,"command":"x","payload":"'
    text = prefix + "a" * (1024 - len(prefix) - 2) + '"}'
    assert len(text.encode()) == 1024
    p.send(TextMessage(data=text))
    events = p.server.events()
    assert len(events) == 1
    assert isinstance(events[0], RequestReceived)
    assert p.server.state is State.OPEN


def test_message_over_the_limit_closes_1009_once() -> None:
    p = Peer(SMALL)
    p.open()
    p.send(TextMessage(data=json.dumps({"id": 1, "command": "x", "payload": "a" * 2000})))
    assert p.server.events() == [ConnectionLost(1009, "message too big")]
    assert p.server.state is State.CLOSING
    assert p.server.close_code == 1009
    # more oversized input (sent before the client saw our close) is ignored
    p.send(TextMessage(data="b" * 2000))
    assert p.server.events() == []
    p.pump()
    (close,) = p.closes()
    assert close.code == CloseCode.MESSAGE_TOO_BIG


def test_fragmented_message_over_the_limit_closes_1009() -> None:
    p = Peer(SMALL)
    p.open()
    p.send(
        TextMessage(data='{"id":1,"command":"x","payload":"' + "a" * 500, message_finished=False)
    )
    p.send(TextMessage(data="a" * 400, message_finished=False))
    assert p.server.events() == []
    assert p.server.state is State.OPEN
    p.send(TextMessage(data="a" * 400, message_finished=False))
    assert p.server.events() == [ConnectionLost(1009, "message too big")]
    p.send(TextMessage(data='"}', message_finished=True))
    assert p.server.events() == []
    p.pump()
    assert [c.code for c in p.closes()] == [1009]


def test_fragmented_binary_message_over_the_limit_closes_1009() -> None:
    p = Peer(SMALL)
    p.open()
    for _ in range(3):
        p.send(BytesMessage(data=b"x" * 400, message_finished=False))
    assert lost(p.server.events()) == [ConnectionLost(1009, "message too big")]


def test_size_counter_resets_between_messages() -> None:
    p = Peer(SMALL)
    p.open()
    for i in range(10):
        text = json.dumps({"id": i, "command": "x", "payload": "a" * 800})
        assert len(text) < 1024
        p.send(TextMessage(data=text))
    assert len(p.server.events()) == 10
    assert p.server.state is State.OPEN


def test_multibyte_text_over_the_byte_limit_closes_1009() -> None:
    p = Peer(SMALL)
    p.open()
    # 600 characters but 1800+ bytes of UTF-8: over a 1024-byte limit
    text = json.dumps({"id": 1, "command": "x", "payload": "€" * 580}, ensure_ascii=False)
    assert len(text) < 1024 < len(text.encode())
    p.send(TextMessage(data=text))
    assert p.server.events() == [ConnectionLost(1009, "message too big")]


# -- heartbeat ------------------------------------------------------------------

PINGING = ServerOptions(ping_interval=10, latency_interval=0, max_missed_pongs=1)


def test_ping_sent_at_interval() -> None:
    p = Peer(PINGING)
    p.open(now=0.0)
    assert p.server.next_deadline() == 10.0
    p.server.tick(9.99)
    assert p.pump() == []
    p.server.tick(10.0)
    assert p.pump() == [{"command": "ping", "payload": {}}]
    assert p.server.next_deadline() == 20.0


def test_pong_resets_and_keeps_the_connection() -> None:
    p = Peer(PINGING)
    p.open(now=0.0)
    for t in (10.0, 20.0, 30.0, 40.0):
        p.server.tick(t)
        assert p.pump() == [{"command": "ping", "payload": {}}]
        p.send_json({"id": int(t), "command": "pong", "payload": {}}, now=t + 0.1)
    assert p.server.state is State.OPEN
    assert p.server.events() == []


def test_missed_pong_closes_1008() -> None:
    p = Peer(PINGING)
    p.open(now=0.0)
    p.server.tick(10.0)
    assert p.pump() == [{"command": "ping", "payload": {}}]
    p.server.tick(20.0)
    assert p.server.events() == [ConnectionLost(1008, "missed pongs")]
    assert p.server.state is State.CLOSING
    assert p.pump() == []  # no second ping
    assert [c.code for c in p.closes()] == [CloseCode.POLICY_VIOLATION]
    p.server.tick(21.0)
    assert p.server.events() == []


def test_two_missed_pongs_allowed() -> None:
    p = Peer(ServerOptions(ping_interval=10, latency_interval=0, max_missed_pongs=2))
    p.open(now=0.0)
    p.server.tick(10.0)
    p.server.tick(20.0)
    assert p.server.state is State.OPEN
    assert p.pump() == [{"command": "ping", "payload": {}}] * 2
    p.server.tick(30.0)
    assert lost(p.server.events()) == [ConnectionLost(1008, "missed pongs")]


def test_late_pong_after_one_miss_with_two_allowed_resets() -> None:
    p = Peer(ServerOptions(ping_interval=10, latency_interval=0, max_missed_pongs=2))
    p.open(now=0.0)
    p.server.tick(10.0)
    p.server.tick(20.0)  # one miss
    p.send_json({"command": "pong", "payload": {}}, now=21.0)
    p.server.tick(30.0)
    p.server.tick(40.0)  # one miss again, counter was reset
    assert p.server.state is State.OPEN
    assert p.server.events() == []


def test_no_ping_when_disabled() -> None:
    p = Peer(QUIET)
    p.open(now=0.0)
    assert p.server.next_deadline() is None
    p.server.tick(1e9)
    assert p.pump() == []


# -- latency --------------------------------------------------------------------

LATENCY = ServerOptions(ping_interval=0, latency_interval=5)


def test_latency_measured_and_reported() -> None:
    p = Peer(LATENCY)
    p.open(now=0.0)
    assert p.server.next_deadline() == 5.0
    assert p.server.latency is None
    p.server.tick(5.0)
    assert p.pump() == [{"command": "latency:request", "payload": {}}]
    p.send_json({"id": 1, "command": "latency:response", "payload": {}}, now=5.05)
    assert p.server.events() == []
    assert p.server.latency == pytest.approx(50.0)
    assert p.server.next_deadline() == 10.0
    p.server.tick(10.0)
    frames = p.pump()
    assert len(frames) == 2
    assert frames[0]["command"] == "latency"
    assert frames[0]["payload"] == pytest.approx(50.0, abs=1e-3)
    assert frames[1] == {"command": "latency:request", "payload": {}}


def test_latency_reported_once_per_measurement() -> None:
    p = Peer(LATENCY)
    p.open(now=0.0)
    p.server.tick(5.0)
    p.send_json({"command": "latency:response"}, now=5.2)
    p.server.tick(10.0)
    p.pump()
    # no answer to the second request: nothing new to report at 15
    p.server.tick(15.0)
    p.pump()
    assert [f["command"] for f in p.frames] == [
        "latency:request",
        "latency",
        "latency:request",
        "latency:request",
    ]
    assert p.server.latency == pytest.approx(200.0)


def test_unsolicited_latency_response_is_ignored() -> None:
    p = Peer(LATENCY)
    p.open(now=0.0)
    p.send_json({"command": "latency:response"}, now=1.0)
    assert p.server.latency is None
    assert p.server.events() == []


def test_next_deadline_is_the_earliest_timer() -> None:
    p = Peer(ServerOptions(ping_interval=30, latency_interval=5))
    p.open(now=100.0)
    assert p.server.next_deadline() == 105.0
    p.server.tick(105.0)
    assert p.server.next_deadline() == 110.0
    for t in (110.0, 115.0, 120.0, 125.0):
        p.server.tick(t)
    assert p.server.next_deadline() == 130.0
    p.server.tick(130.0)
    assert p.server.next_deadline() == 135.0
    commands = [f["command"] for f in p.pump()]
    assert commands.count("ping") == 1
    assert commands.count("latency:request") == 6


def test_next_deadline_by_state() -> None:
    p = Peer(ServerOptions(handshake_timeout=7), now=3.0)
    assert p.server.next_deadline() == 10.0
    p.handshake()
    p.server.accept("c")
    assert p.server.next_deadline() is None  # OPENING: no timer
    p.server.opened(20.0)
    assert p.server.next_deadline() == 25.0  # default latency interval 5 s


# -- closing --------------------------------------------------------------------


def test_peer_close_is_answered_and_lost_once() -> None:
    p = Peer()
    p.open()
    p.send(CloseConnection(code=1000, reason="bye"))
    assert p.server.events() == [ConnectionLost(1000, "bye")]
    assert p.server.state is State.CLOSED
    assert p.server.close_code == 1000
    assert p.server.close_reason == "bye"
    p.pump()
    assert [(c.code, c.reason) for c in p.closes()] == [(1000, "bye")]
    # the socket then ends: nothing more
    p.feed(None)
    assert p.server.events() == []
    assert p.server.send_push("x", 1) is False


def test_peer_close_with_other_code() -> None:
    p = Peer()
    p.open()
    p.send(CloseConnection(code=4001, reason=""))
    assert p.server.events() == [ConnectionLost(4001, "")]


def test_peer_close_while_opening_drops_held_requests() -> None:
    p = Peer()
    p.handshake()
    p.server.accept("c")
    p.pump()
    p.send_json({"id": 1, "command": "a"})
    p.send(CloseConnection(code=1001))
    assert p.server.events() == [ConnectionLost(1001, "")]
    p.server.opened(0.0)  # too late: nothing
    assert p.server.events() == []
    assert p.server.state is State.CLOSED


def test_eof_is_abnormal_close() -> None:
    p = Peer()
    p.open()
    p.feed(None)
    assert p.server.events() == [ConnectionLost(1006, "connection lost")]
    assert p.server.state is State.CLOSED
    p.feed(None)
    p.feed(b"x")
    assert p.server.events() == []


def test_eof_during_handshake_has_no_connection_lost() -> None:
    p = Peer()
    p.feed(None)
    assert p.server.state is State.CLOSED
    assert p.server.events() == []


def test_local_close_then_timeout() -> None:
    p = Peer(ServerOptions(ping_interval=0, latency_interval=0, close_timeout=5))
    p.open()
    p.wakes = 0
    p.server.close(1000, "done")
    assert p.server.state is State.CLOSING
    assert p.wakes == 1
    assert p.server.events() == [ConnectionLost(1000, "done")]
    p.pump()
    assert [(c.code, c.reason) for c in p.closes()] == [(1000, "done")]
    assert p.server.next_deadline() == -math.inf
    p.server.tick(100.0)
    assert p.server.next_deadline() == 105.0
    p.server.tick(104.9)
    assert p.state() is State.CLOSING
    p.server.tick(105.0)
    assert p.state() is State.CLOSED
    assert p.server.events() == []
    assert p.server.next_deadline() is None


def test_local_close_then_peer_answers() -> None:
    p = Peer()
    p.open()
    p.server.close(4000, "kick")
    assert p.server.events() == [ConnectionLost(4000, "kick")]
    p.pump()
    (close,) = p.closes()
    p.send(close.response())
    assert p.server.state is State.CLOSED
    assert p.server.events() == []
    assert p.server.data_to_send() == b""  # no second close frame


def test_close_twice_sends_one_close_frame() -> None:
    p = Peer()
    p.open()
    p.server.close()
    p.server.close()
    assert len(lost(p.server.events())) == 1
    p.pump()
    assert len(p.closes()) == 1


def test_close_during_handshake_drops_the_socket() -> None:
    p = Peer()
    p.handshake()
    p.server.close()
    assert p.server.state is State.CLOSED
    assert p.server.events() == []
    assert p.server.data_to_send() == b""


def test_requests_after_close_are_not_dispatched() -> None:
    p = Peer()
    p.open()
    p.server.close()
    p.server.events()
    p.send_json({"id": 1, "command": "late"})
    assert p.server.events() == []


def test_handshake_timeout_drops_a_socket_that_never_upgrades() -> None:
    p = Peer(ServerOptions(handshake_timeout=10), now=0.0)
    p.feed(b"GET / HTTP/1.1\r\nHost: x\r\n")  # incomplete request
    assert p.server.next_deadline() == 10.0
    p.server.tick(9.5)
    assert p.state() is State.HANDSHAKE
    p.server.tick(10.0)
    assert p.state() is State.CLOSED
    assert p.wakes == 1
    assert p.server.events() == []
    assert p.server.data_to_send() == b""


def test_no_handshake_timeout_without_a_start_time() -> None:
    p = Peer(ServerOptions(handshake_timeout=10), now=None)
    assert p.server.next_deadline() is None
    p.server.tick(1e9)
    assert p.server.state is State.HANDSHAKE


def test_handshake_timeout_zero_disables() -> None:
    p = Peer(ServerOptions(handshake_timeout=0), now=0.0)
    assert p.server.next_deadline() is None


def test_handshake_timeout_does_not_apply_after_accept() -> None:
    p = Peer(ServerOptions(handshake_timeout=10, ping_interval=0, latency_interval=0), now=0.0)
    p.open()
    p.server.tick(50.0)
    assert p.server.state is State.OPEN


# -- output and backpressure ----------------------------------------------------


def test_slow_consumer_is_aborted_1013() -> None:
    options = ServerOptions(
        ping_interval=0, latency_interval=0, max_message_size=1024, max_send_buffer=2048
    )
    p = Peer(options)
    p.open()
    chunk = b'"' + b"x" * 998 + b'"'
    assert p.server.send_message(chunk) is True
    assert p.server.send_message(chunk) is True
    assert p.server.pending_bytes == 2 * (1000 + 4)
    assert p.server.send_message(chunk) is False
    assert p.server.aborted is True
    assert p.server.state is State.CLOSED
    assert p.server.events() == [ConnectionLost(1013, "slow consumer: send buffer full")]
    assert p.server.pending_bytes == 0
    assert p.server.data_to_send() == b""
    assert p.server.send_message(b"1") is False
    assert p.server.events() == []


def test_draining_keeps_a_fast_consumer_alive() -> None:
    options = ServerOptions(
        ping_interval=0, latency_interval=0, max_message_size=1024, max_send_buffer=2048
    )
    p = Peer(options)
    p.open()
    for i in range(20):
        assert p.server.send_push("n", "x" * 900) is True
        assert p.pump() == [{"command": "n", "payload": "x" * 900}]
        del i
    assert p.server.aborted is False
    assert p.server.state is State.OPEN


def test_wake_called_when_output_queued_from_outside() -> None:
    p = Peer()
    p.open()
    p.wakes = 0
    assert p.server.send_push("a", 1) is True
    assert p.wakes == 1
    assert p.server.has_work is True
    # already non-empty: the adapter already knows
    assert p.server.respond(3, "b", 2) is True
    assert p.wakes == 1
    assert p.pump() == [{"command": "a", "payload": 1}, {"id": 3, "command": "b", "payload": 2}]
    assert p.server.has_work is False
    p.server.send_push("c", None)
    assert p.wakes == 2


def test_wake_called_by_a_timer() -> None:
    p = Peer(PINGING)
    p.open()
    p.wakes = 0
    p.server.tick(10.0)
    assert p.wakes == 1
    assert p.server.has_work is True


def test_has_work_reflects_events() -> None:
    p = Peer()
    p.open()
    assert p.server.has_work is False
    p.send_json({"id": 1, "command": "x"})
    assert p.server.has_work is True
    p.server.events()
    assert p.server.has_work is False


def test_server_frames_are_unmasked_text() -> None:
    p = Peer()
    p.open()
    p.server.send_push("x", "y")
    data = p.server.data_to_send()
    payload = b'{"command":"x","payload":"y"}'
    assert data == bytes((0x81, len(payload))) + payload


# -- properties -----------------------------------------------------------------


def opened_peer() -> Peer:
    p = Peer(ServerOptions(ping_interval=0, latency_interval=0, max_message_size=1024 * 64))
    p.open()
    return p


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(chunks=st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_bytes_after_handshake_never_raise(chunks: list[bytes]) -> None:
    p = opened_peer()
    for i, chunk in enumerate(chunks):
        p.feed(chunk, float(i))
        p.server.tick(float(i))
        for event in p.server.events():
            assert isinstance(event, (RequestReceived, ConnectionLost))
        p.server.data_to_send()
    p.feed(None, 100.0)
    p.server.events()
    assert p.server.state is State.CLOSED


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(chunk=st.binary(min_size=1, max_size=300))
def test_arbitrary_masked_frame_payload_never_raises(chunk: bytes) -> None:
    # a syntactically valid masked frame header with arbitrary opcode bits
    p = opened_peer()
    for opcode in (0x1, 0x2, 0x0, 0x8, 0x9, 0xA, 0x3):
        header = bytes((0x80 | opcode, 0x80 | min(len(chunk), 125)))
        p.feed(header + b"\x00\x00\x00\x00" + chunk[:125], 0.0)
        p.server.events()
        p.server.data_to_send()


TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
COMMANDS = st.one_of(
    st.sampled_from(["pong", "latency:response", "mesh/noop", "ping", "x"]),
    TEXT,
    JSON_VALUES,  # mostly not a string: a violation
)
IDS = st.one_of(st.integers(min_value=-(2**53), max_value=2**53), JSON_VALUES)


@st.composite
def frames(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)  # often not an object at all
    frame: dict[str, Any] = {}
    if draw(st.booleans()):
        frame["command"] = draw(COMMANDS)
    if draw(st.booleans()):
        frame["id"] = draw(IDS)
    if draw(st.booleans()):
        frame["payload"] = draw(JSON_VALUES)
    extra = draw(st.dictionaries(TEXT, JSON_VALUES, max_size=2))
    for key, value in extra.items():
        frame.setdefault(key, value)
    return frame


def is_request(frame: Any) -> bool:
    if not isinstance(frame, dict):
        return False
    command = frame.get("command")
    fid = frame.get("id")
    return (
        isinstance(command, str)
        and isinstance(fid, int)
        and not isinstance(fid, bool)
        and command not in ("pong", "latency:response")
    )


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(batch=st.lists(frames(), max_size=10), binary=st.booleans())
def test_arbitrary_json_frames_dispatch_exactly_the_requests(
    batch: list[Any], binary: bool
) -> None:
    p = opened_peer()
    for frame in batch:
        text = json.dumps(frame)
        p.send(BytesMessage(data=text.encode()) if binary else TextMessage(data=text))
    events = p.server.events()
    expected = [
        RequestReceived(f["id"], f["command"], f.get("payload")) for f in batch if is_request(f)
    ]
    assert events == expected
    int_or_null_id = sum(
        1
        for f in batch
        if isinstance(f, dict)
        and isinstance(f.get("command"), str)
        and (f.get("id") is None or (isinstance(f["id"], int) and not isinstance(f["id"], bool)))
    )
    assert p.server.violations == len(batch) - int_or_null_id
    assert p.server.state is State.OPEN

"""ServerConnection's message level (``framed=False``): whole messages in,
text messages out, the same rules as the bytes entry point."""

from __future__ import annotations

import json

from mesh_core import ServerOptions, UpgradeRequest
from mesh_core.protocol import (
    CloseCode,
    ConnectionLost,
    HandshakeReceived,
    RequestReceived,
    ServerConnection,
    State,
)


def opened(**options: object) -> ServerConnection:
    proto = ServerConnection(ServerOptions(**options), now=0.0, framed=False)  # type: ignore[arg-type]
    proto.receive_upgrade(UpgradeRequest("/ws?token=1", (("host", "x"),), ("127.0.0.1", 5)))
    (event,) = proto.events()
    assert isinstance(event, HandshakeReceived)
    assert event.request.path == "/ws" and event.request.query_param("token") == "1"
    proto.accept("conn-1")
    proto.opened(0.0)
    (assign,) = proto.messages_to_send()
    assert json.loads(assign) == {"command": "mesh/assign-id", "payload": "conn-1"}
    return proto


def request(n: int, command: str = "echo", payload: object = None) -> str:
    return json.dumps({"id": n, "command": command, "payload": payload})


def test_a_request_in_and_its_response_out_as_text() -> None:
    proto = opened()
    proto.receive_message(request(1, payload={"a": "é" * 200}), 0.0)
    (event,) = proto.events()
    assert isinstance(event, RequestReceived) and event.payload == {"a": "é" * 200}
    proto.respond(1, "echo", {"big": "x" * 70000})  # a 64-bit length header
    proto.respond(2, "echo", "y" * 300)  # a 16-bit one
    out = [json.loads(m) for m in proto.messages_to_send()]
    assert [m["id"] for m in out] == [1, 2]
    assert out[0]["payload"] == {"big": "x" * 70000}


def test_size_limit_closes_1009_and_nothing_is_framed() -> None:
    proto = opened(max_message_size=1024)
    proto.receive_message("é" * 513, 0.0)  # 1026 bytes as UTF-8
    assert proto.state is State.CLOSED
    assert proto.close_to_send == (CloseCode.MESSAGE_TOO_BIG, "message too big")
    assert isinstance(proto.events()[-1], ConnectionLost)
    assert proto.messages_to_send() == []


def test_violations_and_in_flight_limits_hold() -> None:
    proto = opened(max_violations=2, max_requests_in_flight=1)
    proto.receive_message(request(1), 0.0)
    proto.receive_message(request(2), 0.0)
    assert [e.id for e in proto.events() if isinstance(e, RequestReceived)] == [1]
    proto.receive_message("not json", 0.0)
    proto.receive_message(b"[1]", 0.0)
    assert proto.state is State.OPEN
    proto.receive_message("{", 0.0)
    assert proto.close_to_send is not None
    assert proto.close_to_send[0] == CloseCode.POLICY_VIOLATION
    # the queued request was answered before the close: every request once
    (answer,) = [json.loads(m) for m in proto.messages_to_send()]
    assert answer["id"] == 2 and answer["payload"]["code"] == "EUNAVAILABLE"


def test_reject_and_peer_close() -> None:
    proto = ServerConnection(ServerOptions(), now=0.0, framed=False)
    proto.receive_upgrade(UpgradeRequest("/", ()))
    proto.events()
    proto.reject(403, "Forbidden")
    assert proto.state is State.CLOSED and proto.rejection == (403, "Forbidden")
    assert proto.messages_to_send() == []
    other = opened()
    other.receive_closed(1000, "bye")
    assert other.state is State.CLOSED and other.close_to_send is None
    assert other.events() == [ConnectionLost(1000, "bye")]

"""The wire protocol, sans-IO: the frame codec, the fast frame scanner, the
handshake's view of an upgrade request, and the two connection state machines
(server and client roles). Adapters feed these bytes and get events and bytes
back; nothing here knows about storage or the application.
"""

from ._client_connection import (
    ClientConnection,
    ClientEvent,
    ClientState,
    Closed,
    Connected,
    LatencyUpdated,
    Push,
    Rejected,
    Response,
)
from ._frames import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Frame,
    Violation,
    decode_frame,
    encode_json,
    encode_push,
    encode_response,
)
from ._handshake import Reject, UpgradeRequest
from ._server_connection import (
    CloseCode,
    ConnectionLost,
    Event,
    HandshakeReceived,
    PongReceived,
    RequestReceived,
    ServerConnection,
    State,
    text_frame,
)

__all__ = [
    "ClientConnection",
    "ClientEvent",
    "ClientState",
    "CloseCode",
    "Closed",
    "Connected",
    "ConnectionLost",
    "PongReceived",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Event",
    "Frame",
    "HandshakeReceived",
    "LatencyUpdated",
    "Push",
    "Reject",
    "Rejected",
    "RequestReceived",
    "Response",
    "ServerConnection",
    "State",
    "UpgradeRequest",
    "Violation",
    "decode_frame",
    "encode_json",
    "encode_push",
    "encode_response",
    "text_frame",
]

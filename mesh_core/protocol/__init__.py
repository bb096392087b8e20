"""The wire protocol, sans-IO: the frame codec, the fast frame scanner, the
handshake's view of an upgrade request, and the two connection state machines
(server and client roles). Adapters feed these bytes and get events and bytes
back; nothing here knows about storage or the application.

One module per concern: ``_frames`` (JSON frames as msgspec Structs),
``_wsframes`` (the fast scanner), ``_messages`` (message assembly, shared by
both roles), ``_close_codes``, ``_state`` (the states and which call is
valid in which), ``_handshake``, ``_server_connection``, ``_client_connection``.
Calling a machine in a wrong state raises :class:`LocalProtocolError`.
"""

from .._errors import LocalProtocolError
from ._client_connection import (
    ClientConnection,
    ClientEvent,
    Closed,
    Connected,
    LatencyUpdated,
    Push,
    Rejected,
    Response,
)
from ._close_codes import CloseCode
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
    ConnectionLost,
    Event,
    HandshakeReceived,
    PongReceived,
    RequestReceived,
    ServerConnection,
    text_frame,
)
from ._state import ClientState, State

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
    "LocalProtocolError",
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

"""Mesh for Python, the sans-IO core.

Every rule of the Mesh protocol lives here, free of sockets, event loops and
clocks: the frame codec, the per-connection state machine, command routing
and error payloads, the built-in commands as operation-emitting logic, the
merge strategies, the runtime-neutral application and server API, and the
client role, which ``mesh_asyncio`` and ``mesh_trio`` bind to the network.
"""

from ._app import Context, MeshApp
from ._builtins import BUILTINS, CheckClientWrite
from ._client import (
    ClientConnection,
    ClientCore,
    ClientOptions,
    CommandTimeout,
    ConnectionRejected,
    MeshClientError,
    MeshCommandError,
    MeshConnectionError,
    Push,
)
from ._config import ServerOptions
from ._connection import (
    CloseCode,
    ConnectionLost,
    Event,
    HandshakeReceived,
    RequestReceived,
    ServerConnection,
    State,
    text_frame,
)
from ._errors import CommandError, MeshError, ValidationError, error_payload
from ._frames import DEFAULT_MAX_MESSAGE_SIZE, Frame, Violation, decode_frame, encode_push
from ._handshake import Reject, UpgradeRequest
from ._memory import MemoryStore
from ._ops import UNCHANGED, UnknownConnection
from ._server import Connection, ConnectionRef, ConnectionsAPI, RoomsAPI, ServerCore
from ._storage import Storage
from ._strategies import STRATEGIES, apply_strategy, deep_merge, merge, replace

__all__ = [
    "BUILTINS",
    "ClientConnection",
    "ClientCore",
    "ClientOptions",
    "CommandTimeout",
    "ConnectionRejected",
    "MeshClientError",
    "MeshCommandError",
    "MeshConnectionError",
    "Push",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "STRATEGIES",
    "UNCHANGED",
    "CheckClientWrite",
    "CloseCode",
    "CommandError",
    "Connection",
    "ConnectionLost",
    "ConnectionRef",
    "ConnectionsAPI",
    "Context",
    "Event",
    "Frame",
    "HandshakeReceived",
    "MemoryStore",
    "MeshApp",
    "MeshError",
    "Reject",
    "RequestReceived",
    "RoomsAPI",
    "ServerConnection",
    "ServerCore",
    "ServerOptions",
    "State",
    "Storage",
    "UnknownConnection",
    "UpgradeRequest",
    "ValidationError",
    "Violation",
    "apply_strategy",
    "decode_frame",
    "deep_merge",
    "encode_push",
    "error_payload",
    "merge",
    "replace",
    "text_frame",
]

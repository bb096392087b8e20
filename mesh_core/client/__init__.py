"""The runtime-neutral half of ``MeshClient``: options, the push buffers and
listeners, reconnect delays, and what outlives one socket.
"""

from .._errors import (
    CommandTimeout,
    ConnectionRejected,
    MeshClientError,
    MeshCommandError,
    MeshConnectionError,
)
from ._core import (
    LIFECYCLE_EVENTS,
    ClientCore,
    ClientOptions,
    ClientStatus,
    Endpoint,
    PushBuffer,
    check_response,
    is_error_payload,
    parse_url,
    reconnect_delay,
)
from ._records import CollectionDiff, RecordUpdate

__all__ = [
    "CollectionDiff",
    "RecordUpdate",
    "ClientCore",
    "ClientOptions",
    "ClientStatus",
    "CommandTimeout",
    "ConnectionRejected",
    "Endpoint",
    "LIFECYCLE_EVENTS",
    "MeshClientError",
    "MeshCommandError",
    "MeshConnectionError",
    "PushBuffer",
    "check_response",
    "is_error_payload",
    "parse_url",
    "reconnect_delay",
]

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
from ._channels import ChannelCallback, ChannelSubscription, History
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

__all__ = [
    "ChannelCallback",
    "ChannelSubscription",
    "ClientCore",
    "ClientOptions",
    "ClientStatus",
    "CommandTimeout",
    "ConnectionRejected",
    "Endpoint",
    "History",
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

"""The Mesh client, runtime-neutral: :class:`ClientCore` is the whole client
(options, listeners, push buffers, rooms, and through its
:class:`~mesh_core.client._supervisor.Supervisor` connect, reconnect with
backoff, re-join, command timeouts, dead-link detection and close). An
adapter's ``MeshClient`` subclasses it with a :class:`ClientBinding`: its
``Runtime``, how to open a :class:`ClientStream` (TCP or TLS), and how to
start a background task.
"""

from .._errors import (
    CommandTimeout,
    ConnectionRejected,
    MeshClientError,
    MeshCommandError,
    MeshConnectionError,
)
from ._channels import ChannelCallback, ChannelSubscription, History
from ._core import ClientCore, PushBuffer, PushIterator
from ._options import (
    LIFECYCLE_EVENTS,
    ClientOptions,
    ClientStatus,
    Endpoint,
    check_response,
    is_error_payload,
    parse_url,
    reconnect_delay,
)
from ._records import CollectionDiff, RecordUpdate
from ._supervisor import ClientBinding, ClientStream, OpenStream, StartTask

__all__ = [
    "ChannelCallback",
    "ChannelSubscription",
    "CollectionDiff",
    "RecordUpdate",
    "ClientBinding",
    "ClientCore",
    "ClientOptions",
    "ClientStatus",
    "ClientStream",
    "CommandTimeout",
    "ConnectionRejected",
    "Endpoint",
    "History",
    "LIFECYCLE_EVENTS",
    "MeshClientError",
    "MeshCommandError",
    "MeshConnectionError",
    "OpenStream",
    "PushBuffer",
    "PushIterator",
    "StartTask",
    "check_response",
    "is_error_payload",
    "parse_url",
    "reconnect_delay",
]

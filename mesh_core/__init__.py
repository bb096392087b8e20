"""Mesh for Python, the sans-IO core.

Every rule of the Mesh protocol lives here, free of sockets, event loops and
clocks. The package is laid out by layer, and each audience imports from its
own place:

- app authors: this module (``MeshApp``, ``Context``, the connections and rooms
  API, errors, options, the memory store);
- adapter authors: :mod:`mesh_core.protocol` (the connection state machines),
  :mod:`mesh_core.app` (``ServerCore``'s driver API), :mod:`mesh_core.runtime`
  (the services an adapter supplies), :mod:`mesh_core.client`;
- storage authors: :mod:`mesh_core.storage` (operations, the ``Storage``
  protocol) and :mod:`mesh_core.redis` (the Redis store's runtime-neutral half).
"""

from ._config import ServerOptions
from ._errors import (
    CommandError,
    CommandTimeout,
    ConnectionRejected,
    MeshClientError,
    MeshCommandError,
    MeshConnectionError,
    MeshError,
    MessageTooLarge,
    ServerStartupError,
    StorageUnavailable,
    ValidationError,
)
from .app import (
    ChannelsAPI,
    Connection,
    ConnectionRef,
    ConnectionsAPI,
    Context,
    MeshApp,
    RoomsAPI,
    ServerCore,
)
from .client import ClientOptions
from .protocol import CloseCode, Push, Reject, UpgradeRequest
from .storage import (
    STRATEGIES,
    UNCHANGED,
    ChannelHistory,
    MemoryStore,
    Storage,
    UnknownConnection,
)

__all__ = [
    "STRATEGIES",
    "UNCHANGED",
    "ChannelHistory",
    "ChannelsAPI",
    "ClientOptions",
    "CloseCode",
    "CommandError",
    "CommandTimeout",
    "Connection",
    "ConnectionRef",
    "ConnectionRejected",
    "ConnectionsAPI",
    "Context",
    "MemoryStore",
    "MeshApp",
    "MeshClientError",
    "MeshCommandError",
    "MeshConnectionError",
    "MeshError",
    "MessageTooLarge",
    "Push",
    "Reject",
    "RoomsAPI",
    "ServerCore",
    "ServerOptions",
    "ServerStartupError",
    "Storage",
    "StorageUnavailable",
    "UnknownConnection",
    "UpgradeRequest",
    "ValidationError",
]

"""The application layer: ``MeshApp`` (commands, middleware, hooks, policies),
the request ``Context``, the built-in commands, and ``ServerCore``: the
runtime-neutral server that turns protocol events into handler runs and storage
operations, and the connections/rooms API handed to handlers.
"""

from ._app import (
    Authenticator,
    ConnectionHook,
    Context,
    Handler,
    MeshApp,
    Middleware,
    ReadGuard,
    ReadPolicy,
    WriteGuard,
    WritePolicy,
)
from ._builtins import BUILTINS, Builtin, CheckClientWrite, Steps
from ._presence import PresenceAPI, PresenceGuard, PresenceRules, PresenceTrack
from ._pubsub import Listener, PubSub
from ._server import Connection, ConnectionRef, ConnectionsAPI, RoomsAPI, ServerCore

__all__ = [
    "PresenceAPI",
    "PresenceGuard",
    "PresenceRules",
    "PresenceTrack",
    "Authenticator",
    "BUILTINS",
    "Builtin",
    "CheckClientWrite",
    "Connection",
    "ConnectionHook",
    "ConnectionRef",
    "ConnectionsAPI",
    "Context",
    "Handler",
    "Listener",
    "MeshApp",
    "Middleware",
    "PubSub",
    "ReadGuard",
    "ReadPolicy",
    "RoomsAPI",
    "ServerCore",
    "Steps",
    "WriteGuard",
    "WritePolicy",
]

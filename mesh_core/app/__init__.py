"""The application layer: ``MeshApp`` (commands, middleware, hooks, policies),
the request ``Context``, the built-in commands (each with its own scheduling
flags), and ``ServerCore``: the runtime-neutral server that turns protocol
events into handler runs and storage operations, and the server-side API
objects handed to handlers (``server.connections``, ``server.rooms``).

Modules: ``_app`` (what an app author declares), ``_builtins`` (the ``mesh/*``
commands as generators of storage operations), ``_api`` (``Connection`` and
the API objects), ``_server`` (``ServerCore``: dispatch, policies, the
connection lifecycle, shutdown, and the adapter API). A new capability
(presence, channels, records) adds built-ins in ``_builtins``, an API object
in ``_api`` and its operations in :mod:`mesh_core.storage`; see
:mod:`mesh_core.app._server` for where each is wired.
"""

from .._metrics import combine as combine_metrics
from .._metrics import prometheus_text
from ._api import Connection, ConnectionRef, ConnectionsAPI, RoomsAPI
from ._app import (
    Authenticator,
    ChannelGuard,
    ChannelPattern,
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
from ._builtins import BUILTINS, Builtin, BuiltinCommand, CheckClientWrite, Steps
from ._channels import SUBSCRIPTION_MESSAGE, ChannelsAPI
from ._collections import CollectionsAPI
from ._logging import LOG_FORMAT, WORKER_ENV
from ._monitor import REQUEST_TIMEOUT as MONITOR_REQUEST_TIMEOUT
from ._monitor import HttpExchange, MonitorStream, health_response, http_response
from ._presence import PresenceAPI, PresenceGuard, PresenceRules, PresenceTrack
from ._pubsub import Listener, PubSub
from ._records import RecordsAPI
from ._run import ListeningServer, StopSignals, describe_startup_failure, serve_until
from ._server import ServerCore, ServerSockets
from ._sockets import LINGER_RESET, reset_on_close
from .exports import lazy_attributes

__all__ = [
    "LINGER_RESET",
    "LOG_FORMAT",
    "WORKER_ENV",
    "PresenceAPI",
    "PresenceGuard",
    "PresenceRules",
    "PresenceTrack",
    "CollectionsAPI",
    "RecordsAPI",
    "Authenticator",
    "BUILTINS",
    "Builtin",
    "BuiltinCommand",
    "ChannelGuard",
    "ChannelPattern",
    "ChannelsAPI",
    "CheckClientWrite",
    "Connection",
    "ConnectionHook",
    "ConnectionRef",
    "ConnectionsAPI",
    "Context",
    "Handler",
    "HttpExchange",
    "MONITOR_REQUEST_TIMEOUT",
    "MonitorStream",
    "health_response",
    "http_response",
    "Listener",
    "ListeningServer",
    "MeshApp",
    "Middleware",
    "PubSub",
    "ReadGuard",
    "ReadPolicy",
    "RoomsAPI",
    "SUBSCRIPTION_MESSAGE",
    "ServerCore",
    "ServerSockets",
    "Steps",
    "WriteGuard",
    "WritePolicy",
    "combine_metrics",
    "prometheus_text",
    "reset_on_close",
    "describe_startup_failure",
    "lazy_attributes",
    "StopSignals",
    "serve_until",
]

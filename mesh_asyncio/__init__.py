"""Mesh for Python on asyncio: ``MeshServer`` and ``MeshClient``."""

from mesh_core import (
    CommandError,
    CommandTimeout,
    Connection,
    ConnectionRejected,
    Context,
    MemoryStore,
    MeshApp,
    MeshClientError,
    MeshCommandError,
    MeshConnectionError,
    MeshError,
    Push,
    Reject,
    ServerOptions,
    UpgradeRequest,
)

from ._client import MeshClient
from ._run import run
from ._server import MeshServer

__all__ = [
    "CommandError",
    "CommandTimeout",
    "ConnectionRejected",
    "Connection",
    "Context",
    "MemoryStore",
    "MeshApp",
    "MeshClient",
    "MeshClientError",
    "MeshCommandError",
    "MeshConnectionError",
    "MeshError",
    "MeshServer",
    "Push",
    "Reject",
    "ServerOptions",
    "UpgradeRequest",
    "run",
]

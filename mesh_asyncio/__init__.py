"""Mesh for Python on asyncio: ``MeshServer`` (and, later, ``MeshClient``)."""

from mesh_core import (
    CommandError,
    Connection,
    Context,
    MemoryStore,
    MeshApp,
    MeshError,
    Reject,
    ServerOptions,
    UpgradeRequest,
)

from ._run import run
from ._server import MeshServer

__all__ = [
    "CommandError",
    "Connection",
    "Context",
    "MemoryStore",
    "MeshApp",
    "MeshError",
    "MeshServer",
    "Reject",
    "ServerOptions",
    "UpgradeRequest",
    "run",
]

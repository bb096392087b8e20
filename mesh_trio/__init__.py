"""Mesh for Python on trio: ``MeshServer`` and ``MeshClient``."""

from typing import TYPE_CHECKING, Any

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
    Reject,
    ServerOptions,
    UpgradeRequest,
)
from mesh_core.protocol import Push

from ._client import MeshClient
from ._run import run
from ._server import MeshServer

if TYPE_CHECKING:
    from ._redis import RedisStore


def __getattr__(name: str) -> Any:
    # the Redis driver needs the optional Redis dependencies: import on use
    if name == "RedisStore":
        from ._redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "RedisStore",
    "Reject",
    "ServerOptions",
    "UpgradeRequest",
    "run",
]

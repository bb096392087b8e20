"""Mesh for Python on asyncio: ``MeshServer`` and ``MeshClient``."""

from typing import TYPE_CHECKING

from mesh_core.app import exports, lazy_attributes
from mesh_core.app.exports import *  # noqa: F403  (what every runtime package exports)

from ._client import MeshClient
from ._run import run
from ._server import MeshServer

if TYPE_CHECKING:
    from ._redis import RedisStore

__getattr__ = lazy_attributes(__name__, {"RedisStore": "._redis"})

__all__ = [*exports.__all__, "MeshClient", "MeshServer", "RedisStore", "run"]

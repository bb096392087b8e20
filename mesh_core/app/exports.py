"""What each runtime package (``mesh_asyncio``, ``mesh_trio``) exports from the
core, listed once.

An adapter's ``__init__`` is ``from mesh_core.app.exports import *`` plus its
own ``MeshServer``, ``MeshClient``, ``run`` and (imported on first use, see
:func:`mesh_core.app.lazy_attributes`) ``RedisStore``: an app author writes
``from mesh_asyncio import MeshApp, MeshServer`` and switches runtime by
changing one word.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .._config import ServerOptions
from .._errors import (
    CommandError,
    CommandTimeout,
    ConnectionRejected,
    MeshClientError,
    MeshCommandError,
    MeshConnectionError,
    MeshError,
    MessageTooLarge,
)
from ..protocol import Push, Reject, UpgradeRequest
from ..storage import MemoryStore
from ._api import Connection
from ._app import Context, MeshApp

__all__ = [
    "CommandError",
    "CommandTimeout",
    "ConnectionRejected",
    "Connection",
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
    "ServerOptions",
    "UpgradeRequest",
]


def lazy_attributes(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from the
    submodule ``names[name]`` on first use: the Redis driver needs the
    optional Redis dependencies, so ``import mesh_asyncio`` must not import
    it. ``__getattr__ = lazy_attributes(__name__, {"RedisStore": "._redis"})``."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    return __getattr__

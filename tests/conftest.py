"""Shared fixtures: every behavioural test body runs on asyncio and on trio.

``anyio_backend`` is parametrized over both runtimes; ``server_cls`` is the
``MeshServer`` of the runtime the test body runs on, so the same test drives
``mesh_asyncio`` on asyncio and ``mesh_trio`` on trio.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def server_cls(anyio_backend: str) -> Any:
    import mesh_asyncio
    import mesh_trio

    return mesh_trio.MeshServer if anyio_backend == "trio" else mesh_asyncio.MeshServer

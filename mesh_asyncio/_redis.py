"""The Redis storage driver on asyncio: the core's store over the project's Redis client."""

from __future__ import annotations

from typing import Any

from mesh_core.redis import DEFAULT_URL, RedisStoreCore

from ._redis_transport import AsyncioRedisTransport
from ._runtime import RUNTIME

__all__ = ["RedisStore"]


class RedisStore(RedisStoreCore):
    """``MeshServer(app, storage=RedisStore("redis://localhost:6379/0"))``.

    Every URL form (Sentinel, Cluster, TLS, Unix sockets) and option: see
    :class:`mesh_core.redis.RedisStoreCore`.
    """

    def __init__(self, url: str = DEFAULT_URL, **options: Any) -> None:
        super().__init__(url, runtime=RUNTIME, client=AsyncioRedisTransport, **options)

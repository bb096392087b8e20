"""The Redis storage driver on trio: the core's logic on a trio-native client."""

from __future__ import annotations

import time
from typing import Any

import trio

from mesh_core.redis import RedisStoreCore, RedisTransport, is_cluster_url

from ._redis_cluster import TrioRedisClusterTransport
from ._redis_transport import TrioRedisTransport

__all__ = ["RedisStore"]


class RedisStore(RedisStoreCore):
    """``MeshServer(app, storage=RedisStore("redis://localhost:6379/0"))``.

    Behind Sentinel, name the sentinels and the service instead of a node
    (the master moves): ``redis+sentinel://:pw@s1,s2,s3/mymaster/0``; see
    ``mesh_core._redis_url`` for every URL form.

    Options: ``command_timeout`` (how long a request may wait for Redis
    before it is answered with an ``EUNAVAILABLE`` error payload),
    ``heartbeat_interval``/``heartbeat_ttl``, ``sweep_interval``.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        command_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        **options: Any,
    ) -> None:
        transport: RedisTransport
        if is_cluster_url(url):  # redis+cluster://host:port,host:port,...
            transport = TrioRedisClusterTransport(
                url, command_timeout=command_timeout, connect_timeout=connect_timeout
            )
        else:
            transport = TrioRedisTransport(
                url, command_timeout=command_timeout, connect_timeout=connect_timeout
            )
        super().__init__(
            transport,
            now_ms=lambda: int(time.time() * 1000),
            new_event=trio.Event,
            sleep=trio.sleep,
            **options,
        )
        self.url = url

"""The storage conformance suite on the Redis driver, both runtimes, against a
real redis-server this module starts (and flushes: it is ours alone)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from mesh_core import Storage

from .redis_server import RedisServer
from .storage_conformance import Deliveries, StorageConformance


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def flushall(port: int) -> None:
    """Empty the test server (started by this module; never another Redis)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
        assert s.recv(64).startswith(b"+OK")


def store_class(anyio_backend: str) -> Any:
    if anyio_backend == "trio":
        from mesh_trio import RedisStore
    else:
        from mesh_asyncio import RedisStore  # type: ignore[assignment]
    return RedisStore


class TestRedisStore(StorageConformance):
    @pytest.fixture(autouse=True)
    def _bind(self, redis_server: RedisServer, anyio_backend: str) -> None:
        self.redis = redis_server
        self.store_class = store_class(anyio_backend)

    async def new_storage(self) -> Storage:
        # a clean database for every test, on the server this module started
        flushall(self.redis.port)
        store: Storage = self.store_class(self.redis.url)
        return store

    async def attach_instance(
        self, storage: Storage, instance_id: str, deliver: Deliveries
    ) -> Storage:
        other: Storage = self.store_class(self.redis.url)
        await other.start(instance_id, deliver)
        return other

    async def detach_instance(self, handle: Storage, instance_id: str) -> None:
        await handle.stop()

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

    async def test_a_connection_redis_lost_is_registered_again_on_write(
        self, storage: Storage
    ) -> None:
        """Redis forgot a connection this instance holds (failover to a replica
        that had not received it): a write for it is not refused as ENOCONN,
        and the registration comes back. Not for connections held elsewhere."""
        from mesh_core import UnknownConnection
        from mesh_core import _ops as ops

        await storage.execute(ops.RegisterConnection("mine", self.instance_id, {"a": 1}))
        await storage.execute(ops.RegisterConnection("theirs", "someone-else", {"a": 1}))
        for strategy in ("merge", "replace"):
            with socket.create_connection(("127.0.0.1", self.redis.port), timeout=5) as s:
                s.sendall(
                    b"*4\r\n$4\r\nHDEL\r\n$16\r\nmesh:connections\r\n$4\r\nmine\r\n$6\r\ntheirs\r\n"
                )
                assert s.recv(64).startswith(b":")
            value = {"b": strategy}

            def add(old: Any, value: dict[str, str] = value) -> Any:
                return {**(old or {}), **value}

            result = await storage.execute(ops.UpdateMetadata("connection", "mine", add, strategy))
            assert result["b"] == strategy
            assert ("mine", self.instance_id) in await storage.execute(ops.GetAllConnectionIds())
            with pytest.raises(UnknownConnection):
                await storage.execute(
                    ops.UpdateMetadata("connection", "theirs", lambda old: {"x": 1}, strategy)
                )
        # once unregistered, it stays gone
        await storage.execute(ops.UnregisterConnection("mine", self.instance_id))
        with pytest.raises(UnknownConnection):
            await storage.execute(ops.UpdateMetadata("connection", "mine", lambda old: 1))

"""The storage conformance suite on the Redis driver, both runtimes, against a
real redis-server this module starts (and flushes: it is ours alone)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from mesh_core import Storage
from mesh_core.redis import keys
from tests.helpers.redis_server import RedisServer
from tests.helpers.storage_conformance import Deliveries, StorageConformance


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
        from mesh_core.storage import _ops as ops

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


def gate_commands(store: Any, name: str, count: int) -> tuple[list[Any], list[Any]]:
    """Hold the first ``count`` commands named ``name`` (an ``execute`` or a
    pipeline starting with it) until the test opens their gate; each sets its
    ``arrived`` event when it gets there."""
    import anyio

    arrived = [anyio.Event() for _ in range(count)]
    gates = [anyio.Event() for _ in range(count)]
    seen = 0
    execute, pipeline = store.transport.execute, store.transport.pipeline

    async def hold() -> None:
        nonlocal seen
        if seen < count:
            i, seen = seen, seen + 1
            arrived[i].set()
            await gates[i].wait()

    async def gated_execute(*args: Any) -> Any:
        if args[0] == name:
            await hold()
        return await execute(*args)

    async def gated_pipeline(commands: Any) -> Any:
        if commands and commands[0][0] == name:
            await hold()
        return await pipeline(commands)

    store.transport.execute, store.transport.pipeline = gated_execute, gated_pipeline
    return arrived, gates


async def wait_for(check: Any) -> None:
    import anyio

    with anyio.fail_after(5):
        while not check():
            await anyio.sleep(0.005)


@pytest.mark.anyio
async def test_a_cancelled_batch_leader_does_not_fake_its_followers_writes(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """The writer applying a batch of queued merges is cancelled before its
    compare-and-set reached Redis: the others in its batch are retried, not
    told their update was written."""
    import anyio

    from mesh_core.storage import _ops as ops
    from mesh_core.storage._strategies import updater

    flushall(redis_server.port)
    store = store_class(anyio_backend)(redis_server.url)
    await store.start("leader", Deliveries())
    try:
        arrived, gates = gate_commands(store, "EVALSHA", 2)
        results: dict[str, Any] = {}

        def merge(value: dict[str, int]) -> Any:
            return ops.UpdateMetadata("room", "r", updater("merge", value), "merge", value)

        async def run(name: str, value: dict[str, int], scope: Any = None) -> None:
            with scope or anyio.CancelScope():
                results[name] = await store.execute(merge(value))

        def queue() -> list[Any]:
            return list(store._turns.writers.get((keys.roommeta("r"), "data"), []))

        cancel_t2 = anyio.CancelScope()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "t1", {"a": 1})
                await arrived[0].wait()  # t1 leads; its compare-and-set is held
                tg.start_soon(run, "t2", {"b": 2}, cancel_t2)
                await wait_for(lambda: len(queue()) == 1)
                tg.start_soon(run, "t3", {"c": 3})
                await wait_for(lambda: len(queue()) == 2)
                gates[0].set()  # t1 done: t2 leads the batch [t2, t3]
                await arrived[1].wait()
                cancel_t2.cancel()  # a handler timeout, a client gone
                gates[1].set()
        assert "t2" not in results
        assert results["t3"] == {"a": 1, "c": 3}
        assert await store.execute(ops.GetMetadata("room", ("r",))) == [{"a": 1, "c": 3}]
        assert not store._turns.writers
    finally:
        await store.stop()


@pytest.mark.anyio
async def test_a_writer_cancelled_in_the_queue_does_not_stall_the_key(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """A writer cancelled while waiting its turn must not be handed the lead
    (nobody would take it, and every later write of that key would wait forever)."""
    import anyio

    from mesh_core.storage import _ops as ops
    from mesh_core.storage._strategies import updater

    flushall(redis_server.port)
    store = store_class(anyio_backend)(redis_server.url)
    await store.start("queue", Deliveries())
    try:
        arrived, gates = gate_commands(store, "EVALSHA", 1)

        def merge(value: dict[str, int]) -> Any:
            return ops.UpdateMetadata("room", "r", updater("merge", value), "merge", value)

        def queue() -> list[Any]:
            return list(store._turns.writers.get((keys.roommeta("r"), "data"), []))

        cancel_t2 = anyio.CancelScope()

        async def t2() -> None:
            with cancel_t2:
                await store.execute(merge({"b": 2}))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.execute, merge({"a": 1}))
                await arrived[0].wait()
                tg.start_soon(t2)
                await wait_for(lambda: len(queue()) == 1)
                cancel_t2.cancel()
                await anyio.sleep(0.05)  # t2 is gone
                gates[0].set()
            assert await store.execute(merge({"c": 3})) == {"a": 1, "c": 3}
        assert not store._turns.writers
    finally:
        await store.stop()


@pytest.mark.anyio
async def test_a_registration_restored_late_does_not_outlive_its_unregistration(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """A write restores a connection Redis lost; the connection is
    unregistered while that registration is on its way, and it reaches Redis
    after the unregistration's deletes: it is undone, not left for good."""
    import anyio
    import redis

    from mesh_core import UnknownConnection
    from mesh_core.storage import _ops as ops

    flushall(redis_server.port)
    r = redis.Redis(port=redis_server.port)
    store = store_class(anyio_backend)(redis_server.url)
    await store.start("ghost", Deliveries())
    try:
        await store.execute(ops.RegisterConnection("c1", "ghost", {"a": 1}))
        r.hdel(keys.CONNECTIONS, "c1")  # Redis lost it (a failover)
        arrived, gates = gate_commands(store, "HSET", 1)  # the re-registration
        outcome: list[BaseException] = []

        async def merge() -> None:
            try:
                await store.execute(ops.UpdateMetadata("connection", "c1", lambda v: {**v, "b": 2}))
            except UnknownConnection as exc:
                outcome.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(merge)
                await arrived[0].wait()
                await store.execute(ops.UnregisterConnection("c1", "ghost"))
                gates[0].set()
        assert outcome  # the connection is gone: the write is refused
        assert r.hget(keys.CONNECTIONS, "c1") is None
        assert not r.sismember(keys.instance_connections("ghost"), "c1")
        assert r.hget(keys.CONNECTION_META, "c1") is None
    finally:
        await store.stop()

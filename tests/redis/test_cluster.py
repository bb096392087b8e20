"""The Redis store on a real Redis Cluster (three primaries started here),
on both runtimes: the storage conformance suite, instances of both runtimes
sharing one cluster, concurrent merges, a live resharding (ASK, then MOVED),
a stale slot table, and pub/sub moving off a node that died."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any, cast

import anyio
import pytest

from mesh_core import Storage
from mesh_core.redis import open_transport
from mesh_core.redis._cluster import SlotTable, key_slot
from mesh_core.redis._layout import CAS as _CAS
from mesh_core.redis._layout import keys
from mesh_core.storage import _ops as ops
from tests.helpers.redis_cluster import RedisCluster
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_process import free_port, start_server
from tests.helpers.storage_conformance import Deliveries, StorageConformance
from tests.helpers.wsclient import WSClient

from . import test_instances as instances


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as c:
        yield c


def store_class(anyio_backend: str) -> Any:
    if anyio_backend == "trio":
        from mesh_trio import RedisStore
    else:
        from mesh_asyncio import RedisStore  # type: ignore[assignment]
    return RedisStore


class TestRedisClusterStore(StorageConformance):
    @pytest.fixture(autouse=True)
    def _bind(self, cluster: RedisCluster, anyio_backend: str) -> None:
        self.cluster = cluster
        self.store_class = store_class(anyio_backend)

    async def new_storage(self) -> Storage:
        self.cluster.flushall()
        store: Storage = self.store_class(self.cluster.url)
        return store

    async def attach_instance(
        self, storage: Storage, instance_id: str, deliver: Deliveries
    ) -> Storage:
        other: Storage = self.store_class(self.cluster.url)
        await other.start(instance_id, deliver)
        return other

    async def detach_instance(self, handle: Storage, instance_id: str) -> None:
        await handle.stop()


def as_server(cluster: RedisCluster) -> RedisServer:
    """The instance tests only use ``.url`` of the server they are given."""
    return cast(RedisServer, cluster)


def test_the_layout_spans_the_nodes(cluster: RedisCluster) -> None:
    # the point of these tests: the registry and the metadata hash live on
    # different nodes, so no script may touch both
    owners = {cluster.owner(key_slot(k)) for k in (keys.CONNECTIONS, keys.CONNECTION_META)}
    assert len(owners) == 2


def test_two_runtimes_share_rooms_metadata_and_broadcasts(cluster: RedisCluster) -> None:
    cluster.flushall()
    instances.test_two_runtimes_share_rooms_metadata_and_broadcasts(as_server(cluster))


def test_concurrent_merges_from_two_instances_lose_nothing(cluster: RedisCluster) -> None:
    cluster.flushall()
    instances.test_concurrent_merges_from_two_instances_lose_nothing(as_server(cluster), "merge")


def test_mesh_serve_accepts_a_cluster_url(cluster: RedisCluster) -> None:
    cluster.flushall()
    port = free_port()
    proc = start_server(
        "trio", port, "--redis", cluster.url, "--ping-interval", "0", "--latency-interval", "0"
    )
    try:

        async def scenario() -> None:
            c = await WSClient.connect(port)
            await c.request("mesh/join-room", {"roomName": "lobby"})
            r = cluster.client(cluster.owner(key_slot(keys.room("lobby"))))
            assert r.smembers(keys.room("lobby")) == {c.connection_id.encode()}
            await c.close()

        anyio.run(scenario)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.anyio
async def test_resharding_ask_then_moved(cluster: RedisCluster, anyio_backend: str) -> None:
    """Both hashes the metadata logic uses move to another node while a
    store runs: first half-way (the slot MIGRATING: ASK), then for good (MOVED)."""
    cluster.flushall()
    store = store_class(anyio_backend)(cluster.url)
    got = Deliveries()
    await store.start("reshard", got)
    try:
        await store.execute(ops.RegisterConnection("c1", "reshard", {"n": 0}))
        for hash_key in (keys.CONNECTION_META, keys.CONNECTIONS):
            slot = key_slot(hash_key)
            target = next(p for p in cluster.ports if p != cluster.owner(slot))
            source = await anyio.to_thread.run_sync(cluster.begin_migration, slot, target)
            await anyio.to_thread.run_sync(cluster.move_keys, slot, source, target)
            # the slot is half-way: its keys are on the target, the source answers ASK
            await store.execute(ops.RegisterConnection("c2", "reshard", {"n": 0}))
            for cid in ("c1", "c2"):
                await store.execute(
                    ops.UpdateMetadata("connection", cid, lambda v: {"n": v["n"] + 1})
                )
            await anyio.to_thread.run_sync(cluster.end_migration, slot, target)
            # now for good: the store's table is stale until the first MOVED
            for cid in ("c1", "c2"):
                await store.execute(
                    ops.UpdateMetadata("connection", cid, lambda v: {"n": v["n"] + 1})
                )
            assert store.transport.table.owner(slot)[1] == target
            assert store.transport.redirects["ASK"] > 0 and store.transport.redirects["MOVED"] > 0
            store.transport.redirects.update(ASK=0, MOVED=0)
            await store.execute(ops.UnregisterConnection("c2", "reshard"))
        meta = await store.execute(ops.GetMetadata("connection", ("c1", "c2")))
        assert meta == [{"n": 4}, None]
        ids = await store.execute(ops.GetAllConnectionIds())
        assert ids == [("c1", "reshard")]
    finally:
        await store.stop()


@pytest.mark.anyio
async def test_a_stale_slot_table_is_corrected(cluster: RedisCluster, anyio_backend: str) -> None:
    cluster.flushall()
    store = store_class(anyio_backend)(cluster.url)
    await store.start("stale", Deliveries())
    try:
        wrong = cluster.ports[0]
        store.transport.table = SlotTable([(0, 16383, ("127.0.0.1", wrong))])
        store.transport.refresh_interval = 3600  # only MOVED replies may fix it
        await store.execute(ops.RegisterConnection("c1", "stale", {"a": 1}))
        for room in ("r1", "r2", "r3", "r4"):
            await store.execute(ops.AddToRoom(room, "c1"))
        await store.execute(ops.UpdateMetadata("connection", "c1", lambda v: {**v, "b": 2}))
        assert await store.execute(ops.GetMetadata("connection", ("c1",))) == [{"a": 1, "b": 2}]
        assert sorted(await store.execute(ops.GetConnectionRooms("c1"))) == ["r1", "r2", "r3", "r4"]
        assert await store.execute(ops.GetAllRooms()) == ["r1", "r2", "r3", "r4"]
        moved = {store.transport.table.owner(key_slot(keys.room(r))) for r in ("r1", "r2")}
        assert moved == {("127.0.0.1", cluster.owner(key_slot(keys.room(r)))) for r in ("r1", "r2")}
    finally:
        await store.stop()


@pytest.mark.anyio
async def test_pubsub_moves_off_a_dead_node(anyio_backend: str) -> None:
    with RedisCluster(extra_args=["--cluster-require-full-coverage", "no"]) as own:
        store = store_class(anyio_backend)(own.url, command_timeout=0.5, connect_timeout=0.5)
        transport = store.transport
        transport.pubsub_check_interval = 0.1
        got = Deliveries()
        await store.start("listener", got)
        try:
            dead = transport.pubsub_node[1]
            victim = next(s for s in own.servers if s.port == dead)
            await anyio.to_thread.run_sync(victim.stop)
            alive = next(p for p in own.ports if p != dead)
            started = time.monotonic()
            with anyio.fail_after(10):
                while not got.calls:
                    own.client(alive).publish(
                        keys.pubsub("listener"),
                        b'{"targetConnectionIds":["x"],"command":{"command":"hi"}}',
                    )
                    await anyio.sleep(0.05)
            assert got.calls[0] == (["x"], "hi", None)
            assert transport.pubsub_node[1] != dead
            assert time.monotonic() - started < 5
        finally:
            await store.stop()


@pytest.fixture(scope="module")
def single_node() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def count_calls(transport: Any) -> list[str]:
    """Record the first word of every command the store sends (a pipeline is one entry)."""
    calls: list[str] = []
    execute, pipeline = transport.execute, transport.pipeline

    async def counted_execute(*args: Any) -> Any:
        calls.append(str(args[0]))
        return await execute(*args)

    async def counted_pipeline(commands: Any) -> Any:
        calls.append("pipeline")
        return await pipeline(commands)

    transport.execute, transport.pipeline = counted_execute, counted_pipeline
    return calls


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["single", "cluster"])
async def test_round_trips_of_a_merge(
    cluster: RedisCluster, single_node: RedisServer, anyio_backend: str, mode: str
) -> None:
    """One round trip for a merge this instance can predict the stored value
    of; a conflict costs one more, never a separate read. On a cluster the
    registry check is a second command (another slot)."""
    cluster.flushall()
    url = cluster.url if mode == "cluster" else single_node.url
    store = store_class(anyio_backend)(url)
    await store.start("rt", Deliveries())
    try:
        await store.execute(ops.RegisterConnection("c1", "rt", {"a": 0}))
        for port in cluster.ports:  # each node loads scripts on its own first use
            cluster.client(port).script_load(_CAS)
        await store.execute(ops.UpdateMetadata("room", "warm", lambda v: 1))
        calls = count_calls(store.transport)
        merge = ops.UpdateMetadata("connection", "c1", lambda v: {**v, "b": 1})
        assert await store.execute(merge) == {"a": 0, "b": 1}
        guard = ["HEXISTS"] if mode == "cluster" else []
        assert calls == ["EVALSHA", *guard]
        calls.clear()
        assert await store.execute(ops.UpdateMetadata("room", "r", lambda v: {"n": 1}))
        assert await store.execute(ops.UpdateMetadata("room", "r", lambda v: {"n": v["n"] + 1}))
        assert calls == ["HGET", "EVALSHA", "EVALSHA"]  # a value never seen is read once
        # another writer changes the value behind this instance's back
        r = cluster.client(cluster.owner(key_slot(keys.CONNECTION_META)))
        if mode == "single":
            import redis

            r = redis.Redis.from_url(single_node.url)
        r.hset(keys.CONNECTION_META, "c1", b'{"a":0,"b":1,"other":true}')
        calls.clear()
        merged = await store.execute(
            ops.UpdateMetadata("connection", "c1", lambda v: {**v, "c": 2})
        )
        assert merged == {"a": 0, "b": 1, "other": True, "c": 2}
        assert calls == ["EVALSHA", "EVALSHA", *guard]  # the conflict handed back the value
        # a no-op on a cached value is confirmed by a read, never trusted blindly
        r.hset(keys.CONNECTION_META, "c1", b'{"a":5}')
        calls.clear()
        same = await store.execute(
            ops.UpdateMetadata("connection", "c1", lambda v: v if v.get("a") == 5 else {"a": 5})
        )
        assert same == {"a": 5} and calls[0] == "EVALSHA"
    finally:
        await store.stop()


def freeze(cluster: RedisCluster, frozen: bool) -> None:
    """Every node unreachable (SIGSTOP of our own redis-server processes), or back."""
    for server in cluster.servers:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)


def count_moves(transport: Any) -> list[bool]:
    """Record the outcome of every pub/sub move the transport makes."""
    outcomes: list[bool] = []
    move = transport._move_pubsub

    async def counted() -> bool:
        moved: bool = await move()
        outcomes.append(moved)
        return moved

    transport._move_pubsub = counted
    return outcomes


@pytest.mark.anyio
async def test_pubsub_survives_a_move_that_found_no_node(anyio_backend: str) -> None:
    """The whole cluster unreachable for a while: the pub/sub node stops
    answering and no other node takes the subscriptions. Once the cluster is
    back, cross-instance messages arrive again."""
    with RedisCluster() as own:
        store = store_class(anyio_backend)(own.url, command_timeout=0.2, connect_timeout=0.2)
        transport = store.transport
        transport.pubsub_check_interval = 0.1
        got = Deliveries()
        await store.start("listener", got)
        message = b'{"targetConnectionIds":["x"],"command":{"command":"hi"}}'
        try:
            moves = count_moves(transport)
            freeze(own, True)
            try:
                with anyio.fail_after(20):
                    while False not in moves:  # a move that found no node
                        await anyio.sleep(0.05)
            finally:
                freeze(own, False)
            await anyio.to_thread.run_sync(own.wait_ok)
            with anyio.fail_after(10):
                while not got.calls:
                    own.client(own.ports[1]).publish(keys.pubsub("listener"), message)
                    await anyio.sleep(0.05)
            assert transport.pubsub_node is not None
        finally:
            await store.stop()


@pytest.mark.anyio
async def test_closing_during_a_pubsub_move_leaks_no_node_transport(anyio_backend: str) -> None:
    """aclose() while the watchdog is subscribing on another node: the node
    transport that move opened is closed too."""
    with RedisCluster() as own:
        store = store_class(anyio_backend)(own.url, command_timeout=1.0, connect_timeout=1.0)
        transport = store.transport
        transport.pubsub_check_interval = 0.05
        made: list[Any] = []
        make_node = transport._make_node

        def recorded(url: str) -> Any:
            made.append(make_node(url))
            return made[-1]

        transport._make_node = recorded
        await store.start("closing", Deliveries())
        before = len(made)
        freeze(own, True)
        try:

            def subscribing() -> bool:  # a transport of the move's own, not a routing one
                routing = list(transport._nodes.values())
                return any(all(n is not r for r in routing) for n in made[before:])

            with anyio.fail_after(20):
                while not subscribing():
                    await anyio.sleep(0.01)
            await transport.aclose()
        finally:
            freeze(own, False)
            await store.stop()
        assert made and all(node._closed for node in made)
        assert transport.pubsub_node is None


@pytest.mark.anyio
async def test_a_seed_that_answers_with_an_error_is_skipped(
    cluster: RedisCluster, single_node: RedisServer, anyio_backend: str
) -> None:
    """The first seed answers CLUSTER SLOTS with an error (here: a Redis not in
    cluster mode; LOADING is the same): the next seeds are asked."""
    if anyio_backend == "trio":
        from mesh_trio._redis_transport import TrioRedisTransport as client
        from mesh_trio._runtime import RUNTIME as runtime
    else:
        from mesh_asyncio._redis_transport import (  # type: ignore[assignment]
            AsyncioRedisTransport as client,
        )
        from mesh_asyncio._runtime import RUNTIME as runtime  # type: ignore[assignment]

    def Transport(url: str) -> Any:  # the router over one client per node
        return open_transport(url, client, runtime)

    cluster.flushall()
    seeds = [f"127.0.0.1:{single_node.port}", *(f"127.0.0.1:{p}" for p in cluster.ports)]
    transport = Transport("redis+cluster://" + ",".join(seeds))
    try:
        await transport.connect()
        assert await transport.execute("SET", "k", "v") in (b"OK", "OK", True)
        assert set(transport.table.primaries) == {("127.0.0.1", p) for p in cluster.ports}
    finally:
        await transport.aclose()


@pytest.mark.anyio
async def test_a_write_for_a_connection_redis_lost_keeps_its_metadata(
    cluster: RedisCluster, anyio_backend: str
) -> None:
    """The registry entry of a live connection is lost (a failover of its
    node) while its metadata is intact. Another instance's merge is refused
    as on a single node, and the metadata stays; the owner's merge restores
    the registration and is kept."""
    cluster.flushall()
    owner_store = store_class(anyio_backend)(cluster.url)
    other_store = store_class(anyio_backend)(cluster.url)
    await owner_store.start("A", Deliveries())
    await other_store.start("B", Deliveries())
    registry = cluster.client(cluster.owner(key_slot(keys.CONNECTIONS)))
    meta = cluster.client(cluster.owner(key_slot(keys.CONNECTION_META)))
    try:
        await owner_store.execute(ops.RegisterConnection("c1", "A", {"name": "alice"}))
        registry.hdel(keys.CONNECTIONS, "c1")
        with pytest.raises(ops.UnknownConnection):
            await other_store.execute(
                ops.UpdateMetadata("connection", "c1", lambda v: {**v, "x": 1})
            )
        assert meta.hget(keys.CONNECTION_META, "c1") == b'{"name":"alice"}'
        merged = await owner_store.execute(
            ops.UpdateMetadata("connection", "c1", lambda v: {**v, "y": 2})
        )
        assert merged == {"name": "alice", "y": 2}
        assert registry.hget(keys.CONNECTIONS, "c1") == b"A"
        assert meta.hget(keys.CONNECTION_META, "c1") == b'{"name":"alice","y":2}'
    finally:
        await other_store.stop()
        await owner_store.stop()


@pytest.mark.anyio
async def test_an_undone_write_leaves_another_writers_value(
    cluster: RedisCluster, anyio_backend: str
) -> None:
    """A merge finds, after writing, that the connection is gone: it takes
    back its own write only, not a value another writer stored since."""
    cluster.flushall()
    store = store_class(anyio_backend)(cluster.url)
    await store.start("undo", Deliveries())
    registry = cluster.client(cluster.owner(key_slot(keys.CONNECTIONS)))
    meta = cluster.client(cluster.owner(key_slot(keys.CONNECTION_META)))
    try:
        await store.execute(ops.RegisterConnection("c1", "elsewhere", {"n": 0}))
        execute = store.transport.execute

        async def meanwhile(*args: Any) -> Any:
            reply = await execute(*args)
            if args[0] == "EVALSHA":  # between the write and the registry check
                registry.hdel(keys.CONNECTIONS, "c1")
                meta.hset(keys.CONNECTION_META, "c1", b'{"n":"theirs"}')
            return reply

        store.transport.execute = meanwhile
        with pytest.raises(ops.UnknownConnection):
            await store.execute(ops.UpdateMetadata("connection", "c1", lambda v: {"n": 1}))
        assert meta.hget(keys.CONNECTION_META, "c1") == b'{"n":"theirs"}'
    finally:
        await store.stop()

"""Records on a real Redis (a private redis-server per test): one atomic step
per write, exact versions under concurrency from an asyncio and a trio
instance, cross-instance delivery in version order, the layout shared with
reference instances, and a Redis outage."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import anyio
import jsonpatch
import pytest

from examples.demo import app as demo_app
from mesh_core import Storage
from mesh_core.storage import _ops as ops
from tests.helpers.record_conformance import RecordConformance
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_thread import ServerThread
from tests.helpers.wsclient import WSClient
from tests.redis.test_instances import QUIET, raw, redis_store, two_instances, wait_until
from tests.redis.test_store import flushall, store_class


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


class TestRedisRecords(RecordConformance):
    @pytest.fixture(autouse=True)
    def _bind(self, shared_redis: RedisServer, anyio_backend: str) -> None:
        self.redis = shared_redis
        self.store_class = store_class(anyio_backend)

    async def new_storage(self) -> Storage:
        flushall(self.redis.port)
        store: Storage = self.store_class(self.redis.url)
        return store

    async def test_collection_ids(self, storage: Storage) -> None:
        await super().test_collection_ids(storage)
        r = raw(self.redis.url)
        await storage.execute(ops.SetCollectionIds("c", "conn", ("a", "b")))
        assert json.loads(r.get("mesh:collection:c:conn")) == ["a", "b"]
        await storage.execute(ops.SetCollectionIds("c", "conn", None))
        assert r.get("mesh:collection:c:conn") is None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    # kept on disk, so that a restart (the outage test) keeps the records
    with RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


class Copy:
    """A patch-mode subscriber's copy of one record, kept the way the
    reference client's rule says: a patch only onto version - 1."""

    def __init__(self, ws: WSClient, record_id: str, answer: dict[str, Any]) -> None:
        assert answer["success"] is True
        self.ws = ws
        self.record_id = record_id
        self.value = answer["record"]
        self.version: int = answer["version"]
        self.versions: list[int] = []
        self.fulls = 0

    def take(self) -> None:
        for push in [p for p in self.ws.pushes if p["command"] == "mesh/record-update"]:
            self.ws.pushes.remove(push)
            payload = push["payload"]
            if payload["recordId"] != self.record_id:
                continue
            if "patch" in payload:
                assert payload["version"] == self.version + 1, (payload, self.version)
                self.value = jsonpatch.apply_patch(self.value, payload["patch"])
            else:
                self.fulls += 1
                self.value = payload["full"]
            self.version = payload["version"]
            self.versions.append(self.version)

    async def until(self, version: int, timeout: float = 10.0) -> None:
        def reached() -> bool:
            self.take()
            return self.version >= version

        await self.ws.wait_for(reached, timeout)


async def subscribe(port: int, record_id: str, mode: str = "patch") -> Copy:
    ws = await WSClient.connect(port)
    answer = await ws.request("mesh/subscribe-record", {"recordId": record_id, "mode": mode})
    return Copy(ws, record_id, answer)


def listen(url: str, channel: str) -> tuple[list[bytes], Any]:
    """Collect every message on a Redis channel with an independent client."""
    pubsub = raw(url).pubsub()
    pubsub.subscribe(channel)
    messages: list[bytes] = []
    ready = threading.Event()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.05)
            if message is None:
                continue
            if message["type"] == "subscribe":
                ready.set()
            elif message["type"] == "message":
                messages.append(message["data"])
        pubsub.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)

    def done() -> None:
        stop.set()
        thread.join(5)

    return messages, done


def test_concurrent_merges_from_two_runtimes_keep_every_key_and_version(
    redis_server: RedisServer,
) -> None:
    a, b = two_instances(redis_server)
    heard, done = listen(redis_server.url, "mesh:record-updates")
    with a, b:

        async def scenario() -> None:
            copies = [await subscribe(a.port, "note:c"), await subscribe(b.port, "note:c")]

            def burst(server: ServerThread, prefix: str) -> None:
                async def many() -> None:
                    async with anyio.create_task_group() as tg:
                        for i in range(25):
                            tg.start_soon(
                                partial(
                                    server.server.records.write,
                                    "note:c",
                                    {f"{prefix}{i}": i},
                                    strategy="merge",
                                )
                            )

                server.call(many)

            def both() -> None:
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda args: burst(*args), [(a, "a"), (b, "b")]))

            await anyio.to_thread.run_sync(both)
            expected = {f"{p}{i}": i for p in "ab" for i in range(25)}
            r = raw(redis_server.url)
            assert json.loads(r.get("mesh:record:note:c")) == expected
            assert r.get("mesh:record-version:note:c") == b"50"
            assert a.call(lambda: a.server.records.get_with_version("note:c")) == (expected, 50)
            for copy in copies:
                await copy.until(50)
                assert copy.value == expected and copy.version == 50
                assert copy.fulls == 0  # every update arrived as an applicable patch
                assert copy.versions == list(range(1, 51))
                await copy.ws.close()

        anyio.run(scenario)
    wait_until(lambda: len(heard) >= 50)
    done()
    versions = [json.loads(m)["version"] for m in heard]
    assert versions == list(range(1, 51))  # no version handed out twice, in order


def test_cross_instance_delivery_in_order_and_the_reference_layout(
    redis_server: RedisServer,
) -> None:
    a, b = two_instances(redis_server)
    with a, b:

        async def scenario() -> None:
            on_b = await subscribe(b.port, "doc:x")
            full_on_b = await subscribe(b.port, "doc:x", mode="full")
            writer = await WSClient.connect(a.port)
            for i in range(20):
                await writer.request(
                    "write-record", {"recordId": "doc:x", "value": {"i": i}, "strategy": "merge"}
                )
            await on_b.until(20)
            await full_on_b.until(20)
            assert on_b.versions == list(range(1, 21)) and on_b.fulls == 0
            assert full_on_b.versions == list(range(1, 21))
            assert on_b.value == {"i": 19}
            r = raw(redis_server.url)
            assert json.loads(r.get("mesh:record:doc:x")) == {"i": 19}
            assert r.get("mesh:record-version:doc:x") == b"20"
            # a reference-layout writer on the same Redis (two SETs and a
            # PUBLISH, as the reference's writeRecord does) is seen by ours
            r.set("mesh:record:doc:x", json.dumps({"i": 20, "by": "ref"}))
            r.set("mesh:record-version:doc:x", "21")
            r.publish(
                "mesh:record-updates",
                json.dumps(
                    {
                        "recordId": "doc:x",
                        "newValue": {"i": 20, "by": "ref"},
                        "patch": [
                            {"op": "replace", "path": "/i", "value": 20},
                            {"op": "add", "path": "/by", "value": "ref"},
                        ],
                        "version": 21,
                    }
                ),
            )
            await on_b.until(21)
            assert on_b.value == {"i": 20, "by": "ref"} and on_b.fulls == 0
            # and ours continue from its version, from its text
            await writer.request(
                "write-record", {"recordId": "doc:x", "value": {"ours": 1}, "strategy": "merge"}
            )
            await on_b.until(22)
            assert on_b.value == {"i": 20, "by": "ref", "ours": 1}
            assert r.get("mesh:record-version:doc:x") == b"22"
            # a deletion by a reference instance
            r.delete("mesh:record:doc:x", "mesh:record-version:doc:x")
            r.publish(
                "mesh:record-updates",
                json.dumps({"recordId": "doc:x", "deleted": True, "version": 22}),
            )
            deleted = await on_b.ws.wait_push("mesh/record-deleted")
            assert deleted["payload"] == {"recordId": "doc:x", "version": 22}
            for ws in (on_b.ws, full_on_b.ws, writer):
                await ws.close()

        anyio.run(scenario)


def test_collection_keys_follow_their_subscribers(redis_server: RedisServer) -> None:
    a, b = two_instances(redis_server)
    with a, b:

        async def scenario() -> None:
            r = raw(redis_server.url)
            writer = await WSClient.connect(b.port)
            await writer.request("write-record", {"recordId": "doc:1", "value": {"t": 1}})
            ws = await WSClient.connect(a.port)
            answer = await ws.request("mesh/subscribe-collection", {"collectionId": "docs"})
            assert answer["ids"] == ["doc:1"]
            key = f"mesh:collection:docs:{ws.connection_id}"
            assert json.loads(r.get(key)) == ["doc:1"]
            # a change written on the other instance reaches the diff
            await writer.request("write-record", {"recordId": "doc:2", "value": {"t": 2}})
            diff = await ws.wait_push("mesh/collection-diff")
            assert diff["payload"]["added"] == [{"t": 2, "id": "doc:2"}]
            assert json.loads(r.get(key)) == ["doc:1", "doc:2"]
            assert await ws.request("mesh/unsubscribe-collection", {"collectionId": "docs"}) is True
            assert r.get(key) is None
            await ws.request("mesh/subscribe-collection", {"collectionId": "docs"})
            assert r.exists(key)
            await ws.close()
            wait_until(lambda: not r.exists(key))
            assert r.keys("mesh:collection:docs:*") == []
            await writer.close()

        anyio.run(scenario)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_redis_outage_then_recovery(redis_server: RedisServer, runtime: str) -> None:
    store = redis_store(
        runtime, redis_server.url, command_timeout=0.5, connect_timeout=0.5, heartbeat_interval=0.2
    )
    server = ServerThread(runtime, demo_app, storage=store, **QUIET)
    with server:

        async def scenario() -> None:
            copy = await subscribe(server.port, "doc:o")
            writer = await WSClient.connect(server.port)
            await writer.request("write-record", {"recordId": "doc:o", "value": {"n": 1}})
            await copy.until(1)
            await anyio.to_thread.run_sync(redis_server.stop)
            failed = await writer.request(
                "write-record", {"recordId": "doc:o", "value": {"n": 2}}, timeout=10
            )
            assert failed["code"] == "EUNAVAILABLE", failed
            refused = await copy.ws.request(
                "mesh/subscribe-record", {"recordId": "doc:p"}, timeout=10
            )
            assert refused["code"] == "EUNAVAILABLE", refused
            await anyio.to_thread.run_sync(redis_server.start)
            r = raw(redis_server.url)
            assert r.get("mesh:record-version:doc:o") == b"1"  # the failed write left nothing

            # the instance's subscription to mesh:record-updates comes back
            def resubscribed() -> bool:
                reply: list[Any] = r.execute_command("PUBSUB", "NUMSUB", "mesh:record-updates")
                return int(reply[1]) >= 1

            await anyio.to_thread.run_sync(partial(wait_until, resubscribed, 15))
            # versions this subscriber missed (written elsewhere meanwhile):
            # the next update reaches it as a full value, not a patch
            r.set("mesh:record:doc:o", json.dumps({"n": 3}))
            r.set("mesh:record-version:doc:o", "3")
            with anyio.fail_after(15):
                while True:
                    answer = await writer.request(
                        "write-record",
                        {"recordId": "doc:o", "value": {"m": 4}, "strategy": "merge"},
                        timeout=10,
                    )
                    if answer == {"success": True}:
                        break
                    await anyio.sleep(0.1)
            await copy.until(4)
            assert copy.value == {"n": 3, "m": 4} and copy.fulls == 1
            await writer.request(
                "write-record", {"recordId": "doc:o", "value": {"k": 5}, "strategy": "merge"}
            )
            await copy.until(5)
            assert copy.value == {"n": 3, "m": 4, "k": 5} and copy.fulls == 1
            for ws in (copy.ws, writer):
                await ws.close()

        anyio.run(scenario)


def test_writes_are_one_script_each(redis_server: RedisServer) -> None:
    """The atomic step, seen from Redis: a write is one EVALSHA (after the
    first read) touching value and version together."""
    server = ServerThread("trio", demo_app, storage=redis_store("trio", redis_server.url), **QUIET)
    with server:
        r = raw(redis_server.url)
        server.call(lambda: server.server.records.write("doc:s", {"a": 1}))
        r.config_resetstat()
        for i in range(5):
            server.call(partial(server.server.records.write, "doc:s", {"a": i + 2}))
        stats = r.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 5
        assert "cmdstat_multi" not in stats and "cmdstat_mget" not in stats
        assert r.get("mesh:record-version:doc:s") == b"6"


def test_a_batch_of_writes_keeps_each_outcome(redis_server: RedisServer) -> None:
    """Writes queued on one instance go out in batches, yet each keeps its
    own version and outcome: a refused one (too large) stores nothing and
    the others are not held back."""
    server = ServerThread(
        "asyncio",
        demo_app,
        storage=redis_store("asyncio", redis_server.url),
        max_metadata_size=2048,
        **QUIET,
    )
    with server:
        records = server.server.records

        async def many() -> list[Any]:
            results: list[Any] = [None] * 30

            async def one(i: int) -> None:
                value = {f"k{i}": "x" * 5000} if i == 7 else {f"k{i}": i}
                try:
                    results[i] = await records.write("doc:b", value, "merge")
                except Exception as exc:
                    results[i] = exc

            async with anyio.create_task_group() as tg:
                for i in range(30):
                    tg.start_soon(one, i)
            return results

        results = server.call(many)
        assert getattr(results[7], "code", None) == "ETOOLARGE"
        versions = sorted(r[1] for i, r in enumerate(results) if i != 7)
        assert versions == list(range(1, 30))
        value, version = server.call(lambda: records.get_with_version("doc:b"))
        assert version == 29 and value == {f"k{i}": i for i in range(30) if i != 7}

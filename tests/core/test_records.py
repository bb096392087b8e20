"""Records and collections in the core, with no sockets: the in-memory
driver's operations, the patches, the built-ins through ``ServerCore``."""

from __future__ import annotations

import re
from typing import Any, cast

import anyio
import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_core import MemoryStore, MeshApp, Storage
from mesh_core.runtime import Runtime
from mesh_core.storage import _ops as ops
from mesh_core.storage._patch import record_patch, same_json
from tests.core.test_dispatch import Client, FakeServer, connect
from tests.helpers.record_conformance import RecordConformance


class TestMemoryRecords(RecordConformance):
    async def new_storage(self) -> Storage:
        return MemoryStore()


class RecordsServer(FakeServer):
    """The dispatch tests' server, with the one more runtime service the
    store's channels ask for (an event, when two subscribes overlap)."""

    def __init__(self, app: MeshApp, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.fake_runtime.event = anyio.Event  # type: ignore[attr-defined]


def make(app: MeshApp) -> RecordsServer:
    return RecordsServer(app, storage=MemoryStore(), instance_id="inst-test")


pytestmark = pytest.mark.anyio

#: every kind of JSON value, and changes between them
VALUES: list[Any] = [
    {"a": 1},
    {"a": True},
    {"a": 1.0},
    {"a": [1, 2, {"b": None}]},
    [1, 2, 3],
    [3, 2],
    [],
    {},
    0,
    1,
    True,
    False,
    1.5,
    "text",
    "",
    None,
    {"nested": {"deep": {"x": [True, 1, 1.0, "1"]}}},
    {"nested": {"deep": {"x": [1, True, "1", 1.0]}}},
]


def test_same_json_is_strict() -> None:
    assert same_json({"a": [1, {"b": "c"}]}, {"a": [1, {"b": "c"}]})
    assert not same_json(1, True)
    assert not same_json(1, 1.0)
    assert not same_json(0, False)
    assert not same_json([], {})
    assert not same_json(None, {})
    assert same_json({"a": 1, "b": 2}, {"b": 2, "a": 1})


@pytest.mark.parametrize("old", VALUES)
def test_patches_turn_every_value_into_every_other(old: Any) -> None:
    for new in VALUES:
        patch = record_patch(old, new)
        if same_json(old, new):
            assert patch is None
            continue
        assert patch
        assert same_json(jsonpatch.apply_patch(old, patch), new), (old, new, patch)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from([0.0, 1.0, 2.5])
    | st.text("ab", max_size=2),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text("abc", max_size=2), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_json, _json)
def test_patches_between_random_values(old: Any, new: Any) -> None:
    patch = record_patch(old, new)
    if same_json(old, new):
        assert patch is None
    else:
        assert patch and same_json(jsonpatch.apply_patch(old, patch), new), (old, new, patch)


def written(store: MemoryStore, record_id: str, value: Any, strategy: str = "replace") -> Any:
    from mesh_core.storage import updater

    return store.apply(ops.WriteRecord(record_id, updater(strategy, value)))


def test_memory_versions_and_announcements() -> None:
    store = MemoryStore()
    heard: list[tuple[str, bytes]] = []
    store.apply(ops.Subscribe(ops.RECORD_UPDATES, "i", lambda c, d: heard.append((c, d))))
    store.apply(ops.Subscribe(ops.COLLECTION_RECORD_CHANGE, "i", lambda c, d: heard.append((c, d))))
    assert store.apply(ops.GetRecords(("r",))) == [(None, 0)]
    first = written(store, "r", {"a": 1})
    assert first == ops.RecordWritten({"a": 1}, 1, True)
    assert written(store, "r", {"b": 2}, "merge") == ops.RecordWritten({"a": 1, "b": 2}, 2, True)
    # the same value again: nothing stored, nothing announced, same version
    assert written(store, "r", {"a": 1, "b": 2}) == ops.RecordWritten({"a": 1, "b": 2}, 2, False)
    assert store.apply(ops.GetRecords(("r", "x"))) == [({"a": 1, "b": 2}, 2), (None, 0)]
    assert heard == [
        (
            ops.RECORD_UPDATES,
            b'{"recordId":"r","newValue":{"a":1},"patch":[{"op":"replace","path":"",'
            b'"value":{"a":1}}],"version":1}',
        ),
        (ops.COLLECTION_RECORD_CHANGE, b"r"),
        (
            ops.RECORD_UPDATES,
            b'{"recordId":"r","newValue":{"a":1,"b":2},"patch":[{"op":"add","path":"/b",'
            b'"value":2}],"version":2}',
        ),
        (ops.COLLECTION_RECORD_CHANGE, b"r"),
    ]
    heard.clear()
    assert store.apply(ops.DeleteRecord("r")) == ({"a": 1, "b": 2}, 2)
    assert store.apply(ops.DeleteRecord("r")) is None
    assert heard == [
        (ops.RECORD_UPDATES, b'{"recordId":"r","deleted":true,"version":2}'),
        (ops.COLLECTION_RECORD_CHANGE, b"r"),
    ]


def test_memory_list_and_collection_ids() -> None:
    store = MemoryStore()
    for rid in ("doc:b", "doc:a", "note:a", "doc:c"):
        written(store, rid, {"id": rid})
    assert [rid for rid, _ in store.apply(ops.ListRecords("doc:*"))] == ["doc:a", "doc:b", "doc:c"]
    assert store.apply(ops.ListRecords("doc:[ab]"))[1] == ("doc:b", {"id": "doc:b"})
    store.apply(ops.SetCollectionIds("c", "conn", ("a", "b")))
    assert store._collection_ids == {("c", "conn"): ("a", "b")}
    store.apply(ops.SetCollectionIds("c", "conn", None))
    assert store._collection_ids == {}


def test_a_refused_update_stores_nothing() -> None:
    store = MemoryStore()

    def refuse(old: Any) -> Any:
        raise ValueError("no")

    with pytest.raises(ValueError):
        store.apply(ops.WriteRecord("r", refuse))
    assert store.apply(ops.GetRecords(("r",))) == [(None, 0)]


# -- through ServerCore ---------------------------------------------------------


def records_app() -> MeshApp:
    app = MeshApp()
    app.expose_record(re.compile(r"^open:"))
    app.expose_record(re.compile(r"^guarded:"), lambda conn, rid: conn.id == "conn-admin")
    app.expose_writable_record(re.compile(r"^guarded:"))  # must not open reading
    app.expose_writable_record(re.compile(r"^w:"), lambda conn, rid: conn.id != "conn-ro")
    return app


def pushes(client: Client) -> list[Any]:
    return client.frames()


async def test_subscribe_write_and_delivery_by_mode() -> None:
    server = make(records_app())
    full = await connect(server, "conn-full")
    patch = await connect(server, "conn-patch")
    await server.records.write("open:1", {"n": 0})
    assert await full.request("mesh/subscribe-record", {"recordId": "open:1"}) == {
        "success": True,
        "record": {"n": 0},
        "version": 1,
    }
    answer = await patch.request("mesh/subscribe-record", {"recordId": "open:1", "mode": "patch"})
    assert answer == {"success": True, "record": {"n": 0}, "version": 1}
    assert await server.records.write("open:1", {"m": 1}, "merge") == ({"n": 0, "m": 1}, 2)
    assert pushes(full) == [
        {
            "command": "mesh/record-update",
            "payload": {"recordId": "open:1", "full": {"n": 0, "m": 1}, "version": 2},
        }
    ]
    assert pushes(patch) == [
        {
            "command": "mesh/record-update",
            "payload": {
                "recordId": "open:1",
                "patch": [{"op": "add", "path": "/m", "value": 1}],
                "version": 2,
            },
        }
    ]
    # deletion reaches both and ends their subscriptions
    assert await server.records.delete("open:1") is True
    deleted = {"command": "mesh/record-deleted", "payload": {"recordId": "open:1", "version": 2}}
    assert pushes(full) == [deleted] and pushes(patch) == [deleted]
    assert server.records.subscriptions("conn-full") == frozenset()
    assert await full.request("mesh/unsubscribe-record", {"recordId": "open:1"}) is False


async def test_a_patch_subscriber_that_would_miss_a_version_gets_the_full_value() -> None:
    server = make(records_app())
    client = await connect(server)
    await client.request("mesh/subscribe-record", {"recordId": "open:g", "mode": "patch"})
    await server.records.write("open:g", [1])
    assert pushes(client)[0]["payload"]["patch"] == [{"op": "replace", "path": "", "value": [1]}]
    # a message lost (as while Redis was away): the next one is a full value
    await server.records.write("open:g", [1, 2])
    [sub] = server.records._subscribers["open:g"].values()
    sub.version -= 1
    pushes(client)
    await server.records.write("open:g", [1, 2, 3])
    assert pushes(client) == [
        {
            "command": "mesh/record-update",
            "payload": {"recordId": "open:g", "full": [1, 2, 3], "version": 3},
        }
    ]


async def test_guards_and_write_errors() -> None:
    server = make(records_app())
    admin = await connect(server, "conn-admin")
    other = await connect(server, "conn-other")
    readonly = await connect(server, "conn-ro")
    assert (await admin.request("mesh/subscribe-record", {"recordId": "guarded:1"}))["success"]
    # the writable pattern does not bypass the read guard
    assert await other.request("mesh/subscribe-record", {"recordId": "guarded:1"}) == {
        "success": False
    }
    assert await other.request("mesh/subscribe-record", {"recordId": "nope"}) == {"success": False}
    # only a writable pattern matches w:*, so its write guard decides reading
    assert (await other.request("mesh/subscribe-record", {"recordId": "w:2"}))["success"]
    assert not (await readonly.request("mesh/subscribe-record", {"recordId": "w:2"}))["success"]
    ok = await other.request("mesh/publish-record-update", {"recordId": "w:1", "newValue": 5})
    assert ok == {"success": True}
    assert await server.records.get_with_version("w:1") == (5, 1)
    refused = await readonly.request(
        "mesh/publish-record-update", {"recordId": "w:1", "newValue": 6}
    )
    assert refused == {
        "error": 'Record "w:1" is not writable by this connection.',
        "code": "ESERVER",
        "name": "Error",
    }
    refused = await other.request(
        "mesh/publish-record-update", {"recordId": "open:1", "newValue": 6}
    )
    assert refused["error"] == 'Record "open:1" is not writable by this connection.'
    assert await server.records.get("open:1") is None


@pytest.mark.parametrize(
    "payload, code",
    [
        ({"recordId": "w:1", "newValue": 1, "options": "merge"}, "EINVAL"),
        ({"recordId": "w:1", "newValue": 1, "options": {"strategy": "upsert"}}, "EINVAL"),
        ({"newValue": 1}, "EINVAL"),
        ({"recordId": "", "newValue": 1}, "EINVAL"),
        ({"recordId": "w:1"}, "EINVAL"),
        ({"recordId": "w:1", "newValue": "x" * 2000}, "ETOOLARGE"),
        ([1], "EINVAL"),
    ],
)
async def test_bad_writes_are_clear_errors_and_store_nothing(payload: Any, code: str) -> None:
    server = make(records_app())
    server.options = type(server.options)(
        ping_interval=0, latency_interval=0, max_metadata_size=1024
    )
    client = await connect(server)
    answer = await client.request("mesh/publish-record-update", payload)
    assert answer["code"] == code, answer
    assert await server.records.get_with_version("w:1") == (None, 0)


async def test_bad_subscribes() -> None:
    client = await connect(make(records_app()))
    for payload in ({}, {"recordId": 3}, {"recordId": "open:1", "mode": "diff"}, None):
        assert (await client.request("mesh/subscribe-record", payload))["code"] == "EINVAL"


async def test_server_api_limits_and_hooks() -> None:
    server = make(records_app())
    seen: list[tuple[str, str, Any]] = []
    remove = server.records.on_update(lambda rid, value: seen.append(("update", rid, value)))

    async def on_removed(rid: str, value: Any) -> None:
        seen.append(("removed", rid, value))

    server.records.on_removed(on_removed)
    await server.records.write("a", 1)
    await server.records.write("a", 1)  # unchanged: no hook
    await server.records.write("b", {"x": {"y": 1}})
    assert await server.records.write("b", {"x": {"z": 2}}, "deepMerge") == (
        {"x": {"y": 1, "z": 2}},
        2,
    )
    assert await server.records.delete("a") is True
    assert await server.records.delete("a") is False
    remove()
    await server.records.write("c", 1)
    assert seen == [
        ("update", "a", 1),
        ("update", "b", {"x": {"y": 1}}),
        ("update", "b", {"x": {"y": 1, "z": 2}}),
        ("removed", "a", 1),
    ]
    assert await server.records.list_matching("*") == [("b", {"x": {"y": 1, "z": 2}}), ("c", 1)]
    with pytest.raises(Exception, match="Unknown metadata strategy"):
        await server.records.write("b", 1, "upsert")
    big = "x" * (server.options.max_metadata_size + 1)
    with pytest.raises(Exception, match="over the limit"):
        await server.records.write("b", big)
    assert await server.records.get("b") == {"x": {"y": 1, "z": 2}}


async def test_disconnect_ends_record_and_collection_subscriptions() -> None:
    app = records_app()
    app.expose_collection("all-open", lambda conn, cid: ["open:1", "guarded:1"])
    server = make(app)
    client = await connect(server, "conn-x")
    await client.request("mesh/subscribe-record", {"recordId": "open:1"})
    answer = await client.request("mesh/subscribe-collection", {"collectionId": "all-open"})
    # guarded:1 is not readable by conn-x: not delivered
    assert answer == {
        "success": True,
        "ids": ["open:1"],
        "records": [{"id": "open:1", "record": {"id": "open:1", "value": None}}],
        "version": 1,
    }
    store = server.storage
    assert isinstance(store, MemoryStore)
    assert store._collection_ids == {("all-open", "conn-x"): ("open:1",)}
    await server._cleanup(client.conn)
    assert store._collection_ids == {}
    assert server.records._subscribers == {}
    assert server.collections._collections == {}
    assert server.pubsub.channels() == []


@pytest.mark.parametrize(
    "op",
    [
        ops.GetRecords(("r",)),
        ops.WriteRecord("r", lambda old: 1),
        ops.DeleteRecord("r"),
        ops.ListRecords("*"),
    ],
)
async def test_records_on_a_redis_cluster_are_a_clear_error(op: ops.Op) -> None:
    """The shared layout's two keys hash to two slots: no script can hold
    both, so a cluster store refuses records plainly (nothing is sent)."""
    from mesh_core import MeshError
    from mesh_core.redis import RedisStoreCore

    class ClusterTransport:
        cluster = True

        def __init__(self) -> None:
            self.sent: list[Any] = []

        async def execute(self, *args: Any) -> Any:
            self.sent.append(args)

    transport = ClusterTransport()
    store = RedisStoreCore(
        transport,  # type: ignore[arg-type]
        runtime=cast(Runtime, None),  # records on a cluster never get as far as time
    )
    with pytest.raises(MeshError) as caught:
        await store.execute(op)
    assert caught.value.code == "EUNSUPPORTED"
    assert transport.sent == []

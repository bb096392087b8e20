"""Records and collections end to end: real sockets, the demo app, the
Python client of each runtime, and the JavaScript stand-in of the reference
client (tests/node, ``records`` mode). Every body runs on asyncio and trio."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import jsonpatch
import pytest

import mesh_asyncio
import mesh_trio
from examples.demo import app as demo_app
from mesh_core import MeshApp
from mesh_core.client import CollectionDiff, RecordUpdate
from tests.e2e.test_node_client import NODE, NODE_DIR, run_harness
from tests.helpers.server_thread import ServerThread
from tests.helpers.wsclient import WSClient

QUIET: dict[str, Any] = {"ping_interval": 0, "latency_interval": 0}


@asynccontextmanager
async def serve(server_cls: Any, app: MeshApp = demo_app, **options: Any) -> AsyncIterator[Any]:
    server = server_cls(app, **{**QUIET, **options})
    async with server.listen("127.0.0.1", 0):
        yield server


def client_cls(backend: str) -> Any:
    return mesh_trio.MeshClient if backend == "trio" else mesh_asyncio.MeshClient


async def until(condition: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


VALUES: list[Any] = [
    {"a": 1},
    {"a": True},
    {"a": 1.0, "b": [1, {"c": None}]},
    [1, 2, 3],
    [],
    {},
    0,
    1,
    True,
    False,
    2.5,
    "text",
    "",
    None,
    {"back": ["to", "an", "object"]},
]


@pytest.mark.anyio
async def test_wire_shapes(server_cls: Any) -> None:
    async with serve(server_cls) as server:
        ws = await WSClient.connect(server.port)
        await ws.request("write-record", {"recordId": "doc:1", "value": {"a": 1}})
        assert await ws.request("mesh/subscribe-record", {"recordId": "doc:1"}) == {
            "success": True,
            "record": {"a": 1},
            "version": 1,
        }
        assert await ws.request(
            "mesh/subscribe-record", {"recordId": "doc:2", "mode": "patch"}
        ) == {"success": True, "record": None, "version": 0}
        assert await ws.request("mesh/subscribe-record", {"recordId": "secret:1"}) == {
            "success": False
        }
        await ws.request(
            "write-record", {"recordId": "doc:1", "value": {"b": 2}, "strategy": "merge"}
        )
        assert (await ws.wait_push("mesh/record-update"))["payload"] == {
            "recordId": "doc:1",
            "full": {"a": 1, "b": 2},
            "version": 2,
        }
        await ws.request("write-record", {"recordId": "doc:2", "value": 7})
        assert (await ws.wait_push("mesh/record-update"))["payload"] == {
            "recordId": "doc:2",
            "patch": [{"op": "replace", "path": "", "value": 7}],
            "version": 1,
        }
        assert await ws.request(
            "mesh/publish-record-update", {"recordId": "doc:1", "newValue": 1}
        ) == {
            "error": 'Record "doc:1" is not writable by this connection.',
            "code": "ESERVER",
            "name": "Error",
        }
        assert await ws.request(
            "mesh/publish-record-update", {"recordId": "note:1", "newValue": {"x": 1}}
        ) == {"success": True}
        assert await ws.request("mesh/unsubscribe-record", {"recordId": "doc:2"}) is True
        assert await ws.request("mesh/unsubscribe-record", {"recordId": "doc:2"}) is False
        assert await ws.request("delete-record", {"recordId": "doc:1"}) == {"success": True}
        assert (await ws.wait_push("mesh/record-deleted"))["payload"] == {
            "recordId": "doc:1",
            "version": 2,
        }
        assert await ws.request("get-record", {"recordId": "doc:1"}) == {"record": None}
        # collections
        await ws.request("write-record", {"recordId": "doc:b", "value": {"t": "b"}})
        await ws.request("write-record", {"recordId": "doc:a", "value": {"t": "a"}})
        assert await ws.request("mesh/subscribe-collection", {"collectionId": "docs"}) == {
            "success": True,
            "ids": ["doc:2", "doc:a", "doc:b"],
            "records": [
                {"id": "doc:2", "record": {"id": "doc:2", "value": 7}},
                {"id": "doc:a", "record": {"t": "a", "id": "doc:a"}},
                {"id": "doc:b", "record": {"t": "b", "id": "doc:b"}},
            ],
            "version": 1,
        }
        assert await ws.request("mesh/subscribe-collection", {"collectionId": "nope"}) == {
            "success": False,
            "ids": [],
            "records": [],
            "version": 0,
        }
        await ws.request("write-record", {"recordId": "doc:c", "value": {"t": "c"}})
        assert (await ws.wait_push("mesh/collection-diff"))["payload"] == {
            "collectionId": "docs",
            "added": [{"t": "c", "id": "doc:c"}],
            "removed": [],
            "version": 2,
        }
        await ws.request(
            "write-record", {"recordId": "doc:a", "value": {"n": 1}, "strategy": "merge"}
        )
        assert (await ws.wait_push("mesh/record-update"))["payload"] == {
            "recordId": "doc:a",
            "full": {"t": "a", "n": 1},
            "version": 2,
        }
        await ws.request("delete-record", {"recordId": "doc:b"})
        assert (await ws.wait_push("mesh/collection-diff"))["payload"] == {
            "collectionId": "docs",
            "added": [],
            "removed": [{"id": "doc:b"}],
            "version": 3,
        }
        assert await ws.request("mesh/unsubscribe-collection", {"collectionId": "docs"}) is True
        assert await ws.request("mesh/unsubscribe-collection", {"collectionId": "docs"}) is False
        await ws.close()


@pytest.mark.anyio
async def test_python_client_full_and_patch_over_every_value(
    server_cls: Any, anyio_backend: str
) -> None:
    async with serve(server_cls) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with client_cls(anyio_backend)(url) as full, client_cls(anyio_backend)(url) as patch:
            seen_full: list[RecordUpdate] = []
            seen_patch: list[RecordUpdate] = []
            assert await full.subscribe_record("doc:v", seen_full.append) == (True, None, 0)
            assert (await patch.subscribe_record("doc:v", seen_patch.append, mode="patch"))[0]
            for version, value in enumerate(VALUES, start=1):
                await full.command("write-record", {"recordId": "doc:v", "value": value})
                await until(
                    lambda v=version: seen_patch[-1].version == v and seen_full[-1].version == v
                )
                stored = await server.records.get_with_version("doc:v")
                assert stored == (value, version)
                assert patch.records["doc:v"] == value and full.records["doc:v"] == value
                assert type(patch.records["doc:v"]) is type(value)
            assert all(u.patch is not None for u in seen_patch[1:])
            assert all(u.patch is None for u in seen_full)
            # the three strategies
            await full.command("write-record", {"recordId": "doc:s", "value": {"a": {"b": 1}}})
            await patch.subscribe_record("doc:s", None, mode="patch")
            await full.command(
                "write-record",
                {"recordId": "doc:s", "value": {"a": {"c": 2}}, "strategy": "deepMerge"},
            )
            await until(lambda: patch.records["doc:s"] == {"a": {"b": 1, "c": 2}})
            await full.command(
                "write-record", {"recordId": "doc:s", "value": {"d": 3}, "strategy": "merge"}
            )
            await until(lambda: patch.records["doc:s"] == {"a": {"b": 1, "c": 2}, "d": 3})
            await full.command("write-record", {"recordId": "doc:s", "value": {"e": 4}})
            await until(lambda: patch.records["doc:s"] == {"e": 4})
            # client writes: writable and read-only patterns
            assert await patch.write_record("note:1", {"x": 1}) is True
            assert await patch.write_record("note:1", {"y": 2}, strategy="merge") is True
            assert await server.records.get("note:1") == {"x": 1, "y": 2}
            with pytest.raises(Exception, match="not writable"):
                await patch.write_record("doc:s", 1)
            # deletion ends the subscription
            await full.command("delete-record", {"recordId": "doc:v"})
            await until(lambda: bool(seen_full) and seen_full[-1].deleted)
            assert "doc:v" not in full.records
            assert await patch.unsubscribe_record("doc:s") is True


@pytest.mark.anyio
async def test_guards_hold(server_cls: Any, anyio_backend: str) -> None:
    app = MeshApp()
    app.expose_record(re.compile(r"^x:"), lambda conn, rid: False)  # nobody reads
    app.expose_writable_record(re.compile(r"^x:"))  # anybody writes
    app.expose_record(re.compile(r"^ok:"))
    app.expose_record(re.compile(r"^hidden:"), lambda conn, rid: False)

    async def members(conn: Any, cid: str) -> list[Any]:
        return ["ok:1", "hidden:1", {"id": "x:1", "leak": True}, {"id": "ok:2", "inline": 1}]

    app.expose_collection("mixed", members)
    app.expose_collection("closed", members, guard=lambda conn, cid: False)
    async with (
        serve(server_cls, app) as server,
        client_cls(anyio_backend)(f"ws://127.0.0.1:{server.port}") as client,
    ):
        assert await client.write_record("x:1", {"secret": 1}) is True
        assert (await client.subscribe_record("x:1"))[0] is False
        diffs: list[CollectionDiff] = []
        ok, records, version = await client.subscribe_collection("mixed", diffs.append)
        assert ok and version == 1
        assert [r["id"] for r in records] == ["ok:1", "ok:2"]
        assert records[1]["record"] == {"id": "ok:2", "inline": 1}
        assert (await client.subscribe_collection("closed"))[0] is False


@pytest.mark.anyio
async def test_python_client_collection_diffs(server_cls: Any, anyio_backend: str) -> None:
    async with serve(server_cls) as server:
        await server.records.write("doc:1", {"t": 1})
        async with client_cls(anyio_backend)(f"ws://127.0.0.1:{server.port}") as client:
            diffs: list[CollectionDiff] = []
            ok, records, _ = await client.subscribe_collection("docs", diffs.append)
            assert ok and [r["id"] for r in records] == ["doc:1"]
            await server.records.write("doc:2", {"t": 2})
            await until(lambda: client.collection_ids("docs") == {"doc:1", "doc:2"})
            await server.records.write("doc:1", {"u": 1}, "merge")
            await until(lambda: any(d.changed for d in diffs))
            await server.records.delete("doc:2")
            await until(lambda: client.collection_ids("docs") == {"doc:1"})
            assert [d.version for d in diffs if d.added or d.removed] == [1, 2, 3]
            changed = next(d for d in diffs if d.changed)
            assert changed.changed == [{"id": "doc:1", "record": {"t": 1, "u": 1}}]
            # a burst of writes re-resolves a bounded number of times
            calls = 0
            rules = server.app.collection_rules[0]
            original = rules.resolver

            async def counting(conn: Any, cid: str) -> Any:
                nonlocal calls
                calls += 1
                return await original(conn, cid)

            rules.resolver = counting
            try:
                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(server.records.write, "doc:1", {"i": i}, "merge")
                await until(lambda: not server.collections._collections["docs"].running)
            finally:
                rules.resolver = original
            assert 1 <= calls <= 10, calls
            assert await client.unsubscribe_collection("docs") is True
            assert server.collections._collections == {}


@pytest.mark.anyio
async def test_resubscribed_after_reconnect(server_cls: Any, anyio_backend: str) -> None:
    async with serve(server_cls, close_timeout=1.0) as server:
        port = server.port
        client = client_cls(anyio_backend)(
            f"ws://127.0.0.1:{port}", reconnect_interval=0.05, reconnect_jitter=0
        )
        async with client:
            seen: list[RecordUpdate] = []
            await client.subscribe_record("doc:r", seen.append, mode="patch")
            await client.subscribe_collection("docs")
            first = client.connection_id
            for connection in server.connections.local_connections():
                connection.close(1012, "restart")
            await until(lambda: client.connection_id not in (None, first), timeout=10)
            await until(lambda: server.records._subscribers.get("doc:r") is not None, timeout=10)
            await until(lambda: "docs" in server.collections._collections, timeout=10)
            await server.records.write("doc:r", {"after": "reconnect"})
            await until(lambda: client.records.get("doc:r") == {"after": "reconnect"})
            await until(lambda: client.collection_ids("docs") == {"doc:r"})


@pytest.mark.anyio
async def test_nothing_outlives_its_connection(server_cls: Any) -> None:
    async with serve(server_cls) as server:
        ws = await WSClient.connect(server.port)
        await ws.request("mesh/subscribe-record", {"recordId": "doc:1", "mode": "patch"})
        await ws.request("mesh/subscribe-collection", {"collectionId": "docs"})
        assert server.storage._collection_ids
        assert server.pubsub.channels()
        await ws.close()
        await until(lambda: not server.connections.local_connections())
        await until(lambda: not server.storage._collection_ids)
        assert server.records._subscribers == {}
        assert server.collections._collections == {}
        assert server.pubsub.channels() == []


@pytest.mark.anyio
async def test_bad_input_is_a_clear_error(server_cls: Any) -> None:
    async with serve(server_cls, max_metadata_size=1024) as server:
        ws = await WSClient.connect(server.port)
        for payload, code in [
            ({"recordId": "note:1", "newValue": 1, "options": []}, "EINVAL"),
            ({"recordId": "note:1", "newValue": 1, "options": {"strategy": "x"}}, "EINVAL"),
            ({"newValue": 1}, "EINVAL"),
            ({"recordId": "note:1"}, "EINVAL"),
            ({"recordId": "note:1", "newValue": "x" * 2000}, "ETOOLARGE"),
        ]:
            answer = await ws.request("mesh/publish-record-update", payload)
            assert answer["code"] == code and answer["error"], answer
        too_big = await ws.request("write-record", {"recordId": "doc:1", "value": ["x" * 2000]})
        assert too_big["code"] == "ETOOLARGE"
        assert await server.records.get_with_version("note:1") == (None, 0)
        assert await server.records.get_with_version("doc:1") == (None, 0)
        await ws.close()


# -- the reference client's behaviour (the JavaScript stand-in) ---------------


@pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "fast-json-patch").is_dir(),
    reason="needs node and `npm ci` in tests/node",
)
@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_js_client_records_and_collections(runtime: str) -> None:
    with ServerThread(runtime, demo_app, **QUIET) as server:
        result = run_harness(f"ws://127.0.0.1:{server.port}", "records")
        assert result["ok"] is True and not result["failed_checks"], result["failed_checks"]
        steps = result["steps"]
        assert steps["mismatches"] == []
        assert steps["final_version"] == 11
        # every patch the stand-in applied is one jsonpatch applies the same way
        updates = [
            w["frame"] for w in result["wire"] if w["frame"].get("command") == "mesh/record-update"
        ]
        value: Any = {"title": "t", "n": 0}
        for frame in updates:
            payload = frame["payload"]
            if payload.get("recordId") != "doc:1":
                continue
            if "patch" in payload:
                value = jsonpatch.apply_patch(value, payload["patch"])
        assert value == {"back": "to an object"}


@pytest.mark.anyio
async def test_junk_payloads_get_clear_answers(server_cls: Any) -> None:
    """Random payloads for every record and collection command: each gets a
    success or a clear error payload (never a crash's ``ESERVER``), and the
    server serves on."""
    import random

    rng = random.Random(13)
    keys = ["recordId", "newValue", "options", "mode", "collectionId", "strategy"]

    def junk(depth: int = 0) -> Any:
        kind = rng.randrange(7 if depth < 2 else 5)
        if kind == 0:
            return rng.choice([None, True, 0, -1, 1.5, 2**70])
        if kind == 1:
            return rng.choice(["doc:1", "note:1", "secret:1", "", "docs", "full", "patch"])
        if kind == 2:
            return rng.choice(["replace", "merge", "deepMerge", "x"])
        if kind == 3:
            return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(6)))
        if kind == 4:
            return rng.randrange(-5, 5)
        if kind == 5:
            return [junk(depth + 1) for _ in range(rng.randrange(3))]
        return {rng.choice(keys): junk(depth + 1) for _ in range(rng.randrange(5))}

    commands = [
        "mesh/subscribe-record",
        "mesh/unsubscribe-record",
        "mesh/publish-record-update",
        "mesh/subscribe-collection",
        "mesh/unsubscribe-collection",
    ]
    async with serve(server_cls) as server:
        ws = await WSClient.connect(server.port)
        for _ in range(400):
            answer = await ws.request(rng.choice(commands), junk())
            if isinstance(answer, dict) and "error" in answer:
                assert answer["code"] in ("EINVAL", "ETOOLARGE", "ESERVER"), answer
                if answer["code"] == "ESERVER":
                    assert answer["name"] == "Error" and "not writable" in answer["error"]
            else:
                assert isinstance(answer, bool | dict), answer
        assert await ws.request("mesh/noop", {}) is True
        await ws.close()

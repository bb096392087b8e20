"""The record operations' conformance suite, for every driver that has them
(the in-memory store and Redis; not Redis Cluster, whose slots cannot hold
the shared layout's two keys in one script).

Subclass :class:`RecordConformance` and implement ``new_storage`` (a fresh,
empty, not yet started store), as for :mod:`tests.helpers.storage_conformance`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from mesh_core import Storage
from mesh_core.storage import _ops as ops
from mesh_core.storage._strategies import updater
from tests.helpers.storage_conformance import Deliveries, Messages

__all__ = ["RecordConformance"]


class RecordConformance:
    instance_id = "records-instance-1"

    async def new_storage(self) -> Storage:
        raise NotImplementedError

    @pytest.fixture
    async def storage(self, anyio_backend: str) -> AsyncIterator[Storage]:
        store = await self.new_storage()
        await store.start(self.instance_id, Deliveries())
        try:
            yield store
        finally:
            await store.stop()

    async def write(self, storage: Storage, rid: str, value: Any, strategy: str = "replace") -> Any:
        return await storage.execute(ops.WriteRecord(rid, updater(strategy, value)))

    async def get(self, storage: Storage, rid: str) -> tuple[Any, int]:
        ((value, version),) = await storage.execute(ops.GetRecords((rid,)))
        return value, version

    async def test_versions_and_announcements(self, storage: Storage) -> None:
        updates, changes = Messages(), Messages()
        await storage.execute(ops.Subscribe(ops.RECORD_UPDATES, self.instance_id, updates))
        await storage.execute(
            ops.Subscribe(ops.COLLECTION_RECORD_CHANGE, self.instance_id, changes)
        )
        assert await self.get(storage, "r") == (None, 0)
        assert await self.write(storage, "r", {"a": 1}) == ops.RecordWritten({"a": 1}, 1, True)
        assert await self.write(storage, "r", {"b": 2}, "merge") == ops.RecordWritten(
            {"a": 1, "b": 2}, 2, True
        )
        unchanged = await self.write(storage, "r", {"b": 2}, "merge")
        assert unchanged == ops.RecordWritten({"a": 1, "b": 2}, 2, False)
        assert await self.get(storage, "r") == ({"a": 1, "b": 2}, 2)
        assert await storage.execute(ops.DeleteRecord("r")) == ({"a": 1, "b": 2}, 2)
        assert await storage.execute(ops.DeleteRecord("r")) is None
        assert await self.get(storage, "r") == (None, 0)
        await updates.wait(3)
        await changes.wait(3)
        assert [json.loads(data) for _, data in updates.got] == [
            {
                "recordId": "r",
                "newValue": {"a": 1},
                "patch": [{"op": "replace", "path": "", "value": {"a": 1}}],
                "version": 1,
            },
            {
                "recordId": "r",
                "newValue": {"a": 1, "b": 2},
                "patch": [{"op": "add", "path": "/b", "value": 2}],
                "version": 2,
            },
            {"recordId": "r", "deleted": True, "version": 2},
        ]
        assert [data for _, data in changes.got] == [b"r", b"r", b"r"]

    @pytest.mark.parametrize(
        "values",
        [
            [1, 1.0, True, 0, False, None, "", "1", [], {}, [1, [2]], {"a": [True, 1, 1.0]}],
            [{"a": 1}, {"a": True}, {"a": 1.0}, {"a": "1"}, {"a": None}, {}],
        ],
    )
    async def test_every_json_value_and_every_change(
        self, storage: Storage, values: list[Any]
    ) -> None:
        for version, value in enumerate(values, start=1):
            written = await self.write(storage, "v", value)
            assert written == ops.RecordWritten(value, version, True)
            stored, at = await self.get(storage, "v")
            assert stored == value and type(stored) is type(value) and at == version

    async def test_a_refused_update_stores_nothing(self, storage: Storage) -> None:
        await self.write(storage, "r", {"keep": 1})

        def refuse(old: Any) -> Any:
            raise ValueError("no")

        with pytest.raises(ValueError):
            await storage.execute(ops.WriteRecord("r", refuse))
        assert await self.get(storage, "r") == ({"keep": 1}, 1)

    async def test_concurrent_merges_keep_every_key_and_version(self, storage: Storage) -> None:
        results: list[Any] = []

        async def one(i: int) -> None:
            results.append(await self.write(storage, "c", {f"k{i}": i}, "merge"))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        assert sorted(r.version for r in results) == list(range(1, 51))
        assert await self.get(storage, "c") == ({f"k{i}": i for i in range(50)}, 50)

    async def test_list_matching(self, storage: Storage) -> None:
        for rid in ("doc:b", "doc:a", "note:a", "doc:c", "docs"):
            await self.write(storage, rid, {"id": rid})
        listed = await storage.execute(ops.ListRecords("doc:*"))
        assert [rid for rid, _ in listed] == ["doc:a", "doc:b", "doc:c"]
        assert await storage.execute(ops.ListRecords("doc:[ab]")) == [
            ("doc:a", {"id": "doc:a"}),
            ("doc:b", {"id": "doc:b"}),
        ]
        assert await storage.execute(ops.ListRecords("nothing*")) == []

    async def test_collection_ids(self, storage: Storage) -> None:
        await storage.execute(ops.SetCollectionIds("c", "conn", ("a", "b")))
        await storage.execute(ops.SetCollectionIds("c", "conn", ("b",)))
        await storage.execute(ops.SetCollectionIds("c", "conn", None))
        await storage.execute(ops.SetCollectionIds("c", "never", None))

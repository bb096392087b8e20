"""The storage conformance suite on the embedded in-memory store, on both runtimes."""

from __future__ import annotations

import pytest

from mesh_core import MemoryStore, Storage
from mesh_core.storage import _ops as ops
from tests.helpers.storage_conformance import Deliveries, StorageConformance


class TestMemoryStore(StorageConformance):
    async def new_storage(self) -> Storage:
        return MemoryStore()


def test_memory_store_is_a_storage() -> None:
    assert isinstance(MemoryStore(), Storage)


def test_apply_runs_synchronously() -> None:
    store = MemoryStore()
    store.apply(ops.RegisterConnection("c", "i", {"a": 1}))
    assert store.apply(ops.GetMetadata("connection", ("c",))) == [{"a": 1}]


@pytest.mark.anyio
async def test_detached_instance_gets_no_deliveries(anyio_backend: str) -> None:
    store = MemoryStore()
    one, two = Deliveries(), Deliveries()
    await store.start("one", one)
    await store.start("two", two)
    store.apply(ops.RegisterConnection("b", "two"))
    store.detach("two")
    await store.execute(ops.Publish(("b",), "x", 1))
    assert two.calls == []
    assert one.calls == []
    await store.stop()

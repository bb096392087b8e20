"""A reusable conformance suite for storage drivers (PROTOCOL.md sections 7-8).

Every driver (the in-memory store, a future Redis driver, ...) must pass it.
Everything goes through the public contract: ``start``/``stop`` and
``await storage.execute(op)`` for each operation of :mod:`mesh_core.storage`.

To run it on a driver, subclass :class:`StorageConformance` in a test module,
implement :meth:`~StorageConformance.new_storage` (and, for drivers where one
handle serves one instance, :meth:`~StorageConformance.attach_instance`); the
``anyio_backend`` fixture of ``tests/conftest.py`` runs it on both runtimes::

    class TestRedisStore(StorageConformance):
        async def new_storage(self):
            return RedisStore(url, prefix=unique_prefix())   # empty, isolated

Results whose order a shared store cannot guarantee (set members, listings)
are compared as sorted lists.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest

from mesh_core import UNCHANGED, Storage, UnknownConnection
from mesh_core.storage import _ops as ops
from mesh_core.storage._strategies import updater

__all__ = ["Deliveries", "Messages", "StorageConformance"]


class Deliveries:
    """A delivery callback that records what it was handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str, Any]] = []

    def __call__(self, connection_ids: Sequence[str], command: str, payload: Any) -> None:
        self.calls.append((sorted(connection_ids), command, payload))

    async def wait(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` deliveries arrived (immediately for an
        in-process store; a networked driver delivers asynchronously)."""
        with anyio.fail_after(timeout):
            while len(self.calls) < count:
                await anyio.sleep(0.005)


class Messages:
    """A ``MessageCallback`` that records ``(channel, data)`` as handed over."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    def __call__(self, channel: str, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.got.append((channel, data))

    async def wait(self, count: int, timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            while len(self.got) < count:
                await anyio.sleep(0.005)


JSON_VALUES: list[Any] = [
    [],
    {},
    None,
    0,
    -1,
    2**53,
    -(2**63),
    2**63 - 1,
    1.5,
    -0.25,
    1e300,
    1.0,
    True,
    False,
    "",
    "plain",
    'ünïcødé 😀 世界 \u0000 \n \t " \\',
    [1, "a", None, [], {}],
    {"nested": {"deep": {"list": [1, {"x": [2.5, None]}]}}, "empty": {}, "arr": []},
    {"ключ": "значение", "😀": ["🎉"]},
]


@pytest.mark.anyio
class StorageConformance:
    """Base class of a driver's conformance tests; see the module docstring."""

    instance_id = "conformance-instance-1"
    other_instance_id = "conformance-instance-2"

    # -- what a driver's test class provides ----------------------------------

    async def new_storage(self) -> Storage:
        """Return a fresh, empty, not yet started store."""
        raise NotImplementedError

    async def attach_instance(
        self, storage: Storage, instance_id: str, deliver: Deliveries
    ) -> Storage:
        """Start another instance sharing ``storage``'s state and return the
        handle that instance uses. The default starts ``storage`` itself
        again under the new id (right for the in-memory store)."""
        await storage.start(instance_id, deliver)
        return storage

    async def detach_instance(self, handle: Storage, instance_id: str) -> None:
        """Undo :meth:`attach_instance`."""
        detach = getattr(handle, "detach", None)
        if callable(detach):
            detach(instance_id)
        else:
            await handle.stop()

    # -- fixtures -------------------------------------------------------------

    @pytest.fixture
    def deliveries(self) -> Deliveries:
        return Deliveries()

    @pytest.fixture
    async def storage(self, anyio_backend: str, deliveries: Deliveries) -> AsyncIterator[Storage]:
        store = await self.new_storage()
        assert isinstance(store, Storage)
        await store.start(self.instance_id, deliveries)
        try:
            yield store
        finally:
            await store.stop()

    # -- helpers --------------------------------------------------------------

    async def register(self, storage: Storage, cid: str, metadata: Any = None) -> None:
        await storage.execute(ops.RegisterConnection(cid, self.instance_id, metadata))

    async def conn_meta(self, storage: Storage, cid: str) -> Any:
        (value,) = await storage.execute(ops.GetMetadata("connection", (cid,)))
        return value

    async def room_meta(self, storage: Storage, room: str) -> Any:
        (value,) = await storage.execute(ops.GetMetadata("room", (room,)))
        return value

    async def members(self, storage: Storage, room: str) -> list[str]:
        return sorted(await storage.execute(ops.GetRoomMembers(room)))

    async def conn_rooms(self, storage: Storage, cid: str) -> list[str]:
        return sorted(await storage.execute(ops.GetConnectionRooms(cid)))

    async def all_rooms(self, storage: Storage) -> list[str]:
        return sorted(await storage.execute(ops.GetAllRooms()))

    async def all_meta(self, storage: Storage, scope: ops.Scope) -> list[tuple[str, Any]]:
        rows = await storage.execute(ops.GetAllMetadata(scope))
        return sorted((key, value) for key, value in rows)

    # -- connections ----------------------------------------------------------

    async def test_register_connection(self, storage: Storage) -> None:
        await self.register(storage, "c1", {"user": "u1"})
        await self.register(storage, "c2")
        ids = sorted(await storage.execute(ops.GetAllConnectionIds()))
        assert ids == [("c1", self.instance_id), ("c2", self.instance_id)]
        assert await self.conn_meta(storage, "c1") == {"user": "u1"}
        assert await self.conn_meta(storage, "c2") is None

    async def test_register_with_other_instance_id(self, storage: Storage) -> None:
        await storage.execute(ops.RegisterConnection("far", self.other_instance_id, [1]))
        assert await storage.execute(ops.GetAllConnectionIds()) == [("far", self.other_instance_id)]
        assert await self.conn_meta(storage, "far") == [1]

    async def test_empty_store(self, storage: Storage) -> None:
        assert await storage.execute(ops.GetAllConnectionIds()) == []
        assert await storage.execute(ops.GetAllRooms()) == []
        assert await storage.execute(ops.GetAllMetadata("connection")) == []
        assert await storage.execute(ops.GetAllMetadata("room")) == []
        assert await storage.execute(ops.GetRoomMembers("r")) == []
        assert await storage.execute(ops.GetRoomMembersMetadata("r")) == []
        assert await storage.execute(ops.GetConnectionRooms("c")) == []
        assert await storage.execute(ops.IsInRoom("r", "c")) is False

    async def test_unregister_returns_rooms_and_removes_everything(self, storage: Storage) -> None:
        await self.register(storage, "c1", {"m": 1})
        await self.register(storage, "c2", {"m": 2})
        for room in ("r1", "r2", "r3"):
            await storage.execute(ops.AddToRoom(room, "c1"))
        await storage.execute(ops.AddToRoom("r2", "c2"))
        await storage.execute(ops.UpdateMetadata("room", "r1", lambda old: {"keep": True}))
        rooms = await storage.execute(ops.UnregisterConnection("c1", self.instance_id))
        assert sorted(rooms) == ["r1", "r2", "r3"]
        assert await self.conn_meta(storage, "c1") is None
        assert await storage.execute(ops.GetAllConnectionIds()) == [("c2", self.instance_id)]
        assert await self.conn_rooms(storage, "c1") == []
        for room in ("r1", "r2", "r3"):
            assert await storage.execute(ops.IsInRoom(room, "c1")) is False
        assert await self.members(storage, "r2") == ["c2"]
        # rooms left empty are no longer listed; room metadata stays
        assert await self.all_rooms(storage) == ["r2"]
        assert await self.room_meta(storage, "r1") == {"keep": True}
        assert await self.all_meta(storage, "connection") == [("c2", {"m": 2})]
        # metadata of a cleaned-up connection cannot be written back
        with pytest.raises(UnknownConnection):
            await storage.execute(ops.UpdateMetadata("connection", "c1", lambda old: 1))
        assert await self.conn_meta(storage, "c1") is None

    async def test_unregister_unknown_connection(self, storage: Storage) -> None:
        rooms = await storage.execute(ops.UnregisterConnection("ghost", self.instance_id))
        assert list(rooms) == []

    async def test_unregister_connection_in_no_room(self, storage: Storage) -> None:
        await self.register(storage, "c1", "m")
        assert list(await storage.execute(ops.UnregisterConnection("c1", self.instance_id))) == []
        assert await storage.execute(ops.GetAllConnectionIds()) == []
        assert await self.conn_meta(storage, "c1") is None

    # -- metadata -------------------------------------------------------------

    async def test_get_metadata_several_keys(self, storage: Storage) -> None:
        await self.register(storage, "a", {"n": "a"})
        await self.register(storage, "b")
        await self.register(storage, "c", [3])
        values = await storage.execute(ops.GetMetadata("connection", ("c", "missing", "a", "b")))
        assert list(values) == [[3], None, {"n": "a"}, None]
        assert list(await storage.execute(ops.GetMetadata("connection", ()))) == []

    async def test_scopes_are_separate(self, storage: Storage) -> None:
        await self.register(storage, "same", {"scope": "connection"})
        await storage.execute(ops.UpdateMetadata("room", "same", lambda old: {"scope": "room"}))
        assert await self.conn_meta(storage, "same") == {"scope": "connection"}
        assert await self.room_meta(storage, "same") == {"scope": "room"}
        await storage.execute(ops.DeleteRoomMetadata("same"))
        assert await self.conn_meta(storage, "same") == {"scope": "connection"}

    @pytest.mark.parametrize("scope", ["connection", "room"])
    async def test_update_metadata_strategies(self, storage: Storage, scope: ops.Scope) -> None:
        await self.register(storage, "k")

        async def update(strategy: str, value: Any) -> Any:
            return await storage.execute(
                ops.UpdateMetadata(scope, "k", updater(strategy, value), strategy, value)
            )

        async def read() -> Any:
            (value,) = await storage.execute(ops.GetMetadata(scope, ("k",)))
            return value

        assert await update("replace", {"a": {"x": 1}, "b": 1}) == {"a": {"x": 1}, "b": 1}
        assert await read() == {"a": {"x": 1}, "b": 1}
        assert await update("merge", {"a": {"y": 2}}) == {"a": {"y": 2}, "b": 1}
        assert await read() == {"a": {"y": 2}, "b": 1}
        assert await update("deepMerge", {"a": {"z": 3}, "c": [1]}) == {
            "a": {"y": 2, "z": 3},
            "b": 1,
            "c": [1],
        }
        assert await update("deepMerge", {"c": [2]}) == {"a": {"y": 2, "z": 3}, "b": 1, "c": [2]}
        assert await update("merge", "scalar") == "scalar"
        assert await update("deepMerge", {"fresh": 1}) == {"fresh": 1}
        assert await update("replace", None) is None
        assert await read() is None

    @pytest.mark.parametrize("scope", ["connection", "room"])
    async def test_update_function_sees_old_value(self, storage: Storage, scope: ops.Scope) -> None:
        await self.register(storage, "k")
        seen: list[Any] = []

        def bump(old: Any) -> Any:
            seen.append(copy.deepcopy(old))
            return {"n": (old or {}).get("n", 0) + 1}

        for _ in range(3):
            await storage.execute(ops.UpdateMetadata(scope, "k", bump))
        (value,) = await storage.execute(ops.GetMetadata(scope, ("k",)))
        assert value == {"n": 3}
        assert seen[0] is None
        assert seen[1:] == [{"n": 1}, {"n": 2}]

    @pytest.mark.parametrize("scope", ["connection", "room"])
    async def test_unchanged_writes_nothing(self, storage: Storage, scope: ops.Scope) -> None:
        await self.register(storage, "k")
        await storage.execute(ops.UpdateMetadata(scope, "k", lambda old: {"v": 1}))
        assert await storage.execute(ops.UpdateMetadata(scope, "k", lambda old: UNCHANGED)) == {
            "v": 1
        }
        (value,) = await storage.execute(ops.GetMetadata(scope, ("k",)))
        assert value == {"v": 1}

    async def test_unchanged_on_missing_room_metadata_creates_nothing(
        self, storage: Storage
    ) -> None:
        assert await storage.execute(ops.UpdateMetadata("room", "r", lambda old: UNCHANGED)) is None
        assert await self.all_meta(storage, "room") == []

    async def test_unchanged_after_mutating_old_writes_nothing(self, storage: Storage) -> None:
        await self.register(storage, "k", {"v": 1})

        def sneaky(old: Any) -> Any:
            old["v"] = 999
            return UNCHANGED

        await storage.execute(ops.UpdateMetadata("connection", "k", sneaky))
        assert await self.conn_meta(storage, "k") == {"v": 1}

    async def test_update_unknown_connection_raises(self, storage: Storage) -> None:
        calls: list[Any] = []

        def update(old: Any) -> Any:
            calls.append(old)
            return {"x": 1}

        with pytest.raises(UnknownConnection) as info:
            await storage.execute(ops.UpdateMetadata("connection", "ghost", update))
        assert info.value.code == "ENOCONN"
        assert await self.conn_meta(storage, "ghost") is None
        assert await storage.execute(ops.GetAllConnectionIds()) == []
        assert await storage.execute(ops.GetAllMetadata("connection")) == []

    async def test_room_metadata_needs_no_members(self, storage: Storage) -> None:
        assert await storage.execute(ops.UpdateMetadata("room", "empty", lambda old: 7)) == 7
        assert await self.room_meta(storage, "empty") == 7
        assert await storage.execute(ops.GetAllRooms()) == []

    async def test_storing_null_is_not_deleting(self, storage: Storage) -> None:
        await self.register(storage, "c", {"x": 1})
        await storage.execute(ops.UpdateMetadata("connection", "c", lambda old: None))
        await storage.execute(ops.UpdateMetadata("room", "r", lambda old: None))
        assert await self.conn_meta(storage, "c") is None
        assert await self.room_meta(storage, "r") is None
        assert await self.all_meta(storage, "room") == [("r", None)]
        assert await self.all_meta(storage, "connection") == [("c", None)]

    async def test_all_metadata_listings(self, storage: Storage) -> None:
        await self.register(storage, "c1", {"n": 1})
        await self.register(storage, "c2")
        await storage.execute(ops.RegisterConnection("c3", self.other_instance_id, "far"))
        await storage.execute(ops.UpdateMetadata("room", "r1", lambda old: {"t": 1}))
        await storage.execute(ops.UpdateMetadata("room", "r2", lambda old: []))
        await storage.execute(ops.AddToRoom("r3", "c1"))  # members, no metadata
        assert await self.all_meta(storage, "connection") == [
            ("c1", {"n": 1}),
            ("c2", None),
            ("c3", "far"),
        ]
        assert await self.all_meta(storage, "room") == [("r1", {"t": 1}), ("r2", [])]

    async def test_delete_room_metadata(self, storage: Storage) -> None:
        await storage.execute(ops.UpdateMetadata("room", "r", lambda old: {"t": 1}))
        await storage.execute(ops.AddToRoom("r", "c1"))
        assert await storage.execute(ops.DeleteRoomMetadata("r")) is True
        assert await storage.execute(ops.DeleteRoomMetadata("r")) is False
        assert await storage.execute(ops.DeleteRoomMetadata("never")) is False
        assert await self.room_meta(storage, "r") is None
        assert await self.all_meta(storage, "room") == []
        assert await self.members(storage, "r") == ["c1"]

    async def test_non_json_value_is_refused_and_nothing_changes(self, storage: Storage) -> None:
        await self.register(storage, "c", {"ok": 1})
        with pytest.raises((TypeError, ValueError)):
            await storage.execute(ops.UpdateMetadata("connection", "c", lambda old: object()))
        assert await self.conn_meta(storage, "c") == {"ok": 1}

    # -- JSON fidelity and copies ---------------------------------------------

    @pytest.mark.parametrize("value", JSON_VALUES, ids=[repr(v)[:30] for v in JSON_VALUES])
    async def test_json_fidelity(self, storage: Storage, value: Any) -> None:
        await self.register(storage, "c", value)
        stored = await self.conn_meta(storage, "c")
        assert stored == value
        assert type(stored) is type(value)
        await storage.execute(ops.UpdateMetadata("room", "r", lambda old: value))
        room_value = await self.room_meta(storage, "r")
        assert room_value == value
        assert type(room_value) is type(value)
        assert await self.all_meta(storage, "room") == [("r", value)]
        await storage.execute(ops.AddToRoom("r", "c"))
        assert list(await storage.execute(ops.GetRoomMembersMetadata("r"))) == [("c", value)]

    async def test_float_and_int_types_are_kept(self, storage: Storage) -> None:
        value = {"i": 1, "f": 1.0, "big": 12345678901234, "neg": -0.5, "l": [2, 2.0]}
        await self.register(storage, "c", value)
        stored = await self.conn_meta(storage, "c")
        assert stored == value
        assert type(stored["i"]) is int
        assert type(stored["f"]) is float
        assert [type(x) for x in stored["l"]] == [int, float]

    async def test_values_read_are_copies(self, storage: Storage) -> None:
        original: dict[str, Any] = {"list": [1], "obj": {"k": "v"}}
        await self.register(storage, "c", original)
        await storage.execute(ops.AddToRoom("r", "c"))
        await storage.execute(ops.UpdateMetadata("room", "r", lambda old: {"list": [1]}))
        # mutate what we gave
        original["list"].append(2)
        original["obj"]["k"] = "changed"
        # mutate every kind of read
        got = await self.conn_meta(storage, "c")
        got["list"].append(3)
        got["new"] = True
        ((_, via_room),) = await storage.execute(ops.GetRoomMembersMetadata("r"))
        via_room["obj"]["k"] = "x"
        ((_, via_all),) = await storage.execute(ops.GetAllMetadata("connection"))
        via_all.clear()
        room = await self.room_meta(storage, "r")
        room["list"].append(9)
        ((_, room_all),) = await storage.execute(ops.GetAllMetadata("room"))
        room_all["list"].append(10)
        returned = await storage.execute(ops.UpdateMetadata("room", "r2", lambda old: {"a": [1]}))
        returned["a"].append(2)
        assert await self.conn_meta(storage, "c") == {"list": [1], "obj": {"k": "v"}}
        assert await self.room_meta(storage, "r") == {"list": [1]}
        assert await self.room_meta(storage, "r2") == {"a": [1]}

    # -- rooms ----------------------------------------------------------------

    async def test_room_membership(self, storage: Storage) -> None:
        await self.register(storage, "c1", {"n": 1})
        await self.register(storage, "c2")
        assert await storage.execute(ops.AddToRoom("r", "c1")) is True
        assert await storage.execute(ops.AddToRoom("r", "c1")) is False
        assert await storage.execute(ops.AddToRoom("r", "c2")) is True
        assert await storage.execute(ops.AddToRoom("s", "c1")) is True
        assert await storage.execute(ops.IsInRoom("r", "c1")) is True
        assert await storage.execute(ops.IsInRoom("r", "c3")) is False
        assert await storage.execute(ops.IsInRoom("t", "c1")) is False
        assert await self.members(storage, "r") == ["c1", "c2"]
        assert sorted(await storage.execute(ops.GetRoomMembersMetadata("r"))) == [
            ("c1", {"n": 1}),
            ("c2", None),
        ]
        assert await self.conn_rooms(storage, "c1") == ["r", "s"]
        assert await self.conn_rooms(storage, "c2") == ["r"]
        assert await self.all_rooms(storage) == ["r", "s"]

        assert await storage.execute(ops.RemoveFromRoom("r", "c1")) is True
        assert await storage.execute(ops.RemoveFromRoom("r", "c1")) is False
        assert await storage.execute(ops.RemoveFromRoom("nowhere", "c1")) is False
        assert await storage.execute(ops.IsInRoom("r", "c1")) is False
        assert await self.members(storage, "r") == ["c2"]
        assert await self.conn_rooms(storage, "c1") == ["s"]

        assert await storage.execute(ops.RemoveFromRoom("s", "c1")) is True
        assert await self.all_rooms(storage) == ["r"]  # only rooms with members
        assert await self.conn_rooms(storage, "c1") == []

    async def test_members_metadata_follows_updates(self, storage: Storage) -> None:
        await self.register(storage, "c1", {"v": 1})
        await storage.execute(ops.AddToRoom("r", "c1"))
        await storage.execute(
            ops.UpdateMetadata("connection", "c1", updater("merge", {"w": 2}), "merge", {"w": 2})
        )
        assert list(await storage.execute(ops.GetRoomMembersMetadata("r"))) == [
            ("c1", {"v": 1, "w": 2})
        ]

    async def test_room_names_with_special_characters(self, storage: Storage) -> None:
        names = ["a:b", "with space", "ünï😀", "x*y?[z]", "mesh:room:evil"]
        await self.register(storage, "c")
        for name in names:
            await storage.execute(ops.AddToRoom(name, "c"))
            value = {"n": name}
            await storage.execute(ops.UpdateMetadata("room", name, updater("replace", value)))
        assert await self.all_rooms(storage) == sorted(names)
        assert await self.conn_rooms(storage, "c") == sorted(names)
        for name in names:
            assert await self.room_meta(storage, name) == {"n": name}
            assert await self.members(storage, name) == ["c"]

    async def test_clear_room_keeps_metadata(self, storage: Storage) -> None:
        for cid in ("c1", "c2"):
            await self.register(storage, cid)
            await storage.execute(ops.AddToRoom("r", cid))
        await storage.execute(ops.AddToRoom("other", "c1"))
        await storage.execute(ops.UpdateMetadata("room", "r", lambda old: {"t": "topic"}))
        assert sorted(await storage.execute(ops.ClearRoom("r"))) == ["c1", "c2"]
        assert await self.members(storage, "r") == []
        assert await storage.execute(ops.IsInRoom("r", "c1")) is False
        assert await self.conn_rooms(storage, "c1") == ["other"]
        assert await self.conn_rooms(storage, "c2") == []
        assert await self.all_rooms(storage) == ["other"]
        assert await self.room_meta(storage, "r") == {"t": "topic"}
        assert list(await storage.execute(ops.ClearRoom("r"))) == []
        assert list(await storage.execute(ops.ClearRoom("never"))) == []

    async def test_delete_room_drops_metadata(self, storage: Storage) -> None:
        for cid in ("c1", "c2"):
            await self.register(storage, cid)
            await storage.execute(ops.AddToRoom("r", cid))
        await storage.execute(ops.UpdateMetadata("room", "r", lambda old: {"t": "topic"}))
        await storage.execute(ops.UpdateMetadata("room", "keep", lambda old: 1))
        assert sorted(await storage.execute(ops.DeleteRoom("r"))) == ["c1", "c2"]
        assert await self.members(storage, "r") == []
        assert await self.conn_rooms(storage, "c1") == []
        assert await self.room_meta(storage, "r") is None
        assert await self.all_meta(storage, "room") == [("keep", 1)]
        assert await self.all_rooms(storage) == []
        # a room with metadata only
        assert list(await storage.execute(ops.DeleteRoom("keep"))) == []
        assert await self.all_meta(storage, "room") == []
        # the connections are still registered
        assert len(await storage.execute(ops.GetAllConnectionIds())) == 2

    # -- delivery across instances --------------------------------------------

    async def test_publish_reaches_the_owning_instance(
        self, storage: Storage, deliveries: Deliveries
    ) -> None:
        other = Deliveries()
        handle = await self.attach_instance(storage, self.other_instance_id, other)
        try:
            await self.register(storage, "mine")
            await handle.execute(ops.RegisterConnection("far1", self.other_instance_id))
            await handle.execute(ops.RegisterConnection("far2", self.other_instance_id))
            await storage.execute(
                ops.Publish(("far2", "far1", "ghost"), "chat", {"text": "hi", "n": [1]})
            )
            await other.wait(1)
            assert other.calls == [(["far1", "far2"], "chat", {"text": "hi", "n": [1]})]
            assert deliveries.calls == []
            # and the other way round
            await handle.execute(ops.Publish(("mine",), "pong-back", None))
            await deliveries.wait(1)
            assert deliveries.calls == [(["mine"], "pong-back", None)]
            assert len(other.calls) == 1
        finally:
            await self.detach_instance(handle, self.other_instance_id)

    async def test_publish_groups_by_owner(self, storage: Storage, deliveries: Deliveries) -> None:
        other = Deliveries()
        handle = await self.attach_instance(storage, self.other_instance_id, other)
        try:
            await self.register(storage, "a")
            await handle.execute(ops.RegisterConnection("b", self.other_instance_id))
            await storage.execute(ops.Publish(("a", "b"), "x", 1))
            await other.wait(1)
            await deliveries.wait(1)
            assert other.calls == [(["b"], "x", 1)]
            assert deliveries.calls == [(["a"], "x", 1)]
        finally:
            await self.detach_instance(handle, self.other_instance_id)

    async def test_publish_to_nobody(self, storage: Storage, deliveries: Deliveries) -> None:
        await storage.execute(ops.Publish(("ghost",), "x", 1))
        await storage.execute(ops.Publish((), "x", 1))
        assert deliveries.calls == []

    async def test_state_is_shared_between_instances(self, storage: Storage) -> None:
        handle = await self.attach_instance(storage, self.other_instance_id, Deliveries())
        try:
            await self.register(storage, "a", {"from": 1})
            await handle.execute(ops.RegisterConnection("b", self.other_instance_id, {"from": 2}))
            await handle.execute(ops.AddToRoom("r", "a"))
            await storage.execute(ops.AddToRoom("r", "b"))
            assert sorted(await handle.execute(ops.GetRoomMembersMetadata("r"))) == [
                ("a", {"from": 1}),
                ("b", {"from": 2}),
            ]
            assert sorted(await storage.execute(ops.GetAllConnectionIds())) == [
                ("a", self.instance_id),
                ("b", self.other_instance_id),
            ]
            await handle.execute(ops.UnregisterConnection("b", self.other_instance_id))
            assert await self.members(storage, "r") == ["a"]
        finally:
            await self.detach_instance(handle, self.other_instance_id)

    # -- atomicity ------------------------------------------------------------

    @pytest.mark.parametrize("strategy", ["merge", "deepMerge"])
    @pytest.mark.parametrize("scope", ["connection", "room"])
    async def test_concurrent_merges_lose_nothing(
        self, storage: Storage, scope: ops.Scope, strategy: str
    ) -> None:
        await self.register(storage, "k", {"base": True})
        if scope == "room":
            await storage.execute(ops.UpdateMetadata("room", "k", lambda old: {"base": True}))
        count = 200

        async def merge_one(i: int) -> None:
            value = {f"key{i}": i} if strategy == "merge" else {"nested": {f"key{i}": i}}
            await storage.execute(
                ops.UpdateMetadata(scope, "k", updater(strategy, value), strategy, value)
            )

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(merge_one, i)
        (value,) = await storage.execute(ops.GetMetadata(scope, ("k",)))
        if strategy == "merge":
            assert value == {"base": True, **{f"key{i}": i for i in range(count)}}
        else:
            assert value == {"base": True, "nested": {f"key{i}": i for i in range(count)}}

    async def test_concurrent_merges_from_two_instances(self, storage: Storage) -> None:
        handle = await self.attach_instance(storage, self.other_instance_id, Deliveries())
        try:
            await self.register(storage, "k", {})
            count = 100

            async def merge_one(store: Storage, i: int) -> None:
                value = {f"key{i}": i}
                await store.execute(
                    ops.UpdateMetadata("connection", "k", updater("merge", value), "merge", value)
                )

            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(merge_one, storage if i % 2 else handle, i)
            assert await self.conn_meta(storage, "k") == {f"key{i}": i for i in range(count)}
        finally:
            await self.detach_instance(handle, self.other_instance_id)

    async def test_concurrent_room_joins(self, storage: Storage) -> None:
        count = 200
        for i in range(count):
            await self.register(storage, f"c{i}")
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(storage.execute, ops.AddToRoom("big", f"c{i}"))
        assert await self.members(storage, "big") == sorted(f"c{i}" for i in range(count))

    # -- publish/subscribe on named channels ----------------------------------

    async def test_subscribe_then_publish(self, storage: Storage) -> None:
        got = Messages()
        await storage.execute(ops.Subscribe("news", self.instance_id, got))
        await storage.execute(ops.PublishMessage("news", "héllo"))
        await storage.execute(ops.PublishMessage("news", b"\x00\xffraw"))
        await storage.execute(ops.PublishMessage("elsewhere", "not for us"))
        await got.wait(2)
        assert got.got == [("news", "héllo".encode()), ("news", b"\x00\xffraw")]

    async def test_messages_arrive_in_order(self, storage: Storage) -> None:
        got = Messages()
        await storage.execute(ops.Subscribe("seq", self.instance_id, got))
        for i in range(100):
            await storage.execute(ops.PublishMessage("seq", f"m{i}"))
        await got.wait(100)
        assert [data for _, data in got.got] == [f"m{i}".encode() for i in range(100)]

    async def test_channel_names_are_exact(self, storage: Storage) -> None:
        """No pattern matching: ``*`` and friends are plain characters."""
        got = Messages()
        for name in ["chat:*", "chat:[a]", "ünï code ch"]:
            await storage.execute(ops.Subscribe(name, self.instance_id, got))
        for name in ["chat:x", "chat:a", "chat:*", "chat:[a]", "ünï code ch"]:
            await storage.execute(ops.PublishMessage(name, name))
        await got.wait(3)
        await anyio.sleep(0.05)
        assert sorted(got.got) == sorted(
            (n, n.encode()) for n in ["chat:*", "chat:[a]", "ünï code ch"]
        )

    async def subscribe_both(
        self, storage: Storage, handle: Storage, channel: str
    ) -> tuple[Messages, Messages]:
        """Subscribe ``channel`` on this instance and on the other one."""
        mine, theirs = Messages(), Messages()
        await storage.execute(ops.Subscribe(channel, self.instance_id, mine))
        await handle.execute(ops.Subscribe(channel, self.other_instance_id, theirs))
        return mine, theirs

    async def test_publish_reaches_every_instance_once(self, storage: Storage) -> None:
        handle = await self.attach_instance(storage, self.other_instance_id, Deliveries())
        try:
            mine, theirs = await self.subscribe_both(storage, handle, "room:1")
            await handle.execute(ops.PublishMessage("room:1", "from 2"))
            await storage.execute(ops.PublishMessage("room:1", "from 1"))
            await mine.wait(2)
            await theirs.wait(2)
            await anyio.sleep(0.05)
            for got in (mine, theirs):
                assert sorted(got.got) == [("room:1", b"from 1"), ("room:1", b"from 2")]
        finally:
            await self.detach_instance(handle, self.other_instance_id)

    async def test_unsubscribe_stops_delivery(self, storage: Storage) -> None:
        got, barrier = Messages(), Messages()
        await storage.execute(ops.Subscribe("gone", self.instance_id, got))
        await storage.execute(ops.Subscribe("barrier", self.instance_id, barrier))
        await storage.execute(ops.PublishMessage("gone", "1"))
        await got.wait(1)
        await storage.execute(ops.Unsubscribe("gone", self.instance_id))
        await storage.execute(ops.Unsubscribe("gone", self.instance_id))  # again: nothing
        await storage.execute(ops.Unsubscribe("never", self.instance_id))
        await storage.execute(ops.PublishMessage("gone", "2"))
        await storage.execute(ops.PublishMessage("barrier", "after"))
        await barrier.wait(1)
        await anyio.sleep(0.1)
        assert got.got == [("gone", b"1")]
        # and it can be subscribed again
        await storage.execute(ops.Subscribe("gone", self.instance_id, got))
        await storage.execute(ops.PublishMessage("gone", "3"))
        await got.wait(2)
        assert got.got == [("gone", b"1"), ("gone", b"3")]

    async def test_subscribing_again_replaces_the_callback(self, storage: Storage) -> None:
        first, second = Messages(), Messages()
        await storage.execute(ops.Subscribe("replaced", self.instance_id, first))
        await storage.execute(ops.Subscribe("replaced", self.instance_id, second))
        await storage.execute(ops.PublishMessage("replaced", "x"))
        await second.wait(1)
        await anyio.sleep(0.05)
        assert first.got == [] and second.got == [("replaced", b"x")]

    async def test_unsubscribe_is_per_instance(self, storage: Storage) -> None:
        handle = await self.attach_instance(storage, self.other_instance_id, Deliveries())
        try:
            mine, theirs = await self.subscribe_both(storage, handle, "shared")
            await handle.execute(ops.Unsubscribe("shared", self.other_instance_id))
            await handle.execute(ops.PublishMessage("shared", "still here"))
            await mine.wait(1)
            await anyio.sleep(0.1)
            assert mine.got == [("shared", b"still here")] and theirs.got == []
        finally:
            await self.detach_instance(handle, self.other_instance_id)

    async def test_a_stopped_instance_keeps_no_subscription(self, storage: Storage) -> None:
        theirs, barrier = Messages(), Messages()
        handle = await self.attach_instance(storage, self.other_instance_id, Deliveries())
        await handle.execute(ops.Subscribe("left", self.other_instance_id, theirs))
        await self.detach_instance(handle, self.other_instance_id)
        await storage.execute(ops.Subscribe("barrier2", self.instance_id, barrier))
        await storage.execute(ops.PublishMessage("left", "anyone?"))
        await storage.execute(ops.PublishMessage("barrier2", "done"))
        await barrier.wait(1)
        await anyio.sleep(0.1)
        assert theirs.got == []

    async def test_a_failing_callback_does_not_stop_delivery(self, storage: Storage) -> None:
        got = Messages()

        def callback(channel: str, data: bytes) -> None:
            if data == b"boom":
                raise RuntimeError("boom")
            got(channel, data)

        await storage.execute(ops.Subscribe("fragile", self.instance_id, callback))
        await storage.execute(ops.PublishMessage("fragile", "boom"))
        await storage.execute(ops.PublishMessage("fragile", "ok"))
        await got.wait(1)
        assert got.got == [("fragile", b"ok")]

    # -- channels with history ------------------------------------------------

    async def write(self, storage: Storage, channel: str, message: str, keep: int) -> int:
        offset, epoch = await storage.execute(ops.WriteChannel(channel, message, keep, "e1"))
        assert epoch == "e1"  # the first writer's candidate stays the epoch
        return int(offset)

    async def read(self, storage: Storage, channel: str, limit: int, **kw: Any) -> Any:
        return await storage.execute(ops.GetChannelHistory(channel, limit, **kw))

    async def test_history_of_an_unknown_channel(self, storage: Storage) -> None:
        got = await self.read(storage, "nothing", 10)
        assert (got.messages, got.offset, got.last, got.epoch) == ([], None, 0, None)
        got = await self.read(storage, "nothing", 10, since=0)
        assert got.messages == [] and got.recovered is True
        assert (await self.read(storage, "nothing", 10, since=3)).recovered is False

    async def test_offsets_count_up_and_history_is_the_latest_n(self, storage: Storage) -> None:
        offsets = [await self.write(storage, "c", f"m{i}", 5) for i in range(1, 9)]
        assert offsets == list(range(1, 9))
        got = await self.read(storage, "c", 3)
        assert got.messages == ["m6", "m7", "m8"]  # the newest, oldest first
        assert (got.offset, got.last, got.epoch, got.recovered) == (8, 8, "e1", None)
        assert (await self.read(storage, "c", 100)).messages == [f"m{i}" for i in range(4, 9)]
        position = await self.read(storage, "c", 0)
        assert (position.messages, position.last, position.epoch) == ([], 8, "e1")

    async def test_since_returns_exactly_what_follows(self, storage: Storage) -> None:
        for i in range(1, 11):
            await self.write(storage, "c", f"m{i}", 6)
        got = await self.read(storage, "c", 100, since=7, epoch="e1")
        assert (got.messages, got.offset, got.recovered) == (["m8", "m9", "m10"], 10, True)
        got = await self.read(storage, "c", 100, since=10)
        assert (got.messages, got.recovered) == ([], True)
        got = await self.read(storage, "c", 100, since=4)  # 5..10 kept: all there
        assert got.messages == [f"m{i}" for i in range(5, 11)] and got.recovered is True
        got = await self.read(storage, "c", 100, since=3)  # 4 was trimmed away
        assert got.messages == [f"m{i}" for i in range(5, 11)] and got.recovered is False
        got = await self.read(storage, "c", 2, since=5)  # more than the limit
        assert got.messages == ["m9", "m10"] and got.recovered is False
        got = await self.read(storage, "c", 100, since=12)  # ahead: another history
        assert got.recovered is False and len(got.messages) == 6
        got = await self.read(storage, "c", 3, since=8, epoch="other")
        assert got.messages == ["m8", "m9", "m10"] and got.recovered is False

    async def test_a_write_is_announced_then_published_bare(self, storage: Storage) -> None:
        # a channel name no other test uses: on a Cluster a message another
        # test published may still be on its way over the cluster bus
        got = Messages()
        await storage.execute(
            ops.Subscribe(ops.offsets_channel("announced"), self.instance_id, got)
        )
        await storage.execute(ops.Subscribe("announced", self.instance_id, got))
        await self.write(storage, "announced", "first", 10)
        await self.write(storage, "announced", 'second {"x": 1}', 10)
        await got.wait(4)
        assert got.got == [
            (ops.offsets_channel("announced"), ops.offsets_envelope(1, "e1", b"first")),
            ("announced", b"first"),
            (ops.offsets_channel("announced"), ops.offsets_envelope(2, "e1", b'second {"x": 1}')),
            ("announced", b'second {"x": 1}'),
        ]
        assert ops.split_envelope(got.got[2][1]) == (2, "e1", b'second {"x": 1}')

    async def test_history_is_shared_between_instances(self, storage: Storage) -> None:
        handle = await self.attach_instance(storage, self.other_instance_id, Deliveries())
        try:
            await self.write(storage, "c", "a", 10)
            offset, epoch = await handle.execute(ops.WriteChannel("c", "b", 10, "e2"))
            assert (offset, epoch) == (2, "e1")
            assert (await self.read(handle, "c", 10)).messages == ["a", "b"]
        finally:
            await self.detach_instance(handle, self.other_instance_id)

    async def test_concurrent_writes_get_distinct_offsets(self, storage: Storage) -> None:
        offsets: list[int] = []

        async def one(i: int) -> None:
            offsets.append(await self.write(storage, "busy", f"m{i}", 1000))

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
        assert sorted(offsets) == list(range(1, 101))
        got = await self.read(storage, "busy", 1000, since=0)
        assert len(got.messages) == 100 and got.recovered is True

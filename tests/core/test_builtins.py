"""The built-in ``mesh/*`` commands, driven synchronously against MemoryStore."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mesh_core import MemoryStore, ValidationError
from mesh_core.app import BUILTINS, CheckClientWrite
from mesh_core.app._builtins import Steps
from mesh_core.storage import _ops as ops


def drive(
    steps: Steps,
    store: MemoryStore,
    allow: bool | Callable[[CheckClientWrite], bool] = True,
    log: list[ops.Op] | None = None,
) -> Any:
    """Run a built-in to completion: execute each yielded op, answer
    ``CheckClientWrite`` with ``allow``, return the generator's return value."""
    try:
        op = next(steps)
        while True:
            if log is not None:
                log.append(op)
            if isinstance(op, CheckClientWrite):
                result: Any = allow(op) if callable(allow) else allow
            else:
                result = store.apply(op)
            op = steps.send(result)
    except StopIteration as stop:
        return stop.value


def run(
    store: MemoryStore,
    command: str,
    connection_id: str,
    payload: Any,
    allow: bool | Callable[[CheckClientWrite], bool] = True,
) -> Any:
    return drive(BUILTINS[command](connection_id, payload), store, allow)


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore()
    s.apply(ops.RegisterConnection("c1", "i1", {"name": "alice"}))
    s.apply(ops.RegisterConnection("c2", "i1", {"name": "bob"}))
    s.apply(ops.RegisterConnection("c3", "i2"))  # no metadata, other instance
    return s


def conn_meta(store: MemoryStore, cid: str) -> Any:
    (value,) = store.apply(ops.GetMetadata("connection", (cid,)))
    return value


def test_the_builtin_table() -> None:
    assert set(BUILTINS) == {
        "mesh/noop",
        "mesh/join-room",
        "mesh/leave-room",
        "mesh/get-connection-metadata",
        "mesh/get-my-connection-metadata",
        "mesh/set-my-connection-metadata",
        "mesh/get-room-metadata",
        "mesh/subscribe-presence",
        "mesh/unsubscribe-presence",
        "mesh/publish-presence-state",
        "mesh/clear-presence-state",
        "mesh/get-presence-state",
        # issue 12: channels
        "mesh/subscribe-channel",
        "mesh/unsubscribe-channel",
        "mesh/get-channel-history",
        # issue 13: records and collections
        "mesh/subscribe-record",
        "mesh/unsubscribe-record",
        "mesh/publish-record-update",
        "mesh/subscribe-collection",
        "mesh/unsubscribe-collection",
    }


@pytest.mark.parametrize("payload", [{}, None, [], "x"])
def test_noop(store: MemoryStore, payload: Any) -> None:
    log: list[ops.Op] = []
    assert drive(BUILTINS["mesh/noop"]("c1", payload), store, log=log) is True
    assert log == []


# -- rooms ----------------------------------------------------------------------


def test_join_room_returns_present_including_joiner(store: MemoryStore) -> None:
    assert run(store, "mesh/join-room", "c1", {"roomName": "lobby"}) == {
        "success": True,
        "present": [{"id": "c1", "metadata": {"name": "alice"}}],
    }
    assert run(store, "mesh/join-room", "c3", {"roomName": "lobby"}) == {
        "success": True,
        "present": [
            {"id": "c1", "metadata": {"name": "alice"}},
            {"id": "c3", "metadata": None},
        ],
    }
    assert store.apply(ops.IsInRoom("lobby", "c3")) is True
    assert store.apply(ops.GetConnectionRooms("c3")) == ["lobby"]


def test_join_room_twice_is_idempotent(store: MemoryStore) -> None:
    run(store, "mesh/join-room", "c1", {"roomName": "r"})
    result = run(store, "mesh/join-room", "c1", {"roomName": "r"})
    assert result == {"success": True, "present": [{"id": "c1", "metadata": {"name": "alice"}}]}
    assert store.apply(ops.GetRoomMembers("r")) == ["c1"]


def test_join_room_ignores_extra_fields(store: MemoryStore) -> None:
    result = run(store, "mesh/join-room", "c2", {"roomName": "r", "extra": 1})
    assert result == {"success": True, "present": [{"id": "c2", "metadata": {"name": "bob"}}]}


def test_join_room_emits_add_then_read(store: MemoryStore) -> None:
    log: list[ops.Op] = []
    drive(BUILTINS["mesh/join-room"]("c1", {"roomName": "r"}), store, log=log)
    assert log == [ops.AddToRoom("r", "c1"), ops.GetRoomMembersMetadata("r")]


def test_leave_room(store: MemoryStore) -> None:
    run(store, "mesh/join-room", "c1", {"roomName": "r"})
    run(store, "mesh/join-room", "c2", {"roomName": "r"})
    assert run(store, "mesh/leave-room", "c1", {"roomName": "r"}) == {"success": True}
    assert store.apply(ops.GetRoomMembers("r")) == ["c2"]
    assert store.apply(ops.GetConnectionRooms("c1")) == []


def test_leave_room_not_a_member_still_succeeds(store: MemoryStore) -> None:
    assert run(store, "mesh/leave-room", "c1", {"roomName": "nowhere"}) == {"success": True}
    assert store.apply(ops.GetAllRooms()) == []


# -- connection metadata --------------------------------------------------------


def test_get_connection_metadata_of_another_connection(store: MemoryStore) -> None:
    assert run(store, "mesh/get-connection-metadata", "c1", {"connectionId": "c2"}) == {
        "metadata": {"name": "bob"}
    }


def test_get_connection_metadata_on_another_instance(store: MemoryStore) -> None:
    store.apply(ops.UpdateMetadata("connection", "c3", lambda old: {"far": True}))
    assert run(store, "mesh/get-connection-metadata", "c1", {"connectionId": "c3"}) == {
        "metadata": {"far": True}
    }


def test_get_connection_metadata_unknown_is_null(store: MemoryStore) -> None:
    assert run(store, "mesh/get-connection-metadata", "c1", {"connectionId": "ghost"}) == {
        "metadata": None
    }


def test_get_connection_metadata_gone_is_null(store: MemoryStore) -> None:
    store.apply(ops.UnregisterConnection("c2", "i1"))
    assert run(store, "mesh/get-connection-metadata", "c1", {"connectionId": "c2"}) == {
        "metadata": None
    }


def test_get_my_connection_metadata(store: MemoryStore) -> None:
    assert run(store, "mesh/get-my-connection-metadata", "c1", {}) == {
        "metadata": {"name": "alice"}
    }
    assert run(store, "mesh/get-my-connection-metadata", "c3", {}) == {"metadata": None}


def test_get_my_connection_metadata_ignores_payload(store: MemoryStore) -> None:
    assert run(store, "mesh/get-my-connection-metadata", "c2", None) == {
        "metadata": {"name": "bob"}
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (None, {"b": {"y": 2}}),
        ({}, {"b": {"y": 2}}),
        ({"strategy": "replace"}, {"b": {"y": 2}}),
        ({"strategy": "merge"}, {"a": 1, "b": {"y": 2}}),
        ({"strategy": "deepMerge"}, {"a": 1, "b": {"x": 1, "y": 2}}),
    ],
    ids=["none", "empty", "replace", "merge", "deepMerge"],
)
def test_set_my_connection_metadata_strategies(
    store: MemoryStore, options: Any, expected: Any
) -> None:
    store.apply(ops.UpdateMetadata("connection", "c1", lambda old: {"a": 1, "b": {"x": 1}}))
    payload: dict[str, Any] = {"metadata": {"b": {"y": 2}}}
    if options is not None:
        payload["options"] = options
    assert run(store, "mesh/set-my-connection-metadata", "c1", payload) == {"success": True}
    assert conn_meta(store, "c1") == expected
    # the others are untouched
    assert conn_meta(store, "c2") == {"name": "bob"}


def test_set_my_connection_metadata_options_null(store: MemoryStore) -> None:
    payload = {"metadata": {"k": 1}, "options": None}
    assert run(store, "mesh/set-my-connection-metadata", "c1", payload) == {"success": True}
    assert conn_meta(store, "c1") == {"k": 1}


def test_set_my_connection_metadata_null_value_stores_null(store: MemoryStore) -> None:
    payload = {"metadata": None}
    assert run(store, "mesh/set-my-connection-metadata", "c1", payload) == {"success": True}
    assert conn_meta(store, "c1") is None
    assert ("c1", None) in store.apply(ops.GetAllMetadata("connection"))


def test_set_my_connection_metadata_then_get_my(store: MemoryStore) -> None:
    payload = {"metadata": {"status": "away", "n": [1, 2]}}
    run(store, "mesh/set-my-connection-metadata", "c3", payload)
    assert run(store, "mesh/get-my-connection-metadata", "c3", {}) == {
        "metadata": {"status": "away", "n": [1, 2]}
    }


def test_set_my_connection_metadata_asks_the_policy(store: MemoryStore) -> None:
    seen: list[CheckClientWrite] = []

    def allow(op: CheckClientWrite) -> bool:
        seen.append(op)
        return True

    payload = {"metadata": {"a": 1}, "options": {"strategy": "merge"}}
    assert run(store, "mesh/set-my-connection-metadata", "c2", payload, allow) == {"success": True}
    assert seen == [CheckClientWrite("c2", {"a": 1}, "merge")]
    assert conn_meta(store, "c2") == {"name": "bob", "a": 1}


def test_set_my_connection_metadata_denied_stores_nothing(store: MemoryStore) -> None:
    log: list[ops.Op] = []
    payload = {"metadata": {"evil": True}}
    steps = BUILTINS["mesh/set-my-connection-metadata"]("c1", payload)
    assert drive(steps, store, allow=False, log=log) == {"success": False}
    assert conn_meta(store, "c1") == {"name": "alice"}
    assert not any(isinstance(op, ops.UpdateMetadata) for op in log)


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "bogus"},
        {"strategy": "Replace"},
        {"strategy": None},
        {"strategy": 1},
        "merge",
        ["merge"],
    ],
)
def test_set_my_connection_metadata_bad_strategy(store: MemoryStore, options: Any) -> None:
    log: list[ops.Op] = []
    payload = {"metadata": {"x": 1}, "options": options}
    with pytest.raises(ValidationError) as info:
        drive(BUILTINS["mesh/set-my-connection-metadata"]("c1", payload), store, log=log)
    assert info.value.code == "EINVAL"
    # refused before asking the policy or touching the store
    assert log == []
    assert conn_meta(store, "c1") == {"name": "alice"}


@pytest.mark.parametrize("payload", [None, {}, [], "x", {"options": {"strategy": "merge"}}])
def test_set_my_connection_metadata_requires_metadata(store: MemoryStore, payload: Any) -> None:
    with pytest.raises(ValidationError) as info:
        run(store, "mesh/set-my-connection-metadata", "c1", payload)
    assert info.value.code == "EINVAL"
    assert conn_meta(store, "c1") == {"name": "alice"}


# -- room metadata --------------------------------------------------------------


def test_get_room_metadata_none(store: MemoryStore) -> None:
    assert run(store, "mesh/get-room-metadata", "c1", {"roomName": "r"}) == {"metadata": None}


def test_get_room_metadata(store: MemoryStore) -> None:
    store.apply(ops.UpdateMetadata("room", "r", lambda old: {"topic": "hi", "n": 1.5}))
    assert run(store, "mesh/get-room-metadata", "c2", {"roomName": "r"}) == {
        "metadata": {"topic": "hi", "n": 1.5}
    }


# -- payload validation ---------------------------------------------------------

ROOM_COMMANDS = ["mesh/join-room", "mesh/leave-room", "mesh/get-room-metadata"]
BAD_ROOM_PAYLOADS: list[Any] = [
    None,
    {},
    [],
    "lobby",
    ["lobby"],
    {"roomname": "lobby"},
    {"roomName": ""},
    {"roomName": None},
    {"roomName": 5},
    {"roomName": ["lobby"]},
]


@pytest.mark.parametrize("command", ROOM_COMMANDS)
@pytest.mark.parametrize("payload", BAD_ROOM_PAYLOADS)
def test_bad_room_payloads(store: MemoryStore, command: str, payload: Any) -> None:
    log: list[ops.Op] = []
    with pytest.raises(ValidationError) as info:
        drive(BUILTINS[command]("c1", payload), store, log=log)
    assert info.value.code == "EINVAL"
    assert "roomName" in str(info.value)
    assert log == []
    assert store.apply(ops.GetAllRooms()) == []


@pytest.mark.parametrize(
    "payload", [None, {}, "c2", {"connectionId": ""}, {"connectionId": 2}, {"id": "c2"}]
)
def test_bad_get_connection_metadata_payloads(store: MemoryStore, payload: Any) -> None:
    with pytest.raises(ValidationError) as info:
        run(store, "mesh/get-connection-metadata", "c1", payload)
    assert info.value.code == "EINVAL"
    assert "connectionId" in str(info.value)

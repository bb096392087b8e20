"""The built-in ``mesh/*`` commands (PROTOCOL.md section 6), written once.

Each is a generator: it yields storage operations (:mod:`mesh_core._ops`)
and is resumed with their results, and returns the response payload. The
adapter drives it on whatever runtime and store it has; the core's tests
drive it synchronously against the in-memory store. A raised
:class:`~mesh_core.MeshError` becomes the error payload.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from .._errors import ValidationError
from ..storage import _ops as ops
from ..storage._strategies import check_strategy, updater
from ._presence import PRESENCE_BUILTINS

__all__ = ["BUILTINS", "Builtin", "CheckClientWrite", "Steps"]

#: What a built-in is: yields operations, receives results, returns a payload.
Steps = Generator[ops.Op, Any, Any]
Builtin = Callable[[str, Any], Steps]


@dataclass(frozen=True, slots=True)
class CheckClientWrite(ops.Op):
    """Ask the server's client-write policy whether connection
    ``connection_id`` may store ``value`` with ``strategy``. Result: bool.
    Executed by the server, not the store (the policy is application code)."""

    connection_id: str
    value: Any
    strategy: str


def _field(payload: Any, name: str) -> str:
    value = payload.get(name) if isinstance(payload, dict) else None
    if not isinstance(value, str) or not value:
        raise ValidationError(f"payload.{name} must be a non-empty string")
    return value


def noop(connection_id: str, payload: Any) -> Steps:
    return True
    yield  # pragma: no cover - makes this a generator


def join_room(connection_id: str, payload: Any) -> Steps:
    room = _field(payload, "roomName")
    yield ops.AddToRoom(room, connection_id)
    members = yield ops.GetRoomMembersMetadata(room)
    present = [{"id": cid, "metadata": meta} for cid, meta in members]
    return {"success": True, "present": present}


def leave_room(connection_id: str, payload: Any) -> Steps:
    room = _field(payload, "roomName")
    yield ops.RemoveFromRoom(room, connection_id)
    return {"success": True}


def get_connection_metadata(connection_id: str, payload: Any) -> Steps:
    target = _field(payload, "connectionId")
    (metadata,) = yield ops.GetMetadata("connection", (target,))
    return {"metadata": metadata}


def get_my_connection_metadata(connection_id: str, payload: Any) -> Steps:
    (metadata,) = yield ops.GetMetadata("connection", (connection_id,))
    return {"metadata": metadata}


def set_my_connection_metadata(connection_id: str, payload: Any) -> Steps:
    if not isinstance(payload, dict) or "metadata" not in payload:
        raise ValidationError("payload.metadata is required")
    value = payload["metadata"]
    options = payload.get("options")
    if options is None:
        strategy: Any = "replace"
    elif isinstance(options, dict):
        strategy = options.get("strategy", "replace")
    else:
        raise ValidationError("payload.options must be an object")
    check_strategy(strategy)
    allowed = yield CheckClientWrite(connection_id, value, strategy)
    if not allowed:
        return {"success": False}
    yield ops.UpdateMetadata("connection", connection_id, updater(strategy, value), strategy, value)
    return {"success": True}


def get_room_metadata(connection_id: str, payload: Any) -> Steps:
    room = _field(payload, "roomName")
    (metadata,) = yield ops.GetMetadata("room", (room,))
    return {"metadata": metadata}


BUILTINS: dict[str, Builtin] = {
    "mesh/noop": noop,
    "mesh/join-room": join_room,
    "mesh/leave-room": leave_room,
    "mesh/get-connection-metadata": get_connection_metadata,
    "mesh/get-my-connection-metadata": get_my_connection_metadata,
    "mesh/set-my-connection-metadata": set_my_connection_metadata,
    "mesh/get-room-metadata": get_room_metadata,
    **PRESENCE_BUILTINS,
}

"""The built-in ``mesh/*`` commands (PROTOCOL.md section 6), written once.

Each is a generator: it yields storage operations (:mod:`mesh_core._ops`)
and is resumed with their results, and returns the response payload. The
adapter drives it on whatever runtime and store it has; the core's tests
drive it synchronously against the in-memory store. A raised
:class:`~mesh_core.MeshError` becomes the error payload.

Each built-in is registered in :data:`BUILTINS` as a :class:`BuiltinCommand`
that also declares what the server must know to schedule it (whether it
touches the store, which application policies run on its path). A new
capability (presence, channels, records) adds its generators and their
records here, its operations in :mod:`mesh_core.storage._ops`, and nothing in
the server's dispatch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import ValidationError
from ..storage import _ops as ops
from ..storage._strategies import check_strategy, updater
from ._channels import get_channel_history, subscribe_channel, unsubscribe_channel
from ._collections import COLLECTION_BUILTINS
from ._payload import field
from ._records import RECORD_BUILTINS

if TYPE_CHECKING:
    from ._app import Context
from ._presence import PRESENCE_BUILTINS, PRESENCE_GUARDED

__all__ = ["BUILTINS", "Builtin", "BuiltinCommand", "CheckClientWrite", "Steps"]

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


@dataclass(frozen=True, slots=True)
class BuiltinCommand:
    """A built-in and what the server needs to know about it: whether it can
    be answered inline (no task) depends on these flags and on the store."""

    #: the generator (every built-in but those of records and collections)
    steps: Builtin | None = None
    #: or an ``async def handler(ctx)``, as an application command is
    handler: Callable[[Context], Awaitable[Any]] | None = None
    #: yields no storage operation: answered inline on any store
    storeless: bool = False
    #: the application's ``client_metadata_writes`` policy runs on its path
    writes_policed: bool = False
    #: the application's ``client_metadata_reads`` policy runs on its path
    reads_policed: bool = False
    #: may wait whatever the store (application guards, a subscription
    #: being made): never answered inline
    waits: bool = False

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.handler is None):
            raise TypeError("a built-in has either steps or a handler")

    def __call__(self, connection_id: str, payload: Any) -> Steps:
        assert self.steps is not None, "a handler built-in runs with a Context"
        return self.steps(connection_id, payload)


_field = field


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


BUILTINS: dict[str, BuiltinCommand] = {
    "mesh/noop": BuiltinCommand(noop, storeless=True),
    "mesh/join-room": BuiltinCommand(join_room, reads_policed=True),
    "mesh/leave-room": BuiltinCommand(leave_room),
    "mesh/get-connection-metadata": BuiltinCommand(get_connection_metadata, reads_policed=True),
    "mesh/get-my-connection-metadata": BuiltinCommand(get_my_connection_metadata),
    "mesh/set-my-connection-metadata": BuiltinCommand(
        set_my_connection_metadata, writes_policed=True
    ),
    "mesh/get-room-metadata": BuiltinCommand(get_room_metadata),
    # channels (mesh_core/app/_channels.py)
    "mesh/subscribe-channel": BuiltinCommand(subscribe_channel, waits=True),
    "mesh/unsubscribe-channel": BuiltinCommand(unsubscribe_channel, waits=True),
    "mesh/get-channel-history": BuiltinCommand(get_channel_history, waits=True),
}


BUILTINS.update(
    {
        name: BuiltinCommand(
            steps,
            # the subscribe snapshot shows other connections' metadata
            reads_policed=name == "mesh/subscribe-presence",
            # a presence guard is application code that may wait
            waits=name in PRESENCE_GUARDED,
        )
        for name, steps in PRESENCE_BUILTINS.items()
    }
)

# records and collections (mesh_core/app/_records.py, _collections.py):
# handlers of a Context, which may wait on application guards and resolvers
BUILTINS.update(
    {
        name: BuiltinCommand(handler=handler, waits=True)
        for name, handler in {**RECORD_BUILTINS, **COLLECTION_BUILTINS}.items()
    }
)

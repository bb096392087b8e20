"""Storage operations as plain data.

Built-in commands and the server API are written once, in the core, as logic
that emits these operations; a storage driver executes them (an in-memory
dict, a Redis pipeline, ...) and the logic resumes with the result. The
driver decides nothing about semantics: strategies come from
:mod:`mesh_core._strategies`, and an atomic update carries its own function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "AddToRoom",
    "ClearRoom",
    "DeleteRoom",
    "DeletePresenceState",
    "DeleteRoomMetadata",
    "GetAllConnectionIds",
    "GetAllMetadata",
    "GetAllRooms",
    "GetConnectionRooms",
    "GetMetadata",
    "GetPresenceStates",
    "GetPresent",
    "GetRoomMembers",
    "GetRoomMembersMetadata",
    "HANDLER_NAMES",
    "IsInRoom",
    "JoinPresent",
    "MarkAbsent",
    "MarkPresent",
    "MessageCallback",
    "Op",
    "Publish",
    "PublishMessage",
    "RegisterConnection",
    "RemoveFromRoom",
    "Scope",
    "StorePresenceState",
    "Subscribe",
    "UnknownConnection",
    "UnregisterConnection",
    "UNCHANGED",
    "Unsubscribe",
    "UpdateMetadata",
    "handlers",
    "presence_channel",
    "presence_update",
]

Scope = Literal["connection", "room"]


class _Unchanged:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


#: Return this from an ``update_metadata`` function to write nothing (the
#: result is then the value as it was).
UNCHANGED: Any = _Unchanged()


class UnknownConnection(LookupError):
    """Raised by a driver when connection metadata is written for an id that no
    instance holds (writing would resurrect a cleaned-up connection)."""

    code = "ENOCONN"


@dataclass(frozen=True, slots=True)
class Op:
    """Base class of every storage operation."""


@dataclass(frozen=True, slots=True)
class RegisterConnection(Op):
    """Record that ``instance_id`` holds ``connection_id``; ``metadata`` is
    stored unless it is ``None`` (no metadata yet)."""

    connection_id: str
    instance_id: str
    metadata: Any = None


@dataclass(frozen=True, slots=True)
class UnregisterConnection(Op):
    """Remove a connection from every room, its metadata and the registry.
    Result: the rooms it was in."""

    connection_id: str
    instance_id: str


@dataclass(frozen=True, slots=True)
class GetMetadata(Op):
    """Result: one value per key, ``None`` where there is none."""

    scope: Scope
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GetAllMetadata(Op):
    """Result: ``[(key, metadata), ...]`` for every key of the scope that has
    metadata (connections: every registered connection)."""

    scope: Scope


@dataclass(frozen=True, slots=True)
class UpdateMetadata(Op):
    """Atomic read-modify-write: store ``update(old)``. Result: the new value
    (if ``update`` returns :data:`UNCHANGED`, nothing is written and the
    result is the old value).

    ``strategy``/``value`` say what ``update`` does when it is a plain
    strategy (so a driver may skip the read for ``replace``); ``update`` is
    always authoritative. Raises :class:`UnknownConnection` for a connection
    that is not registered."""

    scope: Scope
    key: str
    update: Callable[[Any], Any]
    strategy: str | None = None
    value: Any = None


@dataclass(frozen=True, slots=True)
class DeleteRoomMetadata(Op):
    room: str


@dataclass(frozen=True, slots=True)
class AddToRoom(Op):
    """Result: ``True`` if the connection was not already a member."""

    room: str
    connection_id: str


@dataclass(frozen=True, slots=True)
class RemoveFromRoom(Op):
    """Result: ``True`` if the connection was a member."""

    room: str
    connection_id: str


@dataclass(frozen=True, slots=True)
class IsInRoom(Op):
    room: str
    connection_id: str


@dataclass(frozen=True, slots=True)
class GetRoomMembers(Op):
    room: str


@dataclass(frozen=True, slots=True)
class GetRoomMembersMetadata(Op):
    """Result: ``[(connection_id, metadata), ...]`` for the room's members."""

    room: str


@dataclass(frozen=True, slots=True)
class GetConnectionRooms(Op):
    connection_id: str


@dataclass(frozen=True, slots=True)
class GetAllRooms(Op):
    """Result: the names of rooms that have at least one member."""


@dataclass(frozen=True, slots=True)
class GetAllConnectionIds(Op):
    """Result: ``[(connection_id, instance_id), ...]`` across all instances."""


@dataclass(frozen=True, slots=True)
class ClearRoom(Op):
    """Remove every member; keep the room's metadata. Result: removed ids."""

    room: str


@dataclass(frozen=True, slots=True)
class DeleteRoom(Op):
    """Remove every member and the room's metadata. Result: removed ids."""

    room: str


@dataclass(frozen=True, slots=True)
class Publish(Op):
    """Deliver an encoded frame to connections held by *other* instances.

    ``connection_ids`` lists the targets; the driver looks their owners up,
    groups them and sends each owner one message (PROTOCOL.md section 8)."""

    connection_ids: tuple[str, ...]
    command: str
    payload: Any


# -- publish/subscribe on named channels ----------------------------------------
#
# The store's own message bus, shared by every instance on the store: live
# channel messages, presence updates, record changes. On Redis a channel is a
# Redis pub/sub channel of the same name (``PUBLISH <channel> <data>``), so
# reference instances on that Redis see the same bytes. A driver keeps at most
# one subscription per channel per instance; counting local subscribers (and
# subscribing only for the first, unsubscribing after the last) is the core's
# job (:class:`mesh_core.app.PubSub`), not the driver's.

#: ``callback(channel, data)``: called by the driver, on the event loop, for
#: every message published on a channel the instance subscribed to. ``data``
#: is always ``bytes`` (a ``str`` published is UTF-8 encoded). It must not
#: block or raise (a raise is logged and delivery goes on).
MessageCallback = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True)
class Subscribe(Op):
    """Have ``callback`` called for every message published on ``channel``
    (by any instance sharing the store) from now on, for instance
    ``instance_id``. Result: ``None``, once the subscription is in place (on
    Redis: confirmed), so a message published after it returns is delivered.
    Subscribing again replaces the callback. Survives a reconnect of the
    store; messages published while the store was unreachable are lost (as
    with any pub/sub). Raises ``RedisUnavailable`` if it cannot be made."""

    channel: str
    instance_id: str
    callback: MessageCallback


@dataclass(frozen=True, slots=True)
class Unsubscribe(Op):
    """End ``instance_id``'s subscription to ``channel`` (nothing if there is
    none). Result: ``None``. Never fails for an unreachable store: the
    subscription is forgotten at once, so it is not renewed on reconnect."""

    channel: str
    instance_id: str


@dataclass(frozen=True, slots=True)
class PublishMessage(Op):
    """Deliver ``data`` to every subscription to ``channel``, on every
    instance (this one included, if it subscribed). Result: ``None``.
    Messages one publisher sends on one channel arrive in order."""

    channel: str
    data: bytes | str


#: The method of a storage driver that carries out each operation: every
#: driver names its methods so, and builds its dispatch table with
#: :func:`handlers` (a driver missing one fails when it is created).
HANDLER_NAMES: dict[type[Op], str] = {
    RegisterConnection: "_register",
    UnregisterConnection: "_unregister",
    GetMetadata: "_get_metadata",
    GetAllMetadata: "_get_all_metadata",
    UpdateMetadata: "_update_metadata",
    DeleteRoomMetadata: "_delete_room_metadata",
    AddToRoom: "_add_to_room",
    RemoveFromRoom: "_remove_from_room",
    IsInRoom: "_is_in_room",
    GetRoomMembers: "_get_room_members",
    GetRoomMembersMetadata: "_get_room_members_metadata",
    GetConnectionRooms: "_get_connection_rooms",
    GetAllRooms: "_get_all_rooms",
    GetAllConnectionIds: "_get_all_connection_ids",
    ClearRoom: "_clear_room",
    DeleteRoom: "_delete_room",
    Publish: "_publish",
    Subscribe: "_subscribe",
    Unsubscribe: "_unsubscribe",
    PublishMessage: "_publish_message",
}


def handlers(driver: object) -> dict[type[Op], Callable[[Any], Any]]:
    """``driver``'s bound method for each operation (see :data:`HANDLER_NAMES`)."""
    return {op: getattr(driver, name) for op, name in HANDLER_NAMES.items()}


# -- presence --------------------------------------------------------------------
#
# Who is present in a tracked room, and each member's small state. On Redis the
# layout is the reference's (PROTOCOL.md, presence): a set of present ids per
# room, an empty-string key per member (with the room's TTL, when it has one),
# a JSON key per member state. Which rooms are tracked, who publishes what
# event, and every timer are the core's (mesh_core.app._presence); a driver
# only stores. A write may carry ``announce``: an update the core decided to
# publish on :func:`presence_channel` of the room, sent in the same round trip
# as the write (a ``PUBLISH`` in its pipeline), after it.


def presence_channel(room: str) -> str:
    """The bus channel a room's presence updates are published on (on Redis
    the channel of that name, shared with reference instances)."""
    return f"mesh:presence:updates:{room}"


def presence_update(
    kind: Literal["join", "leave", "state"],
    connection_id: str,
    room: str,
    timestamp: int,
    state: Any = None,
) -> dict[str, Any]:
    """The payload of a ``mesh/presence-update`` push (and of the message on
    :func:`presence_channel`), keys in the reference's order."""
    if kind == "state":
        return {
            "type": kind,
            "connectionId": connection_id,
            "roomName": room,
            "state": state,
            "timestamp": timestamp,
        }
    return {"type": kind, "connectionId": connection_id, "roomName": room, "timestamp": timestamp}


@dataclass(frozen=True, slots=True)
class MarkPresent(Op):
    """Record ``connection_id`` as present in ``room`` (its member key gets an
    expiry of ``ttl_ms`` when given, as the reference writes it). Also the
    refresh a member's pong makes. Result: ``True`` if the id was not in the
    room's present set (a first join, or a member whose entry vanished)."""

    room: str
    connection_id: str
    ttl_ms: int | None = None
    announce: bytes | None = None


@dataclass(frozen=True, slots=True)
class JoinPresent(MarkPresent):
    """:class:`AddToRoom` and :class:`MarkPresent` at once (a join of a
    tracked room: one round trip). Result: :class:`AddToRoom`'s."""


@dataclass(frozen=True, slots=True)
class MarkAbsent(Op):
    """Remove ``connection_id`` from the room's present set, with its member
    key and its state. Result: ``True`` if it was in the set."""

    room: str
    connection_id: str
    announce: bytes | None = None


@dataclass(frozen=True, slots=True)
class GetPresent(Op):
    """Result: the ids in the room's present set."""

    room: str


@dataclass(frozen=True, slots=True)
class StorePresenceState(Op):
    """Store a member's state (``state`` is its JSON text), expiring after
    ``expire_after_ms`` when given. Result: ``None``."""

    room: str
    connection_id: str
    state: bytes
    expire_after_ms: int | None = None
    announce: bytes | None = None


@dataclass(frozen=True, slots=True)
class DeletePresenceState(Op):
    """Result: ``True`` if the member had a stored state."""

    room: str
    connection_id: str
    announce: bytes | None = None


@dataclass(frozen=True, slots=True)
class GetPresenceStates(Op):
    """Result: one decoded state per id, ``None`` where there is none."""

    room: str
    connection_ids: tuple[str, ...]


HANDLER_NAMES.update(
    {
        MarkPresent: "_mark_present",
        JoinPresent: "_join_present",
        MarkAbsent: "_mark_absent",
        GetPresent: "_get_present",
        StorePresenceState: "_store_presence_state",
        DeletePresenceState: "_delete_presence_state",
        GetPresenceStates: "_get_presence_states",
    }
)

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
    "ChannelHistory",
    "ClearRoom",
    "DeleteRoom",
    "DeletePresenceState",
    "DeleteRoomMetadata",
    "GetAllConnectionIds",
    "GetAllMetadata",
    "GetAllRooms",
    "GetChannelHistory",
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
    "OFFSETS_PREFIX",
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
    "WriteChannel",
    "handlers",
    "presence_channel",
    "presence_update",
    "offsets_channel",
    "offsets_envelope",
    "split_envelope",
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


# -- channels with history ------------------------------------------------------
#
# A channel's kept messages are the reference's list (``mesh:history:<channel>``
# on Redis, RPUSH then LTRIM -N -1). Each message written by our instances
# with history also gets the channel's next *offset* (1, 2, ...), and the
# channel an *epoch* (a random id, new whenever the store lost the channel's
# state), in the same atomic step as the list write. It is then published
# twice, back to back: ``<offset>:<epoch>:<message>`` on
# :func:`offsets_channel` (read by our instances) and the bare message on the
# channel itself (read by reference instances; ours drop that copy).

#: where our instances announce a message with its offset (``mesh:``: never
#: exposable, so no client can subscribe to it directly)
OFFSETS_PREFIX = "mesh:channel:"


def offsets_channel(channel: str) -> str:
    return OFFSETS_PREFIX + channel


def offsets_envelope(offset: int, epoch: str, message: bytes) -> bytes:
    return b"%d:%s:%s" % (offset, epoch.encode(), message)


def split_envelope(data: bytes) -> tuple[int, str, bytes]:
    """``(offset, epoch, message)`` of an :func:`offsets_envelope`; raises
    ``ValueError`` if it is not one."""
    offset, epoch, message = data.split(b":", 2)
    return int(offset), epoch.decode(), message


@dataclass(frozen=True, slots=True)
class WriteChannel(Op):
    """In one atomic step: give ``message`` the channel's next offset (and
    the channel an epoch, ``epoch`` being the one to use if it has none),
    append it to the channel's history keeping the last ``history`` (>= 1),
    and publish it as described above. Result: ``(offset, epoch)``."""

    channel: str
    message: str
    history: int
    epoch: str


@dataclass(frozen=True, slots=True)
class ChannelHistory:
    """What :class:`GetChannelHistory` read, in one atomic step.

    ``messages`` oldest first; ``offset`` is the offset of the last of them
    (``None`` when there are none, or when a writer that assigns no offsets,
    a reference instance, appended since our last write); ``last`` is the
    channel's last offset and ``epoch`` its epoch (``None``: never written
    with history). ``recovered`` (only with ``since``): ``True`` if
    ``messages`` are exactly every message after ``since``, ``False`` if some
    are missing (trimmed away, more than ``limit``, another epoch)."""

    messages: list[str]
    offset: int | None
    last: int
    epoch: str | None
    recovered: bool | None = None


@dataclass(frozen=True, slots=True)
class GetChannelHistory(Op):
    """Result: a :class:`ChannelHistory`. Without ``since``: the latest
    ``limit`` kept messages. With ``since`` (an offset, and the ``epoch`` it
    belongs to, if known): the kept messages after it that have an offset,
    at most the latest ``limit`` (never one the reader had), and
    ``recovered=False`` when that is not every message written after it
    (trimmed away, over ``limit``, written by a reference instance); with
    another epoch, the latest ``limit``. ``limit=0`` reads only the position.
    The rules: :func:`mesh_core.storage._memory_channels.plan_read`."""

    channel: str
    limit: int
    since: int | None = None
    epoch: str | None = None


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
    WriteChannel: "_write_channel",
    GetChannelHistory: "_get_channel_history",
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


# -- records -------------------------------------------------------------------
#
# Records are JSON values with a version (PROTOCOL.md, records section). A
# driver stores value and version together and changes them in one atomic
# step; every write that changes the value bumps the version by exactly one
# and is announced, in version order, on :data:`RECORD_UPDATES` (the full
# value and the RFC 6902 patch from the previous value) and, as the bare id,
# on :data:`COLLECTION_RECORD_CHANGE`. The message shapes are the reference's,
# so instances of both kinds on one Redis hear each other.

#: the channel record updates and deletions are announced on
RECORD_UPDATES = "mesh:record-updates"
#: the channel every changed record id is announced on (collections listen)
COLLECTION_RECORD_CHANGE = "mesh:collection:record-change"


@dataclass(frozen=True, slots=True)
class RecordWritten:
    """The result of :class:`WriteRecord`: the stored value and its version.
    ``changed`` is false when the write left the value as it was (then
    nothing was stored or announced and the version did not move)."""

    value: Any
    version: int
    changed: bool


@dataclass(frozen=True, slots=True)
class GetRecords(Op):
    """Result: ``[(value, version), ...]`` per id, read atomically per id
    (``(None, 0)`` for a record that does not exist)."""

    record_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WriteRecord(Op):
    """Atomic read-modify-write of one record: store ``update(old)`` (``old``
    is ``None`` for a record that does not exist) with version + 1 and
    announce it. ``update`` may raise to refuse the write (nothing is
    stored) and may be called again if another instance got in first.
    Result: :class:`RecordWritten`."""

    record_id: str
    update: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class DeleteRecord(Op):
    """Delete value and version, announce ``{recordId, deleted, version}``.
    Result: ``(old value, last version)``, or ``None`` if there was none."""

    record_id: str


@dataclass(frozen=True, slots=True)
class ListRecords(Op):
    """Result: ``[(record_id, value), ...]`` for every record whose id
    matches the glob ``pattern`` (Redis ``MATCH`` syntax), sorted by id."""

    pattern: str


@dataclass(frozen=True, slots=True)
class SetCollectionIds(Op):
    """Remember the record ids a collection subscriber last saw
    (``mesh:collection:<collection>:<connection>``); ``ids=None`` forgets
    them."""

    collection_id: str
    connection_id: str
    ids: tuple[str, ...] | None


def record_update_message(
    record_id: str, value_json: bytes, patch_json: bytes, version: int
) -> bytes:
    """The :data:`RECORD_UPDATES` message for a write, assembled from JSON
    texts (the Redis script builds the very same bytes)."""
    return b"".join(
        (
            b'{"recordId":',
            _json(record_id),
            b',"newValue":',
            value_json,
            b',"patch":',
            patch_json,
            b',"version":',
            str(version).encode(),
            b"}",
        )
    )


def record_deleted_message(record_id: str, version: int) -> bytes:
    return b'{"recordId":%s,"deleted":true,"version":%d}' % (_json(record_id), version)


def _json(value: Any) -> bytes:
    import msgspec

    return msgspec.json.encode(value)


HANDLER_NAMES.update(
    {
        MarkPresent: "_mark_present",
        JoinPresent: "_join_present",
        MarkAbsent: "_mark_absent",
        GetPresent: "_get_present",
        StorePresenceState: "_store_presence_state",
        DeletePresenceState: "_delete_presence_state",
        GetPresenceStates: "_get_presence_states",
        GetRecords: "_get_records",
        WriteRecord: "_write_record",
        DeleteRecord: "_delete_record",
        ListRecords: "_list_records",
        SetCollectionIds: "_set_collection_ids",
    }
)

"""Presence: who is in a tracked room, and what each member is doing.

Written once, here, for every store and runtime (PROTOCOL.md, presence):

- :class:`PresenceRules` (``app.track_presence``): which rooms are tracked,
  their TTL and their guard;
- the five built-ins (``mesh/subscribe-presence`` ... ``mesh/get-presence-state``)
  as generators of operations, like the other built-ins;
- :class:`PresenceHub`: this instance's share of the work. It holds the
  presence of the connections *this instance* holds: it marks them present
  when they join a tracked room and gone when they leave or go; it runs their
  TTL (refreshed by their pongs) and their states' ``expireAfter`` on its own
  timers, so no Redis keyspace notification is needed; and it fans the
  updates published on the store's bus out to this instance's subscribers.
- :class:`PresenceAPI` (``server.presence``): reading presence on the server.

Why events are exact. Every change is published once, by the one instance
that decides it: the holder of the member (it knows whether its member was
present), or for a crashed instance's members the sweeping instance (a
``SREM`` reply decides). Every instance subscribes to a room's channel once,
however many of its connections subscribe, and hands each update to each of
its subscribers once. The reference subscribes twice (a channel and a
pattern) and lets every instance react to every key expiry, hence its
duplicates.

Time comes from the server's :class:`~mesh_core.runtime.Runtime`: the core
reads no clock.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from .._errors import MeshError, StorageUnavailable, ValidationError
from ..protocol._frames import encode_json, encode_push
from ..storage import _ops as ops
from ._timers import Timers

if TYPE_CHECKING:
    from ._api import Connection, ConnectionRef
    from ._server import ServerCore

__all__ = [
    "PRESENCE_BUILTINS",
    "PRESENCE_GUARDED",
    "PresenceAPI",
    "PresenceGuard",
    "PresenceHub",
    "PresenceRules",
    "PresenceStep",
    "PresenceTrack",
]

log = logging.getLogger("mesh_core.presence")

#: ``guard(connection, room)`` (sync or async): may this connection see (and
#: publish to) the presence of ``room``?
PresenceGuard = Callable[["Connection", str], Awaitable[bool] | bool]

UPDATE = "mesh/presence-update"
#: the longest ``expireAfter`` taken (about 24 days): Redis ``PX`` and every
#: runtime's timers take it
MAX_EXPIRE_AFTER_MS = 2**31 - 1


# -- which rooms are tracked ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresenceTrack:
    """One ``track_presence`` call: rooms matching ``pattern`` are tracked;
    a member with a ``ttl_ms`` that stops answering pings leaves after it."""

    pattern: str | re.Pattern[str]
    ttl_ms: int | None
    guard: PresenceGuard | None

    def matches(self, room: str) -> bool:
        if isinstance(self.pattern, str):
            return self.pattern == room
        return self.pattern.search(room) is not None


class PresenceRules:
    """The tracked rooms of an app, first match wins (as in the reference)."""

    def __init__(self) -> None:
        self.tracks: list[PresenceTrack] = []
        #: whether a guard (possibly async application code) may run
        self.guarded = False

    def __bool__(self) -> bool:
        return bool(self.tracks)

    def track(
        self,
        pattern: str | re.Pattern[str],
        *,
        ttl: float | None = None,
        guard: PresenceGuard | None = None,
    ) -> None:
        if not isinstance(pattern, (str, re.Pattern)):
            raise TypeError("a presence pattern is a room name or a compiled re.Pattern")
        if isinstance(pattern, str) and not pattern:
            raise ValueError("a presence room name is a non-empty string")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0
        ):
            raise ValueError("ttl is a positive number of milliseconds, or None")
        if guard is not None and not callable(guard):
            raise TypeError("guard must be callable: guard(connection, room) -> bool")
        ttl_ms = None if ttl is None else max(1, math.ceil(ttl))
        self.tracks.append(PresenceTrack(pattern, ttl_ms, guard))
        self.guarded = self.guarded or guard is not None

    def match(self, room: str) -> PresenceTrack | None:
        for track in self.tracks:
            if track.matches(room):
                return track
        return None


# -- the steps the server carries out (application code, timers, the bus) -----


@dataclass(frozen=True, slots=True)
class PresenceStep(ops.Op):
    """An operation a presence built-in yields that the server's
    :class:`PresenceHub` carries out, not the store."""

    room: str
    connection_id: str


@dataclass(frozen=True, slots=True)
class PresenceAllowed(PresenceStep):
    """Result: whether the room is tracked and its guard admits the connection."""


@dataclass(frozen=True, slots=True)
class SubscribeUpdates(PresenceStep):
    """Send the room's updates to the connection from now on. Result: None."""


@dataclass(frozen=True, slots=True)
class UnsubscribeUpdates(PresenceStep):
    """Result: whether the connection was subscribed."""


@dataclass(frozen=True, slots=True)
class SetState(PresenceStep):
    """Store and (unless ``silent``) publish the member's state."""

    state: Any
    expire_after_ms: int | None
    silent: bool


@dataclass(frozen=True, slots=True)
class ClearState(PresenceStep):
    """Remove the member's state; publish ``state: null`` if it had one."""


# -- the built-ins ---------------------------------------------------------------

Steps = Generator[ops.Op, Any, Any]


def _room(payload: Any) -> str:
    room = payload.get("roomName") if isinstance(payload, dict) else None
    if not isinstance(room, str) or not room:
        raise ValidationError("payload.roomName must be a non-empty string")
    return room


def _falsy(value: Any) -> bool:
    """JavaScript's falsiness, which the reference applies to ``state``."""
    if value is None or value is False:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == 0 or value != value  # 0 and NaN
    return isinstance(value, str) and value == ""


def _expire_after(payload: dict[str, Any]) -> int | None:
    value = payload.get("expireAfter")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValidationError("payload.expireAfter must be a number of milliseconds")
    if value <= 0:
        return None  # the reference: no expiry
    if value > MAX_EXPIRE_AFTER_MS:
        raise ValidationError(f"payload.expireAfter must be at most {MAX_EXPIRE_AFTER_MS} ms")
    return max(1, math.ceil(value))


def _states(ids: list[str], values: list[Any]) -> dict[str, Any]:
    return {cid: value for cid, value in zip(ids, values, strict=True) if value is not None}


def subscribe_presence(connection_id: str, payload: Any) -> Steps:
    room = _room(payload)
    if not (yield PresenceAllowed(room, connection_id)):
        return {"success": False, "present": []}
    # subscribed before the snapshot is read: no change falls between the two
    yield SubscribeUpdates(room, connection_id)
    present = yield ops.GetPresent(room)
    ids = tuple(present)
    metadata = (yield ops.GetMetadata("connection", ids)) if ids else []
    states = (yield ops.GetPresenceStates(room, ids)) if ids else []
    return {
        "success": True,
        "present": [{"id": cid, "metadata": meta} for cid, meta in zip(ids, metadata, strict=True)],
        "states": _states(list(ids), states),
    }


def unsubscribe_presence(connection_id: str, payload: Any) -> Steps:
    room = _room(payload)
    return bool((yield UnsubscribeUpdates(room, connection_id)))


def publish_presence_state(connection_id: str, payload: Any) -> Steps:
    room = _room(payload)
    assert isinstance(payload, dict)
    state = payload.get("state")
    if _falsy(state):
        return False
    expire_after = _expire_after(payload)
    silent = not _falsy(payload.get("silent"))
    if not (yield PresenceAllowed(room, connection_id)):
        return False
    if not (yield ops.IsInRoom(room, connection_id)):
        return False
    yield SetState(room, connection_id, state, expire_after, silent)
    return True


def clear_presence_state(connection_id: str, payload: Any) -> Steps:
    room = _room(payload)
    if not (yield PresenceAllowed(room, connection_id)):
        return False
    if not (yield ops.IsInRoom(room, connection_id)):
        return False
    yield ClearState(room, connection_id)
    return True


def get_presence_state(connection_id: str, payload: Any) -> Steps:
    room = _room(payload)
    if not (yield PresenceAllowed(room, connection_id)):
        return {"success": False, "present": []}
    present = list((yield ops.GetPresent(room)))
    states = (yield ops.GetPresenceStates(room, tuple(present))) if present else []
    return {"success": True, "present": present, "states": _states(present, states)}


PRESENCE_BUILTINS = {
    "mesh/subscribe-presence": subscribe_presence,
    "mesh/unsubscribe-presence": unsubscribe_presence,
    "mesh/publish-presence-state": publish_presence_state,
    "mesh/clear-presence-state": clear_presence_state,
    "mesh/get-presence-state": get_presence_state,
}
#: built-ins on whose path a presence guard (application code) runs
PRESENCE_GUARDED = frozenset(PRESENCE_BUILTINS) - {"mesh/unsubscribe-presence"}


# -- this instance's share ---------------------------------------------------------


class _Member:
    """A connection held here, in a tracked room it joined."""

    __slots__ = ("has_state", "present", "seen", "state_version", "ttl_ms")

    def __init__(self, ttl_ms: int | None, now: float) -> None:
        self.ttl_ms = ttl_ms
        self.present = False
        self.seen = now  # the last sign of life: the join, then each pong
        self.has_state = False
        self.state_version = 0


_decode = msgspec.json.decode


class PresenceHub:
    """Presence of the connections this instance holds, its timers, and the
    fan-out of the bus to its subscribers. Driven by :class:`ServerCore`."""

    def __init__(self, server: ServerCore) -> None:
        self._server = server
        self._members: dict[str, dict[str, _Member]] = {}  # connection -> room -> member
        self._subscribers: dict[str, dict[str, None]] = {}  # room -> connections here
        self._subscribed: dict[str, set[str]] = {}  # connection -> rooms it watches
        self._timers = Timers(server)

    @property
    def _rules(self) -> PresenceRules:
        return self._server.app.presence

    def holds(self, connection_id: str) -> bool:
        """Whether a pong of this connection refreshes any presence."""
        return connection_id in self._members

    async def execute(self, step: PresenceStep) -> Any:
        if isinstance(step, PresenceAllowed):
            return await self._allowed(step.room, step.connection_id)
        if isinstance(step, SubscribeUpdates):
            return await self._subscribe(step.room, step.connection_id)
        if isinstance(step, UnsubscribeUpdates):
            return await self._unsubscribe(step.room, step.connection_id)
        if isinstance(step, SetState):
            return await self._set_state(step)
        if isinstance(step, ClearState):
            return await self._clear_state(step.room, step.connection_id)
        raise TypeError(f"not a presence step: {step!r}")

    # -- helpers ----------------------------------------------------------------

    def _now(self) -> float:
        return self._server.runtime.now()

    async def _store(self, op: ops.Op) -> Any:
        return await self._server.storage.execute(op)

    def _update(self, kind: Any, connection_id: str, room: str, state: Any = None) -> bytes:
        """The encoded update, stamped now. A write that is certain to change
        something carries it (``announce``: one round trip for both); one
        whose effect the store's reply decides publishes it afterwards."""
        payload = ops.presence_update(
            kind, connection_id, room, self._server.runtime.wall_ms(), state
        )
        return encode_json(payload)

    async def _publish(self, room: str, update: bytes) -> None:
        await self._server.pubsub.publish(ops.presence_channel(room), update)

    # -- membership -------------------------------------------------------------

    async def join(self, add: ops.AddToRoom, execute: Callable[[ops.Op], Awaitable[Any]]) -> Any:
        """Add a member to a room (``execute(add)``), and mark it present if
        the room is tracked. Result: ``add``'s."""
        room, connection_id = add.room, add.connection_id
        track = self._rules.match(room)
        if track is None:
            return await execute(add)
        if connection_id not in self._server._local:
            # a connection of another instance, added by this one's server
            # API: the store's reply decides; its own instance refreshes it
            added = await execute(add)
            if await self._store(ops.MarkPresent(room, connection_id, track.ttl_ms)):
                await self._publish(room, self._update("join", connection_id, room))
            return added
        rooms = self._members.setdefault(connection_id, {})
        member = rooms.get(room)
        if member is None:
            member = rooms[room] = _Member(track.ttl_ms, self._now())
        if member.present:
            return await execute(add)  # joined twice: one member, no second event
        return await self._come_back(room, connection_id, member, joins=True)

    async def _come_back(
        self, room: str, connection_id: str, member: _Member, *, joins: bool = False
    ) -> Any:
        """Mark a member present (a join, or a pong after it went missing);
        with ``joins``, add it to the room in the same round trip (result:
        whether it was not a member yet)."""
        member.present = True  # before the await: a concurrent leave sees it
        member.seen = self._now()
        join = self._update("join", connection_id, room)
        op = ops.JoinPresent if joins else ops.MarkPresent
        result = await self._store(op(room, connection_id, member.ttl_ms, join))
        if self._members.get(connection_id, {}).get(room) is member:
            self._arm_ttl(room, connection_id, member)
        # else it left meanwhile; its leave went out after this join
        return result

    async def leave(self, room: str, connection_id: str) -> None:
        if self._rules.match(room) is None:
            return
        rooms = self._members.get(connection_id)
        member = rooms.pop(room, None) if rooms is not None else None
        if rooms is not None and not rooms:
            del self._members[connection_id]
        was_present = member is not None and member.present
        if member is not None:
            member.present = False
            self._timers.cancel(("ttl", connection_id, room))
            self._timers.cancel(("state", connection_id, room))
        leave = self._update("leave", connection_id, room)
        if was_present:
            await self._store(ops.MarkAbsent(room, connection_id, leave))
        elif await self._store(ops.MarkAbsent(room, connection_id)):
            await self._publish(room, leave)

    async def connection_gone(self, connection_id: str) -> None:
        """The connection's cleanup: gone from every tracked room, and its
        subscriptions dropped (before the store forgets its rooms)."""
        for room in list(self._subscribed.get(connection_id, ())):
            await self._unsubscribe(room, connection_id)
        if not self._rules:
            return
        rooms = dict.fromkeys(self._members.get(connection_id, {}))
        try:
            for room in await self._store(ops.GetConnectionRooms(connection_id)):
                rooms[room] = None
        except Exception as exc:  # the store is away: what this instance knows
            log.warning("presence cleanup of %s: rooms unknown (%s)", connection_id, exc)
        for room in rooms:
            try:
                await self.leave(room, connection_id)
            except StorageUnavailable as exc:  # the store retries it with the unregistration
                log.warning("presence cleanup of %s in %r: %s", connection_id, room, exc)
            except Exception:
                log.exception("presence cleanup of %s in %r failed", connection_id, room)
        self._members.pop(connection_id, None)

    async def follow(self, op: ops.Op, execute: Callable[[ops.Op], Awaitable[Any]]) -> Any:
        """Run a membership operation and keep presence in step with it: a
        join marks present after the store has the member, a leave marks gone
        before it drops it (as the reference), a cleared room's members go."""
        if isinstance(op, ops.AddToRoom):
            return await self.join(op, execute)
        if isinstance(op, ops.RemoveFromRoom):
            await self.leave(op.room, op.connection_id)
            return await execute(op)
        assert isinstance(op, ops.ClearRoom | ops.DeleteRoom)
        removed = await execute(op)
        if self._rules.match(op.room) is not None:
            for cid in removed:
                await self.leave(op.room, cid)
        return removed

    # -- liveness ---------------------------------------------------------------

    async def pong(self, connection_id: str) -> None:
        """A pong refreshes the member in each of its tracked rooms; a member
        whose entry vanished from the store (Redis restarted empty, a TTL
        raced) or that had timed out is present again, with a join."""
        rooms = self._members.get(connection_id)
        if not rooms:
            return
        now = self._now()
        for room, member in list(rooms.items()):
            member.seen = now
            if not member.present:
                await self._come_back(room, connection_id, member)
                continue
            vanished = await self._store(ops.MarkPresent(room, connection_id, member.ttl_ms))
            if vanished and rooms.get(room) is member and member.present:
                await self._publish(room, self._update("join", connection_id, room))

    def _arm_ttl(self, room: str, connection_id: str, member: _Member) -> None:
        if member.ttl_ms is None:
            return

        async def due() -> None:
            await self._ttl_due(room, connection_id, member)

        self._timers.set(("ttl", connection_id, room), member.seen + member.ttl_ms / 1000, due)

    async def _ttl_due(self, room: str, connection_id: str, member: _Member) -> None:
        if self._members.get(connection_id, {}).get(room) is not member or not member.present:
            return
        assert member.ttl_ms is not None
        if self._now() < member.seen + member.ttl_ms / 1000:
            self._arm_ttl(room, connection_id, member)  # a pong came since
            return
        # no pong for a whole TTL: gone from presence (still in the room; a
        # later pong brings it back with a join)
        member.present = False
        member.has_state = False
        member.state_version += 1
        self._timers.cancel(("state", connection_id, room))
        leave = self._update("leave", connection_id, room)
        await self._store(ops.MarkAbsent(room, connection_id, leave))

    # -- guard --------------------------------------------------------------------

    async def _allowed(self, room: str, connection_id: str) -> bool:
        track = self._rules.match(room)
        if track is None:
            return False
        if track.guard is None:
            return True
        connection = self._server._local.get(connection_id)
        if connection is None:
            return False
        try:
            verdict = track.guard(connection, room)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except Exception:
            log.exception("presence guard for %r failed; refusing", room)
            return False
        return bool(verdict)

    # -- subscriptions --------------------------------------------------------------

    async def _subscribe(self, room: str, connection_id: str) -> None:
        # one listener per instance for every presence channel: the server's
        # pubsub keeps one store subscription per channel, and this hub hands
        # each message to each subscriber here once
        self._subscribers.setdefault(room, {})[connection_id] = None
        self._subscribed.setdefault(connection_id, set()).add(room)
        try:
            # returns once the store subscription is in place (also for a
            # second subscriber that comes while the first one's is made)
            await self._server.pubsub.subscribe(ops.presence_channel(room), self._on_message)
        except BaseException:
            await self._unsubscribe(room, connection_id)
            raise

    async def _unsubscribe(self, room: str, connection_id: str) -> bool:
        subscribers = self._subscribers.get(room)
        if subscribers is None or connection_id not in subscribers:
            return False
        del subscribers[connection_id]
        watched = self._subscribed.get(connection_id)
        if watched is not None:
            watched.discard(room)
            if not watched:
                del self._subscribed[connection_id]
        if not subscribers:
            del self._subscribers[room]
            await self._server.pubsub.unsubscribe(ops.presence_channel(room), self._on_message)
        return True

    def _on_message(self, channel: str, data: bytes) -> None:
        room = channel[len(ops.presence_channel("")) :]
        subscribers = self._subscribers.get(room)
        if not subscribers:
            return
        try:
            payload = _decode(data)
        except msgspec.DecodeError:
            log.warning("ignoring a malformed presence update on %s", channel)
            return
        self._server._send_local(list(subscribers), encode_push(UPDATE, payload))

    # -- states -------------------------------------------------------------------

    def _member_here(self, room: str, connection_id: str) -> _Member:
        rooms = self._members.setdefault(connection_id, {})
        member = rooms.get(room)
        if member is None:
            # in the room (checked) but not joined through this instance's
            # join path (another instance's server API added it): it is
            # present from now on, refreshed by its pongs here
            track = self._rules.match(room)
            member = rooms[room] = _Member(track.ttl_ms if track else None, self._now())
            member.present = True
            self._arm_ttl(room, connection_id, member)
        return member

    async def _set_state(self, step: SetState) -> None:
        encoded = encode_json(step.state)
        limit = self._server.options.max_metadata_size
        if limit and len(encoded) > limit:
            raise MeshError(
                f"presence state is {len(encoded)} bytes, over the limit of {limit}",
                code="ETOOLARGE",
                name="PresenceStateTooLarge",
            )
        room, cid = step.room, step.connection_id
        member = self._member_here(room, cid)
        member.state_version += 1
        version = member.state_version
        member.has_state = True
        key = ("state", cid, room)
        if step.expire_after_ms:

            async def expired() -> None:
                await self._state_expired(room, cid, member, version)

            self._timers.set(key, self._now() + step.expire_after_ms / 1000, expired)
        else:
            self._timers.cancel(key)
        update = None if step.silent else self._update("state", cid, room, step.state)
        await self._store(ops.StorePresenceState(room, cid, encoded, step.expire_after_ms, update))

    async def _state_expired(self, room: str, cid: str, member: _Member, version: int) -> None:
        if member.state_version != version or not member.has_state:
            return  # replaced or cleared since
        member.has_state = False
        here = self._members.get(cid, {}).get(room) is member
        update = self._update("state", cid, room, None) if here else None
        await self._store(ops.DeletePresenceState(room, cid, update))

    async def _clear_state(self, room: str, cid: str) -> None:
        member = self._members.get(cid, {}).get(room)
        had = member is not None and member.has_state
        if member is not None:
            member.has_state = False
            member.state_version += 1
        self._timers.cancel(("state", cid, room))
        cleared = self._update("state", cid, room, None)
        if had:
            await self._store(ops.DeletePresenceState(room, cid, cleared))
        elif await self._store(ops.DeletePresenceState(room, cid)):
            await self._publish(room, cleared)


# -- the server-side read API ----------------------------------------------------------


class PresenceAPI:
    """Presence as the server sees it (``server.presence``), across every
    instance sharing the store."""

    def __init__(self, server: ServerCore) -> None:
        self._server = server

    def is_tracked(self, room: str) -> bool:
        return self._server.app.presence.match(room) is not None

    async def get_present(self, room: str) -> list[str]:
        """Ids of the members present in ``room``."""
        return list(await self._server.storage.execute(ops.GetPresent(room)))

    async def get_present_with_metadata(self, room: str) -> list[dict[str, Any]]:
        """``[{"id", "metadata"}]`` of the members present in ``room``."""
        ids = tuple(await self.get_present(room))
        if not ids:
            return []
        metadata = await self._server.storage.execute(ops.GetMetadata("connection", ids))
        return [{"id": cid, "metadata": meta} for cid, meta in zip(ids, metadata, strict=True)]

    async def get_states(self, room: str) -> dict[str, Any]:
        """``{connection_id: state}`` of the present members that have one."""
        ids = await self.get_present(room)
        if not ids:
            return {}
        return _states(
            ids, await self._server.storage.execute(ops.GetPresenceStates(room, tuple(ids)))
        )

    async def get_state(self, room: str, connection: ConnectionRef) -> Any:
        """One member's state (``None`` when it has none)."""
        cid = connection if isinstance(connection, str) else connection.id
        (state,) = await self._server.storage.execute(ops.GetPresenceStates(room, (cid,)))
        return state

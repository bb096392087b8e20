"""Records: JSON values with a version, that clients subscribe to (full
values or RFC 6902 patches) and may be allowed to write.

What lives here: the application's declarations (:class:`RecordRules`, used
through ``app.expose_record`` / ``app.expose_writable_record``), the server
API ``server.records`` (:class:`RecordsAPI`: write, get, delete, list, hooks),
the local subscriptions and their delivery, and the built-in commands
``mesh/subscribe-record``, ``mesh/unsubscribe-record`` and
``mesh/publish-record-update``.

A write is one atomic storage operation (:class:`~mesh_core.storage.WriteRecord`)
that bumps the version by exactly one and announces the change on the
store's ``mesh:record-updates`` channel, in version order; every instance
with local subscribers to a record listens there and sends each subscriber
what its mode asks for. A patch-mode subscriber that would miss a version
(a message lost while the store was unreachable, an update racing its
subscribe) is sent the full value instead of a patch it could not apply.

Read access is decided by the read rules alone when one matches: a writable
pattern never bypasses a read guard (the reference lets any writable match
read). A record that only a writable pattern matches is readable by the
connections its write guard admits.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from .._errors import MeshError, ValidationError
from ..protocol._frames import encode_json, encode_push
from ..storage import _ops as ops
from ..storage._strategies import check_strategy
from ._payload import field as _field

if TYPE_CHECKING:
    from ._api import Connection
    from ._app import Context
    from ._server import ServerCore

__all__ = [
    "ChannelListener",
    "RECORD_BUILTINS",
    "Pattern",
    "RecordGuard",
    "RecordHook",
    "RecordRules",
    "RecordsAPI",
    "RecordsAppMixin",
]

log = logging.getLogger("mesh_core.records")

#: A record (or collection) id pattern: an exact id, or a compiled regular
#: expression that must match somewhere in the id (like JavaScript's
#: ``RegExp.test``, so anchor it with ``^...$`` to match whole ids).
Pattern = str | re.Pattern[str]
#: ``guard(connection, record_id)``: may this connection read (or write) it?
RecordGuard = Callable[["Connection", str], Awaitable[bool] | bool]
#: ``hook(record_id, value)``: called after a record changed or was removed.
RecordHook = Callable[[str, Any], Awaitable[None] | None]
Mode = Literal["full", "patch"]


def matches(pattern: Pattern, name: str) -> bool:
    if isinstance(pattern, str):
        return pattern == name
    return pattern.search(name) is not None


def _check_pattern(pattern: object) -> Pattern:
    if (isinstance(pattern, str) and pattern) or isinstance(pattern, re.Pattern):
        return pattern
    raise TypeError("a pattern is a non-empty string or a compiled re.Pattern")


async def ask(guard: Callable[..., Any] | None, *args: Any) -> bool:
    """Run an application guard (sync or async); a guard that raises says no."""
    if guard is None:
        return True
    try:
        verdict = guard(*args)
        if inspect.isawaitable(verdict):
            verdict = await verdict
    except Exception:
        log.exception("guard %r failed; access refused", guard)
        return False
    return bool(verdict)


@dataclass(slots=True)
class RecordRules:
    """The records an application exposes, in declaration order."""

    readable: list[tuple[Pattern, RecordGuard | None]] = field(default_factory=list)
    writable: list[tuple[Pattern, RecordGuard | None]] = field(default_factory=list)

    async def may_read(self, connection: Connection, record_id: str) -> bool:
        for pattern, guard in self.readable:
            if matches(pattern, record_id):
                return await ask(guard, connection, record_id)
        return await self.may_write(connection, record_id)

    async def may_write(self, connection: Connection, record_id: str) -> bool:
        for pattern, guard in self.writable:
            if matches(pattern, record_id):
                return await ask(guard, connection, record_id)
        return False


class RecordsAppMixin:
    """``MeshApp``'s record declarations."""

    @property
    def record_rules(self) -> RecordRules:
        rules: RecordRules | None = self.__dict__.get("_record_rules")
        if rules is None:
            rules = self.__dict__["_record_rules"] = RecordRules()
        return rules

    def expose_record(self, pattern: Pattern, guard: RecordGuard | None = None) -> None:
        """Let clients subscribe to the records ``pattern`` matches; with a
        ``guard``, only the connections it admits. The first matching read
        pattern decides."""
        self.record_rules.readable.append((_check_pattern(pattern), guard))

    def expose_writable_record(self, pattern: Pattern, guard: RecordGuard | None = None) -> None:
        """Let clients write the records ``pattern`` matches (with
        ``mesh/publish-record-update``); with a ``guard``, only the
        connections it admits. A record no read pattern matches is readable
        by the connections that may write it."""
        self.record_rules.writable.append((_check_pattern(pattern), guard))


# -- the server API and local subscriptions -------------------------------------


class ChannelListener:
    """One listener of one store channel, held only while it is wanted:
    records and collections listen while they have local subscribers."""

    __slots__ = ("_callback", "_channel", "_server", "listening")

    def __init__(
        self, server: ServerCore, channel: str, callback: Callable[[str, bytes], None]
    ) -> None:
        self._server = server
        self._channel = channel
        self._callback = callback
        self.listening = False

    async def listen(self) -> None:
        if not self.listening:
            self.listening = True
            try:
                await self._server.pubsub.subscribe(self._channel, self._callback)
            except BaseException:
                self.listening = False
                raise

    async def stop(self) -> None:
        if self.listening:
            self.listening = False
            await self._server.pubsub.unsubscribe(self._channel, self._callback)


@dataclass(slots=True)
class _Subscriber:
    mode: Mode
    #: the version this subscriber holds; -1 while its subscribe is answered
    version: int = -1
    #: the newest update heard while the subscribe was being answered
    pending: _Update | None = None


class _Update(msgspec.Struct):
    """A message on ``mesh:record-updates`` (ours or a reference instance's).
    Values stay raw JSON: they are forwarded, never re-encoded."""

    recordId: str
    version: int
    #: empty (falsy) when absent; JSON ``null`` is ``Raw(b"null")``
    newValue: msgspec.Raw = msgspec.Raw(b"")
    patch: msgspec.Raw = msgspec.Raw(b"")
    deleted: bool = False


_decode_update = msgspec.json.Decoder(_Update).decode


class _Full(msgspec.Struct):
    recordId: str
    full: msgspec.Raw
    version: int


class _Patch(msgspec.Struct):
    recordId: str
    patch: msgspec.Raw
    version: int


class RecordsAPI:
    """``server.records``: the records of every instance sharing the store."""

    def __init__(self, server: ServerCore) -> None:
        self._server = server
        self._subscribers: dict[str, dict[str, _Subscriber]] = {}
        self._by_connection: dict[str, set[str]] = {}
        self._update_hooks: list[RecordHook] = []
        self._removed_hooks: list[RecordHook] = []
        self._listener = ChannelListener(server, ops.RECORD_UPDATES, self._on_message)

    # -- reading and writing --------------------------------------------------

    async def get(self, record_id: str) -> Any:
        """The record's value (``None`` if there is none)."""
        return (await self.get_with_version(record_id))[0]

    async def get_with_version(self, record_id: str) -> tuple[Any, int]:
        """``(value, version)``, read atomically (``(None, 0)`` if none)."""
        ((value, version),) = await self._server.execute(ops.GetRecords((record_id,)))
        return value, version

    async def write(self, record_id: str, value: Any, strategy: str = "replace") -> tuple[Any, int]:
        """Store ``value`` (``replace``, ``merge`` or ``deepMerge`` into the
        current value) as one atomic step and tell every subscriber. Returns
        the stored ``(value, version)``; a write that changes nothing stores
        nothing and keeps the version. A value whose JSON is over
        ``max_metadata_size`` fails with ``ETOOLARGE`` and nothing is stored."""
        _check_id(record_id, "record id")
        merge = check_strategy(strategy)
        limit = self._server.options.max_metadata_size

        def update(old: Any) -> Any:
            new = merge(old, value)
            if limit:
                size = len(encode_json(new))
                if size > limit:
                    raise MeshError(
                        f"record {record_id!r} would be {size} bytes, over the limit of {limit}",
                        code="ETOOLARGE",
                        name="RecordTooLarge",
                    )
            return new

        written: ops.RecordWritten = await self._server.execute(ops.WriteRecord(record_id, update))
        if written.changed:
            await _run_hooks(self._update_hooks, record_id, written.value)
        return written.value, written.version

    async def delete(self, record_id: str) -> bool:
        """Delete the record; subscribers get ``mesh/record-deleted``."""
        _check_id(record_id, "record id")
        removed = await self._server.execute(ops.DeleteRecord(record_id))
        if removed is None:
            return False
        await _run_hooks(self._removed_hooks, record_id, removed[0])
        return True

    async def list_matching(self, glob: str) -> list[tuple[str, Any]]:
        """``[(record_id, value), ...]`` for the records whose id matches the
        glob (``*``, ``?``, ``[abc]``), sorted by id."""
        return list(await self._server.execute(ops.ListRecords(glob)))

    def on_update(self, hook: RecordHook) -> Callable[[], None]:
        """Call ``hook(record_id, value)`` after every write of this instance
        that changed a record. Returns a function that removes the hook."""
        return _add_hook(self._update_hooks, hook)

    def on_removed(self, hook: RecordHook) -> Callable[[], None]:
        """Call ``hook(record_id, last_value)`` after this instance deleted
        a record. Returns a function that removes the hook."""
        return _add_hook(self._removed_hooks, hook)

    # -- access ---------------------------------------------------------------

    async def may_read(self, connection: Connection, record_id: str) -> bool:
        return await self._server.app.record_rules.may_read(connection, record_id)

    async def may_write(self, connection: Connection, record_id: str) -> bool:
        return await self._server.app.record_rules.may_write(connection, record_id)

    # -- subscriptions (the built-ins' side) ----------------------------------

    async def subscribe(self, connection: Connection, record_id: str, mode: Mode) -> Any:
        if not await self.may_read(connection, record_id):
            return {"success": False}
        subscriber = _Subscriber(mode)
        subscribers = self._subscribers.setdefault(record_id, {})
        subscribers[connection.id] = subscriber
        self._by_connection.setdefault(connection.id, set()).add(record_id)
        try:
            await self._listener.listen()
            value, version = await self.get_with_version(record_id)
        except BaseException:
            self._forget(connection.id, record_id, subscriber)
            raise
        pending = subscriber.pending
        subscriber.pending = None
        if pending is not None and pending.version > version and pending.newValue:
            # an update overtook the read: answer with it, not the older value
            value, version = msgspec.json.decode(pending.newValue), pending.version
        if not connection.is_open:
            self._forget(connection.id, record_id, subscriber)
        subscriber.version = version
        return {"success": True, "record": value, "version": version}

    def unsubscribe(self, connection_id: str, record_id: str) -> bool:
        subscriber = self._subscribers.get(record_id, {}).get(connection_id)
        return subscriber is not None and self._forget(connection_id, record_id, subscriber)

    def subscriptions(self, connection_id: str) -> frozenset[str]:
        """The records a local connection is subscribed to."""
        return frozenset(self._by_connection.get(connection_id, ()))

    async def connection_gone(self, connection_id: str) -> None:
        for record_id in list(self._by_connection.get(connection_id, ())):
            self.unsubscribe(connection_id, record_id)
        await self._maybe_unlisten()

    def _forget(self, connection_id: str, record_id: str, subscriber: _Subscriber) -> bool:
        subscribers = self._subscribers.get(record_id)
        if subscribers is None or subscribers.get(connection_id) is not subscriber:
            return False
        del subscribers[connection_id]
        if not subscribers:
            del self._subscribers[record_id]
        mine = self._by_connection.get(connection_id)
        if mine is not None:
            mine.discard(record_id)
            if not mine:
                del self._by_connection[connection_id]
        return True

    async def _maybe_unlisten(self) -> None:
        if not self._subscribers:
            await self._listener.stop()

    # -- delivery -------------------------------------------------------------

    def _on_message(self, channel: str, data: bytes) -> None:
        try:
            update = _decode_update(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignoring a malformed message on %s: %r", ops.RECORD_UPDATES, data[:200])
            return
        subscribers = self._subscribers.get(update.recordId)
        if not subscribers:
            return
        if update.deleted:
            self._deliver_deletion(update, subscribers)
            return
        if not update.newValue:
            return
        full: list[str] = []
        patched: list[str] = []
        for cid, subscriber in subscribers.items():
            if subscriber.version < 0:  # being subscribed: answered with the newest
                if subscriber.pending is None or update.version > subscriber.pending.version:
                    subscriber.pending = update
                continue
            if update.version <= subscriber.version:
                continue  # already has it (or newer)
            if (
                subscriber.mode == "patch"
                and update.patch
                and update.version == subscriber.version + 1
            ):
                patched.append(cid)
            else:
                full.append(cid)
            subscriber.version = update.version
        send = self._server._send_local
        if full:
            send(
                full,
                encode_push(
                    "mesh/record-update", _Full(update.recordId, update.newValue, update.version)
                ),
            )
        if patched:
            send(
                patched,
                encode_push(
                    "mesh/record-update", _Patch(update.recordId, update.patch, update.version)
                ),
            )

    def _deliver_deletion(self, update: _Update, subscribers: dict[str, _Subscriber]) -> None:
        ids = list(subscribers)
        self._server._send_local(
            ids,
            encode_push(
                "mesh/record-deleted", {"recordId": update.recordId, "version": update.version}
            ),
        )
        for cid in ids:
            self.unsubscribe(cid, update.recordId)


def _check_id(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{what} must be a non-empty string")


def _add_hook(hooks: list[RecordHook], hook: RecordHook) -> Callable[[], None]:
    hooks.append(hook)

    def remove() -> None:
        if hook in hooks:
            hooks.remove(hook)

    return remove


async def _run_hooks(hooks: list[RecordHook], record_id: str, value: Any) -> None:
    for hook in list(hooks):
        try:
            result = hook(record_id, value)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("record hook %r failed for %r", hook, record_id)


# -- the built-in commands ------------------------------------------------------


def _strategy(payload: dict[str, Any]) -> str:
    options = payload.get("options")
    if options is None:
        return "replace"
    if not isinstance(options, dict):
        raise ValidationError("payload.options must be an object")
    strategy = options.get("strategy")
    if strategy is None:
        return "replace"
    check_strategy(strategy)
    return str(strategy)


async def subscribe_record(ctx: Context) -> Any:
    record_id = _field(ctx.payload, "recordId")
    mode = ctx.payload.get("mode")
    if mode is None:
        mode = "full"
    if mode not in ("full", "patch"):
        raise ValidationError('payload.mode must be "full" or "patch"')
    return await ctx.server.records.subscribe(ctx.connection, record_id, mode)


async def unsubscribe_record(ctx: Context) -> Any:
    record_id = _field(ctx.payload, "recordId")
    removed = ctx.server.records.unsubscribe(ctx.connection.id, record_id)
    await ctx.server.records._maybe_unlisten()
    return removed


async def publish_record_update(ctx: Context) -> Any:
    record_id = _field(ctx.payload, "recordId")
    payload: dict[str, Any] = ctx.payload
    if "newValue" not in payload:
        raise ValidationError("payload.newValue is required")
    strategy = _strategy(payload)
    records = ctx.server.records
    if not await records.may_write(ctx.connection, record_id):
        raise MeshError(f'Record "{record_id}" is not writable by this connection.', name="Error")
    await records.write(record_id, payload["newValue"], strategy)
    return {"success": True}


#: the record built-ins (``async def handler(ctx)``, as application commands)
RECORD_BUILTINS: dict[str, Callable[[Context], Awaitable[Any]]] = {
    "mesh/subscribe-record": subscribe_record,
    "mesh/unsubscribe-record": unsubscribe_record,
    "mesh/publish-record-update": publish_record_update,
}

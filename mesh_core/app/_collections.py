"""Collections: live lists of records, whose membership a resolver of the
application decides, pushed to subscribers as diffs.

``app.expose_collection(pattern, resolver, guard=None)`` declares one; the
resolver ``(connection, collection_id) -> [record id or record with "id"]``
(sync or async) says which records belong to it for that connection. A
subscriber gets the members on ``mesh/subscribe-collection``, then a
``mesh/collection-diff`` (``added``/``removed``, version + 1) whenever the
membership changes, followed by ``mesh/record-update`` (full) for changed
records still in it.

Where the reference does worse, this module differs:

* only records the subscriber may read (the record read rules of
  ``mesh_core.app._records``) are ever delivered, and a collection may have a
  guard of its own;
* re-resolution is bounded: a record change (heard on
  ``mesh:collection:record-change``, from any instance) marks the
  collections with local subscribers; at most one re-resolution per
  collection runs at a time, and changes heard meanwhile are folded into one
  more run after it, so a burst of writes costs two runs, not one per write;
* the id list a subscriber last saw (``mesh:collection:<collection>:<connection>``)
  is removed when it unsubscribes or disconnects.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..storage import _ops as ops
from ._payload import field as _field
from ._records import ChannelListener, Pattern, _check_pattern, ask, matches

if TYPE_CHECKING:
    from ._api import Connection
    from ._app import Context
    from ._server import ServerCore

__all__ = [
    "COLLECTION_BUILTINS",
    "CollectionGuard",
    "CollectionsAPI",
    "CollectionsAppMixin",
    "Resolver",
]

log = logging.getLogger("mesh_core.collections")

#: ``resolver(connection, collection_id)``: the members, as record ids or as
#: records (objects with a string ``"id"``), in the order to show them
Resolver = Callable[["Connection", str], Awaitable[Iterable[Any]] | Iterable[Any]]
#: ``guard(connection, collection_id)``: may this connection subscribe?
CollectionGuard = Callable[["Connection", str], Awaitable[bool] | bool]


@dataclass(slots=True)
class _Exposed:
    pattern: Pattern
    resolver: Resolver
    guard: CollectionGuard | None


class CollectionsAppMixin:
    """``MeshApp``'s collection declarations."""

    @property
    def collection_rules(self) -> list[_Exposed]:
        rules: list[_Exposed] | None = self.__dict__.get("_collection_rules")
        if rules is None:
            rules = self.__dict__["_collection_rules"] = []
        return rules

    def expose_collection(
        self, pattern: Pattern, resolver: Resolver, guard: CollectionGuard | None = None
    ) -> None:
        """Let clients subscribe to the collections ``pattern`` matches; the
        first matching pattern's resolver and guard decide."""
        if not callable(resolver):
            raise TypeError("a collection resolver is a callable")
        self.collection_rules.append(_Exposed(_check_pattern(pattern), resolver, guard))


@dataclass(slots=True)
class _Subscription:
    exposed: _Exposed
    ids: tuple[str, ...] = ()
    version: int = 1


@dataclass(slots=True)
class _Collection:
    subscribers: dict[str, _Subscription] = field(default_factory=dict)
    #: record ids changed since the last re-resolution began
    changed: set[str] = field(default_factory=set)
    running: bool = False


class CollectionsAPI:
    """``server.collections``: this instance's collection subscriptions."""

    def __init__(self, server: ServerCore) -> None:
        self._server = server
        self._collections: dict[str, _Collection] = {}
        self._by_connection: dict[str, set[str]] = {}
        self._listener = ChannelListener(server, ops.COLLECTION_RECORD_CHANGE, self._on_change)

    def _exposed(self, collection_id: str) -> _Exposed | None:
        for exposed in self._server.app.collection_rules:
            if matches(exposed.pattern, collection_id):
                return exposed
        return None

    async def _members(
        self, connection: Connection, collection_id: str, exposed: _Exposed
    ) -> list[tuple[str, Any]]:
        """``[(id, record)]`` the resolver names and the connection may read."""
        result = exposed.resolver(connection, collection_id)
        if inspect.isawaitable(result):
            result = await result
        named: list[tuple[str, Any]] = []
        seen: set[str] = set()
        for item in result:
            if isinstance(item, str):
                rid, record = item, None
            elif isinstance(item, dict) and isinstance(item.get("id"), str):
                rid, record = item["id"], item
            else:
                raise TypeError(
                    f"collection {collection_id!r}: a resolver returns record ids or "
                    f"records with a string 'id', not {item!r}"
                )
            if rid in seen:
                continue
            seen.add(rid)
            if await self._server.records.may_read(connection, rid):
                named.append((rid, record))
        missing = tuple(rid for rid, record in named if record is None)
        if missing:
            values = await self._server.execute(ops.GetRecords(missing))
            loaded = {rid: value for rid, (value, _) in zip(missing, values, strict=True)}
            named = [(rid, with_id(rid, loaded[rid]) if rec is None else rec) for rid, rec in named]
        return named

    # -- the built-ins' side ------------------------------------------------------

    async def subscribe(self, connection: Connection, collection_id: str) -> Any:
        denied = {"success": False, "ids": [], "records": [], "version": 0}
        exposed = self._exposed(collection_id)
        if exposed is None or not await ask(exposed.guard, connection, collection_id):
            return denied
        await self._listener.listen()
        try:
            members = await self._members(connection, collection_id, exposed)
        except Exception:
            log.exception("resolving collection %r failed", collection_id)
            await self._maybe_unlisten()
            return denied
        ids = tuple(rid for rid, _ in members)
        subscription = _Subscription(exposed, ids, 1)
        collection = self._collections.setdefault(collection_id, _Collection())
        collection.subscribers[connection.id] = subscription
        self._by_connection.setdefault(connection.id, set()).add(collection_id)
        await self._server.execute(ops.SetCollectionIds(collection_id, connection.id, ids))
        if not connection.is_open:
            await self.unsubscribe(connection.id, collection_id)
        return {
            "success": True,
            "ids": list(ids),
            "records": [{"id": rid, "record": record} for rid, record in members],
            "version": 1,
        }

    async def unsubscribe(self, connection_id: str, collection_id: str) -> bool:
        collection = self._collections.get(collection_id)
        if collection is None or collection.subscribers.pop(connection_id, None) is None:
            return False
        if not collection.subscribers and not collection.running:
            del self._collections[collection_id]
        mine = self._by_connection.get(connection_id)
        if mine is not None:
            mine.discard(collection_id)
            if not mine:
                del self._by_connection[connection_id]
        try:
            await self._server.execute(ops.SetCollectionIds(collection_id, connection_id, None))
        finally:
            await self._maybe_unlisten()
        return True

    async def connection_gone(self, connection_id: str) -> None:
        for collection_id in list(self._by_connection.get(connection_id, ())):
            await self.unsubscribe(connection_id, collection_id)

    def subscriptions(self, connection_id: str) -> frozenset[str]:
        return frozenset(self._by_connection.get(connection_id, ()))

    async def _maybe_unlisten(self) -> None:
        if not self._by_connection:
            await self._listener.stop()

    # -- re-resolution ------------------------------------------------------------

    def _on_change(self, channel: str, data: bytes) -> None:
        try:
            record_id = data.decode()
        except UnicodeDecodeError:
            return
        for collection_id, collection in self._collections.items():
            if not collection.subscribers:
                continue
            collection.changed.add(record_id)
            if not collection.running:
                collection.running = True
                self._server._group.start_soon(self._refresh, collection_id, collection)

    async def _refresh(self, collection_id: str, collection: _Collection) -> None:
        try:
            while collection.changed and collection.subscribers:
                changed, collection.changed = collection.changed, set()
                for cid, subscription in list(collection.subscribers.items()):
                    connection = self._server._local.get(cid)
                    if connection is None or not connection.is_open:
                        continue
                    try:
                        await self._refresh_one(connection, collection_id, subscription, changed)
                    except Exception:
                        log.exception(
                            "re-resolving collection %r for %s failed", collection_id, cid
                        )
        finally:
            collection.running = False
            if not collection.subscribers and self._collections.get(collection_id) is collection:
                del self._collections[collection_id]

    async def _refresh_one(
        self,
        connection: Connection,
        collection_id: str,
        subscription: _Subscription,
        changed: set[str],
    ) -> None:
        members = await self._members(connection, collection_id, subscription.exposed)
        ids = tuple(rid for rid, _ in members)
        before = set(subscription.ids)
        after = set(ids)
        added = [record for rid, record in members if rid not in before]
        gone = [rid for rid in subscription.ids if rid not in after]
        if subscription is not self._subscription(collection_id, connection.id):
            return  # unsubscribed (or subscribed anew) meanwhile
        if added or gone:
            removed: list[Any] = [{"id": rid} for rid in gone]
            subscription.ids = ids
            subscription.version += 1
            await self._server.execute(ops.SetCollectionIds(collection_id, connection.id, ids))
            connection.send(
                "mesh/collection-diff",
                {
                    "collectionId": collection_id,
                    "added": added,
                    "removed": removed,
                    "version": subscription.version,
                },
            )
        updated = tuple(rid for rid in ids if rid in changed and rid in before)
        if updated:
            values = await self._server.execute(ops.GetRecords(updated))
            for rid, (value, version) in zip(updated, values, strict=True):
                if version:
                    connection.send(
                        "mesh/record-update",
                        {"recordId": rid, "full": value, "version": version},
                    )

    def _subscription(self, collection_id: str, connection_id: str) -> _Subscription | None:
        collection = self._collections.get(collection_id)
        return None if collection is None else collection.subscribers.get(connection_id)


def with_id(record_id: str, value: Any) -> Any:
    """A stored value as a collection member: objects carry their ``id``
    (as the reference's ``listRecordsMatching`` gives them); other JSON values
    are wrapped as ``{"id", "value"}``."""
    if isinstance(value, dict):
        return value if value.get("id") == record_id else {**value, "id": record_id}
    return {"id": record_id, "value": value}


# -- the built-in commands ------------------------------------------------------


async def subscribe_collection(ctx: Context) -> Any:
    collection_id = _field(ctx.payload, "collectionId")
    return await ctx.server.collections.subscribe(ctx.connection, collection_id)


async def unsubscribe_collection(ctx: Context) -> Any:
    collection_id = _field(ctx.payload, "collectionId")
    return await ctx.server.collections.unsubscribe(ctx.connection.id, collection_id)


#: the collection built-ins (``async def handler(ctx)``, as application commands)
COLLECTION_BUILTINS: dict[str, Callable[[Context], Awaitable[Any]]] = {
    "mesh/subscribe-collection": subscribe_collection,
    "mesh/unsubscribe-collection": unsubscribe_collection,
}

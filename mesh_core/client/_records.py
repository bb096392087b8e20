"""Records and collections in the Python client, runtime-neutral.

Written over what every client has (``command``, ``on``, and a way to run a
callback's awaitable), so ``mesh_asyncio.MeshClient`` and
``mesh_trio.MeshClient`` get the same behaviour:

* ``subscribe_record(id, callback, mode="full")`` keeps a local copy of the
  record: full updates replace it, patches are applied with ``jsonpatch``
  when their version is exactly the next one; any other version (a gap)
  resubscribes, which answers with the full value (the reference client's
  rule). ``callback(update)`` gets a :class:`RecordUpdate` with the value
  after the change.
* ``subscribe_collection(id, on_diff)`` keeps the member ids and hands each
  diff (and each member's update) to ``on_diff`` as a :class:`CollectionDiff`;
  a diff whose version is not the next one resubscribes.
* both are made again after every reconnect.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jsonpatch

__all__ = ["CollectionDiff", "RecordUpdate", "RecordsClientMixin"]

log = logging.getLogger("mesh_client")


@dataclass(frozen=True, slots=True)
class RecordUpdate:
    """One change of a subscribed record, as the client now holds it."""

    record_id: str
    value: Any
    version: int
    #: the RFC 6902 operations received, for a patch; ``None`` for a full value
    patch: list[dict[str, Any]] | None = None
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class CollectionDiff:
    """``added``/``removed``/``changed`` as ``[{"id", "record"}]``; the first
    diff (from the subscribe) lists every member as added."""

    collection_id: str
    added: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    changed: list[dict[str, Any]]
    version: int


RecordCallback = Callable[[RecordUpdate], Awaitable[None] | None]
DiffCallback = Callable[[CollectionDiff], Awaitable[None] | None]


@dataclass(slots=True)
class _Record:
    callback: RecordCallback | None
    mode: str
    value: Any = None
    version: int = 0


@dataclass(slots=True)
class _Collection:
    on_diff: DiffCallback | None
    ids: set[str] = field(default_factory=set)
    version: int = 0


@dataclass(slots=True)
class _State:
    records: dict[str, _Record] = field(default_factory=dict)
    collections: dict[str, _Collection] = field(default_factory=dict)
    resyncing: set[str] = field(default_factory=set)


class RecordsClientMixin:
    """The record and collection methods of ``ClientCore``."""

    # provided by ClientCore / the adapter
    async def command(self, command: str, payload: Any = None, timeout: float | None = 30.0) -> Any:
        raise NotImplementedError

    def on(self, name: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def _spawn_awaitable(self, awaitable: Awaitable[Any]) -> None:
        raise NotImplementedError

    @property
    def _record_state(self) -> _State:
        state: _State | None = self.__dict__.get("_records_state")
        if state is None:
            state = self.__dict__["_records_state"] = _State()
            self.on("mesh/record-update", self._on_record_update)
            self.on("mesh/record-deleted", self._on_record_deleted)
            self.on("mesh/collection-diff", self._on_collection_diff)
            self.on("reconnect", self._records_reconnected)
        return state

    # -- records ----------------------------------------------------------------

    @property
    def records(self) -> dict[str, Any]:
        """The local copy of every subscribed record: ``{id: value}``."""
        return {rid: sub.value for rid, sub in self._record_state.records.items()}

    async def subscribe_record(
        self, record_id: str, callback: RecordCallback | None = None, mode: str = "full"
    ) -> tuple[bool, Any, int]:
        """Subscribe (``mode`` ``"full"`` or ``"patch"``); returns ``(success,
        value, version)``. ``callback`` gets the initial value first."""
        state = self._record_state
        result = await self.command("mesh/subscribe-record", {"recordId": record_id, "mode": mode})
        if not (isinstance(result, dict) and result.get("success")):
            return False, None, 0
        value = result.get("record")
        version = int(result.get("version") or 0)
        state.records[record_id] = _Record(callback, mode, value, version)
        self._record_callback(callback, RecordUpdate(record_id, value, version))
        return True, value, version

    async def unsubscribe_record(self, record_id: str) -> bool:
        result = await self.command("mesh/unsubscribe-record", {"recordId": record_id})
        self._record_state.records.pop(record_id, None)
        return result is True

    async def write_record(self, record_id: str, value: Any, strategy: str | None = None) -> bool:
        """Ask the server to store ``value`` (``replace``, ``merge`` or
        ``deepMerge``); ``True`` when it did. A record this connection may
        not write is an error payload (raised with ``raise_errors``)."""
        payload: dict[str, Any] = {"recordId": record_id, "newValue": value}
        if strategy is not None:
            payload["options"] = {"strategy": strategy}
        result = await self.command("mesh/publish-record-update", payload)
        return isinstance(result, dict) and result.get("success") is True

    def _on_record_update(self, payload: Any) -> None:
        if not isinstance(payload, dict) or not isinstance(payload.get("recordId"), str):
            return
        state = self._record_state
        record_id: str = payload["recordId"]
        version = payload.get("version")
        if not isinstance(version, int):
            return
        if "full" in payload:
            for collection_id, collection in state.collections.items():
                if record_id in collection.ids:
                    changed = [{"id": record_id, "record": payload["full"]}]
                    self._record_callback(
                        collection.on_diff,
                        CollectionDiff(collection_id, [], [], changed, version),
                    )
        sub = state.records.get(record_id)
        if sub is None:
            return
        if "patch" in payload and "full" not in payload:
            patch = payload["patch"]
            if version != sub.version + 1 or not isinstance(patch, list):
                self._record_resync(record_id)
                return
            try:
                value = jsonpatch.apply_patch(copy.deepcopy(sub.value), patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
                log.warning("record %r: a patch did not apply; resubscribing", record_id)
                self._record_resync(record_id)
                return
            sub.value, sub.version = value, version
            self._record_callback(sub.callback, RecordUpdate(record_id, value, version, patch))
        elif "full" in payload:
            if version < sub.version:
                return  # older than what this client holds
            sub.value, sub.version = payload["full"], version
            self._record_callback(sub.callback, RecordUpdate(record_id, sub.value, version))

    def _on_record_deleted(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        record_id = payload.get("recordId")
        sub = (
            self._record_state.records.pop(record_id, None) if isinstance(record_id, str) else None
        )
        if sub is not None and isinstance(record_id, str):
            version = payload.get("version")
            self._record_callback(
                sub.callback,
                RecordUpdate(
                    record_id, None, version if isinstance(version, int) else 0, None, True
                ),
            )

    def _record_resync(self, record_id: str) -> None:
        state = self._record_state
        if record_id in state.resyncing:
            return
        state.resyncing.add(record_id)
        self._spawn_awaitable(self._resubscribe_record(record_id))

    async def _resubscribe_record(self, record_id: str) -> None:
        state = self._record_state
        try:
            sub = state.records.get(record_id)
            if sub is not None:
                await self.subscribe_record(record_id, sub.callback, sub.mode)
        except Exception as exc:
            log.warning("record %r: resubscribing failed: %s", record_id, exc)
        finally:
            state.resyncing.discard(record_id)

    # -- collections ------------------------------------------------------------

    async def subscribe_collection(
        self, collection_id: str, on_diff: DiffCallback | None = None
    ) -> tuple[bool, list[dict[str, Any]], int]:
        """Subscribe; returns ``(success, [{"id", "record"}], version)``.
        ``on_diff`` gets the members first (all ``added``), then each change."""
        state = self._record_state
        result = await self.command("mesh/subscribe-collection", {"collectionId": collection_id})
        if not (isinstance(result, dict) and result.get("success")):
            return False, [], 0
        records = list(result.get("records") or [])
        version = int(result.get("version") or 0)
        state.collections[collection_id] = _Collection(
            on_diff, set(result.get("ids") or ()), version
        )
        self._record_callback(on_diff, CollectionDiff(collection_id, records, [], [], version))
        return True, records, version

    async def unsubscribe_collection(self, collection_id: str) -> bool:
        result = await self.command("mesh/unsubscribe-collection", {"collectionId": collection_id})
        self._record_state.collections.pop(collection_id, None)
        return result is True

    def collection_ids(self, collection_id: str) -> frozenset[str]:
        """The member ids this client holds for a subscribed collection."""
        collection = self._record_state.collections.get(collection_id)
        return frozenset(collection.ids) if collection is not None else frozenset()

    def _on_collection_diff(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        collection_id = payload.get("collectionId")
        state = self._record_state
        collection = (
            state.collections.get(collection_id) if isinstance(collection_id, str) else None
        )
        if collection is None or not isinstance(collection_id, str):
            return
        version = payload.get("version")
        if version != collection.version + 1:
            key = "collection:" + collection_id
            if key not in state.resyncing:
                state.resyncing.add(key)
                self._spawn_awaitable(self._resubscribe_collection(collection_id, key))
            return
        collection.version = version
        added = [r for r in payload.get("added") or () if isinstance(r, dict)]
        removed = [r for r in payload.get("removed") or () if isinstance(r, dict)]
        for record in added:
            if isinstance(record.get("id"), str):
                collection.ids.add(record["id"])
        for record in removed:
            collection.ids.discard(record.get("id"))
        self._record_callback(
            collection.on_diff,
            CollectionDiff(
                collection_id,
                [{"id": r.get("id"), "record": r} for r in added],
                [{"id": r.get("id"), "record": r} for r in removed],
                [],
                version,
            ),
        )

    async def _resubscribe_collection(self, collection_id: str, key: str) -> None:
        state = self._record_state
        try:
            collection = state.collections.get(collection_id)
            if collection is not None:
                await self.subscribe_collection(collection_id, collection.on_diff)
        except Exception as exc:
            log.warning("collection %r: resubscribing failed: %s", collection_id, exc)
        finally:
            state.resyncing.discard(key)

    # -- reconnect --------------------------------------------------------------

    def _records_reconnected(self) -> None:
        state = self._record_state
        if state.records or state.collections:
            self._spawn_awaitable(self._records_resubscribe_all())

    async def _records_resubscribe_all(self) -> None:
        state = self._record_state
        for record_id, sub in list(state.records.items()):
            try:
                await self.subscribe_record(record_id, sub.callback, sub.mode)
            except Exception as exc:
                log.warning("record %r: resubscribing after reconnect failed: %s", record_id, exc)
        for collection_id, collection in list(state.collections.items()):
            try:
                await self.subscribe_collection(collection_id, collection.on_diff)
            except Exception as exc:
                log.warning(
                    "collection %r: resubscribing after reconnect failed: %s", collection_id, exc
                )

    def _record_callback(self, callback: Callable[[Any], Any] | None, arg: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(arg)
        except Exception:
            log.exception("Mesh client record callback failed")
            return
        if inspect.isawaitable(result):
            self._spawn_awaitable(result)

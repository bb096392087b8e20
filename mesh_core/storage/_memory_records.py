"""Records in the embedded in-memory store (see ``mesh_core.storage._ops``,
"records").

A write runs synchronously inside ``execute``: read, update, store, bump the
version and announce happen with no await in between, so concurrent writers
on one event loop can neither lose each other's keys nor see a version twice,
and announcements leave in version order. Values are kept as JSON text, as
Redis keeps them, so a value Redis could not hold fails here too and every
reader gets a fresh copy.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from ..protocol._frames import decode_json, encode_json
from . import _ops as ops
from ._patch import record_patch

__all__ = ["MemoryRecords"]


class MemoryRecords:
    """The record operations of :class:`~mesh_core.storage.MemoryStore`
    (a mixin: the store's dispatch table finds these methods by name)."""

    _records: dict[str, tuple[bytes, int]]
    _collection_ids: dict[tuple[str, str], tuple[str, ...]]

    def _init_records(self) -> None:
        self._records = {}  # id -> (JSON text, version)
        self._collection_ids = {}

    def _publish_message(self, op: ops.PublishMessage) -> None:
        raise NotImplementedError  # the store's message bus

    def _announce(self, channel: str, data: bytes) -> None:
        self._publish_message(ops.PublishMessage(channel, data))

    def _get_records(self, op: ops.GetRecords) -> list[tuple[Any, int]]:
        out: list[tuple[Any, int]] = []
        for record_id in op.record_ids:
            stored = self._records.get(record_id)
            out.append((None, 0) if stored is None else (decode_json(stored[0]), stored[1]))
        return out

    def _write_record(self, op: ops.WriteRecord) -> ops.RecordWritten:
        stored = self._records.get(op.record_id)
        old = None if stored is None else decode_json(stored[0])
        version = 0 if stored is None else stored[1]
        new = op.update(old)
        patch = record_patch(old, new)
        if patch is None:
            return ops.RecordWritten(old, version, changed=False)
        text = encode_json(new)
        version += 1
        self._records[op.record_id] = (text, version)
        self._announce(
            ops.RECORD_UPDATES,
            ops.record_update_message(op.record_id, text, encode_json(patch), version),
        )
        self._announce(ops.COLLECTION_RECORD_CHANGE, op.record_id.encode())
        return ops.RecordWritten(decode_json(text), version, changed=True)

    def _delete_record(self, op: ops.DeleteRecord) -> tuple[Any, int] | None:
        stored = self._records.pop(op.record_id, None)
        if stored is None:
            return None
        self._announce(ops.RECORD_UPDATES, ops.record_deleted_message(op.record_id, stored[1]))
        self._announce(ops.COLLECTION_RECORD_CHANGE, op.record_id.encode())
        return decode_json(stored[0]), stored[1]

    def _list_records(self, op: ops.ListRecords) -> list[tuple[str, Any]]:
        return [
            (record_id, decode_json(self._records[record_id][0]))
            for record_id in sorted(self._records)
            if fnmatch.fnmatchcase(record_id, op.pattern)
        ]

    def _set_collection_ids(self, op: ops.SetCollectionIds) -> None:
        key = (op.collection_id, op.connection_id)
        if op.ids is None:
            self._collection_ids.pop(key, None)
        else:
            self._collection_ids[key] = op.ids

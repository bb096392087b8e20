"""Records on Redis: the keys, the scripts, and the record operations of
:class:`~mesh_core.redis.RedisStoreCore` (a mixin, found by the store's
dispatch table by name).

The layout is the reference's, so instances of both kinds share records:
``mesh:record:<id>`` (the JSON text), ``mesh:record-version:<id>`` (an
integer), updates on ``mesh:record-updates`` and changed ids on
``mesh:collection:record-change``; a collection subscriber's last id list in
``mesh:collection:<collection>:<connection>``.

Why a script: the reference reads value and version, merges in the process
and writes both back with two plain SETs, so two writers that overlap both
write "version + 1" and one's keys are lost. Here a write is one atomic
step: the new value is computed in Python from the JSON text it read (so JSON
stays exact), then :data:`_WRITE` stores it only if the stored text is still
the one it was computed from, INCRs the version (exactly one per write, never
a number twice) and PUBLISHes the update, all inside the script, so
announcements leave in version order even from several instances. On a
conflict the script answers with the current text and the value is computed
again. Writes of one instance to one record queue up and are written in
batches (the store's ``Turns``), in order, one script per batch (each write still gets its own
version and message): they never conflict with each other, and 200 writers
on one record cost a few scripts, not 200 round trips in a row. The text
last written is cached, so a batch usually costs one round trip.

Redis Cluster is not supported for records: the two keys of the shared
layout hash to different slots, so no script can hold both.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import msgspec

from .._errors import MeshError
from ..storage import _ops as ops
from ..storage._patch import record_patch
from ._layout import Script, as_bytes, glob_escape, text

if TYPE_CHECKING:
    from ._transport import RedisTransport
    from ._turns import Turns, Update

__all__ = ["RedisRecords", "record_keys"]

_encode = msgspec.json.Encoder().encode


class record_keys:
    """The record part of the shared layout."""

    RECORD_PREFIX = "mesh:record:"
    VERSION_PREFIX = "mesh:record-version:"

    @staticmethod
    def record(record_id: str) -> str:
        return f"mesh:record:{record_id}"

    @staticmethod
    def version(record_id: str) -> str:
        return f"mesh:record-version:{record_id}"

    @staticmethod
    def collection(collection_id: str, connection_id: str) -> str:
        return f"mesh:collection:{collection_id}:{connection_id}"


# KEYS[1] value, KEYS[2] version; ARGV[1] "1" if the value expected is
# absent, ARGV[2] the text expected, ARGV[3] the record id as JSON, ARGV[4]
# the record id, then per write i = 1..n the new text ARGV[3 + 2i] and its
# patch ARGV[4 + 2i] (each from the text before it). Every write gets its own
# version and message; the last text is stored. Returns {1, last version} on
# success, {0, current} / {0} on a conflict.
_WRITE = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur then return {0, cur} end
elseif cur ~= ARGV[2] then
  if cur then return {0, cur} end
  return {0}
end
local v = 0
local n = (#ARGV - 4) / 2
for i = 1, n do
  v = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', 'mesh:record-updates', '{"recordId":' .. ARGV[3] .. ',"newValue":'
    .. ARGV[3 + 2 * i] .. ',"patch":' .. ARGV[4 + 2 * i] .. ',"version":' .. v .. '}')
end
redis.call('SET', KEYS[1], ARGV[3 + 2 * n])
redis.call('PUBLISH', 'mesh:collection:record-change', ARGV[4])
return {1, v}
"""

# KEYS[1] value, KEYS[2] version; ARGV[1] the record id as JSON, ARGV[2] the
# record id. Returns {old text, last version}, or nil if there was no record.
_DELETE = """
local cur = redis.call('GET', KEYS[1])
if not cur then return false end
local v = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', 'mesh:record-updates',
  '{"recordId":' .. ARGV[1] .. ',"deleted":true,"version":' .. string.format('%d', v) .. '}')
redis.call('PUBLISH', 'mesh:collection:record-change', ARGV[2])
return {cur, v}
"""

# the scripts name the channels of the shared layout themselves
assert ops.RECORD_UPDATES in _WRITE and ops.COLLECTION_RECORD_CHANGE in _WRITE
assert ops.RECORD_UPDATES in _DELETE and ops.COLLECTION_RECORD_CHANGE in _DELETE

_UNKNOWN: Any = object()  # no cached text (None there means "absent in Redis")


class RedisRecords:
    """Record operations of the Redis store; see the module docstring."""

    # provided by RedisStoreCore
    transport: RedisTransport
    max_update_attempts: int
    scan_count: int
    cache_size: int
    _cluster: bool
    _turns: Turns

    def _init_records(self) -> None:
        self._write_script = Script(_WRITE)
        self._delete_script = Script(_DELETE)
        self._record_texts: OrderedDict[str, bytes | None] = OrderedDict()

    def _no_cluster(self) -> None:
        if self._cluster:
            raise MeshError(
                "records are not supported on Redis Cluster (their two keys are in two slots)",
                code="EUNSUPPORTED",
            )

    async def _get_records(self, op: ops.GetRecords) -> list[tuple[Any, int]]:
        self._no_cluster()
        if not op.record_ids:
            return []
        names: list[str] = []
        for record_id in op.record_ids:
            names += (record_keys.record(record_id), record_keys.version(record_id))
        raw = await self.transport.execute("MGET", *names)
        out: list[tuple[Any, int]] = []
        for i in range(0, len(raw), 2):
            text, version = raw[i], raw[i + 1]
            out.append(
                (None, 0) if text is None else (msgspec.json.decode(text), int(version or 0))
            )
        return out

    async def _write_record(self, op: ops.WriteRecord) -> ops.RecordWritten:
        """Take this record's turn (``Turns``): the writer that leads writes
        its update and every one queued behind it as one batch."""
        self._no_cluster()
        record_id = op.record_id

        async def apply(batch: list[Update]) -> None:
            await self._write_batch(record_id, batch)

        result: ops.RecordWritten = await self._turns.take(
            (record_keys.record(record_id), None), op.update, apply
        )
        return result

    async def _write_batch(self, record_id: str, batch: list[Update]) -> None:
        """Compute every write of the batch in order from the stored text and
        store them with one script; on a conflict, compute again."""
        value_key, version_key = record_keys.record(record_id), record_keys.version(record_id)
        expected: bytes | None = self._record_texts.get(record_id, _UNKNOWN)
        id_json = _encode(record_id)
        for _ in range(self.max_update_attempts):
            if expected is _UNKNOWN:
                raw = await self.transport.execute("GET", value_key)
                expected = None if raw is None else as_bytes(raw)
            current = None if expected is None else msgspec.json.decode(expected)
            args: list[Any] = []
            # per write: (pending, value, how many changes came before it,
            # whether it changed the value) or an error
            plan: list[tuple[Update, Any, int, bool]] = []
            failed: list[tuple[Update, Exception]] = []
            changes = 0
            text = expected
            for pending in batch:
                try:
                    new = pending.fn(current)
                except Exception as exc:
                    failed.append((pending, exc))
                    continue
                patch = record_patch(current, new)
                if patch is None:
                    plan.append((pending, current, changes, False))
                    continue
                text = _encode(new)
                args += (text, _encode(patch))
                changes += 1
                current = new
                plan.append((pending, new, changes, True))
            if not changes:
                raw_text, raw_version = await self.transport.execute("MGET", value_key, version_key)
                stored = None if raw_text is None else as_bytes(raw_text)
                if stored != expected:
                    expected = stored  # the cache was stale: compute again
                    continue
                self._record_remember(record_id, stored)
                last = int(raw_version or 0)
            else:
                try:
                    result = await self._write_script(
                        self.transport,
                        [value_key, version_key],
                        [
                            "1" if expected is None else "0",
                            expected if expected is not None else b"",
                            id_json,
                            record_id,
                            *args,
                        ],
                    )
                except BaseException:
                    self._record_texts.pop(record_id, None)  # it may or may not have run
                    raise
                if int(result[0]) != 1:
                    expected = as_bytes(result[1]) if len(result) > 1 else None
                    continue
                self._record_remember(record_id, text)
                last = int(result[1])
            base = last - changes
            for pending, value, before, changed in plan:
                pending.result = ops.RecordWritten(value, base + before, changed)
            for pending, refusal in failed:
                pending.error = refusal
            return
        self._record_texts.pop(record_id, None)
        raise MeshError(
            f"record {record_id!r}: {self.max_update_attempts} writes in a row conflicted",
            code="ECONFLICT",
        )

    def _record_remember(self, record_id: str, text: bytes | None) -> None:
        texts = self._record_texts
        texts[record_id] = text
        texts.move_to_end(record_id)
        while len(texts) > self.cache_size:
            texts.popitem(last=False)

    async def _delete_record(self, op: ops.DeleteRecord) -> tuple[Any, int] | None:
        self._no_cluster()
        record_id = op.record_id
        self._record_texts.pop(record_id, None)
        result = await self._delete_script(
            self.transport,
            [record_keys.record(record_id), record_keys.version(record_id)],
            [_encode(record_id), record_id],
        )
        if result is None:
            return None
        return msgspec.json.decode(result[0]), int(result[1])

    async def _list_records(self, op: ops.ListRecords) -> list[tuple[str, Any]]:
        self._no_cluster()
        prefix = record_keys.RECORD_PREFIX
        found = await self.transport.scan_all(glob_escape(prefix) + op.pattern, self.scan_count)
        ordered = sorted({text(k) for k in found})
        if not ordered:
            return []
        values = await self.transport.execute("MGET", *ordered)
        return [
            (name[len(prefix) :], msgspec.json.decode(value))
            for name, value in zip(ordered, values, strict=True)
            if value is not None
        ]

    async def _set_collection_ids(self, op: ops.SetCollectionIds) -> None:
        key = record_keys.collection(op.collection_id, op.connection_id)
        if op.ids is None:
            await self.transport.execute("DEL", key)
        else:
            await self.transport.execute("SET", key, _encode(list(op.ids)))

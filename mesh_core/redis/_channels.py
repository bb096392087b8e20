"""Channel history on Redis: ``WriteChannel`` / ``GetChannelHistory``.

The reference's layout is kept as it is: the kept messages are the list
``mesh:history:<channel>`` (``RPUSH`` then ``LTRIM -N -1``), and live messages
are ``PUBLISH``-ed on the channel name itself. What we add lives beside it, in
a hash of our own (:func:`history_meta_key`): the channel's last ``offset``,
its ``epoch``, and how many of the list's newest entries are ours with
consecutive offsets (``known``, checked against a SHA1 of the newest entry,
``tail``: a reference writer's append breaks the run, and a read says so
instead of misnumbering), and ``floor``, the first offset written after
entries without offsets (a resume from before it missed those).

Each step is one Lua script, so a write's offset, list entry and the two
publishes (the offset announcement, then the bare message) are atomic: every
subscriber sees messages in offset order, and the announcement right before
its bare copy. The read decides as :func:`mesh_core.storage._memory_channels.plan_read`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..storage import _ops as ops
from ._layout import Script

if TYPE_CHECKING:
    from ._transport import RedisTransport

__all__ = ["RedisChannels", "history_key", "history_meta_key"]


def history_key(channel: str) -> str:
    return f"mesh:history:{channel}"


def _has_hash_tag(key: str) -> bool:
    start = key.find("{")
    if start < 0:
        return False
    end = key.find("}", start + 1)
    return end > start + 1


def history_meta_key(channel: str) -> str:
    """Our hash beside the list, in the list's Cluster slot: the same hash
    tag when the list key has one, else the whole list key as the tag. (A
    channel name with a ``}`` but no tag cannot be matched so; on a Cluster
    its writes then fail with CROSSSLOT.)"""
    key = history_key(channel)
    if _has_hash_tag(key):
        return f"mesh:history-meta:{channel}"
    return "{" + key + "}:meta"


# KEYS[1] the list, KEYS[2] our hash; ARGV[1] message, ARGV[2] how many to
# keep (>= 1), ARGV[3] the epoch to take if the channel has none, ARGV[4] the
# channel, ARGV[5] its offsets channel. Returns {offset, epoch}.
_WRITE = """
local known = tonumber(redis.call('HGET', KEYS[2], 'known') or '0')
if known > 0 then
  local tail = redis.call('LINDEX', KEYS[1], -1)
  if (not tail) or redis.sha1hex(tail) ~= redis.call('HGET', KEYS[2], 'tail') then
    known = 0
  end
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then epoch = ARGV[3] end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
if known == 0 and redis.call('LLEN', KEYS[1]) > 0 then
  -- entries without offsets before this one: whoever is older missed them
  redis.call('HSET', KEYS[2], 'floor', offset)
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
known = math.min(known + 1, redis.call('LLEN', KEYS[1]))
redis.call('HSET', KEYS[2], 'epoch', epoch, 'known', known, 'tail', redis.sha1hex(ARGV[1]))
redis.call('PUBLISH', ARGV[5], offset .. ':' .. epoch .. ':' .. ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return {offset, epoch}
"""

# KEYS[1] the list, KEYS[2] our hash; ARGV[1] limit, ARGV[2] since ('' for
# none), ARGV[3] the epoch of since ('' for unknown). Returns {messages,
# last offset, epoch or nil, known, recovered: 1, 0, or -1 without since}.
_READ = """
local len = redis.call('LLEN', KEYS[1])
local meta = redis.call('HMGET', KEYS[2], 'offset', 'epoch', 'known', 'tail', 'floor')
local last = tonumber(meta[1] or '0')
local known = tonumber(meta[3] or '0')
local floor = tonumber(meta[5] or '0')
if known > 0 then
  local tail = redis.call('LINDEX', KEYS[1], -1)
  if (not tail) or redis.sha1hex(tail) ~= meta[4] then known = 0 end
end
known = math.min(known, len)
local foreign = len > 0 and known == 0
local limit = tonumber(ARGV[1])
local n = math.min(limit, len)
local recovered = -1
if ARGV[2] ~= '' then
  local since = tonumber(ARGV[2])
  if (ARGV[3] ~= '' and ARGV[3] ~= meta[2]) or since > last then
    recovered = 0
  else
    local missing = last - since
    n = math.min(missing, known, limit)
    if missing <= known and missing <= limit and since >= floor and not foreign then
      recovered = 1
    else
      recovered = 0
    end
  end
end
local items = {}
if n > 0 then items = redis.call('LRANGE', KEYS[1], -n, -1) end
return {items, last, meta[2], known, recovered}
"""

_write = Script(_WRITE)
_read = Script(_READ)


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


class RedisChannels:
    """The channel handlers of :class:`~mesh_core.redis.RedisStoreCore` (a
    mixin: the handler table is read from the driver's own methods)."""

    transport: RedisTransport

    async def _write_channel(self, op: ops.WriteChannel) -> tuple[int, str]:
        offset, epoch = await _write(
            self.transport,
            [history_key(op.channel), history_meta_key(op.channel)],
            [op.message, op.history, op.epoch, op.channel, ops.offsets_channel(op.channel)],
        )
        return int(offset), _text(epoch)

    async def _get_channel_history(self, op: ops.GetChannelHistory) -> ops.ChannelHistory:
        reply: list[Any] = await _read(
            self.transport,
            [history_key(op.channel), history_meta_key(op.channel)],
            [
                op.limit,
                "" if op.since is None else op.since,
                op.epoch or "",
            ],
        )
        items, last, epoch, known, recovered = reply
        messages = [_text(item) for item in items]
        return ops.ChannelHistory(
            messages,
            int(last) if messages and int(known) > 0 else None,
            int(last),
            None if epoch is None else _text(epoch),
            None if int(recovered) < 0 else bool(recovered),
        )

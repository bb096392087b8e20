"""The Redis layout shared with every Mesh instance (PROTOCOL.md section 8), as data.

Key names, the message one instance publishes to another, and the Lua
scripts of the atomic updates: a contract with the reference
implementation, so it lives apart from the store's logic
(:mod:`mesh_core.redis._store`), which only uses it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec

from .._errors import RedisReplyError
from ._resp import Arg
from ._transport import RedisTransport

__all__ = [
    "CAS",
    "DELETE_IF",
    "UNLOCK",
    "Delivery",
    "Envelope",
    "Script",
    "as_bytes",
    "decode_envelope",
    "encode",
    "glob_escape",
    "keys",
    "load_json",
    "text",
]


class keys:
    """The shared layout; byte-compatible with reference instances."""

    CONNECTIONS = "mesh:connections"
    CONNECTION_META = "mesh:connection-meta"
    INSTANCES = "mesh:instances"
    CLEANUP_LOCK = "mesh:cleanup:lock"
    ROOM_PREFIX = "mesh:room:"
    ROOMMETA_PREFIX = "mesh:roommeta:"

    @staticmethod
    def instance_connections(instance_id: str) -> str:
        return f"mesh:connections:{instance_id}"

    @staticmethod
    def room(room: str) -> str:
        return f"mesh:room:{room}"

    @staticmethod
    def connection_rooms(connection_id: str) -> str:
        return f"mesh:connection:{connection_id}:rooms"

    @staticmethod
    def roommeta(room: str) -> str:
        return f"mesh:roommeta:{room}"

    @staticmethod
    def heartbeat(instance_id: str) -> str:
        return f"mesh:instance:{instance_id}:heartbeat"

    @staticmethod
    def pubsub(instance_id: str) -> str:
        return f"mesh:pubsub:{instance_id}"


class Delivery(msgspec.Struct):
    command: str
    payload: Any = None


class Envelope(msgspec.Struct):
    """What one instance publishes to another (PROTOCOL.md section 8)."""

    targetConnectionIds: list[str]
    command: Delivery


encode = msgspec.json.Encoder().encode
decode_envelope = msgspec.json.Decoder(Envelope).decode


def load_json(raw: bytes | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)


def text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


# Compare-and-set of one hash field. KEYS[1] hash, ARGV[1] field,
# ARGV[2] "1" if the value expected is absent, ARGV[3] the value expected,
# ARGV[4] the new value (ARGV[2] "blind": write without comparing);
# KEYS[2] (optional, never on a cluster: another slot) a hash that must
# contain ARGV[1] (the connection registry: metadata of a gone connection
# is not revived).
# Returns 1 on success, -1 when the connection is unknown, and on a
# conflict {0, current} ({0} if the field is absent), so the retry needs
# no read of its own.
CAS = """
if KEYS[2] and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return -1 end
if ARGV[2] ~= 'blind' then
  local cur = redis.call('HGET', KEYS[1], ARGV[1])
  if ARGV[2] == '1' then
    if cur then return {0, cur} end
  elseif cur ~= ARGV[3] then
    if cur then return {0, cur} end
    return {0}
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return 1
"""

# Delete a hash field only if it still holds ARGV[2]: undoes one write
# without touching whatever another writer put there since.
DELETE_IF = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# Release the cleanup lock only if this instance still holds it.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Script:
    """A Lua script run by ``EVALSHA``, sent again by ``EVAL`` when Redis
    does not know it (a restart, a failover, a new cluster node)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self, transport: RedisTransport, keys_: Sequence[str], args: Sequence[Arg]
    ) -> Any:
        try:
            return await transport.execute("EVALSHA", self.sha, len(keys_), *keys_, *args)
        except RedisReplyError as exc:
            if "NOSCRIPT" not in str(exc):
                raise
            return await transport.execute("EVAL", self.source, len(keys_), *keys_, *args)


def as_bytes(raw: bytes | str) -> bytes:
    return raw.encode() if isinstance(raw, str) else raw


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

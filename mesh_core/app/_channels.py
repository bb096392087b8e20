"""Channels with history: the three built-ins, the live push, and the server
API (``server.channels``, ``server.write_channel``).

Wire contract (the reference's, plus what it lacks): ``mesh/subscribe-channel``
``{channel, historyLimit?, since?, epoch?}`` answers ``{success, history,
offset, epoch[, recovered]}``; ``mesh/unsubscribe-channel`` ``{channel}``
answers whether the connection was subscribed; ``mesh/get-channel-history``
``{channel, limit?, since?, epoch?}`` answers like a subscribe. Each
subscriber gets ``mesh/subscription-message`` ``{channel, message[, offset,
epoch]}`` (``offset``/``epoch`` for messages written with history by our
instances). History is the *latest* N, oldest first.

How a message reaches subscribers: an instance listens, through the store's
bus (:class:`~mesh_core.app.PubSub`), to the channel itself (what reference
instances publish) and to its offsets channel (what ours announce, right
before the bare copy: see :mod:`mesh_core.storage._ops`). An announcement is
delivered with its offset and its bare copy, which follows it, is dropped; a
bare message with no announcement (a reference writer's) is delivered as it
is. One push is encoded and framed once for every local subscriber; a
subscriber that does not read is dropped by its send buffer, like any slow
consumer.

Every local subscription of a channel shares one *tap* (one listener on the
bus); a tap that lost its last subscriber is let go and a later subscriber
gets a new one, so a release in progress never unsubscribes its successor.
"""

from __future__ import annotations

import inspect
import logging
import re
import secrets
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import ValidationError
from ..protocol._frames import encode_push
from ..protocol._server_connection import text_frame
from ..storage import _ops as ops

if TYPE_CHECKING:
    from ._api import Connection, ConnectionRef
    from ._builtins import Steps
    from ._server import ServerCore

__all__ = [
    "ChannelAccess",
    "ChannelServerOp",
    "ChannelSettings",
    "ChannelsAPI",
    "JoinChannel",
    "LeaveChannel",
    "RESERVED_CHANNEL_PREFIX",
    "SUBSCRIPTION_MESSAGE",
    "get_channel_history",
    "subscribe_channel",
    "unsubscribe_channel",
]

log = logging.getLogger("mesh_core.channels")

SUBSCRIPTION_MESSAGE = "mesh/subscription-message"
#: channel names the framework keeps for itself (presence, offsets, ...)
RESERVED_CHANNEL_PREFIX = "mesh:"
#: ``limit`` of ``mesh/get-channel-history`` when none is given (the reference's)
DEFAULT_HISTORY_READ = 50
_REFUSED = {"success": False, "history": []}


# -- operations the server runs (application code and local state) ------------


@dataclass(frozen=True, slots=True)
class ChannelServerOp(ops.Op):
    """Base of the channel operations executed by the server, not the store."""


@dataclass(frozen=True, slots=True)
class ChannelSettings(ChannelServerOp):
    """Result: ``max_channel_history``."""


@dataclass(frozen=True, slots=True)
class ChannelAccess(ChannelServerOp):
    """Result: whether connection ``connection_id`` may subscribe to / read
    ``channel`` (exposed, not ``mesh:``, its guard agrees)."""

    connection_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class JoinChannel(ChannelServerOp):
    """Subscribe the connection locally. Result: ``True`` if it was not yet."""

    connection_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class LeaveChannel(ChannelServerOp):
    """Unsubscribe the connection locally. Result: ``True`` if it was."""

    connection_id: str
    channel: str


# -- payload checks ---------------------------------------------------------------


def _channel(payload: Any) -> str:
    value = payload.get("channel") if isinstance(payload, dict) else None
    if not isinstance(value, str) or not value:
        raise ValidationError("payload.channel must be a non-empty string")
    return value


def _count(payload: dict[str, Any], name: str, maximum: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= maximum:
        raise ValidationError(f"payload.{name} must be an integer from 0 to {maximum}")
    return value


def _position(payload: dict[str, Any]) -> tuple[int | None, str | None]:
    since, epoch = payload.get("since"), payload.get("epoch")
    if since is not None and (type(since) is not int or since < 0):
        raise ValidationError("payload.since must be an offset (an integer >= 0)")
    if epoch is not None and not isinstance(epoch, str):
        raise ValidationError("payload.epoch must be a string")
    return since, epoch


def _reply(read: ops.ChannelHistory, since: int | None, offset: int | None) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "success": True,
        "history": read.messages,
        "offset": read.offset if read.offset is not None else offset,
        "epoch": read.epoch,
    }
    if since is not None:
        reply["recovered"] = read.recovered
    return reply


# -- the built-ins ------------------------------------------------------------------


def subscribe_channel(connection_id: str, payload: Any) -> Steps:
    channel = _channel(payload)
    maximum = yield ChannelSettings()
    limit = _count(payload, "historyLimit", maximum) or 0
    since, epoch = _position(payload)
    if not (yield ChannelAccess(connection_id, channel)):
        return dict(_REFUSED)
    # the position before the subscription: what is written after it is
    # either delivered live or recoverable with since=<it>
    position = yield ops.GetChannelHistory(channel, 0)
    yield JoinChannel(connection_id, channel)
    if since is None and not limit:
        return {"success": True, "history": [], "offset": position.last, "epoch": position.epoch}
    read = yield ops.GetChannelHistory(channel, limit or maximum, since, epoch)
    return _reply(read, since, since if since is not None else position.last)


def unsubscribe_channel(connection_id: str, payload: Any) -> Steps:
    channel = _channel(payload)
    return bool((yield LeaveChannel(connection_id, channel)))


def get_channel_history(connection_id: str, payload: Any) -> Steps:
    channel = _channel(payload)
    maximum = yield ChannelSettings()
    limit = _count(payload, "limit", maximum)
    since, epoch = _position(payload)
    if not limit:  # the reference's `limit || 50`; everything after `since`
        limit = maximum if since is not None else min(DEFAULT_HISTORY_READ, maximum)
    if not (yield ChannelAccess(connection_id, channel)):
        return dict(_REFUSED)
    read = yield ops.GetChannelHistory(channel, limit, since, epoch)
    return _reply(read, since, since)


# -- local subscriptions --------------------------------------------------------


class _Tap:
    """One channel's local subscribers and its listener on the store's bus."""

    __slots__ = ("announced", "channel", "connections")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.connections: dict[str, Connection] = {}
        # messages announced with an offset whose bare copy is still to come
        # (normally one; a few if another writer's publish got in between)
        self.announced: deque[bytes] = deque(maxlen=16)

    def __call__(self, bus_channel: str, data: bytes) -> None:
        if bus_channel == self.channel:
            if data in self.announced:
                self.announced.remove(data)  # our own write's bare copy
                return
            payload: dict[str, Any] = {"channel": self.channel, "message": _text(data)}
        else:
            try:
                offset, epoch, message = ops.split_envelope(data)
            except ValueError:
                log.warning("ignoring a malformed announcement on %r", bus_channel)
                return
            self.announced.append(message)
            payload = {
                "channel": self.channel,
                "message": _text(message),
                "offset": offset,
                "epoch": epoch,
            }
        if self.connections:
            frame = text_frame(encode_push(SUBSCRIPTION_MESSAGE, payload))
            for connection in list(self.connections.values()):
                connection.proto.send_frame(frame)


def _text(data: bytes) -> str:
    return data.decode(errors="replace")


def _check_message(channel: Any, message: Any) -> None:
    if not isinstance(channel, str) or not channel:
        raise ValidationError("a channel name is a non-empty string")
    if channel.startswith(RESERVED_CHANNEL_PREFIX):
        raise ValidationError(f"{channel!r}: mesh: channels are the framework's")
    if not isinstance(message, str):
        raise ValidationError(
            f"a channel message is a string (JSON-encode it), not {type(message).__name__}"
        )


class ChannelsAPI:
    """Channels of this server (``server.channels``); see the module docstring."""

    def __init__(self, server: ServerCore) -> None:
        self._server = server
        self._taps: dict[str, _Tap] = {}
        self._joined: dict[str, dict[str, None]] = {}  # connection id -> channels

    # -- writing ----------------------------------------------------------------

    async def write(self, channel: str, message: str, history: int = 0) -> int | None:
        """Publish ``message`` (a string) to every subscriber of ``channel``
        on every instance; with ``history`` > 0 also keep it, with the last
        ``history`` messages (at most ``max_channel_history``). Returns the
        message's offset (``None`` when written without history)."""
        _check_message(channel, message)
        maximum = self._server.options.max_channel_history
        if type(history) is not int or not 0 <= history <= maximum:
            raise ValidationError(f"history must be an integer from 0 to {maximum}")
        if not history:
            await self._server.pubsub.publish(channel, message)
            return None
        offset, _ = await self._server.execute(
            ops.WriteChannel(channel, message, history, secrets.token_hex(4))
        )
        return int(offset)

    async def history(
        self,
        channel: str,
        limit: int = DEFAULT_HISTORY_READ,
        *,
        since: int | None = None,
        epoch: str | None = None,
    ) -> ops.ChannelHistory:
        """The latest ``limit`` kept messages (with ``since``: those after
        that offset; see :class:`~mesh_core.storage.GetChannelHistory`)."""
        return await self._server.execute(  # type: ignore[no-any-return]
            ops.GetChannelHistory(channel, limit, since, epoch)
        )

    # -- subscriptions ------------------------------------------------------------

    async def subscribe(self, connection: ConnectionRef, channel: str) -> bool:
        """Subscribe a connection held here (no exposure check: the server
        decides). ``True`` if it was not subscribed yet."""
        target = self._local(connection)
        if target is None:
            return False
        if channel.startswith(RESERVED_CHANNEL_PREFIX):
            raise ValidationError(f"{channel!r}: mesh: channels are the framework's")
        tap = self._taps.get(channel)
        if tap is None:
            tap = self._taps[channel] = _Tap(channel)
        if target.id in tap.connections:
            return False
        tap.connections[target.id] = target
        self._joined.setdefault(target.id, {})[channel] = None
        pubsub = self._server.pubsub
        try:
            # the announcements first: a bare copy never arrives without its
            # announcement before it
            await pubsub.subscribe(ops.offsets_channel(channel), tap)
            await pubsub.subscribe(channel, tap)
        except BaseException:
            await self._remove(target.id, channel)
            raise
        if not target.is_open:  # it left meanwhile (its cleanup may have run)
            await self._remove(target.id, channel)
            return False
        return True

    async def unsubscribe(self, connection: ConnectionRef, channel: str) -> bool:
        """``True`` if the connection was subscribed."""
        return await self._remove(_cid(connection), channel)

    def subscribers(self, channel: str) -> list[Connection]:
        """The connections held here that are subscribed to ``channel``."""
        tap = self._taps.get(channel)
        return list(tap.connections.values()) if tap is not None else []

    def channels_of(self, connection: ConnectionRef) -> list[str]:
        """The channels a connection held here is subscribed to."""
        return list(self._joined.get(_cid(connection), ()))

    def channels(self) -> list[str]:
        """Channels with at least one subscriber here."""
        return [name for name, tap in self._taps.items() if tap.connections]

    async def may_access(self, connection: Connection, channel: str) -> bool:
        """Exposed (and not ``mesh:``), and the matching pattern's guard agrees."""
        if not channel or channel.startswith(RESERVED_CHANNEL_PREFIX):
            return False
        for pattern, guard in self._server.app.exposed_channels:
            if pattern == channel if isinstance(pattern, str) else _search(pattern, channel):
                if guard is None:
                    return True
                try:
                    verdict = guard(connection, channel)
                    if inspect.isawaitable(verdict):
                        verdict = await verdict
                except Exception:
                    log.exception("channel guard for %r failed; refusing", channel)
                    return False
                return bool(verdict)
        return False

    # -- what the server calls --------------------------------------------------

    async def execute(self, op: ChannelServerOp) -> Any:
        """Run one of the built-ins' server operations."""
        if isinstance(op, ChannelSettings):
            return self._server.options.max_channel_history
        if isinstance(op, LeaveChannel):
            return await self._remove(op.connection_id, op.channel)
        if isinstance(op, ChannelAccess | JoinChannel):
            connection = self._server._local.get(op.connection_id)
            if connection is None:
                return False
            if isinstance(op, ChannelAccess):
                return await self.may_access(connection, op.channel)
            return await self.subscribe(connection, op.channel)
        raise TypeError(f"not a channel operation: {op!r}")

    async def connection_closed(self, connection: Connection) -> None:
        """A connection ended: it leaves every channel (the store subscription
        of a channel ends with its last local subscriber)."""
        for channel in list(self._joined.get(connection.id, ())):
            await self._remove(connection.id, channel)

    def clear(self) -> None:
        """The server stops: forget every subscription (the store drops its own)."""
        self._taps.clear()
        self._joined.clear()

    # -- internals ------------------------------------------------------------------

    def _local(self, connection: ConnectionRef) -> Connection | None:
        target = self._server._local.get(_cid(connection))
        return target if target is not None and target.is_open else None

    async def _remove(self, connection_id: str, channel: str) -> bool:
        tap = self._taps.get(channel)
        if tap is None or tap.connections.pop(connection_id, None) is None:
            return False
        joined = self._joined.get(connection_id)
        if joined is not None:
            joined.pop(channel, None)
            if not joined:
                del self._joined[connection_id]
        if not tap.connections and self._taps.get(channel) is tap:
            del self._taps[channel]  # a later subscriber gets a tap of its own
            pubsub = self._server.pubsub
            await pubsub.unsubscribe(channel, tap)
            await pubsub.unsubscribe(ops.offsets_channel(channel), tap)
        return True


def _search(pattern: re.Pattern[str], channel: str) -> bool:
    return pattern.search(channel) is not None


def _cid(connection: ConnectionRef) -> str:
    return connection if isinstance(connection, str) else connection.id

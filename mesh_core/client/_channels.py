"""Channels on the client side, runtime-neutral: subscribe with history,
unsubscribe, read history, and resume after a reconnect.

Built on the client's command and push plumbing only (``command``, ``on``,
``_spawn_awaitable``), so both ``MeshClient`` s have it. The server marks
each message written with history with an ``offset`` (and the channel's
``epoch``); this side keeps, per channel, the last position it delivered, and:

* while a subscribe is being answered, live messages of that channel wait,
  so the callback sees the history first, then live messages;
* a live message at or before the position delivered is a duplicate (it was
  in the history just delivered) and is dropped;
* after a reconnect each channel is subscribed again with ``since`` = that
  position: what was written meanwhile comes back, once, in order, before
  anything live; ``recovered`` says whether all of it could be.

Against a server that sends no offsets (the reference) it falls back to the
reference client's behaviour (subscribe again with the same history limit).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._errors import MeshCommandError
from ._options import ClientOptions, is_error_payload

if TYPE_CHECKING:
    from ._supervisor import ClientBinding

__all__ = ["ChannelCallback", "ChannelSubscription", "ClientChannels", "History"]

log = logging.getLogger("mesh_client")

#: ``callback(message)``, sync or async (an async one runs as a task of the client)
ChannelCallback = Callable[[str], Any]

SUBSCRIPTION_MESSAGE = "mesh/subscription-message"


class History(list[str]):
    """The messages of a history read, oldest first, with where they end:
    ``offset`` (of the last one, or the position read), ``epoch``, and with
    ``since``, ``recovered`` (``True``: every message after ``since``)."""

    offset: int | None = None
    epoch: str | None = None
    recovered: bool | None = None


@dataclass(eq=False)
class ChannelSubscription:
    """One channel this client is subscribed to (``client.channel_subscriptions``)."""

    channel: str
    callback: ChannelCallback
    history_limit: int
    #: the last position delivered to the callback (``None``: none known)
    offset: int | None = None
    epoch: str | None = None
    #: after the last resume: whether every message written meanwhile came back
    recovered: bool | None = None
    #: live messages held while a (re)subscribe is being answered
    pending: list[dict[str, Any]] | None = field(default=None, repr=False)


class ClientChannels:
    """The channel methods of ``ClientCore`` (a mixin; call
    :meth:`_init_channels` once)."""

    # what ClientCore provides
    async def command(self, command: str, payload: Any = None, timeout: float | None = 30.0) -> Any:
        raise NotImplementedError

    def on(self, name: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def _spawn_awaitable(self, awaitable: Awaitable[Any]) -> None:
        raise NotImplementedError

    def _check(self, command: str, payload: Any) -> Any:
        raise NotImplementedError

    options: ClientOptions
    binding: ClientBinding

    def _init_channels(self) -> None:
        self.channel_subscriptions: dict[str, ChannelSubscription] = {}
        self.on(SUBSCRIPTION_MESSAGE, self._on_channel_message)
        self.on("reconnect", self._resubscribe_channels)

    # -- the API ----------------------------------------------------------------

    async def subscribe_channel(
        self, channel: str, callback: ChannelCallback, history_limit: int = 0
    ) -> History:
        """Subscribe to ``channel``: ``callback(message)`` gets the latest
        ``history_limit`` kept messages (oldest first), then every message
        written after them. Returns that history. Resumed after a reconnect.
        A channel the server does not expose (or whose guard refuses) raises
        :class:`~mesh_core.MeshCommandError` (returns an empty history with
        ``raise_errors=False``)."""
        sub = ChannelSubscription(channel, callback, history_limit, pending=[])
        self.channel_subscriptions[channel] = sub
        payload: dict[str, Any] = {"channel": channel}
        if history_limit:
            payload["historyLimit"] = history_limit
        try:
            result = await self.command("mesh/subscribe-channel", payload)
        except BaseException:
            self._forget_channel(sub)
            raise
        return self._channel_subscribed(sub, "mesh/subscribe-channel", result)

    async def unsubscribe_channel(self, channel: str) -> bool:
        """Stop receiving ``channel``; ``True`` if the server had it subscribed."""
        sub = self.channel_subscriptions.pop(channel, None)
        if sub is not None:
            sub.pending = None
        result = await self.command("mesh/unsubscribe-channel", {"channel": channel})
        return result is True

    async def get_channel_history(
        self, channel: str, limit: int | None = None, since: int | None = None
    ) -> History:
        """Kept messages of ``channel`` without subscribing: the latest
        ``limit`` (the server's default 50), or with ``since`` (an offset) the
        ones after it (``recovered`` says whether all of them)."""
        payload: dict[str, Any] = {"channel": channel}
        if limit is not None:
            payload["limit"] = limit
        if since is not None:
            payload["since"] = since
        result = await self.command("mesh/get-channel-history", payload)
        return self._history_reply("mesh/get-channel-history", channel, result)

    # -- replies and pushes -----------------------------------------------------

    def _history_reply(self, command: str, channel: str, result: Any) -> History:
        result = self._check(command, result)  # an error payload raises (raise_errors)
        if not (isinstance(result, dict) and result.get("success") is True):
            self._check(
                command,
                {
                    "error": f"channel {channel!r} is not exposed to this client",
                    "code": "EREFUSED",
                    "name": "ChannelRefused",
                },
            )
            return History()
        raw = result.get("history")
        history = (
            History(m for m in raw if isinstance(m, str)) if isinstance(raw, list) else History()
        )
        offset, epoch, recovered = (
            result.get("offset"),
            result.get("epoch"),
            result.get("recovered"),
        )
        history.offset = offset if type(offset) is int else None
        history.epoch = epoch if isinstance(epoch, str) else None
        history.recovered = recovered if isinstance(recovered, bool) else None
        return history

    def _channel_subscribed(self, sub: ChannelSubscription, command: str, result: Any) -> History:
        try:
            history = self._history_reply(command, sub.channel, result)
        except MeshCommandError:
            self._forget_channel(sub)
            raise
        if not (isinstance(result, dict) and result.get("success") is True):
            self._forget_channel(sub)
            return history
        if self.channel_subscriptions.get(sub.channel) is not sub:
            return history  # unsubscribed (or subscribed again) meanwhile
        for message in history:
            self._call_channel(sub, message)
        if history.offset is not None:
            sub.offset, sub.epoch = history.offset, history.epoch
        pending, sub.pending = sub.pending or [], None
        for payload in pending:
            self._accept_channel_message(sub, payload)
        return history

    def _forget_channel(self, sub: ChannelSubscription) -> None:
        if self.channel_subscriptions.get(sub.channel) is sub:
            del self.channel_subscriptions[sub.channel]
        sub.pending = None

    def _on_channel_message(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        channel = payload.get("channel")
        sub = self.channel_subscriptions.get(channel) if isinstance(channel, str) else None
        if sub is None:
            return
        if sub.pending is not None:
            sub.pending.append(payload)
        else:
            self._accept_channel_message(sub, payload)

    def _accept_channel_message(self, sub: ChannelSubscription, payload: dict[str, Any]) -> None:
        message = payload.get("message")
        if not isinstance(message, str):
            return
        offset, epoch = payload.get("offset"), payload.get("epoch")
        if type(offset) is int:
            if epoch == sub.epoch and sub.offset is not None and offset <= sub.offset:
                return  # already delivered (it was in the history)
            sub.offset, sub.epoch = offset, epoch if isinstance(epoch, str) else None
        self._call_channel(sub, message)

    def _call_channel(self, sub: ChannelSubscription, message: str) -> None:
        try:
            result = sub.callback(message)
        except Exception:
            log.exception("channel callback for %r failed", sub.channel)
            return
        if inspect.isawaitable(result):
            self._spawn_awaitable(result)

    # -- after a reconnect ------------------------------------------------------

    async def _resubscribe(self, sub: ChannelSubscription, payload: dict[str, Any]) -> Any:
        """One channel's subscribe again. While the server's store is away
        (``EUNAVAILABLE``) it is asked again, backing off like a reconnect,
        for as long as the channel is wanted: a client that came back during
        a Redis outage still resumes once Redis does."""
        delay = max(self.options.reconnect_interval, 0.05)
        while True:
            try:
                result = await self.command("mesh/subscribe-channel", payload)
            except MeshCommandError as exc:
                result = exc.payload
            if not (is_error_payload(result) and result.get("code") == "EUNAVAILABLE"):
                return self._check("mesh/subscribe-channel", result)
            if self.channel_subscriptions.get(sub.channel) is not sub:
                return result
            await self.binding.runtime.sleep(delay)
            delay = min(2 * delay, self.options.max_reconnect_interval)

    async def _resubscribe_channels(self) -> None:
        subs = list(self.channel_subscriptions.values())
        for sub in subs:
            sub.pending = []  # hold live messages until the history is in
        for sub in subs:
            payload: dict[str, Any] = {"channel": sub.channel}
            if sub.offset is not None:
                payload["since"] = sub.offset
                if sub.epoch is not None:
                    payload["epoch"] = sub.epoch
            elif sub.history_limit:
                payload["historyLimit"] = sub.history_limit
            try:
                result = await self._resubscribe(sub, payload)
            except Exception as exc:
                log.warning("Mesh client: could not resubscribe to %r: %s", sub.channel, exc)
                sub.pending = None
                continue
            if isinstance(result, dict) and "since" in payload:
                recovered = result.get("recovered")
                sub.recovered = recovered if isinstance(recovered, bool) else None
            try:
                self._channel_subscribed(sub, "mesh/subscribe-channel", result)
            except MeshCommandError as exc:
                log.warning("Mesh client: channel %r refused on resubscribe: %s", sub.channel, exc)

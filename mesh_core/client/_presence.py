"""The client's presence helpers, runtime-neutral (PROTOCOL.md, presence).

Mixed into :class:`~mesh_core.client.ClientCore`, so ``mesh_asyncio`` and
``mesh_trio`` clients both have them: it only uses the core's ``command``,
its listeners and the adapter's way of running a callback.

A presence callback receives dicts. ``mesh/presence-update`` pushes arrive
as the server sends them (``{"type": "join" | "leave", "connectionId",
"roomName", "timestamp"}`` or ``{"type": "state", ..., "state"}``), and the
current members come as ``{"type": "sync", "roomName", "present": [{"id",
"metadata"}], "states": {id: state}}``: once when the subscription is made,
and again after every reconnect (a client that was away has missed events, so
it is told where things stand instead).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["PresenceCallback", "PresenceClient"]

log = logging.getLogger("mesh_client")

#: ``callback(update)``; may be ``async``
PresenceCallback = Callable[[dict[str, Any]], Any]

UPDATE = "mesh/presence-update"


class PresenceClient:
    """Presence subscriptions of one client, kept across reconnects."""

    _presence: dict[str, PresenceCallback]

    # provided by ClientCore and the adapter
    async def command(self, command: str, payload: Any = None, timeout: float | None = 30.0) -> Any:
        raise NotImplementedError

    def on(self, name: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def _spawn_awaitable(self, awaitable: Awaitable[Any]) -> None:
        raise NotImplementedError

    def _init_presence(self) -> None:
        self._presence = {}
        self.on(UPDATE, self._on_presence_update)
        self.on("reconnect", self._resubscribe_presence)

    @property
    def presence_rooms(self) -> frozenset[str]:
        """Rooms whose presence this client follows (again after a reconnect)."""
        return frozenset(self._presence)

    async def subscribe_presence(self, room: str, callback: PresenceCallback) -> dict[str, Any]:
        """Follow the presence of ``room``: ``callback`` is told the current
        members at once (a ``"sync"`` update), then every join, leave and
        state change. Returns ``{"success", "present", "states"}``;
        ``success`` is ``False`` when the room is not tracked or its guard
        refuses."""
        result = await self.command("mesh/subscribe-presence", {"roomName": room})
        if not (isinstance(result, dict) and result.get("success")):
            return {"success": False, "present": [], "states": {}}
        self._presence[room] = callback
        snapshot = _snapshot(room, result)
        await _call(callback, snapshot)
        return {"success": True, "present": snapshot["present"], "states": snapshot["states"]}

    async def unsubscribe_presence(self, room: str) -> bool:
        self._presence.pop(room, None)
        result = await self.command("mesh/unsubscribe-presence", {"roomName": room})
        return result is True

    async def publish_presence_state(
        self,
        room: str,
        state: Any,
        expire_after: float | None = None,
        silent: bool = False,
    ) -> bool:
        """Publish this client's state in ``room`` (it must have joined a
        tracked room). ``expire_after`` (milliseconds) clears it by then;
        ``silent`` stores it without telling subscribers."""
        payload: dict[str, Any] = {"roomName": room, "state": state}
        if expire_after is not None:
            payload["expireAfter"] = expire_after
        if silent:
            payload["silent"] = True
        return await self.command("mesh/publish-presence-state", payload) is True

    async def clear_presence_state(self, room: str) -> bool:
        return await self.command("mesh/clear-presence-state", {"roomName": room}) is True

    async def get_presence_state(self, room: str) -> dict[str, Any]:
        """``{"success", "present": [ids], "states": {id: state}}`` without
        subscribing."""
        result = await self.command("mesh/get-presence-state", {"roomName": room})
        if not (isinstance(result, dict) and result.get("success")):
            return {"success": False, "present": [], "states": {}}
        present = result.get("present")
        states = result.get("states")
        return {
            "success": True,
            "present": list(present) if isinstance(present, list) else [],
            "states": dict(states) if isinstance(states, dict) else {},
        }

    # -- pushes and reconnects -------------------------------------------------

    def _on_presence_update(self, payload: Any) -> None:
        room = payload.get("roomName") if isinstance(payload, dict) else None
        callback = self._presence.get(room) if isinstance(room, str) else None
        if callback is None:
            return
        try:
            result = callback(payload)
        except Exception:
            log.exception("presence callback for %r failed", room)
            return
        if inspect.isawaitable(result):
            self._spawn_awaitable(result)

    async def _resubscribe_presence(self) -> None:
        """After a reconnect (rooms are re-joined by then): subscribe again
        and tell each callback who is present now."""
        for room, callback in list(self._presence.items()):
            try:
                result = await self.command("mesh/subscribe-presence", {"roomName": room})
            except Exception as exc:
                log.warning("could not follow the presence of %r again: %s", room, exc)
                continue
            if self._presence.get(room) is not callback:
                continue  # unsubscribed meanwhile
            if not (isinstance(result, dict) and result.get("success")):
                log.warning("presence of %r refused after reconnect: %r", room, result)
                self._presence.pop(room, None)
                continue
            await _call(callback, _snapshot(room, result))


def _snapshot(room: str, result: dict[str, Any]) -> dict[str, Any]:
    present = result.get("present")
    states = result.get("states")
    return {
        "type": "sync",
        "roomName": room,
        "present": list(present) if isinstance(present, list) else [],
        "states": dict(states) if isinstance(states, dict) else {},
    }


async def _call(callback: PresenceCallback, update: dict[str, Any]) -> None:
    try:
        result = callback(update)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("presence callback for %r failed", update.get("roomName"))

"""The runtime-neutral half of ``MeshClient``: what outlives one socket."""

from __future__ import annotations

import enum
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from .._errors import MeshCommandError
from ..protocol._client_connection import ClientEvent, LatencyUpdated, Push
from ..protocol._frames import DEFAULT_MAX_MESSAGE_SIZE
from ._presence import PresenceCallback, PresenceClient

__all__ = [
    "ClientCore",
    "ClientOptions",
    "ClientStatus",
    "Endpoint",
    "LIFECYCLE_EVENTS",
    "PushBuffer",
    "check_response",
    "is_error_payload",
    "parse_url",
    "reconnect_delay",
]

log = logging.getLogger("mesh_client")

# -- errors --------------------------------------------------------------------


# -- configuration and pure helpers --------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Times in seconds. ``max_reconnect_attempts=None`` retries forever (the
    reference's default); ``reconnect_jitter`` is a fraction of each delay."""

    ping_timeout: float = 30.0
    max_missed_pings: int = 1
    reconnect: bool = True
    reconnect_interval: float = 2.0
    max_reconnect_interval: float = 30.0
    max_reconnect_attempts: int | None = None
    reconnect_jitter: float = 0.25
    raise_errors: bool = True
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: TCP + TLS + upgrade + ``mesh/assign-id``, per attempt
    connect_timeout: float = 10.0
    #: how long ``close()`` waits for the server's close frame
    close_timeout: float = 5.0
    #: pushes an unread ``pushes()`` iterator keeps before dropping the oldest
    push_buffer: int = 1024

    def __post_init__(self) -> None:
        if self.max_missed_pings < 0:
            raise ValueError("max_missed_pings must be >= 0")
        if self.reconnect_interval < 0 or self.max_reconnect_interval < 0:
            raise ValueError("reconnect intervals must be >= 0")
        if not 0 <= self.reconnect_jitter <= 1:
            raise ValueError("reconnect_jitter must be between 0 and 1")
        if self.max_reconnect_attempts is not None and self.max_reconnect_attempts < 0:
            raise ValueError("max_reconnect_attempts must be >= 0 or None")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1024 bytes")
        if self.push_buffer < 1:
            raise ValueError("push_buffer must be at least 1")


def reconnect_delay(attempt: int, options: ClientOptions, rand: float) -> float:
    """Delay before retry number ``attempt + 1`` (``attempt`` >= 1 failed so
    far): exponential from ``reconnect_interval`` up to
    ``max_reconnect_interval``, spread by ±jitter so that a restarted server
    is not hit by every client at the same instant. ``rand`` is in [0, 1)."""
    base = min(
        options.reconnect_interval * 2.0 ** max(0, attempt - 1), options.max_reconnect_interval
    )
    base = max(base, options.reconnect_interval)
    return max(0.0, base * (1 + options.reconnect_jitter * (2 * rand - 1)))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a ``ws://``/``wss://`` URL points, split for the socket layer
    (``host``, ``port``, ``secure``) and for the upgrade (``host_header``,
    ``target`` with the query string)."""

    host: str
    port: int
    secure: bool
    host_header: str
    target: str


def parse_url(url: str) -> Endpoint:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    secure = scheme == "wss"
    default = 443 if secure else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(host, port, secure, host_header, target)


def is_error_payload(payload: Any) -> bool:
    """The reference's error shape: ``{"error": str, "code": str, ...}``."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("error"), str)
        and isinstance(payload.get("code"), str)
    )


def check_response(command: str, payload: Any, raise_errors: bool) -> Any:
    if raise_errors and is_error_payload(payload):
        raise MeshCommandError(command, payload)
    return payload


class PushBuffer:
    """The queue behind one ``pushes()`` iterator. Bounded: a consumer that
    stops reading loses the oldest pushes instead of growing memory. ``wake``
    is the adapter's hook to resume a waiting reader."""

    __slots__ = ("closed", "dropped", "items", "wake")

    def __init__(self, maxlen: int) -> None:
        self.items: deque[Push] = deque(maxlen=maxlen)
        self.closed = False
        self.dropped = 0
        self.wake: Callable[[], None] = _noop

    def put(self, push: Push) -> None:
        if self.closed:
            return
        if len(self.items) == self.items.maxlen:
            self.dropped += 1
        self.items.append(push)
        self.wake()

    def close(self) -> None:
        self.closed = True
        self.wake()


def _noop() -> None:
    pass


# -- the runtime-neutral client ------------------------------------------------


class ClientStatus(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    ONLINE = "online"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


#: names ``on()`` treats as client lifecycle events rather than push commands
LIFECYCLE_EVENTS: Final = frozenset(
    {"connect", "disconnect", "reconnect", "reconnect_failed", "close", "latency"}
)

Callback = Callable[..., Any]


class ClientCore(PresenceClient):
    """What ``mesh_asyncio.MeshClient`` and ``mesh_trio.MeshClient`` share:
    options, listeners, push fan-out, joined rooms and the helper commands.
    The adapters provide :meth:`command` and :meth:`_spawn_awaitable`."""

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        options: ClientOptions,
    ) -> None:
        self.url = url
        self.endpoint = parse_url(url)
        self.options = options
        if headers is None:
            self.headers: list[tuple[str, str]] = []
        elif isinstance(headers, Mapping):
            self.headers = list(headers.items())
        else:
            self.headers = list(headers)
        self.connection_id: str | None = None
        #: last round trip the server measured, in milliseconds
        self.latency: float | None = None
        self.status = ClientStatus.IDLE
        self._rooms: dict[str, None] = {}  # insertion-ordered set
        self._listeners: dict[str, list[Callback]] = {}
        self._buffers: set[PushBuffer] = set()
        self._init_presence()

    # -- what the adapter provides --------------------------------------------

    async def command(self, command: str, payload: Any = None, timeout: float | None = 30.0) -> Any:
        raise NotImplementedError

    def _spawn_awaitable(self, awaitable: Awaitable[Any]) -> None:
        raise NotImplementedError

    # -- listeners ------------------------------------------------------------

    @property
    def rooms(self) -> frozenset[str]:
        """Rooms joined through this client (re-joined after a reconnect)."""
        return frozenset(self._rooms)

    def on(self, name: str, callback: Callback) -> Callback:
        """Call ``callback`` for a push named ``name`` (with its payload), or
        for a lifecycle event (:data:`LIFECYCLE_EVENTS`; ``latency`` gets the
        value in ms, the others no argument). A callback may be ``async``: it
        then runs as a task of the client, cancelled when the client closes."""
        self._listeners.setdefault(name, []).append(callback)
        return callback

    def off(self, name: str, callback: Callback) -> None:
        listeners = self._listeners.get(name, [])
        if callback in listeners:
            listeners.remove(callback)

    def _emit(self, name: str, *args: Any, collect: bool = False) -> list[Awaitable[Any]]:
        """Call listeners; async ones are spawned, or returned when
        ``collect`` (so that ``close`` can await its own listeners)."""
        pending: list[Awaitable[Any]] = []
        for callback in list(self._listeners.get(name, ())):
            try:
                result = callback(*args)
            except Exception:
                log.exception("Mesh client listener for %r failed", name)
                continue
            if inspect.isawaitable(result):
                if collect:
                    pending.append(result)
                else:
                    self._spawn_awaitable(result)
        return pending

    def _deliver(self, event: ClientEvent) -> None:
        """Hand a push or a latency report to listeners and iterators."""
        if isinstance(event, Push):
            if event.command not in LIFECYCLE_EVENTS:
                self._emit(event.command, event.payload)
            for buffer in list(self._buffers):
                buffer.put(event)
        elif isinstance(event, LatencyUpdated):
            self.latency = event.latency
            self._emit("latency", event.latency)

    def _close_buffers(self) -> None:
        for buffer in list(self._buffers):
            buffer.close()
        self._buffers.clear()

    def _check(self, command: str, payload: Any) -> Any:
        return check_response(command, payload, self.options.raise_errors)

    # -- helpers (the reference client's names, in snake_case) ---------------

    async def join_room(
        self, room: str, on_presence: PresenceCallback | None = None
    ) -> list[dict[str, Any]]:
        """Join ``room`` and return its members after the join (``present``).
        A joined room is re-joined after every reconnect. With
        ``on_presence``, also follow the room's presence (see
        :meth:`subscribe_presence`)."""
        result = await self.command("mesh/join-room", {"roomName": room})
        if not (isinstance(result, dict) and result.get("success")):
            return []
        self._rooms[room] = None
        if on_presence is not None:
            await self.subscribe_presence(room, on_presence)
        present = result.get("present")
        return list(present) if isinstance(present, list) else []

    async def leave_room(self, room: str) -> bool:
        result = await self.command("mesh/leave-room", {"roomName": room})
        ok = isinstance(result, dict) and result.get("success") is True
        if ok:
            self._rooms.pop(room, None)
            if room in self._presence:
                await self.unsubscribe_presence(room)
        return ok

    async def get_connection_metadata(self, connection_id: str | None = None) -> Any:
        """Metadata of ``connection_id`` (any instance's), or of this client."""
        if connection_id is None:
            result = await self.command("mesh/get-my-connection-metadata", {})
        else:
            result = await self.command(
                "mesh/get-connection-metadata", {"connectionId": connection_id}
            )
        return result.get("metadata") if isinstance(result, dict) else None

    async def set_connection_metadata(self, value: Any, strategy: str = "replace") -> bool:
        """Write this connection's metadata (``replace``, ``merge`` or
        ``deepMerge``); ``False`` when the server's policy refuses it."""
        result = await self.command(
            "mesh/set-my-connection-metadata",
            {"metadata": value, "options": {"strategy": strategy}},
        )
        return isinstance(result, dict) and result.get("success") is True

    async def get_room_metadata(self, room: str) -> Any:
        result = await self.command("mesh/get-room-metadata", {"roomName": room})
        return result.get("metadata") if isinstance(result, dict) else None

"""The runtime-neutral application: commands, middleware, hooks, policies.

An app is defined once and served unchanged by ``mesh_asyncio.MeshServer``
or ``mesh_trio.MeshServer``: its handlers are ``async def`` functions that
only await the Mesh API handed to them, so they run on either event loop.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ..protocol._handshake import UpgradeRequest
from ._channels import RESERVED_CHANNEL_PREFIX
from ._collections import CollectionsAppMixin
from ._presence import PresenceGuard, PresenceRules
from ._records import RecordsAppMixin

if TYPE_CHECKING:
    from ._api import Connection
    from ._server import ServerCore

__all__ = [
    "Authenticator",
    "ChannelGuard",
    "ChannelPattern",
    "ConnectionHook",
    "Context",
    "Handler",
    "MeshApp",
    "Middleware",
    "ReadGuard",
    "ReadPolicy",
    "WriteGuard",
    "WritePolicy",
]


@dataclass(slots=True)
class Context:
    """What a handler or middleware gets: the command, its payload, the
    calling connection and the server API. ``state`` lets middleware hand
    values on to the handler."""

    command: str
    payload: Any
    connection: Connection
    server: ServerCore
    id: int | None = None
    state: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Context], Awaitable[Any]]
Middleware = Callable[[Context], Awaitable[None]]
ConnectionHook = Callable[["Connection"], Awaitable[None]]
#: Returns the connection's initial metadata; a falsy result or
#: :class:`~mesh_core.Reject` refuses the upgrade (401 or the status named).
Authenticator = Callable[[UpgradeRequest], Awaitable[Any]]
#: ``guard(connection, value, strategy)``: may a client write this metadata?
WriteGuard = Callable[["Connection", Any, str], Awaitable[bool] | bool]
WritePolicy = Literal["allow", "deny"] | WriteGuard
#: ``guard(connection, target_id)``: may this client read another
#: connection's metadata?
ReadGuard = Callable[["Connection", str], Awaitable[bool] | bool]
ReadPolicy = Literal["allow", "deny"] | ReadGuard

#: an exact channel name, or a compiled pattern searched in the name (the
#: reference's ``string | RegExp``)
ChannelPattern = str | re.Pattern[str]
#: ``guard(connection, channel)``: may this client subscribe to / read it?
ChannelGuard = Callable[["Connection", str], Awaitable[bool] | bool]


F = TypeVar("F", bound=Callable[..., Any])


class MeshApp(RecordsAppMixin, CollectionsAppMixin):
    """Commands, middleware and hooks of one application.

    ``client_metadata_writes`` decides ``mesh/set-my-connection-metadata``:
    ``"allow"`` (the reference's behaviour, the default), ``"deny"``, or a
    guard ``(connection, value, strategy) -> bool`` (sync or async).

    ``client_metadata_reads`` decides what built-ins show a client about
    *other* connections (``mesh/get-connection-metadata``, the ``present``
    list of ``mesh/join-room``): ``"allow"`` (the reference's behaviour, the
    default), ``"deny"``, or a guard ``(connection, target_id) -> bool``.
    Metadata a client may not read comes back as ``null``; its own is always
    readable.
    """

    def __init__(
        self,
        *,
        client_metadata_writes: WritePolicy = "allow",
        client_metadata_reads: ReadPolicy = "allow",
    ) -> None:
        self.commands: dict[str, Handler] = {}
        self.global_middleware: list[Middleware] = []
        self.command_middleware: dict[str, list[Middleware]] = {}
        self.connection_hooks: list[ConnectionHook] = []
        self.disconnection_hooks: list[ConnectionHook] = []
        self.authenticator: Authenticator | None = None
        self.client_metadata_writes: WritePolicy = client_metadata_writes
        self.client_metadata_reads: ReadPolicy = client_metadata_reads
        #: the rooms whose presence is tracked (see :meth:`track_presence`)
        self.presence = PresenceRules()
        self.exposed_channels: list[tuple[ChannelPattern, ChannelGuard | None]] = []

    # -- commands -------------------------------------------------------------

    def expose_command(
        self, name: str, handler: Handler, middleware: Iterable[Middleware] = ()
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a command name is a non-empty string")
        if name.startswith("mesh/"):
            raise ValueError(f"{name!r}: the mesh/ prefix is reserved for built-in commands")
        self.commands[name] = handler
        middleware = list(middleware)
        if middleware:
            self.use_middleware_with_command(name, *middleware)

    def command(self, name: str, *middleware: Middleware) -> Callable[[F], F]:
        """Decorator form of :meth:`expose_command`."""

        def register(handler: F) -> F:
            self.expose_command(name, handler, middleware)
            return handler

        return register

    # -- channels -------------------------------------------------------------

    def expose_channel(self, pattern: ChannelPattern, guard: ChannelGuard | None = None) -> None:
        """Let clients subscribe to, and read the history of, the channels
        ``pattern`` matches: an exact name, or a compiled ``re.Pattern``
        searched in the name (as the reference's ``RegExp.test``). The first
        pattern that matches decides; its ``guard(connection, channel)``
        (sync or async) is asked on every subscribe and every history read,
        and one that raises refuses. A name starting with ``mesh:`` is never
        exposed, whatever the pattern: those channels are the framework's."""
        if isinstance(pattern, str):
            if not pattern:
                raise ValueError("a channel name is a non-empty string")
            if pattern.startswith(RESERVED_CHANNEL_PREFIX):
                raise ValueError(f"{pattern!r}: mesh: channels are the framework's")
        elif not isinstance(pattern, re.Pattern):
            raise TypeError(f"expected a str or a re.Pattern, got {type(pattern).__name__}")
        if guard is not None and not callable(guard):
            raise TypeError("guard must be callable")
        self.exposed_channels.append((pattern, guard))

    # -- middleware -----------------------------------------------------------

    def use_middleware(self, *middleware: Middleware) -> None:
        """Run before every command (built-ins included), in order."""
        self.global_middleware.extend(middleware)

    def use_middleware_with_command(self, name: str, *middleware: Middleware) -> None:
        """Run before one command (built-in or custom), after the global ones."""
        self.command_middleware.setdefault(name, []).extend(middleware)

    def middleware(self, command: str | None = None) -> Callable[[F], F]:
        """Decorator: ``@app.middleware()`` (global) or ``@app.middleware("cmd")``."""

        def register(fn: F) -> F:
            if command is None:
                self.use_middleware(fn)
            else:
                self.use_middleware_with_command(command, fn)
            return fn

        return register

    # -- presence -------------------------------------------------------------

    def track_presence(
        self,
        pattern: str | re.Pattern[str],
        *,
        ttl: float | None = None,
        guard: PresenceGuard | None = None,
    ) -> None:
        """Track who is present in the rooms matching ``pattern`` (a room
        name, or a compiled ``re.Pattern`` matched with ``search``): joining
        such a room marks a connection present, leaving or going marks it
        gone, and clients subscribed to the room's presence are told.

        ``ttl`` (milliseconds, as the reference's ``ttl``): a member that
        answers no ping for that long leaves, and comes back at its next pong.
        ``guard(connection, room) -> bool`` (sync or async) decides who may
        subscribe to, read, and publish states in the room's presence. The
        first matching call wins."""
        self.presence.track(pattern, ttl=ttl, guard=guard)

    # -- hooks ----------------------------------------------------------------

    def on_connection(self, hook: F) -> F:
        """Runs after the connection is registered and before the client gets
        its id, so metadata set here is visible to its first command."""
        self.connection_hooks.append(hook)
        return hook

    def on_disconnection(self, hook: F) -> F:
        """Runs when a connection ends, before it leaves its rooms and its
        metadata is removed (so the hook can still read both)."""
        self.disconnection_hooks.append(hook)
        return hook

    def authenticate_connection(self, fn: F) -> F:
        """Decide the upgrade; the returned value becomes the metadata."""
        self.authenticator = fn
        return fn

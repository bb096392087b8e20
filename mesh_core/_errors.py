"""Errors, split by blame, and the exact error payloads of PROTOCOL.md section 4.

A per-command failure is data (an error payload sent to the client); it never
escapes the core as an exception that could tear down a connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "StorageUnavailable",
    "CommandTimeout",
    "ConnectionRejected",
    "MeshClientError",
    "MeshCommandError",
    "MeshConnectionError",
    "RedisReplyError",
    "RedisUnavailable",
    "CommandError",
    "LocalProtocolError",
    "MeshError",
    "ServerStartupError",
    "ValidationError",
    "error_payload",
    "not_found_payload",
    "unavailable_payload",
]


class MeshError(Exception):
    """An error a handler or middleware raises to fail one request.

    ``code`` travels to the client as the payload's ``code`` (default
    ``ESERVER``, like the reference). ``name`` is ``"Error"`` for a plain
    ``MeshError``, the name the reference sends for a plain application error,
    so a mixed fleet answers alike; a subclass is named after itself
    (``CommandError``) unless it sets ``name``.
    """

    code: str = "ESERVER"
    name: str = "Error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def __init__(self, message: str = "", *, code: str | None = None, name: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if name is not None:
            self.name = name


class CommandError(MeshError):
    """A command could not be run as asked (unknown name, refused, bad input)."""

    code = "ECOMMAND"


class ValidationError(CommandError):
    """A built-in command's payload does not have the shape PROTOCOL.md gives."""

    code = "EINVAL"


def error_payload(exc: BaseException) -> dict[str, Any]:
    """Map an exception raised by a handler to the reference's error payload.

    The message is ``str(exc)``, the code is the exception's string ``code``
    attribute if it has one (any exception type may carry one) else
    ``ESERVER``, and the name is its string ``name`` attribute or its class
    name, so ``raise Exception("x")`` reads ``{"name": "Exception"}``.
    """
    code = getattr(exc, "code", None)
    name = getattr(exc, "name", None)
    return {
        "error": str(exc),
        "code": code if isinstance(code, str) else "ESERVER",
        "name": name if isinstance(name, str) else type(exc).__name__,
    }


#: what a client reads when the store failed it: a stable code and a generic
#: message. The driver's text (host, port, errno) describes the server's
#: network, not the client's mistake, so it goes to the server log only.
UNAVAILABLE_MESSAGE = "storage unavailable, safe to retry"


def unavailable_payload() -> dict[str, Any]:
    return {"error": UNAVAILABLE_MESSAGE, "code": "EUNAVAILABLE", "name": "StorageUnavailable"}


def not_found_payload(command: str) -> dict[str, Any]:
    return {
        "error": f'Command "{command}" not found',
        "code": "ENOTFOUND",
        "name": "CommandError",
    }


# -- the protocol state machines ----------------------------------------------


class LocalProtocolError(RuntimeError):
    """A connection state machine was called in a state where the call makes
    no sense (accept twice, opened before accept, a request before the
    connection is open): a bug in the caller, as in h11.

    A subclass of ``RuntimeError``, which these calls raised before, so code
    that caught that keeps working. The peer's faults are never raised: they
    come out as a close with the RFC's code, like wsproto's. A call that only
    arrives late (the peer left while the server was still authenticating) is
    no misuse either: it is ignored."""


# -- storage -------------------------------------------------------------------


class StorageUnavailable(Exception):
    """The store could not be reached, the connection broke, or an operation
    timed out. Requests that need the store are answered ``EUNAVAILABLE``."""

    code = "EUNAVAILABLE"


class RedisUnavailable(StorageUnavailable):
    """Redis could not be reached, the connection broke, or a command timed out."""


class RedisReplyError(Exception):
    """Redis answered a command with an error reply (``-NOSCRIPT ...``, ``-WRONGTYPE ...``).

    ``message`` (and ``str(exc)``) is the full reply text including its prefix,
    e.g. ``"NOSCRIPT No matching script. Please use EVAL."``; ``prefix`` is its
    first word (``"NOSCRIPT"``), the usual way to tell error kinds apart.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def prefix(self) -> str:
        return self.message.split(" ", 1)[0]

    def __repr__(self) -> str:
        return f"RedisReplyError({self.message!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RedisReplyError):
            return NotImplemented
        return self.message == other.message

    def __hash__(self) -> int:
        return hash(self.message)


# -- running a server ------------------------------------------------------------


class ServerStartupError(Exception):
    """The server could not start: the port is taken, the store is down, the
    store's URL is wrong. The message says what and what to do, in one line,
    for an operator (``mesh serve`` prints it and exits 1); the original
    exception is its ``__cause__``."""


# -- errors --------------------------------------------------------------------


class MeshClientError(Exception):
    """Base of what ``MeshClient`` raises; ``code`` mirrors the reference
    client's error codes so code ported from it can keep switching on them."""

    code: str = "ECLIENT"


class MeshCommandError(MeshClientError):
    """The server answered with an error payload ``{"error", "code", "name"}``.

    The payload is kept whole (``.payload``) because applications may add
    fields the reference shape does not name."""

    def __init__(self, command: str, payload: Mapping[str, Any]) -> None:
        super().__init__(str(payload.get("error", "")))
        self.command = command
        self.payload = dict(payload)
        code = payload.get("code")
        name = payload.get("name")
        self.code = code if isinstance(code, str) else "EUNKNOWN"
        self.name = name if isinstance(name, str) else "Error"

    def __repr__(self) -> str:
        return f"MeshCommandError({self.command!r}, code={self.code!r}, error={str(self)!r})"


class MessageTooLarge(MeshClientError, ValueError):
    """A request is larger than the client's ``max_message_size``: it is not
    sent, because a server with the same limit would close the connection
    (1009) and every command in flight on it would fail."""

    code = "ETOOLARGE"

    def __init__(self, command: str, size: int, limit: int) -> None:
        super().__init__(
            f"request {command!r} is {size} bytes, over the client's max_message_size "
            f"of {limit} bytes: not sent (the server's --max-message-size is usually the same)"
        )
        self.command = command
        self.size = size
        self.limit = limit


class CommandTimeout(MeshClientError, TimeoutError):
    """No response within the command's timeout (the reference's ``ETIMEOUT``).
    The request id is freed: a late response is dropped, never misrouted."""

    code = "ETIMEOUT"

    def __init__(self, command: str, timeout: float) -> None:
        super().__init__(f"command {command!r} timed out after {timeout:g} s")
        self.command = command
        self.timeout = timeout


class MeshConnectionError(MeshClientError, ConnectionError):
    """The client could not connect, gave up reconnecting, was closed, or lost
    the connection while a command was in flight (the command may or may not
    have run: it is never resent, because commands need not be idempotent)."""

    code = "ECONNECTION"


class ConnectionRejected(MeshConnectionError):
    """The server refused the WebSocket upgrade (handshake authentication)."""

    def __init__(self, status: int, body: bytes = b"") -> None:
        text = body.decode("utf-8", "replace").strip()
        super().__init__(f"upgrade rejected with HTTP {status}" + (f": {text}" if text else ""))
        self.status = status
        self.body = body

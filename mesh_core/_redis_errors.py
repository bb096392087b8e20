"""Errors of the Redis I/O layer, shared by both runtimes (pure: no I/O imports).

The runtime-specific transports (``mesh_asyncio._redis_transport`` and
``mesh_trio._redis_transport``) raise these, so the runtime-neutral Redis
storage logic in ``mesh_core`` can handle them without knowing the runtime.
"""

from __future__ import annotations

__all__ = ["RedisReplyError", "RedisUnavailable"]


class RedisUnavailable(Exception):
    """Redis could not be reached, the connection broke, or a command timed out."""

    code = "EUNAVAILABLE"


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

"""Errors, split by blame, and the exact error payloads of PROTOCOL.md section 4.

A per-command failure is data (an error payload sent to the client); it never
escapes the core as an exception that could tear down a connection.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CommandError",
    "MeshError",
    "ValidationError",
    "error_payload",
    "not_found_payload",
]


class MeshError(Exception):
    """An error a handler or middleware raises to fail one request.

    ``code`` travels to the client as the payload's ``code`` (default
    ``ESERVER``, like the reference); ``name`` defaults to the class name.
    """

    code: str = "ESERVER"

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


def not_found_payload(command: str) -> dict[str, Any]:
    return {
        "error": f'Command "{command}" not found',
        "code": "ENOTFOUND",
        "name": "CommandError",
    }

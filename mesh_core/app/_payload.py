"""Reading a command's payload, the same way for every built-in."""

from __future__ import annotations

from typing import Any

from .._errors import ValidationError

__all__ = ["field"]


def field(payload: Any, name: str) -> str:
    """``payload[name]`` as a non-empty string, or the ``EINVAL`` error."""
    value = payload.get(name) if isinstance(payload, dict) else None
    if not isinstance(value, str) or not value:
        raise ValidationError(f"payload.{name} must be a non-empty string")
    return value

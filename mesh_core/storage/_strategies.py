"""The metadata update strategies of PROTOCOL.md section 7, as pure functions.

Drivers apply these inside their atomic read-modify-write, so the rule exists
once and every store agrees on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from .._errors import ValidationError

__all__ = ["STRATEGIES", "Strategy", "apply_strategy", "deep_merge", "merge", "replace", "updater"]

Strategy = Literal["replace", "merge", "deepMerge"]
STRATEGIES: tuple[str, ...] = ("replace", "merge", "deepMerge")


def replace(old: Any, new: Any) -> Any:
    return new


def merge(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **new}
    return new


def deep_merge(old: Any, new: Any) -> Any:
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    out = dict(old)
    for key, value in new.items():
        current = out.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            out[key] = deep_merge(current, value)
        else:
            out[key] = value
    return out


_BY_NAME: dict[str, Callable[[Any, Any], Any]] = {
    "replace": replace,
    "merge": merge,
    "deepMerge": deep_merge,  # no snake_case alias: one name, as on the wire
}


def check_strategy(strategy: object) -> Callable[[Any, Any], Any]:
    """Return the merge function for a strategy name, or fail with EINVAL."""
    fn = _BY_NAME.get(strategy) if isinstance(strategy, str) else None
    if fn is None:
        raise ValidationError(
            f"Unknown metadata strategy {strategy!r}: expected one of replace, merge, deepMerge"
        )
    return fn


def apply_strategy(strategy: object, old: Any, new: Any) -> Any:
    return check_strategy(strategy)(old, new)


def updater(strategy: object, new: Any) -> Callable[[Any], Any]:
    """A one-argument function ``old -> stored`` for an atomic update."""
    fn = check_strategy(strategy)
    if fn is replace:
        return lambda _old: new
    return lambda old: fn(old, new)

"""What a record change is, decided once for every driver: strict JSON
equality and the RFC 6902 patch from one value to the next.

Equality is JSON's, not Python's: ``1``, ``1.0`` and ``true`` are three
different values here (Python says ``1 == True``), so a change between them
is a change and reaches subscribers. The patch comes from the ``jsonpatch``
library; between values that are not both containers (numbers, strings,
booleans, ``null``, or a change of type) it is one ``replace`` of the whole
document (path ``""``), which ``fast-json-patch``'s ``applyPatch`` (what
reference-client applications apply patches with) and ``jsonpatch`` both
apply. The reference diffs such values to an empty patch and drops the write.
"""

from __future__ import annotations

from typing import Any

import jsonpatch

__all__ = ["record_patch", "same_json"]


def same_json(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` encode to the same JSON value (key order of
    objects aside)."""
    if a is b:
        return True  # a merge keeps the members it does not change
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same_json(value, b[key]) for key, value in a.items())
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(same_json(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, int | float) and isinstance(b, int | float):
        return type(a) is type(b) and a == b
    return type(a) is type(b) and a == b


def record_patch(old: Any, new: Any) -> list[dict[str, Any]] | None:
    """The operations that turn ``old`` into ``new``; ``None`` if they are
    the same JSON value (nothing to write)."""
    if same_json(old, new):
        return None
    whole = new
    if isinstance(old, dict) and isinstance(new, dict):
        # only the members that differ go to the library (it costs about 10
        # µs per member, changed or not); paths are the same
        differ = {k for k, v in new.items() if k not in old or not same_json(old[k], v)} | (
            old.keys() - new.keys()
        )
        old = {k: v for k, v in old.items() if k in differ}
        new = {k: v for k, v in new.items() if k in differ}
    if isinstance(old, dict | list) and type(old) is type(new):
        operations: list[dict[str, Any]] = jsonpatch.make_patch(old, new).patch
        if operations and _applies(old, operations, new):
            return operations
    # not both containers of one kind, or a change the library cannot see
    # (it compares with Python's ==, to which 1 and true are equal)
    return [{"op": "replace", "path": "", "value": whole}]


def _applies(old: Any, operations: list[dict[str, Any]], new: Any) -> bool:
    try:
        return same_json(jsonpatch.apply_patch(old, operations), new)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
        return False

"""A Lua script run by its SHA1 (``EVALSHA``), sent in full only when Redis
does not know it yet (after a restart or a ``SCRIPT FLUSH``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._errors import RedisReplyError
from ._resp import Arg

if TYPE_CHECKING:
    from ._store import RedisTransport

__all__ = ["Script"]


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self, transport: RedisTransport, keys_: Sequence[str], args: Sequence[Arg]
    ) -> Any:
        try:
            return await transport.execute("EVALSHA", self.sha, len(keys_), *keys_, *args)
        except RedisReplyError as exc:
            if "NOSCRIPT" not in str(exc):
                raise
            return await transport.execute("EVAL", self.source, len(keys_), *keys_, *args)

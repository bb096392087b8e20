"""What a capability's client methods (channels, records, presence) use of
:class:`~mesh_core.client.ClientCore`, declared once.

Each capability adds its methods to ``ClientCore`` as a mixin over this base:
the mixin calls ``command``, ``on`` and the rest, which ``ClientCore``
defines; the stubs here only tell the type checker so.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._options import ClientOptions
    from ._supervisor import ClientBinding

__all__ = ["ClientCapability"]


class ClientCapability:
    """The base of a capability's client mixin."""

    options: ClientOptions
    binding: ClientBinding

    async def command(self, command: str, payload: Any = None, timeout: float | None = 30.0) -> Any:
        raise NotImplementedError

    def on(self, name: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def _spawn_awaitable(self, awaitable: Awaitable[Any]) -> None:
        raise NotImplementedError

    def _check(self, command: str, payload: Any) -> Any:
        raise NotImplementedError

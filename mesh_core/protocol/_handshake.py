"""The HTTP upgrade, apart from the framing: what the server sees of an
upgrade request (for handshake authentication), and the HTTP rejection it
answers with, whether the application refused the upgrade or the request was
not a valid one. The connection machines keep only the states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

from wsproto import WSConnection
from wsproto.events import RejectConnection, RejectData, Request

__all__ = ["Reject", "UpgradeRequest", "send_rejection", "upgrade_request"]


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """The WebSocket upgrade request: ``target`` is the raw request target
    (``/path?query``); header names are lower-case; ``peer`` is the remote
    ``(host, port)`` when the transport knows it."""

    target: str
    headers: tuple[tuple[str, str], ...]
    peer: tuple[str, int] | None = None
    path: str = field(init=False)
    query: dict[str, list[str]] = field(init=False)
    cookies: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.target)
        object.__setattr__(self, "path", parts.path or "/")
        object.__setattr__(self, "query", parse_qs(parts.query, keep_blank_values=True))
        cookies: dict[str, str] = {}
        for name, value in self.headers:
            if name == "cookie":
                jar: SimpleCookie = SimpleCookie()
                try:
                    jar.load(value)
                except CookieError:
                    continue
                cookies.update({key: morsel.value for key, morsel in jar.items()})
        object.__setattr__(self, "cookies", cookies)

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header (case-insensitive name)."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def query_param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default


class Reject(Exception):
    """Raise from ``authenticate_connection`` to refuse the upgrade.

    The client gets an HTTP response with ``status`` (401 by default) and no
    WebSocket is opened."""

    def __init__(self, message: str = "Unauthorized", status: int = 401) -> None:
        super().__init__(message)
        self.status = status


def upgrade_request(event: Request, peer: tuple[str, int] | None) -> UpgradeRequest:
    """wsproto's view of the request, as the application sees it: header
    names lower-case, ``host`` first."""
    headers = tuple(
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in event.extra_headers
    )
    return UpgradeRequest(target=event.target, headers=(("host", event.host), *headers), peer=peer)


def send_rejection(
    ws: WSConnection,
    out: bytearray,
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    """Queue on ``out`` an HTTP response refusing the upgrade: ``status``,
    ``headers`` and a ``content-length`` for ``body``, then the body."""
    out += ws.send(
        RejectConnection(
            status_code=status,
            headers=[*headers, (b"content-length", str(len(body)).encode())],
            has_body=True,
        )
    )
    out += ws.send(RejectData(data=body))

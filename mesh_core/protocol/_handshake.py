"""What the server sees of an HTTP upgrade request, for handshake authentication."""

from __future__ import annotations

from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

__all__ = ["Reject", "UpgradeRequest"]


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

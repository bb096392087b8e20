"""The metrics port: ``GET /metrics`` and ``GET /healthz`` over plain HTTP,
sans-IO, so both adapters (and the ``--workers`` supervisor) answer alike.

Deliberately tiny and strict instead of a general HTTP server (h11 would do
it, but it is not a dependency of the server, and a scrape needs one request
line): one request per connection, the head bounded to
:data:`MAX_REQUEST_HEAD` bytes and the whole exchange to
:data:`REQUEST_TIMEOUT` seconds (the adapter enforces it with the runtime's
timeout), ``Connection: close`` on every answer. A request with a body is
answered without reading it. Anything malformed gets a 400 and the socket is
closed: a port scanner or a stray browser costs one small buffer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = [
    "MAX_REQUEST_HEAD",
    "METRICS_CONTENT_TYPE",
    "REQUEST_TIMEOUT",
    "HttpExchange",
    "MonitorStream",
    "http_response",
]

#: the request line and headers together, at most
MAX_REQUEST_HEAD = 8192
#: how long one exchange may take, from accept to the last byte written
REQUEST_TIMEOUT = 5.0
#: what Prometheus expects for the text exposition format
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: the paths the metrics port answers, and what each is
ROUTES = {"/metrics": "metrics", "/metrics.json": "metrics.json", "/healthz": "healthz"}

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class MonitorStream(Protocol):
    """One accepted connection on the metrics port, as the adapter wraps it
    (``trio.SocketStream`` is one as it is)."""

    async def receive_some(self, max_bytes: int) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...

    async def aclose(self) -> None: ...


def http_response(
    status: int,
    body: bytes | str,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A whole HTTP/1.1 response that closes the connection."""
    data = body.encode() if isinstance(body, str) else body
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + data


def health_response(ok: bool, reason: str, *, head_only: bool = False) -> bytes:
    """``/healthz``: 200 or 503, with a short JSON reason."""
    body = json.dumps({"status": "ok" if ok else "unavailable", "reason": reason})
    return http_response(200 if ok else 503, body, "application/json", head_only=head_only)


class HttpExchange:
    """One request on the metrics port: feed it bytes; once :attr:`done`,
    either :attr:`response` is set (the request was refused: answer it as
    is) or :attr:`route` names what was asked (``metrics``,
    ``metrics.json``, ``healthz``) for the caller to answer."""

    __slots__ = ("_buffer", "head_only", "response", "route")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.route: str | None = None
        self.response: bytes | None = None
        #: a ``HEAD`` request: answer the headers only
        self.head_only = False

    @property
    def done(self) -> bool:
        """Nothing more to read: answer (or, for a peer that left, close)."""
        return self.route is not None or self.response is not None

    def receive_data(self, data: bytes | None) -> None:
        """Bytes from the peer; ``None`` or ``b""``: it sent all it will."""
        if self.done:
            return
        if not data:
            self.response = b""  # gone before a whole request: nothing to answer
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_REQUEST_HEAD:
                self.response = http_response(431, "request head too large\n")
            return
        if end > MAX_REQUEST_HEAD:
            self.response = http_response(431, "request head too large\n")
            return
        self._parse(bytes(self._buffer[:end]))

    def _parse(self, head: bytes) -> None:
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            self.response = http_response(400, "bad request\n")
            return
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
            self.response = http_response(400, "bad request\n")
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        route = ROUTES.get(path)
        if route is None:
            self.response = http_response(404, "not found: try /metrics or /healthz\n")
        elif method not in ("GET", "HEAD"):
            self.response = http_response(
                405, "method not allowed\n", headers=[("Allow", "GET, HEAD")]
            )
        else:
            self.head_only = method == "HEAD"
            self.route = route

    @property
    def wants_health(self) -> bool:
        """The answer needs the health check: run it (the caller may have
        to await it) and pass its result to :meth:`answer`."""
        return self.route == "healthz"

    def answer(
        self,
        health: tuple[bool, str] | None,
        metrics: Callable[[], Any],
        prometheus: Callable[[], str],
        /,
    ) -> bytes:
        """What to send once :attr:`done` (``b""``: nothing, just close): the
        refusal, or the route's answer, so every metrics port (each adapter's,
        the ``--workers`` supervisor's) routes alike. ``health`` is the check's
        ``(ok, reason)`` when :attr:`wants_health`; ``metrics`` (the
        :meth:`ServerCore.metrics` dict) and ``prometheus`` (its text) are
        called only for their own route, as either may be costly."""
        if self.response is not None:
            return self.response
        if self.route is None:
            raise RuntimeError("answer() before the request was read")
        if self.route == "healthz":
            if health is None:
                raise ValueError("/healthz needs the health check's result")
            return self.health_response(*health)
        if self.route == "metrics.json":
            return self.json_response(metrics())
        return self.metrics_response(prometheus())

    def metrics_response(self, text: str) -> bytes:
        return http_response(200, text, METRICS_CONTENT_TYPE, head_only=self.head_only)

    def json_response(self, data: Any) -> bytes:
        body = json.dumps(data, separators=(",", ":"))
        return http_response(200, body, "application/json", head_only=self.head_only)

    def health_response(self, ok: bool, reason: str) -> bytes:
        return health_response(ok, reason, head_only=self.head_only)

"""What a server tells its operator: the startup line, connection lines,
outage summaries. Runtime-neutral, so both adapters log the same lines.

The startup line says what is running, so an operator with several
processes (``--workers``, many instances on one Redis) can tell them apart:
the address as a client would type it, the event loop, the store, the
instance id, the pid and the worker number.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .._errors import RedisUnavailable

__all__ = [
    "LOG_FORMAT",
    "OutageLog",
    "describe_store",
    "ensure_logging",
    "listening_line",
    "peer_label",
    "ws_url",
]

#: the format of ``mesh serve`` and of ``mesh_asyncio.run`` / ``mesh_trio.run``
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: set by the ``--workers`` supervisor in each worker's environment
WORKER_ENV = "MESH_WORKER"


def ensure_logging(level: int | str = logging.INFO) -> None:
    """Log like ``mesh serve`` unless the application configured logging
    itself (the root logger has a handler): ``run()`` is often a script's
    only line, and a server that says nothing looks broken."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)


def peer_label(peer: Sequence[Any] | None) -> str:
    """``host:port``, ``[v6]:port``, or ``?`` for a socket with no address."""
    if not peer:
        return "?"
    host, port = str(peer[0]), peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ws_url(address: Sequence[Any], scheme: str = "ws") -> str:
    """``ws://127.0.0.1:8765``, ``ws://[::1]:8765``: what a client connects to."""
    return f"{scheme}://{peer_label(address)}"


def describe_store(storage: Any) -> str:
    """``memory``, or ``redis redis://host:6379/0`` with any password masked."""
    url = getattr(storage, "url", None)
    if isinstance(url, str):
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            auth, _, hosts = netloc.rpartition("@")
            user = auth.partition(":")[0]
            netloc = f"{user}:***@{hosts}" if ":" in auth else f"{user}@{hosts}"
        query = "***" if "password" in parts.query else parts.query
        return "redis " + urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    name = type(storage).__name__
    return "memory" if name == "MemoryStore" else name


def listening_line(
    addresses: Iterable[Sequence[Any]],
    runtime: str,
    storage: Any,
    instance_id: str,
    scheme: str = "ws",
) -> str:
    """The one startup line: where, on what, with which store, which process."""
    urls = ", ".join(ws_url(a, scheme) for a in addresses)
    worker = os.environ.get(WORKER_ENV)
    parts = [runtime, f"store {describe_store(storage)}", f"instance {instance_id}"]
    parts.append(f"pid {os.getpid()}")
    if worker:
        parts.append(f"worker {worker}")
    return f"Mesh server listening on {urls} ({', '.join(parts)})"


class OutageLog:
    """Rate-limits the warnings of a store outage: the first failed command
    is logged with the driver's text, the ones after it within ``interval``
    seconds are counted and summarised in one line when the next failure
    comes after the interval ("N commands failed in the last 10 s: Redis
    unavailable"), so an outage under load is a few lines, not thousands a
    second."""

    def __init__(self, log: logging.Logger, interval: float = 10.0) -> None:
        self.log = log
        self.interval = interval
        self._since: float | None = None
        self._count = 0
        self._last: BaseException | None = None

    def failed(self, now: float, command: str, exc: BaseException) -> None:
        if self._since is not None and now - self._since < self.interval:
            self._count += 1
            self._last = exc
            return
        self.flush()
        self.log.warning("command %r: %s", command, exc)
        self._since, self._count, self._last = now, 1, exc

    def flush(self) -> None:
        """Log the summary of the interval that ended, if it counted more
        than the failure already logged."""
        if self._count > 1 and self._last is not None:
            kind = (
                "Redis unavailable"
                if isinstance(self._last, RedisUnavailable)
                else "storage unavailable"
            )
            self.log.warning(
                "%d commands failed in the last %g s: %s (last: %s)",
                self._count,
                self.interval,
                kind,
                self._last,
            )
        self._since, self._count, self._last = None, 0, None

"""The ``--workers`` group's one metrics port, in the supervisor.

A thread per request over blocking sockets (the supervisor has no event
loop, and a scrape every few seconds needs none); the request parsing and
the answers' form are the core's (:class:`mesh_core.app.HttpExchange`), so
the group's port behaves like a single server's. Each scrape asks every
worker for its counters (``/metrics.json`` on the loopback socket the
supervisor bound for it) and sums them: counters are the group's totals,
gauges that only make sense per process carry a ``worker`` label, and
``mesh_worker_up`` says which workers answered. A replaced worker starts
from zero, which Prometheus's ``rate()`` reads as a counter reset.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from mesh_core.app import HttpExchange, combine_metrics, prometheus_text

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["MetricsPort"]

log = logging.getLogger("mesh_supervisor")

#: how long a worker may take to answer the supervisor's scrape
SCRAPE_TIMEOUT = 2.0
#: how long one exchange with a scraper may take
REQUEST_TIMEOUT = 5.0


def fetch(port: int, path: str) -> tuple[int, bytes] | None:
    """``GET path`` from a worker's private port; None if it did not answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SCRAPE_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class MetricsPort:
    def __init__(self, sock: socket.socket, supervisor: Supervisor) -> None:
        self.sock = sock
        self.supervisor = supervisor
        self._thread = threading.Thread(target=self._accept, name="mesh-metrics", daemon=True)
        self._closed = False

    def start(self) -> None:
        host, port = self.sock.getsockname()[:2]
        log.info("Metrics of all workers on http://%s:%d/metrics and /healthz", host, port)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self.sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.1)  # out of file descriptors, say: do not spin
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        exchange = HttpExchange()
        deadline = time.monotonic() + REQUEST_TIMEOUT
        try:
            with conn:
                while not exchange.done:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    conn.settimeout(left)
                    exchange.receive_data(conn.recv(4096))
                response = exchange.response
                if response is None:
                    if exchange.route == "healthz":
                        response = exchange.health_response(*self.health())
                    elif exchange.route == "metrics.json":
                        response = exchange.json_response(self.combined()[0])
                    else:
                        total, parts = self.combined()
                        response = exchange.metrics_response(prometheus_text(total, workers=parts))
                if response:
                    conn.settimeout(max(0.1, deadline - time.monotonic()))
                    conn.sendall(response)
        except OSError as exc:
            log.debug("metrics port: request dropped: %r", exc)

    def _workers(self) -> list[tuple[str, int | None, bool]]:
        """(name, private port, serving) of every worker slot, as of now: the
        main thread's view (only it touches the processes: ``exitcode`` from
        two threads can lose a child's exit status)."""
        return [(str(slot.number), slot.metrics_port, slot.ready) for slot in self.supervisor.slots]

    def combined(self) -> tuple[dict[str, Any], dict[str, dict[str, Any] | None]]:
        parts: dict[str, dict[str, Any] | None] = {}
        for name, port, serving in self._workers():
            answer = fetch(port, "/metrics.json") if serving and port else None
            parts[name] = None
            if answer is not None and answer[0] == 200:
                with contextlib.suppress(ValueError):
                    parts[name] = json.loads(answer[1])
        return combine_metrics([p for p in parts.values() if p is not None]), parts

    def health(self) -> tuple[bool, str]:
        """200 only if every worker runs, serves, and says it is healthy."""
        if self.supervisor.stopping or self.supervisor.failed is not None:
            return False, "shutting down"
        for name, port, serving in self._workers():
            if not serving or port is None:
                return False, f"worker {name} is not running"
            answer = fetch(port, "/healthz")
            if answer is None:
                return False, f"worker {name} did not answer"
            if answer[0] != 200:
                try:
                    reason = json.loads(answer[1]).get("reason", "unhealthy")
                except ValueError:
                    reason = "unhealthy"
                return False, f"worker {name}: {reason}"
        return True, f"{len(self.supervisor.slots)} workers serving"

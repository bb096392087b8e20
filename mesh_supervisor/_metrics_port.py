"""The ``--workers`` group's one metrics port, in the supervisor.

A thread per request over blocking sockets (the supervisor has no event
loop, and a scrape every few seconds needs none), at most
:data:`MAX_REQUESTS` at once: beyond that a new connection is closed at
once, so a flood costs no thread and cannot stop the port (it used to, when
``Thread.start()`` ran out of threads). The request parsing, the routes and
the answers' form are the core's (:class:`mesh_core.app.HttpExchange`), so
the group's port behaves like a single server's. Each scrape asks every
worker at once (a thread each) for its counters (``/metrics.json`` on the
loopback socket the supervisor bound for it), within one deadline of
:data:`SCRAPE_TIMEOUT` for all of them, so one hung worker costs a scrape
that long, not that long per worker; then it sums them: counters are the
group's totals, gauges that only make sense per process carry a ``worker``
label, and ``mesh_worker_up`` says which workers answered. A replaced worker
starts from zero, which Prometheus's ``rate()`` reads as a counter reset.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mesh_core.app import (
    MONITOR_REQUEST_TIMEOUT,
    HttpExchange,
    combine_metrics,
    prometheus_text,
)

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["MAX_REQUESTS", "SCRAPE_TIMEOUT", "MetricsPort"]

log = logging.getLogger("mesh_supervisor")

#: how long the workers together may take to answer one scrape (seconds)
SCRAPE_TIMEOUT = 2.0
#: requests answered at once; a connection beyond them is closed unanswered
MAX_REQUESTS = 16


def fetch(port: int, path: str, deadline: float) -> tuple[int, bytes] | None:
    """``GET path`` from a worker's private port; None if it did not answer
    (in time: the socket's timeout is what is left of ``deadline``, per
    read; :func:`fetch_all` stops waiting at the deadline itself)."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=left)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def fetch_all(
    ports: Sequence[int | None], path: str, deadline: float
) -> list[tuple[int, bytes] | None]:
    """:func:`fetch` from every port at once, each answer in its place;
    None for a port that is None or did not answer by ``deadline``. A
    straggler's thread is left to end on its socket's timeout (daemon)."""
    answers: list[tuple[int, bytes] | None] = [None] * len(ports)

    def one(i: int, port: int) -> None:
        answers[i] = fetch(port, path, deadline)

    threads = [
        threading.Thread(target=one, args=(i, port), name="mesh-scrape", daemon=True)
        for i, port in enumerate(ports)
        if port is not None
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return list(answers)  # a copy: a late straggler cannot change what was returned


class MetricsPort:
    def __init__(self, sock: socket.socket, supervisor: Supervisor) -> None:
        self.sock = sock
        self.supervisor = supervisor
        self._thread = threading.Thread(target=self._accept, name="mesh-metrics", daemon=True)
        self._requests = threading.BoundedSemaphore(MAX_REQUESTS)
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
        """Accept until closed, whatever fails: this thread is the port."""
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.1)  # out of file descriptors, say: do not spin
                continue
            try:
                self._dispatch(conn)
            except Exception as exc:  # no thread to be had, say
                log.warning("metrics port: request dropped: %r", exc)
                conn.close()
                time.sleep(0.01)  # let what holds the resources finish

    def _dispatch(self, conn: socket.socket) -> None:
        if not self._requests.acquire(blocking=False):
            log.debug("metrics port: %d requests already open: connection closed", MAX_REQUESTS)
            conn.close()
            return
        try:
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()
        except BaseException:
            self._requests.release()
            raise

    def _answer(self, conn: socket.socket) -> None:
        exchange = HttpExchange()
        deadline = time.monotonic() + MONITOR_REQUEST_TIMEOUT
        try:
            with conn:
                while not exchange.done:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    conn.settimeout(left)
                    exchange.receive_data(conn.recv(4096))
                # the workers' answers in time for ours, and in SCRAPE_TIMEOUT
                scrape = min(time.monotonic() + SCRAPE_TIMEOUT, deadline - 0.1)
                health = self.health(scrape) if exchange.wants_health else None
                response = exchange.answer(
                    health,
                    lambda: self.combined(scrape)[0],
                    lambda: self.prometheus(scrape),
                )
                if response:
                    conn.settimeout(max(0.1, deadline - time.monotonic()))
                    conn.sendall(response)
        except Exception as exc:  # a peer that left or stalled, a worker's odd answer
            log.debug("metrics port: request dropped: %r", exc)
        finally:
            self._requests.release()

    def _workers(self) -> list[tuple[str, int | None, bool]]:
        """(name, private port, serving) of every worker slot, as of now: the
        main thread's view (only it touches the processes: ``exitcode`` from
        two threads can lose a child's exit status)."""
        return [(str(slot.number), slot.metrics_port, slot.ready) for slot in self.supervisor.slots]

    def combined(self, deadline: float) -> tuple[dict[str, Any], dict[str, dict[str, Any] | None]]:
        workers = self._workers()
        answers = fetch_all(
            [port if serving else None for _, port, serving in workers], "/metrics.json", deadline
        )
        parts: dict[str, dict[str, Any] | None] = {}
        for (name, _, _), answer in zip(workers, answers, strict=True):
            parts[name] = None
            if answer is not None and answer[0] == 200:
                with contextlib.suppress(ValueError):
                    parts[name] = json.loads(answer[1])
        return combine_metrics([p for p in parts.values() if p is not None]), parts

    def prometheus(self, deadline: float) -> str:
        total, parts = self.combined(deadline)
        return prometheus_text(total, workers=parts)

    def health(self, deadline: float) -> tuple[bool, str]:
        """200 only if every worker runs, serves, and says it is healthy; the
        reason names the first worker (by number) that does not."""
        if self.supervisor.stopping or self.supervisor.failed is not None:
            return False, "shutting down"
        workers = self._workers()
        for name, port, serving in workers:
            if not serving or port is None:
                return False, f"worker {name} is not running"
        answers = fetch_all([port for _, port, _ in workers], "/healthz", deadline)
        for (name, _, _), answer in zip(workers, answers, strict=True):
            if answer is None:
                return False, f"worker {name} did not answer"
            if answer[0] != 200:
                try:
                    reason = json.loads(answer[1]).get("reason", "unhealthy")
                except (ValueError, AttributeError):
                    reason = "unhealthy"
                return False, f"worker {name}: {reason}"
        return True, f"{len(workers)} workers serving"

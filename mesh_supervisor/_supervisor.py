"""Run N workers of one server on one port and keep them up, as gunicorn's
arbiter and uvicorn's supervisor do.

**The listening sockets are made here.** Workers used to bind the port each
with ``SO_REUSEPORT``, which let a second ``mesh serve --workers 2`` on the
same port silently join the first group: Linux admits a ``SO_REUSEPORT``
bind wherever every socket already bound there has the option and the same
owner, so nothing told two groups apart. Now the supervisor first binds the
address *without* ``SO_REUSEPORT`` (a probe, as a single server binds it):
that fails with ``EADDRINUSE`` while any group or server listens there, and
the supervisor says so in one line and exits 1, exactly like a single
server on a busy port. Only then does it close the probe and bind one
``SO_REUSEPORT`` listening socket per worker, and hand each worker its own
(multiprocessing passes it as a duplicated file descriptor).

Why not one socket shared by all workers, as gunicorn does (that needs no
``SO_REUSEPORT`` at all and leaves no gap between probe and bind)? Measured
here: with one shared socket, the first worker to wake accepts a whole burst
(16 connections from one client all went to one of two workers), while
``SO_REUSEPORT`` sockets get the kernel's hash of each connection, which
spreads them (``test_workers_share_one_port_and_one_state``). The gap
between the probe and the binds is microseconds: two groups started in that
same instant could still share the port. Because the sockets belong to the
supervisor, a replacement worker takes over its slot's socket with any
connections already queued on it, and the port never closes while the group
lives.

**Supervision.** A worker reports ``ready`` once it serves. One that dies
before that failed at startup (Redis down, a bad app, ...): every worker
would fail alike, so the supervisor stops the others, prints the worker's
one-line error (once, however many workers said it) and exits 1. One that
dies after it logs one line (exit status or signal) and is replaced after a
backoff that starts at :data:`BACKOFF_START` and doubles to
:data:`BACKOFF_MAX` while that worker keeps dying young (a worker up
:data:`HEALTHY_AFTER` seconds starts over); :data:`GIVE_UP_DEATHS` deaths
within :data:`GIVE_UP_WINDOW` seconds end the group with exit status 1.
SIGINT or SIGTERM sends every worker one SIGTERM (workers run in their own
process group, so a terminal's Ctrl-C reaches them only through the
supervisor, once) and waits for their graceful shutdown; the exit status is
0 if they all stopped cleanly (exit 0, or killed by that SIGTERM: a worker
still starting has no handler for it yet). A second signal kills them at once.

**No worker outlives the supervisor.** Being in their own process group,
workers would not hear of its end, and would go on serving (and holding the
port) behind it. So if :meth:`Supervisor.run` fails (a bug here), it stops
the live workers on its way out (SIGTERM, :data:`ABANDON_GRACE` seconds,
SIGKILL); and for an end it cannot handle (SIGKILL, a crash of the
interpreter) each worker holds the read end of a *lifeline* pipe whose only
write end is the supervisor's: the kernel closes it however the supervisor
ends, and the worker's watcher thread, reading EOF, sends its own process
SIGTERM (a graceful shutdown). A pipe rather than Linux's
``prctl(PR_SET_PDEATHSIG)``: it works on every POSIX system, needs no
ctypes, and has no window (the pipe exists before the worker does, so a
supervisor dead before the watcher starts is seen at once too).

**Metrics.** With ``--metrics-port`` the supervisor serves ``/metrics`` and
``/healthz`` for the group (:mod:`._metrics_port`); each worker serves its
own on a loopback socket the supervisor bound for it (port 0: no race for a
free port), which the supervisor scrapes on demand.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from mesh_core.app import WORKER_ENV, describe_startup_failure

from ._metrics_port import MetricsPort

__all__ = ["BACKOFF_MAX", "BACKOFF_START", "GIVE_UP_DEATHS", "GIVE_UP_WINDOW", "supervise"]

log = logging.getLogger("mesh_supervisor")

#: seconds before the first replacement of a worker that died
BACKOFF_START = 0.5
#: the longest wait before a replacement
BACKOFF_MAX = 10.0
#: a worker up this long (seconds) gets the shortest backoff again when it dies
HEALTHY_AFTER = 10.0
#: this many deaths of running workers within GIVE_UP_WINDOW seconds: give up
GIVE_UP_DEATHS = 5
GIVE_UP_WINDOW = 60.0
#: how long workers get to stop when the supervisor itself fails (seconds)
ABANDON_GRACE = 5.0
#: the longest startup error a worker reports, in characters
MAX_REPORT = 800


class Slot:
    """One worker number and the process currently filling it."""

    def __init__(
        self, number: int, sock: socket.socket, metrics_sock: socket.socket | None
    ) -> None:
        self.number = number
        self.sock = sock
        self.metrics_sock = metrics_sock
        self.metrics_port = metrics_sock.getsockname()[1] if metrics_sock else None
        self.process: Any = None  # multiprocessing.Process (spawn context)
        self.started_at = 0.0
        self.ready = False  # it reported that it serves, and has not died since
        self.delay = BACKOFF_START
        self.restart_at: float | None = None  # a replacement is due then
        self.replacement = False  # not the first process in this slot

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None


def _watch_lifeline(lifeline: Connection) -> None:
    """In a worker's thread: wait until the supervisor is gone (the pipe's
    only write end, which the supervisor holds, closes however it ends, even
    by SIGKILL), then stop this worker as the supervisor would have: one
    SIGTERM, which the server turns into its graceful shutdown (or which
    ends a worker still starting, before its handlers are in)."""
    with contextlib.suppress(OSError):
        wait([lifeline])  # never written to: readable means EOF
    os.kill(os.getpid(), signal.SIGTERM)


def _worker(
    argv: Sequence[str],
    number: int,
    reports: Connection,
    lifeline: Connection,
    sock: socket.socket,
    metrics_sock: socket.socket | None,
) -> None:
    """One worker process: ``mesh serve`` on the supervisor's sockets. A
    startup failure's one-line message goes to the supervisor instead of
    stderr, so N workers failing alike print one line, not N."""
    os.setpgrp()  # terminal signals reach the supervisor only; it forwards one
    # first of all, so a supervisor that dies while this one imports is seen too
    threading.Thread(
        target=_watch_lifeline, args=(lifeline,), name="mesh-lifeline", daemon=True
    ).start()
    os.environ[WORKER_ENV] = str(number)  # named in the worker's startup line
    from mesh_core.cli import serve_worker

    try:
        serve_worker(argv, sock, metrics_sock, lambda: reports.send(("ready", number)))
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        # short enough for one atomic pipe write (PIPE_BUF): workers failing
        # at once cannot interleave their reports
        reports.send(("error", number, exc.code[:MAX_REPORT]))
        raise SystemExit(1) from None


def _bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket with ``SO_REUSEADDR`` (a restart does not wait for
    TIME_WAIT), and ``SO_REUSEPORT`` if asked (see the module docstring)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_group(host: str, port: int, workers: int) -> list[socket.socket]:
    """One ``SO_REUSEPORT`` listening socket per worker on ``host:port``,
    after a probe without it has shown that nobody else listens there."""
    if port:
        _bind(host, port).close()  # EADDRINUSE while another server or group is there
    socks = [_bind(host, port, reuse_port=True)]
    port = socks[0].getsockname()[1]  # (port 0: the one the kernel chose)
    try:
        socks += [_bind(host, port, reuse_port=True) for _ in range(workers - 1)]
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"killed by signal {-code} ({name})"
    return f"exited with status {code}"


class Supervisor:
    def __init__(self, argv: list[str], args: argparse.Namespace) -> None:
        self.argv = [*argv, "--workers", "1"]
        self.args = args
        self.context = multiprocessing.get_context("spawn")
        self.reader, self.writer = self.context.Pipe(duplex=False)
        # every worker holds the read end, only this process the write end
        # (spawned children inherit only what they are passed)
        self.lifeline, self._lifeline_w = self.context.Pipe(duplex=False)
        self.slots: list[Slot] = []
        self.stopping = False  # a signal asked for the shutdown
        self.failed: str | None = None  # why the group is given up
        self.unclean = False  # a worker exited non-zero during the shutdown
        self.messages: list[str] = []  # workers' one-line startup errors
        self.deaths: collections.deque[float] = collections.deque()
        self.metrics: MetricsPort | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._signals = 0

    # -- setup

    def bind(self) -> str | None:
        """Bind every socket before any worker starts; the one-line error if not."""
        args = self.args
        try:
            socks = bind_group(args.host, args.port, args.workers)
        except OSError as exc:
            return f"error: {describe_startup_failure(exc, args.host, args.port)}"
        metrics_socks: list[socket.socket | None] = [None] * args.workers
        if args.metrics_port is not None:
            bound: list[socket.socket] = []  # (not in the slots yet: closed here if need be)
            try:
                public = _bind(args.metrics_host, args.metrics_port)
                bound.append(public)
                for _ in range(args.workers):
                    bound.append(_bind("127.0.0.1", 0))
            except BaseException as exc:
                for sock in socks + bound:
                    sock.close()
                if not isinstance(exc, OSError):
                    raise
                if not bound:
                    where = describe_startup_failure(exc, args.metrics_host, args.metrics_port)
                    return f"error: metrics port: {where.replace('--port', '--metrics-port')}"
                return f"error: cannot bind a worker's metrics socket on 127.0.0.1: {exc}"
            metrics_socks = list(bound[1:])
            self.metrics = MetricsPort(public, self)
        self.slots = [Slot(i + 1, socks[i], metrics_socks[i]) for i in range(args.workers)]
        return None

    def start(self, slot: Slot) -> None:
        slot.process = self.context.Process(
            target=_worker,
            args=(
                self.argv,
                slot.number,
                self.writer,
                self.lifeline,
                slot.sock,
                slot.metrics_sock,
            ),
            name=f"mesh-worker-{slot.number}",
        )
        slot.ready = False
        slot.restart_at = None
        slot.started_at = time.monotonic()
        slot.process.start()

    def _on_signal(self, signum: int, frame: object) -> None:
        os.write(self._wake_w, b"!")

    # -- the loop

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            if self.metrics is not None:
                self.metrics.start()
            for slot in self.slots:
                self.start(slot)
            return self._loop()
        finally:
            # after a normal end none is left; after a bug here, not one may
            # keep serving (and holding the port) behind a dead supervisor
            self._abandon()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close()

    def _abandon(self) -> None:
        """Stop whatever worker still runs: SIGTERM, up to
        :data:`ABANDON_GRACE` seconds, then SIGKILL."""
        if not any(s.alive for s in self.slots):
            return
        log.error("the supervisor failed: stopping the workers")
        self._terminate_all()
        deadline = time.monotonic() + ABANDON_GRACE
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join()

    def _loop(self) -> int:
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due else None
            if stop_deadline is not None:
                left = max(0.0, stop_deadline - now)
                timeout = left if timeout is None else min(timeout, left)
            # every process not yet handled as dead, including one whose exit
            # ``alive`` saw just now: its sentinel is readable, so the wait
            # returns at once and the death is handled below
            sentinels = [s.process.sentinel for s in self.slots if s.process is not None]
            ready = wait([self.reader, self._wake_r, *sentinels], timeout)
            if self.reader in ready:
                self._read_reports()
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
                self._signal()
                if self._signals > 1:
                    self._kill_all()
            for slot in self.slots:
                if slot.process is not None and not slot.alive:
                    self._died(slot)
            if self.stopping or self.failed is not None:
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + self.args.shutdown_timeout + 10.0
                    self._terminate_all()
                if not any(s.alive for s in self.slots):
                    break
                if time.monotonic() >= stop_deadline:
                    log.error("workers did not stop in time: killing them")
                    self._kill_all()
                continue
            now = time.monotonic()
            for slot in self.slots:
                if slot.restart_at is not None and slot.restart_at <= now:
                    slot.replacement = True
                    self.start(slot)
        self._read_reports()
        if self.failed is not None:
            lines = list(dict.fromkeys(self.messages)) or [self.failed]
            for line in lines:
                print(line, file=sys.stderr)
            return 1
        return 1 if self.unclean else 0

    def _read_reports(self) -> None:
        """Take in the workers' reports. One that does not unpickle or is not
        one this code sends (a worker's bug, memory gone bad) is logged and
        dropped: the worker it came from cannot be told, and that worker's
        exit, if any, is noticed by its sentinel anyway."""
        while self.reader.poll():
            try:
                report = self.reader.recv()
            except (EOFError, OSError):
                return
            except Exception as exc:  # an UnpicklingError, say: this report only
                log.error("dropped a garbled report from a worker: %r", exc)
                continue
            match report:
                case ("ready", int(number)) if 1 <= number <= len(self.slots):
                    self.slots[number - 1].ready = True
                case ("error", int(number), str(message)) if 1 <= number <= len(self.slots):
                    self.messages.append(message)
                case _:
                    log.error("dropped a garbled report from a worker: %.200r", report)

    def _signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            self.stopping = True
            for slot in self.slots:
                slot.restart_at = None
            log.info("Shutting down %d worker(s)", sum(s.alive for s in self.slots))
        elif self._signals == 2:
            log.warning("second signal: killing the workers")

    def _died(self, slot: Slot) -> None:
        process = slot.process
        process.join()
        code = process.exitcode
        slot.process = None
        slot.restart_at = None
        if self.stopping or self.failed is not None:
            slot.ready = False
            # killed by the SIGTERM asked of it: a worker still starting
            # (before its handlers are in) stops that way, and that is clean
            if code not in (0, -signal.SIGTERM):
                self.unclean = True
            return
        self._read_reports()
        how = _describe_exit(code)
        served, slot.ready = slot.ready, False
        if not served:
            if not slot.replacement:  # the first start failed: all would, so stop here
                self.failed = f"error: worker {slot.number} {how} before it served (see above)"
                return
            why = self.messages.pop() if self.messages else "see above"
            how = f"{how} before it served ({why.removeprefix('error: ')})"
        now = time.monotonic()
        if now - slot.started_at >= HEALTHY_AFTER:
            slot.delay = BACKOFF_START
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - GIVE_UP_WINDOW:
            self.deaths.popleft()
        if len(self.deaths) >= GIVE_UP_DEATHS:
            log.error(
                "worker %d (pid %d) %s; %d deaths within %.0f s: giving up",
                slot.number,
                process.pid,
                how,
                len(self.deaths),
                GIVE_UP_WINDOW,
            )
            self.failed = "error: the workers could not be kept up (see the log above)"
            self.messages.clear()
            return
        log.error(
            "worker %d (pid %d) %s; starting a replacement in %.1f s",
            slot.number,
            process.pid,
            how,
            slot.delay,
        )
        slot.restart_at = now + slot.delay
        slot.delay = min(BACKOFF_MAX, slot.delay * 2)

    def _each_alive(self, act: Callable[[int], None]) -> None:
        for slot in self.slots:
            if slot.alive and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    act(slot.process.pid)

    def _terminate_all(self) -> None:
        self._each_alive(lambda pid: os.kill(pid, signal.SIGTERM))

    def _kill_all(self) -> None:
        self._each_alive(lambda pid: os.kill(pid, signal.SIGKILL))

    def _close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        for slot in self.slots:
            slot.sock.close()
            if slot.metrics_sock is not None:
                slot.metrics_sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        # the workers' lifeline: gone with this process in any case, here
        # for a supervisor run inside a longer-lived process (the tests)
        self._lifeline_w.close()
        self.lifeline.close()
        self.reader.close()
        self.writer.close()


def supervise(argv: list[str], args: argparse.Namespace) -> int:
    """Run ``args.workers`` workers of ``mesh serve ARGV`` on one port, keep
    them up, stop them on SIGINT/SIGTERM; the exit status (module docstring)."""
    supervisor = Supervisor(argv, args)
    error = supervisor.bind()
    if error is not None:
        supervisor._close()
        print(error, file=sys.stderr)
        return 1
    return supervisor.run()

"""trio I/O layer under the Redis storage driver: a small RESP2 client on trio streams.

redis-py has no trio support, and coredis (which runs on trio through anyio)
has no public "run this raw command" entry point (its command objects are keyed
by a table of known command names) and needs an ``async with`` lifetime that
does not fit ``connect()``/``aclose()``. So this module speaks RESP itself:
commands are encoded by ``hiredis.pack_command`` and replies parsed by
``hiredis.Reader`` (the robust, C-implemented parts); all that is here is the
connection handling.

Design:

* Command connections are *multiplexed*: any number of tasks write commands on
  one connection and replies come back in order (FIFO). Commands submitted in
  the same scheduler batch are coalesced by a per-connection writer task into
  one ``send_all`` (automatic pipelining). A pool grows lazily up to
  ``max_connections`` connections while the existing ones each have
  ``_GROW_AT`` commands waiting (one pipelined connection is the cheapest
  way to talk to Redis). Timeouts are kept per connection, not by a cancel
  scope per command.
* ``pipeline()`` writes its commands contiguously, so ``MULTI ... EXEC`` inside
  one pipeline is atomic. Blocking commands (``BLPOP``, ...) and ``WATCH``
  would stall / leak across the multiplexed connections: do not use them.
* Pub/sub uses one dedicated connection, re-connected with exponential backoff
  and re-subscribed to every channel after an outage; a PING every
  ``health_check_interval`` seconds detects silently dead connections.
* Background tasks run in a nursery passed as ``nursery=`` or, by default, in
  a trio system task owned by the transport; ``aclose()`` ends all of them.

* Sentinel (``redis+sentinel://``): before every connect (command or pub/sub
  connection, first or after a loss) the sentinels are asked in turn
  ``SENTINEL get-master-addr-by-name``, and the node they name must say
  ``ROLE`` master, else the next sentinel is asked. A ``READONLY`` reply means
  the node was demoted: its connection is dropped (callers waiting on it get
  ``RedisUnavailable``) so the next command asks the sentinels again. When a
  connect finds the master moved, connections to the previous one are dropped.
  Sentinel leaves a master it replaced writable for seconds, so waiting for
  ``READONLY`` would lose the writes made there meanwhile: a background task
  stays subscribed to ``+switch-master`` on one sentinel (the next one if it
  dies) and, the moment a switch is announced, drops every connection to
  another node (in-flight commands get ``RedisUnavailable``; the pub/sub
  connection reconnects and re-subscribes on the new master); a connect that
  raced with the announcement is redone. Switches announced while it was not
  subscribed are caught by asking the sentinels once it is again.

URL forms (parsed by ``mesh_core._redis_url``):
``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS;
``?ssl_cert_reqs=none|optional|required&ssl_ca_certs=/path``),
``unix:///path/to/socket?db=N&password=...``,
``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``
``[?sentinel_password=...&sentinel_username=...]`` (sentinel port 26379 by
default; the credentials before ``@`` are the master's) and
``rediss+sentinel://...`` (TLS to the master, clear text to the sentinels).
Cluster is not supported by this transport.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import hiredis
import trio

from mesh_core.redis import PING as _PING
from mesh_core.redis import (
    SWITCH_CHANNEL,
    RedisEndpoint,
    RedisReplyError,
    RedisUnavailable,
    SentinelEndpoint,
    SwitchState,
    forget_channel,
    on_pubsub_reply,
    parse_redis_url,
    parse_switch,
)
from mesh_core.redis import pack as _pack

__all__ = ["RedisReplyError", "RedisUnavailable", "TrioRedisTransport"]

Arg = bytes | str | int | float

_log = logging.getLogger("mesh_trio.redis")

_READ_SIZE = 65536
# A connection takes any number of commands in flight (they are pipelined);
# another one is opened only when one has this many waiting.
_GROW_AT = 256

# Errors that mean "the connection is gone" (ssl.SSLError is an OSError).
_CONN_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    hiredis.ProtocolError,
    EOFError,
)


# --------------------------------------------------------------------- helpers


def _ssl_context(ep: RedisEndpoint) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ep.ssl_ca_certs)
    if ep.ssl_cert_reqs == "none":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ep.ssl_cert_reqs == "optional":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class _Demoted(Exception):
    """A READONLY reply on a Sentinel-managed connection: Sentinel made it a replica."""


def _sentinel_auth(target: SentinelEndpoint) -> list[tuple[Arg, ...]]:
    if target.sentinel_password is None:
        return []
    if target.sentinel_username:
        return [("AUTH", target.sentinel_username, target.sentinel_password)]
    return [("AUTH", target.sentinel_password)]


def _addr_label(address: tuple[str, int]) -> str:
    host, port = address
    return RedisEndpoint(host=host, port=port).label


async def _exchange(
    stream: trio.abc.Stream, reader: hiredis.Reader, commands: Sequence[Sequence[Arg]]
) -> list[Any]:
    """Send ``commands`` in one write and read one reply each (connection set-up only)."""
    await stream.send_all(b"".join(_pack(c) for c in commands))
    replies: list[Any] = []
    while len(replies) < len(commands):
        reply = reader.gets()
        if reply is False:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                raise EOFError("connection closed by Redis")
            reader.feed(data)  # type: ignore[arg-type]  # any buffer works
            continue
        replies.append(reply)
    return replies


class _Waiter:
    """One execute() / pipeline() call waiting for ``expected`` replies.

    It parks its task with trio's low-level primitives rather than a
    ``trio.Event`` (one per command was a visible share of the cost)."""

    __slots__ = ("done", "error", "expected", "replies", "sent_at", "task")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.replies: list[Any] = []
        self.error: RedisUnavailable | None = None
        self.sent_at = 0.0
        self.done = False
        self.task: trio.lowlevel.Task | None = None

    def set(self) -> None:
        """The replies are in (or ``error`` is set): wake the caller."""
        if self.done:
            return
        self.done = True
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.task = None  # cancelled: a late reply wakes nobody
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class _Conn:
    """A multiplexed command connection: one reader task, one writer task."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        reader: hiredis.Reader,
        label: str,
        *,
        address: tuple[str, int] | None = None,
    ) -> None:
        self.stream = stream
        self.reader = reader
        self.label = label
        #: the node's address when a sentinel named it (None: not Sentinel-managed)
        self.address = address
        # A master that Sentinel demoted answers writes with READONLY; only then
        # is that reply a reason to drop the connection (and ask the sentinels).
        self.sentinel_managed = address is not None
        self.pending: deque[_Waiter] = deque()
        self.outbuf: list[bytes] = []
        self.lot = trio.lowlevel.ParkingLot()
        self.replies_seen = 0
        self.sending = False
        self.error: RedisUnavailable | None = None
        self.reader_scope = trio.CancelScope()
        self.writer_scope = trio.CancelScope()
        self.watch_scope = trio.CancelScope()
        # the scope of a caller's direct write (see submit); fail() cancels it
        self.send_scope = trio.CancelScope()
        self.last_reply_at = trio.current_time()

    async def submit(self, data: bytes, waiter: _Waiter) -> None:
        """Queue ``data`` (whose replies ``waiter`` collects) for sending, in order.

        When nothing else is being sent the caller writes directly (saving a
        task switch); meanwhile, commands of other tasks queue up and the
        writer task sends them in one ``send_all`` (automatic pipelining).
        The direct write is shielded from the caller's cancellation, so a
        command is never half-written; a socket that takes nothing for a
        whole timeout is a stuck connection, which ``watch_loop`` drops
        (cancelling that write).
        """
        if self.error is not None:
            waiter.error = self.error
            waiter.set()
            return
        waiter.sent_at = trio.current_time()
        self.pending.append(waiter)
        if self.sending or self.outbuf:
            self.outbuf.append(data)
            if len(self.outbuf) == 1 and not self.sending:
                self.lot.unpark_all()
            return
        self.sending = True
        try:
            with trio.CancelScope(shield=True) as self.send_scope:
                await self.stream.send_all(data)
        except _CONN_ERRORS as exc:
            self.fail(RedisUnavailable(f"Redis connection to {self.label} lost: {exc!r}"))
        finally:
            self.sending = False
            if self.outbuf:
                self.lot.unpark_all()

    async def watch_loop(self, timeout: float) -> None:
        """Time commands out without a cancel scope per command (they cost
        more than the rest of a call): a caller whose reply is ``timeout``
        late gets ``RedisUnavailable`` (its reply, if it comes, is dropped);
        a connection on which nothing at all came back for ``timeout`` while
        commands wait is stuck, and is dropped."""
        with self.watch_scope:
            while True:
                await trio.sleep(timeout / 8)
                if not self.pending:
                    continue
                now = trio.current_time()
                oldest = self.pending[0].sent_at
                if now - max(oldest, self.last_reply_at) > timeout:
                    self.fail(RedisUnavailable(f"Redis at {self.label} stopped answering"))
                    return
                for w in self.pending:
                    if now - w.sent_at <= timeout:
                        break  # sent in order: the rest are younger
                    if w.error is None:
                        w.error = RedisUnavailable(
                            f"Redis at {self.label} did not answer within {timeout}s"
                        )
                        w.set()

    def fail(self, error: RedisUnavailable) -> None:
        if self.error is not None:
            return
        self.error = error
        self.reader_scope.cancel()
        self.writer_scope.cancel()
        self.watch_scope.cancel()
        self.send_scope.cancel()
        self.outbuf.clear()
        while self.pending:
            w = self.pending.popleft()
            w.error = error
            w.set()

    async def write_loop(self) -> None:
        with self.writer_scope:
            try:
                while True:
                    if not self.outbuf or self.sending:
                        await self.lot.park()
                        continue
                    data = self.outbuf[0] if len(self.outbuf) == 1 else b"".join(self.outbuf)
                    self.outbuf.clear()
                    self.sending = True
                    try:
                        await self.stream.send_all(data)
                    finally:
                        self.sending = False
            except _CONN_ERRORS as exc:
                self.fail(RedisUnavailable(f"Redis connection to {self.label} lost: {exc!r}"))
            except Exception as exc:
                _log.exception("Redis connection writer failed")
                self.fail(RedisUnavailable(f"Redis connection to {self.label} failed: {exc!r}"))

    async def read_loop(self) -> None:
        with self.reader_scope:
            try:
                while True:
                    data = await self.stream.receive_some(_READ_SIZE)
                    if not data:
                        raise EOFError("connection closed by Redis")
                    self.last_reply_at = trio.current_time()
                    self.reader.feed(data)  # type: ignore[arg-type]  # any buffer works
                    gets = self.reader.gets
                    pending = self.pending
                    while (reply := gets()) is not False:
                        self.replies_seen += 1
                        if (
                            self.sentinel_managed
                            and type(reply) is RedisReplyError
                            and str(reply).startswith("READONLY")
                        ):
                            raise _Demoted(str(reply))
                        w = pending[0]
                        w.replies.append(reply)
                        if len(w.replies) == w.expected:
                            pending.popleft()
                            w.set()  # (a timed-out caller is gone already)
            except _CONN_ERRORS as exc:
                self.fail(RedisUnavailable(f"Redis connection to {self.label} lost: {exc!r}"))
            except _Demoted as exc:
                self.fail(RedisUnavailable(f"Redis at {self.label} is no longer the master: {exc}"))
            except IndexError:  # a reply nobody asked for: the stream is out of sync
                self.fail(RedisUnavailable(f"Redis connection to {self.label}: unexpected reply"))
            except Exception as exc:
                _log.exception("Redis connection reader failed")
                self.fail(RedisUnavailable(f"Redis connection to {self.label} failed: {exc!r}"))


class _Attempt:
    """A single-flight connection attempt shared by every caller waiting for it."""

    __slots__ = ("conn", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.conn: _Conn | None = None
        self.error: RedisUnavailable | None = None


# ------------------------------------------------------------------- transport


class TrioRedisTransport:
    """Raw-command Redis transport for trio (implements the ``RedisTransport`` protocol).

    ``execute()`` returns raw replies (bytes, int, list, None), raises
    ``RedisReplyError`` for an error reply and ``RedisUnavailable`` when Redis
    cannot be reached or does not answer within ``command_timeout`` seconds
    (the bound covers any reconnect; a connect attempt alone is bounded by
    ``connect_timeout``).
    """

    def __init__(
        self,
        url: str,
        *,
        command_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        max_connections: int = 4,
        health_check_interval: float | None = 10.0,
        reconnect_backoff: tuple[float, float] = (0.05, 2.0),
        ssl_context: ssl.SSLContext | None = None,
        nursery: trio.Nursery | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        target = parse_redis_url(url)
        # With Sentinel, ``_ep`` holds the master's credentials/db/TLS; its
        # address is asked of the sentinels before every connect.
        self._sentinel: SentinelEndpoint | None = None
        self._sentinels: list[tuple[str, int]] = []  # the last one that answered first
        self._master_address: tuple[str, int] | None = None
        # counts the changes of _master_address; the last +switch-master heard
        # is trusted over the sentinels' answers for a while
        self._switch_epoch = 0
        self._switch = SwitchState()
        if isinstance(target, SentinelEndpoint):
            self._sentinel = target
            self._sentinels = list(target.sentinels)
            self._ep = target.master
        else:
            self._ep = target
        self._label = target.label
        self._ssl_context = ssl_context
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._health_check_interval = health_check_interval
        self._backoff_min, self._backoff_max = reconnect_backoff
        self._user_nursery = nursery
        self._conns: list[_Conn] = []
        self._attempt: _Attempt | None = None
        self._nursery: trio.Nursery | None = None
        self._started: trio.Event | None = None
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._closed = False
        # pub/sub state
        self._subs: dict[bytes, Callable[[bytes], None]] = {}
        self._confirm: dict[bytes, trio.Event] = {}
        self._pubsub_running = False
        self._pubsub_current: tuple[trio.abc.Stream, trio.CancelScope] | None = None
        self._pubsub_label = ""
        self._pubsub_address: tuple[str, int] | None = None
        self._pubsub_lock = trio.Lock()

    # -- lifecycle

    async def _ensure_started(self) -> trio.Nursery:
        if self._nursery is not None:
            return self._nursery
        if self._closed:
            raise RedisUnavailable("Redis transport is closed")
        if self._started is None:
            self._started = trio.Event()
            if self._user_nursery is not None:
                self._user_nursery.start_soon(self._supervise)
            else:
                trio.lowlevel.spawn_system_task(self._supervise, name="mesh-redis-transport")
        await self._started.wait()
        if self._nursery is None:
            raise RedisUnavailable("Redis transport is closed")
        return self._nursery

    async def _supervise(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self._sentinel is not None:
                        nursery.start_soon(self._listen_for_switches, self._sentinel)
                    assert self._started is not None
                    self._started.set()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            closed = RedisUnavailable("Redis transport is closed")
            for conn in self._conns:
                conn.fail(closed)
            self._conns.clear()
            if self._started is not None:
                self._started.set()
            self._done.set()

    async def connect(self) -> None:
        """Verify that Redis answers (PING); raise ``RedisUnavailable`` if not."""
        await self.execute("PING")

    async def __aenter__(self) -> TrioRedisTransport:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection and end every background task."""
        self._closed = True
        self._scope.cancel()
        if self._started is not None:
            with trio.CancelScope(shield=True):
                await self._done.wait()
        else:
            await trio.lowlevel.checkpoint()

    # -- connections

    @property
    def _attempt_timeout(self) -> float:
        """Bound on one connect attempt, as a safety net over its per-step bounds.

        With Sentinel an attempt may ask every sentinel (connect + one command
        each) before connecting to the master it names.
        """
        if self._sentinel is None:
            return self._connect_timeout
        per_sentinel = self._connect_timeout + self._command_timeout
        return len(self._sentinels) * per_sentinel + self._connect_timeout

    async def _open_stream(
        self,
    ) -> tuple[trio.abc.Stream, hiredis.Reader, str, tuple[str, int] | None]:
        """A connected, authenticated stream to the (current) master, its label and
        (with Sentinel) its address."""
        if self._sentinel is None:
            stream, reader = await self._open_node(self._ep)
            return stream, reader, self._ep.label, None
        for _ in range(3):
            epoch = self._switch_epoch
            stream, reader, label, master = await self._open_sentinel_master(self._sentinel)
            if epoch == self._switch_epoch or master == self._master_address:
                if self._master_address != master:
                    self._master_moved(master, "named by the sentinels")
                return stream, reader, label, master
            # A switch to another node was announced while we connected: this
            # may be the old master, still accepting writes. Ask again.
            await trio.aclose_forcefully(stream)
        raise RedisUnavailable(f"the master of {self._label} kept moving")

    async def _open_node(
        self, ep: RedisEndpoint, *, expect_master: bool = False
    ) -> tuple[trio.abc.Stream, hiredis.Reader]:
        stream: trio.abc.Stream
        try:
            if ep.unix_path is not None:
                stream = await trio.open_unix_socket(ep.unix_path)
            else:
                sock_stream = await trio.open_tcp_stream(ep.host, ep.port)
                sock_stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                stream = sock_stream
        except OSError as exc:
            raise RedisUnavailable(f"cannot connect to Redis at {ep.label}: {exc}") from exc
        try:
            if ep.tls:
                ctx = self._ssl_context or _ssl_context(ep)
                tls_stream = trio.SSLStream(stream, ctx, server_hostname=ep.host)
                await tls_stream.do_handshake()
                stream = tls_stream
            reader = hiredis.Reader(replyError=RedisReplyError)
            hello: list[tuple[Arg, ...]] = []
            if ep.password is not None:
                if ep.username:
                    hello.append(("AUTH", ep.username, ep.password))
                else:
                    hello.append(("AUTH", ep.password))
            if ep.db:
                hello.append(("SELECT", ep.db))
            if expect_master:
                # A sentinel's answer may be stale (a failover in progress): only
                # the node itself can say it accepts writes.
                hello.append(("ROLE",))
            if hello:
                replies = await _exchange(stream, reader, hello)
                for cmd, reply in zip(hello, replies, strict=True):
                    if isinstance(reply, RedisReplyError):
                        raise RedisUnavailable(f"Redis at {ep.label} refused {cmd[0]!r}: {reply}")
                if expect_master:
                    role = replies[-1]
                    if not (isinstance(role, list) and role and role[0] == b"master"):
                        what = role[0] if isinstance(role, list) and role else role
                        raise RedisUnavailable(
                            f"Redis at {ep.label} is not a master (ROLE {what!r})"
                        )
            return stream, reader
        except BaseException as exc:
            await trio.aclose_forcefully(stream)
            if isinstance(exc, _CONN_ERRORS):
                raise RedisUnavailable(f"cannot connect to Redis at {ep.label}: {exc!r}") from exc
            raise

    async def _open_sentinel_master(
        self, target: SentinelEndpoint
    ) -> tuple[trio.abc.Stream, hiredis.Reader, str, tuple[str, int]]:
        """Ask each sentinel in turn for the master, connect to it, check it is one."""
        problems: list[str] = []
        for address in list(self._sentinels):
            label = _addr_label(address)
            try:
                with trio.fail_after(self._connect_timeout + self._command_timeout):
                    master = await self._ask_sentinel(address, target)
            except trio.TooSlowError:
                problems.append(f"sentinel {label} did not answer in time")
                continue
            except RedisUnavailable as exc:
                problems.append(str(exc))
                continue
            if master is None:
                problems.append(f"sentinel {label} knows no master {target.service_name!r}")
                continue
            announced = self._trusted_announcement()
            if announced is not None and master != announced:
                _log.debug("sentinel %s still names %s; %s was announced", label, master, announced)
                master = announced
            ep = replace(self._ep, host=master[0], port=master[1])
            try:
                with trio.fail_after(self._connect_timeout):
                    stream, reader = await self._open_node(ep, expect_master=True)
            except trio.TooSlowError:
                problems.append(f"master {ep.label} (from sentinel {label}) did not answer in time")
                continue
            except RedisUnavailable as exc:
                problems.append(f"{exc} (named by sentinel {label})")
                continue
            if self._sentinels[0] != address:  # ask the one that answered first next time
                self._sentinels.remove(address)
                self._sentinels.insert(0, address)
            return stream, reader, ep.label, master
        raise RedisUnavailable(f"no Redis master for {target.label}: {'; '.join(problems)}")

    async def _ask_sentinel(
        self, address: tuple[str, int], target: SentinelEndpoint
    ) -> tuple[str, int] | None:
        label = _addr_label(address)
        try:
            with trio.fail_after(self._connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(*address)
        except (OSError, trio.TooSlowError) as exc:
            raise RedisUnavailable(f"cannot connect to sentinel {label}: {exc!r}") from exc
        try:
            reader = hiredis.Reader(replyError=RedisReplyError)
            commands = _sentinel_auth(target)
            commands.append(("SENTINEL", "get-master-addr-by-name", target.service_name))
            with trio.fail_after(self._command_timeout):
                replies = await _exchange(stream, reader, commands)
        except trio.TooSlowError:
            raise RedisUnavailable(f"sentinel {label} did not answer in time") from None
        except _CONN_ERRORS as exc:
            raise RedisUnavailable(f"sentinel {label}: connection lost: {exc!r}") from exc
        finally:
            await trio.aclose_forcefully(stream)
        for cmd, reply in zip(commands, replies, strict=True):
            if isinstance(reply, RedisReplyError):
                raise RedisUnavailable(f"sentinel {label} refused {cmd[0]!r}: {reply}")
        reply = replies[-1]
        if reply is None:
            return None
        try:
            host, port = reply
            return host.decode(), int(port)
        except (TypeError, ValueError, AttributeError):
            raise RedisUnavailable(f"sentinel {label} sent a malformed address {reply!r}") from None

    def _master_moved(self, master: tuple[str, int], why: str) -> None:
        """Drop every connection to another node as soon as the master is known to be ``master``.

        They would otherwise keep talking to the old master until it is
        demoted (which Sentinel may do only seconds after the failover), and
        writes made there meanwhile would be lost.
        """
        previous, self._master_address = self._master_address, master
        if previous != master:
            # a connect that began before may have reached the old master
            self._switch_epoch += 1
            _log.info("Redis master for %s is now %s (%s)", self._label, _addr_label(master), why)
        error = RedisUnavailable(f"Redis master moved to {_addr_label(master)} ({why})")
        for conn in list(self._conns):
            if conn.address is not None and conn.address != master:
                conn.fail(error)
        if self._pubsub_current is not None and self._pubsub_address != master:
            self._pubsub_current[1].cancel()

    def _trusted_announcement(self) -> tuple[str, int] | None:
        return self._switch.trusted_master(time.monotonic())

    def _switch_announced(self, master: tuple[str, int], why: str) -> None:
        self._switch.announce(master, time.monotonic())
        self._master_moved(master, why)

    async def _listen_for_switches(self, target: SentinelEndpoint) -> None:
        """Stay subscribed to ``+switch-master`` on one sentinel, the next one if it fails."""
        backoff = self._backoff_min
        turn = 0
        while True:
            address = target.sentinels[turn % len(target.sentinels)]
            try:
                if await self._switch_session(address, target):
                    backoff = self._backoff_min
            except (*_CONN_ERRORS, RedisUnavailable, trio.TooSlowError) as exc:
                _log.debug("listening for failovers on sentinel %s failed: %r", address, exc)
            except Exception:
                _log.exception("listening for failovers on sentinel %s failed", address)
            turn += 1
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._backoff_max)

    async def _switch_session(self, address: tuple[str, int], target: SentinelEndpoint) -> bool:
        """Serve one subscription until it breaks; True if it was confirmed."""
        label = _addr_label(address)
        with trio.fail_after(self._connect_timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(*address)
        try:
            reader = hiredis.Reader(replyError=RedisReplyError)
            commands = _sentinel_auth(target)
            commands.append(("SUBSCRIBE", SWITCH_CHANNEL))
            with trio.fail_after(self._command_timeout):
                replies = await _exchange(stream, reader, commands)
            for cmd, reply in zip(commands, replies, strict=True):
                if isinstance(reply, RedisReplyError):
                    raise RedisUnavailable(f"sentinel {label} refused {cmd[0]!r}: {reply}")
            _log.debug("listening for failovers on sentinel %s", label)
            # a switch announced while nobody listened is caught up with now
            await self._check_master(address, target)
            interval = self._health_check_interval
            pinged = False
            while True:
                wait = self._command_timeout if pinged else interval
                with trio.move_on_after(math.inf if wait is None else wait) as scope:
                    data = await stream.receive_some(_READ_SIZE)
                if scope.cancelled_caught:  # nothing for a while: PING, then expect something
                    if pinged:
                        raise RedisUnavailable(f"sentinel {label} stopped answering")
                    with trio.fail_after(self._command_timeout):
                        await stream.send_all(_PING)
                    pinged = True
                    continue
                if not data:
                    raise EOFError("connection closed by the sentinel")
                pinged = False
                reader.feed(data)  # type: ignore[arg-type]  # any buffer works
                while (msg := reader.gets()) is not False:
                    if type(msg) is list and len(msg) == 3 and msg[0] == b"message":
                        master = parse_switch(msg[2], target.service_name)
                        if master is not None:
                            self._switch_announced(master, f"announced by sentinel {label}")
        finally:
            await trio.aclose_forcefully(stream)

    async def _check_master(self, address: tuple[str, int], target: SentinelEndpoint) -> None:
        """Follow the master the sentinel names now, if it is not the one we talk to."""
        if self._master_address is None:
            return  # not connected yet: the first connect asks the sentinels anyway
        try:
            master = await self._ask_sentinel(address, target)
        except RedisUnavailable as exc:
            _log.debug("asking sentinel %s for the master failed: %r", address, exc)
            return
        announced = self._trusted_announcement()
        if master is not None and master != self._master_address and announced in (None, master):
            self._switch_announced(master, f"named by sentinel {_addr_label(address)}")

    async def _connect_attempt(self, attempt: _Attempt) -> None:
        try:
            with trio.fail_after(self._attempt_timeout):
                stream, reader, label, address = await self._open_stream()
        except trio.TooSlowError:
            attempt.error = RedisUnavailable(
                f"connecting to Redis at {self._label} timed out after {self._attempt_timeout}s"
            )
        except RedisUnavailable as exc:
            attempt.error = exc
        except Exception as exc:
            _log.exception("connecting to Redis failed")
            attempt.error = RedisUnavailable(f"cannot connect to Redis at {self._label}: {exc!r}")
        else:
            conn = _Conn(stream, reader, label, address=address)
            attempt.conn = conn
            self._conns.append(conn)
            assert self._nursery is not None
            self._nursery.start_soon(self._run_conn, conn)
        finally:
            self._attempt = None
            attempt.done.set()

    async def _run_conn(self, conn: _Conn) -> None:
        try:
            assert self._nursery is not None
            self._nursery.start_soon(conn.write_loop)
            self._nursery.start_soon(conn.watch_loop, self._command_timeout)
            await conn.read_loop()
        finally:
            conn.fail(RedisUnavailable(f"Redis connection to {conn.label} closed"))
            if conn in self._conns:
                self._conns.remove(conn)
            await trio.aclose_forcefully(conn.stream)

    async def _get_conn(self) -> _Conn:
        joined_earlier_attempt = False
        while True:
            best: _Conn | None = None
            for c in self._conns:
                if c.error is None and (best is None or len(c.pending) < len(best.pending)):
                    best = c
            if best is not None and (
                len(best.pending) < _GROW_AT or len(self._conns) >= self._max_connections
            ):
                return best
            if self._closed:
                raise RedisUnavailable("Redis transport is closed")
            attempt = self._attempt
            if attempt is None:
                nursery = self._nursery or await self._ensure_started()
                attempt = self._attempt = _Attempt()
                nursery.start_soon(self._connect_attempt, attempt)
                fresh = True
            else:
                fresh = False
            if best is not None:
                return best  # busy but usable; the new connection serves later calls
            await attempt.done.wait()
            if attempt.conn is not None and attempt.conn.error is None:
                return attempt.conn
            if attempt.error is not None:
                if fresh or joined_earlier_attempt:
                    raise RedisUnavailable(str(attempt.error)) from attempt.error
                # The attempt we joined began before this call (Redis may have come
                # back since): make one attempt of our own before giving up.
                joined_earlier_attempt = True

    def _ready_conn(self) -> _Conn | None:
        """The connection for the next command, when one is ready (the usual
        case: no waiting, so no cancel scope)."""
        best: _Conn | None = None
        for c in self._conns:
            if c.error is None and (best is None or len(c.pending) < len(best.pending)):
                best = c
        if best is not None and (
            len(best.pending) < _GROW_AT or len(self._conns) >= self._max_connections
        ):
            return best
        return None

    async def _roundtrip(self, data: bytes, expected: int) -> list[Any]:
        waiter = _Waiter(expected)
        conn = self._ready_conn()
        if conn is None:
            with trio.move_on_after(self._command_timeout) as scope:
                conn = await self._get_conn()
            if scope.cancelled_caught or conn is None:
                raise RedisUnavailable(
                    f"Redis at {self._label} did not answer within {self._command_timeout}s"
                )
        await conn.submit(data, waiter)  # timed out by the connection's watch_loop
        await waiter.wait()
        if waiter.error is not None:
            raise RedisUnavailable(str(waiter.error)) from waiter.error
        return waiter.replies

    # -- commands

    async def execute(self, *args: Arg) -> Any:
        """Run one raw command and return its raw reply."""
        reply = (await self._roundtrip(_pack(args), 1))[0]
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Run commands in one round trip (not a transaction).

        Error replies come back as ``RedisReplyError`` instances in the list.
        """
        if not commands:
            await trio.lowlevel.checkpoint()
            return []
        data = b"".join([_pack(c) for c in commands])
        return await self._roundtrip(data, len(commands))

    # -- pub/sub

    async def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> None:
        """SUBSCRIBE ``channel`` on the pub/sub connection; ``callback(data)`` per message.

        One callback per channel (subscribing again replaces it). Returns once
        Redis confirmed the subscription; raises ``RedisUnavailable`` (and drops
        the subscription) if that does not happen within ``connect_timeout +
        command_timeout``. After a Redis outage the subscription is
        re-established automatically (messages published during the outage
        are lost, as always with pub/sub).
        """
        nursery = await self._ensure_started()
        ch = channel.encode()
        self._subs[ch] = callback
        confirmed = self._confirm[ch] = trio.Event()
        with trio.move_on_after(self._connect_timeout + self._command_timeout):
            if not self._pubsub_running:
                self._pubsub_running = True
                nursery.start_soon(self._pubsub_loop)
            else:
                await self._pubsub_send(_pack(("SUBSCRIBE", ch)))
            await confirmed.wait()
        if not confirmed.is_set():
            if self._confirm.get(ch) is confirmed:
                del self._confirm[ch]
            if self._subs.get(ch) is callback:
                del self._subs[ch]
            raise RedisUnavailable(f"could not subscribe to {channel!r} on {self._label}")

    async def unsubscribe(self, channel: str) -> None:
        """UNSUBSCRIBE ``channel``; never raises for an unreachable Redis
        (see :func:`mesh_core.redis.forget_channel`)."""
        command = forget_channel(channel, self._subs, self._confirm)
        if command is not None:
            with trio.move_on_after(self._command_timeout):
                await self._pubsub_send(command)

    async def _pubsub_send(self, data: bytes) -> None:
        """Write on the current pub/sub connection, if any.

        A failed or interrupted write leaves the connection unusable: the
        session is then ended, and the pub/sub loop reconnects and subscribes
        every channel again.
        """
        async with self._pubsub_lock:
            current = self._pubsub_current
            if current is None:
                return  # the pub/sub loop subscribes everything once connected
            stream, session_scope = current
            try:
                await stream.send_all(data)
            except BaseException as exc:
                session_scope.cancel()
                if not isinstance(exc, _CONN_ERRORS):
                    raise

    async def _pubsub_loop(self) -> None:
        backoff = self._backoff_min
        while True:
            try:
                with trio.fail_after(self._attempt_timeout):
                    stream, reader, self._pubsub_label, address = await self._open_stream()
                    self._pubsub_address = address
            except (trio.TooSlowError, RedisUnavailable) as exc:
                _log.debug("pub/sub connect failed: %r", exc)
            except Exception:
                _log.exception("pub/sub connect failed")
            else:
                try:
                    if await self._pubsub_session(stream, reader):
                        backoff = self._backoff_min
                except Exception:
                    _log.exception("pub/sub session error; reconnecting")
                finally:
                    self._pubsub_current = None
                    await trio.aclose_forcefully(stream)
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._backoff_max)

    async def _pubsub_session(self, stream: trio.abc.Stream, reader: hiredis.Reader) -> bool:
        """Serve one pub/sub connection until it breaks; True if it got subscribed."""
        subscribed = False
        state = {"rx": 0, "pinged_at_rx": -1}
        pinger_scope = trio.CancelScope()
        with trio.CancelScope() as session_scope:
            try:
                async with self._pubsub_lock:
                    self._pubsub_current = (stream, session_scope)
                    if self._pubsub_address not in (None, self._master_address):
                        return False  # the master moved while we waited for the lock
                    if self._subs:
                        with trio.move_on_after(self._command_timeout) as send_scope:
                            await stream.send_all(_pack(("SUBSCRIBE", *self._subs)))
                        if send_scope.cancelled_caught:
                            return False
                if self._health_check_interval is not None and self._nursery is not None:
                    self._nursery.start_soon(
                        self._pubsub_pinger, state, session_scope, pinger_scope
                    )
                while True:
                    data = await stream.receive_some(_READ_SIZE)
                    if not data:
                        raise EOFError("connection closed by Redis")
                    state["rx"] += 1
                    reader.feed(data)  # type: ignore[arg-type]  # any buffer works
                    while (msg := reader.gets()) is not False:
                        if on_pubsub_reply(msg, self._subs, self._confirm, _log):
                            subscribed = True
            except _CONN_ERRORS as exc:
                _log.debug("pub/sub connection lost: %r", exc)
            finally:
                self._pubsub_current = None
                pinger_scope.cancel()
        return subscribed

    async def _pubsub_pinger(
        self,
        state: dict[str, int],
        session_scope: trio.CancelScope,
        pinger_scope: trio.CancelScope,
    ) -> None:
        assert self._health_check_interval is not None
        with pinger_scope:
            while True:
                await trio.sleep(self._health_check_interval)
                if state["pinged_at_rx"] == state["rx"]:
                    # nothing at all (not even the PONG) since the last PING
                    _log.debug("pub/sub connection did not answer PING; reconnecting")
                    session_scope.cancel()
                    return
                state["pinged_at_rx"] = state["rx"]
                with trio.move_on_after(self._command_timeout) as scope:
                    await self._pubsub_send(_PING)
                if scope.cancelled_caught:
                    session_scope.cancel()
                    return

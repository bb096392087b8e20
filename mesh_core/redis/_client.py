"""The project's Redis client, runtime-neutral: written once, used by both runtimes.

Each runtime supplies a small :class:`Network` (``mesh_asyncio._redis_transport``,
``mesh_trio._redis_transport``, about 150 lines each): how to open a socket
(TCP, Unix, TLS), a byte :class:`Stream` over it, the hot path of a
multiplexed command connection (:class:`Link`: write, read, feed the bytes
to :class:`~mesh_core.redis._connection.Multiplexed`), a cheap
:class:`~mesh_core.redis._connection.Waiter`, and a background task; timers,
events and task groups come from the :class:`~mesh_core.runtime.Runtime`.
Everything else is here: the handshake, the pool, batching, pub/sub,
Sentinel discovery and switch following.

Why one client of our own on both runtimes, measured on this machine (a
shared 2-core box) with ``python -m benchmarks.redis_clients``: the server's
CPU per command for the ``meta`` 50x4 load of ``benchmarks/run`` on a
private redis-server, ``mesh serve --runtime asyncio`` with each client in
turn, alternating, 8 rounds of 3 s. This design on asyncio: 68.2 us per
command (median; rounds 56.5 to 75.4); the previous asyncio transport,
redis-py's connections and hiredis parser driven directly with our own
auto-pipelining: 71.5 us (62.7 to 89.5); this design was the cheaper in 7 of
the 8 paired rounds. So the shared design costs no more, and redis-py (no
trio support) is no longer needed at run time. coredis (anyio, both
runtimes) was measured earlier at 12 to 15 times the CPU per concurrent
command (50-100 us against 4-6 us) and loses acknowledged writes on a
Sentinel failover. On asyncio a connection keeps one batch in flight (see
``mesh_asyncio._redis_transport``): a write per loop iteration measured a
little more CPU.

Design:

* Command connections are *multiplexed*: any number of tasks write commands on
  one connection and replies come back in order (FIFO). Commands submitted in
  the same scheduler batch are coalesced into one write (automatic
  pipelining). A pool grows lazily up to ``max_connections`` connections while
  the existing ones each have ``GROW_AT`` commands waiting (one pipelined
  connection is the cheapest way to talk to Redis). Timeouts are kept per
  connection (:meth:`Multiplexed.check`), not by a timer per command.
* ``pipeline()`` writes its commands contiguously, so ``MULTI ... EXEC`` inside
  one pipeline is atomic. Blocking commands (``BLPOP``, ...) and ``WATCH``
  would stall / leak across the multiplexed connections: do not use them.
* Pub/sub uses one dedicated connection, re-connected with exponential backoff
  and re-subscribed to every channel after an outage; after
  ``health_check_interval`` seconds of silence a PING must be answered within
  ``command_timeout``, else the connection is taken for dead.
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
* Cluster (``redis+cluster://``) is :class:`~mesh_core.redis.ClusterTransportCore`
  over one such client per node.

URL forms: see :mod:`mesh_core.redis._url`.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any, Protocol, Self

import hiredis

from .._errors import RedisReplyError, RedisUnavailable
from ..runtime import Event, Runtime, TaskGroup
from ._connection import (
    Multiplexed,
    Waiter,
    check_replies,
    handshake,
    is_master,
    new_reader,
    parse_master_address,
    sentinel_auth,
    ssl_context,
)
from ._resp import PING, Arg, on_pubsub_reply, pack, scan_keys
from ._sentinel import SWITCH_CHANNEL, SwitchState, parse_switch
from ._url import RedisEndpoint, SentinelEndpoint, parse_redis_url

__all__ = ["GROW_AT", "Link", "Network", "RedisClient", "Stream"]


#: A connection takes any number of commands in flight (they are pipelined);
#: another one is opened only when one has this many waiting.
GROW_AT = 256

#: what a lost connection raises in a shim's stream
_LOST = (OSError, EOFError, hiredis.ProtocolError)


class Stream(Protocol):
    """A connected byte stream (set-up exchanges, pub/sub, sentinels).

    ``send_all`` may be called by several tasks at once (the shim keeps
    their writes whole and in order); a lost connection raises ``OSError``
    or ``EOFError``. ``close()`` is immediate and wakes a pending
    ``receive_some`` (which then raises or returns ``b""``)."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self) -> bytes | bytearray:
        """Some bytes; ``b""`` once the peer closed."""
        ...

    def close(self) -> None: ...


class Link(Protocol):
    """A multiplexed command connection as the shim drives it (the hot path)."""

    state: Multiplexed

    async def submit(self, data: bytes, waiter: Waiter) -> None:
        """Queue ``waiter`` on ``state`` and send ``data``, whole and in order."""
        ...

    async def run(self) -> None:
        """Read, write and check timeouts until ``state`` fails; then close."""
        ...


class Network(Protocol):
    """What a runtime supplies to :class:`RedisClient`."""

    async def open(
        self, host: str, port: int, *, unix_path: str | None = None, keepalive: bool = True
    ) -> Stream: ...

    async def start_tls(self, stream: Stream, context: ssl.SSLContext, hostname: str) -> Stream: ...

    def link(self, stream: Stream, state: Multiplexed, timeout: float) -> Link: ...

    def waiter(self, expected: int) -> Waiter: ...


def _addr_label(address: tuple[str, int]) -> str:
    host, port = address
    return RedisEndpoint(host=host, port=port).label


async def exchange(
    stream: Stream, reader: hiredis.Reader, commands: Sequence[Sequence[Arg]]
) -> list[Any]:
    """Send ``commands`` in one write and read one reply each (set-up only)."""
    await stream.send_all(b"".join(pack(c) for c in commands))
    replies: list[Any] = []
    while len(replies) < len(commands):
        reply = reader.gets()
        if reply is False:
            data = await stream.receive_some()
            if not data:
                raise EOFError("connection closed by Redis")
            reader.feed(data)  # type: ignore[arg-type]  # any buffer works
            continue
        replies.append(reply)
    return replies


class _Attempt:
    """A single-flight connection attempt shared by every caller waiting for it."""

    __slots__ = ("done", "error", "link")

    def __init__(self, done: Event) -> None:
        self.done = done
        self.link: Link | None = None
        self.error: RedisUnavailable | None = None


class RedisClient:
    """Raw-command Redis client (implements the ``RedisTransport`` protocol).

    ``execute()`` returns raw replies (bytes, int, list, None), raises
    ``RedisReplyError`` for an error reply and ``RedisUnavailable`` when Redis
    cannot be reached or does not answer within ``command_timeout`` seconds
    (the bound covers any reconnect; a connect attempt alone is bounded by
    ``connect_timeout``).
    """

    cluster = False  # one node (or a Sentinel service): see ClusterTransportCore

    def __init__(
        self,
        url: str,
        *,
        runtime: Runtime,
        network: Network,
        command_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        max_connections: int = 4,
        health_check_interval: float | None = 10.0,
        reconnect_backoff: tuple[float, float] = (0.05, 2.0),
        ssl_context: ssl.SSLContext | None = None,
        logger: logging.Logger | None = None,
        spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], None] | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        target = parse_redis_url(url)
        self._rt = runtime
        self._net = network
        # where the background tasks run (until aclose): a system task by default
        self._spawn = spawn or runtime.spawn_system_task
        #: the shims log as ``mesh_asyncio.redis`` / ``mesh_trio.redis``
        self._log = logger or logging.getLogger("mesh_core.redis")
        # With Sentinel, ``_ep`` holds the master's credentials/db/TLS; its
        # address is asked of the sentinels before every connect.
        self._sentinel: SentinelEndpoint | None = None
        self._sentinels: list[tuple[str, int]] = []  # the last one that answered first
        self._master_address: tuple[str, int] | None = None
        # counts the changes of _master_address: a connect that began before
        # a change may have reached the old master
        self._switch_epoch = 0
        self._switch = SwitchState()  # the last +switch-master heard, trusted for a while
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
        self._links: list[Link] = []
        self._attempt: _Attempt | None = None
        self._group: TaskGroup | None = None
        self._started: Event | None = None
        self._stop = runtime.event()  # aclose() was called
        self._done = runtime.event()  # the background tasks have ended
        self._closed = False
        # pub/sub state
        self._subs: dict[bytes, Callable[[bytes], None]] = {}
        self._confirm: dict[bytes, Event] = {}
        self._pubsub_running = False
        self._pubsub_stream: Stream | None = None
        self._pubsub_address: tuple[str, int] | None = None

    # -- lifecycle

    async def _ensure_started(self) -> TaskGroup:
        if self._group is not None:
            return self._group
        if self._closed:
            raise RedisUnavailable("Redis transport is closed")
        if self._started is None:
            self._started = self._rt.event()
            self._spawn(self._supervise)
        await self._started.wait()
        if self._group is None:
            raise RedisUnavailable("Redis transport is closed")
        return self._group

    async def _supervise(self) -> None:
        try:
            async with self._rt.open_task_group() as group:
                self._group = group
                if self._sentinel is not None:
                    group.start_soon(self._listen_for_switches, self._sentinel)
                assert self._started is not None
                self._started.set()
                if not self._closed:
                    await self._stop.wait()
                group.cancel()
        finally:
            self._group = None
            closed = RedisUnavailable("Redis transport is closed")
            for link in self._links:
                link.state.fail(closed)
            self._links.clear()
            if self._started is not None:
                self._started.set()
            self._done.set()

    async def connect(self) -> None:
        """Verify that Redis answers (PING); raise ``RedisUnavailable`` if not."""
        await self.execute("PING")

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection and end every background task."""
        self._closed = True
        self._stop.set()  # the supervisor cancels its task group
        if self._pubsub_stream is not None:
            self._pubsub_stream.close()
        if self._started is not None:
            with self._rt.shield():
                await self._done.wait()
        else:
            await self._rt.sleep(0)

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
    ) -> tuple[Stream, hiredis.Reader, str, tuple[str, int] | None]:
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
            stream.close()
        raise RedisUnavailable(f"the master of {self._label} kept moving")

    async def _open_node(
        self, ep: RedisEndpoint, *, expect_master: bool = False
    ) -> tuple[Stream, hiredis.Reader]:
        try:
            stream = await self._net.open(ep.host, ep.port, unix_path=ep.unix_path)
        except OSError as exc:
            raise RedisUnavailable(f"cannot connect to Redis at {ep.label}: {exc}") from exc
        try:
            if ep.tls:
                ctx = self._ssl_context or ssl_context(ep)
                stream = await self._net.start_tls(stream, ctx, ep.host)
            reader = new_reader()
            hello = handshake(ep, expect_master=expect_master)
            if hello:
                replies = await exchange(stream, reader, hello)
                check_replies(f"Redis at {ep.label}", hello, replies)
                if expect_master:
                    is_master(ep.label, replies[-1])
            return stream, reader
        except BaseException as exc:
            stream.close()
            if isinstance(exc, _LOST) and not isinstance(exc, TimeoutError):
                raise RedisUnavailable(f"cannot connect to Redis at {ep.label}: {exc!r}") from exc
            raise

    async def _open_sentinel_master(
        self, target: SentinelEndpoint
    ) -> tuple[Stream, hiredis.Reader, str, tuple[str, int]]:
        """Ask each sentinel in turn for the master, connect to it, check it is one."""
        problems: list[str] = []
        for address in list(self._sentinels):
            label = _addr_label(address)
            try:
                async with self._rt.timeout(self._connect_timeout + self._command_timeout):
                    master = await self._ask_sentinel(address, target)
            except TimeoutError:
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
                self._log.debug(
                    "sentinel %s still names %s; %s was announced", label, master, announced
                )
                master = announced
            ep = replace(self._ep, host=master[0], port=master[1])
            try:
                async with self._rt.timeout(self._connect_timeout):
                    stream, reader = await self._open_node(ep, expect_master=True)
            except TimeoutError:
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
            async with self._rt.timeout(self._connect_timeout):
                stream = await self._net.open(*address)
        except OSError as exc:  # (TimeoutError is one)
            raise RedisUnavailable(f"cannot connect to sentinel {label}: {exc!r}") from exc
        commands = sentinel_auth(target)
        commands.append(("SENTINEL", "get-master-addr-by-name", target.service_name))
        try:
            async with self._rt.timeout(self._command_timeout):
                replies = await exchange(stream, new_reader(), commands)
        except TimeoutError:
            raise RedisUnavailable(f"sentinel {label} did not answer in time") from None
        except _LOST as exc:
            raise RedisUnavailable(f"sentinel {label}: connection lost: {exc!r}") from exc
        finally:
            stream.close()
        check_replies(f"sentinel {label}", commands, replies)
        return parse_master_address(label, replies[-1])

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
            self._log.info(
                "Redis master for %s is now %s (%s)", self._label, _addr_label(master), why
            )
        error = RedisUnavailable(f"Redis master moved to {_addr_label(master)} ({why})")
        for link in list(self._links):
            if link.state.address is not None and link.state.address != master:
                link.state.fail(error)
        if self._pubsub_stream is not None and self._pubsub_address != master:
            self._pubsub_stream.close()

    def _trusted_announcement(self) -> tuple[str, int] | None:
        return self._switch.trusted_master(self._rt.now())

    def _switch_announced(self, master: tuple[str, int], why: str) -> None:
        self._switch.announce(master, self._rt.now())
        self._master_moved(master, why)

    async def _backoff(self, backoff: float) -> float:
        """Sleep a jittered ``backoff``; the next one."""
        await self._rt.sleep(backoff * (0.5 + random.random()))
        return min(backoff * 2, self._backoff_max)

    async def _listen_for_switches(self, target: SentinelEndpoint) -> None:
        """Stay subscribed to ``+switch-master`` on one sentinel, the next one if it fails."""
        backoff = self._backoff_min
        turn = 0
        while True:
            address = target.sentinels[turn % len(target.sentinels)]
            try:
                if await self._switch_session(address, target):
                    backoff = self._backoff_min
            except (*_LOST, RedisUnavailable) as exc:  # (TimeoutError is an OSError)
                self._log.debug("listening for failovers on sentinel %s failed: %r", address, exc)
            except Exception:
                self._log.exception("listening for failovers on sentinel %s failed", address)
            turn += 1
            backoff = await self._backoff(backoff)

    async def _switch_session(self, address: tuple[str, int], target: SentinelEndpoint) -> bool:
        """Serve one subscription until it breaks; True if it was confirmed."""
        label = _addr_label(address)
        async with self._rt.timeout(self._connect_timeout):
            stream = await self._net.open(*address)
        try:
            reader = new_reader()
            commands = sentinel_auth(target)
            commands.append(("SUBSCRIBE", SWITCH_CHANNEL))
            async with self._rt.timeout(self._command_timeout):
                replies = await exchange(stream, reader, commands)
            check_replies(f"sentinel {label}", commands, replies)
            self._log.debug("listening for failovers on sentinel %s", label)
            # a switch announced while nobody listened is caught up with now
            await self._check_master(address, target)

            def on_reply(msg: Any) -> None:
                if type(msg) is list and len(msg) == 3 and msg[0] == b"message":
                    master = parse_switch(msg[2], target.service_name)
                    if master is not None:
                        self._switch_announced(master, f"announced by sentinel {label}")

            await self._serve_subscription(stream, reader, f"sentinel {label}", on_reply)
            return True
        finally:
            stream.close()

    async def _serve_subscription(
        self, stream: Stream, reader: hiredis.Reader, label: str, on_reply: Callable[[Any], None]
    ) -> None:
        """Read a subscribed connection until it breaks (raises ``EOFError``
        or ``RedisUnavailable``); after ``health_check_interval`` seconds of
        silence, a PING must be answered within ``command_timeout``."""
        interval = self._health_check_interval
        pinged = False
        while True:
            wait = self._command_timeout if pinged else interval
            try:
                if wait is None:
                    data = await stream.receive_some()
                else:
                    async with self._rt.timeout(wait):
                        data = await stream.receive_some()
            except TimeoutError:  # nothing for a while: PING, then expect something
                if pinged:
                    raise RedisUnavailable(f"{label} stopped answering") from None
                async with self._rt.timeout(self._command_timeout):
                    await stream.send_all(PING)
                pinged = True
                continue
            if not data:
                raise EOFError(f"connection closed by {label}")
            pinged = False
            reader.feed(data)  # type: ignore[arg-type]  # any buffer works
            while (msg := reader.gets()) is not False:
                on_reply(msg)

    async def _check_master(self, address: tuple[str, int], target: SentinelEndpoint) -> None:
        """Follow the master the sentinel names now, if it is not the one we talk to."""
        if self._master_address is None:
            return  # not connected yet: the first connect asks the sentinels anyway
        try:
            master = await self._ask_sentinel(address, target)
        except RedisUnavailable as exc:
            self._log.debug("asking sentinel %s for the master failed: %r", address, exc)
            return
        announced = self._trusted_announcement()
        if master is not None and master != self._master_address and announced in (None, master):
            self._switch_announced(master, f"named by sentinel {_addr_label(address)}")

    async def _connect_attempt(self, attempt: _Attempt) -> None:
        try:
            async with self._rt.timeout(self._attempt_timeout):
                stream, reader, label, address = await self._open_stream()
        except RedisUnavailable as exc:
            attempt.error = exc
        except TimeoutError:
            attempt.error = RedisUnavailable(
                f"connecting to Redis at {self._label} timed out after {self._attempt_timeout}s"
            )
        except Exception as exc:
            self._log.exception("connecting to Redis failed")
            attempt.error = RedisUnavailable(f"cannot connect to Redis at {self._label}: {exc!r}")
        else:
            state = Multiplexed(label, reader, self._rt.now(), address=address)
            link = self._net.link(stream, state, self._command_timeout)
            attempt.link = link
            self._links.append(link)
            assert self._group is not None
            self._group.start_soon(self._run_link, link)
        finally:
            self._attempt = None
            attempt.done.set()

    async def _run_link(self, link: Link) -> None:
        try:
            await link.run()
        finally:
            link.state.fail(RedisUnavailable(f"Redis connection to {link.state.label} closed"))
            if link in self._links:
                self._links.remove(link)

    def _ready_link(self) -> Link | None:
        """The connection for the next command, when one is ready (the usual
        case: no waiting, so no timer)."""
        best: Link | None = None
        for c in self._links:
            if c.state.error is None and (
                best is None or len(c.state.pending) < len(best.state.pending)
            ):
                best = c
        if best is not None and (
            len(best.state.pending) < GROW_AT or len(self._links) >= self._max_connections
        ):
            return best
        return None

    async def _get_link(self) -> Link:
        joined_earlier_attempt = False
        while True:
            ready = self._ready_link()
            if ready is not None:
                return ready
            best: Link | None = None
            for c in self._links:
                if c.state.error is None:
                    best = c
            if self._closed:
                raise RedisUnavailable("Redis transport is closed")
            attempt = self._attempt
            if attempt is None:
                group = self._group or await self._ensure_started()
                attempt = self._attempt = _Attempt(self._rt.event())
                group.start_soon(self._connect_attempt, attempt)
                fresh = True
            else:
                fresh = False
            if best is not None:
                return best  # busy but usable; the new connection serves later calls
            await attempt.done.wait()
            if attempt.link is not None and attempt.link.state.error is None:
                return attempt.link
            if attempt.error is not None:
                if fresh or joined_earlier_attempt:
                    raise RedisUnavailable(str(attempt.error)) from attempt.error
                # The attempt we joined began before this call (Redis may have come
                # back since): make one attempt of our own before giving up.
                joined_earlier_attempt = True

    async def _roundtrip(self, data: bytes, expected: int) -> list[Any]:
        waiter = self._net.waiter(expected)
        link = self._ready_link()
        if link is None:
            try:
                async with self._rt.timeout(self._command_timeout):
                    link = await self._get_link()
            except TimeoutError:
                raise RedisUnavailable(
                    f"Redis at {self._label} did not answer within {self._command_timeout}s"
                ) from None
        await link.submit(data, waiter)  # timed out by the connection's check
        await waiter.wait()
        if waiter.error is not None:
            raise RedisUnavailable(str(waiter.error)) from waiter.error
        return waiter.replies

    # -- commands

    async def execute(self, *args: Arg) -> Any:
        """Run one raw command and return its raw reply."""
        reply = (await self._roundtrip(pack(args), 1))[0]
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Run commands in one round trip (not a transaction).

        Error replies come back as ``RedisReplyError`` instances in the list.
        """
        if not commands:
            await self._rt.sleep(0)
            return []
        data = b"".join([pack(c) for c in commands])
        return await self._roundtrip(data, len(commands))

    async def scan_all(self, pattern: str, count: int) -> list[bytes]:
        """Every key matching ``pattern`` (``SCAN``, never ``KEYS``)."""
        return await scan_keys(self.execute, pattern, count)

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
        group = await self._ensure_started()
        ch = channel.encode()
        self._subs[ch] = callback
        confirmed = self._confirm[ch] = self._rt.event()
        try:
            async with self._rt.timeout(self._connect_timeout + self._command_timeout):
                if not self._pubsub_running:
                    self._pubsub_running = True
                    group.start_soon(self._pubsub_loop)
                else:
                    await self._pubsub_send(pack(("SUBSCRIBE", ch)))
                await confirmed.wait()
        except TimeoutError:
            pass
        if not confirmed.is_set():
            if self._confirm.get(ch) is confirmed:
                del self._confirm[ch]
            if self._subs.get(ch) is callback:
                del self._subs[ch]
            raise RedisUnavailable(f"could not subscribe to {channel!r} on {self._label}")

    async def _pubsub_send(self, data: bytes) -> None:
        """Write on the current pub/sub connection, if any.

        A failed or interrupted write leaves the connection unusable: it is
        then closed, and the pub/sub loop reconnects and subscribes every
        channel again.
        """
        stream = self._pubsub_stream
        if stream is None:
            return  # the pub/sub loop subscribes everything once connected
        try:
            await stream.send_all(data)
        except BaseException as exc:
            stream.close()
            if not isinstance(exc, _LOST):
                raise

    async def _pubsub_loop(self) -> None:
        backoff = self._backoff_min
        while True:
            try:
                async with self._rt.timeout(self._attempt_timeout):
                    stream, reader, label, address = await self._open_stream()
                    self._pubsub_address = address
            except (TimeoutError, RedisUnavailable) as exc:
                self._log.debug("pub/sub connect failed: %r", exc)
            except Exception:
                self._log.exception("pub/sub connect failed")
            else:
                try:
                    if await self._pubsub_session(stream, reader, label):
                        backoff = self._backoff_min
                except Exception:
                    self._log.exception("pub/sub session error; reconnecting")
                finally:
                    self._pubsub_stream = None
                    stream.close()
            backoff = await self._backoff(backoff)

    async def _pubsub_session(self, stream: Stream, reader: hiredis.Reader, label: str) -> bool:
        """Serve one pub/sub connection until it breaks; True if it got subscribed."""
        subscribed = False

        def on_reply(msg: Any) -> None:
            nonlocal subscribed
            if on_pubsub_reply(msg, self._subs, self._confirm, self._log):
                subscribed = True

        self._pubsub_stream = stream
        if self._pubsub_address not in (None, self._master_address):
            return False  # the master moved while we connected
        try:
            if self._subs:
                async with self._rt.timeout(self._command_timeout):
                    await stream.send_all(pack(("SUBSCRIBE", *self._subs)))
            await self._serve_subscription(stream, reader, f"Redis at {label}", on_reply)
        except (*_LOST, RedisUnavailable) as exc:  # (TimeoutError is an OSError)
            self._log.debug("pub/sub connection lost: %r", exc)
        return subscribed

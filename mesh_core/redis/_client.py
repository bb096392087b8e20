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
the 8 paired rounds (run again on the finished code: 68.3 against 71.4 us,
6 of 8). So the shared design costs no more, and redis-py (no
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
* A reconnect replays the owner's state first (:meth:`RedisClient.on_reconnect`):
  when a connection opens while none is left and one was lost since the last
  replay (Redis restarted, possibly empty; Sentinel switched to a replica
  that may lack the latest writes), the hook's commands are sent on it, right
  after the handshake and before the connection takes any caller's command,
  and answered; callers waiting for a connection wait for them too. So no
  command reaches the new Redis before the state it relies on, and the steady
  state pays nothing.
* Cluster (``redis+cluster://``) is :class:`~mesh_core.redis.ClusterTransportCore`
  over one such client per node.

URL forms: see :mod:`mesh_core.redis._url`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Self

import hiredis

if TYPE_CHECKING:
    from ..runtime import TLSContext

from .._errors import RedisReplyError, RedisUnavailable
from ..runtime import Event, Runtime, TaskGroup
from ._connection import (
    Backoff,
    Link,
    Multiplexed,
    Network,
    ReconnectHook,
    Stream,
    addr_label,
    check_replies,
    exchange,
    handshake,
    is_master,
    new_reader,
    serve_subscription,
    ssl_context,
)
from ._resp import Arg, on_pubsub_reply, pack, scan_keys
from ._sentinel import SentinelMaster
from ._url import RedisEndpoint, SentinelEndpoint, parse_redis_url

__all__ = ["GROW_AT", "RedisClient"]


#: A connection takes any number of commands in flight (they are pipelined);
#: another one is opened only when one has this many waiting.
GROW_AT = 256

#: what a lost connection raises in a shim's stream
_LOST = (OSError, EOFError, hiredis.ProtocolError)


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
        ssl_context: TLSContext | None = None,
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
        self._backoff = reconnect_backoff  # (low, high) seconds between reconnects
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._health_check_interval = health_check_interval
        # With Sentinel, ``_ep`` holds the master's credentials/db/TLS; its
        # address is asked of the sentinels before every connect.
        self._sentinel: SentinelMaster | None = None
        if isinstance(target, SentinelEndpoint):
            self._ep = target.master
            self._sentinel = SentinelMaster(
                target,
                runtime=runtime,
                network=network,
                open_node=lambda ep: self._open_node(ep, expect_master=True),
                on_moved=self._master_moved,
                log=self._log,
                connect_timeout=connect_timeout,
                command_timeout=command_timeout,
                health_check_interval=health_check_interval,
                reconnect_backoff=reconnect_backoff,
            )
        else:
            self._ep = target
        self._label = target.label
        self._ssl_context = ssl_context
        self._max_connections = max_connections
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
        # the reconnect replay: connections lost so far, and that count when
        # the last replay was answered (behind: the next connection replays)
        self._on_reconnect: ReconnectHook | None = None
        self._losses = 0
        self._replayed = 0
        #: connections (command or pub/sub) opened again after one was lost
        #: or a connect failed: the ``mesh_redis_reconnects_total`` metric
        self.reconnects = 0
        self._lost = False  # a command connection was lost or could not be opened

    def on_reconnect(self, hook: ReconnectHook | None, *, first: bool = False) -> None:
        """Have ``hook()`` 's commands sent first on the connection that
        replaces lost ones (see the module docstring); with ``first``, on the
        very first connection too (a node that may be a promoted replica).
        Error replies to them are logged and otherwise ignored: the replay is
        a best effort that the owner's periodic duties back up."""
        self._on_reconnect = hook
        if first and self._losses == self._replayed:
            self._replayed = self._losses - 1

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
                    group.start_soon(self._sentinel.listen)
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
        """Bound on one connect attempt, as a safety net over its per-step bounds."""
        if self._sentinel is None:
            return self._connect_timeout
        return self._sentinel.attempt_timeout

    async def _open_stream(
        self,
    ) -> tuple[Stream, hiredis.Reader, str, tuple[str, int] | None]:
        """A connected, authenticated stream to the (current) master, its label and
        (with Sentinel) its address."""
        if self._sentinel is not None:
            return await self._sentinel.open()
        stream, reader = await self._open_node(self._ep)
        return stream, reader, self._ep.label, None

    async def _open_node(
        self, ep: RedisEndpoint, *, expect_master: bool = False
    ) -> tuple[Stream, hiredis.Reader]:
        try:
            stream = await self._net.open(ep.host, ep.port, unix_path=ep.unix_path)
        except OSError as exc:
            raise RedisUnavailable(f"cannot connect to Redis at {ep.label}: {exc}") from exc
        try:
            if ep.tls:
                ctx = self._ssl_context or ssl_context(ep, self._net)
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

    def _master_moved(self, master: tuple[str, int], why: str) -> None:
        """Drop every connection to another node than ``master``, the new
        master: in-flight commands get ``RedisUnavailable``; the pub/sub
        connection reconnects and re-subscribes on the new master."""
        error = RedisUnavailable(f"Redis master moved to {addr_label(master)} ({why})")
        for link in list(self._links):
            if link.state.address is not None and link.state.address != master:
                link.state.fail(error)
        if self._pubsub_stream is not None and self._pubsub_address != master:
            self._pubsub_stream.close()

    async def _connect_attempt(self, attempt: _Attempt) -> None:
        try:
            async with self._rt.timeout(self._attempt_timeout):
                stream, reader, label, address = await self._open_stream()
            await self._replay(stream, reader, label)
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
            if self._lost:
                self._lost = False
                self.reconnects += 1
            state = Multiplexed(label, reader, self._rt.now(), address=address)
            link = self._net.link(stream, state, self._command_timeout)
            attempt.link = link
            self._links.append(link)
            assert self._group is not None
            self._group.start_soon(self._run_link, link)
        finally:
            if attempt.error is not None:
                self._lost = True
            self._attempt = None
            attempt.done.set()

    async def _replay(self, stream: Stream, reader: hiredis.Reader, label: str) -> None:
        """Send the reconnect hook's commands on a new connection and read
        their replies, if a connection was lost since the last replay and no
        other is left: a surviving connection means Redis did not restart,
        and commands on it could overtake the replay."""
        hook = self._on_reconnect
        losses = self._losses
        if (
            hook is None
            or losses == self._replayed
            or any(link.state.error is None for link in self._links)
        ):
            return
        try:
            commands = hook()
        except Exception:  # the owner's bug must not keep every reconnect failing
            self._log.exception("the reconnect hook failed; nothing replayed")
            commands = ()
        try:
            if commands:
                # Redis takes ~2 us a command here (250,000 replayed in 0.41 s):
                # one command timeout more per 100,000 commands keeps a large
                # instance's replay from timing out at every reconnect
                limit = self._command_timeout * (1 + len(commands) // 100_000)
                async with self._rt.timeout(limit):
                    replies = await exchange(stream, reader, commands)
                self._log.log(
                    logging.INFO if self._replayed >= 0 else logging.DEBUG,
                    "reconnected to Redis at %s: replayed %d command(s) before serving",
                    label,
                    len(commands),
                )
                failed = [r for r in replies if isinstance(r, RedisReplyError)]
                if any(r.prefix == "LOADING" for r in failed):
                    # a Redis loading its dataset refuses everything: not
                    # replayed, so this connection is not ready either
                    raise RedisUnavailable(f"Redis at {label} is loading its dataset")
                if failed:
                    self._log.warning(
                        "%d of %d command(s) replayed on reconnecting to %s failed, first: %s",
                        len(failed),
                        len(commands),
                        label,
                        failed[0],
                    )
        except BaseException as exc:
            stream.close()
            if isinstance(exc, TimeoutError):
                raise RedisUnavailable(
                    f"Redis at {label} did not answer the reconnect replay in time"
                ) from None
            if isinstance(exc, _LOST):
                raise RedisUnavailable(f"Redis connection to {label} lost: {exc!r}") from exc
            raise
        self._replayed = losses

    async def _run_link(self, link: Link) -> None:
        try:
            await link.run()
        finally:
            link.state.fail(RedisUnavailable(f"Redis connection to {link.state.label} closed"))
            if link in self._links:
                self._links.remove(link)
            if not self._closed:
                self._lost = True  # the next connection counts as a reconnect
                self._losses += 1  # and replays, if it is the only one

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

    async def unsubscribe(self, channel: str) -> None:
        """Forget ``channel`` at once (a reconnect no longer subscribes it)
        and send UNSUBSCRIBE on the pub/sub connection if there is one. Never
        raises for an unreachable Redis: a connection that fails is replaced,
        and its successor subscribes only the channels still wanted. A
        message still in flight for it finds no callback and is dropped."""
        ch = channel.encode()
        if self._subs.pop(ch, None) is None:
            return
        self._confirm.pop(ch, None)
        try:
            async with self._rt.timeout(self._command_timeout):
                await self._pubsub_send(pack(("UNSUBSCRIBE", ch)))
        except (*_LOST, TimeoutError) as exc:
            self._log.debug("UNSUBSCRIBE %r not sent (%r); the next session omits it", ch, exc)

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
        backoff = Backoff(self._rt, *self._backoff)
        first = True
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
                if not first:
                    self.reconnects += 1
                try:
                    if await self._pubsub_session(stream, reader, label):
                        backoff.reset()
                except Exception:
                    self._log.exception("pub/sub session error; reconnecting")
                finally:
                    self._pubsub_stream = None
                    stream.close()
            first = False
            await backoff.sleep()

    async def _pubsub_session(self, stream: Stream, reader: hiredis.Reader, label: str) -> bool:
        """Serve one pub/sub connection until it breaks; True if it got subscribed."""
        subscribed = False

        def on_reply(msg: Any) -> None:
            nonlocal subscribed
            if on_pubsub_reply(msg, self._subs, self._confirm, self._log):
                subscribed = True

        self._pubsub_stream = stream
        master = None if self._sentinel is None else self._sentinel.address
        if self._pubsub_address not in (None, master):
            return False  # the master moved while we connected
        try:
            if self._subs:
                async with self._rt.timeout(self._command_timeout):
                    await stream.send_all(pack(("SUBSCRIBE", *self._subs)))
            await serve_subscription(
                self._rt,
                stream,
                reader,
                f"Redis at {label}",
                on_reply,
                interval=self._health_check_interval,
                timeout=self._command_timeout,
            )
        except (*_LOST, RedisUnavailable) as exc:  # (TimeoutError is an OSError)
            self._log.debug("pub/sub connection lost: %r", exc)
        return subscribed

"""asyncio I/O layer under the Redis storage driver, on redis-py's asyncio client.

Uses redis-py's connection pool, connections and hiredis parser, but drives
them directly (``get_connection`` / ``send_packed_command`` /
``read_response`` / ``release``) instead of ``Redis.execute_command``: replies
stay raw (no response callbacks), there is no hidden retry of
non-idempotent commands, and the per-command overhead is lower. Commands are
encoded by ``hiredis.pack_command`` exactly as in the trio transport.

* ``command_timeout`` bounds a whole ``execute()`` / ``pipeline()`` call,
  including waiting for a pooled connection and any reconnect; a connect
  attempt alone is bounded by ``connect_timeout``. A timed-out or cancelled
  command closes its connection (redis-py does that), so no reply is ever
  read by the wrong caller.
* ``auto_pipeline=True`` coalesces ``execute()`` and ``pipeline()`` calls
  into pipelined round trips, one in flight at a time: what is issued while a
  batch is out goes in the next (up to ``max_batch`` commands each); results
  and error replies still go to each caller.
* Pub/sub uses one dedicated connection, re-connected with exponential
  backoff and re-subscribed after an outage; a PING every
  ``health_check_interval`` seconds detects silently dead connections.

* Sentinel (``redis+sentinel://``): both the command pool and the pub/sub
  pool are redis-py ``SentinelConnectionPool`` s, whose connections ask the
  sentinels for the master's address on every (re)connect; a ``READONLY``
  reply (the master was demoted) drops that connection, is reported as
  ``RedisUnavailable``, and the next command asks the sentinels again.
  Sentinel leaves a master it replaced writable for seconds, so waiting for
  ``READONLY`` would lose the writes made there meanwhile: a background task
  (from the first connect to ``aclose()``) stays subscribed to
  ``+switch-master`` on one sentinel (the next one if it dies) and, the
  moment a switch is announced, drops every connection to another node
  (in-flight commands get ``RedisUnavailable``; the pub/sub connection
  reconnects and re-subscribes on the new master); nothing is sent to the
  old master afterwards. Switches announced while it was not subscribed are
  caught by asking the sentinels once it is again.

URL forms (checked by ``mesh_core._redis_url``; plain URLs are then read by
redis-py, which knows more query options): ``redis://[[user]:password@]host[:port][/db]``,
``rediss://...`` (``?ssl_cert_reqs=none`` etc.), ``unix:///path?db=N&password=...``,
``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``
``[?sentinel_password=...&sentinel_username=...]`` (sentinel port 26379 by
default; the credentials before ``@`` are the master's) and
``rediss+sentinel://...`` (TLS to the master, clear text to the sentinels).
Cluster is not supported by this transport yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

import redis.asyncio as aredis
from redis.asyncio.connection import AbstractConnection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mesh_core.redis import PING as _PING
from mesh_core.redis import (
    SWITCH_CHANNEL,
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

__all__ = ["AsyncioRedisTransport", "RedisReplyError", "RedisUnavailable"]

Arg = bytes | str | int | float

_log = logging.getLogger("mesh_asyncio.redis")


# Everything that means "Redis is not reachable right now" (redis-py's
# ConnectionError, TimeoutError, AuthenticationError, BusyLoadingError... are
# RedisErrors; error *replies* to our commands are handled before this).
_UNAVAILABLE = (RedisError, OSError, TimeoutError)


def _reply_error(exc: ResponseError) -> RedisReplyError:
    """The full error text: redis-py strips known prefixes (``NOSCRIPT``, ``ERR``...)."""
    message = str(exc.args[0]) if exc.args else str(exc)
    status = getattr(exc, "status_code", None)
    if status and not message.startswith(f"{status} "):
        message = f"{status} {message}"
    return RedisReplyError(message)


def _fix_nested_errors(reply: list[Any]) -> list[Any]:
    """Error replies nested in arrays (``EXEC``, Lua tables) as ``RedisReplyError`` too."""
    for i, item in enumerate(reply):
        if isinstance(item, ResponseError):
            reply[i] = _reply_error(item)
        elif type(item) is list:
            _fix_nested_errors(item)
    return reply


#: a command or pipeline that joined an auto-pipelined batch: its packed
#: commands, how many replies it expects, and where they go
_Joined = tuple[bytes, int, "asyncio.Future[list[Any]]"]


def _unavailable(exc: BaseException, what: str) -> RedisUnavailable:
    return RedisUnavailable(f"{what}: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------ Sentinel switches


def _address(conn: Any) -> tuple[str, int]:
    return str(conn.host), int(conn.port)


class _SwitchAwareConnection(SentinelManagedConnection):
    """A master connection that never talks to a master replaced since it was resolved.

    redis-py's ``send_packed_command`` silently reconnects a dropped
    connection to the address it had, bypassing the sentinels: that would be
    the old master again. Here every (re)connect asks the sentinels, and a
    connect that raced with a switch is redone.
    """

    #: the switch epoch at which this connection's address was resolved
    switch_epoch = -1

    def stale(self) -> bool:
        state: SwitchState = self.connection_pool.switch_state
        return (
            self.switch_epoch != state.epoch
            and state.master is not None
            and _address(self) != state.master
        )

    async def _connect_retry(self) -> None:
        if self._reader:
            return
        pool = self.connection_pool
        for _ in range(3):
            epoch = pool.switch_state.epoch
            address = await pool.get_master_address()
            self.switch_epoch = epoch
            await self.connect_to(address)  # type: ignore[no-untyped-call]
            if not self.stale():
                pool.on_master_connect()
                return
            # a switch was announced while connecting, to another node
            await self.disconnect(nowait=True)
        raise RedisConnectionError(f"the master of {pool.service_name!r} kept moving")

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self.stale():
            await self.disconnect(nowait=True)
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]  # through the sentinels
        await super().send_packed_command(command, check_health)


class _SwitchAwareSSLConnection(_SwitchAwareConnection, SSLConnection):
    pass


class _SwitchAwarePool(SentinelConnectionPool):
    """A ``SentinelConnectionPool`` that trusts an announced switch over a lagging sentinel."""

    def __init__(
        self,
        service_name: str,
        sentinel_manager: Sentinel,
        switch_state: SwitchState,
        on_connect: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        tls = kwargs.pop("ssl", False)
        kwargs["connection_class"] = _SwitchAwareSSLConnection if tls else _SwitchAwareConnection
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self.switch_state = switch_state
        self.on_master_connect = on_connect

    async def get_master_address(self) -> tuple[str, int]:
        host, port = await self.sentinel_manager.discover_master(self.service_name)
        address = (str(host), int(port))
        trusted = self.switch_state.trusted_master(time.monotonic())
        if trusted is not None and address != trusted:
            _log.debug("sentinel still names %s, but %s was announced", address, trusted)
            address = trusted
        if self.master_address != address:
            self.master_address = address
            await self.disconnect(inuse_connections=False)
        return address

    def connections(self) -> list[Any]:
        """Idle and in-use connections (redis-py's accessors for its pool subclasses)."""
        return [*self._get_free_connections(), *self._get_in_use_connections()]


class AsyncioRedisTransport:
    """Raw-command Redis transport for asyncio (implements the ``RedisTransport`` protocol).

    ``execute()`` returns raw replies (bytes, int, list, None), raises
    ``RedisReplyError`` for an error reply and ``RedisUnavailable`` when Redis
    cannot be reached or does not answer within ``command_timeout`` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        command_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        max_connections: int = 32,
        auto_pipeline: bool = True,
        max_batch: int = 1000,
        health_check_interval: float | None = 10.0,
        reconnect_backoff: tuple[float, float] = (0.05, 2.0),
        **connection_kwargs: Any,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._auto_pipeline = auto_pipeline
        self._max_batch = max_batch
        self._health_check_interval = health_check_interval
        self._backoff_min, self._backoff_max = reconnect_backoff
        kwargs: dict[str, Any] = {
            "socket_timeout": None,  # bounded per call by command_timeout instead
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
            "decode_responses": False,
            **connection_kwargs,
        }
        target = parse_redis_url(url)  # one parser for both runtimes: same errors, same forms
        if not url.lower().startswith("unix:"):
            kwargs.setdefault("socket_keepalive", True)
        self._sentinel: Sentinel | None = None
        self._target: SentinelEndpoint | None = None
        self._switch_state = SwitchState()
        self._switch_listener: asyncio.Task[None] | None = None
        self._pool: aredis.ConnectionPool
        self._pubsub_pool: aredis.ConnectionPool
        self._target_label = target.label
        if isinstance(target, SentinelEndpoint):
            self._target = target
            self._sentinel = self._sentinel_manager(target)
            self._pool = self._sentinel_pool(target, max_connections, kwargs)
            self._pubsub_pool = self._sentinel_pool(target, 1, kwargs)
        else:
            # redis-py reads the URL itself: it knows more query options than ours
            self._pool = aredis.ConnectionPool.from_url(
                url, max_connections=max_connections, **kwargs
            )
            self._pubsub_pool = aredis.ConnectionPool.from_url(url, max_connections=1, **kwargs)
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # auto-pipelining
        self._queue: list[_Joined] = []
        self._pumping = False
        # pub/sub
        self._subs: dict[bytes, Callable[[bytes], None]] = {}
        self._confirm: dict[bytes, asyncio.Event] = {}
        self._pubsub_task: asyncio.Task[None] | None = None
        self._pubsub_conn: AbstractConnection | None = None
        self._pubsub_lock = asyncio.Lock()
        self._pubsub_rx = 0
        self._pubsub_stale = False

    def _sentinel_manager(self, target: SentinelEndpoint) -> Sentinel:
        """redis-py's sentinel client, asking the sentinels of ``target`` in turn."""
        sentinel_kwargs: dict[str, Any] = {
            # A sentinel that accepts but does not answer must not stall the
            # discovery: after command_timeout the next sentinel is asked.
            "socket_timeout": self._command_timeout,
            "socket_connect_timeout": self._connect_timeout,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
            "username": target.sentinel_username,
            "password": target.sentinel_password,
        }
        self._sentinel_kwargs = sentinel_kwargs
        return Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels), sentinel_kwargs=sentinel_kwargs
        )

    def _sentinel_pool(
        self, target: SentinelEndpoint, max_connections: int, kwargs: dict[str, Any]
    ) -> aredis.ConnectionPool:
        """A pool whose connections ask the sentinels for the master on every (re)connect.

        redis-py's ``SentinelManagedConnection`` also turns a ``READONLY``
        reply (a demoted master) into a disconnect plus ``ConnectionError``,
        which callers see as ``RedisUnavailable``; the next command asks the
        sentinels again. But a replaced master answers writes for seconds
        before it is demoted: after a ``+switch-master`` announcement the
        connections of this pool send nothing more to it (``_SwitchAwarePool``).
        """
        master = target.master
        pool_kwargs: dict[str, Any] = {
            "db": master.db,
            "username": master.username,
            "password": master.password,
            **kwargs,
            "max_connections": max_connections,
        }
        if master.tls:
            pool_kwargs["ssl"] = True
            pool_kwargs.setdefault("ssl_cert_reqs", master.ssl_cert_reqs)
            if master.ssl_ca_certs is not None:
                pool_kwargs.setdefault("ssl_ca_certs", master.ssl_ca_certs)
            if master.ssl_cert_reqs != "required":
                pool_kwargs.setdefault("ssl_check_hostname", False)
        assert self._sentinel is not None
        return _SwitchAwarePool(
            target.service_name,
            self._sentinel,
            self._switch_state,
            self._start_switch_listener,
            **pool_kwargs,
        )

    # -- Sentinel: following a switch at once

    def _start_switch_listener(self) -> None:
        """Called on every master connect: the first one starts the ``+switch-master`` listener."""
        if self._switch_listener is None and not self._closed and self._target is not None:
            self._switch_listener = self._spawn(self._listen_for_switches(self._target))

    async def _listen_for_switches(self, target: SentinelEndpoint) -> None:
        """Stay subscribed to ``+switch-master`` on one sentinel, the next one if it fails."""
        backoff = self._backoff_min
        turn = 0
        while True:
            address = target.sentinels[turn % len(target.sentinels)]
            try:
                if await self._switch_session(address, target):
                    backoff = self._backoff_min
            except (*_UNAVAILABLE, RedisReplyError) as exc:
                _log.debug("listening for failovers on sentinel %s failed: %r", address, exc)
            except Exception:
                _log.exception("listening for failovers on sentinel %s failed", address)
            turn += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._backoff_max)

    async def _switch_session(self, address: tuple[str, int], target: SentinelEndpoint) -> bool:
        """Serve one subscription until it breaks; True if it was confirmed."""
        kwargs = {k: v for k, v in self._sentinel_kwargs.items() if k != "socket_timeout"}
        conn = aredis.Connection(host=address[0], port=address[1], **kwargs)
        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_packed_command(
                    _pack(("SUBSCRIBE", SWITCH_CHANNEL)), check_health=False
                )
                reply = await conn.read_response(disconnect_on_error=False)
            if not (type(reply) is list and reply and reply[0] == b"subscribe"):
                raise RedisReplyError(f"sentinel answered SUBSCRIBE with {reply!r}")
            _log.debug("listening for failovers on sentinel %s", address)
            # a switch announced while nobody listened is caught up with now
            await self._check_master(target)
            interval = self._health_check_interval
            pinged = False
            while True:
                wait = math.inf if interval is None else interval
                msg = await conn.read_response(
                    timeout=self._command_timeout if pinged else wait,
                    disconnect_on_error=False,
                )
                if msg is None:  # nothing for a while: PING, then expect something
                    if pinged:
                        raise RedisUnavailable(f"sentinel {address} stopped answering")
                    await conn.send_packed_command(_PING, check_health=False)
                    pinged = True
                    continue
                pinged = False
                if type(msg) is list and len(msg) == 3 and msg[0] == b"message":
                    master = parse_switch(msg[2], target.service_name)
                    if master is not None:
                        await self._master_switched(master, f"announced by sentinel {address}")
        finally:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def _check_master(self, target: SentinelEndpoint) -> None:
        """Follow the master the sentinels name now, if it is not the one we talk to."""
        assert self._sentinel is not None
        pool = cast(_SwitchAwarePool, self._pool)
        if pool.master_address is None:
            return  # not connected yet: the first connect asks the sentinels anyway
        with contextlib.suppress(*_UNAVAILABLE):
            async with asyncio.timeout(self._command_timeout):
                host, port = await self._sentinel.discover_master(target.service_name)
            master = (str(host), int(port))
            trusted = self._switch_state.trusted_master(time.monotonic())
            if master != pool.master_address and (trusted is None or trusted == master):
                await self._master_switched(master, "named by the sentinels")

    async def _master_switched(self, master: tuple[str, int], why: str) -> None:
        """Drop every connection to another node than ``master``, in use or not.

        Commands waiting on them get ``RedisUnavailable``; stale connections
        refuse to send anything from now on (see ``_SwitchAwareConnection``),
        so whatever the old master takes after this point was sent before it.
        """
        self._switch_state.announce(master, time.monotonic())
        _log.info("Redis master for %s is now %s:%s (%s)", self._target_label, *master, why)
        conn = self._pubsub_conn
        if conn is not None and _address(conn) != master:
            self._kill_pubsub_session(conn)
        for conn in cast(_SwitchAwarePool, self._pool).connections():
            if conn.is_connected and _address(conn) != master:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    # -- lifecycle

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _check_open(self) -> None:
        if self._closed:
            raise RedisUnavailable("Redis transport is closed")

    async def connect(self) -> None:
        """Verify that Redis answers (PING); raise ``RedisUnavailable`` if not."""
        await self.execute("PING")

    async def __aenter__(self) -> AsyncioRedisTransport:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection and end every background task."""
        self._closed = True
        queued, self._queue = self._queue, []
        for _, _, fut in queued:
            if not fut.done():
                fut.set_exception(RedisUnavailable("Redis transport is closed"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._pubsub_conn = None
        await self._pool.disconnect()
        await self._pubsub_pool.disconnect()
        if self._sentinel is not None:
            with contextlib.suppress(*_UNAVAILABLE):
                await self._sentinel.aclose()

    # -- commands

    async def _roundtrip(self, data: bytes, count: int) -> list[Any]:
        """Send ``count`` packed commands on one pooled connection, read ``count`` replies."""
        self._check_open()
        pool = self._pool
        try:
            async with asyncio.timeout(self._command_timeout), self._slots:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                try:
                    await conn.send_packed_command(data, check_health=False)
                    replies: list[Any] = []
                    for _ in range(count):
                        try:
                            reply = await conn.read_response()
                        except ResponseError as exc:
                            reply = _reply_error(exc)
                        else:
                            if type(reply) is list:
                                reply = _fix_nested_errors(reply)
                        replies.append(reply)
                    return replies
                finally:
                    await pool.release(conn)
        except _UNAVAILABLE as exc:
            if isinstance(exc, TimeoutError) and not isinstance(exc, RedisTimeoutError):
                raise RedisUnavailable(
                    f"Redis did not answer within {self._command_timeout}s"
                ) from exc
            raise _unavailable(exc, "Redis unavailable") from exc

    async def execute(self, *args: Arg) -> Any:
        """Run one raw command and return its raw reply."""
        self._check_open()
        data = _pack(args)
        if self._auto_pipeline:
            reply = (await self._batched(data, 1))[0]
        else:
            reply = (await self._roundtrip(data, 1))[0]
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def _batched(self, data: bytes, count: int) -> list[Any]:
        """Auto-pipelining: commands queue up while a batch is in flight, and
        one pump task sends them as the next batch once its replies are in.

        One batch in flight at a time lets batches grow with the load (about
        70 commands instead of 25 under 200 concurrent requests), so fewer
        round trips wake fewer tasks at more points in time: measured, 10%
        less CPU per request than a batch per loop iteration. A pipeline's
        commands stay contiguous in its batch.
        """
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((data, count, fut))
        if not self._pumping:
            self._pumping = True
            self._spawn(self._pump())
        return await fut

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                await asyncio.sleep(0)  # the callers of this loop iteration join
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                sent_at = loop.time()
                answered = await self._run_batch(batch)
                if not answered and loop.time() - sent_at >= self._command_timeout * 0.9:
                    # Redis did not answer for a whole timeout: what queued
                    # meanwhile has waited that long already; it fails now
                    # rather than wait a second timeout
                    queued, self._queue = self._queue, []
                    for _, _, fut in queued:
                        if not fut.done():
                            fut.set_exception(RedisUnavailable("Redis did not answer"))
        finally:
            self._pumping = False

    async def _run_batch(self, batch: list[_Joined]) -> bool:
        """Send ``batch`` in one round trip; False if Redis could not be reached."""
        try:
            if len(batch) == 1:
                replies = await self._roundtrip(batch[0][0], batch[0][1])
            else:
                replies = await self._roundtrip(
                    b"".join([d for d, _, _ in batch]), sum([n for _, n, _ in batch])
                )
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    if isinstance(exc, RedisUnavailable):
                        err: BaseException = RedisUnavailable(str(exc))
                        err.__cause__ = exc.__cause__
                    elif isinstance(exc, Exception):
                        err = exc
                    else:
                        err = RedisUnavailable("Redis transport is closed")
                    fut.set_exception(err)
            if not isinstance(exc, Exception):
                raise
            return not isinstance(exc, RedisUnavailable)
        start = 0
        for _, n, fut in batch:
            if not fut.done():
                fut.set_result(replies[start : start + n])
            start += n
        return True

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Run commands in one round trip (not a transaction), joining the
        commands other tasks issue meanwhile when auto-pipelining is on.

        Error replies come back as ``RedisReplyError`` instances in the list.
        """
        self._check_open()
        if not commands:
            await asyncio.sleep(0)
            return []
        data = b"".join([_pack(c) for c in commands])
        if self._auto_pipeline:
            return await self._batched(data, len(commands))
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
        self._check_open()
        ch = channel.encode()
        self._subs[ch] = callback
        confirmed = self._confirm[ch] = asyncio.Event()
        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                if self._pubsub_task is None:
                    self._pubsub_task = self._spawn(self._pubsub_loop())
                else:
                    # if this fails, the pub/sub loop reconnects and subscribes everything
                    with contextlib.suppress(*_UNAVAILABLE):
                        await self._pubsub_send(_pack(("SUBSCRIBE", ch)))
                await confirmed.wait()
        except TimeoutError:
            if self._confirm.get(ch) is confirmed:
                del self._confirm[ch]
            if self._subs.get(ch) is callback:
                del self._subs[ch]
            raise RedisUnavailable(f"could not subscribe to {channel!r}") from None

    async def unsubscribe(self, channel: str) -> None:
        """UNSUBSCRIBE ``channel``; never raises for an unreachable Redis
        (see :func:`mesh_core.redis.forget_channel`)."""
        command = forget_channel(channel, self._subs, self._confirm)
        if command is not None:
            with contextlib.suppress(*_UNAVAILABLE):
                async with asyncio.timeout(self._command_timeout):
                    await self._pubsub_send(command)

    async def _pubsub_send(self, data: bytes) -> None:
        """Write on the current pub/sub connection, if any; on failure, replace it."""
        async with self._pubsub_lock:
            conn = self._pubsub_conn
            if conn is None:
                return  # the pub/sub loop (re)subscribes everything once connected
            try:
                await conn.send_packed_command(data, check_health=False)
            except BaseException:
                # A failed or interrupted write leaves the connection unusable:
                # make the pub/sub loop reconnect and subscribe everything.
                self._kill_pubsub_session(conn)
                raise

    def _kill_pubsub_session(self, conn: AbstractConnection) -> None:
        if self._pubsub_conn is conn and self._pubsub_task is not None:
            self._pubsub_stale = True
            self._pubsub_task.cancel()

    async def _pubsub_loop(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        backoff = self._backoff_min
        while True:
            try:
                if await self._pubsub_connect_and_serve():
                    backoff = self._backoff_min
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self._backoff_max)
            except asyncio.CancelledError:
                if self._closed or not self._pubsub_stale:
                    raise
                me.uncancel()  # our own "replace this connection" signal
                _log.debug("pub/sub connection stale; reconnecting")
            except Exception:
                _log.exception("pub/sub loop error; reconnecting")
            self._pubsub_stale = False

    async def _pubsub_connect_and_serve(self) -> bool:
        """Connect, subscribe, deliver until the connection breaks; True if it got subscribed."""
        conn = self._pubsub_pool.make_connection()  # type: ignore[no-untyped-call]
        pinger: asyncio.Task[None] | None = None
        subscribed = False
        try:
            async with asyncio.timeout(self._connect_timeout):
                await conn.connect()
            async with self._pubsub_lock:
                self._pubsub_conn = conn
                if self._subs:
                    async with asyncio.timeout(self._command_timeout):
                        await conn.send_packed_command(
                            _pack(("SUBSCRIBE", *self._subs)), check_health=False
                        )
            if self._health_check_interval is not None:
                pinger = self._spawn(self._pubsub_pinger(conn))
            while True:
                msg = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                self._pubsub_rx += 1
                if on_pubsub_reply(msg, self._subs, self._confirm, _log):
                    subscribed = True
        except _UNAVAILABLE as exc:
            _log.debug("pub/sub connection lost or refused: %r", exc)
        finally:
            self._pubsub_conn = None
            if pinger is not None:
                pinger.cancel()
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
        return subscribed

    async def _pubsub_pinger(self, conn: AbstractConnection) -> None:
        assert self._health_check_interval is not None
        pinged_at = -1
        while self._pubsub_conn is conn:
            await asyncio.sleep(self._health_check_interval)
            if pinged_at == self._pubsub_rx:
                # nothing at all (not even the PONG) since the last PING
                self._kill_pubsub_session(conn)
                return
            pinged_at = self._pubsub_rx
            try:
                async with asyncio.timeout(self._command_timeout):
                    await self._pubsub_send(_PING)
            except Exception:
                return  # _pubsub_send already replaced the connection

"""One Redis connection: the multiplexed command state (no I/O), the
handshake, and what a runtime's socket shim supplies (:class:`Network`).

Any number of callers write commands on one connection and Redis answers in
order, so the replies are matched to callers by a FIFO of :class:`Waiter` s.
The runtime's socket shim feeds the bytes it reads into :meth:`Multiplexed.feed`
and calls :meth:`Multiplexed.check` now and then with the clock; this class
decides which caller a reply belongs to, when a caller has waited too long,
when the connection is stuck, and when a reply means the node was demoted
(``READONLY`` on a Sentinel-managed connection). Also here: the connection
handshake (``AUTH``/``SELECT``/``ROLE``) as commands and the checks of its
replies, a TLS context from the URL's options (configuration, no I/O), and
the few exchanges every connection kind shares, over a shim's :class:`Stream`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import hiredis

if TYPE_CHECKING:
    from ..runtime import TLSContext

from .._errors import RedisReplyError, RedisUnavailable
from ..runtime import Runtime
from ._resp import PING, Arg, pack
from ._url import RedisEndpoint, SentinelEndpoint

__all__ = [
    "Backoff",
    "Link",
    "Multiplexed",
    "Network",
    "ReconnectHook",
    "Stream",
    "Waiter",
    "addr_label",
    "check_replies",
    "exchange",
    "handshake",
    "is_master",
    "new_reader",
    "parse_master_address",
    "sentinel_auth",
    "serve_subscription",
    "ssl_context",
]


#: what a transport sends first on the connection that replaces lost ones,
#: before any caller's command (``RedisTransport.on_reconnect``)
ReconnectHook = Callable[[], Sequence[Sequence[Arg]]]


class Waiter(Protocol):
    """One ``execute()`` / ``pipeline()`` call waiting for ``expected`` replies.

    The shim implements it with its runtime's cheapest way to park a task
    (trio's low-level reschedule, an asyncio future): one ``Event`` per
    command was a visible share of a command's cost."""

    expected: int
    replies: list[Any]
    error: RedisUnavailable | None
    sent_at: float

    def set(self) -> None:
        """The replies are in (or ``error`` is set): wake the caller (idempotent)."""
        ...

    def wait(self) -> Awaitable[None]: ...


def new_reader() -> hiredis.Reader:
    return hiredis.Reader(replyError=RedisReplyError)


class Multiplexed:
    """The state of one multiplexed command connection.

    ``on_fail`` is the shim's hook to stop its reader/writer and close the
    socket once the connection failed (it is called once)."""

    __slots__ = (
        "address",
        "answered",
        "batch_end",
        "error",
        "label",
        "last_reply_at",
        "on_fail",
        "out",
        "pending",
        "reader",
        "sentinel_managed",
    )

    def __init__(
        self,
        label: str,
        reader: hiredis.Reader,
        now: float,
        *,
        address: tuple[str, int] | None = None,
    ) -> None:
        self.label = label
        self.reader = reader
        #: the node's address when a sentinel named it (None: not Sentinel-managed)
        self.address = address
        # A master that Sentinel demoted answers writes with READONLY; only then
        # is that reply a reason to drop the connection (and ask the sentinels).
        self.sentinel_managed = address is not None
        self.pending: deque[Waiter] = deque()
        #: how many callers got all their replies so far
        self.answered = 0
        #: ``answered`` once the replies to the last write are all in
        self.batch_end = 0
        #: commands queued for writing, in order
        self.out: list[bytes] = []
        self.error: RedisUnavailable | None = None
        self.last_reply_at = now
        self.on_fail: Callable[[], None] | None = None

    def queue(self, waiter: Waiter, now: float, data: bytes) -> bool:
        """Expect ``waiter``'s replies next and queue ``data``, its commands,
        for writing; False (and the waiter woken with the error) if the
        connection has failed."""
        if self.error is not None:
            waiter.error = self.error
            waiter.set()
            return False
        waiter.sent_at = now
        self.pending.append(waiter)
        self.out.append(data)
        return True

    def take_output(self) -> bytes:
        """Everything queued, for one write (automatic pipelining): the
        replies to it end the batch now in flight."""
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.batch_end = self.answered + len(self.pending)
        return data

    @property
    def batch_in_flight(self) -> bool:
        """Replies to the last write are still due. A shim that writes only
        then (asyncio's) lets batches grow with the load: fewer writes and
        reads serve more commands."""
        return self.answered < self.batch_end

    def feed(self, data: bytes | bytearray, now: float) -> None:
        """Bytes read from the socket: hand each complete reply to its caller."""
        if not data:
            self.fail(RedisUnavailable(f"Redis connection to {self.label} lost: closed by Redis"))
            return
        self.last_reply_at = now
        reader = self.reader
        reader.feed(data)  # type: ignore[arg-type]  # any buffer works
        gets = reader.gets
        pending = self.pending
        try:
            while (reply := gets()) is not False:
                if (
                    self.sentinel_managed
                    and type(reply) is RedisReplyError
                    and str(reply).startswith("READONLY")
                ):
                    self.fail(
                        RedisUnavailable(f"Redis at {self.label} is no longer the master: {reply}")
                    )
                    return
                if not pending:  # a reply nobody asked for: the stream is out of sync
                    self.fail(
                        RedisUnavailable(f"Redis connection to {self.label}: unexpected reply")
                    )
                    return
                w = pending[0]
                w.replies.append(reply)
                if len(w.replies) == w.expected:
                    pending.popleft()
                    self.answered += 1
                    w.set()  # (a timed-out caller is gone already)
        except hiredis.ProtocolError as exc:
            self.fail(RedisUnavailable(f"Redis connection to {self.label} lost: {exc!r}"))

    def check(self, now: float, timeout: float) -> None:
        """Time commands out without a timer per command (they cost more
        than the rest of a call): a caller whose reply is ``timeout`` late
        gets ``RedisUnavailable`` (its reply, if it comes, is dropped); a
        connection on which nothing at all came back for ``timeout`` while
        commands wait is stuck, and fails."""
        if not self.pending:
            return
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
        """The connection is unusable: every caller waiting on it gets ``error``."""
        if self.error is not None:
            return
        self.error = error
        self.out.clear()
        while self.pending:
            w = self.pending.popleft()
            w.error = error
            w.set()
        if self.on_fail is not None:
            self.on_fail()


# ------------------------------------------- what a runtime's shim supplies


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
        """``state.queue`` the command(s), and have ``state.take_output()``
        written, whole and in order."""
        ...

    async def run(self) -> None:
        """Read, write and check timeouts until ``state`` fails; then close."""
        ...


class Network(Protocol):
    """What a runtime supplies to :class:`~mesh_core.redis.RedisClient`."""

    async def open(
        self, host: str, port: int, *, unix_path: str | None = None, keepalive: bool = True
    ) -> Stream: ...

    async def start_tls(self, stream: Stream, context: TLSContext, hostname: str) -> Stream: ...

    def create_tls_context(self, *, cafile: str | None = None) -> TLSContext:
        """``ssl.create_default_context``: loading CA files is I/O, which the
        core leaves to the runtime's side."""
        ...

    def link(self, stream: Stream, state: Multiplexed, timeout: float) -> Link: ...

    def waiter(self, expected: int) -> Waiter: ...


def addr_label(address: tuple[str, int]) -> str:
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


async def serve_subscription(
    runtime: Runtime,
    stream: Stream,
    reader: hiredis.Reader,
    label: str,
    on_reply: Callable[[Any], None],
    *,
    interval: float | None,
    timeout: float,
) -> None:
    """Read a subscribed connection until it breaks (raises ``EOFError``,
    ``OSError`` or ``RedisUnavailable``); after ``interval`` seconds of
    silence, a PING must be answered within ``timeout``."""
    pinged = False
    while True:
        wait = timeout if pinged else interval
        try:
            if wait is None:
                data = await stream.receive_some()
            else:
                async with runtime.timeout(wait):
                    data = await stream.receive_some()
        except TimeoutError:  # nothing for a while: PING, then expect something
            if pinged:
                raise RedisUnavailable(f"{label} stopped answering") from None
            async with runtime.timeout(timeout):
                await stream.send_all(PING)
            pinged = True
            continue
        if not data:
            raise EOFError(f"connection closed by {label}")
        pinged = False
        reader.feed(data)  # type: ignore[arg-type]  # any buffer works
        while (msg := reader.gets()) is not False:
            on_reply(msg)


class Backoff:
    """Exponential backoff with jitter between reconnects: ``low`` after a
    success, doubling up to ``high``."""

    def __init__(self, runtime: Runtime, low: float, high: float) -> None:
        self.runtime = runtime
        self.low, self.high = low, high
        self.current = low

    def reset(self) -> None:
        self.current = self.low

    async def sleep(self) -> None:
        await self.runtime.sleep(self.current * (0.5 + random.random()))
        self.current = min(self.current * 2, self.high)


# -------------------------------------------------------------- the handshake


def handshake(ep: RedisEndpoint, *, expect_master: bool = False) -> list[tuple[Arg, ...]]:
    """The commands a new connection to ``ep`` sends before anything else.

    With ``expect_master`` (a node a sentinel named) it also asks ``ROLE``: a
    sentinel's answer may be stale (a failover in progress), and only the
    node itself can say it accepts writes."""
    commands: list[tuple[Arg, ...]] = []
    if ep.password is not None:
        if ep.username:
            commands.append(("AUTH", ep.username, ep.password))
        else:
            commands.append(("AUTH", ep.password))
    if ep.db:
        commands.append(("SELECT", ep.db))
    if expect_master:
        commands.append(("ROLE",))
    return commands


def sentinel_auth(target: SentinelEndpoint) -> list[tuple[Arg, ...]]:
    if target.sentinel_password is None:
        return []
    if target.sentinel_username:
        return [("AUTH", target.sentinel_username, target.sentinel_password)]
    return [("AUTH", target.sentinel_password)]


def check_replies(what: str, commands: Sequence[Sequence[Arg]], replies: Sequence[Any]) -> None:
    """Raise ``RedisUnavailable`` if a set-up command got an error reply."""
    for cmd, reply in zip(commands, replies, strict=True):
        if isinstance(reply, RedisReplyError):
            raise RedisUnavailable(f"{what} refused {cmd[0]!r}: {reply}")


def is_master(label: str, role: Any) -> None:
    """Raise ``RedisUnavailable`` unless ``role`` (a ``ROLE`` reply) says master."""
    if not (isinstance(role, list) and role and role[0] == b"master"):
        what = role[0] if isinstance(role, list) and role else role
        raise RedisUnavailable(f"Redis at {label} is not a master (ROLE {what!r})")


def parse_master_address(label: str, reply: Any) -> tuple[str, int] | None:
    """The reply to ``SENTINEL get-master-addr-by-name`` (None: unknown service)."""
    if reply is None:
        return None
    try:
        host, port = reply
        return host.decode(), int(port)
    except (TypeError, ValueError, AttributeError):
        raise RedisUnavailable(f"sentinel {label} sent a malformed address {reply!r}") from None


def ssl_context(ep: RedisEndpoint, net: Network) -> TLSContext:
    """The TLS settings of a ``rediss://`` URL (``ssl_cert_reqs``, ``ssl_ca_certs``)."""
    ctx = net.create_tls_context(cafile=ep.ssl_ca_certs)
    if ep.ssl_cert_reqs in ("none", "optional"):
        ctx.check_hostname = False
        # ssl.CERT_NONE / ssl.CERT_OPTIONAL, reached through the context's own
        # enum so the core need not import ssl
        ctx.verify_mode = type(ctx.verify_mode)(0 if ep.ssl_cert_reqs == "none" else 1)
    return ctx

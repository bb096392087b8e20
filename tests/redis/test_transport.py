"""The Redis I/O layer of both runtimes, against real redis-server processes.

One test body, two runtimes: ``anyio_backend`` picks asyncio (and
``AsyncioRedisTransport``) or trio (and ``TrioRedisTransport``). Every test
gets its own redis-server on a free port (tests/helpers/redis_server.py); the tests
are skipped when the redis-server binary is missing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import sniffio
import trio

from mesh_asyncio._redis_transport import AsyncioRedisTransport
from mesh_asyncio._redis_transport import _Link as _asyncio_link
from mesh_core._errors import RedisReplyError, RedisUnavailable
from mesh_trio._redis_transport import TrioRedisTransport
from tests.helpers.redis_server import RedisServer, free_port

pytestmark = pytest.mark.anyio

Arg = bytes | str | int | float

if TYPE_CHECKING:
    from mesh_core.redis import RedisTransport

    # the assignments make mypy check that both transports implement it
    _a: RedisTransport = AsyncioRedisTransport("redis://127.0.0.1:1")
    _t: RedisTransport = TrioRedisTransport("redis://127.0.0.1:1")


@pytest.fixture
def transport_cls(anyio_backend: str) -> Any:
    return TrioRedisTransport if anyio_backend == "trio" else AsyncioRedisTransport


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


FAST = {"command_timeout": 1.0, "connect_timeout": 1.0, "reconnect_backoff": (0.02, 0.2)}


def living_tasks() -> int:
    if sniffio.current_async_library() == "trio":
        return trio.lowlevel.current_statistics().tasks_living
    return len(asyncio.all_tasks())


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.01)


# ---------------------------------------------------------------- commands


async def test_basic_commands_raw_replies(transport_cls: Any, redis_server: RedisServer) -> None:
    async with transport_cls(redis_server.url) as r:
        assert await r.execute("PING") == b"PONG"
        assert await r.execute("SET", "k", "v") == b"OK"
        assert await r.execute("GET", "k") == b"v"
        assert await r.execute("GET", "missing") is None
        assert await r.execute("SET", "n", 41) == b"OK"
        assert await r.execute("INCR", "n") == 42
        assert await r.execute("SET", "f", 1.5) == b"OK"
        assert await r.execute("GET", "f") == b"1.5"
        assert await r.execute("SET", b"bin\x00\xff", b"\x00\x01\xfe") == b"OK"
        assert await r.execute("GET", b"bin\x00\xff") == b"\x00\x01\xfe"
        assert await r.execute("SET", "nx", "1", "NX", "EX", 10) == b"OK"
        assert await r.execute("SET", "nx", "2", "NX", "EX", 10) is None
        # hash: raw flat list, no dict conversion
        assert await r.execute("HSET", "mesh:roommeta:lobby", "data", '{"a":[]}', "x", "é") == 2
        assert await r.execute("HGET", "mesh:roommeta:lobby", "data") == b'{"a":[]}'
        flat = await r.execute("HGETALL", "mesh:roommeta:lobby")
        assert isinstance(flat, list)
        assert dict(zip(flat[::2], flat[1::2], strict=True)) == {
            b"data": b'{"a":[]}',
            b"x": "é".encode(),
        }
        # set: raw list, no set conversion
        assert await r.execute("SADD", "mesh:room:lobby", "c1", "c2", "c3") == 3
        members = await r.execute("SMEMBERS", "mesh:room:lobby")
        assert isinstance(members, list)
        assert sorted(members) == [b"c1", b"c2", b"c3"]
        assert await r.execute("SISMEMBER", "mesh:room:lobby", "c2") == 1
        # SCAN: [cursor bytes, [keys]]
        for i in range(30):
            await r.execute("SET", f"mesh:room:r{i}", "x")
        seen: set[bytes] = set()
        cursor = b"0"
        while True:
            cursor, keys = await r.execute("SCAN", cursor, "MATCH", "mesh:room:r*", "COUNT", 7)
            seen.update(keys)
            if cursor == b"0":
                break
        assert seen == {f"mesh:room:r{i}".encode() for i in range(30)}
        # EVAL: Lua tables come back as lists, numbers as ints
        script = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1, redis.call('GET', KEYS[1])}"
        assert await r.execute("EVAL", script, 1, "k", "a", 2) == [b"k", b"a", 3, b"v"]
        assert await r.execute("DEL", "k", "n", "missing") == 2


async def test_error_replies(transport_cls: Any, redis_server: RedisServer) -> None:
    async with transport_cls(redis_server.url) as r:
        await r.execute("SET", "s", "x")
        with pytest.raises(RedisReplyError) as info:
            await r.execute("HGET", "s", "f")
        assert info.value.prefix == "WRONGTYPE"
        assert str(info.value).startswith("WRONGTYPE Operation against a key")
        with pytest.raises(RedisReplyError) as info:
            await r.execute("EVALSHA", "0" * 40, 0)
        assert info.value.prefix == "NOSCRIPT"
        with pytest.raises(RedisReplyError) as info:
            await r.execute("NOSUCHCOMMAND", "x")
        assert info.value.message.startswith("ERR unknown command")
        with pytest.raises(RedisReplyError) as info:
            await r.execute("EVAL", "return redis.error_reply('MYCODE custom')", 0)
        assert info.value.message == "MYCODE custom"
        with pytest.raises(TypeError):
            await r.execute("SET", "k", None)
        # the connection is still in sync after all of that
        assert await r.execute("GET", "s") == b"x"


async def test_concurrent_commands_and_pipelines_each_get_their_replies(
    transport_cls: Any, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commands and pipelines issued at once share round trips (auto-pipelining)
    but every caller gets exactly its own replies, errors included."""
    async with transport_cls(redis_server.url) as r:
        results: dict[int, Any] = {}
        roundtrips = 0
        if transport_cls is AsyncioRedisTransport:
            # a round trip is one write of a batch on the command connection
            real = _asyncio_link._flush

            def counting(link: Any) -> None:
                nonlocal roundtrips
                roundtrips += bool(link.state.out)
                real(link)

            monkeypatch.setattr(_asyncio_link, "_flush", counting)

        async def one(i: int) -> None:
            if i % 3 == 0:
                results[i] = await r.execute("INCRBY", f"n{i}", i)
            elif i % 3 == 1:
                results[i] = await r.pipeline(
                    [("SET", f"k{i}", str(i)), ("HGET", f"k{i}", "f"), ("GET", f"k{i}")]
                )
            else:
                results[i] = await r.pipeline([("MULTI",), ("INCR", f"c{i}"), ("EXEC",)])

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(one, i)
        for i in range(60):
            if i % 3 == 0:
                assert results[i] == i
            elif i % 3 == 1:
                ok, error, value = results[i]
                assert ok == b"OK" and value == str(i).encode()
                assert isinstance(error, RedisReplyError) and error.prefix == "WRONGTYPE"
            else:
                assert results[i] == [b"OK", b"QUEUED", [1]]
        if transport_cls is AsyncioRedisTransport:
            assert roundtrips < 10  # 60 callers, a few batches


async def test_pipeline(transport_cls: Any, redis_server: RedisServer) -> None:
    async with transport_cls(redis_server.url) as r:
        results = await r.pipeline(
            [
                ("SET", "a", "1"),
                ("INCR", "a"),
                ("HGET", "a", "f"),  # WRONGTYPE, in the middle
                ("SADD", "s", "x", "y"),
                ("GET", "nothing"),
                ("EVALSHA", "0" * 40, 0),
                ("GET", "a"),
            ]
        )
        assert results[:2] == [b"OK", 2]
        assert isinstance(results[2], RedisReplyError)
        assert results[2].prefix == "WRONGTYPE"
        assert results[3:5] == [2, None]
        assert isinstance(results[5], RedisReplyError)
        assert results[5].prefix == "NOSCRIPT"
        assert results[6] == b"2"
        assert await r.pipeline([]) == []
        # MULTI/EXEC inside one pipeline is written contiguously: atomic
        tx = await r.pipeline([("MULTI",), ("INCR", "a"), ("SADD", "s", "z"), ("EXEC",)])
        assert tx == [b"OK", b"QUEUED", b"QUEUED", [3, 1]]
        # an error inside EXEC's reply is a RedisReplyError in both runtimes
        tx = await r.pipeline([("MULTI",), ("SET", "t", "x"), ("INCR", "t"), ("EXEC",)])
        assert tx[:3] == [b"OK", b"QUEUED", b"QUEUED"]
        assert tx[3][0] == b"OK"
        assert isinstance(tx[3][1], RedisReplyError)
        assert tx[3][1].message == "ERR value is not an integer or out of range"


async def test_concurrent_executes(transport_cls: Any, redis_server: RedisServer) -> None:
    async with transport_cls(redis_server.url) as r:
        await r.pipeline([("SET", f"k{i}", f"v{i}") for i in range(200)])
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            if i % 10 == 0:
                try:
                    await r.execute("HGET", f"k{i}", "f")
                except RedisReplyError as exc:
                    results[i] = exc.prefix
            elif i % 2:
                results[i] = await r.execute("GET", f"k{i}")
            else:
                results[i] = await r.execute("INCR", f"c{i}")

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        for i in range(200):
            if i % 10 == 0:
                assert results[i] == "WRONGTYPE"
            elif i % 2:
                assert results[i] == f"v{i}".encode()
            else:
                assert results[i] == 1


async def test_url_forms(transport_cls: Any) -> None:
    with RedisServer(password="s3cr:t/pw", unix_socket=True) as server:
        # password with reserved characters, percent-encoded in the URL
        url = f"redis://:{'s3cr%3At%2Fpw'}@127.0.0.1:{server.port}/2"
        async with transport_cls(url) as r2:
            await r2.execute("SET", "where", "db2")
        async with transport_cls(
            f"unix://{server.socket_path}?db=2&password=s3cr%3At%2Fpw"
        ) as unix:
            assert await unix.execute("GET", "where") == b"db2"
        async with transport_cls(server.url_for_db(0).replace("s3cr:t/pw", "s3cr%3At%2Fpw")) as r0:
            assert await r0.execute("GET", "where") is None
        bad = transport_cls(f"redis://:wrong@127.0.0.1:{server.port}/0", **FAST)
        try:
            with pytest.raises(RedisUnavailable):
                await bad.connect()
        finally:
            await bad.aclose()


async def test_tls(transport_cls: Any) -> None:
    with RedisServer(tls=True) as server:
        assert server.url.startswith("rediss://")
        got: list[bytes] = []
        async with transport_cls(server.url) as r:
            assert await r.execute("SET", "k", "tls") == b"OK"
            assert await r.pipeline([("GET", "k"), ("STRLEN", "k")]) == [b"tls", 3]
            await r.subscribe("ch", got.append)
            await r.execute("PUBLISH", "ch", "over tls")
            await wait_until(lambda: got == [b"over tls"])
        # certificate verification is on by default: an unknown CA is refused
        untrusted = transport_cls(f"rediss://127.0.0.1:{server.port}/0", **FAST)
        try:
            with pytest.raises(RedisUnavailable):
                await untrusted.connect()
        finally:
            await untrusted.aclose()
        insecure = f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=none"
        async with transport_cls(insecure) as r:
            assert await r.execute("GET", "k") == b"tls"


# ------------------------------------------------------------------ pub/sub


async def test_subscribe_and_publish(transport_cls: Any, redis_server: RedisServer) -> None:
    got: list[bytes] = []
    other: list[bytes] = []
    async with transport_cls(redis_server.url) as sub, transport_cls(redis_server.url) as pub:
        await sub.subscribe("mesh:pubsub:inst-1", got.append)
        await sub.subscribe("mesh:pubsub:inst-2", other.append)
        assert await pub.execute("PUBLISH", "mesh:pubsub:inst-1", b'{"x":1}') == 1
        assert await pub.execute("PUBLISH", "mesh:pubsub:inst-2", "two") == 1
        for i in range(50):
            await pub.execute("PUBLISH", "mesh:pubsub:inst-1", f"m{i}")
        await wait_until(lambda: len(got) == 51 and len(other) == 1)
        assert got == [b'{"x":1}'] + [f"m{i}".encode() for i in range(50)]
        assert other == [b"two"]
        # the subscribing transport still runs ordinary commands
        assert await sub.execute("PING") == b"PONG"


async def test_callback_exception_does_not_kill_subscription(
    transport_cls: Any, redis_server: RedisServer
) -> None:
    got: list[bytes] = []

    def callback(data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("boom")
        got.append(data)

    async with transport_cls(redis_server.url) as r:
        await r.subscribe("ch", callback)
        await r.execute("PUBLISH", "ch", "boom")
        await r.execute("PUBLISH", "ch", "ok")
        await wait_until(lambda: got == [b"ok"])


# ------------------------------------------------------------------ outages


async def test_unreachable_redis(transport_cls: Any) -> None:
    r = transport_cls(f"redis://127.0.0.1:{free_port()}/0", **FAST)
    try:
        start = time.monotonic()
        with pytest.raises(RedisUnavailable) as info:
            await r.connect()
        assert info.value.code == "EUNAVAILABLE"
        with pytest.raises(RedisUnavailable):
            await r.execute("GET", "x")
        with pytest.raises(RedisUnavailable):
            await r.pipeline([("GET", "x")])
        with pytest.raises(RedisUnavailable):
            await r.subscribe("ch", lambda data: None)
        assert time.monotonic() - start < 4.0
    finally:
        await r.aclose()


async def test_redis_hangs_command_times_out(transport_cls: Any, redis_server: RedisServer) -> None:
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    async with transport_cls(redis_server.url, command_timeout=0.5, connect_timeout=0.5) as r:
        await r.execute("SET", "k", "v")
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(2):
                start = time.monotonic()
                with pytest.raises(RedisUnavailable):
                    await r.execute("GET", "k")
                assert time.monotonic() - start < 1.2
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await r.execute("GET", "k") == b"v"


async def test_a_command_queued_behind_a_hung_one_waits_one_timeout_not_two(
    transport_cls: Any, redis_server: RedisServer
) -> None:
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    async with transport_cls(redis_server.url, command_timeout=1.0, connect_timeout=1.0) as r:
        await r.execute("SET", "k", "v")
        os.kill(pid, signal.SIGSTOP)
        elapsed: dict[str, float] = {}

        async def timed(name: str, delay: float) -> None:
            await anyio.sleep(delay)
            start = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await r.execute("GET", "k")
            elapsed[name] = time.monotonic() - start

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(timed, "first", 0.0)
                tg.start_soon(timed, "behind", 0.3)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert elapsed["first"] < 1.6
        assert elapsed["behind"] < 1.3  # not its own timeout after the first one's
        assert await r.execute("GET", "k") == b"v"


async def test_outage_and_recovery(transport_cls: Any, redis_server: RedisServer) -> None:
    got: list[bytes] = []
    async with (
        transport_cls(redis_server.url, **FAST) as sub,
        transport_cls(redis_server.url, **FAST) as r,
    ):
        await sub.subscribe("mesh:pubsub:me", got.append)
        await r.execute("PUBLISH", "mesh:pubsub:me", "before")
        await wait_until(lambda: got == [b"before"])

        redis_server.stop()
        for cmd in [("GET", "k"), ("SET", "k", "v")]:
            start = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await r.execute(*cmd)
            assert time.monotonic() - start < 1.5
        with pytest.raises(RedisUnavailable):
            await r.pipeline([("GET", "k"), ("GET", "j")])

        # an abrupt crash this time (SIGKILL), on the same port
        redis_server.start()
        assert await r.execute("SET", "k", "after") == b"OK"
        assert await r.pipeline([("GET", "k")]) == [b"after"]

        # the subscription comes back by itself (re-subscribed after reconnecting)
        async def publish_until_delivered() -> None:
            while b"after" not in got:
                await r.execute("PUBLISH", "mesh:pubsub:me", "after")
                await anyio.sleep(0.02)

        with anyio.fail_after(5):
            await publish_until_delivered()

        redis_server.stop(kill=True)
        with pytest.raises(RedisUnavailable):
            await r.execute("GET", "k")
        redis_server.start()
        assert await r.execute("GET", "k") is None  # a fresh, empty server
        got.clear()
        with anyio.fail_after(5):
            while b"again" not in got:
                await r.execute("PUBLISH", "mesh:pubsub:me", "again")
                await anyio.sleep(0.02)


async def test_a_reconnect_replays_the_hook_before_any_waiting_command(
    transport_cls: Any, redis_server: RedisServer
) -> None:
    """After Redis restarted empty, the hook's commands run on the new
    connection before anything else: commands that were waiting for it,
    however many and from however many tasks, all see what it wrote. The
    first connection and the steady state never call it."""
    calls: list[int] = []

    def hook() -> list[tuple[Arg, ...]]:
        calls.append(1)
        return [("SET", "owner", "me"), ("SADD", "members", "a", "b")]

    async with transport_cls(redis_server.url, **FAST) as r:
        r.on_reconnect(hook)
        await r.pipeline([("PING",)] * 50)
        assert calls == []
        redis_server.stop(kill=True)
        with pytest.raises(RedisUnavailable):
            await r.execute("GET", "owner")
        redis_server.start()  # empty, same port
        seen: list[Any] = []

        async def read() -> None:
            seen.append(await r.pipeline([("GET", "owner"), ("SCARD", "members")]))

        async with anyio.create_task_group() as tg:
            for _ in range(300):
                tg.start_soon(read)
        assert seen == [[b"me", 2]] * 300
        assert len(calls) == 1
        for _ in range(20):
            await r.execute("PING")
        assert len(calls) == 1


async def test_concurrent_executes_during_outage(
    transport_cls: Any, redis_server: RedisServer
) -> None:
    async with transport_cls(redis_server.url, **FAST) as r:
        redis_server.stop()
        outcomes: list[str] = []

        async def one(i: int) -> None:
            try:
                await r.execute("GET", f"k{i}")
                outcomes.append("ok")
            except RedisUnavailable:
                outcomes.append("unavailable")

        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert outcomes == ["unavailable"] * 200
        assert time.monotonic() - start < 2.0
        redis_server.start()
        assert await r.execute("PING") == b"PONG"


# ---------------------------------------------------------------- lifecycle


async def test_aclose_leaves_no_tasks(transport_cls: Any, redis_server: RedisServer) -> None:
    before = living_tasks()
    r = transport_cls(redis_server.url)
    await r.connect()
    await r.subscribe("ch", lambda data: None)
    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(r.execute, "SET", f"k{i}", i)
    assert living_tasks() > before or transport_cls is AsyncioRedisTransport
    await r.aclose()
    assert living_tasks() == before
    with pytest.raises(RedisUnavailable):
        await r.execute("PING")
    await r.aclose()  # idempotent


async def test_aclose_fails_pending_commands(transport_cls: Any, redis_server: RedisServer) -> None:
    assert redis_server.proc is not None
    r = transport_cls(redis_server.url, command_timeout=5.0)
    await r.connect()
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    outcome: list[BaseException] = []

    async def blocked() -> None:
        try:
            await r.execute("GET", "k")
        except RedisUnavailable as exc:
            outcome.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked)
            await anyio.sleep(0.1)
            start = time.monotonic()
            await r.aclose()
        assert time.monotonic() - start < 1.0
        assert len(outcome) == 1
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)

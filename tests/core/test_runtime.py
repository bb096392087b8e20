"""The two Runtime implementations behave alike where the core relies on it."""

from __future__ import annotations

from typing import Any

import pytest

from mesh_core.runtime import Runtime

pytestmark = pytest.mark.anyio


def _runtime(backend: str) -> Runtime:
    if backend == "trio":
        from mesh_trio._runtime import RUNTIME as trio_runtime

        return trio_runtime
    from mesh_asyncio._runtime import RUNTIME as asyncio_runtime

    return asyncio_runtime


async def test_cancel_from_inside_the_block_ends_it_quietly(anyio_backend: str) -> None:
    rt = _runtime(anyio_backend)
    hits: list[str] = []

    async def child() -> None:
        try:
            await rt.sleep(10)
        finally:
            hits.append("child ended")

    async with rt.open_task_group() as group:
        group.start_soon(child)
        await rt.sleep(0.01)
        assert len(group) == 1
        group.cancel()
        hits.append("body")
    hits.append("after")
    # the task is not left cancelling: it can still wait
    await rt.sleep(0.01)
    assert hits == ["body", "child ended", "after"]


async def test_the_block_waits_for_its_tasks(anyio_backend: str) -> None:
    rt = _runtime(anyio_backend)
    done: list[int] = []

    async def child(n: int) -> None:
        await rt.sleep(0.01 * n)
        done.append(n)

    async with rt.open_task_group() as group:
        for n in (2, 1):
            group.start_soon(child, n)
    assert done == [1, 2]


async def test_a_failing_task_cancels_the_rest_and_propagates(anyio_backend: str) -> None:
    rt = _runtime(anyio_backend)
    cancelled: list[bool] = []

    async def sleeper() -> None:
        try:
            await rt.sleep(10)
        finally:
            cancelled.append(True)

    async def boom() -> None:
        raise ValueError("boom")

    with pytest.raises(BaseExceptionGroup) as info:
        async with rt.open_task_group() as group:
            group.start_soon(sleeper)
            group.start_soon(boom)
            await rt.sleep(10)
    assert info.group_contains(ValueError)
    assert cancelled == [True]


async def test_timeout_raises_timeout_error(anyio_backend: str) -> None:
    rt = _runtime(anyio_backend)
    with pytest.raises(TimeoutError):
        async with rt.timeout(0.01):
            await rt.sleep(10)


async def test_gather_keeps_order_and_clocks_move(anyio_backend: str) -> None:
    rt = _runtime(anyio_backend)

    async def value(n: int, delay: float) -> int:
        await rt.sleep(delay)
        return n

    def thunk(n: int, delay: float) -> Any:
        return lambda: value(n, delay)

    start = rt.now()
    assert await rt.gather([thunk(1, 0.02), thunk(2, 0.0)]) == [1, 2]
    assert rt.now() >= start
    assert rt.wall_ms() > 1_600_000_000_000
    event = rt.event()
    assert not event.is_set()
    event.set()
    await event.wait()

"""Conformance suite of the ChunkStore port: every backend must pass it.

The clock is injected (``now``), so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from server.backends.memory import InMemoryChunkStore
from server.domain.chunks import CHUNK_LIMIT, ChunkDraft, ChunkKind, ChunkLimits
from server.domain.errors import NotFoundError, ResourceExhaustedError, StaleLeaseError
from server.domain.models import Payload, Task, TaskFailure, TaskState
from server.ports import ChunkStore, FailVerdict, TaskStore
from tests._services import redis_stores
from tests.conformance.conftest import live_agents, memory_stores

NS = "ns1"
T0 = 1_000.0
LIMITS = ChunkLimits(max_chunk_bytes=1024, max_chunks_per_task=5, retention=60.0)


@dataclass
class Stores:
    tasks: TaskStore
    chunks: ChunkStore


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    if request.param == "memory":
        tasks, agents = memory_stores()
        await live_agents(agents, "a1", "a2")
        yield Stores(tasks, InMemoryChunkStore(tasks=tasks))
        return
    async with redis_stores("chunks") as redis:
        await live_agents(redis.agents, "a1", "a2")
        yield Stores(redis.tasks, redis.chunks)


def text(s: str) -> ChunkDraft:
    return ChunkDraft(ChunkKind.TEXT, s)


async def running(stores: Stores, task_id: str = "t1", agent: str = "a1") -> int:
    """Create a task and lease it; returns the fencing token."""
    await stores.tasks.create_task(Task(id=task_id, capability="cap", namespace=NS,
                                        create_time=T0, update_time=T0))
    lease = await stores.tasks.lease_next(NS, ["cap"], agent, now=T0, default_timeout=30.0)
    assert lease is not None and lease.task.id == task_id
    return lease.fencing_token


async def test_chunks_are_numbered_from_one_in_order_with_the_attempt(stores: Stores) -> None:
    token = await running(stores)
    first = await stores.chunks.append_chunks("t1", token, [text("a"), text("b")], now=T0,
                                              limits=LIMITS)
    art = ChunkDraft(ChunkKind.ARTIFACT, data=Payload(b"\x00\x01", {"encoding": b"binary"}),
                     artifact="draft.md", last=True)
    prog = ChunkDraft(ChunkKind.PROGRESS, "half", progress=0.5)
    second = await stores.chunks.append_chunks("t1", token, [art, prog], now=T0 + 1,
                                               limits=LIMITS)
    assert [c.seq for c in first + second] == [1, 2, 3, 4]
    kept = await stores.chunks.chunks_after("t1", 0, 100, now=T0 + 2)
    assert kept == first + second  # exactly what was appended, nothing else
    assert [c.draft for c in kept] == [text("a"), text("b"), art, prog]
    assert {(c.attempt, c.fencing_token) for c in kept} == {(1, token)}
    assert kept[2].create_time == T0 + 1
    # resume from any cursor: nothing lost, nothing repeated
    assert [c.seq for c in await stores.chunks.chunks_after("t1", 2, 100, now=T0 + 2)] == [3, 4]
    assert [c.seq for c in await stores.chunks.chunks_after("t1", 1, 2, now=T0 + 2)] == [2, 3]
    assert await stores.chunks.chunks_after("t1", 4, 100, now=T0 + 2) == []
    assert await stores.chunks.chunks_after("other", 0, 100, now=T0 + 2) == []


async def test_a_stale_or_ended_lease_is_refused_and_writes_nothing(stores: Stores) -> None:
    token = await running(stores)
    with pytest.raises(StaleLeaseError):
        await stores.chunks.append_chunks("t1", token + 1, [text("x")], now=T0, limits=LIMITS)
    with pytest.raises(NotFoundError):
        await stores.chunks.append_chunks("nope", 1, [text("x")], now=T0, limits=LIMITS)
    # the lease ends (requeued); a new attempt gets a new token
    await stores.tasks.fail("t1", token, TaskFailure("AGENT_GONE"), verdict=FailVerdict.RETRY,
                            retry_at=T0, now=T0)
    with pytest.raises(StaleLeaseError):
        await stores.chunks.append_chunks("t1", token, [text("zombie")], now=T0, limits=LIMITS)
    lease = await stores.tasks.lease_next(NS, ["cap"], "a2", now=T0, default_timeout=30.0)
    assert lease is not None and lease.fencing_token > token
    added = await stores.chunks.append_chunks("t1", lease.fencing_token, [text("new")],
                                              now=T0, limits=LIMITS)
    assert [(c.seq, c.attempt) for c in added] == [(1, 2)]
    await stores.tasks.complete("t1", lease.fencing_token, Payload(b"done"), now=T0)
    with pytest.raises(StaleLeaseError):  # ended: the store refuses whatever the token
        await stores.chunks.append_chunks("t1", lease.fencing_token, [text("late")], now=T0,
                                          limits=LIMITS)
    kept = await stores.chunks.chunks_after("t1", 0, 100, now=T0)
    assert [c.draft.text for c in kept] == ["new"]
    assert (await stores.tasks.get_task("t1")).state is TaskState.SUCCEEDED  # type: ignore[union-attr]


async def test_the_count_bound_refuses_the_whole_append(stores: Stores) -> None:
    token = await running(stores)
    await stores.chunks.append_chunks("t1", token, [text(str(i)) for i in range(4)], now=T0,
                                      limits=LIMITS)
    with pytest.raises(ResourceExhaustedError) as err:
        await stores.chunks.append_chunks("t1", token, [text("4"), text("5")], now=T0,
                                          limits=LIMITS)
    assert err.value.reason == CHUNK_LIMIT
    assert len(await stores.chunks.chunks_after("t1", 0, 100, now=T0)) == 4  # nothing of it
    await stores.chunks.append_chunks("t1", token, [text("4")], now=T0, limits=LIMITS)
    with pytest.raises(ResourceExhaustedError):
        await stores.chunks.append_chunks("t1", token, [text("5")], now=T0, limits=LIMITS)
    assert [c.seq for c in await stores.chunks.chunks_after("t1", 0, 100, now=T0)] == [1, 2, 3,
                                                                                       4, 5]


async def test_retention_counts_from_the_last_append(stores: Stores) -> None:
    token = await running(stores)
    await stores.chunks.append_chunks("t1", token, [text("a")], now=T0, limits=LIMITS)
    await stores.chunks.append_chunks("t1", token, [text("b")], now=T0 + 50, limits=LIMITS)
    assert len(await stores.chunks.chunks_after("t1", 0, 10, now=T0 + 100)) == 2  # 50 + 60 > 100
    assert await stores.chunks.chunks_after("t1", 0, 10, now=T0 + 111) == []
    # an expired log starts again from 1 (nothing of it is returned any more)
    added = await stores.chunks.append_chunks("t1", token, [text("c")], now=T0 + 112,
                                              limits=LIMITS)
    assert [c.seq for c in added] == [1]


async def test_concurrent_appends_never_share_or_skip_a_number(stores: Stores) -> None:
    token = await running(stores)
    limits = ChunkLimits(max_chunks_per_task=1000, retention=60.0)
    await asyncio.gather(*(stores.chunks.append_chunks("t1", token, [text(f"{i}a"),
                                                                     text(f"{i}b")],
                                                       now=T0, limits=limits)
                           for i in range(20)))
    kept = await stores.chunks.chunks_after("t1", 0, 1000, now=T0)
    assert [c.seq for c in kept] == list(range(1, 41))
    for i in range(20):  # each append's chunks are contiguous
        a = next(c.seq for c in kept if c.draft.text == f"{i}a")
        assert kept[a].draft.text == f"{i}b"

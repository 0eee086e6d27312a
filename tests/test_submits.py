"""Group commit of single submits (server/services/submits.py), against the memory store."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from server.backends.memory import InMemoryAgentRegistry, InMemoryTaskStore
from server.domain.errors import AlreadyExistsError, ResourceExhaustedError
from server.domain.models import Task, TaskState
from server.ports import Transition
from server.services.submits import SubmitBatcher


class _Counting(InMemoryTaskStore):
    """Counts store calls; each create_tasks call yields first, as a network call would."""

    def __init__(self) -> None:
        super().__init__(agents=InMemoryAgentRegistry())
        self.batches: list[int] = []
        self.singles = 0

    async def create_tasks(self, items: Sequence[tuple[Task, str]], *, max_queued: int = 0,
                           ) -> tuple[list[tuple[Task, bool, Transition]], bool]:
        self.batches.append(len(items))
        await asyncio.sleep(0.001)
        return await super().create_tasks(items, max_queued=max_queued)

    async def create_task(self, task: Task, *, request_id: str = "", max_queued: int = 0
                          ) -> tuple[Task, bool, Transition]:
        self.singles += 1
        return await super().create_task(task, request_id=request_id, max_queued=max_queued)


def _task(i: int | str, ns: str = "default") -> Task:
    return Task(id=f"t{i}", capability="c", namespace=ns, state=TaskState.QUEUED)


async def test_concurrent_submits_share_store_calls_and_each_gets_its_own_task() -> None:
    store = _Counting()
    batcher = SubmitBatcher(store)
    results = await asyncio.gather(*(
        batcher.create(_task(i), request_id=f"r{i}", client_id=False, max_queued=0)
        for i in range(100)))
    assert [t.id for t, created, _ in results] == [f"t{i}" for i in range(100)]
    assert all(created for _, created, _ in results)
    assert sum(store.batches) == 100 and len(store.batches) < 10, store.batches
    stored = [await store.get_task(f"t{i}") for i in range(100)]
    assert all(t is not None and t.state is TaskState.QUEUED for t in stored)
    assert [t.seq for t in stored if t is not None] == sorted(
        t.seq for t in stored if t is not None), "queued in arrival order"


async def test_a_replayed_request_id_in_the_same_batch_returns_the_first_task() -> None:
    store = _Counting()
    batcher = SubmitBatcher(store)
    a, b = await asyncio.gather(
        batcher.create(_task("a"), request_id="same", client_id=False, max_queued=0),
        batcher.create(_task("b"), request_id="same", client_id=False, max_queued=0))
    assert a[0].id == b[0].id == "ta" and a[1] and not b[1]
    assert await store.get_task("tb") is None


async def test_a_full_queue_refuses_only_the_submits_past_the_bound() -> None:
    store = _Counting()
    batcher = SubmitBatcher(store)
    out = await asyncio.gather(*(
        batcher.create(_task(i), request_id="", client_id=False, max_queued=5)
        for i in range(8)), return_exceptions=True)
    ok = [r for r in out if not isinstance(r, BaseException)]
    refused = [r for r in out if isinstance(r, ResourceExhaustedError)]
    assert len(ok) == 5 and len(refused) == 3, out
    assert all(e.reason == "QUEUE_FULL" for e in refused)


async def test_a_taken_client_id_is_refused_alone() -> None:
    store = _Counting()
    batcher = SubmitBatcher(store)
    await batcher.create(_task("x"), request_id="", client_id=True, max_queued=0)
    out = await asyncio.gather(
        batcher.create(_task("x"), request_id="", client_id=True, max_queued=0),
        *(batcher.create(_task(i), request_id="", client_id=False, max_queued=0)
          for i in range(5)), return_exceptions=True)
    assert isinstance(out[0], AlreadyExistsError)
    assert all(not isinstance(r, BaseException) and r[1] for r in out[1:])
    assert store.singles == 2, "client-chosen ids go alone"


async def test_a_refused_batch_is_retried_item_by_item() -> None:
    """Should a batch of server ids collide anyway, each caller gets its own answer."""
    store = _Counting()
    batcher = SubmitBatcher(store)
    await store.create_task(_task("dup"))
    out = await asyncio.gather(
        batcher.create(_task(1), request_id="", client_id=False, max_queued=0),
        batcher.create(_task("dup"), request_id="", client_id=False, max_queued=0),
        batcher.create(_task(2), request_id="", client_id=False, max_queued=0),
        return_exceptions=True)
    assert isinstance(out[1], AlreadyExistsError)
    assert not isinstance(out[0], BaseException) and not isinstance(out[2], BaseException)
    assert await store.get_task("t1") is not None and await store.get_task("t2") is not None


async def test_namespaces_are_batched_apart() -> None:
    store = _Counting()
    batcher = SubmitBatcher(store)
    out = await asyncio.gather(*(
        batcher.create(_task(i, ns="a" if i % 2 else "b"), request_id="", client_id=False,
                       max_queued=2) for i in range(8)), return_exceptions=True)
    ok = [r for r in out if not isinstance(r, BaseException)]
    assert sorted(t.namespace for t, _, _ in ok) == ["a", "a", "b", "b"], "a bound per namespace"


async def test_a_cancelled_waiter_creates_nothing_and_a_store_error_reaches_all() -> None:
    store = _Counting()
    batcher = SubmitBatcher(store)
    first = asyncio.ensure_future(
        batcher.create(_task(1), request_id="", client_id=False, max_queued=0))
    await asyncio.sleep(0)  # the first batch (t1) is in flight
    gone = asyncio.ensure_future(
        batcher.create(_task(2), request_id="", client_id=False, max_queued=0))
    await asyncio.sleep(0)
    gone.cancel()
    await first
    with pytest.raises(asyncio.CancelledError):
        await gone
    await asyncio.sleep(0.01)
    assert await store.get_task("t2") is None

    class _Down(_Counting):
        async def create_tasks(self, items: Sequence[tuple[Task, str]], *,
                               max_queued: int = 0,
                               ) -> tuple[list[tuple[Task, bool, Transition]], bool]:
            await asyncio.sleep(0.001)
            raise ConnectionError("store down")

    down = SubmitBatcher(_Down())
    out = await asyncio.gather(*(
        down.create(_task(i), request_id="", client_id=False, max_queued=0)
        for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in out)

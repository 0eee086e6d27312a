"""Conformance suite of the TaskStore port: every backend must pass it.

The clock is injected (``now``), so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest

from server.backends.redis import RedisStores
from server.domain.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    StaleLeaseError,
)
from server.domain.limits import DispatchLimits, LeaseScope
from server.domain.models import (
    TASK_TRANSITIONS,
    AgentState,
    Payload,
    RetryPolicy,
    Task,
    TaskChange,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowState,
    WorkflowStep,
)
from server.ports import AgentRegistry, FailVerdict, TaskFilter, TaskStore, Transition
from tests._services import redis_stores, require_redis, unique_prefix
from tests.conformance.conftest import live_agents, memory_stores
from tests.conftest import redis_url_of

NS = "ns1"
T0 = 1_000.0


class TransitionChecked:
    """A TaskStore whose every reported task change is checked against the
    domain's state machine (``TASK_TRANSITIONS``), whatever the operation."""

    def __init__(self, inner: TaskStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def checked(*args: Any, **kwargs: Any) -> Any:
            result = await attr(*args, **kwargs)
            for change in _changes(result):
                allowed = TASK_TRANSITIONS.get(change.previous_state, frozenset())
                if change.task.state is not change.previous_state:
                    assert change.task.state in allowed, (
                        f"{name}: {change.previous_state} -> {change.task.state} "
                        f"is not in TASK_TRANSITIONS")
            return result

        return checked


def _changes(value: Any) -> Iterator[TaskChange]:
    if isinstance(value, TaskChange):
        yield value
    elif isinstance(value, Transition):
        yield from value.tasks
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _changes(item)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[TaskStore,
                                                                         AgentRegistry]]:
    """One TaskStore per backend (the Redis one under a unique key prefix) and the
    AgentRegistry it leases against, with every change the store reports checked
    against the domain's state machine."""
    if request.param == "memory":
        mem, registry = memory_stores()
        yield TransitionChecked(mem), registry
        await mem.aclose()
        return
    async with redis_stores("tasks", redis_url_of(request, request.param)) as stores:
        yield TransitionChecked(stores.tasks), stores.agents


@pytest.fixture
def store(backend: tuple[TaskStore, AgentRegistry]) -> TaskStore:
    """The backend's TaskStore."""
    return backend[0]


@pytest.fixture
def agents(backend: tuple[TaskStore, AgentRegistry]) -> AgentRegistry:
    """The AgentRegistry the backend's TaskStore reads liveness from when leasing
    (register agents with ``live_agents`` before leasing to them)."""
    return backend[1]


def mk(task_id: str, cap: str = "cap", *, priority: int = 0, ns: str = NS,
       **kw: object) -> Task:
    """A fresh task as the service would build it."""
    return Task(id=task_id, capability=cap, namespace=ns, priority=priority,
                input=Payload(b"in-" + task_id.encode(), {"encoding": b"raw"}),
                create_time=T0, update_time=T0, **kw)  # type: ignore[arg-type]


def workflow(wf_id: str, steps: Sequence[WorkflowStep],
             ns: str = NS) -> tuple[Workflow, list[Task]]:
    """A workflow and its step tasks (task id = f"{wf_id}-{step}")."""
    step_tasks = {s.id: f"{wf_id}-{s.id}" for s in steps}
    wf = Workflow(id=wf_id, namespace=ns, display_name="wf", steps=tuple(steps),
                  step_tasks=step_tasks, create_time=T0, labels={"team": "x"})
    tasks = [Task(id=step_tasks[s.id], capability=s.capability, namespace=ns, input=s.input,
                  priority=s.priority, retry_policy=s.retry_policy, execution_timeout=s.timeout,
                  workflow_id=wf_id, step_id=s.id, depends_on=s.depends_on,
                  create_time=T0, update_time=T0)
             for s in steps]
    return wf, tasks


def diamond(wf_id: str = "wf1") -> tuple[Workflow, list[Task]]:
    """a -> (b, c) -> d."""
    return workflow(wf_id, [
        WorkflowStep("a", "cap"),
        WorkflowStep("b", "cap", depends_on=("a",)),
        WorkflowStep("c", "cap", depends_on=("a",)),
        WorkflowStep("d", "cap", depends_on=("b", "c")),
    ])


async def state_of(store: TaskStore, task_id: str) -> TaskState:
    task = await store.get_task(task_id)
    assert task is not None
    return task.state


async def run_ok(store: TaskStore, task_id: str, out: bytes, now: float = T0) -> None:
    """Lease the given task (it must be the best one) and complete it."""
    lease = await store.lease_next(NS, ["cap"], "agent", now=now, default_timeout=30)
    assert lease is not None and lease.task.id == task_id
    await store.complete(task_id, lease.fencing_token, Payload(out), now=now)


# -- create / read ----------------------------------------------------------------


async def test_create_and_get_roundtrip(store: TaskStore) -> None:
    task = mk("t1", labels={"k": "v"}, trace_context={"traceparent": "00-ab"},
              retry_policy=RetryPolicy(max_attempts=5, initial_backoff=0.5,
                                       non_retryable_error_types=("Bad",)),
              execution_timeout=12.5, fallback_capability="fb")
    created, fresh, tr = await store.create_task(task)
    assert fresh
    assert created.state is TaskState.QUEUED and created.seq > 0
    assert [c.task.id for c in tr.tasks] == ["t1"] and tr.tasks[0].previous_state is None
    assert [t.id for t in tr.queued] == ["t1"]
    got = await store.get_task("t1")
    assert got == created
    assert got is not None and got.input == Payload(b"in-t1", {"encoding": b"raw"})
    assert await store.get_task("missing") is None
    assert await store.get_workflow("missing") is None


async def test_get_tasks_reads_several_in_order(store: TaskStore) -> None:
    for task_id in ("g1", "g2", "g3"):
        await store.create_task(mk(task_id))
    got = await store.get_tasks(["g3", "missing", "g1", "g2"])
    assert [t.id if t else None for t in got] == ["g3", None, "g1", "g2"]
    assert got[0] == await store.get_task("g3")
    assert await store.get_tasks([]) == []


async def test_create_idempotent_with_request_id(store: TaskStore) -> None:
    first, fresh, _ = await store.create_task(mk("t1"), request_id="r1")
    assert fresh
    again, fresh2, tr = await store.create_task(mk("t2"), request_id="r1")
    assert not fresh2 and again == first and tr.tasks == ()
    assert await store.get_task("t2") is None
    # the same request id in another namespace is another request
    _, fresh3, _ = await store.create_task(mk("t3", ns="other"), request_id="r1")
    assert fresh3


async def test_create_refuses_an_existing_task_id(store: TaskStore) -> None:
    first, _, _ = await store.create_task(mk("t1"))
    for again in (replace(mk("t1"), input=Payload(b"other")), mk("t1", ns="other")):
        with pytest.raises(AlreadyExistsError) as err:
            await store.create_task(again)
        assert err.value.metadata["existing"] == "tasks/t1"
        assert "tasks/t1" in err.value.message
    assert await store.get_task("t1") == first, "the first task is never replaced"
    # a new request id does not make a taken id free either
    with pytest.raises(AlreadyExistsError):
        await store.create_task(mk("t1"), request_id="r-new")
    _, fresh, _ = await store.create_task(mk("t-other"), request_id="r-new")
    assert fresh, "the refused create did not record its request id"
    assert dict((await store.stats(NS)).tasks_by_state) == {TaskState.QUEUED: 2}
    assert dict((await store.stats("other")).tasks_by_state) == {}


async def test_request_id_wins_over_the_task_id(store: TaskStore) -> None:
    """A request id seen before replays its first answer, whatever the id asked now."""
    first, _, _ = await store.create_task(mk("t1"), request_id="r1")
    same, fresh, tr = await store.create_task(mk("t1"), request_id="r1")
    assert not fresh and same == first and tr.tasks == ()
    other, fresh, tr = await store.create_task(mk("t9"), request_id="r1")
    assert not fresh and other == first and tr.tasks == ()
    assert await store.get_task("t9") is None
    await store.create_task(mk("t2"))
    taken, fresh, _ = await store.create_task(mk("t2"), request_id="r1")
    assert not fresh and taken == first
    results, full = await store.create_tasks([(mk("t2"), "r1"), (mk("t3"), "")])
    assert not full and [(t.id, c) for t, c, _ in results] == [("t1", False), ("t3", True)]


async def test_create_tasks_refuses_the_whole_batch_on_a_taken_id(store: TaskStore) -> None:
    pre, _, _ = await store.create_task(mk("pre"), request_id="r-pre")
    before = await store.stats(NS)
    batches = [
        [(mk("b1"), "r1"), (mk("b2"), ""), (mk("pre"), ""), (mk("b3"), "r3")],  # stored id
        [(mk("b1"), ""), (mk("b2"), "r2"), (mk("b1"), "r9")],  # an id twice in the batch
        [(mk("b1"), "r1"), (mk("b2"), ""), (mk("pre"), "r-other")],  # new request id
    ]
    for items, name in zip(batches, ("tasks/pre", "tasks/b1", "tasks/pre"), strict=True):
        with pytest.raises(AlreadyExistsError) as err:
            await store.create_tasks(items, max_queued=100)
        assert err.value.metadata["existing"] == name
        assert await store.get_tasks(["b1", "b2", "b3"]) == [None, None, None]
        assert await store.stats(NS) == before
    # Refused before anything is written, even past the point where the bound cuts it.
    with pytest.raises(AlreadyExistsError):
        await store.create_tasks([(mk("c1"), ""), (mk("c2"), ""), (mk("pre"), "")],
                                 max_queued=2)
    assert await store.get_task("c1") is None
    # Nothing of the refused batches was recorded: their request ids are still free.
    results, full = await store.create_tasks([(mk("n1"), "r1"), (mk("n2"), "r2")])
    assert not full and [(t.id, c) for t, c, _ in results] == [("n1", True), ("n2", True)]
    assert await store.get_task("pre") == pre


async def test_create_tasks_replays_within_a_batch(store: TaskStore) -> None:
    """An item repeating an earlier item's request id is a replay of it, not a new id."""
    results, full = await store.create_tasks(
        [(mk("x1"), "rx"), (mk("x1"), "rx"), (mk("x2"), "rx"), (mk("x3"), "")])
    assert not full
    assert [(t.id, c) for t, c, _ in results] == [
        ("x1", True), ("x1", False), ("x1", False), ("x3", True)]
    assert results[1][0] == results[0][0] == await store.get_task("x1")
    assert results[1][2].tasks == () and await store.get_task("x2") is None


async def test_create_workflow_refuses_taken_ids(store: TaskStore) -> None:
    wf, tasks = diamond()
    created, _, _ = await store.create_workflow(wf, tasks, request_id="w")
    # the same workflow id again, with no or another request id
    for rid in ("", "w-other"):
        with pytest.raises(AlreadyExistsError) as err:
            await store.create_workflow(wf, tasks, request_id=rid)
        assert err.value.metadata["existing"] == "workflows/wf1"
    # the request id wins: its workflow is returned, whatever is asked now
    again, fresh, tr = await store.create_workflow(*diamond("wf-new"), request_id="w")
    assert not fresh and again == created and tr.tasks == ()
    assert await store.get_workflow("wf-new") is None
    # a step task id taken by a stored task refuses the whole workflow
    await store.create_task(mk("wf2-c"))
    before = await store.stats(NS)
    with pytest.raises(AlreadyExistsError) as err:
        await store.create_workflow(*diamond("wf2"), request_id="w2")
    assert err.value.metadata["existing"] == "tasks/wf2-c"
    assert await store.get_workflow("wf2") is None
    assert await store.get_tasks(["wf2-a", "wf2-b", "wf2-d"]) == [None, None, None]
    assert await store.stats(NS) == before
    # two steps with the same task id
    wf3, tasks3 = workflow("wf3", [WorkflowStep("a", "cap"), WorkflowStep("b", "cap")])
    with pytest.raises(AlreadyExistsError) as err:
        await store.create_workflow(wf3, [tasks3[0], replace(tasks3[1], id=tasks3[0].id)])
    assert err.value.metadata["existing"] == "tasks/wf3-a"
    assert await store.get_workflow("wf3") is None and await store.get_task("wf3-a") is None
    # nothing was recorded: "w2" is still free
    made, fresh, _ = await store.create_workflow(*diamond("wf4"), request_id="w2")
    assert fresh and made.id == "wf4"


async def test_queue_limit(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a")
    await store.create_task(mk("t1"), max_queued=2)
    await store.create_task(mk("t2"), max_queued=2)
    with pytest.raises(ResourceExhaustedError):
        await store.create_task(mk("t3"), max_queued=2)
    assert await store.get_task("t3") is None
    # another namespace has its own budget
    await store.create_task(mk("t4", ns="other"), max_queued=2)
    # a running task no longer counts
    lease = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    assert lease is not None
    await store.create_task(mk("t3"), max_queued=2)
    wf, tasks = diamond()
    with pytest.raises(ResourceExhaustedError):
        await store.create_workflow(wf, tasks, max_queued=4)
    assert await store.get_workflow("wf1") is None


async def test_list_tasks_filters_and_pagination(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a")
    for i in range(5):
        await store.create_task(mk(f"t{i}", "cap" if i % 2 == 0 else "other"))
    await store.create_task(mk("x", ns="other"))
    page = await store.list_tasks(TaskFilter(NS), before_seq=0, limit=3)
    assert [t.id for t in page] == ["t4", "t3", "t2"]
    page2 = await store.list_tasks(TaskFilter(NS), before_seq=page[-1].seq, limit=3)
    assert [t.id for t in page2] == ["t1", "t0"]
    caps = await store.list_tasks(TaskFilter(NS, capability="other"), before_seq=0, limit=10)
    assert [t.id for t in caps] == ["t3", "t1"]
    await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    running = await store.list_tasks(TaskFilter(NS, state=TaskState.RUNNING), before_seq=0,
                                     limit=10)
    assert [t.id for t in running] == ["t0"]
    wf, tasks = diamond()
    await store.create_workflow(wf, tasks)
    steps = await store.list_tasks(TaskFilter(NS, workflow_id="wf1"), before_seq=0, limit=10)
    assert [t.id for t in steps] == ["wf1-d", "wf1-c", "wf1-b", "wf1-a"]


async def test_list_tasks_by_labels_and_create_time(
        store: TaskStore, agents: AgentRegistry) -> None:
    """Label and time filters (the console's task filters) page like the others."""
    for i in range(6):
        await store.create_task(replace(
            mk(f"l{i}"), labels={"team": "a" if i % 2 else "b", "tier": str(i % 3)},
            create_time=T0 + i))
    team_a = await store.list_tasks(TaskFilter(NS, labels={"team": "a"}), before_seq=0,
                                    limit=10)
    assert [t.id for t in team_a] == ["l5", "l3", "l1"]
    both = await store.list_tasks(TaskFilter(NS, labels={"team": "a", "tier": "0"}),
                                  before_seq=0, limit=10)
    assert [t.id for t in both] == ["l3"]
    assert await store.list_tasks(TaskFilter(NS, labels={"nope": "x"}), before_seq=0,
                                  limit=10) == []
    window = await store.list_tasks(TaskFilter(NS, created_after=T0 + 1, created_before=T0 + 4),
                                    before_seq=0, limit=10)
    assert [t.id for t in window] == ["l3", "l2", "l1"]
    first = await store.list_tasks(TaskFilter(NS, labels={"team": "b"}), before_seq=0, limit=2)
    assert [t.id for t in first] == ["l4", "l2"]
    rest = await store.list_tasks(TaskFilter(NS, labels={"team": "b"}),
                                  before_seq=first[-1].seq, limit=2)
    assert [t.id for t in rest] == ["l0"]


async def test_list_tasks_after_redrive_lists_once_as_newest(
        store: TaskStore, agents: AgentRegistry) -> None:
    """A re-driven task takes a new seq: it lists once, first, never twice."""
    await live_agents(agents, "a")
    for i in range(3):
        await store.create_task(mk(f"r{i}", retry_policy=RetryPolicy(max_attempts=1)))
    lease = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    assert lease is not None and lease.task.id == "r0"
    await store.fail("r0", lease.fencing_token, TaskFailure("E"),
                     verdict=FailVerdict.DEAD_LETTER, retry_at=0, now=T0)
    dead = await store.list_tasks(TaskFilter(NS, state=TaskState.DEAD_LETTERED), before_seq=0,
                                  limit=10)
    assert [t.id for t in dead] == ["r0"]
    await store.redrive("r0", None, now=T0 + 1)
    assert [t.id for t in await store.list_tasks(TaskFilter(NS), before_seq=0, limit=10)] == [
        "r0", "r2", "r1"]
    assert await store.list_tasks(TaskFilter(NS, state=TaskState.DEAD_LETTERED), before_seq=0,
                                  limit=10) == []


# -- leases -----------------------------------------------------------------------


async def test_lease_order_priority_then_fifo(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a")
    await store.create_task(mk("low1", priority=0))
    await store.create_task(mk("high1", priority=5))
    await store.create_task(mk("low2", priority=0))
    await store.create_task(mk("high2", priority=5))
    await store.create_task(mk("neg", priority=-3))
    await store.create_task(mk("other", "cap2", priority=1))
    order = []
    while (lease := await store.lease_next(NS, ["cap", "cap2"], "a", now=T0,
                                           default_timeout=10)) is not None:
        order.append(lease.task.id)
    assert order == ["high1", "high2", "other", "low1", "low2", "neg"]


async def test_lease_fields_and_namespace_isolation(
        store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a", "agent-1")
    await store.create_task(mk("t1", execution_timeout=7.5))
    await store.create_task(mk("t2"))
    assert await store.lease_next("other", ["cap"], "a", now=T0, default_timeout=10) is None
    assert await store.lease_next(NS, ["nope"], "a", now=T0, default_timeout=10) is None
    lease = await store.lease_next(NS, ["cap"], "agent-1", now=T0 + 1, default_timeout=10)
    assert lease is not None
    t = lease.task
    assert t.state is TaskState.RUNNING and t.attempt == 1 and t.fencing_token == 1
    assert lease.fencing_token == 1 and lease.deadline == T0 + 1 + 7.5
    assert t.lease_deadline == T0 + 8.5 and t.agent_id == "agent-1" and t.start_time == T0 + 1
    assert len(t.attempts) == 1 and t.attempts[0].attempt == 1
    assert t.attempts[0].agent_id == "agent-1" and t.attempts[0].end_time is None
    assert await store.get_task("t1") == t
    lease2 = await store.lease_next(NS, ["cap"], "agent-1", now=T0 + 1.25, default_timeout=10)
    assert lease2 is not None and lease2.deadline == T0 + 11.25
    assert await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10) is None
    assert sorted(t.id for t in await store.leases_of("agent-1")) == ["t1", "t2"]
    assert await store.leases_of("nobody") == []


@pytest.mark.parametrize("batch", [False, True], ids=["lease_next", "lease_batch"])
async def test_no_lease_to_an_agent_that_is_not_live(
        store: TaskStore, agents: AgentRegistry, batch: bool) -> None:
    for i in range(3):
        await store.create_task(mk(f"t{i}"))
    await live_agents(agents, "draining", state=AgentState.DRAINING)
    await live_agents(agents, "gone", state=AgentState.GONE)
    await live_agents(agents, "expired", expire_time=T0 - 1)
    await live_agents(agents, "expiring-now", expire_time=T0)  # expire_time must be > now
    await live_agents(agents, "live", expire_time=T0 + 0.001)

    async def take(agent_id: str) -> list[str]:
        if batch:
            leases = await store.lease_batch(NS, ["cap"], agent_id, now=T0, default_timeout=10,
                                             count=5)
            return [x.task.id for x in leases]
        lease = await store.lease_next(NS, ["cap"], agent_id, now=T0, default_timeout=10)
        return [lease.task.id] if lease else []

    for agent_id in ("unknown", "draining", "gone", "expired", "expiring-now"):
        assert await take(agent_id) == [], agent_id
        assert await store.leases_of(agent_id) == []
    assert dict((await store.stats(NS)).tasks_by_state) == {TaskState.QUEUED: 3}
    assert [await state_of(store, f"t{i}") for i in range(3)] == [TaskState.QUEUED] * 3
    assert await take("live") == (["t0", "t1", "t2"] if batch else ["t0"])


async def test_lease_follows_the_agent_registry(store: TaskStore, agents: AgentRegistry) -> None:
    """Every registry change counts for the next lease: heartbeat, set_state, register."""
    for i in range(5):
        await store.create_task(mk(f"t{i}"))

    async def take(now: float) -> str | None:
        lease = await store.lease_next(NS, ["cap"], "ag", now=now, default_timeout=10)
        return lease.task.id if lease else None

    await live_agents(agents, "ag", expire_time=T0 + 5)
    assert await take(T0) == "t0"
    assert await take(T0 + 5) is None, "expired"
    assert await agents.heartbeat("ag", in_flight=1, load=0.1, now=T0 + 5,
                                  expire_time=T0 + 20) is not None
    assert await take(T0 + 6) == "t1"
    await agents.set_state("ag", AgentState.DRAINING, now=T0 + 7)
    assert await take(T0 + 7) is None, "draining"
    await agents.set_state("ag", AgentState.ACTIVE, now=T0 + 8)
    assert await take(T0 + 8) == "t2"
    await agents.set_state("ag", AgentState.GONE, now=T0 + 9)
    assert await take(T0 + 9) is None, "gone"
    assert await agents.heartbeat("ag", in_flight=0, load=0.0, now=T0 + 9,
                                  expire_time=T0 + 30) is None
    assert await take(T0 + 10) is None, "GONE is final"
    await live_agents(agents, "ag", expire_time=T0 + 30)  # registered again
    assert await take(T0 + 10) == "t3"
    assert await store.lease_batch(NS, ["cap"], "ag", now=T0 + 30, default_timeout=10,
                                   count=3) == []
    assert await state_of(store, "t4") is TaskState.QUEUED


async def test_exactly_one_lease_under_concurrency(store: TaskStore,
                                                  agents: AgentRegistry) -> None:
    n = 40
    await live_agents(agents, *(f"agent-{i}" for i in range(n + 20)))
    for i in range(n):
        await store.create_task(mk(f"t{i}"))
    leases = await asyncio.gather(*[
        store.lease_next(NS, ["cap"], f"agent-{i}", now=T0, default_timeout=10)
        for i in range(n + 20)])
    got = [lease.task.id for lease in leases if lease is not None]
    assert len(got) == n and len(set(got)) == n


async def test_complete_and_fencing(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a")
    await store.create_task(mk("t1"))
    lease = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    assert lease is not None
    with pytest.raises(StaleLeaseError):
        await store.complete("t1", lease.fencing_token + 1, Payload(b"x"), now=T0)
    with pytest.raises(NotFoundError):
        await store.complete("nope", 1, Payload(b"x"), now=T0)
    with pytest.raises(NotFoundError):
        await store.fail("nope", 1, TaskFailure("E"), verdict=FailVerdict.FAIL, retry_at=0,
                         now=T0)
    tr = await store.complete("t1", lease.fencing_token, Payload(b"out", {"e": b"1"}),
                              now=T0 + 2)
    assert len(tr.tasks) == 1 and tr.workflow is None
    done = tr.tasks[0].task
    assert tr.tasks[0].previous_state is TaskState.RUNNING
    assert done.state is TaskState.SUCCEEDED and done.output == Payload(b"out", {"e": b"1"})
    assert done.end_time == T0 + 2 and done.attempts[-1].end_time == T0 + 2
    assert await store.get_task("t1") == done
    # the same lease reporting again is accepted without effect: the first result stays
    again = await store.complete("t1", lease.fencing_token, Payload(b"x"), now=T0 + 5)
    assert again.tasks == () and await store.get_task("t1") == done
    with pytest.raises(StaleLeaseError):
        await store.renew_lease("t1", lease.fencing_token, T0 + 100)
    assert await store.leases_of("a") == []


async def test_requeue_refuses_old_token(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "zombie", "healthy")
    await store.create_task(mk("t1"))
    first = await store.lease_next(NS, ["cap"], "zombie", now=T0, default_timeout=10)
    assert first is not None
    # the reaper requeues the expired lease
    expired = await store.expired_leases(T0 + 11, 10)
    assert [t.id for t in expired] == ["t1"]
    tr = await store.fail("t1", first.fencing_token, TaskFailure("LEASE_EXPIRED"),
                          verdict=FailVerdict.RETRY, retry_at=T0 + 11, now=T0 + 11)
    assert [t.id for t in tr.queued] == ["t1"]
    second = await store.lease_next(NS, ["cap"], "healthy", now=T0 + 12, default_timeout=10)
    assert second is not None and second.fencing_token == first.fencing_token + 1
    assert second.task.attempt == 2 and len(second.task.attempts) == 2
    assert second.task.attempts[0].failure == TaskFailure("LEASE_EXPIRED")
    with pytest.raises(StaleLeaseError):
        await store.complete("t1", first.fencing_token, Payload(b"zombie"), now=T0 + 13)
    with pytest.raises(StaleLeaseError):
        await store.fail("t1", first.fencing_token, TaskFailure("E"),
                         verdict=FailVerdict.FAIL, retry_at=0, now=T0 + 13)
    await store.complete("t1", second.fencing_token, Payload(b"ok"), now=T0 + 13)
    task = await store.get_task("t1")
    assert task is not None and task.output == Payload(b"ok")


async def test_renew_and_expired_leases(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a", "b")
    await store.create_task(mk("t1"))
    await store.create_task(mk("t2"))
    l1 = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    l2 = await store.lease_next(NS, ["cap"], "b", now=T0, default_timeout=20)
    assert l1 is not None and l2 is not None
    assert await store.expired_leases(T0 + 10, 10) == []  # strictly before now
    renewed = await store.renew_lease("t1", l1.fencing_token, T0 + 50)
    assert renewed.lease_deadline == T0 + 50
    with pytest.raises(StaleLeaseError):
        await store.renew_lease("t1", l1.fencing_token + 1, T0 + 60)
    with pytest.raises(NotFoundError):
        await store.renew_lease("nope", 1, T0 + 60)
    expired = await store.expired_leases(T0 + 21, 10)
    assert [t.id for t in expired] == ["t2"]
    expired = await store.expired_leases(T0 + 51, 1)
    assert len(expired) == 1


async def test_retry_and_promote_due(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a", "b")
    await store.create_task(mk("t1"))
    lease = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    assert lease is not None
    tr = await store.fail("t1", lease.fencing_token, TaskFailure("Boom", "bad"),
                          verdict=FailVerdict.RETRY, retry_at=T0 + 5, now=T0 + 1)
    t = tr.tasks[0].task
    assert t.state is TaskState.RETRYING and t.retry_time == T0 + 5
    assert t.failure == TaskFailure("Boom", "bad") and tr.queued == []
    assert t.attempts[0].failure == TaskFailure("Boom", "bad") and t.attempts[0].end_time == T0 + 1
    assert await store.leases_of("a") == []
    assert await store.lease_next(NS, ["cap"], "a", now=T0 + 2, default_timeout=10) is None
    assert (await store.promote_due(T0 + 4.9, 10)).tasks == ()
    promoted = await store.promote_due(T0 + 5, 10)
    assert [t.id for t in promoted.queued] == ["t1"]
    assert promoted.tasks[0].previous_state is TaskState.RETRYING
    assert (await store.promote_due(T0 + 6, 10)).tasks == ()
    again = await store.lease_next(NS, ["cap"], "b", now=T0 + 6, default_timeout=10)
    assert again is not None and again.task.attempt == 2


async def test_promote_due_limit(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a")
    for i in range(3):
        await store.create_task(mk(f"t{i}"))
        lease = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
        assert lease is not None
        await store.fail(lease.task.id, lease.fencing_token, TaskFailure("E"),
                         verdict=FailVerdict.RETRY, retry_at=T0 + 1 + i, now=T0)
    first = await store.promote_due(T0 + 10, 2)
    assert [c.task.id for c in first.tasks] == ["t0", "t1"]
    second = await store.promote_due(T0 + 10, 2)
    assert [c.task.id for c in second.tasks] == ["t2"]


async def test_fail_terminal_and_dead_letter(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a")
    await store.create_task(mk("t1"))
    await store.create_task(mk("t2"))
    l1 = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    l2 = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    assert l1 is not None and l2 is not None
    tr = await store.fail("t1", l1.fencing_token, TaskFailure("Bad", non_retryable=True),
                          verdict=FailVerdict.FAIL, retry_at=0, now=T0 + 1)
    assert tr.tasks[0].task.state is TaskState.FAILED and tr.tasks[0].task.end_time == T0 + 1
    tr = await store.fail("t2", l2.fencing_token, TaskFailure("Flaky"),
                          verdict=FailVerdict.DEAD_LETTER, retry_at=0, now=T0 + 1)
    assert tr.tasks[0].task.state is TaskState.DEAD_LETTERED


# -- workflows --------------------------------------------------------------------


async def test_workflow_diamond_progression(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "agent", "x")
    wf, tasks = diamond()
    created, fresh, tr = await store.create_workflow(wf, tasks, request_id="w")
    assert fresh and created.seq > 0 and tr.workflow == created
    assert created.state is WorkflowState.RUNNING
    assert {c.task.id: c.task.state for c in tr.tasks} == {
        "wf1-a": TaskState.QUEUED, "wf1-b": TaskState.PENDING,
        "wf1-c": TaskState.PENDING, "wf1-d": TaskState.PENDING}
    assert await store.get_workflow("wf1") == created
    again, fresh2, _ = await store.create_workflow(wf, tasks, request_id="w")
    assert not fresh2 and again == created

    lease = await store.lease_next(NS, ["cap"], "x", now=T0, default_timeout=10)
    assert lease is not None and lease.task.id == "wf1-a"
    tr = await store.complete("wf1-a", lease.fencing_token, Payload(b"A"), now=T0 + 1)
    assert sorted(t.id for t in tr.queued) == ["wf1-b", "wf1-c"]
    assert tr.workflow is None
    b = await store.get_task("wf1-b")
    assert b is not None and dict(b.dependency_outputs) == {"a": Payload(b"A")}

    await run_ok(store, "wf1-b", b"B")
    assert await state_of(store, "wf1-d") is TaskState.PENDING
    lease = await store.lease_next(NS, ["cap"], "x", now=T0, default_timeout=10)
    assert lease is not None and lease.task.id == "wf1-c"
    tr = await store.complete("wf1-c", lease.fencing_token, Payload(b"C"), now=T0 + 2)
    assert [t.id for t in tr.queued] == ["wf1-d"]
    d = tr.queued[0]
    assert dict(d.dependency_outputs) == {"b": Payload(b"B"), "c": Payload(b"C")}
    await run_ok(store, "wf1-d", b"D")
    final = await store.get_workflow("wf1")
    assert final is not None and final.state is WorkflowState.SUCCEEDED
    wfs = await store.list_workflows(NS, WorkflowState.SUCCEEDED, before_seq=0, limit=10)
    assert [w.id for w in wfs] == ["wf1"]


async def test_list_workflows(store: TaskStore) -> None:
    for i in range(3):
        wf, tasks = workflow(f"w{i}", [WorkflowStep("s", "cap")])
        await store.create_workflow(wf, tasks)
    wf, tasks = workflow("o", [WorkflowStep("s", "cap")], ns="other")
    await store.create_workflow(wf, tasks)
    page = await store.list_workflows(NS, None, before_seq=0, limit=2)
    assert [w.id for w in page] == ["w2", "w1"]
    page = await store.list_workflows(NS, None, before_seq=page[-1].seq, limit=2)
    assert [w.id for w in page] == ["w0"]
    assert await store.list_workflows(NS, WorkflowState.FAILED, before_seq=0, limit=2) == []


async def test_workflow_failure_cascades(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "agent", "x", "y")
    wf, tasks = diamond()
    await store.create_workflow(wf, tasks)
    await run_ok(store, "wf1-a", b"A")
    lb = await store.lease_next(NS, ["cap"], "x", now=T0, default_timeout=10)
    lc = await store.lease_next(NS, ["cap"], "y", now=T0, default_timeout=10)
    assert lb is not None and lc is not None and lb.task.id == "wf1-b"
    tr = await store.fail("wf1-b", lb.fencing_token, TaskFailure("Boom", "exploded"),
                          verdict=FailVerdict.DEAD_LETTER, retry_at=0, now=T0 + 3)
    states = {c.task.id: c.task.state for c in tr.tasks}
    assert states == {"wf1-b": TaskState.DEAD_LETTERED, "wf1-d": TaskState.CANCELLED}
    d = await store.get_task("wf1-d")
    assert d is not None and d.failure is not None and d.failure.error_type == "UPSTREAM_FAILED"
    assert tr.workflow is not None and tr.workflow.state is WorkflowState.FAILED
    assert "'b'" in tr.workflow.failure_reason and "Boom" in tr.workflow.failure_reason
    # c is not a dependent of b: it keeps running and may still succeed
    assert await state_of(store, "wf1-c") is TaskState.RUNNING
    tr = await store.complete("wf1-c", lc.fencing_token, Payload(b"C"), now=T0 + 4)
    assert tr.queued == []
    assert await state_of(store, "wf1-d") is TaskState.CANCELLED


async def test_cancel_step_fails_workflow(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "x")
    wf, tasks = workflow("w", [WorkflowStep("a", "cap"), WorkflowStep("b", "cap"),
                               WorkflowStep("c", "cap", depends_on=("a",))])
    await store.create_workflow(wf, tasks)
    la = await store.lease_next(NS, ["cap"], "x", now=T0, default_timeout=10)
    assert la is not None and la.task.id == "w-a"
    await store.cancel_task("w-b", "no longer needed", now=T0)
    wfv = await store.get_workflow("w")
    assert wfv is not None and wfv.state is WorkflowState.FAILED
    assert "'b'" in wfv.failure_reason
    # a still runs; its completion does not revive the workflow
    await store.complete("w-a", la.fencing_token, Payload(b"A"), now=T0 + 1)
    assert await state_of(store, "w-c") is TaskState.QUEUED


async def test_cancel_task(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a")
    await store.create_task(mk("t1"))
    await store.create_task(mk("t2"))
    tr = await store.cancel_task("t1", "changed my mind", now=T0 + 1)
    t = tr.tasks[0].task
    assert t.state is TaskState.CANCELLED and t.failure is not None
    assert t.failure.error_type == "CANCELLED" and t.failure.message == "changed my mind"
    lease = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    assert lease is not None and lease.task.id == "t2"
    tr = await store.cancel_task("t2", "", now=T0 + 2)
    assert tr.tasks[0].task.attempts[-1].end_time == T0 + 2
    assert await store.leases_of("a") == []
    assert await store.expired_leases(T0 + 100, 10) == []
    with pytest.raises(StaleLeaseError):
        await store.complete("t2", lease.fencing_token, Payload(b"x"), now=T0 + 3)
    with pytest.raises(FailedPreconditionError):
        await store.cancel_task("t1", "again", now=T0)
    with pytest.raises(NotFoundError):
        await store.cancel_task("nope", "x", now=T0)


async def test_cancel_workflow(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "agent", "x")
    wf, tasks = diamond()
    await store.create_workflow(wf, tasks)
    await run_ok(store, "wf1-a", b"A")
    lease = await store.lease_next(NS, ["cap"], "x", now=T0, default_timeout=10)
    assert lease is not None
    tr = await store.cancel_workflow("wf1", "stop", now=T0 + 5)
    assert tr.workflow is not None and tr.workflow.state is WorkflowState.CANCELLED
    assert sorted(c.task.id for c in tr.tasks) == ["wf1-b", "wf1-c", "wf1-d"]
    assert all(c.task.state is TaskState.CANCELLED for c in tr.tasks)
    assert await state_of(store, "wf1-a") is TaskState.SUCCEEDED
    assert await store.lease_next(NS, ["cap"], "x", now=T0, default_timeout=10) is None
    with pytest.raises(FailedPreconditionError):
        await store.cancel_workflow("wf1", "again", now=T0)
    with pytest.raises(NotFoundError):
        await store.cancel_workflow("nope", "x", now=T0)


async def test_redrive_task(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a", "b")
    await store.create_task(mk("t1"))
    lease = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    assert lease is not None
    with pytest.raises(FailedPreconditionError):
        await store.redrive("t1", None, now=T0)
    with pytest.raises(NotFoundError):
        await store.redrive("nope", None, now=T0)
    await store.fail("t1", lease.fencing_token, TaskFailure("E"),
                     verdict=FailVerdict.DEAD_LETTER, retry_at=0, now=T0 + 1)
    before = await store.get_task("t1")
    assert before is not None
    tr = await store.redrive("t1", Payload(b"fixed"), now=T0 + 10)
    t = tr.tasks[0].task
    assert tr.tasks[0].previous_state is TaskState.DEAD_LETTERED
    assert t.state is TaskState.QUEUED and t.human_intervened and t.budget_start == 1
    assert t.input == Payload(b"fixed") and t.failure is None and t.end_time == 0.0
    assert t.seq > before.seq
    again = await store.lease_next(NS, ["cap"], "b", now=T0 + 11, default_timeout=10)
    assert again is not None and again.task.attempt == 2
    assert again.fencing_token == lease.fencing_token + 1
    await store.complete("t1", again.fencing_token, Payload(b"ok"), now=T0 + 12)
    stats = await store.stats(NS)
    assert stats.tasks_ended == 1 and stats.tasks_succeeded_autonomously == 0


async def test_redrive_workflow_step(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "agent", "x")
    wf, tasks = diamond()
    await store.create_workflow(wf, tasks)
    await run_ok(store, "wf1-a", b"A")
    lb = await store.lease_next(NS, ["cap"], "x", now=T0, default_timeout=10)
    assert lb is not None and lb.task.id == "wf1-b"
    await run_ok(store, "wf1-c", b"C")
    await store.fail("wf1-b", lb.fencing_token, TaskFailure("E"),
                     verdict=FailVerdict.DEAD_LETTER, retry_at=0, now=T0)
    assert await state_of(store, "wf1-d") is TaskState.CANCELLED
    tr = await store.redrive("wf1-b", None, now=T0 + 10)
    states = {c.task.id: (c.previous_state, c.task.state) for c in tr.tasks}
    assert states == {"wf1-b": (TaskState.DEAD_LETTERED, TaskState.QUEUED),
                      "wf1-d": (TaskState.CANCELLED, TaskState.PENDING)}
    assert tr.workflow is not None and tr.workflow.state is WorkflowState.RUNNING
    assert tr.workflow.failure_reason == ""
    b = tr.tasks[0].task
    assert dict(b.dependency_outputs) == {"a": Payload(b"A")}
    await run_ok(store, "wf1-b", b"B2")
    d = await store.get_task("wf1-d")
    assert d is not None and d.state is TaskState.QUEUED
    assert dict(d.dependency_outputs) == {"b": Payload(b"B2"), "c": Payload(b"C")}
    await run_ok(store, "wf1-d", b"D")
    final = await store.get_workflow("wf1")
    assert final is not None and final.state is WorkflowState.SUCCEEDED


async def test_stats_and_autonomy(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "agent", "a")
    empty = await store.stats(NS)
    assert empty.tasks_ended == 0 and empty.autonomy == 1.0
    for i in range(4):
        await store.create_task(mk(f"t{i}"))
    await run_ok(store, "t0", b"")
    await run_ok(store, "t1", b"")
    lease = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    assert lease is not None
    await store.fail("t2", lease.fencing_token, TaskFailure("E"),
                     verdict=FailVerdict.FAIL, retry_at=0, now=T0)
    stats = await store.stats(NS)
    assert dict(stats.tasks_by_state) == {TaskState.SUCCEEDED: 2, TaskState.FAILED: 1,
                                          TaskState.QUEUED: 1}
    assert stats.tasks_ended == 3 and stats.tasks_succeeded_autonomously == 2
    assert stats.autonomy == pytest.approx(2 / 3)
    await store.redrive("t2", None, now=T0)
    stats = await store.stats(NS)
    assert dict(stats.tasks_by_state) == {TaskState.SUCCEEDED: 2, TaskState.QUEUED: 2}
    assert stats.tasks_ended == 2
    other = await store.stats("other")
    assert dict(other.tasks_by_state) == {} and other.tasks_ended == 0


async def test_fail_retry_at_now_queues_at_once(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a")
    await store.create_task(mk("t1"))
    lease = await store.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
    assert lease is not None
    tr = await store.fail("t1", lease.fencing_token, TaskFailure("E"),
                          verdict=FailVerdict.RETRY, retry_at=T0, now=T0)
    assert [t.id for t in tr.queued] == ["t1"]
    queued = tr.queued[0]
    assert replace(queued, update_time=0.0).state is TaskState.QUEUED
    assert (await store.promote_due(T0 + 100, 10)).tasks == ()


# -- the Redis store behaves exactly like the reference -----------------------------


async def _scenario(store: TaskStore, agents: AgentRegistry,
                    ) -> tuple[list[Task | None], list[Workflow | None]]:
    """A mixed run with realistic (sub-millisecond) times; returns every task/workflow."""
    now = 1_732_000_000.123456
    await live_agents(agents, "ag0", "ag1", "ag2")
    await store.create_task(mk("solo", execution_timeout=0.1, labels={"a": "b"}))
    wf, tasks = diamond("wd")
    await store.create_workflow(wf, tasks, request_id="rq")
    wf2, tasks2 = workflow("wc", [WorkflowStep("x", "cap"),
                                  WorkflowStep("y", "cap", depends_on=("x",))])
    await store.create_workflow(wf2, tasks2)
    ids = ["solo", "wd-a", "wd-b", "wd-c", "wd-d", "wc-x", "wc-y"]
    for step in range(12):
        now += 0.3337
        lease = await store.lease_next(NS, ["cap"], f"ag{step % 3}", now=now,
                                       default_timeout=2.5)
        if lease is None:
            break
        tid = lease.task.id
        if tid == "solo" and lease.task.attempt == 1:
            await store.renew_lease(tid, lease.fencing_token, now + 9.75)
            await store.fail(tid, lease.fencing_token, TaskFailure("Flaky", "once"),
                             verdict=FailVerdict.RETRY, retry_at=now + 0.5, now=now)
            await store.promote_due(now + 0.6, 10)
        elif tid == "wd-c" and lease.task.attempt == 1:
            await store.fail(tid, lease.fencing_token, TaskFailure("Bad", "no", True),
                             verdict=FailVerdict.FAIL, retry_at=0, now=now)
            await store.redrive(tid, Payload(b"new", {"encoding": b"json"}), now=now + 0.01)
        elif tid == "wc-x":
            await store.cancel_workflow("wc", "stop it", now=now)
        else:
            await store.complete(tid, lease.fencing_token,
                                 Payload(tid.encode(), {"k": b"\x00\x01"}), now=now)
    return ([await store.get_task(i) for i in ids],
            [await store.get_workflow(w) for w in ("wd", "wc")])


async def test_redis_matches_memory_exactly() -> None:
    url = require_redis()
    stores = await RedisStores.connect(url, prefix=unique_prefix("diff"))
    try:
        expected = await _scenario(*memory_stores())
        got = await _scenario(stores.tasks, stores.agents)
        assert got == expected
        assert await stores.tasks.stats(NS) == await _stats_of(expected[0])
    finally:
        await stores.delete_all_keys()
        await stores.aclose()


async def _stats_of(tasks: list[Task | None]) -> object:
    mem, _ = memory_stores()
    for t in tasks:
        assert t is not None
        mem._store(t, [])
    return await mem.stats(NS)


async def test_two_redis_replicas_never_double_lease_or_double_accept() -> None:
    url = require_redis()
    prefix = unique_prefix("replicas")
    a = await RedisStores.connect(url, prefix=prefix)
    b = await RedisStores.connect(url, prefix=prefix)
    try:
        n = 30
        await live_agents(a.agents, *(f"ag{i}" for i in range(n + 10)))
        for i in range(n):
            await a.tasks.create_task(mk(f"t{i}"))
        calls = [(a if i % 2 else b).tasks.lease_next(NS, ["cap"], f"ag{i}", now=T0,
                                                      default_timeout=10)
                 for i in range(n + 10)]
        leases = [x for x in await asyncio.gather(*calls) if x is not None]
        assert sorted(x.task.id for x in leases) == sorted(f"t{i}" for i in range(n))
        one = leases[0]
        results = await asyncio.gather(
            a.tasks.complete(one.task.id, one.fencing_token, Payload(b"a"), now=T0),
            b.tasks.complete(one.task.id, one.fencing_token, Payload(b"b"), now=T0),
            return_exceptions=True)
        # Both calls carry the same lease: exactly one changes the task, the
        # other is the idempotent repeat (no changes); the stored output is the
        # one of the call that changed it.
        assert not any(isinstance(r, BaseException) for r in results)
        changed = [(r, out) for r, out in zip(results, (b"a", b"b"), strict=True)
                   if r.tasks]  # type: ignore[union-attr]
        assert len(changed) == 1
        stored = await b.tasks.get_task(one.task.id)
        assert stored is not None and stored.output == Payload(changed[0][1])
        stats = await b.tasks.stats(NS)
        assert stats.tasks_by_state[TaskState.SUCCEEDED] == 1
        assert stats.tasks_ended == 1
    finally:
        await a.delete_all_keys()
        await a.aclose()
        await b.aclose()


# -- resilience: timeouts, fallback, limits ----------------------------------------


async def test_schedule_to_start_timeout_fails_a_waiting_task(
        store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "ag")
    await store.create_task(mk("s1", schedule_to_start_timeout=5.0))
    await store.create_task(mk("s2"))
    got = await store.get_task("s1")
    assert got is not None and got.queue_deadline == T0 + 5.0
    assert (await store.expire_queued(T0 + 4.0, 10)).tasks == ()
    tr = await store.expire_queued(T0 + 6.0, 10)
    assert [c.task.id for c in tr.tasks] == ["s1"]
    failed = tr.tasks[0].task
    assert failed.state is TaskState.FAILED and failed.queue_deadline == 0.0
    assert failed.failure is not None and failed.failure.non_retryable
    assert failed.failure.error_type == "SCHEDULE_TO_START_TIMEOUT"
    assert await state_of(store, "s2") is TaskState.QUEUED
    # The failed task left the ready queue.
    lease = await store.lease_next(NS, ["cap"], "ag", now=T0 + 7, default_timeout=30)
    assert lease is not None and lease.task.id == "s2"
    assert (await store.expire_queued(T0 + 100.0, 10)).tasks == ()


async def test_schedule_to_start_stops_once_leased(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "ag")
    await store.create_task(mk("s1", schedule_to_start_timeout=5.0))
    lease = await store.lease_next(NS, ["cap"], "ag", now=T0 + 1, default_timeout=30)
    assert lease is not None and lease.task.queue_deadline == 0.0
    assert (await store.expire_queued(T0 + 60.0, 10)).tasks == ()
    # Back in the queue after a failure: the clock starts again from that moment.
    await store.fail("s1", lease.fencing_token, TaskFailure("Boom"), verdict=FailVerdict.RETRY,
                     retry_at=T0 + 10, now=T0 + 10)
    got = await store.get_task("s1")
    assert got is not None and got.state is TaskState.QUEUED and got.queue_deadline == T0 + 15
    assert [c.task.id for c in (await store.expire_queued(T0 + 16, 10)).tasks] == ["s1"]


async def test_schedule_to_start_timeout_cancels_dependents(store: TaskStore) -> None:
    wf, tasks = workflow("wfs", [WorkflowStep("a", "cap", schedule_to_start_timeout=1.0),
                                 WorkflowStep("b", "cap", depends_on=("a",))])
    tasks = [replace(t, schedule_to_start_timeout=1.0) if t.step_id == "a" else t for t in tasks]
    await store.create_workflow(wf, tasks)
    tr = await store.expire_queued(T0 + 2, 10)
    assert {c.task.id: c.task.state for c in tr.tasks} == {
        "wfs-a": TaskState.FAILED, "wfs-b": TaskState.CANCELLED}
    assert tr.workflow is not None and tr.workflow.state is WorkflowState.FAILED
    assert "SCHEDULE_TO_START_TIMEOUT" in tr.workflow.failure_reason


async def test_heartbeat_timeout_shortens_the_lease(
        store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "ag")
    await store.create_task(mk("h1", heartbeat_timeout=2.0, execution_timeout=60.0))
    await store.create_task(mk("h2", heartbeat_timeout=90.0, execution_timeout=60.0))
    l1 = await store.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30)
    l2 = await store.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30)
    assert l1 is not None and l1.deadline == T0 + 2.0
    assert l2 is not None and l2.deadline == T0 + 60.0
    assert [t.id for t in await store.expired_leases(T0 + 3, 10)] == ["h1"]
    await store.renew_lease("h1", l1.fencing_token, T0 + 5)
    assert await store.expired_leases(T0 + 3, 10) == []


async def test_fallback_serves_only_unavailable_primaries(
        store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "fbagent", "primary")
    await store.create_task(mk("f1", "prim", fallback_capability="fb", priority=5))
    await store.create_task(mk("f2", "fb"))
    await store.create_task(mk("f3", "other", fallback_capability="fb"))
    scope = LeaseScope(("fb",), frozenset({"prim", "other"}))
    lease = await store.lease_next(NS, ["fb"], "fbagent", now=T0, default_timeout=30,
                                   scope=scope)
    assert lease is not None and lease.task.id == "f2" and not lease.task.served_by_fallback
    assert await store.lease_next(NS, ["fb"], "fbagent", now=T0, default_timeout=30,
                                  scope=scope) is None
    # "prim" has no usable agent any more: its task is served by the fallback.
    scope = LeaseScope(("fb",), frozenset({"other"}))
    lease = await store.lease_next(NS, ["fb"], "fbagent", now=T0, default_timeout=30,
                                   scope=scope)
    assert lease is not None and lease.task.id == "f1" and lease.task.served_by_fallback
    await store.complete("f1", lease.fencing_token, Payload(b"ok"), now=T0)
    done = await store.get_task("f1")
    assert done is not None and done.served_by_fallback and done.state is TaskState.SUCCEEDED
    # Leased by a primary agent, the task leaves the fallback queue too.
    lp = await store.lease_next(NS, ["other"], "primary", now=T0, default_timeout=30)
    assert lp is not None and lp.task.id == "f3" and not lp.task.served_by_fallback
    assert await store.lease_next(NS, ["fb"], "fbagent", now=T0, default_timeout=30,
                                  scope=LeaseScope(("fb",), frozenset())) is None


async def test_capability_concurrency_limit(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "ag")
    limits = DispatchLimits(capability_limits={"cap": 2})
    for i in range(4):
        await store.create_task(mk(f"c{i}"))
    leases = [await store.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30,
                                     limits=limits) for _ in range(3)]
    assert [x.task.id if x else None for x in leases] == ["c0", "c1", None]
    assert leases[0] is not None
    await store.complete("c0", leases[0].fencing_token, Payload(b""), now=T0)
    nxt = await store.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30, limits=limits)
    assert nxt is not None and nxt.task.id == "c2"
    # Another namespace has its own count.
    await store.create_task(mk("o1", ns="ns2"))
    other = await store.lease_next("ns2", ["cap"], "ag", now=T0, default_timeout=30,
                                   limits=limits)
    assert other is not None


async def test_key_concurrency_limit_skips_to_other_keys(
        store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "ag")
    limits = DispatchLimits(key_label="tenant", key_limits={"a": 1}, default_key_limit=2)
    await store.create_task(mk("k1", labels={"tenant": "a"}))
    await store.create_task(mk("k2", labels={"tenant": "a"}))
    await store.create_task(mk("k3", labels={"tenant": "b"}))
    await store.create_task(mk("k4", labels={"tenant": "b"}))
    await store.create_task(mk("k5", labels={"tenant": "b"}))
    await store.create_task(mk("k6"))
    got = []
    while (lease := await store.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30,
                                           limits=limits)) is not None:
        got.append(lease.task.id)
    assert got == ["k1", "k3", "k4", "k6"]
    k1 = await store.get_task("k1")
    assert k1 is not None
    await store.fail("k1", k1.fencing_token, TaskFailure("x"), verdict=FailVerdict.FAIL,
                     retry_at=T0, now=T0)
    lease = await store.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30, limits=limits)
    assert lease is not None and lease.task.id == "k2"


async def test_capability_rate_limit_token_bucket(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "ag")
    limits = DispatchLimits(capability_rates={"cap": 2.0})
    for i in range(5):
        await store.create_task(mk(f"r{i}"))

    async def take(now: float) -> str | None:
        lease = await store.lease_next(NS, ["cap"], "ag", now=now, default_timeout=30,
                                       limits=limits)
        return lease.task.id if lease else None

    assert [await take(T0), await take(T0), await take(T0)] == ["r0", "r1", None]
    assert await take(T0 + 0.25) is None
    assert await take(T0 + 0.5) == "r2"
    assert await take(T0 + 0.5) is None
    assert [await take(T0 + 10), await take(T0 + 10)] == ["r3", "r4"]


async def test_create_tasks_batch(store: TaskStore) -> None:
    """Several creates in one step: in order, idempotent per item, cut at a full queue."""
    first, _, _ = await store.create_task(mk("pre"), request_id="r-pre")
    results, full = await store.create_tasks(
        [(mk("b1"), "r1"), (mk("b2"), ""), (mk("dup"), "r-pre"), (mk("b3"), "r3")],
        max_queued=10)
    assert not full
    assert [(t.id, created) for t, created, _ in results] == [
        ("b1", True), ("b2", True), ("pre", False), ("b3", True)]
    assert results[2][0] == first and results[2][2].tasks == ()
    seqs = [t.seq for t, created, _ in results if created]
    assert seqs == sorted(seqs), "FIFO order is the batch order"
    assert all(tr.tasks[0].task.state is TaskState.QUEUED
               for _, created, tr in results if created)
    # Cut short at the queue limit: the items before it are queued, the rest not.
    results, full = await store.create_tasks([(mk("c1"), ""), (mk("c2"), ""), (mk("c3"), "")],
                                             max_queued=6)
    assert full and [t.id for t, _, _ in results] == ["c1", "c2"]
    assert await store.get_task("c3") is None


async def test_lease_batch_in_order(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a", "b")
    for i in range(5):
        await store.create_task(mk(f"q{i}", priority=1 if i == 3 else 0))
    leases = await store.lease_batch(NS, ["cap"], "a", now=T0, default_timeout=10, count=3)
    assert [lease.task.id for lease in leases] == ["q3", "q0", "q1"]
    assert all(lease.task.state is TaskState.RUNNING and lease.task.agent_id == "a"
               for lease in leases)
    rest = await store.lease_batch(NS, ["cap"], "b", now=T0, default_timeout=10, count=10)
    assert [lease.task.id for lease in rest] == ["q2", "q4"]
    assert await store.lease_batch(NS, ["cap"], "b", now=T0, default_timeout=10,
                                   count=10) == []


async def test_complete_many_fenced_per_item(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "a")
    for i in range(3):
        await store.create_task(mk(f"m{i}"))
    leases = await store.lease_batch(NS, ["cap"], "a", now=T0, default_timeout=10, count=3)
    items = [(lease.task.id, lease.fencing_token, Payload(b"ok")) for lease in leases]
    items[1] = (items[1][0], items[1][1] + 5, Payload(b"forged"))  # a stale token
    items.append(("nope", 1, Payload(b"x")))
    results = await store.complete_many(items, now=T0 + 1)
    assert isinstance(results[0], Transition) and isinstance(results[2], Transition)
    assert isinstance(results[1], StaleLeaseError)
    assert isinstance(results[3], NotFoundError)
    states = [(await store.get_task(f"m{i}")).state for i in range(3)]  # type: ignore[union-attr]
    assert states == [TaskState.SUCCEEDED, TaskState.RUNNING, TaskState.SUCCEEDED]
    assert (await store.get_task("m0")).output == Payload(b"ok")  # type: ignore[union-attr]


async def test_waiting_by_capability(store: TaskStore, agents: AgentRegistry) -> None:
    await live_agents(agents, "ag")
    await store.create_task(mk("a1", "a"))
    await store.create_task(mk("a2", "a"))
    await store.create_task(mk("b1", "b"))
    lease = await store.lease_next(NS, ["a"], "ag", now=T0, default_timeout=10)
    assert lease is not None
    stats = await store.stats(NS)
    assert dict(stats.waiting_by_capability) == {
        ("a", TaskState.QUEUED): 1, ("a", TaskState.RUNNING): 1, ("b", TaskState.QUEUED): 1}
    await store.complete(lease.task.id, lease.fencing_token, Payload(b"x"), now=T0 + 1)
    stats = await store.stats(NS)
    assert dict(stats.waiting_by_capability) == {
        ("a", TaskState.QUEUED): 1, ("b", TaskState.QUEUED): 1}


async def test_list_tasks_by_state_and_capability_through_redrives_and_cancels(
        store: TaskStore, agents: AgentRegistry) -> None:
    """Lists by an ended state stay exact while tasks leave it and come back, many times."""
    await live_agents(agents, "a")
    for i in range(6):
        await store.create_task(mk(f"c{i}", "cap" if i % 2 else "other"))
    for i in range(6):
        await store.cancel_task(f"c{i}", "test", now=T0)
    for _round in range(40):  # re-drive and cancel again: stale index entries pile up
        for i in (1, 2):
            await store.redrive(f"c{i}", None, now=T0)
            await store.cancel_task(f"c{i}", "again", now=T0)
    await store.redrive("c3", None, now=T0)
    cancelled = await store.list_tasks(TaskFilter(NS, state=TaskState.CANCELLED), before_seq=0,
                                       limit=10)
    assert [t.id for t in cancelled] == ["c2", "c1", "c5", "c4", "c0"]
    page = await store.list_tasks(TaskFilter(NS, state=TaskState.CANCELLED), before_seq=0,
                                  limit=2)
    rest = await store.list_tasks(TaskFilter(NS, state=TaskState.CANCELLED),
                                  before_seq=page[-1].seq, limit=10)
    assert [t.id for t in page + rest] == ["c2", "c1", "c5", "c4", "c0"]
    by_cap = await store.list_tasks(TaskFilter(NS, state=TaskState.CANCELLED, capability="cap"),
                                    before_seq=0, limit=10)
    assert [t.id for t in by_cap] == ["c1", "c5"]
    assert [t.id for t in await store.list_tasks(TaskFilter(NS, capability="cap"),
                                                 before_seq=0, limit=10)] == [
        "c3", "c1", "c5"]
    assert await store.list_tasks(TaskFilter(NS, capability="nope"), before_seq=0,
                                  limit=10) == []


async def test_scan_tasks_bounds_the_read_and_resumes(
        store: TaskStore, agents: AgentRegistry) -> None:
    """A filter matching few tasks is read in bounded steps; resuming finds them all."""
    for i in range(12):
        labels = {"team": "rare"} if i in (1, 7) else {"team": "common"}
        await store.create_task(replace(mk(f"s{i:02d}"), labels=labels))
    flt = TaskFilter(NS, labels={"team": "rare"})
    found: list[str] = []
    before, steps = 0, 0
    while True:
        page, before = await store.scan_tasks(flt, before_seq=before, limit=10, max_scan=4)
        steps += 1
        assert len(page) <= 10
        found += [t.id for t in page]
        if not before:
            break
    assert found == ["s07", "s01"]
    assert steps >= 3  # 12 tasks, at most 4 read per step
    full, resume = await store.scan_tasks(TaskFilter(NS), before_seq=0, limit=3, max_scan=100)
    assert [t.id for t in full] == ["s11", "s10", "s09"] and resume == full[-1].seq
    rest, end = await store.scan_tasks(TaskFilter(NS), before_seq=resume, limit=100,
                                       max_scan=100)
    assert [t.id for t in rest] == [f"s{i:02d}" for i in range(8, -1, -1)] and end == 0
    assert await store.scan_tasks(TaskFilter("empty-ns"), before_seq=0, limit=5,
                                  max_scan=5) == ([], 0)

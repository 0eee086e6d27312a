"""Several replicas sharing Redis and NATS act as one mesh."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
import pytest
from agentmesh.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

from server.app import Mesh, running_server
from server.backends.redis import RedisStores
from server.domain.models import Lease, Task, TaskState
from server.ports import Transition
from server.services.clock import Clock, ManualClock
from server.services.scheduler import SchedulerObserver
from tests._services import require_nats, require_redis, unique_prefix
from tests.clusters import NatsCluster, RedisCluster
from tests.conftest import embedded_settings
from tests.test_protocol import RawAgent, js, next_kind, refused_as_stale, until_state

PATIENT = {"heartbeat_misses": 150}
"""RawAgent never beats: a 30 s registration keeps its agents ACTIVE for any test here."""


@asynccontextmanager
async def two_replicas(*, clock: Clock | None = None, urls: tuple[str, str] | None = None,
                       **overrides: object) -> AsyncIterator[tuple[Mesh, Mesh]]:
    """Two replicas on one Redis prefix and one NATS subject prefix (keys deleted after);
    ``urls``: (store, bus), by default the shared single Redis and NATS."""
    redis_url, nats_url = urls or (require_redis(), require_nats())
    prefix = unique_prefix("rep")
    settings = embedded_settings(store=redis_url, bus=nats_url, key_prefix=prefix, **overrides)
    try:
        async with running_server(settings, clock=clock) as a, \
                running_server(settings, clock=clock) as b:
            yield a, b
    finally:
        stores = await RedisStores.connect(redis_url, prefix=prefix)
        await stores.delete_all_keys()
        await stores.aclose()


BACKENDS = ["single", "clusters"]
"""The replica suite runs on the shared Redis + NATS and on a Redis Cluster + NATS cluster."""


def backend_urls(request: pytest.FixtureRequest, kind: str) -> tuple[str, str] | None:
    """(store, bus) URLs of a ``BACKENDS`` value (the session's clusters for "clusters")."""
    if kind == "single":
        return None
    redis_cluster: RedisCluster = request.getfixturevalue("shared_redis_cluster")
    nats_cluster: NatsCluster = request.getfixturevalue("shared_nats_cluster")
    return redis_cluster.url, nats_cluster.url


@pytest.fixture(params=BACKENDS)
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Mesh, Mesh]]:
    """Two replicas on one Redis prefix and one NATS subject prefix."""
    async with two_replicas(urls=backend_urls(request, request.param), **PATIENT) as pair:
        yield pair


def close(*agents: RawAgent) -> None:
    """End the agents' streams."""
    for ag in agents:
        ag.out.put_nowait(None)
        ag.hb_out.put_nowait(None)


async def test_agent_on_a_receives_task_submitted_on_b(replicas: tuple[Mesh, Mesh]) -> None:
    a, b = replicas
    async with grpc.aio.insecure_channel(a.address) as ca, \
            grpc.aio.insecure_channel(b.address) as cb:
        agent = RawAgent(ca, "on-a", ["cross"])
        await agent.register()
        work = agent.open_work()
        await next_kind(work, "opened")
        # ListAgents on B shows the agent connected to A.
        listed = await discovery_pb2_grpc.DiscoveryServiceStub(cb).ListAgents(
            discovery_pb2.ListAgentsRequest(capability="cross"))
        assert [x.name for x in listed.agents] == [agent.agent]
        # With a peer registered on B, either replica lists both agents, whole
        # or page by page (a page token from one replica works on the other).
        peer = RawAgent(cb, "on-b", ["cross-peer"])
        await peer.register()
        both = sorted([agent.agent, peer.agent])
        for ch in (ca, cb):
            listed = await discovery_pb2_grpc.DiscoveryServiceStub(ch).ListAgents(
                discovery_pb2.ListAgentsRequest())
            assert sorted(x.name for x in listed.agents) == both
            assert {x.state for x in listed.agents} == {discovery_pb2.AGENT_STATE_ACTIVE}
        for first, second in ((ca, cb), (cb, ca)):
            page1 = await discovery_pb2_grpc.DiscoveryServiceStub(first).ListAgents(
                discovery_pb2.ListAgentsRequest(page_size=1))
            page2 = await discovery_pb2_grpc.DiscoveryServiceStub(second).ListAgents(
                discovery_pb2.ListAgentsRequest(page_size=1, page_token=page1.next_page_token))
            assert [x.name for x in [*page1.agents, *page2.agents]] == both
            assert not page2.next_page_token
        tb = task_pb2_grpc.TaskServiceStub(cb)
        watch = tb.WatchTasks(task_pb2.WatchTasksRequest(capability="cross"))
        await asyncio.sleep(0.2)  # let B's watch subscription reach NATS
        sub = await tb.SubmitTask(task_pb2.SubmitTaskRequest(
            task=task_pb2.Task(capability="cross", input=js("hi"))))
        assignment = (await next_kind(work, "assignment")).assignment
        assert assignment.task.name == sub.task.name
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=sub.task.name, fencing_token=assignment.fencing_token, output=js("done"))))
        await until_state(tb, sub.task.name, task_pb2.TASK_STATE_SUCCEEDED)
        # WatchTasks on B sees the change that happened on A.
        seen = []
        async with asyncio.timeout(5):
            async for ev in watch:
                seen.append(ev.task.state)
                if ev.task.state == task_pb2.TASK_STATE_SUCCEEDED:
                    break
        assert seen[-1] == task_pb2.TASK_STATE_SUCCEEDED
        watch.cancel()
        got = await tb.GetTask(task_pb2.GetTaskRequest(name=sub.task.name))
        assert json.loads(got.task.output.data) == "done"
        close(agent, peer)


async def test_many_tasks_each_leased_once_across_replicas(
        replicas: tuple[Mesh, Mesh]) -> None:
    """Agents on both replicas compete for one queue: every task runs exactly once."""
    a, b = replicas
    async with grpc.aio.insecure_channel(a.address) as ca, \
            grpc.aio.insecure_channel(b.address) as cb:
        agents = [RawAgent(ca, "a1", ["race"], 4), RawAgent(cb, "b1", ["race"], 4)]
        works = []
        for ag in agents:
            await ag.register()
            w = ag.open_work()
            await next_kind(w, "opened")
            works.append(w)
        n = 40
        tb = task_pb2_grpc.TaskServiceStub(cb)
        names = {(await tb.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
            capability="race", input=js(i))))).task.name for i in range(n)}
        got: dict[str, str] = {}

        async def serve(ag: RawAgent, w: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
            while len(got) < n:
                try:
                    msg = await asyncio.wait_for(w.read(), 0.5)
                except TimeoutError:
                    continue
                kind = msg.WhichOneof("kind")
                if kind == "assignment":
                    batch = [msg.assignment]
                elif kind == "assignments":
                    batch = list(msg.assignments.assignments)
                else:
                    continue
                results = []
                for t in batch:
                    assert t.task.name not in got, "a task was leased twice"
                    got[t.task.name] = ag.name
                    results.append(task_pb2.TaskResult(
                        task=t.task.name, fencing_token=t.fencing_token, output=js(ag.name)))
                # Each reported result returns its slot: no credit message needed.
                ag.out.put_nowait(task_pb2.ProcessTasksRequest(
                    reports=task_pb2.TaskReportBatch(results=results)))

        async with asyncio.timeout(20):
            await asyncio.gather(*(serve(ag, w) for ag, w in zip(agents, works, strict=True)))
        assert set(got) == names
        assert set(got.values()) == {"a1", "b1"}, "both replicas' agents took work"
        stats = await tb.GetStats(task_pb2.GetStatsRequest())
        assert stats.tasks_by_state["SUCCEEDED"] == n
        for ag in agents:
            ag.out.put_nowait(None)
            ag.hb_out.put_nowait(None)


async def test_watch_workflow_on_b_sees_steps_on_a(replicas: tuple[Mesh, Mesh]) -> None:
    """WatchWorkflow on B follows a two-step workflow whose steps run on A's agent.

    Each step change is made on A (lease, result) only after B's watch showed
    the previous one, so every change below must reach B's watch; the output
    of step ``first`` reaches step ``second`` as its dependency output, and the
    watch ends once the workflow has SUCCEEDED.
    """
    a, b = replicas
    running, done = task_pb2.TASK_STATE_RUNNING, task_pb2.TASK_STATE_SUCCEEDED
    async with grpc.aio.insecure_channel(a.address) as ca, \
            grpc.aio.insecure_channel(b.address) as cb:
        agent = RawAgent(ca, "wf-on-a", ["relay"], 1)
        await agent.register()
        tb = task_pb2_grpc.TaskServiceStub(cb)
        submitted = await tb.SubmitWorkflow(task_pb2.SubmitWorkflowRequest(
            workflow=task_pb2.Workflow(display_name="relay", steps=[
                task_pb2.WorkflowStep(id="first", capability="relay", input=js("seed")),
                task_pb2.WorkflowStep(id="second", capability="relay", input=js("tail"),
                                      depends_on=["first"])])))
        name = submitted.workflow.name
        watch = tb.WatchWorkflow(task_pb2.WatchWorkflowRequest(name=name))
        seen: list[tuple[int, int, int]] = []
        Steps = dict[str, task_pb2.WorkflowStep]
        latest: list[tuple[task_pb2.Workflow, Steps]] = []

        async def until_seen(cond: Callable[[task_pb2.Workflow, Steps], bool],
                             ) -> tuple[task_pb2.Workflow, Steps]:
            """The latest snapshot B's watch sent, once one meets ``cond``."""
            async with asyncio.timeout(10):
                while not (latest and cond(*latest[-1])):
                    msg = await watch.read()
                    assert msg is not grpc.aio.EOF, f"watch ended early; saw {seen}"
                    wf = msg.workflow
                    steps = {s.id: s for s in wf.steps}
                    seen.append((wf.state, steps["first"].state, steps["second"].state))
                    latest.append((wf, steps))
            return latest[-1]

        wf, steps = await until_seen(lambda wf, s: True)
        assert wf.state == task_pb2.WORKFLOW_STATE_RUNNING
        assert steps["first"].state == task_pb2.TASK_STATE_QUEUED
        assert steps["second"].state == task_pb2.TASK_STATE_PENDING

        work = agent.open_work()  # only now can A lease the first step
        await next_kind(work, "opened")
        first = (await next_kind(work, "assignment")).assignment
        assert first.task.step_id == "first"
        assert json.loads(first.task.input.data) == "seed"
        await until_seen(lambda wf, s: s["first"].state == running)

        out1 = js({"from": "first", "value": 21})
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=first.task.name, fencing_token=first.fencing_token, output=out1)))
        _, steps = await until_seen(lambda wf, s: s["first"].state == done)
        assert steps["first"].output.data == out1.data
        assert steps["second"].state in (task_pb2.TASK_STATE_QUEUED, running)

        second = (await next_kind(work, "assignment")).assignment
        assert second.task.step_id == "second"
        assert second.task.dependency_outputs["first"].data == out1.data
        await until_seen(lambda wf, s: s["second"].state == running)
        upstream = json.loads(second.task.dependency_outputs["first"].data)
        out2 = js({"from": "second", "value": upstream["value"] * 2})
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=second.task.name, fencing_token=second.fencing_token, output=out2)))
        wf, steps = await until_seen(lambda wf, s: wf.state != task_pb2.WORKFLOW_STATE_RUNNING)
        assert wf.state == task_pb2.WORKFLOW_STATE_SUCCEEDED, seen
        assert [steps["first"].state, steps["second"].state] == [done, done]
        assert json.loads(steps["second"].output.data) == {"from": "second", "value": 42}
        async with asyncio.timeout(10):
            assert await watch.read() is grpc.aio.EOF, "the watch ends with the workflow"

        # Each step's states came in lifecycle order, and A agrees with what B showed.
        order = [task_pb2.TASK_STATE_PENDING, task_pb2.TASK_STATE_QUEUED, running, done]
        for i in (1, 2):
            states = [s[i] for s in seen]
            assert states == sorted(states, key=order.index), seen
        got = await task_pb2_grpc.TaskServiceStub(ca).GetWorkflow(
            task_pb2.GetWorkflowRequest(name=name))
        assert got.workflow == wf
        close(agent)


class Spy:
    """Wraps a replica's scheduler observer: records the transitions the replica
    made (each one a store operation it won), its leases and its refusals."""

    def __init__(self, inner: SchedulerObserver) -> None:
        self.inner = inner
        self.changes: list[tuple[str, TaskState | None, TaskState]] = []
        self.leases: list[tuple[str, int]] = []
        self.stale: list[str] = []

    def transition(self, transition: Transition, now: float) -> None:
        """Record, then pass on."""
        self.changes += [(c.task.id, c.previous_state, c.task.state) for c in transition.tasks]
        self.inner.transition(transition, now)

    def dispatched(self, lease: Lease, now: float) -> None:
        """Record, then pass on."""
        self.leases.append((lease.task.id, lease.fencing_token))
        self.inner.dispatched(lease, now)

    def stale_result(self, task_id: str) -> None:
        """Record, then pass on."""
        self.stale.append(task_id)
        self.inner.stale_result(task_id)

    def breaker_changed(self, agent_id: str, capability: str, state: str) -> None:
        """Pass on."""
        self.inner.breaker_changed(agent_id, capability, state)


def spy_on(mesh: Mesh) -> Spy:
    """Install a Spy on a running replica's scheduler."""
    spy = Spy(mesh.scheduler._observer)
    mesh.scheduler._observer = spy
    return spy


class Contention:
    """Makes the replicas' periodic reapers meet before they act on one task.

    Each replica's first maintenance pass that reads the task's expired lease
    waits until every replica has read it too, so all of them try to fail the
    same lease (the worst interleaving, forced rather than hoped for). Likewise
    each replica's first retry-timer pass at or after ``retry_time`` waits for
    the others, so the promotions run at the same moment. ``met`` counts the
    replicas that got through each meeting point.
    """

    def __init__(self, task_id: str, replicas: int) -> None:
        self.task_id = task_id
        self.retry_time = math.inf
        self.met: Counter[str] = Counter()
        self._barriers = {"expiry": asyncio.Barrier(replicas),
                          "promote": asyncio.Barrier(replicas)}

    def hold(self, mesh: Mesh) -> None:
        """Wrap one replica's store reads (instance attributes; the class is untouched)."""
        store = mesh.scheduler._tasks
        read, promote = store.expired_leases, store.promote_due
        passed: set[str] = set()

        async def expired_leases(now: float, limit: int) -> list[Task]:
            found = await read(now, limit)
            if "expiry" not in passed and any(t.id == self.task_id for t in found):
                passed.add("expiry")
                await self._meet("expiry")
            return found

        async def promote_due(now: float, limit: int) -> Transition:
            if "promote" not in passed and now >= self.retry_time:
                passed.add("promote")
                await self._meet("promote")
            return await promote(now, limit)

        store.expired_leases = expired_leases  # type: ignore[method-assign]
        store.promote_due = promote_due  # type: ignore[method-assign]

    async def _meet(self, point: str) -> None:
        async with asyncio.timeout(10):
            await self._barriers[point].wait()
        self.met[point] += 1


@pytest.mark.parametrize("kind", BACKENDS)
async def test_lease_expiry_and_retry_timer_are_handled_once_with_two_replicas(
        request: pytest.FixtureRequest, kind: str) -> None:
    """Two replicas, both reaping every 20 ms, on one clock that the test moves.

    The holder (on A) takes attempt 1 of a task with a 1 s execution timeout and
    never answers. The clock passes the lease deadline; both replicas' periodic
    reapers read the expired lease before either acts (``Contention``), and
    both try to fail it: it must be failed once (LEASE_EXPIRED, RETRYING with
    a 1 s backoff) and the holder told to stop. The clock passes the retry
    time; both replicas' retry timers run at once: the task must be promoted to
    QUEUED once and leased once more, to the finisher (on B), as attempt 2
    (never 3). The holder's late result for attempt 1 (on its stream, and with
    CompleteTask on A and on B) is refused while attempt 2 runs; attempt 2's
    result ends the task.

    Counted over both replicas' store transitions: exactly one RUNNING ->
    RETRYING, one RETRYING -> QUEUED, two leases, three refusals.
    """
    clock = ManualClock(time.time())
    async with two_replicas(clock=clock, urls=backend_urls(request, kind), **PATIENT) as (a, b), \
            grpc.aio.insecure_channel(a.address) as ca, \
            grpc.aio.insecure_channel(b.address) as cb:
        spies = [spy_on(a), spy_on(b)]
        ta, tb = task_pb2_grpc.TaskServiceStub(ca), task_pb2_grpc.TaskServiceStub(cb)
        holder = RawAgent(ca, "holder", ["lease"], 1)
        await holder.register()
        hw = holder.open_work()
        await next_kind(hw, "opened")
        sub = await tb.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
            capability="lease", input=js("x"), execution_timeout={"seconds": 1},
            retry_policy=common_pb2.RetryPolicy(
                max_attempts=5, initial_backoff={"seconds": 1}, max_backoff={"seconds": 1},
                jitter=common_pb2.BACKOFF_JITTER_NONE))))
        name, task_id = sub.task.name, sub.task.name.removeprefix("tasks/")
        contention = Contention(task_id, 2)
        contention.hold(a)
        contention.hold(b)
        first = (await next_kind(hw, "assignment")).assignment
        assert (first.task.name, first.task.attempt) == (name, 1)
        finisher = RawAgent(cb, "finisher", ["lease"], 1)
        await finisher.register()
        fw = finisher.open_work()
        await next_kind(fw, "opened")

        clock.advance(1.5)  # past the lease deadline
        retrying = await until_state(tb, name, task_pb2.TASK_STATE_RETRYING, 10)
        assert retrying.attempt == 1
        assert retrying.attempts[0].failure.error_type == "LEASE_EXPIRED"
        stop = (await next_kind(hw, "cancellation")).cancellation
        assert (stop.task, stop.fencing_token) == (name, first.fencing_token)
        assert contention.met["expiry"] == 2, "both replicas read the expired lease"

        contention.retry_time = retrying.retry_time.ToNanoseconds() / 1e9
        clock.advance(1.5)  # past the retry time
        second = (await next_kind(fw, "assignment")).assignment
        assert (second.task.name, second.task.attempt) == (name, 2)
        assert second.fencing_token > first.fencing_token
        assert contention.met["promote"] == 2, "both replicas ran the retry timer"

        # The holder's late result while attempt 2 runs: refused everywhere.
        stale = task_pb2.TaskResult(task=name, fencing_token=first.fencing_token,
                                    output=js("late"))
        holder.out.put_nowait(task_pb2.ProcessTasksRequest(result=stale))
        ack = (await next_kind(hw, "ack")).ack
        assert (ack.task, ack.outcome) == (name, task_pb2.TASK_REPORT_OUTCOME_STALE_LEASE)
        for stub in (ta, tb):
            await refused_as_stale(stub, name, first.fencing_token)
        now = (await tb.GetTask(task_pb2.GetTaskRequest(name=name))).task
        assert (now.state, now.attempt, now.agent) == (
            task_pb2.TASK_STATE_RUNNING, 2, finisher.agent)

        finisher.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=name, fencing_token=second.fencing_token, output=js("finished"))))
        got = await until_state(tb, name, task_pb2.TASK_STATE_SUCCEEDED, 10)
        assert json.loads(got.output.data) == "finished"
        assert got.attempt == 2
        assert [(x.attempt, x.agent, x.failure.error_type) for x in got.attempts] == [
            (1, holder.agent, "LEASE_EXPIRED"), (2, finisher.agent, "")]

        changes = Counter((p, n) for s in spies for (t, p, n) in s.changes if t == task_id)
        assert changes == Counter({
            (None, TaskState.QUEUED): 1, (TaskState.RUNNING, TaskState.RETRYING): 1,
            (TaskState.RETRYING, TaskState.QUEUED): 1, (TaskState.RUNNING, TaskState.SUCCEEDED): 1,
        }), changes
        assert [lease for s in spies for lease in s.leases if lease[0] == task_id] == [
            (task_id, first.fencing_token), (task_id, second.fencing_token)]
        assert sum(s.stale.count(task_id) for s in spies) == 3
        close(holder, finisher)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_reconcile_does_not_hand_over_a_lease_reported_during_its_pass(
        request: pytest.FixtureRequest, kind: str) -> None:
    """A result that lands while a replica's reconcile pass runs is not re-delivered.

    ``Scheduler.reconcile`` reads a local agent's leases from the store, then
    treats each one its session does not hold (and older than ``ORPHAN_AGE``)
    as never delivered, and hands it over again. The test holds that read until
    the agent's result for the lease is committed and its slot released, then
    lets the pass go on: the lease is no longer the agent's, so the pass must
    find nothing and the agent must not get the same assignment again (it would
    run the task twice, and its second result would be accepted as well).
    """
    clock = ManualClock(time.time())
    async with two_replicas(clock=clock, urls=backend_urls(request, kind), **PATIENT) as (a, b), \
            grpc.aio.insecure_channel(a.address) as ca, \
            grpc.aio.insecure_channel(b.address) as cb:
        spies = [spy_on(a), spy_on(b)]
        tb = task_pb2_grpc.TaskServiceStub(cb)
        agent = RawAgent(ca, "busy", ["orphan"], 1)
        await agent.register()
        work = agent.open_work()
        await next_kind(work, "opened")
        sub = await tb.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
            capability="orphan", input=js("once"))))
        name, task_id = sub.task.name, sub.task.name.removeprefix("tasks/")
        first = (await next_kind(work, "assignment")).assignment
        assert first.task.name == name

        store = a.scheduler._tasks
        read_leases = store.leases_of
        was_read, go_on = asyncio.Event(), asyncio.Event()

        async def leases_of(agent_id: str) -> list[Task]:
            found = await read_leases(agent_id)
            if any(t.id == task_id for t in found) and not was_read.is_set():
                was_read.set()
                async with asyncio.timeout(10):
                    await go_on.wait()
            return found

        store.leases_of = leases_of  # type: ignore[method-assign]
        async with asyncio.TaskGroup() as group:
            # A pass as the maintenance loop runs it, ORPHAN_AGE + 1 s after the lease
            # (the replicas' own clock stays still, so their periodic passes skip it).
            recon = group.create_task(a.scheduler.reconcile(clock.now() + 3.0))
            async with asyncio.timeout(10):
                await was_read.wait()
            agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
                task=name, fencing_token=first.fencing_token, output=js("done"))))
            await until_state(tb, name, task_pb2.TASK_STATE_SUCCEEDED, 10)
            async with asyncio.timeout(10):
                # Until the result has freed the agent's slot (a counter, not an event).
                while a.scheduler.in_flight_local():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            go_on.set()
        assert recon.result() == 0, "a lease reported during the pass is no orphan"

        # Stream responses keep their order: whatever the pass sent comes before
        # the ack of a report made after it.
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=name, fencing_token=first.fencing_token + 100, output=js("probe"))))
        while True:
            msg = await asyncio.wait_for(work.read(), 10)
            assert msg is not grpc.aio.EOF
            kind = msg.WhichOneof("kind")
            assert kind not in ("assignment", "assignments"), (
                f"the reported lease was handed over again: {msg}")
            if kind == "ack":
                break
        assert [x for s in spies for x in s.leases if x[0] == task_id] == [
            (task_id, first.fencing_token)]
        close(agent)

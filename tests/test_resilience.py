"""Resilience engine end to end: timeouts, breakers, fallback, limits, error types.

In-process workers send no heartbeats, so these meshes use a long heartbeat
interval (agent loss has its own tests); the gRPC ones use the shared fixture.

Agents here are in-process work sessions on the scheduler (what the gRPC
servicer builds), plus raw gRPC stubs where the wire matters. Nothing sleeps
for a fixed time: each test awaits the assignment or state change it expects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.v1 import common_pb2, task_pb2, task_pb2_grpc

from server.app import Mesh, running_server
from server.domain.models import (
    Agent,
    Capability,
    Payload,
    RetryPolicy,
    Task,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowState,
    WorkflowStep,
)
from server.services.dispatch import FAIR_STEP
from server.services.sessions import (
    Assignment,
    Cancellation,
    HeartbeatSession,
    Outbound,
    ReportOutcome,
    WorkerSession,
)
from tests._services import require_nats, require_redis, unique_prefix
from tests.conftest import embedded_settings
from tests.test_protocol import RawAgent, js, next_kind

FAST_RETRY = RetryPolicy(max_attempts=10, initial_backoff=0.01, max_backoff=0.02)


class Worker:
    """A registered agent with a work session on one replica; outbound in a queue."""

    def __init__(self, mesh: Mesh, name: str, caps: tuple[str, ...], concurrency: int = 1,
                 labels: dict[str, str] | None = None) -> None:
        self.mesh = mesh
        self.name = name
        self.caps = caps
        self.concurrency = concurrency
        self.labels = labels or {}
        self.inbox: asyncio.Queue[Outbound] = asyncio.Queue()
        self.session: WorkerSession | None = None
        self.heartbeat: HeartbeatSession | None = None
        self._beats: asyncio.Task[None] | None = None

    async def start(self) -> Worker:
        """Register and open the work session with full credits."""
        agent = await self.mesh.registry.register(Agent(
            id="", display_name=self.name, capabilities=tuple(Capability(c) for c in self.caps),
            max_concurrency=self.concurrency, labels=self.labels))
        self.session = WorkerSession(agent.id, agent.namespace, self.caps, self.concurrency,
                                     self.inbox.put_nowait)
        # A work session needs a live heartbeat session: attach one and keep beating.
        self.heartbeat = HeartbeatSession(agent.id, lambda _reason, _grace, _leave: None,
                                          self.inbox.put_nowait)
        await self.mesh.registry.attach(self.heartbeat)
        self._beats = asyncio.create_task(self._beat(agent.id))
        await self.mesh.scheduler.open_session(self.session)
        self.mesh.scheduler.grant(self.session, self.concurrency)
        return self

    async def _beat(self, agent_id: str) -> None:
        interval = self.mesh.registry.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            await self.mesh.registry.beat(agent_id, 0, 0.0)

    @property
    def id(self) -> str:
        """Agent id."""
        assert self.session is not None
        return self.session.agent_id

    async def next(self, kind: type = Assignment, timeout: float = 5.0) -> Outbound:  # noqa: ASYNC109
        """The next outbound message of a kind."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.inbox.get()
                if isinstance(item, kind):
                    return item

    async def assignment(self, timeout: float = 5.0) -> Assignment:  # noqa: ASYNC109
        """The next assignment."""
        item = await self.next(Assignment, timeout)
        assert isinstance(item, Assignment)
        return item

    async def succeed(self, a: Assignment, out: bytes = b"ok") -> int:
        """Report success and take one more task."""
        assert self.session is not None
        outcome = await self.mesh.scheduler.report_result(
            self.session, a.lease.task.id, a.lease.fencing_token, Payload(out))
        self.mesh.scheduler.grant(self.session, 1)
        return outcome

    async def fail(self, a: Assignment, error_type: str = "Flaky", *,
                   non_retryable: bool = False) -> int:
        """Report a failure and take one more task."""
        assert self.session is not None
        outcome = await self.mesh.scheduler.report_failure(
            self.session, a.lease.task.id, a.lease.fencing_token,
            TaskFailure(error_type, "boom", non_retryable))
        self.mesh.scheduler.grant(self.session, 1)
        return outcome

    async def stop(self) -> None:
        """Close the session (its leases go back to the queue)."""
        if self._beats is not None:
            self._beats.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._beats
        if self.session is not None:
            await self.mesh.scheduler.close_session(self.session)
            await self.mesh.registry.mark_gone(self.id, "test done")


async def wait_state(mesh: Mesh, task_id: str, *states: TaskState,
                     timeout: float = 5.0) -> Task:  # noqa: ASYNC109
    """Wait (on task events) until a task is in one of ``states``."""
    async with asyncio.timeout(timeout):
        watch = mesh.scheduler.watch_tasks("default", names=frozenset({task_id}))
        task = await mesh.scheduler.get_task(task_id)
        if task.state in states:
            return task
        async for task in watch:
            if task.state in states:
                return task
    raise AssertionError("unreachable")


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    """An embedded mesh with fast breakers."""
    settings = embedded_settings(breaker_fail_max=2, breaker_reset_timeout=0.4,
                                 heartbeat_interval=10.0)
    async with running_server(settings) as running:
        yield running


# -- timeouts ----------------------------------------------------------------------


async def test_heartbeat_timeout_moves_the_task_and_refuses_the_late_result(mesh: Mesh) -> None:
    hung = await Worker(mesh, "hung", ("hb",)).start()
    task = await mesh.scheduler.submit(Task(id="", capability="hb", heartbeat_timeout=0.3,
                                            execution_timeout=60, retry_policy=FAST_RETRY))
    first = await hung.assignment()
    assert first.lease.deadline <= first.lease.task.start_time + 0.3 + 1e-6
    healthy = await Worker(mesh, "healthy", ("hb",)).start()
    # No progress from `hung`: its lease ends and `healthy` gets attempt 2.
    second = await healthy.assignment()
    assert second.lease.task.id == task.id
    assert second.lease.fencing_token > first.lease.fencing_token
    cancel = await hung.next(Cancellation)
    assert isinstance(cancel, Cancellation) and cancel.task_id == task.id
    assert await hung.succeed(first, b"late") == ReportOutcome.STALE_LEASE
    assert await healthy.succeed(second, b"fresh") == ReportOutcome.ACCEPTED
    done = await mesh.scheduler.get_task(task.id)
    assert done.state is TaskState.SUCCEEDED and done.output == Payload(b"fresh")
    assert done.attempts[0].failure is not None
    assert done.attempts[0].failure.error_type == "HEARTBEAT_TIMEOUT"


async def test_progress_keeps_a_heartbeat_lease_alive(mesh: Mesh) -> None:
    worker = await Worker(mesh, "alive", ("hb2",)).start()
    task = await mesh.scheduler.submit(Task(id="", capability="hb2", heartbeat_timeout=0.3,
                                            execution_timeout=60))
    a = await worker.assignment()
    assert worker.session is not None
    loop = asyncio.get_running_loop()
    end = loop.time() + 0.9  # three heartbeat timeouts
    while loop.time() < end:
        assert await mesh.scheduler.report_progress(worker.session, task.id,
                                                    a.lease.fencing_token)
        await asyncio.sleep(0.1)  # the agent's progress cadence, not a wait for an event
    assert (await mesh.scheduler.get_task(task.id)).state is TaskState.RUNNING
    assert await worker.succeed(a) == ReportOutcome.ACCEPTED


async def test_schedule_to_start_timeout_fails_the_step_and_cancels_dependents(
        mesh: Mesh) -> None:
    wf = await mesh.scheduler.submit_workflow(Workflow(id="", steps=(
        WorkflowStep("a", "nobody-offers-this", schedule_to_start_timeout=0.2),
        WorkflowStep("b", "nobody-offers-this", depends_on=("a",)))))
    a = await wait_state(mesh, wf.step_tasks["a"], TaskState.FAILED)
    assert a.failure is not None and a.failure.error_type == "SCHEDULE_TO_START_TIMEOUT"
    assert a.failure.non_retryable and len(a.attempts) == 0
    got, steps = await mesh.scheduler.get_workflow(wf.id)
    assert got.state is WorkflowState.FAILED
    assert steps["b"].state is TaskState.CANCELLED


# -- breakers and fallback -----------------------------------------------------------


async def test_breaker_opens_fallback_serves_probe_closes(mesh: Mesh) -> None:
    board = mesh.scheduler.breakers
    flaky = await Worker(mesh, "flaky", ("primary",)).start()
    backup = await Worker(mesh, "backup", ("backup",)).start()
    t1 = await mesh.scheduler.submit(Task(id="", capability="primary",
                                          fallback_capability="backup", retry_policy=FAST_RETRY))
    # Two consecutive failures (fail_max=2) open flaky's breaker for "primary".
    for _ in range(2):
        a = await flaky.assignment()
        assert a.lease.task.id == t1.id and not a.lease.task.served_by_fallback
        await flaky.fail(a)
    assert board.state(flaky.id, "primary") == "open"
    # The only primary agent is open: the fallback agent takes the retry.
    fb = await backup.assignment()
    assert fb.lease.task.id == t1.id and fb.lease.task.served_by_fallback
    assert await backup.succeed(fb) == ReportOutcome.ACCEPTED
    assert (await mesh.scheduler.get_task(t1.id)).served_by_fallback
    # After the reset timeout ONE probe goes to flaky; its success closes the breaker.
    t2 = await mesh.scheduler.submit(Task(id="", capability="primary"))
    t3 = await mesh.scheduler.submit(Task(id="", capability="primary"))
    probe = await flaky.assignment(timeout=3)
    assert probe.lease.task.id == t2.id and not probe.lease.task.served_by_fallback
    assert board.state(flaky.id, "primary") == "half-open"
    assert not board.allows(flaky.id, "primary"), "one probe at a time"
    assert await flaky.succeed(probe) == ReportOutcome.ACCEPTED
    assert board.state(flaky.id, "primary") == "closed"
    nxt = await flaky.assignment()
    assert nxt.lease.task.id == t3.id
    await flaky.succeed(nxt)
    assert mesh.metrics.breaker_state.labels(flaky.id, "primary")._value.get() == 0


async def test_failed_probe_reopens(mesh: Mesh) -> None:
    board = mesh.scheduler.breakers
    flaky = await Worker(mesh, "flaky2", ("p2",)).start()
    task = await mesh.scheduler.submit(Task(id="", capability="p2", retry_policy=FAST_RETRY))
    for _ in range(2):
        await flaky.fail(await flaky.assignment())
    assert board.state(flaky.id, "p2") == "open"
    probe = await flaky.assignment(timeout=3)
    assert probe.lease.task.id == task.id
    await flaky.fail(probe)
    assert board.state(flaky.id, "p2") == "open"
    again = await flaky.assignment(timeout=3)  # the next probe, one reset timeout later
    await flaky.succeed(again)
    assert board.state(flaky.id, "p2") == "closed"


async def test_non_retryable_failures_do_not_trip_the_breaker(mesh: Mesh) -> None:
    worker = await Worker(mesh, "strict", ("nr",)).start()
    for _ in range(3):
        await mesh.scheduler.submit(Task(id="", capability="nr"))
        await worker.fail(await worker.assignment(), "BadInput", non_retryable=True)
    assert mesh.scheduler.breakers.state(worker.id, "nr") == "closed"


async def test_fallback_when_no_primary_agent_is_live(mesh: Mesh) -> None:
    backup = await Worker(mesh, "only-backup", ("fbcap",)).start()
    task = await mesh.scheduler.submit(Task(id="", capability="gone-cap",
                                            fallback_capability="fbcap"))
    a = await backup.assignment()
    assert a.lease.task.id == task.id and a.lease.task.served_by_fallback
    await backup.succeed(a)


async def test_non_retryable_error_types_end_to_end(channel: grpc.aio.Channel) -> None:
    """A policy-listed error type ends the task as FAILED after one attempt (over gRPC)."""
    agent = RawAgent(channel, "typed", ["typed"], concurrency=1)
    await agent.register()
    work = agent.open_work()
    await next_kind(work, "opened")
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
        capability="typed", input=js(1), retry_policy=common_pb2.RetryPolicy(
            max_attempts=5, non_retryable_error_types=["BadInput"]))))
    a = (await next_kind(work, "assignment")).assignment
    done = await tasks.CompleteTask(task_pb2.CompleteTaskRequest(
        task=sub.task.name, fencing_token=a.fencing_token,
        failure=task_pb2.TaskFailure(error_type="BadInput", message="no")))
    assert done.task.state == task_pb2.TASK_STATE_FAILED
    assert done.task.failure.error_type == "BadInput" and len(done.task.attempts) == 1
    # Any other type is retried.
    sub2 = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
        capability="typed", input=js(2), retry_policy=common_pb2.RetryPolicy(
            max_attempts=5, non_retryable_error_types=["BadInput"]))))
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(credit=task_pb2.TaskCredit(count=1)))
    a2 = (await next_kind(work, "assignment")).assignment
    assert a2.task.name == sub2.task.name
    again = await tasks.CompleteTask(task_pb2.CompleteTaskRequest(
        task=sub2.task.name, fencing_token=a2.fencing_token,
        failure=task_pb2.TaskFailure(error_type="Timeout", message="later")))
    assert again.task.state in (task_pb2.TASK_STATE_RETRYING, task_pb2.TASK_STATE_QUEUED,
                                task_pb2.TASK_STATE_RUNNING)
    agent.out.put_nowait(None)
    agent.hb_out.put_nowait(None)


async def test_timeouts_travel_in_the_protos(channel: grpc.aio.Channel) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
        capability="proto-cap", schedule_to_start_timeout={"seconds": 30},
        heartbeat_timeout={"seconds": 2, "nanos": 500_000_000})))
    assert sub.task.schedule_to_start_timeout.seconds == 30
    assert sub.task.heartbeat_timeout.ToNanoseconds() == 2_500_000_000
    wf = await tasks.SubmitWorkflow(task_pb2.SubmitWorkflowRequest(workflow=task_pb2.Workflow(
        steps=[task_pb2.WorkflowStep(id="s", capability="proto-cap",
                                     heartbeat_timeout={"seconds": 3},
                                     schedule_to_start_timeout={"seconds": 4})])))
    step = wf.workflow.steps[0]
    assert step.heartbeat_timeout.seconds == 3 and step.schedule_to_start_timeout.seconds == 4
    got = await tasks.GetTask(task_pb2.GetTaskRequest(name=step.task))
    assert got.task.heartbeat_timeout.seconds == 3


# -- fairness and protection ----------------------------------------------------------


# -- routing -----------------------------------------------------------------------


async def leased_to(mesh: Mesh, tasks: list[Task], *workers: Worker) -> list[int]:
    """Wait until every task runs; how many each worker was handed."""
    for t in tasks:
        await wait_state(mesh, t.id, TaskState.RUNNING)
    return [sum(isinstance(w.inbox.get_nowait(), Assignment) for _ in range(w.inbox.qsize()))
            for w in workers]


@pytest.mark.parametrize(("concurrency", "burst"), [
    ((32, 32), 10),    # equal agents share a burst
    ((8, 8, 8), 9),
    ((32, 32), 40),    # more than one step each: the step grows, the spread stays
    ((4, 12), 8),      # loads are shares of each agent's concurrency
])
async def test_a_burst_is_spread_over_the_least_loaded_agents(
        mesh: Mesh, concurrency: tuple[int, ...], burst: int) -> None:
    """Every idle agent gets work, and loads end within two steps of each other
    (leases go in steps of FAIR_STEP that double while work is plentiful)."""
    workers = [await Worker(mesh, f"w{i}", ("lb",), concurrency=c).start()
               for i, c in enumerate(concurrency)]
    tasks = await mesh.scheduler.submit_many([(Task(id="", capability="lb"), "")] * burst)
    got = await leased_to(mesh, tasks, *workers)
    assert sum(got) == burst and min(got) >= 1, got
    loads = [n / c for n, c in zip(got, concurrency, strict=True)]
    fair = burst / sum(concurrency)
    assert all(abs(load - fair) * c <= 2 * FAIR_STEP
               for load, c in zip(loads, concurrency, strict=True)), (got, fair)
    for w in workers:
        await w.stop()


async def test_the_next_task_goes_to_the_idle_agent(mesh: Mesh) -> None:
    busy = await Worker(mesh, "busy", ("lb",), concurrency=8).start()
    first = await mesh.scheduler.submit_many([(Task(id="", capability="lb"), "")] * 3)
    assert await leased_to(mesh, first, busy) == [3]
    idle = await Worker(mesh, "idle", ("lb",), concurrency=8).start()
    for _ in range(2):  # one at a time: each goes to the lighter of the two
        nxt = await mesh.scheduler.submit(Task(id="", capability="lb"))
        assert await leased_to(mesh, [nxt], busy, idle) == [0, 1]
    # a rival that offers other capabilities only does not count
    other = await Worker(mesh, "other", ("elsewhere",), concurrency=8).start()
    burst = await mesh.scheduler.submit_many([(Task(id="", capability="lb"), "")] * 4)
    assert await leased_to(mesh, burst, busy, idle, other) == [2, 2, 0]
    for w in (busy, idle, other):
        await w.stop()


async def test_capability_and_key_limits_hold_in_the_dispatcher() -> None:
    settings = embedded_settings(capability_limits={"lim": 2}, key_label="tenant",
                                 key_limits={"big": 1}, heartbeat_interval=10.0)
    async with running_server(settings) as m:
        worker = await Worker(m, "wide", ("lim",), concurrency=8).start()
        for i in range(3):
            await m.scheduler.submit(Task(id="", capability="lim", labels={"tenant": "big"},
                                          input=Payload(str(i).encode())))
        await m.scheduler.submit(Task(id="", capability="lim", labels={"tenant": "small"}))
        first = [await worker.assignment(), await worker.assignment()]
        tenants = sorted(a.lease.task.labels["tenant"] for a in first)
        assert tenants == ["big", "small"], "one 'big' at a time, and at most 2 running"
        with pytest.raises(TimeoutError):
            await worker.assignment(timeout=0.3)  # waiting *is* the assertion here
        done = next(a for a in first if a.lease.task.labels["tenant"] == "big")
        await worker.succeed(done)
        nxt = await worker.assignment()
        assert nxt.lease.task.labels["tenant"] == "big"
        await worker.stop()


async def test_rate_limit_spaces_leases() -> None:
    async with running_server(embedded_settings(capability_rates={"rl": 10.0},
                                                    heartbeat_interval=10.0)) as m:
        worker = await Worker(m, "rater", ("rl",), concurrency=64).start()
        for _ in range(20):
            await m.scheduler.submit(Task(id="", capability="rl"))
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(20):
            await worker.assignment()
        elapsed = loop.time() - start
        # Burst of 10, then 10 more at 10/s: about one second, never much less.
        assert elapsed >= 0.8, elapsed
        await worker.stop()


# -- across replicas ------------------------------------------------------------------


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[Mesh, Mesh]]:
    """Two replicas on one Redis prefix and NATS, with fast breakers and limits."""
    redis_url, nats_url = require_redis(), require_nats()
    prefix = unique_prefix("res")
    settings = embedded_settings(store=redis_url, bus=nats_url, key_prefix=prefix,
                                 breaker_fail_max=2, breaker_reset_timeout=30.0,
                                 capability_limits={"shared-lim": 1}, heartbeat_interval=10.0)
    async with running_server(settings) as a, running_server(settings) as b:
        yield a, b
    from server.backends.redis import RedisStores  # noqa: PLC0415

    stores = await RedisStores.connect(redis_url, prefix=prefix)
    await stores.delete_all_keys()
    await stores.aclose()


async def test_breaker_opened_on_a_is_open_on_b_and_fallback_runs_on_b(
        replicas: tuple[Mesh, Mesh]) -> None:
    a, b = replicas
    flaky = await Worker(a, "flaky-a", ("rprim",)).start()
    backup = await Worker(b, "backup-b", ("rfb",)).start()
    task = await b.scheduler.submit(Task(id="", capability="rprim", fallback_capability="rfb",
                                         retry_policy=FAST_RETRY))
    for _ in range(2):
        got = await flaky.assignment()
        assert got.lease.task.id == task.id
        await flaky.fail(got)
    fb = await backup.assignment()
    assert fb.lease.task.id == task.id and fb.lease.task.served_by_fallback
    assert b.scheduler.breakers.state(flaky.id, "rprim") == "open"
    assert await backup.succeed(fb) == ReportOutcome.ACCEPTED
    await flaky.stop()
    await backup.stop()


async def test_capability_limit_holds_across_replicas(replicas: tuple[Mesh, Mesh]) -> None:
    a, b = replicas
    wa = await Worker(a, "la", ("shared-lim",), concurrency=4).start()
    wb = await Worker(b, "lb", ("shared-lim",), concurrency=4).start()
    for _ in range(4):
        await a.scheduler.submit(Task(id="", capability="shared-lim"))
    done: list[Assignment] = []

    async def pull(w: Worker) -> None:
        while len(done) < 4:
            try:
                got = await w.assignment(timeout=0.5)
            except TimeoutError:
                continue
            running = (await a.scheduler.stats("default")).tasks_by_state.get(
                TaskState.RUNNING, 0)
            assert running <= 1, "the limit of 1 RUNNING holds across replicas"
            done.append(got)
            await w.succeed(got)

    async with asyncio.timeout(15):
        await asyncio.gather(pull(wa), pull(wb))
    assert len({x.lease.task.id for x in done}) == 4
    await wa.stop()
    await wb.stop()

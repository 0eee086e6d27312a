"""The task queue's use cases for one replica: the facade the servicers call.

The store is the source of truth. This module holds the client-side use
cases (submit, cancel, re-drive, reads) and composes the parts that do the
rest, each in a file of its own:

- ``task_events.py``: what changed goes out (bus, observer, logs, wake-ups);
- ``sessions.py``: the agent streams attached to this replica;
- ``leases.py``: agent liveness and every way a lease ends (the one owner);
- ``dispatch.py``: QUEUED work to local sessions, least loaded first;
- ``watches.py``: task and workflow changes streamed to clients.

Other replicas learn about new work, cancellations and agent changes through
the bus (``server/services/events.py``), so an agent connected to one replica
receives tasks submitted on another. Periodic jobs (lease reaper, agent
expiry, retry timers) run on every replica: each store operation is atomic
and fenced, so two replicas doing the same job at once cannot double-apply it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from server.aio import cancel_and_wait, raise_if_cancelling
from server.domain import human
from server.domain.dag import validate_dag
from server.domain.errors import (
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    StaleLeaseError,
    UnavailableError,
)
from server.domain.limits import NO_LIMITS, DispatchLimits
from server.domain.models import (
    Payload,
    Stats,
    Task,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowState,
    evolve_task,
)
from server.ports import AgentRegistry, Bus, Subscription, TaskFilter, TaskStore, Transition
from server.services import events
from server.services.breakers import BreakerBoard, BreakerConfig
from server.services.clock import Clock
from server.services.dispatch import DispatchConfig, Dispatcher
from server.services.leases import (
    AGENT_GONE,
    LeaseConfig,
    Leases,
    counts_against_agent,
    served_capability,
)
from server.services.live import LiveCapabilities
from server.services.sessions import (
    Assignment,
    Cancellation,
    Outbound,
    ReportAck,
    ReportOutcome,
    SessionEnded,
    SessionTable,
    WorkerSession,
)
from server.services.submits import SubmitBatcher
from server.services.task_events import NullObserver, SchedulerObserver, TaskEvents
from server.services.watches import Watches

log = logging.getLogger(__name__)

RECONCILE_PERIOD = 1.0
"""Seconds between checks for leases that never reached their agent, for local
sessions whose agent is no longer live in the store, and for lost wake-ups."""
DRAINING = "DRAINING"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Tunables of the scheduler (built from server settings)."""

    default_execution_timeout: float = 300.0
    max_queued_per_namespace: int = 100_000
    max_workflow_steps: int = 1000
    tick: float = 0.05
    reap_batch: int = 500
    limits: DispatchLimits = NO_LIMITS
    """Per-capability / per-key concurrency and per-capability rate limits."""
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    """Circuit-breaker thresholds per (agent, capability)."""
    heartbeat_interval: float = 1.0
    """How often agents beat; after ``heartbeat_misses`` silent intervals an agent is GONE."""
    heartbeat_misses: int = 3
    gone_retention: float = 600.0
    """How long a GONE agent stays readable before it is purged."""
    drain_grace: float = 10.0
    """Grace period of an agent drained by an operator (the server's drain grace)."""


class Scheduler:
    """The task queue's use cases for one replica."""

    def __init__(self, tasks: TaskStore, agents: AgentRegistry, bus: Bus, clock: Clock, *,
                 config: SchedulerConfig | None = None,
                 observer: SchedulerObserver | None = None,
                 release_locks: Callable[[str], Awaitable[object]] | None = None) -> None:
        self._tasks = tasks
        self._agents = agents
        self._bus = bus
        self._clock = clock
        self.config = cfg = config or SchedulerConfig()
        replica = uuid.uuid4().hex[:12]
        self._replica = replica
        work_ready = asyncio.Event()
        self._wake = work_ready
        self.events = TaskEvents(bus, observer or NullObserver(), work_ready, replica)
        self.breakers = BreakerBoard(bus, cfg.breaker, on_change=self._breaker_changed,
                                     replica=replica, clock=clock)
        self.sessions = SessionTable()
        self._submits = SubmitBatcher(tasks)
        live = LiveCapabilities(agents, clock)
        self.leases = Leases(
            tasks, agents, bus, clock, sessions=self.sessions, task_events=self.events,
            breakers=self.breakers, live=live, work_ready=work_ready,
            config=LeaseConfig(default_execution_timeout=cfg.default_execution_timeout,
                               reap_batch=cfg.reap_batch,
                               heartbeat_interval=cfg.heartbeat_interval,
                               heartbeat_misses=cfg.heartbeat_misses,
                               gone_retention=cfg.gone_retention,
                               drain_grace=cfg.drain_grace),
            release_locks=release_locks)
        self.dispatcher = Dispatcher(
            tasks, agents, clock, sessions=self.sessions, leases=self.leases,
            task_events=self.events, breakers=self.breakers, live=live, work_ready=work_ready,
            config=DispatchConfig(default_execution_timeout=cfg.default_execution_timeout,
                                  limits=cfg.limits, tick=cfg.tick))
        self.watches = Watches(tasks, bus, self.events, self.get_workflow)
        self._runner: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._last_reconcile = 0.0

    @property
    def _observer(self) -> SchedulerObserver:
        return self.events.observer

    @_observer.setter
    def _observer(self, value: SchedulerObserver) -> None:  # tests wrap it with a spy
        self.events.observer = value

    @property
    def draining(self) -> bool:
        """The server is shutting down: no new work is accepted or leased here."""
        return self.dispatcher.draining

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the dispatcher, the timers and the bus listeners."""
        ready = await self._bus.subscribe(events.READY_ALL)
        cancels = await self._bus.subscribe(events.CANCEL_SUBJECT)
        agents = await self._bus.subscribe(events.AGENT_STATE_ALL)
        await self.breakers.start()
        self._runner = asyncio.create_task(self._run(ready, cancels, agents), name="scheduler")
        await self._started.wait()

    async def _run(self, ready: Subscription, cancels: Subscription,
                   agents: Subscription) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.dispatcher.run(), name="dispatch")
                group.create_task(self._maintenance_loop(), name="maintenance")
                group.create_task(self._expiry_loop(), name="agent-expiry")
                group.create_task(self._ready_listener(ready), name="ready-listener")
                group.create_task(self._cancel_listener(cancels), name="cancel-listener")
                group.create_task(self._agent_listener(agents), name="agent-listener")
                self._started.set()
        finally:
            await ready.unsubscribe()
            await cancels.unsubscribe()
            await agents.unsubscribe()

    async def stop(self) -> None:
        """Stop every loop. Safe to repeat."""
        await self.breakers.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await cancel_and_wait(runner)

    def kick(self) -> None:
        """Wake the dispatcher."""
        self._wake.set()

    # -- client side ---------------------------------------------------------------

    def _accepting(self) -> None:
        """UNAVAILABLE while draining: a client fails over instead of losing its task."""
        if self.dispatcher.draining:
            raise UnavailableError(
                "this server is shutting down and accepts no new work; retry on another "
                "replica", reason=DRAINING)

    async def submit(self, task: Task, *, request_id: str = "") -> Task:
        """Queue a task (idempotent on request_id; a taken id is ALREADY_EXISTS).

        Concurrent submits share store calls (``server/services/submits.py``):
        each gets the answer its own ``create_task`` would have given.
        """
        self._accepting()
        now = self._clock.now()
        client_id = bool(task.id)
        task = replace(human.prepare(task), id=task.id or uuid.uuid4().hex, state=TaskState.QUEUED,
                       create_time=now, update_time=now)
        stored, created, transition = await self._submits.create(
            task, request_id=request_id, client_id=client_id,
            max_queued=self.config.max_queued_per_namespace)
        if created:
            await self.events.after(transition, now)
        return stored

    async def submit_many(self, items: Sequence[tuple[Task, str]]) -> list[Task]:
        """Queue several tasks (task, request_id) in one store step, in order.

        A client-chosen id that is taken refuses the whole batch (ALREADY_EXISTS,
        nothing queued). A full queue raises ResourceExhaustedError after the
        tasks before the one that did not fit were queued; the error's metadata
        names them.
        """
        self._accepting()
        now = self._clock.now()
        prepared = [(evolve_task(human.prepare(task), id=task.id or uuid.uuid4().hex,
                                 state=TaskState.QUEUED,
                                 create_time=now, update_time=now), rid) for task, rid in items]
        results, full = await self._tasks.create_tasks(
            prepared, max_queued=self.config.max_queued_per_namespace)
        changes = tuple(c for _, created, tr in results if created for c in tr.tasks)
        if changes:
            await self.events.after(Transition(changes), now)
        if full:
            error = ResourceExhaustedError(
                f"the namespace's queue is full after {len(results)} of {len(items)} tasks",
                retry_after=1.0, reason="QUEUE_FULL")
            error.metadata["queued"] = ",".join(f"tasks/{t.id}" for t, _, _ in results)[:4000]
            raise error
        return [t for t, _, _ in results]

    async def submit_workflow(self, workflow: Workflow, *, request_id: str = "") -> Workflow:
        """Validate a DAG (cycles are refused) and start it."""
        self._accepting()
        validate_dag(workflow.steps, self.config.max_workflow_steps)
        now = self._clock.now()
        wf_id = workflow.id or uuid.uuid4().hex
        step_tasks = {s.id: f"{wf_id}-{s.id}" for s in workflow.steps}
        tasks = [human.prepare(
            Task(id=step_tasks[s.id], capability=s.capability, namespace=workflow.namespace,
                 input=s.input, priority=s.priority, labels=dict(workflow.labels),
                 retry_policy=s.retry_policy, execution_timeout=s.timeout,
                 fallback_capability=s.fallback_capability, workflow_id=wf_id, step_id=s.id,
                 depends_on=s.depends_on, create_time=now, update_time=now,
                 schedule_to_start_timeout=s.schedule_to_start_timeout,
                 heartbeat_timeout=s.heartbeat_timeout,
                 state=TaskState.PENDING if s.depends_on else TaskState.QUEUED,
                 trace_context=dict(workflow.trace_context)))
            for s in workflow.steps
        ]
        wf = replace(workflow, id=wf_id, step_tasks=step_tasks, state=WorkflowState.RUNNING,
                     create_time=now)
        stored, created, transition = await self._tasks.create_workflow(
            wf, tasks, request_id=request_id, max_queued=self.config.max_queued_per_namespace)
        if created:
            await self.events.after(transition, now)
        return stored

    async def get_task(self, task_id: str) -> Task:
        """One task (NotFoundError)."""
        task = await self._tasks.get_task(task_id)
        if task is None:
            raise NotFoundError("task", f"tasks/{task_id}")
        return task

    async def list_tasks(self, flt: TaskFilter, *, before_seq: int, limit: int) -> list[Task]:
        """A page of tasks, newest first."""
        return await self._tasks.list_tasks(flt, before_seq=before_seq, limit=limit)

    async def scan_tasks(self, flt: TaskFilter, *, before_seq: int, limit: int,
                         max_scan: int) -> tuple[list[Task], int]:
        """A page of tasks reading at most ``max_scan`` (see ``TaskStore.scan_tasks``)."""
        return await self._tasks.scan_tasks(flt, before_seq=before_seq, limit=limit,
                                            max_scan=max_scan)

    async def get_workflow(self, workflow_id: str) -> tuple[Workflow, dict[str, Task]]:
        """A workflow and its step tasks by step id (NotFoundError)."""
        wf = await self._tasks.get_workflow(workflow_id)
        if wf is None:
            raise NotFoundError("workflow", f"workflows/{workflow_id}")
        ids = list(wf.step_tasks.items())
        found = await self._tasks.get_tasks([task_id for _, task_id in ids])
        return wf, {step_id: task for (step_id, _), task in zip(ids, found, strict=True)
                    if task is not None}

    async def list_workflows(self, namespace: str, state: WorkflowState | None, *,
                             before_seq: int, limit: int) -> list[Workflow]:
        """A page of workflows, newest first."""
        return await self._tasks.list_workflows(namespace, state, before_seq=before_seq,
                                                limit=limit)

    async def cancel(self, task_id: str, reason: str) -> Task:
        """Cancel a task; a running attempt is told to stop."""
        now = self._clock.now()
        before = await self.get_task(task_id)
        transition = await self._tasks.cancel_task(task_id, reason, now=now)
        await self.events.after(transition, now)
        await self.events.stop_running([before], reason or "cancelled")
        return await self.get_task(task_id)

    async def cancel_workflow(self, workflow_id: str, reason: str) -> Workflow:
        """Cancel every step that has not ended."""
        now = self._clock.now()
        _, steps = await self.get_workflow(workflow_id)
        transition = await self._tasks.cancel_workflow(workflow_id, reason, now=now)
        await self.events.after(transition, now)
        await self.events.stop_running(list(steps.values()), reason or "workflow cancelled")
        wf, _ = await self.get_workflow(workflow_id)
        return wf

    async def retry(self, task_id: str, new_input: Payload | None) -> Task:
        """A human re-drives a task that ended without success."""
        now = self._clock.now()
        transition = await self._tasks.redrive(task_id, new_input, now=now)
        await self.events.after(transition, now)
        return await self.get_task(task_id)

    async def stats(self, namespace: str) -> Stats:
        """Counts by state and the autonomy figures."""
        return await self._tasks.stats(namespace)

    async def live_capabilities(self, namespace: str) -> frozenset[str]:
        """Capabilities some ACTIVE agent offers now."""
        return await self._agents.live_capabilities(namespace)

    async def watch_tasks(self, namespace: str, *, names: frozenset[str] = frozenset(),
                          capability: str = "", workflow_id: str = "",
                          states: frozenset[int] = frozenset(),
                          max_pending: int = 10_000) -> AsyncIterator[Task]:
        """Tasks after each change that matches the filter (current version)."""
        batches = self.watches.task_batches(namespace, names=names, capability=capability,
                                            workflow_id=workflow_id, states=states,
                                            max_pending=max_pending, max_batch=1)
        try:
            async for batch in batches:
                for task in batch:
                    yield task
        finally:
            await batches.aclose()

    def watch_task_batches(self, namespace: str, *, names: frozenset[str] = frozenset(),
                           capability: str = "", workflow_id: str = "",
                           states: frozenset[int] = frozenset(), max_pending: int = 10_000,
                           max_batch: int = 1) -> AsyncGenerator[list[Task], None]:
        """See ``Watches.task_batches``."""
        return self.watches.task_batches(namespace, names=names, capability=capability,
                                         workflow_id=workflow_id, states=states,
                                         max_pending=max_pending, max_batch=max_batch)

    def watch_workflow(self, workflow_id: str, *, max_pending: int = 10_000,
                       ) -> AsyncIterator[tuple[Workflow, dict[str, Task]]]:
        """See ``Watches.workflow``."""
        return self.watches.workflow(workflow_id, max_pending=max_pending)

    # -- agent side ----------------------------------------------------------------

    async def open_session(self, session: WorkerSession) -> None:
        """Attach an agent's work stream (FAILED_PRECONDITION without a live session)."""
        await self.leases.open_worker(session)

    async def close_session(self, session: WorkerSession, reason: str = AGENT_GONE) -> None:
        """The work stream ended: its leases go back to the queue."""
        await self.leases.close_worker(session, reason)

    def grant(self, session: WorkerSession, count: int) -> None:
        """The agent can take ``count`` more tasks (never past its free slots)."""
        self.dispatcher.grant(session, count)

    def drain_sessions(self) -> None:
        """Stop accepting and dispatching work here (server shutdown)."""
        self.dispatcher.draining = True
        for session in self.sessions.workers():
            session.draining = True

    def in_flight_local(self) -> int:
        """Tasks running on agents attached to this replica."""
        return self.sessions.in_flight()

    async def report_result(self, session: WorkerSession | None, task_id: str, token: int,
                            output: Payload) -> int:
        """Accept one result unless its lease is stale; returns a ReportOutcome."""
        return (await self.leases.report_results(session, [(task_id, token, output)]))[0]

    async def report_results(self, session: WorkerSession | None,
                             items: Sequence[tuple[str, int, Payload]]) -> list[int]:
        """Results in one store step; one ReportOutcome each (see ``Leases``)."""
        return await self.leases.report_results(session, items)

    async def report_failure(self, session: WorkerSession | None, task_id: str, token: int,
                             failure: TaskFailure) -> int:
        """Record a failed attempt and schedule what the retry policy says."""
        return await self.leases.report_failure(session, task_id, token, failure)

    async def report_progress(self, session: WorkerSession | None, task_id: str,
                              token: int) -> bool:
        """Progress renews a running attempt's lease; False when the lease is gone."""
        return await self.leases.renew(session, task_id, token)

    async def complete_unary(self, task_id: str, token: int, output: Payload | None,
                             failure: TaskFailure | None) -> Task:
        """CompleteTask outside the stream.

        ABORTED (StaleLeaseError) when the token is stale and the task still
        live; FAILED_PRECONDITION (``TASK_NOT_RUNNING``) when the task has
        ended (another attempt's result was accepted, or it was cancelled);
        NOT_FOUND for an unknown task.
        """
        task = await self.get_task(task_id)
        session = None
        local = self.sessions.worker(task.agent_id)
        if local is not None and local.in_flight.get(task_id) == token:
            session = local
        if failure is not None:
            outcome = await self.leases.report_failure(session, task_id, token, failure)
        else:
            outcome = (await self.leases.report_results(
                session, [(task_id, token, output or Payload())]))[0]
        if outcome == ReportOutcome.NOT_RUNNING:
            now = await self.get_task(task_id)
            raise FailedPreconditionError(
                f"tasks/{task_id} is {now.state.name}: it is no longer running, so the report "
                f"under fencing token {token} was refused", reason="TASK_NOT_RUNNING",
                metadata={"task": f"tasks/{task_id}", "state": now.state.name,
                          "current_token": str(now.fencing_token)})
        if outcome != ReportOutcome.ACCEPTED:
            now = await self.get_task(task_id)
            raise StaleLeaseError(
                f"tasks/{task_id}: fencing token {token} is stale (the task is "
                f"{now.state.name}, current token {now.fencing_token})",
                metadata={"task": f"tasks/{task_id}", "current_token": str(now.fencing_token)})
        return await self.get_task(task_id)

    async def release_agent(self, agent_id: str, reason: str = AGENT_GONE) -> int:
        """Requeue every task leased to an agent that went away."""
        return await self.leases.requeue_agent(agent_id, reason)

    # -- timers and listeners ----------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        while True:
            raise_if_cancelling()
            await asyncio.sleep(self.config.tick)
            try:
                await self.run_maintenance()
            except Exception:
                log.exception("maintenance pass failed")

    async def _expiry_loop(self) -> None:
        """Agents whose beats stopped are marked GONE within half an interval."""
        while True:
            raise_if_cancelling()
            await asyncio.sleep(self.config.heartbeat_interval / 2)
            try:
                await self.leases.expire_agents()
            except Exception:
                log.exception("agent expiry pass failed")

    async def run_maintenance(self) -> None:
        """One pass: end expired leases, fail tasks past schedule-to-start, promote retries."""
        now = self._clock.now()
        await self.leases.reap()
        timed_out = await self._tasks.expire_queued(now, self.config.reap_batch)
        if timed_out.tasks:
            await self.events.after(timed_out, now)
        promoted = await self._tasks.promote_due(now, self.config.reap_batch)
        if promoted.tasks:
            await self.events.after(promoted, now)
        if self.config.limits.active or self.breakers.any_open():
            self._wake.set()  # limits and half-open breakers free up with time alone
        if now - self._last_reconcile >= RECONCILE_PERIOD:
            self._last_reconcile = now
            await self.leases.check_sessions()
            await self.reconcile(now)
            if any(s.credits > 0 for s in self.sessions.workers()):
                # Wake-ups are notifications that can be lost (bus down, another
                # replica's publish); one re-check a period bounds the delay
                # without a store call per idle agent on every tick.
                self._wake.set()

    async def reconcile(self, now: float) -> int:
        """See ``Dispatcher.reconcile``."""
        return await self.dispatcher.reconcile(now)

    async def _ready_listener(self, sub: Subscription) -> None:
        async for message in sub:
            if message.headers.get(events.ORIGIN_HEADER) == self._replica:
                continue  # the submitting path woke this dispatcher already
            if self._could_take(message.subject, message.data):
                self._wake.set()

    def _could_take(self, subject: str, data: bytes) -> bool:
        """Whether a session here could lease the work another replica announced.

        Only a session with credits that serves one of the announced
        capabilities (primary or fallback) in that namespace can; waking for
        anything else costs every replica a store call per submit and takes
        nothing (throughput fell as replicas were added). A session without
        credits now gets a wake-up of its own when credits come back
        (``Dispatcher.grant``), and the reconcile period re-checks lost
        wake-ups, so skipping one delays nothing that could run here. A
        message this cannot read wakes, as before.
        """
        namespace = events.ready_namespace(subject)
        caps = events.decode(data).get("caps")
        if namespace is None or not isinstance(caps, list):
            return True
        wanted = {c for c in caps if isinstance(c, str)}
        return any(s.credits > 0 and s.namespace == namespace and not wanted.isdisjoint(
            s.capabilities) for s in self.sessions.workers())

    async def _agent_listener(self, sub: Subscription) -> None:
        """Agents joining, leaving or draining: sessions here may end; re-poll.

        Load-only updates travel on another subject and never reach here.
        """
        async for message in sub:
            try:
                await self.leases.agent_event(events.decode(message.data))
            except Exception:
                log.exception("agent event not applied; the reconcile pass will catch up")
            self._wake.set()

    async def _cancel_listener(self, sub: Subscription) -> None:
        async for message in sub:
            body = events.decode(message.data)
            session = self.sessions.worker(str(body.get("agent", "")))
            if session is None:
                continue
            task_id = str(body.get("id", ""))
            token = body.get("token", 0)
            if isinstance(token, int) and session.in_flight.get(task_id) == token:
                del session.in_flight[task_id]
                session.send(Cancellation(task_id, token, str(body.get("reason", ""))))

    def _breaker_changed(self, agent_id: str, capability: str, state: str) -> None:
        self._wake.set()
        with contextlib.suppress(Exception):
            self.events.observer.breaker_changed(agent_id, capability, state)


__all__ = [
    "Assignment",
    "Cancellation",
    "NullObserver",
    "Outbound",
    "ReportAck",
    "ReportOutcome",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerObserver",
    "SessionEnded",
    "WorkerSession",
    "counts_against_agent",
    "served_capability",
]

"""Task and workflow use cases: submit, dispatch, leases, results, timers.

The store is the source of truth; this service owns the local agent work
sessions of this replica and dispatches QUEUED work to them, least-loaded
first. Other replicas learn about new work, cancellations and state changes
through the bus (``server/services/events.py``), so an agent connected to one
replica receives tasks submitted on another.

Periodic jobs (lease reaper, retry timers) run on every replica: each store
operation is atomic and fenced, so two replicas doing the same job at once
cannot double-apply it; the loser's stale-token error is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from server.aio import cancel_and_wait, raise_if_cancelling
from server.domain.dag import validate_dag
from server.domain.errors import (
    AlreadyExistsError,
    NotFoundError,
    ResourceExhaustedError,
    StaleLeaseError,
)
from server.domain.limits import NO_FALLBACK, NO_LIMITS, DispatchLimits, LeaseScope
from server.domain.models import (
    HEARTBEAT_TIMEOUT,
    AgentState,
    Lease,
    Payload,
    Stats,
    Task,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowState,
    evolve_task,
)
from server.domain.retry import RetryVerdict, decide
from server.ports import (
    AgentFilter,
    AgentRegistry,
    Bus,
    FailVerdict,
    Subscription,
    TaskFilter,
    TaskStore,
    Transition,
)
from server.services import events
from server.services.breakers import BreakerBoard, BreakerConfig
from server.services.clock import Clock
from server.services.registry import AgentEventType

log = logging.getLogger(__name__)

LEASE_EXPIRED = "LEASE_EXPIRED"
DISPATCH_BATCH = 16
"""Most leases one agent gets per dispatch pass (one store call)."""
FAIR_STEP = 2
"""Leases an agent may take, in the first lease of a dispatch round for its
work, past the load of the least-loaded other agent that could take the same
work. The step doubles with every lease that comes back full (work is
plentiful) up to DISPATCH_BATCH, so a burst spreads over idle agents to within
a step and a busy fleet still leases in batches."""
RECONCILE_PERIOD = 1.0
"""Seconds between checks for leases that never reached their agent (and for
wake-ups lost on the bus)."""
RECENT_TASKS = 4096
"""Task versions this replica made lately, kept for its own watchers: an event
whose version is here needs no store read (a Redis round trip)."""
ORPHAN_AGE = 2.0
"""A lease this old that its local agent does not hold is an orphan."""
AGENT_GONE = "AGENT_GONE"
LIVE_CACHE_SECONDS = 0.5
"""How long dispatch reuses a namespace's live-capability set. Every agent
join or leave (a bus event, from any replica) and every local work stream
opening or closing drops it at once; the age bound covers a lost event."""


class SchedulerObserver(Protocol):
    """Hooks for metrics and tracing; every method must be cheap and never raise."""

    def transition(self, transition: Transition, now: float) -> None:
        """A store transition happened on this replica."""
        ...

    def dispatched(self, lease: Lease, now: float) -> None:
        """A task was assigned to a local agent."""
        ...

    def stale_result(self, task_id: str) -> None:
        """A result with a stale fencing token was refused."""
        ...

    def breaker_changed(self, agent_id: str, capability: str, state: str) -> None:
        """A circuit breaker changed state (closed, open, half-open)."""
        ...


class NullObserver:
    """Observer that does nothing."""

    def transition(self, transition: Transition, now: float) -> None:
        """Ignore."""

    def dispatched(self, lease: Lease, now: float) -> None:
        """Ignore."""

    def stale_result(self, task_id: str) -> None:
        """Ignore."""

    def breaker_changed(self, agent_id: str, capability: str, state: str) -> None:
        """Ignore."""


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


@dataclass(frozen=True, slots=True)
class Assignment:
    """Outbound: run this task."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class Cancellation:
    """Outbound: stop this task."""

    task_id: str
    fencing_token: int
    reason: str


class ReportOutcome:
    """Outcome names of a reported result (match the proto enum)."""

    ACCEPTED = 1
    STALE_LEASE = 2
    NOT_RUNNING = 3


@dataclass(frozen=True, slots=True)
class ReportAck:
    """Outbound: what became of a reported result or failure."""

    task_id: str
    fencing_token: int
    outcome: int


Outbound = Assignment | Cancellation | ReportAck | None


@dataclass(eq=False)
class WorkerSession:
    """One agent's work stream on this replica."""

    agent_id: str
    namespace: str
    capabilities: tuple[str, ...]
    max_concurrency: int
    send: Callable[[Outbound], None]
    credits: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    closed: bool = False

    @property
    def load(self) -> float:
        """In-flight share of the concurrency limit."""
        return len(self.in_flight) / max(1, self.max_concurrency)


class Scheduler:
    """The task queue's use cases for one replica."""

    def __init__(self, tasks: TaskStore, agents: AgentRegistry, bus: Bus, clock: Clock, *,
                 config: SchedulerConfig | None = None,
                 observer: SchedulerObserver | None = None) -> None:
        self._tasks = tasks
        self._agents = agents
        self._bus = bus
        self._clock = clock
        self.config = config or SchedulerConfig()
        self._observer: SchedulerObserver = observer or NullObserver()
        self._sessions: dict[str, WorkerSession] = {}
        self._wake = asyncio.Event()
        self._replica = uuid.uuid4().hex[:12]
        self._origin = {events.ORIGIN_HEADER: self._replica}
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._last_reconcile = 0.0
        self._live: dict[str, tuple[float, frozenset[str]]] = {}
        self._recent: OrderedDict[str, Task] = OrderedDict()
        self._task_watchers = 0
        self.draining = False
        self.breakers = BreakerBoard(bus, self.config.breaker, on_change=self._breaker_changed,
                                     replica=self._replica)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the dispatcher, the maintenance loop and the bus listeners."""
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
                self._group = group
                group.create_task(self._dispatch_loop(), name="dispatch")
                group.create_task(self._maintenance_loop(), name="maintenance")
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

    async def submit(self, task: Task, *, request_id: str = "") -> Task:
        """Queue a task (idempotent on request_id)."""
        now = self._clock.now()
        chosen = bool(task.id)
        task = replace(task, id=task.id or uuid.uuid4().hex, state=TaskState.QUEUED,
                       create_time=now, update_time=now)
        # Only a client-chosen id can collide; generated ids are random.
        if chosen and not request_id and await self._tasks.get_task(task.id) is not None:
            raise AlreadyExistsError(f"tasks/{task.id} already exists")
        stored, created, transition = await self._tasks.create_task(
            task, request_id=request_id, max_queued=self.config.max_queued_per_namespace)
        if created:
            await self._after(transition, now)
        return stored

    async def submit_many(self, items: Sequence[tuple[Task, str]]) -> list[Task]:
        """Queue several tasks (task, request_id) in one store step, in order.

        Tasks with a client-chosen id go one by one (their ids can collide).
        A full queue raises ResourceExhaustedError after the tasks before the
        one that did not fit were queued; the error's metadata names them.
        """
        now = self._clock.now()
        if any(task.id for task, _ in items):
            return [await self.submit(task, request_id=rid) for task, rid in items]
        prepared = [(evolve_task(task, id=uuid.uuid4().hex, state=TaskState.QUEUED,
                                 create_time=now, update_time=now), rid) for task, rid in items]
        results, full = await self._tasks.create_tasks(
            prepared, max_queued=self.config.max_queued_per_namespace)
        changes = tuple(c for _, created, tr in results if created for c in tr.tasks)
        if changes:
            await self._after(Transition(changes), now)
        if full:
            error = ResourceExhaustedError(
                f"the namespace's queue is full after {len(results)} of {len(items)} tasks",
                retry_after=1.0, reason="QUEUE_FULL")
            error.metadata["queued"] = ",".join(f"tasks/{t.id}" for t, _, _ in results)[:4000]
            raise error
        return [t for t, _, _ in results]

    async def submit_workflow(self, workflow: Workflow, *, request_id: str = "") -> Workflow:
        """Validate a DAG (cycles are refused) and start it."""
        validate_dag(workflow.steps, self.config.max_workflow_steps)
        now = self._clock.now()
        wf_id = workflow.id or uuid.uuid4().hex
        if await self._tasks.get_workflow(wf_id) is not None and not request_id:
            raise AlreadyExistsError(f"workflows/{wf_id} already exists")
        step_tasks = {s.id: f"{wf_id}-{s.id}" for s in workflow.steps}
        tasks = [
            Task(id=step_tasks[s.id], capability=s.capability, namespace=workflow.namespace,
                 input=s.input, priority=s.priority, labels=dict(workflow.labels),
                 retry_policy=s.retry_policy, execution_timeout=s.timeout,
                 fallback_capability=s.fallback_capability, workflow_id=wf_id, step_id=s.id,
                 depends_on=s.depends_on, create_time=now, update_time=now,
                 schedule_to_start_timeout=s.schedule_to_start_timeout,
                 heartbeat_timeout=s.heartbeat_timeout,
                 state=TaskState.PENDING if s.depends_on else TaskState.QUEUED,
                 trace_context=dict(workflow.trace_context))
            for s in workflow.steps
        ]
        wf = replace(workflow, id=wf_id, step_tasks=step_tasks, state=WorkflowState.RUNNING,
                     create_time=now)
        stored, created, transition = await self._tasks.create_workflow(
            wf, tasks, request_id=request_id, max_queued=self.config.max_queued_per_namespace)
        if created:
            await self._after(transition, now)
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

    async def get_workflow(self, workflow_id: str) -> tuple[Workflow, dict[str, Task]]:
        """A workflow and its step tasks by step id (NotFoundError)."""
        wf = await self._tasks.get_workflow(workflow_id)
        if wf is None:
            raise NotFoundError("workflow", f"workflows/{workflow_id}")
        steps: dict[str, Task] = {}
        for step_id, task_id in wf.step_tasks.items():
            task = await self._tasks.get_task(task_id)
            if task is not None:
                steps[step_id] = task
        return wf, steps

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
        await self._after(transition, now)
        await self._stop_running([before], reason or "cancelled")
        return await self.get_task(task_id)

    async def cancel_workflow(self, workflow_id: str, reason: str) -> Workflow:
        """Cancel every step that has not ended."""
        now = self._clock.now()
        _, steps = await self.get_workflow(workflow_id)
        transition = await self._tasks.cancel_workflow(workflow_id, reason, now=now)
        await self._after(transition, now)
        await self._stop_running(list(steps.values()), reason or "workflow cancelled")
        wf, _ = await self.get_workflow(workflow_id)
        return wf

    async def retry(self, task_id: str, new_input: Payload | None) -> Task:
        """A human re-drives a task that ended without success."""
        now = self._clock.now()
        transition = await self._tasks.redrive(task_id, new_input, now=now)
        await self._after(transition, now)
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
        batches = self.watch_task_batches(namespace, names=names, capability=capability,
                                          workflow_id=workflow_id, states=states,
                                          max_pending=max_pending, max_batch=1)
        try:
            async for batch in batches:
                for task in batch:
                    yield task
        finally:
            await batches.aclose()

    async def watch_task_batches(self, namespace: str, *, names: frozenset[str] = frozenset(),
                                 capability: str = "", workflow_id: str = "",
                                 states: frozenset[int] = frozenset(),
                                 max_pending: int = 10_000,
                                 max_batch: int = 1) -> AsyncGenerator[list[Task], None]:
        """Like ``watch_tasks``, but the changes already waiting come together.

        After each wake-up every matching change queued behind the first one
        (up to ``max_batch``) is read from the store in one step and yielded as
        one list, oldest first; never an empty list.
        """
        sub = await self._bus.subscribe(events.task_pattern(namespace, states),
                                        max_pending=max_pending)
        self._task_watchers += 1
        try:
            async for first in sub:
                messages = [first, *sub.take_ready(max_batch - 1)] if max_batch > 1 else [first]
                if sub.dropped:
                    raise ResourceExhaustedError(
                        "watcher fell behind and was cut off; reconnect and re-read",
                        reason="SLOW_CONSUMER")
                picked: list[Task | str] = []  # a version held here, or an id to read
                for message in messages:
                    body = events.decode(message.data)
                    task_id = str(body.get("id", ""))
                    if names and task_id not in names:
                        continue
                    if capability and body.get("cap") != capability:
                        continue
                    if workflow_id and body.get("wf") != workflow_id:
                        continue
                    if states and body.get("state") not in states:
                        continue
                    held = self._recent.get(task_id)
                    if (held is not None and body.get("u") == held.update_time
                            and body.get("state") == int(held.state)):
                        picked.append(held)
                    else:
                        picked.append(task_id)
                if not picked:
                    continue
                found = await self._resolve(picked)
                if found:
                    yield found
        finally:
            self._task_watchers -= 1
            if not self._task_watchers:
                self._recent.clear()
            await sub.unsubscribe()

    async def _resolve(self, picked: list[Task | str]) -> list[Task]:
        """The tasks of ``picked``, in order: ids are read in one store step."""
        missing = [p for p in picked if isinstance(p, str)]
        if not missing:
            return [p for p in picked if not isinstance(p, str)]
        read = dict(zip(missing, await self._tasks.get_tasks(missing), strict=True))
        out: list[Task] = []
        for p in picked:
            task = read.get(p) if isinstance(p, str) else p
            if task is not None:
                out.append(task)
        return out

    async def _announce_task(self, task: Task) -> None:
        """Publish a task's new version; keep it for this replica's watchers, if any."""
        if self._task_watchers:
            recent = self._recent
            recent[task.id] = task
            recent.move_to_end(task.id)
            if len(recent) > RECENT_TASKS:
                recent.popitem(last=False)
        await events.announce(self._bus, events.task_subject(task.namespace, int(task.state)),
                              events.task_event(task.id, int(task.state), task.workflow_id,
                                                task.capability, task.update_time))

    async def watch_workflow(self, workflow_id: str, *, max_pending: int = 10_000,
                             ) -> AsyncIterator[tuple[Workflow, dict[str, Task]]]:
        """The workflow now, then after every step change, until it ends."""
        wf, steps = await self.get_workflow(workflow_id)
        sub = await self._bus.subscribe(events.task_pattern(wf.namespace),
                                        max_pending=max_pending)
        wf_sub = await self._bus.subscribe(events.workflow_subject(wf.namespace),
                                           max_pending=max_pending)
        try:
            # Re-read after subscribing so no change between the two is missed.
            wf, steps = await self.get_workflow(workflow_id)
            yield wf, steps
            if wf.state is not WorkflowState.RUNNING:
                return
            merged: asyncio.Queue[bool] = asyncio.Queue(maxsize=2)

            async def pump(s: Subscription, key: str) -> None:
                async for message in s:
                    if events.decode(message.data).get(key) == workflow_id and merged.empty():
                        merged.put_nowait(True)

            async with asyncio.TaskGroup() as group:
                t1 = group.create_task(pump(sub, "wf"))
                t2 = group.create_task(pump(wf_sub, "id"))
                try:
                    while True:
                        await merged.get()
                        if sub.dropped or wf_sub.dropped:
                            raise ResourceExhaustedError(
                                "watcher fell behind and was cut off", reason="SLOW_CONSUMER")
                        wf, steps = await self.get_workflow(workflow_id)
                        yield wf, steps
                        if wf.state is not WorkflowState.RUNNING:
                            return
                finally:
                    t1.cancel()
                    t2.cancel()
        finally:
            await sub.unsubscribe()
            await wf_sub.unsubscribe()

    # -- agent side ----------------------------------------------------------------

    def open_session(self, session: WorkerSession) -> None:
        """Attach an agent's work stream to this replica (replacing an older one)."""
        old = self._sessions.get(session.agent_id)
        if old is not None:
            old.closed = True
            old.send(None)
        self._sessions[session.agent_id] = session
        self._live.clear()

    async def close_session(self, session: WorkerSession, reason: str = AGENT_GONE) -> None:
        """The work stream ended: its leases go back to the queue.

        When a newer stream of the same agent replaced this one, only the
        leases this stream held go back; the newer stream's stay with it.
        """
        session.closed = True
        self._live.clear()
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]
            await self.release_agent(session.agent_id, reason)
            return
        for task_id, token in list(session.in_flight.items()):
            task = await self._tasks.get_task(task_id)
            if task is None or task.fencing_token != token:
                continue
            await self._give_back(task, token, reason, "work stream replaced")

    def grant(self, session: WorkerSession, count: int) -> None:
        """The agent can take ``count`` more tasks.

        Credits never exceed the agent's free slots (max concurrency minus
        in-flight), so a redundant grant can never over-assign.
        """
        free = session.max_concurrency - len(session.in_flight)
        session.credits = max(0, min(session.credits + count, free))
        self._wake.set()

    def drain_sessions(self) -> None:
        """Stop dispatching to local agents (server shutdown)."""
        self.draining = True
        for session in self._sessions.values():
            session.draining = True

    def in_flight_local(self) -> int:
        """Tasks running on agents attached to this replica."""
        return sum(len(s.in_flight) for s in self._sessions.values())

    async def report_result(self, session: WorkerSession | None, task_id: str, token: int,
                            output: Payload) -> int:
        """Accept one result unless its lease is stale; returns a ReportOutcome."""
        return (await self.report_results(session, [(task_id, token, output)]))[0]

    async def report_results(self, session: WorkerSession | None,
                             items: Sequence[tuple[str, int, Payload]]) -> list[int]:
        """Results in one store step; one ReportOutcome each.

        With a ``session`` (the work stream) a result is checked against the
        stream's own leases first and frees its slot; without one (CompleteTask
        from elsewhere) only the store's fencing check applies.
        """
        outcomes = [ReportOutcome.ACCEPTED] * len(items)
        todo: list[tuple[str, int, Payload]] = []
        index: list[int] = []
        for i, (task_id, token, output) in enumerate(items):
            if session is not None and session.in_flight.get(task_id) != token:
                self._observer.stale_result(task_id)
                outcomes[i] = ReportOutcome.STALE_LEASE
            else:
                todo.append((task_id, token, output))
                index.append(i)
        if not todo:
            return outcomes
        now = self._clock.now()
        try:
            results = await self._tasks.complete_many(todo, now=now)
        finally:
            if session is not None:
                for task_id, token, _ in todo:
                    self._release_slot(session, task_id, token)
        for i, (task_id, _, _), result in zip(index, todo, results, strict=True):
            if isinstance(result, Transition):
                await self._after(result, now)
                for change in result.tasks:
                    if change.task.id == task_id and change.previous_state is TaskState.RUNNING:
                        done = change.task
                        await self.breakers.record(done.namespace, done.agent_id,
                                                   served_capability(done), ok=True)
                        break
            else:
                self._observer.stale_result(task_id)
                outcomes[i] = ReportOutcome.STALE_LEASE
        return outcomes

    async def report_failure(self, session: WorkerSession | None, task_id: str, token: int,
                             failure: TaskFailure) -> int:
        """Record a failed attempt and schedule what the retry policy says."""
        if session is not None and session.in_flight.get(task_id) != token:
            self._observer.stale_result(task_id)
            return ReportOutcome.STALE_LEASE
        try:
            task = await self.get_task(task_id)
            await self._fail(task, token, failure)
        except StaleLeaseError:
            self._observer.stale_result(task_id)
            return ReportOutcome.STALE_LEASE
        finally:
            if session is not None:
                self._release_slot(session, task_id, token)
        return ReportOutcome.ACCEPTED

    async def complete_unary(self, task_id: str, token: int, output: Payload | None,
                             failure: TaskFailure | None) -> Task:
        """CompleteTask outside the stream; StaleLeaseError when stale."""
        session = None
        task = await self.get_task(task_id)
        local = self._sessions.get(task.agent_id)
        if local is not None and local.in_flight.get(task_id) == token:
            session = local
        if failure is not None:
            outcome = await self.report_failure(session, task_id, token, failure)
        else:
            outcome = await self.report_result(session, task_id, token, output or Payload())
        if outcome != ReportOutcome.ACCEPTED:
            raise StaleLeaseError(
                f"tasks/{task_id}: fencing token {token} is stale",
                metadata={"task": f"tasks/{task_id}"})
        return await self.get_task(task_id)

    async def report_progress(self, session: WorkerSession | None, task_id: str,
                              token: int) -> bool:
        """Progress renews a running attempt's lease; False when the lease is gone.

        With a heartbeat timeout the lease moves to ``now + heartbeat_timeout``,
        capped by the attempt's start-to-close deadline (``start_time +
        execution_timeout``). Without one it moves to ``now + execution_timeout``
        (the behaviour before heartbeat timeouts existed). A stale token is not
        an error of the stream: the attempt is told to stop.
        """
        task = await self.get_task(task_id)
        now = self._clock.now()
        timeout = task.execution_timeout or self.config.default_execution_timeout
        if task.heartbeat_timeout > 0:
            deadline = min(task.start_time + timeout, now + task.heartbeat_timeout)
        else:
            deadline = now + timeout
        try:
            await self._tasks.renew_lease(task_id, token, deadline)
        except StaleLeaseError:
            if session is not None and session.in_flight.get(task_id) == token:
                del session.in_flight[task_id]
                session.send(Cancellation(task_id, token, "lease ended"))
            return False
        return True

    def _release_slot(self, session: WorkerSession, task_id: str, token: int) -> None:
        """A reported result or failure frees its slot and returns one credit."""
        if session.in_flight.get(task_id) == token:
            del session.in_flight[task_id]
            self.grant(session, 1)

    async def release_agent(self, agent_id: str, reason: str = AGENT_GONE) -> int:
        """Requeue every task leased to an agent that went away."""
        self.breakers.forget(agent_id)
        leased = await self._tasks.leases_of(agent_id)
        for task in leased:
            await self._give_back(task, task.fencing_token, reason,
                                  f"agent agents/{agent_id} went away")
        if leased:
            log.info("requeued %d task(s) of agent %s (%s)", len(leased), agent_id, reason)
        return len(leased)

    async def _give_back(self, task: Task, token: int, reason: str, message: str) -> None:
        """Requeue a lease at once (the attempt counts); a lease that moved on is left."""
        with contextlib.suppress(StaleLeaseError):
            await self._fail(task, token, TaskFailure(reason, message), immediate=True)

    async def _fail(self, task: Task, token: int, failure: TaskFailure, *,
                    immediate: bool = False) -> Transition:
        now = self._clock.now()
        decision = decide(task.retry_policy, task.attempt, failure, task.budget_start)
        verdict = {RetryVerdict.RETRY: FailVerdict.RETRY, RetryVerdict.FAIL: FailVerdict.FAIL,
                   RetryVerdict.DEAD_LETTER: FailVerdict.DEAD_LETTER}[decision.verdict]
        retry_at = now if immediate else now + decision.delay
        transition = await self._tasks.fail(task.id, token, failure, verdict=verdict,
                                            retry_at=retry_at, now=now)
        await self._after(transition, now)
        if counts_against_agent(failure, task) and task.agent_id:
            await self.breakers.record(task.namespace, task.agent_id, served_capability(task),
                                       ok=False)
        return transition

    async def _stop_running(self, before: Sequence[Task], reason: str) -> None:
        for task in before:
            if task.state is TaskState.RUNNING:
                await events.announce(self._bus, events.CANCEL_SUBJECT, events.encode(
                    {"agent": task.agent_id, "id": task.id, "token": task.fencing_token,
                     "reason": reason}))

    # -- events ------------------------------------------------------------------

    async def _after(self, transition: Transition, now: float) -> None:
        """Publish what changed and wake dispatchers for new work."""
        self._observer.transition(transition, now)
        ready: dict[str, set[str]] = {}
        for change in transition.tasks:
            t = change.task
            await self._announce_task(t)
            if t.state is TaskState.QUEUED:
                ready.setdefault(t.namespace, set()).add(t.capability)
        if transition.workflow is not None:
            wf = transition.workflow
            await events.announce(self._bus, events.workflow_subject(wf.namespace), events.encode(
                {"id": wf.id, "state": int(wf.state)}))
        if ready:
            self._wake.set()
            for namespace, caps in ready.items():
                await events.announce(self._bus, events.ready_subject(namespace),
                                        events.encode({"caps": sorted(caps)}), self._origin)
            # Let the dispatcher, just woken, lease the new work before this caller
            # goes on (to build and send its response): it reaches an agent sooner.
            await asyncio.sleep(0)

    async def _ready_listener(self, sub: Subscription) -> None:
        async for message in sub:
            if message.headers.get(events.ORIGIN_HEADER) != self._replica:
                self._wake.set()

    async def _agent_listener(self, sub: Subscription) -> None:
        """Agents joining, leaving or draining change who may serve as a fallback: re-poll.

        Load-only updates travel on another subject and never reach here.
        """
        async for message in sub:
            body = events.decode(message.data)
            if body.get("type") == AgentEventType.LEFT:
                self.breakers.forget(str(body.get("id", "")))
            self._live.clear()
            self._wake.set()

    def _breaker_changed(self, agent_id: str, capability: str, state: str) -> None:
        self._wake.set()
        with contextlib.suppress(Exception):
            hook = getattr(self._observer, "breaker_changed", None)
            if hook is not None:
                hook(agent_id, capability, state)

    async def _available(self, namespace: str, cache: dict[str, frozenset[str]]
                         ) -> frozenset[str]:
        """Capabilities with a usable agent: live, and not every such agent's breaker open."""
        if namespace in cache:
            return cache[namespace]
        live = await self._live_capabilities(namespace)
        blocked: dict[str, set[str]] = {}
        for agent_id, cap in self.breakers.open_keys():
            if cap in live and self.breakers.blocked(agent_id, cap):
                blocked.setdefault(cap, set()).add(agent_id)
        out = set(live)
        for cap, agents in blocked.items():
            offering = await self._agents.list_agents(
                AgentFilter(namespace, cap, frozenset({AgentState.ACTIVE})), after_id="",
                limit=10_000)
            if all(a.id in agents for a in offering):
                out.discard(cap)
        cache[namespace] = frozenset(out)
        return cache[namespace]

    async def _live_capabilities(self, namespace: str) -> frozenset[str]:
        """``live_capabilities`` of the store, reused for ``LIVE_CACHE_SECONDS``
        (one store read per dispatch round saved; a Redis round trip)."""
        now = time.monotonic()
        hit = self._live.get(namespace)
        if hit is not None and now - hit[0] < LIVE_CACHE_SECONDS:
            return hit[1]
        live = await self._agents.live_capabilities(namespace)
        self._live[namespace] = (now, live)
        return live

    async def _cancel_listener(self, sub: Subscription) -> None:
        async for message in sub:
            body = events.decode(message.data)
            session = self._sessions.get(str(body.get("agent", "")))
            if session is None:
                continue
            task_id = str(body.get("id", ""))
            token = int(body.get("token", 0))
            if session.in_flight.get(task_id) == token:
                del session.in_flight[task_id]
                session.send(Cancellation(task_id, token, str(body.get("reason", ""))))

    # -- dispatch ------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            raise_if_cancelling()
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch_round()
            except Exception:
                log.exception("dispatch round failed; retrying on the next wake-up")
                await asyncio.sleep(self.config.tick)
                self._wake.set()

    async def _dispatch_round(self) -> None:
        """Lease work to local sessions with credits, least loaded first.

        A session is leased at most enough to bring its load just past that
        of the least-loaded other session that could take the same work, or a
        step (``FAIR_STEP``, doubling while leases come back full), then
        passes repeat, re-sorted: a burst spreads over idle agents instead of
        filling the first one's batch, and plentiful work still goes in
        batches.

        A queue found short stays marked empty for the rest of the round: work
        queued meanwhile sets the wake-up again, so the next round sees it, and
        no store call is spent re-reading a queue that just came back empty.
        """
        if self.draining:
            return
        empty: set[tuple[str, tuple[str, ...], LeaseScope]] = set()
        steps: dict[tuple[str, tuple[str, ...], LeaseScope], int] = {}
        while True:
            candidates = sorted(
                (s for s in self._sessions.values()
                 if s.credits > 0 and not s.draining and not s.closed),
                key=lambda s: s.load)
            if not candidates:
                return
            available: dict[str, frozenset[str]] = {}
            progressed = False
            for session in candidates:
                if session.closed or session.credits <= 0:
                    continue
                caps = tuple(c for c in session.capabilities
                             if self.breakers.allows(session.agent_id, c))
                scope = NO_FALLBACK
                if caps:
                    scope = LeaseScope(caps, await self._available(session.namespace, available))
                key = (session.namespace, caps, scope)
                if not caps or key in empty:
                    continue
                now = self._clock.now()
                # A breaker that is not closed (half-open) lets exactly one probe through.
                probing = any(self.breakers.state(session.agent_id, c) != "closed"
                              for c in caps)
                step = steps.get(key, FAIR_STEP)
                want = 1 if probing else min(session.credits, DISPATCH_BATCH,
                                             _fair_share(session, candidates, step))
                leases = await self._tasks.lease_batch(
                    session.namespace, caps, session.agent_id, now=now,
                    default_timeout=self.config.default_execution_timeout, count=want,
                    scope=scope, limits=self.config.limits)
                if len(leases) < want:
                    empty.add(key)
                else:
                    steps[key] = min(2 * step, DISPATCH_BATCH)
                if not leases:
                    continue
                progressed = True
                for lease in leases:
                    await self._hand_over(session, lease, now)
            if not progressed:
                return

    async def _hand_over(self, session: WorkerSession, lease: Lease, now: float) -> None:
        """Send a fresh lease to its session (or give it back if the stream ended)."""
        if _closed(session):  # re-read: the stream may have ended during the await
            await self._give_back(lease.task, lease.fencing_token, AGENT_GONE,
                                  "work stream closed")
            return
        session.credits -= 1
        session.in_flight[lease.task.id] = lease.fencing_token
        self.breakers.dispatched(session.agent_id, served_capability(lease.task),
                                 lease.task.id)
        self._observer.dispatched(lease, now)
        await self._announce_task(lease.task)
        session.send(Assignment(lease))

    # -- maintenance -----------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        while True:
            raise_if_cancelling()
            await asyncio.sleep(self.config.tick)
            try:
                await self.run_maintenance()
            except Exception:
                log.exception("maintenance pass failed")

    async def run_maintenance(self) -> None:
        """One pass: end expired leases, fail tasks past schedule-to-start, promote retries."""
        now = self._clock.now()
        for task in await self._tasks.expired_leases(now, self.config.reap_batch):
            with contextlib.suppress(StaleLeaseError):
                await self._fail(task, task.fencing_token, self._expiry_failure(task))
                await self._stop_running([task], "lease expired")
        timed_out = await self._tasks.expire_queued(now, self.config.reap_batch)
        if timed_out.tasks:
            await self._after(timed_out, now)
        promoted = await self._tasks.promote_due(now, self.config.reap_batch)
        if promoted.tasks:
            await self._after(promoted, now)
        if self.config.limits.active or self.breakers.any_open():
            self._wake.set()  # limits and half-open breakers free up with time alone
        if now - self._last_reconcile >= RECONCILE_PERIOD:
            self._last_reconcile = now
            await self.reconcile(now)
            if any(sess.credits > 0 for sess in self._sessions.values()):
                # Wake-ups are notifications that can be lost (bus down, another
                # replica's publish); one re-check a period bounds the delay
                # without a store call per idle agent on every tick.
                self._wake.set()

    async def reconcile(self, now: float) -> int:
        """Find leases the store holds for local agents that never reached them.

        A lease whose store reply was lost (a connection reset after the script
        committed, then a retry) is RUNNING for the agent but was never sent.
        Each such lease older than ``ORPHAN_AGE`` is handed over when the agent
        has a free credit, otherwise given straight back to the queue.
        Returns how many were found.
        """
        found = 0
        for session in list(self._sessions.values()):
            if session.closed:
                continue
            # What the agent was sent, taken before the read: a lease reported
            # (and its slot freed) while the read is under way is no orphan,
            # though the copy read may still say RUNNING.
            held = dict(session.in_flight)
            for listed in await self._tasks.leases_of(session.agent_id):
                if (listed.id in session.in_flight
                        or held.get(listed.id) == listed.fencing_token
                        or now - listed.start_time < ORPHAN_AGE):
                    continue
                task = await self._tasks.get_task(listed.id)  # the list may be stale
                if (task is None or task.state is not TaskState.RUNNING
                        or task.fencing_token != listed.fencing_token
                        or task.agent_id != session.agent_id
                        or task.id in session.in_flight):
                    continue
                found += 1
                lease = Lease(task, task.fencing_token, task.lease_deadline)
                if session.credits > 0 and not session.draining:
                    log.warning("handing over orphaned lease of tasks/%s to agents/%s",
                                task.id, session.agent_id)
                    await self._hand_over(session, lease, now)
                else:
                    log.warning("requeueing orphaned lease of tasks/%s", task.id)
                    await self._give_back(task, task.fencing_token, AGENT_GONE,
                                          "lease was never delivered")
        return found

    def _expiry_failure(self, task: Task) -> TaskFailure:
        """HEARTBEAT_TIMEOUT when the lease ended before start-to-close, else LEASE_EXPIRED."""
        timeout = task.execution_timeout or self.config.default_execution_timeout
        if task.heartbeat_timeout > 0 and task.lease_deadline < task.start_time + timeout - 1e-6:
            return TaskFailure(HEARTBEAT_TIMEOUT, (
                f"attempt {task.attempt} sent no progress for {task.heartbeat_timeout:g}s "
                f"on agents/{task.agent_id}"))
        return TaskFailure(LEASE_EXPIRED, f"attempt {task.attempt} ran past its lease "
                           f"(execution timeout) on agents/{task.agent_id}")


def _closed(session: WorkerSession) -> bool:
    return session.closed


RIVALS_SCANNED = 32
"""Sessions looked at to find a session's least-loaded rival (a homogeneous
fleet finds it at once; this bounds the pass at O(n) for a mixed one)."""


def _fair_share(session: WorkerSession, by_load: Sequence[WorkerSession], step: int) -> int:
    """Leases that take ``session`` just past its least-loaded rival, or ``step``.

    Rivals are the other sessions in ``by_load`` (sorted by load, lightest
    first) of the same namespace sharing a capability. Loads are in-flight
    shares of each one's concurrency, so the count is in ``session``'s units.
    With no rival the share is unbounded (the caller caps it).
    """
    caps = session.capabilities
    for rival in by_load[:RIVALS_SCANNED]:
        if (rival is session or rival.namespace != session.namespace or rival.closed
                or rival.credits <= 0 or not any(c in caps for c in rival.capabilities)):
            continue
        below = int(rival.load * session.max_concurrency) - len(session.in_flight)
        return max(step, below + 1)
    return DISPATCH_BATCH


def served_capability(task: Task) -> str:
    """The capability the agent served: the fallback when it stood in for the primary."""
    return task.fallback_capability if task.served_by_fallback else task.capability


_NOT_AGENT_FAULTS = frozenset({AGENT_GONE, "CANCELLED", "UPSTREAM_FAILED"})


def counts_against_agent(failure: TaskFailure, task: Task) -> bool:
    """Whether a failed attempt counts toward the agent's circuit breaker.

    Retryable failures and lease/heartbeat expiries do; a non-retryable error
    (the input is bad, not the agent) and the agent's own departure do not.
    """
    if failure.error_type in _NOT_AGENT_FAULTS or failure.non_retryable:
        return False
    return failure.error_type not in task.retry_policy.non_retryable_error_types


__all__ = [
    "Assignment",
    "Cancellation",
    "NullObserver",
    "ReportAck",
    "ReportOutcome",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerObserver",
    "WorkerSession",
    "counts_against_agent",
    "served_capability",
]

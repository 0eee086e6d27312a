"""In-memory TaskStore: dicts and heaps in one event loop.

Every method runs without awaiting anything, so on one event loop each is
atomic. Heaps use lazy deletion: an entry is checked against the task's
current state when it is popped. The store is built with the
InMemoryAgentRegistry it shares (``InMemoryTaskStore(agents=registry)``): a
lease step reads the agent's liveness from it in the same atomic step.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace

from server.backends.memory.agents import InMemoryAgentRegistry
from server.domain.errors import (
    AgentMeshError,
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    StaleLeaseError,
)
from server.domain.limits import (
    KEY_SCAN,
    NO_FALLBACK,
    NO_LIMITS,
    DispatchLimits,
    LeaseScope,
    bucket_take,
)
from server.domain.models import (
    LIVE_TASK_STATES,
    SCHEDULE_TO_START_TIMEOUT,
    TERMINAL_TASK_STATES,
    Lease,
    Payload,
    Stats,
    Task,
    TaskAttempt,
    TaskChange,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowState,
    evolve_task,
)
from server.ports import FailVerdict, TaskFilter, TaskRecords, Transition

_BACKLOG_STATES = (TaskState.PENDING, TaskState.QUEUED, TaskState.RETRYING)
_INDEXED_STATES = frozenset({TaskState.DEAD_LETTERED, TaskState.FAILED, TaskState.CANCELLED})
"""States with their own seq index: where operators look, and few tasks are."""


class InMemoryTaskStore:
    """TaskStore for the embedded mode (one process, nothing persisted).

    ``agents`` is the registry of the same mesh, required: a lease goes only to
    an agent it holds as ACTIVE and unexpired (see TaskStore.lease_next), so a
    store wired to no registry, or to another one, would lease nothing.
    """

    def __init__(self, *, agents: InMemoryAgentRegistry) -> None:
        self._agents = agents
        self._tasks: dict[str, Task] = {}
        self._workflows: dict[str, Workflow] = {}
        self._dependents: dict[str, dict[str, list[str]]] = {}
        self._queues: dict[tuple[str, str], list[tuple[int, int, str]]] = defaultdict(list)
        self._retry_heap: list[tuple[float, str]] = []
        self._lease_heap: list[tuple[float, str, int]] = []
        self._by_agent: dict[str, set[str]] = defaultdict(set)
        self._idempotency: dict[tuple[str, str], str] = {}
        self._seq = 0
        # (seq, id) per namespace in seq order, for newest-first lists without a
        # sort; an entry is stale once its task took a newer seq (a re-drive).
        self._order: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self._wf_order: dict[str, list[tuple[int, str]]] = defaultdict(list)
        # The same per (namespace, capability), and per (namespace, state) for the
        # states a human looks for (rare, so keeping them sorted costs little),
        # so a filtered list reads the candidates only (see list_tasks).
        self._cap_order: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
        self._state_order: dict[tuple[str, TaskState], list[tuple[int, str]]] = (
            defaultdict(list))
        self._counts: dict[str, dict[TaskState, int]] = defaultdict(lambda: defaultdict(int))
        self._cap_counts: dict[str, dict[tuple[str, TaskState], int]] = defaultdict(
            lambda: defaultdict(int))
        self._ended: dict[str, int] = defaultdict(int)
        self._autonomous: dict[str, int] = defaultdict(int)
        # Resilience indexes: schedule-to-start timers, fallback queues
        # ((ns, fallback, primary) -> heap; (ns, fallback) -> primaries),
        # RUNNING counters per (ns, "c:"+cap | "l:"+label=value), rate buckets.
        self._s2s_heap: list[tuple[float, str]] = []
        self._fb_queues: dict[tuple[str, str, str], list[tuple[int, int, str]]] = (
            defaultdict(list))
        self._fb_primaries: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._run_counts: dict[tuple[str, str], int] = defaultdict(int)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    # -- bookkeeping -------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _store(self, new: Task, changes: list[TaskChange]) -> Task:
        """Save a task version, keep counters and indexes, record the change."""
        old = self._tasks.get(new.id)
        prev = old.state if old is not None else None
        new = _with_queue_deadline(new, prev)
        if prev is TaskState.RUNNING and old is not None:
            for key in _running_keys(old):
                self._run_counts[(old.namespace, key)] -= 1
        if new.state is TaskState.RUNNING:
            for key in _running_keys(new):
                self._run_counts[(new.namespace, key)] += 1
        counts = self._counts[new.namespace]
        by_cap = self._cap_counts[new.namespace]
        if old is not None and prev in LIVE_TASK_STATES:
            by_cap[(old.capability, prev)] -= 1
        if new.state in LIVE_TASK_STATES:
            by_cap[(new.capability, new.state)] += 1
        if prev is not None:
            counts[prev] -= 1
            if prev in TERMINAL_TASK_STATES:
                self._ended[new.namespace] -= 1
                if prev is TaskState.SUCCEEDED and not old.human_intervened:  # type: ignore[union-attr]
                    self._autonomous[new.namespace] -= 1
            if prev is TaskState.RUNNING and new.state is not TaskState.RUNNING:
                self._by_agent[old.agent_id].discard(new.id)  # type: ignore[union-attr]
        counts[new.state] += 1
        if new.state in TERMINAL_TASK_STATES:
            self._ended[new.namespace] += 1
            if new.state is TaskState.SUCCEEDED and not new.human_intervened:
                self._autonomous[new.namespace] += 1
        if new.state is TaskState.QUEUED and prev is not TaskState.QUEUED:
            heapq.heappush(self._queues[(new.namespace, new.capability)],
                           (-new.priority, new.seq, new.id))
            if new.fallback_capability:
                fb = (new.namespace, new.fallback_capability, new.capability)
                heapq.heappush(self._fb_queues[fb], (-new.priority, new.seq, new.id))
                self._fb_primaries[(new.namespace, new.fallback_capability)].add(new.capability)
            if new.queue_deadline:
                heapq.heappush(self._s2s_heap, (new.queue_deadline, new.id))
        elif new.state is TaskState.RETRYING:
            heapq.heappush(self._retry_heap, (new.retry_time, new.id))
        elif new.state is TaskState.RUNNING:
            self._by_agent[new.agent_id].add(new.id)
            heapq.heappush(self._lease_heap, (new.lease_deadline, new.id, new.fencing_token))
        if old is None or old.seq != new.seq:
            _insert_ordered(self._order[new.namespace], (new.seq, new.id))
            _insert_ordered(self._cap_order[(new.namespace, new.capability)], (new.seq, new.id))
        if new.state in _INDEXED_STATES and (prev is not new.state or old is None
                                             or old.seq != new.seq):
            self._index_state(new)
        self._tasks[new.id] = new
        changes.append(TaskChange(new, prev))
        return new

    def _index_state(self, task: Task) -> None:
        """Add a task entering an indexed state; drop stale entries when they pile up."""
        order = self._state_order[(task.namespace, task.state)]
        _insert_ordered(order, (task.seq, task.id))
        if len(order) > 2 * self._counts[task.namespace][task.state] + 64:
            tasks = self._tasks
            order[:] = [(seq, tid) for seq, tid in order
                        if (t := tasks.get(tid)) is not None and t.seq == seq
                        and (t.state is task.state or tid == task.id)]

    def _candidates(self, flt: TaskFilter) -> list[tuple[int, str]] | None:
        """The smallest seq index that holds every task ``flt`` can match."""
        if flt.state in _INDEXED_STATES:
            return self._state_order.get((flt.namespace, flt.state))
        if flt.capability:
            return self._cap_order.get((flt.namespace, flt.capability))
        return self._order.get(flt.namespace)

    def _backlog(self, namespace: str) -> int:
        counts = self._counts[namespace]
        return sum(counts[s] for s in _BACKLOG_STATES)

    def _task(self, task_id: str) -> Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFoundError("task", f"tasks/{task_id}")
        return task

    def _running(self, task_id: str, fencing_token: int) -> Task:
        task = self._task(task_id)
        if task.state is not TaskState.RUNNING or task.fencing_token != fencing_token:
            raise StaleLeaseError(
                f"tasks/{task_id}: fencing token {fencing_token} is stale "
                f"(task is {task.state.name}, current token {task.fencing_token})",
                metadata={"task": f"tasks/{task_id}", "current_token": str(task.fencing_token)})
        return task

    # -- create / read -----------------------------------------------------------

    def _check_new_ids(self, items: Sequence[tuple[Task, str]]) -> None:
        """AlreadyExistsError for the first item that is not a replay and whose id is
        taken (by a stored task or an earlier item); see TaskStore.create_tasks."""
        ids: set[str] = set()
        rids: set[tuple[str, str]] = set()
        for task, request_id in items:
            if request_id:
                key = (task.namespace, request_id)
                if key in rids or key in self._idempotency:
                    continue  # a replay: it returns the task of its request id
                rids.add(key)
            if task.id in ids or task.id in self._tasks:
                raise _already_exists(f"tasks/{task.id}")
            ids.add(task.id)

    async def create_task(
        self, task: Task, *, request_id: str = "", max_queued: int = 0
    ) -> tuple[Task, bool, Transition]:
        """See TaskStore.create_task."""
        self._check_new_ids([(task, request_id)])
        return self._create(task, request_id, max_queued)

    def _create(self, task: Task, request_id: str,
                max_queued: int) -> tuple[Task, bool, Transition]:
        """One create after ``_check_new_ids`` passed (idempotency, queue bound, insert)."""
        if request_id:
            existing = self._idempotency.get((task.namespace, request_id))
            if existing is not None:
                return self._tasks[existing], False, Transition()
        if max_queued and self._backlog(task.namespace) >= max_queued:
            raise ResourceExhaustedError(
                f"namespace {task.namespace!r} has {max_queued} tasks waiting (the limit)",
                retry_after=1.0, reason="QUEUE_FULL")
        changes: list[TaskChange] = []
        stored = self._store(evolve_task(task, seq=self._next_seq(), state=TaskState.QUEUED),
                             changes)
        if request_id:
            self._idempotency[(task.namespace, request_id)] = task.id
        return stored, True, Transition(tuple(changes))

    async def create_tasks(
        self, items: Sequence[tuple[Task, str]], *, max_queued: int = 0,
    ) -> tuple[list[tuple[Task, bool, Transition]], bool]:
        """See TaskStore.create_tasks (no await inside: one atomic step, in order)."""
        self._check_new_ids(items)
        out: list[tuple[Task, bool, Transition]] = []
        for task, request_id in items:
            try:
                out.append(self._create(task, request_id, max_queued))
            except ResourceExhaustedError:
                return out, True
        return out, False

    async def create_workflow(
        self, workflow: Workflow, tasks: Sequence[Task], *, request_id: str = "",
        max_queued: int = 0,
    ) -> tuple[Workflow, bool, Transition]:
        """See TaskStore.create_workflow."""
        if request_id:
            existing = self._idempotency.get((workflow.namespace, "wf:" + request_id))
            if existing is not None:
                return self._workflows[existing], False, Transition()
        if workflow.id in self._workflows:
            raise _already_exists(f"workflows/{workflow.id}")
        step_ids: set[str] = set()
        for t in tasks:
            if t.id in step_ids or t.id in self._tasks:
                raise _already_exists(f"tasks/{t.id}")
            step_ids.add(t.id)
        if max_queued and self._backlog(workflow.namespace) + len(tasks) > max_queued:
            raise ResourceExhaustedError(
                f"namespace {workflow.namespace!r} would exceed {max_queued} waiting tasks",
                retry_after=1.0, reason="QUEUE_FULL")
        wf = replace(workflow, seq=self._next_seq())
        self._workflows[wf.id] = wf
        _insert_ordered(self._wf_order[wf.namespace], (wf.seq, wf.id))
        dependents: dict[str, list[str]] = {s.id: [] for s in wf.steps}
        for step in wf.steps:
            for dep in step.depends_on:
                dependents[dep].append(step.id)
        self._dependents[wf.id] = dependents
        changes: list[TaskChange] = []
        for t in tasks:
            state = TaskState.PENDING if t.depends_on else TaskState.QUEUED
            self._store(replace(t, seq=self._next_seq(), state=state), changes)
        if request_id:
            self._idempotency[(workflow.namespace, "wf:" + request_id)] = wf.id
        return wf, True, Transition(tuple(changes), wf)

    async def get_task(self, task_id: str) -> Task | None:
        """See TaskStore.get_task."""
        return self._tasks.get(task_id)

    def peek(self, task_id: str) -> Task | None:
        """The current version, read without awaiting (the chunk store fences with it)."""
        return self._tasks.get(task_id)

    async def get_tasks(self, task_ids: Sequence[str]) -> list[Task | None]:
        """See TaskStore.get_tasks."""
        tasks = self._tasks
        return [tasks.get(task_id) for task_id in task_ids]

    async def list_tasks(self, flt: TaskFilter, *, before_seq: int, limit: int) -> list[Task]:
        """See TaskStore.list_tasks (newest first from a seq index; no sort)."""
        out: list[Task] = []
        order = self._candidates(flt)
        if not order or limit <= 0:
            return out
        end = bisect.bisect_left(order, (before_seq, "")) if before_seq else len(order)
        tasks = self._tasks
        for i in range(end - 1, -1, -1):
            seq, task_id = order[i]
            task = tasks.get(task_id)
            if task is None or task.seq != seq or not flt.matches(task):
                continue
            out.append(task)
            if len(out) >= limit:
                break
        return out

    async def scan_tasks(self, flt: TaskFilter, *, before_seq: int, limit: int,
                         max_scan: int) -> tuple[list[Task], int]:
        """See TaskStore.scan_tasks (the candidates' seq index, at most ``max_scan`` read)."""
        out: list[Task] = []
        order = self._candidates(flt)
        if not order or limit <= 0:
            return out, 0
        end = bisect.bisect_left(order, (before_seq, "")) if before_seq else len(order)
        tasks = self._tasks
        read = 0
        for i in range(end - 1, -1, -1):
            seq, task_id = order[i]
            task = tasks.get(task_id)
            if task is None or task.seq != seq:
                continue
            read += 1
            if flt.matches(task):
                out.append(task)
                if len(out) >= limit:
                    return out, seq if i > 0 else 0
            if read >= max_scan:
                return out, seq if i > 0 else 0
        return out, 0

    async def get_workflow(self, workflow_id: str) -> Workflow | None:
        """See TaskStore.get_workflow."""
        return self._workflows.get(workflow_id)

    async def list_workflows(
        self, namespace: str, state: WorkflowState | None, *, before_seq: int, limit: int
    ) -> list[Workflow]:
        """See TaskStore.list_workflows (newest first from the seq index)."""
        out: list[Workflow] = []
        order = self._wf_order.get(namespace)
        if not order or limit <= 0:
            return out
        end = bisect.bisect_left(order, (before_seq, "")) if before_seq else len(order)
        for i in range(end - 1, -1, -1):
            wf = self._workflows.get(order[i][1])
            if wf is None or (state is not None and wf.state is not state):
                continue
            out.append(wf)
            if len(out) >= limit:
                break
        return out

    # -- leases ------------------------------------------------------------------

    def _valid(self, entry: tuple[int, int, str]) -> bool:
        task = self._tasks.get(entry[2])
        return task is not None and task.state is TaskState.QUEUED and task.seq == entry[1]

    def _eligible(self, heap: list[tuple[int, int, str]], namespace: str,
                  limits: DispatchLimits) -> tuple[int, int, str] | None:
        """The best entry of a heap a per-key limit lets through (stale tops dropped).

        Blocked entries are popped while scanning (at most ``KEY_SCAN``) and
        pushed back, so the heap is unchanged apart from stale entries.
        """
        while heap and not self._valid(heap[0]):
            heapq.heappop(heap)
        if not heap:
            return None
        if not limits.key_label:
            return heap[0]
        held: list[tuple[int, int, str]] = []
        found: tuple[int, int, str] | None = None
        while heap and len(held) < KEY_SCAN:
            top = heapq.heappop(heap)
            if not self._valid(top):
                continue
            held.append(top)
            if self._key_allows(self._tasks[top[2]], namespace, limits):
                found = top
                break
        for entry in held:
            heapq.heappush(heap, entry)
        return found

    def _key_allows(self, task: Task, namespace: str, limits: DispatchLimits) -> bool:
        value = task.labels.get(limits.key_label) if limits.key_label else None
        if value is None:
            return True
        cap = limits.key_limit(value)
        return not cap or self._run_counts[(namespace, f"l:{limits.key_label}={value}")] < cap

    def _cap_allows(self, namespace: str, cap: str, limits: DispatchLimits, now: float) -> bool:
        most = limits.capability_limits.get(cap, 0)
        if most and self._run_counts[(namespace, "c:" + cap)] >= most:
            return False
        rate = limits.capability_rates.get(cap, 0.0)
        if rate > 0:
            tokens, stamp = self._buckets.get((namespace, cap), (0.0, 0.0))
            return bucket_take(tokens, stamp, rate, now)[2]
        return True

    async def lease_next(
        self, namespace: str, capabilities: Sequence[str], agent_id: str, *,
        now: float, default_timeout: float, scope: LeaseScope = NO_FALLBACK,
        limits: DispatchLimits = NO_LIMITS,
    ) -> Lease | None:
        """See TaskStore.lease_next (the agent's liveness is read in the same step)."""
        if not self._agents.accepts_leases(agent_id, now):
            return None
        return self._lease_one(namespace, capabilities, agent_id, now=now,
                               default_timeout=default_timeout, scope=scope, limits=limits)

    def _lease_one(self, namespace: str, capabilities: Sequence[str], agent_id: str, *,
                   now: float, default_timeout: float, scope: LeaseScope,
                   limits: DispatchLimits) -> Lease | None:
        """Lease the best eligible task to an agent already found live."""
        heaps: list[tuple[list[tuple[int, int, str]], bool]] = []
        for cap in dict.fromkeys(capabilities):
            if self._cap_allows(namespace, cap, limits, now):
                heaps.append((self._queues[(namespace, cap)], False))
        for fallback in dict.fromkeys(scope.fallback_for):
            primaries = self._fb_primaries.get((namespace, fallback))
            if not primaries:
                continue
            for primary in sorted(primaries):
                fq = self._fb_queues.get((namespace, fallback, primary))
                if not fq or not self._prune(fq):
                    primaries.discard(primary)
                    continue
                if primary in scope.available or primary in capabilities:
                    continue
                if self._cap_allows(namespace, primary, limits, now):
                    heaps.append((fq, True))
        best: tuple[int, int, str] | None = None
        best_fb = False
        for heap, via_fallback in heaps:
            top = self._eligible(heap, namespace, limits)
            if top is not None and (best is None or top < best):
                best, best_fb = top, via_fallback
        if best is None:
            return None
        task = self._tasks[best[2]]
        rate = limits.capability_rates.get(task.capability, 0.0)
        if rate > 0:
            tokens, stamp = self._buckets.get((namespace, task.capability), (0.0, 0.0))
            tokens, stamp, _ = bucket_take(tokens, stamp, rate, now)
            self._buckets[(namespace, task.capability)] = (tokens, stamp)
        timeout = task.execution_timeout or default_timeout
        if task.heartbeat_timeout > 0:
            timeout = min(timeout, task.heartbeat_timeout)
        attempt = task.attempt + 1
        leased = evolve_task(
            task, state=TaskState.RUNNING, attempt=attempt, fencing_token=task.fencing_token + 1,
            agent_id=agent_id, start_time=now, update_time=now, lease_deadline=now + timeout,
            served_by_fallback=best_fb,
            attempts=(*task.attempts, TaskAttempt(attempt, agent_id, now)))
        leased = self._store(leased, [])
        return Lease(leased, leased.fencing_token, leased.lease_deadline)

    def _prune(self, heap: list[tuple[int, int, str]]) -> bool:
        """Drop stale tops; True when a valid entry remains."""
        while heap and not self._valid(heap[0]):
            heapq.heappop(heap)
        return bool(heap)

    async def lease_batch(
        self, namespace: str, capabilities: Sequence[str], agent_id: str, *,
        now: float, default_timeout: float, count: int, scope: LeaseScope = NO_FALLBACK,
        limits: DispatchLimits = NO_LIMITS,
    ) -> list[Lease]:
        """See TaskStore.lease_batch (no await inside, so the loop is atomic)."""
        leases: list[Lease] = []
        if not self._agents.accepts_leases(agent_id, now):
            return leases
        while len(leases) < count:
            lease = self._lease_one(namespace, capabilities, agent_id, now=now,
                                    default_timeout=default_timeout, scope=scope, limits=limits)
            if lease is None:
                break
            leases.append(lease)
        return leases

    async def renew_lease(self, task_id: str, fencing_token: int, deadline: float) -> Task:
        """See TaskStore.renew_lease."""
        task = self._running(task_id, fencing_token)
        renewed = replace(task, lease_deadline=deadline)
        self._tasks[task_id] = renewed
        heapq.heappush(self._lease_heap, (deadline, task_id, fencing_token))
        return renewed

    async def expired_leases(self, now: float, limit: int) -> list[Task]:
        """See TaskStore.expired_leases."""
        out: list[Task] = []
        heap = self._lease_heap
        while heap and heap[0][0] < now and len(out) < limit:
            deadline, task_id, token = heapq.heappop(heap)
            task = self._tasks.get(task_id)
            if (task is not None and task.state is TaskState.RUNNING
                    and task.fencing_token == token and task.lease_deadline == deadline):
                out.append(task)
        return out

    async def leases_of(self, agent_id: str) -> list[Task]:
        """See TaskStore.leases_of."""
        return [self._tasks[t] for t in self._by_agent.get(agent_id, ())]

    # -- results -----------------------------------------------------------------

    async def complete(self, task_id: str, fencing_token: int, output: Payload, *,
                       now: float) -> Transition:
        """See TaskStore.complete."""
        current = self._task(task_id)
        if current.state is TaskState.SUCCEEDED and current.fencing_token == fencing_token:
            return Transition()  # the same lease again: accepted, the first result stays
        task = self._running(task_id, fencing_token)
        changes: list[TaskChange] = []
        done = self._store(evolve_task(
            task, state=TaskState.SUCCEEDED, output=output, update_time=now, end_time=now,
            attempts=_close_attempt(task.attempts, now, None)), changes)
        wf = None
        if done.workflow_id:
            wf = self._advance_workflow(done, now, changes)
        return Transition(tuple(changes), wf)

    async def complete_many(self, items: Sequence[tuple[str, int, Payload]], *,
                            now: float) -> list[Transition | AgentMeshError]:
        """See TaskStore.complete_many."""
        out: list[Transition | AgentMeshError] = []
        for task_id, token, output in items:
            try:
                out.append(await self.complete(task_id, token, output, now=now))
            except (StaleLeaseError, NotFoundError) as exc:
                out.append(exc)
        return out

    def _advance_workflow(self, done: Task, now: float,
                          changes: list[TaskChange]) -> Workflow | None:
        wf = self._workflows[done.workflow_id]
        for dep_step in self._dependents[wf.id].get(done.step_id, ()):
            child = self._tasks[wf.step_tasks[dep_step]]
            if child.state is not TaskState.PENDING:
                continue
            parents = [self._tasks[wf.step_tasks[d]] for d in child.depends_on]
            if all(p.state is TaskState.SUCCEEDED for p in parents):
                outputs = {p.step_id: p.output or Payload() for p in parents}
                self._store(replace(child, state=TaskState.QUEUED, update_time=now,
                                    dependency_outputs=outputs), changes)
        if wf.state is WorkflowState.RUNNING and all(
                self._tasks[t].state is TaskState.SUCCEEDED for t in wf.step_tasks.values()):
            wf = replace(wf, state=WorkflowState.SUCCEEDED, end_time=now)
            self._workflows[wf.id] = wf
            return wf
        return None

    async def fail(self, task_id: str, fencing_token: int, failure: TaskFailure, *,
                   verdict: FailVerdict, retry_at: float, now: float) -> Transition:
        """See TaskStore.fail."""
        task = self._running(task_id, fencing_token)
        attempts = _close_attempt(task.attempts, now, failure)
        changes: list[TaskChange] = []
        if verdict is FailVerdict.RETRY:
            if retry_at <= now:
                self._store(replace(task, state=TaskState.QUEUED, failure=failure,
                                    attempts=attempts, update_time=now, agent_id=task.agent_id),
                            changes)
            else:
                self._store(replace(task, state=TaskState.RETRYING, failure=failure,
                                    attempts=attempts, update_time=now, retry_time=retry_at),
                            changes)
            return Transition(tuple(changes))
        state = TaskState.FAILED if verdict is FailVerdict.FAIL else TaskState.DEAD_LETTERED
        ended = self._store(replace(task, state=state, failure=failure, attempts=attempts,
                                    update_time=now, end_time=now), changes)
        wf = None
        if ended.workflow_id:
            reason = (f"step {ended.step_id!r} {state.name.lower().replace('_', '-')}: "
                      f"{failure.error_type}: {failure.message}")
            wf = self._fail_workflow(ended, reason, now, changes)
        return Transition(tuple(changes), wf)

    def _fail_workflow(self, ended: Task, reason: str, now: float,
                       changes: list[TaskChange]) -> Workflow | None:
        wf = self._workflows[ended.workflow_id]
        for step_id in self._descendants(wf.id, [ended.step_id]):
            child = self._tasks[wf.step_tasks[step_id]]
            if child.state in TERMINAL_TASK_STATES:
                continue
            self._store(replace(
                child, state=TaskState.CANCELLED, update_time=now, end_time=now,
                failure=TaskFailure("UPSTREAM_FAILED", f"upstream step {ended.step_id!r} ended "
                                    f"{ended.state.name}", non_retryable=True),
                attempts=_close_attempt(child.attempts, now, None)
                if child.state is TaskState.RUNNING else child.attempts), changes)
        if wf.state is WorkflowState.RUNNING:
            wf = replace(wf, state=WorkflowState.FAILED, failure_reason=reason, end_time=now)
            self._workflows[wf.id] = wf
            return wf
        return None

    def _descendants(self, workflow_id: str, roots: Iterable[str]) -> list[str]:
        dependents = self._dependents[workflow_id]
        seen: dict[str, None] = {}
        stack = list(roots)
        while stack:
            for child in dependents.get(stack.pop(), ()):
                if child not in seen:
                    seen[child] = None
                    stack.append(child)
        return list(seen)

    # -- timers ------------------------------------------------------------------

    async def promote_due(self, now: float, limit: int) -> Transition:
        """See TaskStore.promote_due."""
        changes: list[TaskChange] = []
        heap = self._retry_heap
        while heap and heap[0][0] <= now and len(changes) < limit:
            retry_time, task_id = heapq.heappop(heap)
            task = self._tasks.get(task_id)
            if task is not None and task.state is TaskState.RETRYING and (
                    task.retry_time == retry_time):
                self._store(replace(task, state=TaskState.QUEUED, update_time=now), changes)
        return Transition(tuple(changes))

    async def expire_queued(self, now: float, limit: int) -> Transition:
        """See TaskStore.expire_queued."""
        changes: list[TaskChange] = []
        wf: Workflow | None = None
        heap = self._s2s_heap
        ended = 0
        while heap and heap[0][0] < now and ended < limit:
            deadline, task_id = heapq.heappop(heap)
            task = self._tasks.get(task_id)
            if task is None or task.state is not TaskState.QUEUED or (
                    task.queue_deadline != deadline):
                continue
            ended += 1
            failure = TaskFailure(
                SCHEDULE_TO_START_TIMEOUT,
                f"no agent started it within {task.schedule_to_start_timeout:g}s",
                non_retryable=True)
            done = self._store(replace(task, state=TaskState.FAILED, failure=failure,
                                       update_time=now, end_time=now), changes)
            if done.workflow_id:
                reason = (f"step {done.step_id!r} failed: {failure.error_type}: "
                          f"{failure.message}")
                wf = self._fail_workflow(done, reason, now, changes) or wf
        return Transition(tuple(changes), wf)

    # -- human and client actions --------------------------------------------------

    async def cancel_task(self, task_id: str, reason: str, *, now: float) -> Transition:
        """See TaskStore.cancel_task."""
        task = self._task(task_id)
        if task.state in TERMINAL_TASK_STATES:
            raise FailedPreconditionError(
                f"tasks/{task_id} already ended ({task.state.name})", reason="TASK_ENDED")
        changes: list[TaskChange] = []
        attempts = (_close_attempt(task.attempts, now, None)
                    if task.state is TaskState.RUNNING else task.attempts)
        cancelled = self._store(replace(
            task, state=TaskState.CANCELLED, update_time=now, end_time=now, attempts=attempts,
            failure=TaskFailure("CANCELLED", reason or "cancelled by a client",
                                non_retryable=True)), changes)
        wf = None
        if cancelled.workflow_id:
            wf = self._fail_workflow(
                cancelled, f"step {cancelled.step_id!r} cancelled: {reason}", now, changes)
        return Transition(tuple(changes), wf)

    async def cancel_workflow(self, workflow_id: str, reason: str, *, now: float) -> Transition:
        """See TaskStore.cancel_workflow."""
        wf = self._workflows.get(workflow_id)
        if wf is None:
            raise NotFoundError("workflow", f"workflows/{workflow_id}")
        if wf.state is not WorkflowState.RUNNING:
            raise FailedPreconditionError(
                f"workflows/{workflow_id} already ended ({wf.state.name})",
                reason="WORKFLOW_ENDED")
        changes: list[TaskChange] = []
        for task_id in wf.step_tasks.values():
            task = self._tasks[task_id]
            if task.state in TERMINAL_TASK_STATES:
                continue
            attempts = (_close_attempt(task.attempts, now, None)
                        if task.state is TaskState.RUNNING else task.attempts)
            self._store(replace(task, state=TaskState.CANCELLED, update_time=now, end_time=now,
                                attempts=attempts, failure=TaskFailure(
                                    "CANCELLED", reason or "workflow cancelled",
                                    non_retryable=True)), changes)
        wf = replace(wf, state=WorkflowState.CANCELLED, end_time=now,
                     failure_reason=reason or "cancelled by a client")
        self._workflows[wf.id] = wf
        return Transition(tuple(changes), wf)

    async def redrive(self, task_id: str, new_input: Payload | None, *, now: float) -> Transition:
        """See TaskStore.redrive."""
        task = self._task(task_id)
        if task.state not in (TaskState.DEAD_LETTERED, TaskState.FAILED, TaskState.CANCELLED):
            raise FailedPreconditionError(
                f"tasks/{task_id} is {task.state.name}; only dead-lettered, failed or "
                "cancelled tasks can be re-driven", reason="TASK_NOT_REDRIVABLE")
        changes: list[TaskChange] = []
        wf = self._workflows.get(task.workflow_id) if task.workflow_id else None
        state = TaskState.QUEUED
        outputs = task.dependency_outputs
        if wf is not None and task.depends_on:
            parents = [self._tasks[wf.step_tasks[d]] for d in task.depends_on]
            if all(p.state is TaskState.SUCCEEDED for p in parents):
                outputs = {p.step_id: p.output or Payload() for p in parents}
            else:
                state = TaskState.PENDING
        self._store(replace(
            task, state=state, input=new_input if new_input is not None else task.input,
            human_intervened=True, budget_start=task.attempt, failure=None, end_time=0.0,
            update_time=now, seq=self._next_seq(), dependency_outputs=outputs), changes)
        new_wf = None
        if wf is not None:
            for step_id in self._descendants(wf.id, [task.step_id]):
                child = self._tasks[wf.step_tasks[step_id]]
                if child.state is TaskState.CANCELLED and child.failure is not None and (
                        child.failure.error_type == "UPSTREAM_FAILED"):
                    self._store(replace(child, state=TaskState.PENDING, failure=None,
                                        end_time=0.0, update_time=now), changes)
            still_failed = any(
                self._tasks[t].state in (TaskState.FAILED, TaskState.DEAD_LETTERED,
                                         TaskState.CANCELLED)
                for t in wf.step_tasks.values())
            if wf.state is not WorkflowState.RUNNING and not still_failed:
                new_wf = replace(wf, state=WorkflowState.RUNNING, failure_reason="", end_time=0.0)
                self._workflows[wf.id] = new_wf
        return Transition(tuple(changes), new_wf)

    async def stats(self, namespace: str) -> Stats:
        """See TaskStore.stats."""
        counts = {s: n for s, n in self._counts[namespace].items() if n}
        by_cap = {k: n for k, n in self._cap_counts[namespace].items() if n}
        return Stats(counts, self._ended[namespace], self._autonomous[namespace], by_cap)

    # -- snapshots ---------------------------------------------------------------

    async def export_records(self, namespace: str | None) -> TaskRecords:
        """See SnapshotSource.export_records (no await: one consistent cut)."""
        tasks = tuple(sorted((t for t in self._tasks.values()
                              if namespace is None or t.namespace == namespace),
                             key=lambda t: t.seq))
        workflows = tuple(sorted((w for w in self._workflows.values()
                                  if namespace is None or w.namespace == namespace),
                                 key=lambda w: w.seq))
        return TaskRecords(tasks, workflows, self._seq)

    async def import_records(self, records: TaskRecords, *, dry_run: bool = False) -> None:
        """See SnapshotSource.import_records."""
        namespaces = {t.namespace for t in records.tasks} | {
            w.namespace for w in records.workflows}
        busy = sorted(ns for ns in namespaces
                      if any(t.namespace == ns for t in self._tasks.values())
                      or any(w.namespace == ns for w in self._workflows.values()))
        if busy:
            raise FailedPreconditionError(
                f"cannot restore into namespace(s) {', '.join(busy)} holding tasks",
                reason="STORE_NOT_EMPTY", metadata={"namespaces": ",".join(busy)})
        if dry_run:
            return
        for wf in records.workflows:
            self._workflows[wf.id] = wf
            _insert_ordered(self._wf_order[wf.namespace], (wf.seq, wf.id))
            dependents: dict[str, list[str]] = {s.id: [] for s in wf.steps}
            for step in wf.steps:
                for dep in step.depends_on:
                    dependents[dep].append(step.id)
            self._dependents[wf.id] = dependents
        for task in records.tasks:
            self._store(task, [])
        self._seq = max(self._seq, records.seq)

    async def aclose(self) -> None:
        """Nothing to release."""


def _insert_ordered(order: list[tuple[int, str]], entry: tuple[int, str]) -> None:
    """Keep ``order`` sorted by seq: new seqs come last, so this is an append."""
    if not order or order[-1] < entry:
        order.append(entry)
    else:
        bisect.insort(order, entry)


def _already_exists(name: str) -> AlreadyExistsError:
    """The refusal of a create whose id is taken (``tasks/<id>``, ``workflows/<id>``)."""
    return AlreadyExistsError(f"{name} already exists", metadata={"existing": name})


def _close_attempt(attempts: tuple[TaskAttempt, ...], now: float,
                   failure: TaskFailure | None) -> tuple[TaskAttempt, ...]:
    if not attempts or attempts[-1].end_time is not None:
        return attempts
    return (*attempts[:-1], replace(attempts[-1], end_time=now, failure=failure))


def _with_queue_deadline(new: Task, prev: TaskState | None) -> Task:
    """Set ``queue_deadline`` on entry into QUEUED, clear it on leaving."""
    if new.state is TaskState.QUEUED:
        if prev is not TaskState.QUEUED:
            deadline = (new.update_time + new.schedule_to_start_timeout
                        if new.schedule_to_start_timeout > 0 else 0.0)
            if deadline != new.queue_deadline:
                return replace(new, queue_deadline=deadline)
        return new
    if new.queue_deadline:
        return replace(new, queue_deadline=0.0)
    return new


def _running_keys(task: Task) -> list[str]:
    """Counter keys a RUNNING task occupies: its capability and each label."""
    return ["c:" + task.capability, *(f"l:{k}={v}" for k, v in task.labels.items())]

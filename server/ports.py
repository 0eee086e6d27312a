"""The Protocols every backend implements.

Each method's docstring says what is atomic. Implementations: memory
(``server/backends/memory``), Redis (``server/backends/redis``); buses in
``server/bus``; blob stores in ``server/blob``. One conformance suite per port
(``tests/conformance``) proves every implementation.

Times (``now``, deadlines) are Unix seconds passed in by the caller, so tests
drive the clock and never sleep.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from server.domain.chunks import ChunkDraft, ChunkLimits, TaskChunk
from server.domain.errors import AgentMeshError
from server.domain.limits import NO_FALLBACK, NO_LIMITS, DispatchLimits, LeaseScope
from server.domain.models import (
    Agent,
    AgentState,
    Lease,
    Payload,
    StateEntry,
    StateEvent,
    Stats,
    Task,
    TaskChange,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowState,
)


class FailVerdict(enum.Enum):
    """What ``TaskStore.fail`` does with the task."""

    RETRY = "retry"
    """RETRYING until ``retry_at``; QUEUED at once when ``retry_at <= now``."""
    FAIL = "fail"
    """FAILED for good (non-retryable)."""
    DEAD_LETTER = "dead_letter"
    """DEAD_LETTERED: retries exhausted, a human must act."""


@dataclass(frozen=True, slots=True)
class Transition:
    """What one atomic store operation changed: tasks (in order) and the workflow."""

    tasks: tuple[TaskChange, ...] = ()
    workflow: Workflow | None = None

    @property
    def queued(self) -> list[Task]:
        """Tasks that became QUEUED (they need dispatch)."""
        return [c.task for c in self.tasks if c.task.state is TaskState.QUEUED]


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Filter of ``TaskStore.list_tasks``; None/empty/0 means any.

    ``labels``: every pair must be among the task's labels. ``created_after``
    and ``created_before`` bound ``create_time`` (``after <= t < before``).
    """

    namespace: str
    state: TaskState | None = None
    capability: str = ""
    workflow_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_after: float = 0.0
    created_before: float = 0.0

    def matches(self, task: Task) -> bool:
        """Whether ``task`` passes the filter (the one definition every store keeps to)."""
        if task.namespace != self.namespace:
            return False
        if self.state is not None and task.state is not self.state:
            return False
        if self.capability and task.capability != self.capability:
            return False
        if self.workflow_id and task.workflow_id != self.workflow_id:
            return False
        if self.created_after and task.create_time < self.created_after:
            return False
        if self.created_before and task.create_time >= self.created_before:
            return False
        labels = task.labels
        return all(labels.get(k) == v for k, v in self.labels.items())


@dataclass(frozen=True, slots=True)
class AgentFilter:
    """Filter of ``AgentRegistry.list``. ``states`` empty means any state."""

    namespace: str
    capability: str = ""
    states: frozenset[AgentState] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class TaskStore(Protocol):
    """Tasks, workflows, ready queues, leases and timers.

    Ready queues are per (namespace, capability), ordered by priority (higher
    first) then ``seq`` (FIFO). Every method is one atomic step: two replicas
    can never both lease a task or both accept a result for it.

    Task ids and workflow ids are each unique in the store (across
    namespaces): a create never replaces an existing task or workflow.
    A TaskStore shares its AgentRegistry (the same Redis prefix; the
    in-memory store is built with its registry), and a lease step reads the
    agent's liveness from it atomically with the grant.
    """

    async def create_task(
        self, task: Task, *, request_id: str = "", max_queued: int = 0
    ) -> tuple[Task, bool, Transition]:
        """Insert a QUEUED task. Atomic with the idempotency and uniqueness checks.

        In this order, in one step:

        1. ``request_id`` (non-empty) was used before in the task's namespace:
           returns the task that request created and ``False``, and changes
           nothing. The request id wins (AIP-155): this holds whatever
           ``task`` is now, also when ``task.id`` is another id (no task of
           that id is created) or the id of another existing task.
        2. A task ``task.id`` exists (in any namespace): raises
           AlreadyExistsError naming it (``tasks/<id>``, also in
           ``metadata["existing"]``) and changes nothing. So a caller that
           may repeat a create (a retry after a lost reply) passes a
           ``request_id``; without one the repeat is refused.
        3. ``max_queued`` > 0 and the namespace holds that many
           QUEUED/PENDING/RETRYING tasks: raises ResourceExhaustedError.

        The store assigns ``seq``.
        """
        ...

    async def create_tasks(
        self, items: Sequence[tuple[Task, str]], *, max_queued: int = 0,
    ) -> tuple[list[tuple[Task, bool, Transition]], bool]:
        """Several ``create_task`` calls (task, request_id) in order, in one atomic step.

        First the whole batch is checked, before anything is written. An item
        whose ``request_id`` was used before in its namespace, in the store or
        by an earlier item of the batch, is a replay: it will return that
        request's task (``False``) and its own id is not checked. Every other
        item's id must be neither a stored task's id nor the id of an earlier
        non-replay item (a batch may not repeat an id). The first item that
        breaks this raises AlreadyExistsError naming ``tasks/<id>`` (also in
        ``metadata["existing"]``), and nothing of the batch is written, even
        items before it and whatever the queue bound.

        Then each item as ``create_task``, in order. Stops at the first item
        that would exceed ``max_queued``: returns the results before it and
        ``True`` (the batch was cut short, those before it are written);
        otherwise all results and ``False``.
        """
        ...

    async def create_workflow(
        self, workflow: Workflow, tasks: Sequence[Task], *, request_id: str = "",
        max_queued: int = 0,
    ) -> tuple[Workflow, bool, Transition]:
        """Insert a workflow and its step tasks (PENDING, or QUEUED if no deps) atomically.

        In this order, in one step: a ``request_id`` used before (for a
        workflow of the namespace) returns that workflow and ``False``, changing
        nothing, whatever ``workflow`` is now (the request id wins, as in
        ``create_task``). Then the workflow's id must not be a stored
        workflow's (AlreadyExistsError ``workflows/<id>``), and no step task id
        (``<workflow>-<step>``) may be a stored task's or repeat another step's
        (AlreadyExistsError ``tasks/<id>``); the name is also in
        ``metadata["existing"]``. Then the queue bound, as in ``create_task``
        (counting every step). A refusal writes nothing: neither the workflow
        nor any step.
        """
        ...

    async def get_tasks(self, task_ids: Sequence[str]) -> list[Task | None]:
        """Several tasks in one read, in the order asked (None where unknown)."""
        ...

    async def get_task(self, task_id: str) -> Task | None:
        """One task, or None."""
        ...

    async def list_tasks(self, flt: TaskFilter, *, before_seq: int, limit: int) -> list[Task]:
        """Tasks matching ``flt`` with ``seq < before_seq`` (0: no bound), newest first.

        Matching is ``TaskFilter.matches``. The cost is the page plus the tasks
        skipped to fill it (newest first), never a sort of the namespace.
        """
        ...

    async def scan_tasks(self, flt: TaskFilter, *, before_seq: int, limit: int,
                         max_scan: int) -> tuple[list[Task], int]:
        """``list_tasks`` reading at most ``max_scan`` tasks, for pages whose cost is bounded.

        Returns the matches (at most ``limit``, newest first) and where to resume:
        the seq of the last task read (pass it as ``before_seq``), or 0 when
        there is nothing older to read. A page may thus hold fewer than
        ``limit`` tasks, even none, and still not be the last.
        """
        ...

    async def get_workflow(self, workflow_id: str) -> Workflow | None:
        """One workflow, or None."""
        ...

    async def list_workflows(
        self, namespace: str, state: WorkflowState | None, *, before_seq: int, limit: int
    ) -> list[Workflow]:
        """Workflows of a namespace, newest first, ``seq < before_seq`` (0: no bound)."""
        ...

    async def lease_next(
        self, namespace: str, capabilities: Sequence[str], agent_id: str, *,
        now: float, default_timeout: float, scope: LeaseScope = NO_FALLBACK,
        limits: DispatchLimits = NO_LIMITS,
    ) -> Lease | None:
        """Atomically take the best QUEUED task among the capabilities' queues.

        The task becomes RUNNING with ``attempt + 1``, ``fencing_token + 1``,
        ``agent_id``, ``start_time = now``, a new TaskAttempt appended, and
        ``lease_deadline = now + min(execution_timeout or default_timeout,
        heartbeat_timeout or inf)``. Returns None when nothing may be taken.

        Only a live agent gets a lease: in the same atomic step the store reads
        ``agent_id`` in the AgentRegistry it shares, and unless that agent
        exists, is ACTIVE (not DRAINING, not GONE) and has ``expire_time >
        now``, nothing is leased and None is returned (not an error).

        Also eligible, in the same priority order: tasks whose primary
        capability is not in ``scope.available`` and whose fallback capability
        is in ``scope.fallback_for``; such a task gets ``served_by_fallback``.
        In the same atomic step the store enforces ``limits``: RUNNING counts
        per (namespace, capability) and per (namespace, key label value), and a
        token bucket per (namespace, capability) for rates. A task blocked by a
        key limit is skipped for the next one in its queue (scan depth
        ``server.domain.limits.KEY_SCAN``).
        """
        ...

    async def lease_batch(
        self, namespace: str, capabilities: Sequence[str], agent_id: str, *,
        now: float, default_timeout: float, count: int, scope: LeaseScope = NO_FALLBACK,
        limits: DispatchLimits = NO_LIMITS,
    ) -> list[Lease]:
        """Up to ``count`` leases in one atomic step, as ``count`` calls of
        ``lease_next`` would give them (same order, limits re-checked each time).

        ``[]`` unless the agent is live, checked as in ``lease_next`` in the same step.
        """
        ...

    async def expire_queued(self, now: float, limit: int) -> Transition:
        """QUEUED tasks whose ``queue_deadline < now`` become FAILED (at most ``limit``).

        The failure is ``SCHEDULE_TO_START_TIMEOUT`` (non-retryable); for a
        workflow step the dependents are cancelled and the workflow FAILED, as
        in ``fail``. Entering QUEUED sets ``queue_deadline = update_time +
        schedule_to_start_timeout`` when that timeout is set. Atomic per task.
        """
        ...

    async def complete(self, task_id: str, fencing_token: int, output: Payload, *,
                       now: float) -> Transition:
        """Accept a result. Atomic with the fencing check.

        Raises NotFoundError for an unknown task and StaleLeaseError unless the
        task is RUNNING with exactly this token. The task becomes SUCCEEDED.
        A repeat with the token of the lease that already succeeded (a
        re-delivered report, or a store call retried after its reply was lost)
        returns an empty Transition: accepted, nothing changes, the first
        result stays. For
        a workflow step, every dependent whose dependencies all succeeded becomes
        QUEUED with ``dependency_outputs`` filled, and the workflow becomes
        SUCCEEDED when its last step does.
        """
        ...

    async def complete_many(self, items: Sequence[tuple[str, int, Payload]], *,
                            now: float) -> list[Transition | AgentMeshError]:
        """Several ``complete`` calls (task_id, token, output) in one step.

        One entry per item, in order: the Transition, or the error ``complete``
        would have raised (NotFoundError, StaleLeaseError). Each item is fenced
        exactly as ``complete``.
        """
        ...

    async def fail(self, task_id: str, fencing_token: int, failure: TaskFailure, *,
                   verdict: FailVerdict, retry_at: float, now: float) -> Transition:
        """Record a failed attempt. Atomic with the fencing check (as ``complete``).

        The current TaskAttempt gets ``end_time`` and ``failure``. RETRY: RETRYING
        with ``retry_time = retry_at`` (QUEUED at once when ``retry_at <= now``).
        FAIL / DEAD_LETTER: terminal; for a workflow step every transitive
        dependent that has not ended becomes CANCELLED and the workflow FAILED
        with a reason naming the step.
        """
        ...

    async def renew_lease(self, task_id: str, fencing_token: int, deadline: float) -> Task:
        """Move a RUNNING task's deadline (progress report). StaleLeaseError as ``complete``."""
        ...

    async def expired_leases(self, now: float, limit: int) -> list[Task]:
        """RUNNING tasks whose ``lease_deadline < now`` (at most ``limit``)."""
        ...

    async def leases_of(self, agent_id: str) -> list[Task]:
        """RUNNING tasks leased to one agent."""
        ...

    async def promote_due(self, now: float, limit: int) -> Transition:
        """RETRYING tasks with ``retry_time <= now`` become QUEUED (at most ``limit``)."""
        ...

    async def cancel_task(self, task_id: str, reason: str, *, now: float) -> Transition:
        """Cancel a task that has not ended (NotFoundError / FailedPreconditionError).

        For a workflow step, dependents are cancelled and the workflow FAILED.
        """
        ...

    async def cancel_workflow(self, workflow_id: str, reason: str, *, now: float) -> Transition:
        """Cancel every step that has not ended; the workflow becomes CANCELLED."""
        ...

    async def redrive(self, task_id: str, new_input: Payload | None, *, now: float) -> Transition:
        """A human re-drives a DEAD_LETTERED, FAILED or CANCELLED task.

        The task becomes QUEUED with ``human_intervened = True`` and a fresh retry
        budget (attempt numbers keep growing). For a workflow step, dependents
        cancelled because of it go back to PENDING and the workflow to RUNNING.
        FailedPreconditionError for any other state.
        """
        ...

    async def stats(self, namespace: str) -> Stats:
        """Counts by state and the autonomy figures."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class ChunkStore(Protocol):
    """Per-task logs of streamed partial results (``server/domain/chunks.py``).

    A ChunkStore shares its TaskStore (the in-memory one is built with it; on
    Redis the same prefix) and fences every append against the task record in
    the same atomic step, as ``TaskStore.complete`` fences a result.
    """

    async def append_chunks(self, task_id: str, fencing_token: int,
                            drafts: Sequence[ChunkDraft], *, now: float,
                            limits: ChunkLimits) -> list[TaskChunk]:
        """Append chunks to a task's log, all or none, in one atomic step.

        NotFoundError for an unknown task; StaleLeaseError (metadata
        ``current_token``) unless the task is RUNNING with exactly this token.
        ResourceExhaustedError (reason ``CHUNK_LIMIT``) when the log would
        hold more than ``limits.max_chunks_per_task``: nothing is written.
        Otherwise the chunks get the next numbers (the first chunk of a task
        is 1, no gaps), the task's current attempt and ``create_time = now``,
        and the whole log is kept until ``now + limits.retention``. Sizes are
        the caller's to check (``check_drafts``).
        """
        ...

    async def chunks_after(self, task_id: str, after_seq: int, limit: int, *,
                           now: float) -> list[TaskChunk]:
        """Chunks with ``seq > after_seq`` in order, at most ``limit`` (none once expired)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class AgentRegistry(Protocol):
    """Agent cards and sessions. Each method is atomic on one agent.

    The TaskStore sharing this registry reads an agent's state and
    ``expire_time`` in its lease step (see ``TaskStore.lease_next``): only an
    ACTIVE agent whose ``expire_time`` is later than the lease's ``now`` gets
    a lease, so every change here (heartbeat, set_state, a new registration)
    counts for the next lease.
    """

    async def register(self, agent: Agent) -> Agent:
        """Insert an agent (its id is unique)."""
        ...

    async def get(self, agent_id: str) -> Agent | None:
        """One agent, or None."""
        ...

    async def list_agents(self, flt: AgentFilter, *, after_id: str, limit: int) -> list[Agent]:
        """Agents matching ``flt`` with ``id > after_id``, ordered by id."""
        ...

    async def heartbeat(self, agent_id: str, *, in_flight: int, load: float, now: float,
                        expire_time: float) -> Agent | None:
        """Record a beat of a live agent; None when unknown or GONE."""
        ...

    async def set_state(self, agent_id: str, state: AgentState, *, now: float) -> Agent | None:
        """Change the state; None when unknown. GONE is final."""
        ...

    async def expired(self, now: float) -> list[Agent]:
        """Live (ACTIVE/DRAINING) agents whose ``expire_time < now``."""
        ...

    async def live_capabilities(self, namespace: str) -> frozenset[str]:
        """Capabilities offered by at least one ACTIVE agent of the namespace."""
        ...

    async def purge(self, before: float) -> int:
        """Forget GONE agents last seen before ``before``.

        Last seen is the last heartbeat, or the registration of an agent that
        never beat (``heartbeat_time`` 0): such an agent is kept as long as
        any other, not dropped at the first purge after it went GONE.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class LockGrant:
    """A lock's current grant. ``fencing_token`` grows with every grant of the lock."""

    name: str
    owner: str
    agent_id: str
    fencing_token: int
    expire_time: float


@dataclass(frozen=True, slots=True)
class NamespaceDump:
    """One namespace's state at one revision (snapshots)."""

    revision: int
    entries: tuple[StateEntry, ...]
    lock_tokens: Mapping[str, int] = field(default_factory=dict)
    """Last fencing token granted per lock name (holders are not kept)."""


@dataclass(frozen=True, slots=True)
class TaskRecords:
    """Task and workflow records of a TaskStore (snapshots)."""

    tasks: tuple[Task, ...]
    workflows: tuple[Workflow, ...]
    seq: int
    """The store's ``seq`` counter."""


@runtime_checkable
class SnapshotSource(Protocol):
    """A TaskStore that can export and import its records (snapshots)."""

    async def export_records(self, namespace: str | None) -> TaskRecords:
        """Every task and workflow (of ``namespace``, or all), read atomically."""
        ...

    async def import_records(self, records: TaskRecords, *, dry_run: bool = False) -> None:
        """Insert the records with their indexes, atomically.

        FailedPreconditionError (nothing written) when a namespace of the
        records already holds tasks or workflows. ``dry_run`` only checks.
        """
        ...


@runtime_checkable
class StateStore(Protocol):
    """Versioned key-value entries per namespace, with a change log, and locks.

    Every write bumps the namespace revision by one and appends a StateEvent to
    a bounded log, atomically with the write. A write may name a lock and a
    fencing token (``fence=(lock, token)``): it happens only while that token is
    the lock's current, unexpired grant, checked atomically with the write
    (AbortedError reason STALE_FENCING_TOKEN otherwise).

    Locks live per namespace, apart from the entries (they bump no revision).
    Each lock keeps the last token it granted forever, so tokens are never
    reused, also across expiry and release.
    """

    async def get(self, namespace: str, key: str, *, now: float) -> StateEntry | None:
        """One live (not expired) entry, or None."""
        ...

    async def put(self, namespace: str, key: str, value: Payload, *,
                  expected_version: int | None, ttl: float, now: float,
                  fence: tuple[str, int] | None = None) -> StateEntry:
        """Write a key; compare-and-set when ``expected_version`` is given.

        ``expected_version == 0`` means the key must not exist. A mismatch raises
        AbortedError (reason VERSION_MISMATCH). ``ttl`` > 0 sets an expiry.
        ``fence`` as in the class docstring (checked before the version).
        """
        ...

    async def delete(self, namespace: str, key: str, *, expected_version: int | None,
                     now: float, fence: tuple[str, int] | None = None) -> int:
        """Delete a key and return the revision. NotFoundError / AbortedError."""
        ...

    async def acquire_lock(self, namespace: str, name: str, owner: str, *, agent_id: str,
                           ttl: float, now: float) -> LockGrant:
        """Grant the lock with token ``last + 1`` until ``now + ttl``, atomically.

        Granted when the lock is free, its lease ended (``expire_time <= now``),
        or it is held by the same non-empty ``owner`` (a re-grant that fences
        off the older token). Otherwise AbortedError reason LOCK_HELD with
        metadata ``owner``, ``agent``, ``expire_time`` (Unix seconds) of the holder.
        """
        ...

    async def renew_lock(self, namespace: str, name: str, fencing_token: int, *, ttl: float,
                         now: float) -> LockGrant:
        """Move the current grant's expiry to ``now + ttl``.

        AbortedError STALE_FENCING_TOKEN unless ``fencing_token`` is the current,
        unexpired grant.
        """
        ...

    async def release_lock(self, namespace: str, name: str, fencing_token: int, *,
                           now: float) -> bool:
        """Free the lock; True when this call freed a held lock.

        Idempotent for the latest grant (already released or expired: False).
        AbortedError STALE_FENCING_TOKEN for any other token.
        """
        ...

    async def release_agent_locks(self, agent_id: str, *, now: float) -> list[tuple[str, str]]:
        """Free every lock held by an agent session; returns (namespace, name) of each."""
        ...

    async def export_state(self, namespace: str | None, *, now: float) -> dict[str, NamespaceDump]:
        """Every live entry and lock counter (of ``namespace`` or all), read atomically."""
        ...

    async def import_state(self, dump: Mapping[str, NamespaceDump], *,
                           dry_run: bool = False) -> None:
        """Load dumps atomically, keeping versions and revisions.

        FailedPreconditionError (nothing written) when one of the namespaces
        already has a revision or a lock. ``dry_run`` only checks.
        """
        ...

    async def list_entries(self, namespace: str, prefix: str, *, after_key: str, limit: int,
                   now: float) -> list[StateEntry]:
        """Live entries under ``prefix`` with ``key > after_key``, ordered by key."""
        ...

    async def events_since(self, namespace: str, prefix: str, after_revision: int,
                           limit: int) -> list[StateEvent]:
        """Logged changes under ``prefix`` with revision > ``after_revision``, oldest first.

        OutOfRangeError when the log no longer reaches back to ``after_revision``.
        """
        ...

    async def revision(self, namespace: str) -> int:
        """The namespace's current revision (0 before any write)."""
        ...

    async def list_locks(self, namespace: str, *, now: float, limit: int) -> list[LockGrant]:
        """Locks of the namespace held at ``now`` (unexpired grants), ordered by name,
        at most ``limit``. One read (a consistent cut of the namespace's locks)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class BusMessage:
    """A message as delivered. ``ack`` is set for durable subscriptions only."""

    subject: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    publish_time: float = 0.0
    ack: Callable[[], Awaitable[None]] | None = None


class Subscription(Protocol):
    """A live subscription: iterate to receive; bounded, drops counted."""

    @property
    def dropped(self) -> int:
        """Messages dropped because the subscriber did not keep up."""
        ...

    def __aiter__(self) -> AsyncIterator[BusMessage]:
        """Messages in publish order (per publisher)."""
        ...

    def take_ready(self, limit: int) -> list[BusMessage]:
        """Up to ``limit`` messages already received, in order, without waiting.

        For a reader that has just received one message through iteration and
        wants the ones queued behind it in the same step (batching); an empty
        list when none wait or the subscription has ended.
        """
        ...

    async def unsubscribe(self) -> None:
        """Stop receiving; iteration ends. Safe to repeat."""
        ...


@runtime_checkable
class Bus(Protocol):
    """Publish/subscribe with headers.

    Subjects are dot-separated tokens; patterns accept ``*`` (one token) and
    ``>`` (one or more trailing tokens). A queue group delivers each message to
    one member of the group. ``durable`` asks for at-least-once delivery with
    acknowledgements that survives the subscriber's restart (JetStream).
    """

    async def publish(self, subject: str, data: bytes,
                      headers: Mapping[str, str] | None = None) -> None:
        """Send a message; returns once the bus has it."""
        ...

    async def subscribe(self, pattern: str, *, queue_group: str = "", durable: str = "",
                        max_pending: int = 10_000) -> Subscription:
        """Start receiving matching messages (only those published from now on,
        except for a durable subscription resuming where it left off)."""
        ...

    async def drain(self) -> None:
        """Deliver what is in flight, then stop. Safe to repeat."""
        ...

    async def aclose(self) -> None:
        """Close at once. Safe to repeat."""
        ...


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob's key, size and modification time."""

    key: str
    size: int
    modified: float


@runtime_checkable
class BlobStore(Protocol):
    """Whole-object storage for snapshots and artifacts."""

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any previous object atomically."""
        ...

    async def get(self, key: str) -> bytes:
        """The object; NotFoundError when absent."""
        ...

    async def list(self, prefix: str) -> list[BlobInfo]:
        """Objects under ``prefix``, ordered by key."""
        ...

    async def delete(self, key: str) -> None:
        """Remove an object; absent keys are not an error."""
        ...

    async def aclose(self) -> None:
        """Release resources."""
        ...

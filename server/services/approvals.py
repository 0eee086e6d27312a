"""The human desk: tasks that wait for a person (approvals and input).

A task of capability ``human`` (``server/domain/human.py``) is leased, as
soon as it is QUEUED, to the namespace's desk: an agent record this service
keeps live in the registry (``human-desk-<namespace>``, never attached to a
stream, with a secret session token nobody holds). So a waiting task is
RUNNING like any leased task, visible as ``awaiting_human``, fenced by its
token, and bounded by its lease: the approval timeout (the task's execution
timeout, else ``timeout``). Past it the lease reaper ends the attempt as it
ends every expired lease, and with its one attempt the task is
DEAD_LETTERED; this service then escalates it (bus and log). ``RetryTask``
asks again.

A decision goes through the ordinary fenced report paths
(``Leases.report_results`` / ``Leases.report_failure``), so a decision that
races the timeout, or a second decision, is refused like a stale result.
Every decision is audited: a log line with the fields, and a state entry
``_approvals/<task>`` in the task's namespace (who, role, when, what).

Notifications travel on the task's namespace bus subjects (the BusService's,
so any language can listen): ``approvals.requested``, ``approvals.decided``
and ``approvals.escalated``, with JSON bodies.

Every replica runs a desk loop: leasing is atomic in the store, so two
replicas never take the same task; escalations go through a queue group, so
one replica sends each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any

from server.aio import raise_if_cancelling
from server.domain import human
from server.domain.errors import FailedPreconditionError, NotFoundError, StaleLeaseError
from server.domain.models import (
    DEFAULT_NAMESPACE,
    Agent,
    AgentState,
    Capability,
    Payload,
    Task,
    TaskFailure,
    TaskState,
)
from server.ports import AgentRegistry, Bus, Subscription, TaskStore
from server.services import events
from server.services.clock import Clock
from server.services.leases import Leases
from server.services.sessions import ReportOutcome
from server.services.state import StateService
from server.services.task_events import TaskEvents

log = logging.getLogger(__name__)

AUDIT_PREFIX = "_approvals/"
SWEEP = 1.0
"""Seconds between re-checks for waiting human tasks (wake-ups can be lost)."""
_DESK_LIFE = 10 * 365 * 86_400.0
_BATCH = 100


def _json(value: Any) -> Payload:
    return Payload(json.dumps(value, separators=(",", ":")).encode(),
                   {"encoding": b"json/plain"})


def _decode(payload: Payload | None) -> Any:
    """A task input for the notification: JSON as its value, anything else as text.

    The input is whatever the submitter sent: a "JSON" one that does not parse (or
    nests past the parser's depth) failed the desk's whole pass, so that task's and the
    rest of its batch's ``approvals.requested`` were never sent.
    """
    if payload is None:
        return None
    if payload.metadata.get("encoding") == b"json/plain":
        try:
            return json.loads(payload.data)
        except (ValueError, RecursionError):
            pass
    return payload.data.decode(errors="replace") if payload.data else None


class HumanDesk:
    """Holds the human tasks of every namespace until a person answers them."""

    def __init__(self, tasks: TaskStore, agents: AgentRegistry, bus: Bus, clock: Clock, *,
                 leases: Leases, task_events: TaskEvents, state: StateService,
                 timeout: float) -> None:
        self._tasks = tasks
        self._agents = agents
        self._bus = bus
        self._clock = clock
        self._leases = leases
        self._events = task_events
        self._state = state
        self.timeout = timeout
        self._namespaces: set[str] = {DEFAULT_NAMESPACE}
        self._desks: dict[str, float] = {}  # namespace -> when its desk was last written
        self._wake = asyncio.Event()

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Take waiting human tasks and escalate timed-out ones, until cancelled."""
        ready = await self._bus.subscribe(events.READY_ALL)
        dead = await self._bus.subscribe(
            f"_sys.task.*.ended.{int(TaskState.DEAD_LETTERED)}",
            queue_group="agentmesh-human-desk")
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._listen_ready(ready))
                group.create_task(self._listen_dead(dead))
                while True:
                    raise_if_cancelling()
                    for namespace in sorted(self._namespaces):
                        try:
                            await self.take(namespace)
                        except Exception:
                            log.exception("human desk pass of %s failed", namespace)
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SWEEP):
                            await self._wake.wait()
        finally:
            await ready.unsubscribe()
            await dead.unsubscribe()

    async def _listen_ready(self, sub: Subscription) -> None:
        async for message in sub:
            caps = events.decode(message.data).get("caps") or ()
            if human.HUMAN_CAPABILITY in caps:
                self._namespaces.add(message.subject.rsplit(".", 1)[-1])
                self._wake.set()

    async def _listen_dead(self, sub: Subscription) -> None:
        async for message in sub:
            body = events.decode(message.data)
            if body.get("cap") != human.HUMAN_CAPABILITY:
                continue
            try:
                task = await self._tasks.get_task(str(body.get("id", "")))
                if task is not None and task.state is TaskState.DEAD_LETTERED:
                    await self.escalate(task)
            except Exception:
                log.exception("escalation of a timed-out human task failed")

    async def _desk(self, namespace: str) -> str:
        """The namespace's desk agent, kept ACTIVE (written again once a day)."""
        agent_id = human.desk_id(namespace)
        now = self._clock.now()
        if now - self._desks.get(namespace, -1e18) < 86_400.0:
            return agent_id
        current = await self._agents.get(agent_id)
        if current is None or current.state is not AgentState.ACTIVE \
                or current.expire_time < now + _DESK_LIFE / 2:
            await self._agents.register(Agent(
                id=agent_id, display_name="human desk", namespace=namespace,
                capabilities=(Capability(human.HUMAN_CAPABILITY, description=(
                    "A person approves, rejects or supplies input (agentmesh approvals)")),),
                max_concurrency=10_000, state=AgentState.ACTIVE, register_time=now,
                heartbeat_time=now, expire_time=now + _DESK_LIFE,
                session_token=secrets.token_hex(32),
                description="Tasks that wait for a person"))
        self._desks[namespace] = now
        return agent_id

    async def take(self, namespace: str) -> int:
        """Lease every QUEUED human task of a namespace to its desk; returns how many."""
        agent_id = await self._desk(namespace)
        taken = 0
        while True:
            now = self._clock.now()
            leases = await self._tasks.lease_batch(
                namespace, [human.HUMAN_CAPABILITY], agent_id, now=now,
                default_timeout=self.timeout, count=_BATCH)
            for lease in leases:
                taken += 1
                await self._events.leased(lease, now)
                task = lease.task
                log.info("task %s waits for a person (until %.0f)", task.id, lease.deadline,
                         extra={"task_id": task.id, "workflow_id": task.workflow_id,
                                "event": "approval_requested"})
                await self._notify(task, "approvals.requested", {
                    "task": f"tasks/{task.id}", "workflow": task.workflow_id,
                    "step": task.step_id, "input": _decode(task.input),
                    "upstream": sorted(task.dependency_outputs),
                    "expire_time": lease.deadline})
            if len(leases) < _BATCH:
                return taken

    async def escalate(self, task: Task) -> None:
        """A human task timed out: say so loudly (a person must act: RetryTask)."""
        log.warning("task %s timed out waiting for a person: dead-lettered; re-drive it "
                    "(agentmesh tasks retry %s) to ask again", task.id, task.id,
                    extra={"task_id": task.id, "workflow_id": task.workflow_id,
                           "event": "approval_escalated"})
        await self._notify(task, "approvals.escalated", {
            "task": f"tasks/{task.id}", "workflow": task.workflow_id, "step": task.step_id,
            "reason": task.failure.message if task.failure else "timed out"})

    async def _notify(self, task: Task, subject: str, body: dict[str, Any]) -> None:
        # The header is how BusService subscribers learn the payload's encoding.
        await events.announce(self._bus, events.user_subject(task.namespace, subject),
                              json.dumps(body, separators=(",", ":"), default=str).encode(),
                              {"payload-encoding": "json/plain"})

    # -- decisions -------------------------------------------------------------------

    async def resolve(self, task_id: str, decision: human.Decision, *, value: Any = None,
                      comment: str = "", who: str, role: str) -> Task:
        """Apply a person's decision to a waiting human task (audited)."""
        task = await self._tasks.get_task(task_id)
        if task is None:
            raise NotFoundError("task", f"tasks/{task_id}")
        if not human.awaiting_human(task):
            raise FailedPreconditionError(
                f"tasks/{task_id} does not wait for a person (capability {task.capability!r}, "
                f"{task.state.name})", reason=human.NOT_AWAITING_HUMAN,
                metadata={"task": f"tasks/{task_id}", "state": task.state.name})
        now = self._clock.now()
        record = human.decision_record(task, decision, who=who, role=role, when=now,
                                       comment=comment, value=value)
        token = task.fencing_token
        if decision is human.Decision.REJECT:
            outcome = await self._leases.report_failure(None, task_id, token, TaskFailure(
                human.REJECTED, f"rejected by {who}" + (f": {comment}" if comment else ""),
                non_retryable=True))
        else:
            outcome = (await self._leases.report_results(
                None, [(task_id, token, _json(record))]))[0]
        if outcome != ReportOutcome.ACCEPTED:
            current = await self._tasks.get_task(task_id)
            state = current.state.name if current is not None else "gone"
            if outcome == ReportOutcome.NOT_RUNNING:
                raise FailedPreconditionError(
                    f"tasks/{task_id} no longer waits for a person ({state}): the decision "
                    "was not applied", reason=human.NOT_AWAITING_HUMAN,
                    metadata={"task": f"tasks/{task_id}", "state": state})
            raise StaleLeaseError(f"tasks/{task_id} was asked again meanwhile: decide again",
                                  metadata={"task": f"tasks/{task_id}"})
        log.info("task %s %s by %s (%s)", task_id, record["decision"], who, role,
                 extra={"task_id": task_id, "workflow_id": task.workflow_id,
                        "event": "approval_decided", "decision": record["decision"],
                        "approver": who})
        await self._state.put(task.namespace, f"{AUDIT_PREFIX}{task_id}", _json(record),
                              expected_version=None, ttl=0.0)
        await self._notify(task, "approvals.decided", record)
        done = await self._tasks.get_task(task_id)
        assert done is not None
        return done


__all__ = ["AUDIT_PREFIX", "HumanDesk"]

"""Task events out of this replica: bus announcements, wake-ups, lifecycle logs.

Every change the store reports (a ``Transition``) and every lease handed to
an agent goes through here once: it is announced on the bus (watchers and
other replicas), the metrics/tracing observer sees it, the local dispatcher
is woken when work became ready (other replicas hear of it when the local
dispatcher could not take it all: ``offer``), and it is logged with ``task_id``,
``workflow_id`` and ``agent_id`` as fields. Routine steps (created, leased,
succeeded) log at DEBUG, everything a person may have to look into (a
requeue, a failed attempt, a retry, a dead letter, a cancellation) at INFO.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence, Set
from typing import Protocol

from server.domain.models import Lease, Task, TaskState
from server.ports import Bus, Transition
from server.services import events

log = logging.getLogger(__name__)

RECENT_TASKS = 4096
"""Task versions this replica made lately, kept for its own watchers: an event
whose version is here needs no store read (a Redis round trip)."""


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


_ROUTINE = frozenset({TaskState.QUEUED, TaskState.PENDING, TaskState.RUNNING,
                      TaskState.SUCCEEDED})


class TaskEvents:
    """Publishes what changed; owns the recent-version cache of local watchers."""

    def __init__(self, bus: Bus, observer: SchedulerObserver, work_ready: asyncio.Event,
                 replica: str) -> None:
        self._bus = bus
        self.observer = observer
        self._work_ready = work_ready
        self.replica = replica
        self.origin = {events.ORIGIN_HEADER: replica}
        self.recent: OrderedDict[str, Task] = OrderedDict()
        self._watchers = 0
        self._ready: dict[str, set[str]] = {}

    # -- watchers' cache ---------------------------------------------------------------

    def watcher_joined(self) -> None:
        """A local watcher started: keep versions for it."""
        self._watchers += 1

    def watcher_left(self) -> None:
        """A local watcher ended; with none left the cache goes."""
        self._watchers -= 1
        if not self._watchers:
            self.recent.clear()

    # -- announcements -------------------------------------------------------------------

    async def after(self, transition: Transition, now: float) -> None:
        """Publish a store transition, log it, wake dispatchers for new work."""
        self.observer.transition(transition, now)
        ready: dict[str, set[str]] = {}
        for change in transition.tasks:
            t = change.task
            _log_change(t, change.previous_state)
            await self.announce(t)
            if t.state is TaskState.QUEUED:
                caps = ready.setdefault(t.namespace, set())
                caps.add(t.capability)
                if t.fallback_capability:  # a fallback agent may take it: wake its replica too
                    caps.add(t.fallback_capability)
        if transition.workflow is not None:
            wf = transition.workflow
            log.info("workflow %s is %s", wf.id, wf.state.name,
                     extra={"workflow_id": wf.id, "state": wf.state.name})
            await events.announce(self._bus, events.workflow_subject(wf.namespace), events.encode(
                {"id": wf.id, "state": int(wf.state)}))
        if ready:
            for namespace, caps in ready.items():
                self._ready.setdefault(namespace, set()).update(caps)
            self._work_ready.set()
            # Let the dispatcher, just woken, lease the new work before this caller
            # goes on (to build and send its response): it reaches an agent sooner.
            await asyncio.sleep(0)

    def take_ready(self) -> dict[str, set[str]]:
        """Capabilities (by namespace) that got work here since the last call."""
        ready, self._ready = self._ready, {}
        return ready

    async def offer(self, ready: Mapping[str, Set[str]]) -> None:
        """Announce ready work to other replicas (and the human desk).

        The local dispatcher offers only what its own round did not absorb
        (``Dispatcher.dispatch_round``): with agents on every replica, a
        submit would otherwise cost every other replica a wake-up and a store
        call that finds nothing.
        """
        for namespace, caps in ready.items():
            if caps:
                await events.announce(self._bus, events.ready_subject(namespace),
                                      events.encode({"caps": sorted(caps)}), self.origin)

    async def leased(self, lease: Lease, now: float) -> None:
        """A lease was handed to a local agent."""
        task = lease.task
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s leased to agent %s (attempt %d, token %d)", task.id,
                      task.agent_id, task.attempt, lease.fencing_token,
                      extra={"task_id": task.id, "workflow_id": task.workflow_id,
                             "agent_id": task.agent_id, "attempt": task.attempt,
                             "fencing_token": lease.fencing_token, "event": "leased"})
        self.observer.dispatched(lease, now)
        await self.announce(task)

    async def announce(self, task: Task) -> None:
        """Publish a task's new version; keep it for this replica's watchers, if any."""
        if self._watchers:
            recent = self.recent
            recent[task.id] = task
            recent.move_to_end(task.id)
            if len(recent) > RECENT_TASKS:
                recent.popitem(last=False)
        await events.announce(self._bus, events.task_subject(task.namespace, int(task.state)),
                              events.task_event(task.id, int(task.state), task.workflow_id,
                                                task.capability, task.update_time))

    async def stop_running(self, before: Sequence[Task], reason: str) -> None:
        """Tell whichever replica holds a running attempt's stream to cancel it."""
        for task in before:
            if task.state is TaskState.RUNNING:
                log.info("telling agent %s to stop task %s: %s", task.agent_id, task.id, reason,
                         extra={"task_id": task.id, "workflow_id": task.workflow_id,
                                "agent_id": task.agent_id, "event": "stop"})
                await events.announce(self._bus, events.CANCEL_SUBJECT, events.encode(
                    {"agent": task.agent_id, "id": task.id, "token": task.fencing_token,
                     "reason": reason}))


def _log_change(task: Task, previous: TaskState | None) -> None:
    """One lifecycle line with the ids as fields (DEBUG for the routine steps)."""
    state = task.state
    routine = state in _ROUTINE and previous is not TaskState.RUNNING
    level = logging.DEBUG if routine or state is TaskState.SUCCEEDED else logging.INFO
    if not log.isEnabledFor(level):
        return
    failure = task.failure
    event = ("requeued" if previous is TaskState.RUNNING and state is TaskState.QUEUED
             else state.name.lower())
    log.log(level, "task %s %s -> %s%s", task.id,
            previous.name if previous is not None else "NEW", state.name,
            f" ({failure.error_type}: {failure.message})" if failure is not None else "",
            extra={"task_id": task.id, "workflow_id": task.workflow_id,
                   "agent_id": task.agent_id, "attempt": task.attempt,
                   "state": state.name,
                   "previous_state": previous.name if previous is not None else "",
                   "error_type": failure.error_type if failure is not None else "",
                   "event": event})


__all__ = ["RECENT_TASKS", "NullObserver", "SchedulerObserver", "TaskEvents"]

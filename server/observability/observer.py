"""Scheduler observers: transitions into Prometheus metrics, and fan-out to several."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from server.domain.models import Lease, TaskState
from server.observability.metrics import MeshMetrics, TaskOutcome
from server.ports import Transition
from server.services.scheduler import SchedulerObserver

log = logging.getLogger(__name__)

__all__ = ["CompositeObserver", "MetricsObserver"]

_OUTCOME: dict[TaskState, TaskOutcome] = {
    TaskState.SUCCEEDED: "succeeded",
    TaskState.FAILED: "failed",
    TaskState.CANCELLED: "cancelled",
    TaskState.DEAD_LETTERED: "dead_lettered",
}

MAX_NAMESPACES: Final = 256
"""Most namespaces the periodic gauges follow (bounds their label set)."""


class MetricsObserver:
    """Counts submissions, outcomes, retries, dead letters and dispatch latency.

    It also remembers the namespaces it has seen tasks in (at most
    `MAX_NAMESPACES`), which the periodic gauges (`GaugeSampler`) read.
    """

    def __init__(self, metrics: MeshMetrics) -> None:
        """Record into ``metrics``."""
        self._m = metrics
        self.namespaces: set[str] = {"default"}

    def transition(self, transition: Transition, now: float) -> None:
        """Record what a store transition did."""
        m = self._m
        for change in transition.tasks:
            t = change.task
            if change.previous_state is None:
                m.task_submitted(t.namespace, t.capability)
                if t.namespace not in self.namespaces and len(self.namespaces) < MAX_NAMESPACES:
                    self.namespaces.add(t.namespace)
            outcome = _OUTCOME.get(t.state)
            if outcome is not None and change.previous_state is not t.state:
                run = max(t.end_time - t.start_time, 0.0) if t.start_time else None
                m.task_finished(t.namespace, t.capability, outcome, run)
                if t.state is TaskState.DEAD_LETTERED:
                    m.dead_lettered(t.capability)
            elif t.state is TaskState.RETRYING or (
                    t.state is TaskState.QUEUED and change.previous_state is TaskState.RUNNING):
                m.retry_scheduled(t.capability)

    def dispatched(self, lease: Lease, now: float) -> None:
        """Queue wait of a first attempt of a task with no dependencies (submit -> running)."""
        task = lease.task
        if task.attempt == 1 and task.create_time and not task.depends_on:
            self._m.task_dispatched(task.capability, max(now - task.create_time, 0.0))

    def stale_result(self, task_id: str) -> None:
        """A refused stale result."""
        self._m.stale_result("unknown")

    def breaker_changed(self, agent_id: str, capability: str, state: str) -> None:
        """A circuit breaker moved to closed, open or half-open."""
        if state in ("closed", "open", "half-open"):
            self._m.set_breaker(agent_id, capability, state)  # type: ignore[arg-type]


class CompositeObserver:
    """Calls several observers in order; one that raises is logged, never propagated."""

    def __init__(self, observers: Sequence[SchedulerObserver]) -> None:
        """Fan out to ``observers``."""
        self._observers = tuple(observers)

    def transition(self, transition: Transition, now: float) -> None:
        """See SchedulerObserver.transition."""
        for o in self._observers:
            try:
                o.transition(transition, now)
            except Exception:
                log.exception("observer %s failed on a transition", type(o).__name__)

    def dispatched(self, lease: Lease, now: float) -> None:
        """See SchedulerObserver.dispatched."""
        for o in self._observers:
            try:
                o.dispatched(lease, now)
            except Exception:
                log.exception("observer %s failed on a dispatch", type(o).__name__)

    def stale_result(self, task_id: str) -> None:
        """See SchedulerObserver.stale_result."""
        for o in self._observers:
            try:
                o.stale_result(task_id)
            except Exception:
                log.exception("observer %s failed on a stale result", type(o).__name__)

    def breaker_changed(self, agent_id: str, capability: str, state: str) -> None:
        """See SchedulerObserver.breaker_changed."""
        for o in self._observers:
            try:
                o.breaker_changed(agent_id, capability, state)
            except Exception:
                log.exception("observer %s failed on a breaker change", type(o).__name__)

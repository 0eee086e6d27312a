"""Scheduler observer that turns transitions into Prometheus metrics."""

from __future__ import annotations

from server.domain.models import Lease, TaskState
from server.observability.metrics import MeshMetrics, TaskOutcome
from server.ports import Transition

_OUTCOME: dict[TaskState, TaskOutcome] = {
    TaskState.SUCCEEDED: "succeeded",
    TaskState.FAILED: "failed",
    TaskState.CANCELLED: "cancelled",
    TaskState.DEAD_LETTERED: "dead_lettered",
}


class MetricsObserver:
    """Counts submissions, outcomes, retries, dead letters and dispatch latency."""

    def __init__(self, metrics: MeshMetrics) -> None:
        self._m = metrics

    def transition(self, transition: Transition, now: float) -> None:
        """Record what a store transition did."""
        m = self._m
        for change in transition.tasks:
            t = change.task
            if change.previous_state is None:
                m.task_submitted(t.namespace, t.capability)
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

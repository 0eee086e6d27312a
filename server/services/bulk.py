"""Bulk actions by filter: re-drive or cancel every task that matches.

What operators of queues ask for most after an outage: "re-drive every
dead letter of capability X since 03:00". The filter is evaluated by the
store (``TaskStore.list_tasks`` pages, newest first) and each task is then
re-driven or cancelled on its own, through the same scheduler use case as
the one-task action, so every rule (fencing, workflow progression, events,
watches) holds unchanged. A task that moved on between the read and the act
(it was re-driven or cancelled by someone else, a running one finished) is
skipped, not an error: the result names exactly the tasks acted on.

Not atomic across tasks, and deliberately so: one transaction over 10,000
tasks would hold the store (the Redis Lua step blocks Redis) for the whole
batch. ``max_tasks`` bounds the work of one call; ``truncated`` says more
matched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from server.domain.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from server.domain.models import LIVE_TASK_STATES, Task, TaskState
from server.ports import TaskFilter
from server.services.scheduler import Scheduler

DEFAULT_MAX_TASKS = 1000
MAX_TASKS = 10_000
PAGE = 500
REDRIVABLE = frozenset({TaskState.DEAD_LETTERED, TaskState.FAILED, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class BulkResult:
    """The task ids acted on (or that would be, for a dry run), newest first."""

    task_ids: tuple[str, ...]
    truncated: bool
    """More tasks matched than ``max_tasks`` allowed."""


def max_tasks(value: int, field: str = "max_tasks") -> int:
    """The bound of one call: 0 means the default; negative or too large is refused."""
    if value < 0 or value > MAX_TASKS:
        raise InvalidArgumentError.field(field, f"must be between 0 and {MAX_TASKS}")
    return value or DEFAULT_MAX_TASKS


class BulkActions:
    """Re-drive or cancel the tasks a filter selects."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    async def matching(self, flt: TaskFilter, limit: int,
                       accept: frozenset[TaskState]) -> tuple[list[Task], bool]:
        """Up to ``limit`` tasks matching ``flt`` whose state is in ``accept``."""
        out: list[Task] = []
        before = 0
        while True:
            page = await self._scheduler.list_tasks(flt, before_seq=before, limit=PAGE)
            for task in page:
                if task.state in accept:
                    if len(out) == limit:
                        return out, True
                    out.append(task)
            if len(page) < PAGE:
                return out, False
            before = page[-1].seq

    async def redrive(self, flt: TaskFilter, *, limit: int, dry_run: bool) -> BulkResult:
        """Re-drive the matching tasks (state DEAD_LETTERED unless the filter names one)."""
        if flt.state is None:
            flt = replace(flt, state=TaskState.DEAD_LETTERED)
        elif flt.state not in REDRIVABLE:
            raise InvalidArgumentError.field(
                "state", f"{flt.state.name} tasks cannot be re-driven; use DEAD_LETTERED, "
                "FAILED or CANCELLED")
        tasks, truncated = await self.matching(flt, limit, REDRIVABLE)
        if dry_run:
            return BulkResult(tuple(t.id for t in tasks), truncated)
        done: list[str] = []
        for task in tasks:
            try:
                await self._scheduler.retry(task.id, None)
            except (FailedPreconditionError, NotFoundError):
                continue  # it moved on since the read: not ours to re-drive any more
            done.append(task.id)
        return BulkResult(tuple(done), truncated)

    async def cancel(self, flt: TaskFilter, *, limit: int, dry_run: bool,
                     reason: str) -> BulkResult:
        """Cancel the matching tasks that have not ended."""
        if flt.state is not None and flt.state not in LIVE_TASK_STATES:
            raise InvalidArgumentError.field(
                "state", f"{flt.state.name} tasks have ended; only PENDING, QUEUED, RUNNING "
                "or RETRYING tasks can be cancelled")
        tasks, truncated = await self.matching(flt, limit, LIVE_TASK_STATES)
        if dry_run:
            return BulkResult(tuple(t.id for t in tasks), truncated)
        done: list[str] = []
        for task in tasks:
            try:
                await self._scheduler.cancel(task.id, reason)
            except (FailedPreconditionError, NotFoundError):
                continue  # it ended (or was cancelled with its workflow) since the read
            done.append(task.id)
        return BulkResult(tuple(done), truncated)

"""In-memory ChunkStore: one list per task, next to the InMemoryTaskStore it fences against.

Every method runs without awaiting, so on one event loop each is atomic. A
log whose retention passed is dropped when it is next touched, and a sweep at
most once a minute drops the others (``_sweep``).
"""

from __future__ import annotations

from collections.abc import Sequence

from server.backends.memory.tasks import InMemoryTaskStore
from server.domain.chunks import CHUNK_LIMIT, ChunkDraft, ChunkLimits, TaskChunk
from server.domain.errors import NotFoundError, ResourceExhaustedError, StaleLeaseError
from server.domain.models import TaskState

_SWEEP_PERIOD = 60.0


class InMemoryChunkStore:
    """ChunkStore for the embedded mode, built with the task store it shares."""

    def __init__(self, *, tasks: InMemoryTaskStore) -> None:
        self._tasks = tasks
        self._logs: dict[str, list[TaskChunk]] = {}
        self._expire: dict[str, float] = {}
        self._last_sweep = 0.0

    async def append_chunks(self, task_id: str, fencing_token: int,
                            drafts: Sequence[ChunkDraft], *, now: float,
                            limits: ChunkLimits) -> list[TaskChunk]:
        """See ChunkStore.append_chunks."""
        self._sweep(now)
        task = self._tasks.peek(task_id)
        if task is None:
            raise NotFoundError("task", f"tasks/{task_id}")
        if task.state is not TaskState.RUNNING or task.fencing_token != fencing_token:
            raise StaleLeaseError(
                f"tasks/{task_id}: fencing token {fencing_token} is stale "
                f"(task is {task.state.name}, current token {task.fencing_token})",
                metadata={"task": f"tasks/{task_id}", "current_token": str(task.fencing_token)})
        log = self._live_log(task_id, now)
        if len(log) + len(drafts) > limits.max_chunks_per_task:
            raise ResourceExhaustedError(
                f"tasks/{task_id} has {len(log)} chunks; at most "
                f"{limits.max_chunks_per_task} are kept per task", reason=CHUNK_LIMIT)
        first = len(log) + 1
        added = [TaskChunk(task_id, first + i, fencing_token, task.attempt, now, d)
                 for i, d in enumerate(drafts)]
        log.extend(added)
        self._logs[task_id] = log
        self._expire[task_id] = now + limits.retention
        return added

    async def chunks_after(self, task_id: str, after_seq: int, limit: int, *,
                           now: float) -> list[TaskChunk]:
        """See ChunkStore.chunks_after."""
        log = self._live_log(task_id, now)
        start = max(0, after_seq)
        return log[start:start + max(0, limit)]

    def _live_log(self, task_id: str, now: float) -> list[TaskChunk]:
        if self._expire.get(task_id, now + 1) <= now:
            self._logs.pop(task_id, None)
            self._expire.pop(task_id, None)
        return self._logs.get(task_id, [])

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < _SWEEP_PERIOD:
            return
        self._last_sweep = now
        for task_id in [t for t, at in self._expire.items() if at <= now]:
            self._logs.pop(task_id, None)
            self._expire.pop(task_id, None)

    async def aclose(self) -> None:
        """Nothing to release."""

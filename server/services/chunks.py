"""Streamed partial results: chunks appended by a running attempt, watched by clients.

An append is fenced twice, as a result is: the stream's own pre-check
(``Leases.holds``, the one pre-check) and the store's atomic check against the
task record. A refusal is classified once, by ``Leases.refusal`` (stale lease
or task not running), so a stale chunk is refused exactly like a stale result.

A watch reads the store's chunk log from the client's cursor; bus
notifications (``_sys.chunk.<task>`` and the task's state events) only wake
it, and a periodic re-read covers a lost one, so a watcher never misses a
chunk and, since it moves its cursor only past what it sent, never repeats one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

from server.domain.chunks import ChunkDraft, ChunkLimits, TaskChunk, check_drafts
from server.domain.errors import FailedPreconditionError, NotFoundError, StaleLeaseError
from server.domain.models import Task
from server.ports import Bus, ChunkStore, Subscription, TaskStore
from server.services import events
from server.services.clock import Clock
from server.services.leases import Leases
from server.services.sessions import ReportOutcome, WorkerSession

READ_BATCH = 256
"""Most chunks one watch response carries."""
POLL = 1.0
"""Seconds a watch waits for a notification before it re-reads anyway."""
TASK_NOT_RUNNING = "TASK_NOT_RUNNING"


def chunk_subject(task_id: str) -> str:
    """New chunks of a task (task ids are unique across namespaces)."""
    return f"_sys.chunk.{task_id}"


class TaskChunks:
    """Append and watch the chunk logs of tasks."""

    def __init__(self, store: ChunkStore, tasks: TaskStore, bus: Bus, clock: Clock, *,
                 leases: Leases, limits: ChunkLimits) -> None:
        self._store = store
        self._tasks = tasks
        self._bus = bus
        self._clock = clock
        self._leases = leases
        self.limits = limits

    async def append(self, session: WorkerSession | None, task_id: str, token: int,
                     drafts: Sequence[ChunkDraft], field: str = "chunks") -> list[TaskChunk]:
        """Keep chunks of the lease ``token`` (all or none) and wake the task's watchers.

        InvalidArgumentError (reason CHUNK_TOO_LARGE for size) for a bad chunk,
        ResourceExhaustedError (CHUNK_LIMIT) past the count per task,
        StaleLeaseError when the lease ended but the task is live,
        FailedPreconditionError (TASK_NOT_RUNNING) when the task has ended,
        NotFoundError for an unknown task.
        """
        check_drafts(list(drafts), self.limits, field)
        if not await self._leases.holds(session, task_id, token):
            await self._refuse(task_id, token)
        try:
            added = await self._store.append_chunks(task_id, token, drafts,
                                                    now=self._clock.now(), limits=self.limits)
        except StaleLeaseError:
            await self._refuse(task_id, token)
            raise
        await events.announce(self._bus, chunk_subject(task_id),
                              events.encode({"seq": added[-1].seq}))
        return added

    async def _refuse(self, task_id: str, token: int) -> None:
        """Raise what ``Leases.refusal`` makes of a report under ``token``."""
        outcome = await self._leases.refusal(task_id, token)
        task = await self._tasks.get_task(task_id)
        if task is None:
            raise NotFoundError("task", f"tasks/{task_id}")
        if outcome == ReportOutcome.NOT_RUNNING:
            raise FailedPreconditionError(
                f"tasks/{task_id} is {task.state.name}: it is no longer running, so chunks "
                f"under fencing token {token} are refused", reason=TASK_NOT_RUNNING,
                metadata={"task": f"tasks/{task_id}", "state": task.state.name})
        raise StaleLeaseError(
            f"tasks/{task_id}: fencing token {token} is stale (the task is "
            f"{task.state.name}, current token {task.fencing_token})",
            metadata={"task": f"tasks/{task_id}", "current_token": str(task.fencing_token)})

    async def watch(self, task_id: str, after_seq: int = 0,
                    ) -> AsyncGenerator[Task | list[TaskChunk], None]:
        """The task, then its chunks after ``after_seq`` and the task after each state
        change, in order; once the task has ended and every chunk kept was sent,
        the ended task last."""
        task = await self._tasks.get_task(task_id)
        if task is None:
            raise NotFoundError("task", f"tasks/{task_id}")
        wake = asyncio.Event()
        subs = [await self._bus.subscribe(chunk_subject(task_id), max_pending=64),
                await self._bus.subscribe(events.task_pattern(task.namespace), max_pending=256)]
        pumps = [asyncio.create_task(_pump(subs[0], wake, "")),
                 asyncio.create_task(_pump(subs[1], wake, task_id))]
        try:
            task = await self._tasks.get_task(task_id) or task  # after subscribing
            yield task
            task_last = True  # the last item sent was the task
            shown = (task.state, task.attempt)
            cursor = max(0, after_seq)
            while True:
                wake.clear()
                cursor, batches = await self._read(task_id, cursor)
                for batch in batches:
                    yield batch
                    task_last = False
                now = await self._tasks.get_task(task_id)
                if now is None:
                    return
                if (now.state, now.attempt) != shown:
                    shown = (now.state, now.attempt)
                    # Chunks kept before the change come first.
                    cursor, batches = await self._read(task_id, cursor)
                    for batch in batches:
                        yield batch
                    yield now
                    task_last = True
                if now.state.terminal:
                    cursor, batches = await self._read(task_id, cursor)
                    for batch in batches:
                        yield batch
                        task_last = False
                    if not task_last:
                        yield now  # the stream ends with the ended task
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL):
                        await wake.wait()
        finally:
            for pump in pumps:
                pump.cancel()
            for sub in subs:
                await sub.unsubscribe()

    async def kept(self, task_id: str) -> list[TaskChunk]:
        """Every chunk kept for a task now, in order."""
        _, batches = await self._read(task_id, 0)
        return [c for batch in batches for c in batch]

    async def _read(self, task_id: str, cursor: int) -> tuple[int, list[list[TaskChunk]]]:
        """Every chunk after ``cursor`` now in the log, in batches; the new cursor."""
        out: list[list[TaskChunk]] = []
        while True:
            batch = await self._store.chunks_after(task_id, cursor, READ_BATCH,
                                                   now=self._clock.now())
            if not batch:
                return cursor, out
            cursor = batch[-1].seq
            out.append(batch)
            if len(batch) < READ_BATCH:
                return cursor, out


async def _pump(sub: Subscription, wake: asyncio.Event, task_id: str) -> None:
    """Turn notifications into wake-ups (only the task's own, for task events)."""
    async for message in sub:
        if not task_id or events.decode(message.data).get("id") == task_id:
            wake.set()


__all__ = ["POLL", "READ_BATCH", "TaskChunks", "chunk_subject"]

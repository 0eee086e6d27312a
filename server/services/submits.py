"""Group commit of single submits: concurrent SubmitTask calls share one store step.

Each ``SubmitTask`` used to cost one store call (a Redis Function call, plus a
``WAIT`` when durability asks for replicas). Under load many arrive while one
such call is in flight; here they queue and go to the store together in the
next ``TaskStore.create_tasks`` call, per namespace, in arrival order. A lone
submit goes at once (nothing waits for company), so latency at low rates is
what it was; under load a submit waits at most for the call in flight.

Every caller gets exactly the answer its own ``create_task`` would have given:

- a replayed ``request_id`` returns the first request's task, also when the
  first request is an earlier item of the same batch (``create_tasks``
  treats it as a replay, as it would a stored one);
- a full queue (``max_queued``) cuts the batch where the bound is reached:
  the items before are queued, each later caller gets RESOURCE_EXHAUSTED
  (``QUEUE_FULL``), as if it had come after them;
- a client-chosen task id is never batched: a taken id refuses a whole
  ``create_tasks`` batch, so such a submit goes alone through
  ``create_task`` and its ALREADY_EXISTS is its own. Server-made ids (random
  128-bit) are the ones batched; should a batch be refused all the same, its
  items are retried one by one so each gets its own answer;
- a store error (UNAVAILABLE) reaches every caller of that batch;
- a caller cancelled while its item still waits is dropped from the batch
  (nothing is created for it); once its batch is sent, it is created, as it
  would be if the cancellation had arrived during its own store call.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from server.domain.errors import AlreadyExistsError, ResourceExhaustedError
from server.domain.models import Task
from server.ports import TaskStore, Transition

MAX_BATCH = 64
"""Most submits in one store call."""

Created = tuple[Task, bool, Transition]


@dataclass(slots=True)
class _Item:
    task: Task
    request_id: str
    done: asyncio.Future[Created]


class SubmitBatcher:
    """Queues single submits per namespace and writes them in batches."""

    def __init__(self, tasks: TaskStore, *, max_batch: int = MAX_BATCH) -> None:
        self._tasks = tasks
        self._max_batch = max_batch
        self._pending: dict[str, list[_Item]] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}

    async def create(self, task: Task, *, request_id: str, client_id: bool,
                     max_queued: int) -> Created:
        """What ``TaskStore.create_task`` answers for this task (see the module doc)."""
        if client_id:
            return await self._tasks.create_task(task, request_id=request_id,
                                                 max_queued=max_queued)
        item = _Item(task, request_id, asyncio.get_running_loop().create_future())
        namespace = task.namespace
        self._pending.setdefault(namespace, []).append(item)
        if namespace not in self._flushers:
            self._flushers[namespace] = asyncio.create_task(
                self._flush(namespace, max_queued), name=f"submits-{namespace}")
        return await item.done

    async def _flush(self, namespace: str, max_queued: int) -> None:
        """Write the namespace's queued submits, a batch at a time, until none is left."""
        try:
            while True:
                pending = self._pending.get(namespace, [])
                batch = [i for i in pending[:self._max_batch] if not i.done.done()]
                del pending[:self._max_batch]
                if not pending:
                    self._pending.pop(namespace, None)
                if batch:
                    await self._write(batch, max_queued)
                elif namespace not in self._pending:
                    return
        finally:
            self._flushers.pop(namespace, None)
            for item in self._pending.pop(namespace, []):  # only when cancelled
                if not item.done.done():
                    item.done.set_exception(asyncio.CancelledError())

    async def _write(self, batch: list[_Item], max_queued: int) -> None:
        try:
            results, full = await self._tasks.create_tasks(
                [(i.task, i.request_id) for i in batch], max_queued=max_queued)
        except AlreadyExistsError as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            for item in batch:  # each its own answer
                await self._write([item], max_queued)
            return
        except asyncio.CancelledError:
            _fail(batch, asyncio.CancelledError())  # shutting down: nobody waits forever
            raise
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
            _fail(batch, exc)
            return
        for item, result in zip(batch, results, strict=False):
            if not item.done.done():
                item.done.set_result(result)
        if full:
            namespace = batch[0].task.namespace
            _fail(batch[len(results):], ResourceExhaustedError(
                f"namespace {namespace!r} has {max_queued} tasks waiting (the limit)",
                retry_after=1.0, reason="QUEUE_FULL"))


def _fail(items: list[_Item], exc: BaseException) -> None:
    for item in items:
        if not item.done.done():
            item.done.set_exception(exc)
            with contextlib.suppress(Exception):
                item.done.exception()  # retrieved: a caller gone meanwhile logs nothing


__all__ = ["MAX_BATCH", "SubmitBatcher"]

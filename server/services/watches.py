"""Watches: task and workflow changes streamed to clients.

A watcher subscribes to the task events of its namespace on the bus and reads
the current version from the store (or takes the one this replica just made,
from ``TaskEvents.recent``), so an event never has to carry a whole task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from server.domain.errors import ResourceExhaustedError
from server.domain.models import Task, Workflow, WorkflowState
from server.ports import Bus, Subscription, TaskStore
from server.services import events
from server.services.task_events import TaskEvents


class Watches:
    """Server-side halves of WatchTasks and WatchWorkflow."""

    def __init__(self, tasks: TaskStore, bus: Bus, task_events: TaskEvents,
                 get_workflow: Callable[[str], Awaitable[tuple[Workflow, dict[str, Task]]]],
                 ) -> None:
        self._tasks = tasks
        self._bus = bus
        self._events = task_events
        self._get_workflow = get_workflow

    async def task_batches(self, namespace: str, *, names: frozenset[str] = frozenset(),
                           capability: str = "", workflow_id: str = "",
                           states: frozenset[int] = frozenset(),
                           max_pending: int = 10_000,
                           max_batch: int = 1) -> AsyncGenerator[list[Task], None]:
        """Tasks after each matching change; the changes already waiting come together.

        After each wake-up every matching change queued behind the first one
        (up to ``max_batch``) is read from the store in one step and yielded as
        one list, oldest first; never an empty list.
        """
        sub = await self._bus.subscribe(events.task_pattern(namespace, states),
                                        max_pending=max_pending)
        self._events.watcher_joined()
        recent = self._events.recent
        try:
            async for first in sub:
                messages = [first, *sub.take_ready(max_batch - 1)] if max_batch > 1 else [first]
                if sub.dropped:
                    raise ResourceExhaustedError(
                        "watcher fell behind and was cut off; reconnect and re-read",
                        reason="SLOW_CONSUMER")
                picked: list[Task | str] = []  # a version held here, or an id to read
                for message in messages:
                    body = events.decode(message.data)
                    task_id = str(body.get("id", ""))
                    if names and task_id not in names:
                        continue
                    if capability and body.get("cap") != capability:
                        continue
                    if workflow_id and body.get("wf") != workflow_id:
                        continue
                    if states and body.get("state") not in states:
                        continue
                    held = recent.get(task_id)
                    if (held is not None and body.get("u") == held.update_time
                            and body.get("state") == int(held.state)):
                        picked.append(held)
                    else:
                        picked.append(task_id)
                if not picked:
                    continue
                found = await self._resolve(picked)
                if found:
                    yield found
        finally:
            self._events.watcher_left()
            await sub.unsubscribe()

    async def _resolve(self, picked: list[Task | str]) -> list[Task]:
        """The tasks of ``picked``, in order: ids are read in one store step."""
        missing = [p for p in picked if isinstance(p, str)]
        if not missing:
            return [p for p in picked if not isinstance(p, str)]
        read = dict(zip(missing, await self._tasks.get_tasks(missing), strict=True))
        out: list[Task] = []
        for p in picked:
            task = read.get(p) if isinstance(p, str) else p
            if task is not None:
                out.append(task)
        return out

    async def workflow(self, workflow_id: str, *, max_pending: int = 10_000,
                       ) -> AsyncIterator[tuple[Workflow, dict[str, Task]]]:
        """The workflow now, then after every step change, until it ends."""
        wf, steps = await self._get_workflow(workflow_id)
        sub = await self._bus.subscribe(events.task_pattern(wf.namespace),
                                        max_pending=max_pending)
        wf_sub = await self._bus.subscribe(events.workflow_subject(wf.namespace),
                                           max_pending=max_pending)
        try:
            # Re-read after subscribing so no change between the two is missed.
            wf, steps = await self._get_workflow(workflow_id)
            yield wf, steps
            if wf.state is not WorkflowState.RUNNING:
                return
            merged: asyncio.Queue[bool] = asyncio.Queue(maxsize=2)

            async def pump(s: Subscription, key: str) -> None:
                async for message in s:
                    if events.decode(message.data).get(key) == workflow_id and merged.empty():
                        merged.put_nowait(True)

            async with asyncio.TaskGroup() as group:
                t1 = group.create_task(pump(sub, "wf"))
                t2 = group.create_task(pump(wf_sub, "id"))
                try:
                    while True:
                        await merged.get()
                        if sub.dropped or wf_sub.dropped:
                            raise ResourceExhaustedError(
                                "watcher fell behind and was cut off", reason="SLOW_CONSUMER")
                        wf, steps = await self._get_workflow(workflow_id)
                        yield wf, steps
                        if wf.state is not WorkflowState.RUNNING:
                            return
                finally:
                    t1.cancel()
                    t2.cancel()
        finally:
            await sub.unsubscribe()
            await wf_sub.unsubscribe()


__all__ = ["Watches"]

"""The console's live feed: bus events -> throughput figures and page updates.

The server already announces every task, workflow, agent, state and lock
change on the bus (``server/services/events.py``); the feed subscribes to
those subjects for every namespace and

- counts tasks that started, succeeded and failed per namespace in
  ``BUCKET``-second buckets (the overview's throughput over the last
  minutes, measured here from the events, never by scanning the store);
- marks *topics* dirty for each open page stream (``tasks``, ``task:<id>``,
  ``workflow:<id>``, ``agents``, ``state``). A stream sends the dirty set and
  the browser re-reads those views, as the gRPC watchers re-read the store
  after an event. A dirty set is bounded (past ``MAX_TOPICS`` ids it becomes
  ``many``: re-read every view), so a slow browser costs a set, not a queue.

A subscription that fell behind (its bounded buffer overflowed) makes every
stream re-read everything; the throughput figures then say ``lossy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.aio import cancel_and_wait
from server.domain.models import TaskState
from server.ports import Bus, Subscription
from server.services import events
from server.services.clock import Clock

log = logging.getLogger(__name__)

BUCKET = 5.0
"""Seconds per throughput bucket."""
WINDOW = 72
"""Buckets kept: six minutes."""
MAX_TOPICS = 256
COALESCE = 0.05
"""Seconds a stream waits after the first change, so a burst goes as one update."""
_FAILED = frozenset({int(TaskState.FAILED), int(TaskState.DEAD_LETTERED)})
_PATTERNS = ("_sys.task.>", "_sys.workflow.*", "_sys.agent.>", "_sys.state.*", "_sys.lock.*")


@dataclass
class _Counts:
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass(eq=False)
class Listener:
    """One open page stream: the topics changed since it last sent."""

    namespace: str
    topics: set[str] = field(default_factory=set)
    many: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def mark(self, topics: tuple[str, ...]) -> None:
        """Record changed topics (bounded) and wake the stream."""
        if not self.many:
            self.topics.update(topics)
            if len(self.topics) > MAX_TOPICS:
                self.many = True
                self.topics = {t for t in self.topics if ":" not in t}
        else:
            self.topics.update(t for t in topics if ":" not in t)
        self.changed.set()

    def take(self) -> tuple[list[str], bool]:
        """The dirty topics (and whether ids were dropped), cleared."""
        topics, many = sorted(self.topics), self.many
        self.topics, self.many = set(), False
        self.changed.clear()
        return topics, many


class Feed:
    """Bus events of every namespace, for the console."""

    def __init__(self, bus: Bus, clock: Clock) -> None:
        self._bus = bus
        self._clock = clock
        self._buckets: dict[str, deque[tuple[int, _Counts]]] = defaultdict(
            lambda: deque(maxlen=WINDOW))
        self._listeners: set[Listener] = set()
        self.lossy = False
        self.events_seen = 0
        self._runner: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        """Subscribe (before the first page can open) and start reading."""
        self._subs = [await self._bus.subscribe(p, max_pending=50_000) for p in _PATTERNS]
        self._runner = asyncio.create_task(self._run(), name="console-feed")

    async def stop(self) -> None:
        """Stop reading; every open stream ends. Safe to repeat."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await cancel_and_wait(runner)
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []
        for listener in list(self._listeners):
            listener.changed.set()

    @property
    def running(self) -> bool:
        """Whether the feed reads the bus."""
        return self._runner is not None

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for sub in self._subs:
                group.create_task(self._read(sub))

    async def _read(self, sub: Subscription) -> None:
        dropped = 0
        async for message in sub:
            if sub.dropped != dropped:
                dropped = sub.dropped
                self.lossy = True
                for listener in self._listeners:
                    listener.mark(("all",))
            try:
                self._apply(message.subject, events.decode(message.data))
            except Exception:  # a malformed event must not end the feed
                log.exception("console feed: event on %s not applied", message.subject)

    def _apply(self, subject: str, body: dict[str, object]) -> None:
        parts = subject.split(".")
        if len(parts) < 3:
            return
        kind, namespace = parts[1], parts[2]
        self.events_seen += 1
        topics: tuple[str, ...]
        if kind == "task":
            state = body.get("state")
            self._count(namespace, state if isinstance(state, int) else 0)
            wf = str(body.get("wf", ""))
            task = f"task:{body.get('id', '')}"
            topics = ("tasks", task, f"workflow:{wf}") if wf else ("tasks", task)
        elif kind == "workflow":
            topics = ("workflows", f"workflow:{body.get('id', '')}")
        elif kind == "agent":
            topics = ("agents",)
        elif kind in ("state", "lock"):
            topics = ("state",)
        else:
            return
        self.mark(namespace, topics)

    def _count(self, namespace: str, state: int) -> None:
        slot = int(self._clock.now() // BUCKET)
        buckets = self._buckets[namespace]
        if not buckets or buckets[-1][0] != slot:
            buckets.append((slot, _Counts()))
        counts = buckets[-1][1]
        if state == TaskState.RUNNING:
            counts.started += 1
        elif state == TaskState.SUCCEEDED:
            counts.succeeded += 1
        elif state in _FAILED:
            counts.failed += 1
        elif state == TaskState.CANCELLED:
            counts.cancelled += 1

    def throughput(self, namespace: str, minutes: int = 5) -> list[dict[str, float]]:
        """Per bucket of the last ``minutes`` (oldest first, empty buckets included)."""
        now_slot = int(self._clock.now() // BUCKET)
        count = int(minutes * 60 // BUCKET)
        held = dict(self._buckets.get(namespace, ()))
        out: list[dict[str, float]] = []
        for slot in range(now_slot - count + 1, now_slot + 1):
            c = held.get(slot, _Counts())
            out.append({"time": slot * BUCKET, "started": c.started, "succeeded": c.succeeded,
                        "failed": c.failed, "cancelled": c.cancelled})
        return out

    @contextlib.asynccontextmanager
    async def listen(self, namespace: str) -> AsyncIterator[Listener]:
        """A listener for one page stream, removed on exit."""
        listener = Listener(namespace)
        self._listeners.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)

    def watched_namespaces(self) -> set[str]:
        """Namespaces some page stream is open on."""
        return {listener.namespace for listener in self._listeners}

    def mark(self, namespace: str, topics: tuple[str, ...]) -> None:
        """Tell the namespace's page streams that ``topics`` changed."""
        for listener in self._listeners:
            if listener.namespace == namespace:
                listener.mark(topics)

    @property
    def listeners(self) -> int:
        """Open page streams."""
        return len(self._listeners)

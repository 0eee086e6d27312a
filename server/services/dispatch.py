"""Dispatch: lease QUEUED work to this replica's work sessions, least loaded first.

Only sessions that are open, not draining and have credits are candidates;
the store's lease step refuses an agent that is not live on its own (see
``TaskStore.lease_batch``), so an agent marked GONE or DRAINING on another
replica gets nothing here either, even before the bus tells this one.
Every way a lease ends is in ``server/services/leases.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from server.aio import raise_if_cancelling
from server.domain.limits import NO_FALLBACK, NO_LIMITS, DispatchLimits, LeaseScope
from server.domain.models import AgentState, Lease, TaskState
from server.domain.retry import DELIVERY_FAILED
from server.ports import AgentFilter, AgentRegistry, TaskStore
from server.services.breakers import BreakerBoard
from server.services.clock import Clock
from server.services.leases import Leases, served_capability
from server.services.live import LiveCapabilities
from server.services.sessions import Assignment, SessionTable, WorkerSession, add_credits
from server.services.task_events import TaskEvents

log = logging.getLogger(__name__)

DISPATCH_BATCH = 16
"""Most leases one agent gets per dispatch pass (one store call)."""
FAIR_STEP = 2
"""Leases an agent may take, in the first lease of a dispatch round for its
work, past the load of the least-loaded other agent that could take the same
work. The step doubles with every lease that comes back full (work is
plentiful) up to DISPATCH_BATCH, so a burst spreads over idle agents to within
a step and a busy fleet still leases in batches."""
ORPHAN_AGE = 2.0
"""A lease this old that its local agent does not hold is an orphan."""
RIVALS_SCANNED = 32
"""Sessions looked at to find a session's least-loaded rival (a homogeneous
fleet finds it at once; this bounds the pass at O(n) for a mixed one)."""


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """Tunables of dispatch."""

    default_execution_timeout: float = 300.0
    limits: DispatchLimits = NO_LIMITS
    tick: float = 0.05


class Dispatcher:
    """Hands QUEUED work to local sessions with credits."""

    def __init__(self, tasks: TaskStore, agents: AgentRegistry, clock: Clock, *,
                 sessions: SessionTable, leases: Leases, task_events: TaskEvents,
                 breakers: BreakerBoard, live: LiveCapabilities, work_ready: asyncio.Event,
                 config: DispatchConfig) -> None:
        self._tasks = tasks
        self._agents = agents
        self._clock = clock
        self._sessions = sessions
        self._leases = leases
        self._events = task_events
        self._breakers = breakers
        self._live = live
        self._wake = work_ready
        self.config = config
        self.draining = False
        """The server is shutting down: no new leases from this replica."""

    def grant(self, session: WorkerSession, count: int) -> None:
        """The agent can take ``count`` more tasks (never past its free slots)."""
        add_credits(session, count)
        self._wake.set()

    async def run(self) -> None:
        """Dispatch on every wake-up until cancelled."""
        while True:
            raise_if_cancelling()
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.dispatch_round()
            except Exception:
                log.exception("dispatch round failed; retrying on the next wake-up")
                await asyncio.sleep(self.config.tick)
                self._wake.set()

    async def dispatch_round(self) -> None:
        """Lease work to local sessions with credits, least loaded first.

        A session is leased at most enough to bring its load just past that
        of the least-loaded other session that could take the same work, or a
        step (``FAIR_STEP``, doubling while leases come back full), then
        passes repeat, re-sorted: a burst spreads over idle agents instead of
        filling the first one's batch, and plentiful work still goes in
        batches.

        A queue found short stays marked empty for the rest of the round: work
        queued meanwhile sets the wake-up again, so the next round sees it, and
        no store call is spent re-reading a queue that just came back empty.

        Work queued on this replica since the last round is offered to the
        other replicas at the end of this one, except the capabilities whose
        queue this round drained (``TaskEvents.offer``): a replica whose own
        agents took the work wakes nobody else.
        """
        ready = self._events.take_ready()
        drained: set[tuple[str, str]] = set()
        try:
            await self._round(drained)
        finally:
            await self._events.offer({ns: {c for c in caps if (ns, c) not in drained}
                                      for ns, caps in ready.items()})

    async def _round(self, drained: set[tuple[str, str]]) -> None:
        """One dispatch round; adds (namespace, capability) of every queue it drained."""
        if self.draining:
            return
        empty: set[tuple[str, tuple[str, ...], LeaseScope]] = set()
        steps: dict[tuple[str, tuple[str, ...], LeaseScope], int] = {}
        while True:
            candidates = sorted((s for s in self._sessions.workers() if _takes_work(s)),
                                key=lambda s: s.load)
            if not candidates:
                return
            available: dict[str, frozenset[str]] = {}
            progressed = False
            for session in candidates:
                if not _takes_work(session):
                    continue
                caps = tuple(c for c in session.capabilities
                             if self._breakers.allows(session.agent_id, c))
                scope = NO_FALLBACK
                if caps:
                    scope = LeaseScope(caps, await self._available(session.namespace, available))
                key = (session.namespace, caps, scope)
                if not caps or key in empty:
                    continue
                now = self._clock.now()
                # A breaker that is not closed (half-open) lets exactly one probe through.
                probing = any(self._breakers.state(session.agent_id, c) != "closed"
                              for c in caps)
                step = steps.get(key, FAIR_STEP)
                want = 1 if probing else min(session.credits, DISPATCH_BATCH,
                                             _fair_share(session, candidates, step))
                leases = await self._tasks.lease_batch(
                    session.namespace, caps, session.agent_id, now=now,
                    default_timeout=self.config.default_execution_timeout, count=want,
                    scope=scope, limits=self.config.limits)
                if len(leases) < want:
                    empty.add(key)
                    drained.update((session.namespace, c) for c in caps)
                else:
                    steps[key] = min(2 * step, DISPATCH_BATCH)
                if not leases:
                    continue
                progressed = True
                for lease in leases:
                    await self.hand_over(session, lease, now)
            if not progressed:
                return

    async def hand_over(self, session: WorkerSession, lease: Lease, now: float) -> None:
        """Send a fresh lease to its session (or give it back if the stream ended)."""
        if not _open(session):  # re-read: the stream may have ended during the await
            await self._leases.give_back(lease.task, lease.fencing_token, DELIVERY_FAILED,
                                         "work stream closed before delivery")
            return
        session.credits -= 1
        session.in_flight[lease.task.id] = lease.fencing_token
        self._breakers.dispatched(session.agent_id, served_capability(lease.task),
                                  lease.task.id)
        await self._events.leased(lease, now)
        session.send(Assignment(lease))

    async def _available(self, namespace: str, cache: dict[str, frozenset[str]]
                         ) -> frozenset[str]:
        """Capabilities with a usable agent: live, and not every such agent's breaker open."""
        if namespace in cache:
            return cache[namespace]
        live = await self._live.get(namespace)
        blocked: dict[str, set[str]] = {}
        for agent_id, cap in self._breakers.open_keys():
            if cap in live and self._breakers.blocked(agent_id, cap):
                blocked.setdefault(cap, set()).add(agent_id)
        out = set(live)
        for cap, agents in blocked.items():
            offering = await self._agents.list_agents(
                AgentFilter(namespace, cap, frozenset({AgentState.ACTIVE})), after_id="",
                limit=10_000)
            if all(a.id in agents for a in offering):
                out.discard(cap)
        cache[namespace] = frozenset(out)
        return cache[namespace]

    async def reconcile(self, now: float) -> int:
        """Find leases the store holds for local agents that never reached them.

        A lease whose store reply was lost (a connection reset after the script
        committed, then a retry) is RUNNING for the agent but was never sent.
        Each such lease older than ``ORPHAN_AGE`` is handed over when the agent
        has a free credit, otherwise given straight back to the queue.
        Returns how many were found.
        """
        found = 0
        for session in self._sessions.workers():
            if session.closed:
                continue
            # What the agent was sent, taken before the read: a lease reported
            # (and its slot freed) while the read is under way is no orphan,
            # though the copy read may still say RUNNING.
            held = dict(session.in_flight)
            for listed in await self._tasks.leases_of(session.agent_id):
                if (listed.id in session.in_flight
                        or held.get(listed.id) == listed.fencing_token
                        or now - listed.start_time < ORPHAN_AGE):
                    continue
                task = await self._tasks.get_task(listed.id)  # the list may be stale
                if (task is None or task.state is not TaskState.RUNNING
                        or task.fencing_token != listed.fencing_token
                        or task.agent_id != session.agent_id
                        or task.id in session.in_flight):
                    continue
                found += 1
                lease = Lease(task, task.fencing_token, task.lease_deadline)
                if session.credits > 0 and _takes_work(session):
                    log.warning("handing over orphaned lease of tasks/%s to agents/%s",
                                task.id, session.agent_id,
                                extra={"task_id": task.id, "agent_id": session.agent_id,
                                       "event": "orphan_handed_over"})
                    await self.hand_over(session, lease, now)
                else:
                    log.warning("requeueing orphaned lease of tasks/%s", task.id,
                                extra={"task_id": task.id, "agent_id": session.agent_id,
                                       "event": "orphan_requeued"})
                    await self._leases.give_back(task, task.fencing_token, DELIVERY_FAILED,
                                                 "lease was never delivered")
        return found


def _open(session: WorkerSession) -> bool:
    return not session.closed


def _takes_work(session: WorkerSession) -> bool:
    return session.credits > 0 and not session.draining and not session.closed


def _fair_share(session: WorkerSession, by_load: Sequence[WorkerSession], step: int) -> int:
    """Leases that take ``session`` just past its least-loaded rival, or ``step``.

    Rivals are the other sessions in ``by_load`` (sorted by load, lightest
    first) of the same namespace sharing a capability. Loads are in-flight
    shares of each one's concurrency, so the count is in ``session``'s units.
    With no rival the share is unbounded (the caller caps it).
    """
    caps = session.capabilities
    for rival in by_load[:RIVALS_SCANNED]:
        if (rival is session or rival.namespace != session.namespace or rival.closed
                or rival.credits <= 0 or not any(c in caps for c in rival.capabilities)):
            continue
        below = int(rival.load * session.max_concurrency) - len(session.in_flight)
        return max(step, below + 1)
    return DISPATCH_BATCH


__all__ = ["DISPATCH_BATCH", "FAIR_STEP", "ORPHAN_AGE", "DispatchConfig", "Dispatcher"]

"""Agent liveness and task leases: the one owner of every way either ends.

A lease starts in dispatch (``server/services/dispatch.py``, through the
store's atomic lease step, which itself refuses an agent that is not live).
Everything that ends one lives here:

- a result or failure reported under the lease's fencing token
  (:meth:`Leases.report_results`, :meth:`Leases.report_failure`); the one
  fencing pre-check against the stream's own leases is :meth:`Leases.holds`,
  and a refusal is classified once, in :meth:`Leases.refusal`;
- the attempt's execution or heartbeat timeout (:meth:`Leases.reap`);
- the agent's work stream ending (:meth:`Leases.close_worker`);
- the agent going away: its heartbeat stream broke, it deregistered, or its
  beats stopped for ``heartbeat_misses`` intervals (:meth:`Leases.mark_gone`,
  :meth:`Leases.expire_agents`). From that moment its work and heartbeat
  streams on every replica end with FAILED_PRECONDITION (``SESSION_ENDED``),
  its leases are requeued and its locks released; another replica learns it
  from the bus (:meth:`Leases.agent_event`) and, should that event be lost,
  from the store within a reconcile period (:meth:`Leases.check_sessions`).

Every store step is atomic and fenced, so two replicas ending the same lease
at once cannot double-apply it: the loser's stale-token error is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from server.domain.errors import (
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    StaleLeaseError,
)
from server.domain.models import (
    HEARTBEAT_TIMEOUT,
    Agent,
    AgentState,
    Payload,
    Task,
    TaskFailure,
    TaskState,
)
from server.domain.retry import DELIVERY_FAILED, RetryVerdict, decide, uncharged_attempts
from server.ports import AgentRegistry, Bus, FailVerdict, TaskStore, Transition
from server.services import events
from server.services.breakers import BreakerBoard
from server.services.clock import Clock
from server.services.live import LiveCapabilities
from server.services.sessions import (
    Cancellation,
    HeartbeatSession,
    ReportAck,
    ReportOutcome,
    SessionEnded,
    SessionTable,
    WorkerSession,
    add_credits,
)
from server.services.task_events import TaskEvents

log = logging.getLogger(__name__)

LEASE_EXPIRED = "LEASE_EXPIRED"
AGENT_GONE = "AGENT_GONE"
SESSION_ENDED = "SESSION_ENDED"
NO_HEARTBEAT_SESSION = "NO_HEARTBEAT_SESSION"
_LIVE_STATES = frozenset({AgentState.ACTIVE, AgentState.DRAINING})


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """Tunables of liveness and leases."""

    default_execution_timeout: float = 300.0
    reap_batch: int = 500
    heartbeat_interval: float = 1.0
    heartbeat_misses: int = 3
    gone_retention: float = 600.0
    drain_grace: float = 10.0
    """Grace period sent with a drain directive relayed from another replica."""

    @property
    def ttl(self) -> float:
        """How long an agent session lives without a beat."""
        return self.heartbeat_interval * self.heartbeat_misses


class Leases:
    """Liveness of this replica's agents and the end of every lease."""

    def __init__(self, tasks: TaskStore, agents: AgentRegistry, bus: Bus, clock: Clock, *,
                 sessions: SessionTable, task_events: TaskEvents, breakers: BreakerBoard,
                 live: LiveCapabilities, work_ready: asyncio.Event, config: LeaseConfig,
                 release_locks: Callable[[str], Awaitable[object]] | None = None) -> None:
        self._tasks = tasks
        self._agents = agents
        self._bus = bus
        self._clock = clock
        self.sessions = sessions
        self._events = task_events
        self._breakers = breakers
        self._live = live
        self._work_ready = work_ready
        self.config = config
        self._release_locks = release_locks
        self._told_drain: set[str] = set()
        """Agents whose heartbeat stream here was sent a drain directive."""

    # -- agent liveness --------------------------------------------------------------

    async def attach_heartbeat(self, session: HeartbeatSession) -> Agent:
        """A heartbeat stream opened here: record it (a beat) so work streams may open.

        FailedPreconditionError when the session already ended; the caller
        detaches nothing then.
        """
        if not self.sessions.put_heartbeat(session):
            raise ResourceExhaustedError(
                f"agents/{session.agent_id} already has a heartbeat stream",
                reason="STREAM_LIMIT")
        now = self._clock.now()
        agent = await self._agents.heartbeat(session.agent_id, in_flight=0, load=0.0, now=now,
                                             expire_time=now + self.config.ttl)
        if agent is None or agent.state not in _LIVE_STATES:
            self.sessions.drop_heartbeat(session)
            raise FailedPreconditionError(
                f"agents/{session.agent_id} session ended; register again",
                reason=SESSION_ENDED)
        return agent

    async def detach_heartbeat(self, session: HeartbeatSession, reason: str) -> None:
        """The heartbeat stream ended (either side): the agent is gone at once."""
        if self.sessions.drop_heartbeat(session):
            await self.mark_gone(session.agent_id, reason)

    async def mark_gone(self, agent_id: str, reason: str) -> bool:
        """End an agent's session everywhere; True when this call ended it.

        The store says GONE first (no lease is granted to it from then on: the
        lease step checks), then its streams here end with SESSION_ENDED, the
        other replicas hear it on the bus, its leases go back to the queue and
        its locks are released.
        """
        now = self._clock.now()
        before = await self._agents.get(agent_id)
        ended = False
        if before is not None and before.state is not AgentState.GONE:
            agent = await self._agents.set_state(agent_id, AgentState.GONE, now=now)
            if agent is not None:
                ended = True
                log.info("agent %s (%s) gone: %s", agent_id, agent.display_name, reason,
                         extra={"agent_id": agent_id, "event": "agent_gone"})
                # The event's time is read once GONE is stored: every lease stamped
                # after it was refused by the store's lease step.
                await events.announce_agent(self._bus, events.AgentEventType.LEFT, agent_id,
                                            agent.namespace, self._clock.now())
        self._told_drain.discard(agent_id)
        local = self._end_local(agent_id, f"agents/{agent_id} is gone ({reason}); "
                                          "register again")
        if ended or local:
            await self.requeue_agent(agent_id, AGENT_GONE)
            if self._release_locks is not None:
                await self._release_locks(agent_id)
        return ended

    async def mark_draining(self, agent_id: str) -> Agent | None:
        """The agent takes no new work from now on (its running work still finishes)."""
        worker = self.sessions.worker(agent_id)
        if worker is not None:
            worker.draining = True
        agent = await self._agents.set_state(agent_id, AgentState.DRAINING,
                                             now=self._clock.now())
        if agent is not None and agent.state is AgentState.DRAINING:
            self._live.forget()
            await events.announce_agent(self._bus, events.AgentEventType.UPDATED, agent_id,
                                        agent.namespace, self._clock.now())
        return agent

    async def drain_agent(self, agent_id: str, reason: str, grace_period: float) -> Agent:
        """One agent (an operator's action): DRAINING, and told so on its heartbeat stream.

        The store state stops its leases on every replica at once; the
        replica holding its heartbeat stream sends the directive (here, or on
        hearing the UPDATED event, see ``agent_event``). NotFoundError for an
        unknown agent, FailedPreconditionError (SESSION_ENDED) once it is GONE.
        """
        agent = await self._agents.get(agent_id)
        if agent is None:
            raise NotFoundError("agent", f"agents/{agent_id}")
        if agent.state is AgentState.GONE:
            raise FailedPreconditionError(f"agents/{agent_id} is gone; nothing to drain",
                                          reason=SESSION_ENDED)
        self._tell_drain(agent_id, reason, grace_period)
        drained = await self.mark_draining(agent_id)
        return drained if drained is not None else agent

    def _tell_drain(self, agent_id: str, reason: str, grace_period: float) -> None:
        """Send the drain directive once, when the agent's heartbeat stream is here."""
        hb = self.sessions.heartbeat(agent_id)
        if hb is not None and agent_id not in self._told_drain:
            self._told_drain.add(agent_id)
            hb.send_drain(reason, grace_period, True)

    async def drain_all(self, reason: str, grace_period: float) -> int:
        """Ask every agent attached here to drain; returns how many were told."""
        told = 0
        for hb in self.sessions.heartbeats():
            self._told_drain.add(hb.agent_id)
            hb.send_drain(reason, grace_period, False)
            told += 1
            await self.mark_draining(hb.agent_id)
        for worker in self.sessions.workers():
            worker.draining = True
        return told

    async def expire_agents(self) -> int:
        """Mark agents whose beats stopped as gone; returns how many."""
        now = self._clock.now()
        expired = await self._agents.expired(now)
        for agent in expired:
            await self.mark_gone(agent.id, f"missed {self.config.heartbeat_misses} heartbeats")
        await self._agents.purge(now - self.config.gone_retention)
        return len(expired)

    async def agent_event(self, body: dict[str, object]) -> None:
        """An agent event from the bus (any replica): act on local sessions it concerns."""
        agent_id = str(body.get("id", ""))
        self._live.forget()
        kind = body.get("type")
        if kind == events.AgentEventType.LEFT:
            self._breakers.forget(agent_id)
            if self._end_local(agent_id, f"agents/{agent_id} is gone; register again"):
                await self.requeue_agent(agent_id, AGENT_GONE)
        elif kind == events.AgentEventType.UPDATED and (
                self.sessions.worker(agent_id) or self.sessions.heartbeat(agent_id)):
            agent = await self._agents.get(agent_id)
            if agent is not None and agent.state is AgentState.DRAINING:
                worker = self.sessions.worker(agent_id)
                if worker is not None:
                    worker.draining = True
                # Drained through another replica: the directive goes out from here.
                self._tell_drain(agent_id, "drained by an operator", self.config.drain_grace)

    async def check_sessions(self) -> int:
        """End local sessions whose agent the store no longer holds live (a lost event)."""
        ended = 0
        for worker in self.sessions.workers():
            agent = await self._agents.get(worker.agent_id)
            if agent is None or agent.state not in _LIVE_STATES:
                ended += 1
                await self.mark_gone(worker.agent_id, "session no longer live in the store")
        return ended

    def _end_local(self, agent_id: str, message: str) -> bool:
        """End the agent's streams on this replica; True when there were any."""
        ended = SessionEnded(SESSION_ENDED, message)
        found = False
        worker = self.sessions.worker(agent_id)
        if worker is not None:
            found = True
            worker.closed = True
            self.sessions.drop_worker(worker)
            worker.in_flight.clear()  # requeued by the caller, through the store
            worker.send(ended)
            self._live.forget()
        hb = self.sessions.heartbeat(agent_id)
        if hb is not None:
            found = True
            self.sessions.drop_heartbeat(hb)
            hb.end(ended)
        return found

    # -- work streams ----------------------------------------------------------------

    async def open_worker(self, session: WorkerSession) -> None:
        """Attach a work stream (replacing an older one of the same agent).

        FAILED_PRECONDITION (``NO_HEARTBEAT_SESSION``) unless the agent's
        session is live with a heartbeat stream open (on any replica): a work
        stream alone proves nothing about liveness.
        """
        agent = await self._agents.get(session.agent_id)
        now = self._clock.now()
        if agent is None or agent.state not in _LIVE_STATES:
            raise FailedPreconditionError(
                f"agents/{session.agent_id} session ended; register again",
                reason=SESSION_ENDED)
        if agent.heartbeat_time <= 0 or agent.expire_time <= now:
            raise FailedPreconditionError(
                f"agents/{session.agent_id} has no live heartbeat session: open the Heartbeat "
                "stream first and wait for its first ack", reason=NO_HEARTBEAT_SESSION)
        session.draining = session.draining or agent.state is AgentState.DRAINING
        old = self.sessions.put_worker(session)
        if old is not None:
            old.closed = True
            old.send(None)
        self._live.forget()

    async def close_worker(self, session: WorkerSession, reason: str = AGENT_GONE) -> None:
        """The work stream ended: its leases go back to the queue.

        When a newer stream of the same agent replaced this one, only the
        leases this stream held go back; the newer stream's stay with it.
        """
        session.closed = True
        self._live.forget()
        if self.sessions.drop_worker(session):
            await self.requeue_agent(session.agent_id, reason)
            return
        for task_id, token in list(session.in_flight.items()):
            task = await self._tasks.get_task(task_id)
            if task is None or task.fencing_token != token:
                continue
            await self.give_back(task, token, reason, "work stream replaced")

    async def requeue_agent(self, agent_id: str, reason: str = AGENT_GONE) -> int:
        """Requeue every task leased to an agent whose stream or session ended."""
        self._breakers.forget(agent_id)
        leased = await self._tasks.leases_of(agent_id)
        for task in leased:
            await self.give_back(task, task.fencing_token, reason,
                                 f"agent agents/{agent_id} went away")
        if leased:
            log.info("requeued %d task(s) of agent %s (%s)", len(leased), agent_id, reason,
                     extra={"agent_id": agent_id, "event": "requeue_agent"})
        return len(leased)

    # -- reports ---------------------------------------------------------------------

    async def holds(self, session: WorkerSession | None, task_id: str, token: int) -> bool:
        """The one fencing pre-check: does this stream hold this lease?

        Without a stream (CompleteTask) only the store's own fencing applies.
        A lease the store holds for this agent under this token, though this
        stream never sent it (delivered on an earlier work stream of the
        agent, on this replica or another, before a reconnect), is adopted:
        it is this stream's from now on, so its report counts and returns
        its slot. The store's fencing stays the authority either way.
        """
        return (await self._held(session, task_id, token))[0]

    async def check(self, session: WorkerSession | None, task_id: str, token: int) -> int:
        """``holds`` for a report: ACCEPTED, or why it is refused (one store read)."""
        held, task = await self._held(session, task_id, token)
        if held:
            return ReportOutcome.ACCEPTED
        self._events.observer.stale_result(task_id)
        return _refusal_of(task)

    async def _held(self, session: WorkerSession | None, task_id: str,
                    token: int) -> tuple[bool, Task | None]:
        """Whether the stream holds (or now adopts) the lease, and the task when read."""
        if session is None or session.in_flight.get(task_id) == token:
            return True, None
        task = await self._tasks.get_task(task_id)
        if (session.closed or task is None or task.state is not TaskState.RUNNING
                or task.fencing_token != token or task.agent_id != session.agent_id):
            return False, task
        session.in_flight[task_id] = token
        return True, task

    async def refusal(self, task_id: str, token: int) -> int:
        """Why a report under ``token`` was refused: STALE_LEASE or NOT_RUNNING.

        NOT_RUNNING: the task is unknown or has ended (another attempt
        succeeded, it was cancelled, failed or dead-lettered). STALE_LEASE: the
        task is still live but this lease ended (it was requeued, or a newer
        attempt holds it).
        """
        del token  # the task's own state says which
        self._events.observer.stale_result(task_id)
        return _refusal_of(await self._tasks.get_task(task_id))

    async def report_results(self, session: WorkerSession | None,
                             items: Sequence[tuple[str, int, Payload]]) -> list[int]:
        """Results in one store step; one ReportOutcome each."""
        outcomes = [ReportOutcome.ACCEPTED] * len(items)
        todo: list[tuple[str, int, Payload]] = []
        index: list[int] = []
        for i, (task_id, token, output) in enumerate(items):
            outcome = await self.check(session, task_id, token)
            if outcome == ReportOutcome.ACCEPTED:
                todo.append((task_id, token, output))
                index.append(i)
            else:
                outcomes[i] = outcome
        if not todo:
            return outcomes
        now = self._clock.now()
        try:
            results = await self._tasks.complete_many(todo, now=now)
        finally:
            if session is not None:
                for task_id, token, _ in todo:
                    self._release_slot(session, task_id, token)
        for i, (task_id, token, _), result in zip(index, todo, results, strict=True):
            if isinstance(result, Transition):
                await self._events.after(result, now)
                for change in result.tasks:
                    if change.task.id == task_id and change.previous_state is TaskState.RUNNING:
                        done = change.task
                        await self._breakers.record(done.namespace, done.agent_id,
                                                    served_capability(done), ok=True)
                        break
            else:
                outcomes[i] = await self.refusal(task_id, token)
        return outcomes

    async def report_failure(self, session: WorkerSession | None, task_id: str, token: int,
                             failure: TaskFailure) -> int:
        """Record a failed attempt and schedule what the retry policy says."""
        outcome = await self.check(session, task_id, token)
        if outcome != ReportOutcome.ACCEPTED:
            return outcome
        try:
            task = await self._tasks.get_task(task_id)
            if task is None:
                return await self.refusal(task_id, token)
            await self.end_attempt(task, token, failure)
        except StaleLeaseError:
            return await self.refusal(task_id, token)
        finally:
            if session is not None:
                self._release_slot(session, task_id, token)
        return ReportOutcome.ACCEPTED

    def acknowledge(self, session: WorkerSession, task_id: str, token: int,
                    outcome: int) -> None:
        """Tell the stream what became of a report (accepted ones only when it asked)."""
        if outcome != ReportOutcome.ACCEPTED or session.ack_reports:
            session.send(ReportAck(task_id, token, outcome))

    async def renew(self, session: WorkerSession | None, task_id: str, token: int) -> bool:
        """Progress renews a running attempt's lease; False when the lease is gone.

        With a heartbeat timeout the lease moves to ``now + heartbeat_timeout``,
        capped by the attempt's start-to-close deadline (``start_time +
        execution_timeout``). Without one it moves to ``now + execution_timeout``.
        A stale token is not an error of the stream: the attempt is told to stop.
        """
        task = await self._tasks.get_task(task_id)
        if task is None:
            return False
        now = self._clock.now()
        timeout = task.execution_timeout or self.config.default_execution_timeout
        if task.heartbeat_timeout > 0:
            deadline = min(task.start_time + timeout, now + task.heartbeat_timeout)
        else:
            deadline = now + timeout
        try:
            await self._tasks.renew_lease(task_id, token, deadline)
        except StaleLeaseError:
            if session is not None and session.in_flight.get(task_id) == token:
                del session.in_flight[task_id]
                session.send(Cancellation(task_id, token, "lease ended"))
            return False
        return True

    def _release_slot(self, session: WorkerSession, task_id: str, token: int) -> None:
        """A reported result or failure frees its slot and returns one credit."""
        if session.in_flight.get(task_id) == token:
            del session.in_flight[task_id]
            add_credits(session, 1)
            self._work_ready.set()

    # -- timeouts and failures -------------------------------------------------------

    async def reap(self) -> int:
        """End leases past their deadline (execution or heartbeat timeout)."""
        expired = await self._tasks.expired_leases(self._clock.now(), self.config.reap_batch)
        for task in expired:
            with contextlib.suppress(StaleLeaseError):
                await self.end_attempt(task, task.fencing_token, self._expiry_failure(task))
                await self._events.stop_running([task], "lease expired")
        return len(expired)

    async def give_back(self, task: Task, token: int, reason: str, message: str) -> None:
        """Requeue a lease at once; a lease that moved on is left alone."""
        with contextlib.suppress(StaleLeaseError):
            await self.end_attempt(task, token, TaskFailure(reason, message), immediate=True)

    async def end_attempt(self, task: Task, token: int, failure: TaskFailure, *,
                          immediate: bool = False) -> Transition:
        """End attempt ``token`` with ``failure``: retry, fail or dead-letter it."""
        now = self._clock.now()
        decision = decide(task.retry_policy, task.attempt - uncharged_attempts(task), failure,
                          task.budget_start)
        verdict = {RetryVerdict.RETRY: FailVerdict.RETRY, RetryVerdict.FAIL: FailVerdict.FAIL,
                   RetryVerdict.DEAD_LETTER: FailVerdict.DEAD_LETTER}[decision.verdict]
        retry_at = now if immediate else now + decision.delay
        transition = await self._tasks.fail(task.id, token, failure, verdict=verdict,
                                            retry_at=retry_at, now=now)
        await self._events.after(transition, now)
        if counts_against_agent(failure, task) and task.agent_id:
            await self._breakers.record(task.namespace, task.agent_id, served_capability(task),
                                        ok=False)
        return transition

    def _expiry_failure(self, task: Task) -> TaskFailure:
        """HEARTBEAT_TIMEOUT when the lease ended before start-to-close, else LEASE_EXPIRED."""
        timeout = task.execution_timeout or self.config.default_execution_timeout
        if task.heartbeat_timeout > 0 and task.lease_deadline < task.start_time + timeout - 1e-6:
            return TaskFailure(HEARTBEAT_TIMEOUT, (
                f"attempt {task.attempt} sent no progress for {task.heartbeat_timeout:g}s "
                f"on agents/{task.agent_id}"))
        return TaskFailure(LEASE_EXPIRED, f"attempt {task.attempt} ran past its lease "
                           f"(execution timeout) on agents/{task.agent_id}")


def served_capability(task: Task) -> str:
    """The capability the agent served: the fallback when it stood in for the primary."""
    return task.fallback_capability if task.served_by_fallback else task.capability


_NOT_AGENT_FAULTS = frozenset({AGENT_GONE, DELIVERY_FAILED, "CANCELLED", "UPSTREAM_FAILED"})


def counts_against_agent(failure: TaskFailure, task: Task) -> bool:
    """Whether a failed attempt counts toward the agent's circuit breaker.

    Retryable failures and lease/heartbeat expiries do; a non-retryable error
    (the input is bad, not the agent), the agent's own departure and the
    server's failure to deliver do not.
    """
    if failure.error_type in _NOT_AGENT_FAULTS or failure.non_retryable:
        return False
    return failure.error_type not in task.retry_policy.non_retryable_error_types


__all__ = [
    "AGENT_GONE",
    "DELIVERY_FAILED",
    "LEASE_EXPIRED",
    "NO_HEARTBEAT_SESSION",
    "SESSION_ENDED",
    "LeaseConfig",
    "Leases",
    "counts_against_agent",
    "served_capability",
]


def _refusal_of(task: Task | None) -> int:
    """NOT_RUNNING for an unknown or ended task, else STALE_LEASE (see ``Leases.refusal``)."""
    if task is None or task.state.terminal:
        return ReportOutcome.NOT_RUNNING
    return ReportOutcome.STALE_LEASE

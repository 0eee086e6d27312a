"""Agent registry use cases: register, authenticate, beats, discovery.

An agent is live while its heartbeat stream is open and beats keep arriving.
A broken stream marks it GONE at once; a stream that stays open but goes quiet
(a hung or paused process) marks it GONE after ``heartbeat_misses`` intervals.
Ending a session, and everything that follows from it (its streams closed,
its leases requeued, its locks released), belongs to
``server/services/leases.py``; this module only delegates to it.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from server.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from server.domain.human import is_desk
from server.domain.models import Agent, AgentState
from server.ports import AgentFilter, AgentRegistry, Bus
from server.services import events
from server.services.clock import Clock
from server.services.events import AgentEventType
from server.services.leases import SESSION_ENDED, LeaseConfig, Leases
from server.services.sessions import HeartbeatSession

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """An agent after an event."""

    type: AgentEventType
    agent: Agent
    time: float


class Registry:
    """Discovery for one replica; the AgentRegistry port is the source of truth."""

    def __init__(self, agents: AgentRegistry, bus: Bus, clock: Clock, leases: Leases) -> None:
        self._agents = agents
        self._bus = bus
        self._clock = clock
        self._leases = leases
        self._loads: dict[str, tuple[int, float]] = {}
        """Last (in_flight, load) beaten by each agent attached here."""

    @property
    def config(self) -> LeaseConfig:
        """Heartbeat interval, misses and retention (owned by the leases)."""
        return self._leases.config

    @property
    def ttl(self) -> float:
        """How long a session lives without a beat."""
        return self._leases.config.ttl

    async def register(self, card: Agent) -> Agent:
        """Add an agent and open its session; the returned agent holds the token.

        ``heartbeat_time`` stays 0 until the agent's heartbeat stream opens: a
        work stream is refused before that (see ``Leases.open_worker``).
        """
        if not card.capabilities:
            raise InvalidArgumentError.field("agent.capabilities",
                                             "an agent needs at least one capability")
        now = self._clock.now()
        agent = replace(card, id=uuid.uuid4().hex, state=AgentState.ACTIVE,
                        session_token=secrets.token_urlsafe(24), register_time=now,
                        heartbeat_time=0.0, expire_time=now + self.ttl, in_flight=0, load=0.0)
        await self._agents.register(agent)
        await events.announce_agent(self._bus, AgentEventType.JOINED, agent.id,
                                    agent.namespace, now)
        log.info("agent %s (%s) registered: %s", agent.id, agent.display_name,
                 ",".join(sorted(agent.capability_names)),
                 extra={"agent_id": agent.id, "event": "agent_registered"})
        return agent

    async def authenticate(self, agent_id: str, session_token: str) -> Agent:
        """The live agent whose session this token proves."""
        agent = await self._agents.get(agent_id)
        if agent is None:
            raise NotFoundError("agent", f"agents/{agent_id}")
        if not secrets.compare_digest(agent.session_token, session_token):
            raise UnauthenticatedError("session token does not match the agent",
                                       reason="BAD_SESSION_TOKEN")
        if agent.state is AgentState.GONE:
            raise FailedPreconditionError(
                f"agents/{agent_id} session ended; register again", reason=SESSION_ENDED)
        return agent

    async def attach(self, session: HeartbeatSession) -> Agent:
        """A heartbeat stream opened on this replica (see ``Leases.attach_heartbeat``)."""
        return await self._leases.attach_heartbeat(session)

    async def beat(self, agent_id: str, in_flight: int, load: float) -> Agent:
        """Record a heartbeat; FailedPreconditionError once the session ended."""
        now = self._clock.now()
        agent = await self._agents.heartbeat(agent_id, in_flight=in_flight, load=load, now=now,
                                             expire_time=now + self.ttl)
        if agent is None or agent.state is AgentState.GONE:
            raise FailedPreconditionError(
                f"agents/{agent_id} session ended; register again", reason=SESSION_ENDED)
        if self._loads.get(agent_id) != (in_flight, load):
            self._loads[agent_id] = (in_flight, load)
            await events.announce_agent(self._bus, AgentEventType.UPDATED, agent_id,
                                        agent.namespace, now, load=True)
        return agent

    async def detach(self, session: HeartbeatSession, reason: str) -> None:
        """The heartbeat stream ended: the agent is gone at once."""
        self._loads.pop(session.agent_id, None)
        await self._leases.detach_heartbeat(session, reason)

    async def deregister(self, agent_id: str, session_token: str) -> None:
        """End a session on the agent's request."""
        await self.authenticate(agent_id, session_token)
        await self.mark_gone(agent_id, "deregistered")

    async def mark_gone(self, agent_id: str, reason: str) -> None:
        """End a session and hand its leases back (see ``Leases.mark_gone``)."""
        self._loads.pop(agent_id, None)
        await self._leases.mark_gone(agent_id, reason)

    async def expire(self) -> int:
        """Mark agents whose beats stopped as gone; returns how many."""
        return await self._leases.expire_agents()

    async def drain_all(self, reason: str, grace_period: float) -> int:
        """Ask every agent attached here to drain; returns how many were told.

        Each is DRAINING from now on (its in-flight work still finishes and is
        accepted; it takes no new work) and watchers get an UPDATED event.
        """
        return await self._leases.drain_all(reason, grace_period)

    async def drain(self, agent_id: str, reason: str, grace_period: float) -> Agent:
        """An operator drains one agent (see ``Leases.drain_agent``)."""
        return await self._leases.drain_agent(agent_id, reason, grace_period)

    async def get(self, agent_id: str) -> Agent:
        """One agent (NotFoundError)."""
        agent = await self._agents.get(agent_id)
        if agent is None:
            raise NotFoundError("agent", f"agents/{agent_id}")
        return agent

    async def list(self, flt: AgentFilter, *, after_id: str, limit: int) -> list[Agent]:
        """A page of agents ordered by id (the human desks left out: they are the
        server's own, see server/services/approvals.py)."""
        out: list[Agent] = []
        after = after_id
        while len(out) < limit:
            want = limit - len(out)
            page = await self._agents.list_agents(flt, after_id=after, limit=want)
            out.extend(a for a in page if not is_desk(a.id))
            if len(page) < want:
                break
            after = page[-1].id
        return out

    async def watch(self, namespace: str, capability: str, *, include_existing: bool,
                    max_pending: int = 1000) -> AsyncIterator[AgentEvent]:
        """Agent events of a namespace, optionally starting with every live agent."""
        sub = await self._bus.subscribe(events.agent_pattern(namespace), max_pending=max_pending)
        try:
            if include_existing:
                after = ""
                live = frozenset({AgentState.ACTIVE, AgentState.DRAINING})
                while True:
                    page = await self._agents.list_agents(
                        AgentFilter(namespace, capability, live), after_id=after, limit=500)
                    for agent in page:
                        yield AgentEvent(AgentEventType.JOINED, agent, self._clock.now())
                    if len(page) < 500:
                        break
                    after = page[-1].id
            async for message in sub:
                if sub.dropped:
                    raise ResourceExhaustedError("watcher fell behind and was cut off",
                                                 reason="SLOW_CONSUMER")
                body = events.decode(message.data)
                changed = await self._agents.get(str(body.get("id", "")))
                if changed is None:
                    continue
                if capability and capability not in changed.capability_names:
                    continue
                yield AgentEvent(AgentEventType(int(body.get("type", 2))), changed,
                                 float(body.get("time", self._clock.now())))
        finally:
            await sub.unsubscribe()

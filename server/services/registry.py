"""Agent registry use cases: register, heartbeat sessions, discovery, expiry.

An agent is live while its heartbeat stream is open and beats keep arriving.
A broken stream marks it GONE at once; a stream that stays open but goes quiet
(a hung or paused process) marks it GONE after ``heartbeat_misses`` intervals.
Either way its leased tasks go back to the queue through ``on_gone``.
"""

from __future__ import annotations

import enum
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from server.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from server.domain.models import Agent, AgentState
from server.ports import AgentFilter, AgentRegistry, Bus
from server.services import events
from server.services.clock import Clock

log = logging.getLogger(__name__)


class AgentEventType(enum.IntEnum):
    """What happened to an agent (values match the proto enum)."""

    JOINED = 1
    UPDATED = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """An agent after an event."""

    type: AgentEventType
    agent: Agent
    time: float


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Heartbeat tunables."""

    heartbeat_interval: float = 1.0
    heartbeat_misses: int = 3
    gone_retention: float = 600.0


@dataclass(frozen=True, slots=True)
class Drain:
    """A drain directive for an agent's heartbeat stream."""

    reason: str
    grace_period: float


class Registry:
    """Discovery for one replica; the AgentRegistry port is the source of truth."""

    def __init__(self, agents: AgentRegistry, bus: Bus, clock: Clock,
                 config: RegistryConfig | None = None) -> None:
        self._agents = agents
        self._bus = bus
        self._clock = clock
        self.config = config or RegistryConfig()
        self.on_gone: Callable[[Agent], Awaitable[None]] | None = None
        self._streams: dict[str, Callable[[Drain], None]] = {}
        self._loads: dict[str, tuple[int, float]] = {}
        """Last (in_flight, load) beaten by each agent attached here."""

    @property
    def ttl(self) -> float:
        """How long a session lives without a beat."""
        return self.config.heartbeat_interval * self.config.heartbeat_misses

    async def register(self, card: Agent) -> Agent:
        """Add an agent and open its session; the returned agent holds the token."""
        if not card.capabilities:
            raise InvalidArgumentError.field("agent.capabilities",
                                             "an agent needs at least one capability")
        now = self._clock.now()
        agent = replace(card, id=uuid.uuid4().hex, state=AgentState.ACTIVE,
                        session_token=secrets.token_urlsafe(24), register_time=now,
                        heartbeat_time=now, expire_time=now + self.ttl, in_flight=0, load=0.0)
        await self._agents.register(agent)
        await self._publish(AgentEventType.JOINED, agent)
        log.info("agent %s (%s) registered: %s", agent.id, agent.display_name,
                 ",".join(sorted(agent.capability_names)))
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
                f"agents/{agent_id} session ended; register again", reason="SESSION_ENDED")
        return agent

    def attach(self, agent_id: str, send_drain: Callable[[Drain], None]) -> None:
        """A heartbeat stream opened on this replica."""
        if agent_id in self._streams:
            raise ResourceExhaustedError(
                f"agents/{agent_id} already has a heartbeat stream", reason="STREAM_LIMIT")
        self._streams[agent_id] = send_drain

    async def beat(self, agent_id: str, in_flight: int, load: float) -> Agent:
        """Record a heartbeat; FailedPreconditionError once the session ended."""
        now = self._clock.now()
        agent = await self._agents.heartbeat(agent_id, in_flight=in_flight, load=load, now=now,
                                             expire_time=now + self.ttl)
        if agent is None:
            raise FailedPreconditionError(
                f"agents/{agent_id} session ended; register again", reason="SESSION_ENDED")
        if agent_id in self._streams and self._loads.get(agent_id) != (in_flight, load):
            self._loads[agent_id] = (in_flight, load)
            await self._publish(AgentEventType.UPDATED, agent, load=True)
        return agent

    async def detach(self, agent_id: str, reason: str) -> None:
        """The heartbeat stream ended: the agent is gone at once."""
        self._streams.pop(agent_id, None)
        self._loads.pop(agent_id, None)
        await self.mark_gone(agent_id, reason)

    async def deregister(self, agent_id: str, session_token: str) -> None:
        """End a session on the agent's request."""
        await self.authenticate(agent_id, session_token)
        await self.mark_gone(agent_id, "deregistered")

    async def mark_gone(self, agent_id: str, reason: str) -> None:
        """End a session and hand its leases back."""
        self._loads.pop(agent_id, None)
        before = await self._agents.get(agent_id)
        if before is None or before.state is AgentState.GONE:
            return
        agent = await self._agents.set_state(agent_id, AgentState.GONE, now=self._clock.now())
        if agent is None:
            return
        log.info("agent %s (%s) gone: %s", agent.id, agent.display_name, reason)
        await self._publish(AgentEventType.LEFT, agent)
        if self.on_gone is not None:
            await self.on_gone(agent)

    async def expire(self) -> int:
        """Mark agents whose beats stopped as gone; returns how many."""
        now = self._clock.now()
        expired = await self._agents.expired(now)
        for agent in expired:
            await self.mark_gone(agent.id, f"missed {self.config.heartbeat_misses} heartbeats")
        await self._agents.purge(now - self.config.gone_retention)
        return len(expired)

    async def drain_all(self, reason: str, grace_period: float) -> int:
        """Ask every agent attached here to drain; returns how many were told.

        Each is DRAINING from now on (its in-flight work still finishes and is
        accepted; it takes no new work) and watchers get an UPDATED event.
        """
        told = 0
        for agent_id, send in list(self._streams.items()):
            send(Drain(reason, grace_period))
            told += 1
            agent = await self._agents.set_state(agent_id, AgentState.DRAINING,
                                                 now=self._clock.now())
            if agent is not None and agent.state is AgentState.DRAINING:
                await self._publish(AgentEventType.UPDATED, agent)
        return told

    async def get(self, agent_id: str) -> Agent:
        """One agent (NotFoundError)."""
        agent = await self._agents.get(agent_id)
        if agent is None:
            raise NotFoundError("agent", f"agents/{agent_id}")
        return agent

    async def list(self, flt: AgentFilter, *, after_id: str, limit: int) -> list[Agent]:
        """A page of agents ordered by id."""
        return await self._agents.list_agents(flt, after_id=after_id, limit=limit)

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

    async def _publish(self, kind: AgentEventType, agent: Agent, *, load: bool = False) -> None:
        await events.announce(
            self._bus, events.agent_subject(agent.namespace, load=load),
            events.encode({"id": agent.id, "type": int(kind), "time": self._clock.now()}))

"""In-memory AgentRegistry."""

from __future__ import annotations

from dataclasses import replace

from server.domain.models import Agent, AgentState
from server.ports import AgentFilter

_LIVE = frozenset({AgentState.ACTIVE, AgentState.DRAINING})


class InMemoryAgentRegistry:
    """AgentRegistry for the embedded mode.

    The :class:`~server.backends.memory.InMemoryTaskStore` built with it
    (``InMemoryTaskStore(agents=registry)``) asks :meth:`accepts_leases` in
    each lease step.
    """

    def __init__(self) -> None:
        self._agents: dict[str, Agent] = {}

    async def register(self, agent: Agent) -> Agent:
        """See AgentRegistry.register."""
        self._agents[agent.id] = agent
        return agent

    async def get(self, agent_id: str) -> Agent | None:
        """See AgentRegistry.get."""
        return self._agents.get(agent_id)

    def accepts_leases(self, agent_id: str, now: float) -> bool:
        """True when the agent is known, ACTIVE and its session has not expired.

        Synchronous (no await), so the task store's lease step that calls it
        stays atomic on the event loop.
        """
        agent = self._agents.get(agent_id)
        return agent is not None and agent.state is AgentState.ACTIVE and agent.expire_time > now

    async def list_agents(self, flt: AgentFilter, *, after_id: str, limit: int) -> list[Agent]:
        """See AgentRegistry.list_agents."""
        out: list[Agent] = []
        for agent_id in sorted(self._agents):
            if agent_id <= after_id:
                continue
            agent = self._agents[agent_id]
            if agent.namespace != flt.namespace:
                continue
            if flt.states and agent.state not in flt.states:
                continue
            if flt.capability and flt.capability not in agent.capability_names:
                continue
            if any(agent.labels.get(k) != v for k, v in flt.labels.items()):
                continue
            out.append(agent)
            if len(out) >= limit:
                break
        return out

    async def heartbeat(self, agent_id: str, *, in_flight: int, load: float, now: float,
                        expire_time: float) -> Agent | None:
        """See AgentRegistry.heartbeat."""
        agent = self._agents.get(agent_id)
        if agent is None or agent.state not in _LIVE:
            return None
        agent = replace(agent, in_flight=in_flight, load=load, heartbeat_time=now,
                        expire_time=expire_time)
        self._agents[agent_id] = agent
        return agent

    async def set_state(self, agent_id: str, state: AgentState, *, now: float) -> Agent | None:
        """See AgentRegistry.set_state."""
        agent = self._agents.get(agent_id)
        if agent is None:
            return None
        if agent.state is AgentState.GONE:
            return agent
        agent = replace(agent, state=state)
        self._agents[agent_id] = agent
        return agent

    async def expired(self, now: float) -> list[Agent]:
        """See AgentRegistry.expired."""
        return [a for a in self._agents.values() if a.state in _LIVE and a.expire_time < now]

    async def live_capabilities(self, namespace: str) -> frozenset[str]:
        """See AgentRegistry.live_capabilities."""
        caps: set[str] = set()
        for agent in self._agents.values():
            if agent.namespace == namespace and agent.state is AgentState.ACTIVE:
                caps.update(agent.capability_names)
        return frozenset(caps)

    async def purge(self, before: float) -> int:
        """See AgentRegistry.purge."""
        gone = [a.id for a in self._agents.values()
                if a.state is AgentState.GONE
                and max(a.heartbeat_time, a.register_time) < before]
        for agent_id in gone:
            del self._agents[agent_id]
        return len(gone)

    async def aclose(self) -> None:
        """Nothing to release."""

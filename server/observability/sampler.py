"""Periodic gauges that mirror the shared store: queue depth, agents, in-flight, autonomy.

Every ``interval`` seconds (2 s by default, ``AGENTMESH_GAUGE_INTERVAL``) each
replica reads, for every namespace it knows (``default`` and the namespaces
it has seen tasks in, at most `MAX_NAMESPACES`):

- ``TaskStore.stats(namespace)`` (one HGETALL on Redis, a dict read in
  memory) -> ``agentmesh_queue_depth{namespace, capability, state}`` and
  ``agentmesh_autonomy_ratio{namespace}``. The stores keep a counter per
  (capability, live state) updated in the same atomic step as every state
  change, so this costs no scan; a capability that drained reads 0;
- the agent listing (paged, 1000 per call) -> ``agentmesh_agents{namespace,
  state}``, ``agentmesh_agent_in_flight{agent}`` (reported by heartbeats;
  departed agents' series are removed) and
  ``agentmesh_capability_agents{namespace, capability}`` (live agents per
  capability; a capability whose agents all left reads 0).

All replicas export the same values: queries aggregate them with ``max``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import Final

from server.aio import raise_if_cancelling
from server.domain.models import AgentState, TaskState
from server.observability.metrics import MeshMetrics, QueueState
from server.observability.observer import MAX_NAMESPACES
from server.ports import AgentFilter
from server.services.registry import Registry
from server.services.scheduler import Scheduler

log = logging.getLogger(__name__)

__all__ = ["GaugeSampler"]

_QUEUE_STATES: Final[dict[TaskState, QueueState]] = {
    TaskState.PENDING: "pending",
    TaskState.QUEUED: "queued",
    TaskState.RUNNING: "running",
    TaskState.RETRYING: "retrying",
}
_AGENT_STATES: Final[dict[AgentState, str]] = {
    AgentState.ACTIVE: "active", AgentState.DRAINING: "draining", AgentState.GONE: "gone"}
_PAGE: Final = 1000
_MAX_PAGES: Final = 50
_MAX_CAPABILITIES: Final = 1000


class GaugeSampler:
    """Sets the store-mirroring gauges; `run` repeats `sample_once` until cancelled."""

    def __init__(self, metrics: MeshMetrics, scheduler: Scheduler, registry: Registry,
                 namespaces: Callable[[], Collection[str]]) -> None:
        """Read from ``scheduler`` and ``registry`` for the namespaces ``namespaces()`` gives."""
        self._m = metrics
        self._scheduler = scheduler
        self._registry = registry
        self._namespaces = namespaces
        self._agents_seen: set[str] = set()
        self._caps_seen: set[tuple[str, str]] = set()
        self._depth_keys: dict[str, set[tuple[str, TaskState]]] = {}

    async def run(self, interval: float) -> None:
        """Sample every ``interval`` seconds; a failed pass is logged and retried."""
        while True:
            raise_if_cancelling()
            try:
                await self.sample_once()
            except Exception:
                log.warning("metrics gauge pass failed", exc_info=True)
            await asyncio.sleep(interval)

    async def sample_once(self) -> None:
        """One pass over every known namespace."""
        namespaces = sorted(self._namespaces())[:MAX_NAMESPACES]
        in_flight: dict[str, int] = {}
        caps: dict[tuple[str, str], int] = {}
        m = self._m
        for ns in namespaces:
            stats = await self._scheduler.stats(ns)
            seen = self._depth_keys.setdefault(ns, set())
            current = {(cap, state): n for (cap, state), n in
                       stats.waiting_by_capability.items()
                       if state in _QUEUE_STATES and ((cap, state) in seen
                                                      or len(seen) < _MAX_CAPABILITIES)}
            for cap, state in seen - set(current):
                m.set_queue_depth(ns, cap, _QUEUE_STATES[state], 0)  # drained since last pass
            for (cap, state), n in current.items():
                m.set_queue_depth(ns, cap, _QUEUE_STATES[state], n)
            seen |= set(current)
            m.set_autonomy(ns, min(max(stats.autonomy, 0.0), 1.0))
            by_state = dict.fromkeys(_AGENT_STATES.values(), 0)
            after = ""
            for _ in range(_MAX_PAGES):
                page = await self._registry.list(AgentFilter(ns), after_id=after, limit=_PAGE)
                for agent in page:
                    by_state[_AGENT_STATES[agent.state]] += 1
                    if agent.state is AgentState.GONE:
                        continue
                    name = agent.display_name or agent.id
                    in_flight[name] = in_flight.get(name, 0) + agent.in_flight
                    if agent.state is AgentState.ACTIVE:
                        for cap in agent.capability_names:
                            caps[(ns, cap)] = caps.get((ns, cap), 0) + 1
                if len(page) < _PAGE:
                    break
                after = page[-1].id
            for label, n in by_state.items():
                m.set_agents(ns, label, n)  # type: ignore[arg-type]
        for name, n in in_flight.items():
            m.set_in_flight(name, n)
        for name in self._agents_seen - in_flight.keys():
            m.remove_agent(name)
        self._agents_seen = set(in_flight)
        for ns, cap in caps:
            # Every capability a live agent offers has depth series, 0 when idle.
            seen = self._depth_keys.setdefault(ns, set())
            for state, label in _QUEUE_STATES.items():
                if (cap, state) not in seen and len(seen) < _MAX_CAPABILITIES:
                    seen.add((cap, state))
                    m.set_queue_depth(ns, cap, label, 0)
        for key in self._caps_seen - caps.keys():
            m.set_capability_agents(*key, 0)
        for key, n in caps.items():
            if key in self._caps_seen or len(self._caps_seen) < _MAX_CAPABILITIES:
                self._caps_seen.add(key)
                m.set_capability_agents(*key, n)

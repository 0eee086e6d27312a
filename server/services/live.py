"""Which capabilities a namespace's live agents offer, cached for dispatch.

Dispatch asks once per round and namespace; the registry store answers (a
Redis round trip). The answer is reused for ``LIVE_CACHE_SECONDS``; every
agent join or leave (a bus event, from any replica) and every local work
stream opening or closing drops it at once, and the age bound covers a lost
event. Time is read from the injected clock.
"""

from __future__ import annotations

from server.ports import AgentRegistry
from server.services.clock import Clock

LIVE_CACHE_SECONDS = 0.5


class LiveCapabilities:
    """``AgentRegistry.live_capabilities`` per namespace, reused for a short while."""

    def __init__(self, agents: AgentRegistry, clock: Clock,
                 max_age: float = LIVE_CACHE_SECONDS) -> None:
        self._agents = agents
        self._clock = clock
        self._max_age = max_age
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    async def get(self, namespace: str) -> frozenset[str]:
        """Capabilities some ACTIVE agent of ``namespace`` offers (maybe a little old)."""
        now = self._clock.now()
        hit = self._cache.get(namespace)
        if hit is not None and 0 <= now - hit[0] < self._max_age:
            return hit[1]
        live = await self._agents.live_capabilities(namespace)
        self._cache[namespace] = (now, live)
        return live

    def forget(self) -> None:
        """Drop every cached answer (an agent joined, left or changed state)."""
        self._cache.clear()

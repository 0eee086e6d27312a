"""Redis AgentRegistry: each write is one Lua script (``agents.lua``)."""

from __future__ import annotations

import json
import logging
from typing import Any

from server.backends.redis import codec
from server.backends.redis._client import RedisClient
from server.backends.redis._durability import NONE, Durability
from server.backends.redis._scripts import Library
from server.domain.models import Agent, AgentState
from server.ports import AgentFilter

logger = logging.getLogger(__name__)


class RedisAgentRegistry:
    """AgentRegistry on Redis; safe to share between server replicas.

    Build it with :meth:`server.backends.redis.RedisStores.connect`, or pass a
    ``redis.asyncio.Redis`` created with ``decode_responses=True`` and the
    deployment's key prefix.
    """

    def __init__(self, client: RedisClient, prefix: str = "agentmesh", *,
                 durability: Durability = NONE) -> None:
        self._r = client
        self._base = "{" + prefix + "}"
        self.library = Library(client, "agents", durability)
        """The ``agents.lua`` library (loaded by :meth:`RedisStores.connect`, or on first use)."""

    async def _call(self, *args: str | int | float) -> Any:
        return await self.library.call([self._base], args)

    async def _read(self, *args: str | int | float) -> Any:
        """A read-only op (FCALL_RO)."""
        return await self.library.call_ro([self._base], args)

    async def register(self, agent: Agent) -> Agent:
        """See AgentRegistry.register."""
        return codec.decode_agent(await self._call("register", codec.encode_agent(agent)))

    async def get(self, agent_id: str) -> Agent | None:
        """See AgentRegistry.get."""
        raw = await self._r.get(f"{self._base}:agent:{agent_id}")
        return codec.decode_agent(codec.text(raw)) if raw else None

    async def list_agents(self, flt: AgentFilter, *, after_id: str, limit: int) -> list[Agent]:
        """See AgentRegistry.list_agents."""
        if limit <= 0:
            return []
        doc = json.dumps({"states": sorted(int(s) for s in flt.states),
                          "capability": flt.capability, "labels": dict(flt.labels)})
        raws = await self._read("list", flt.namespace, doc, after_id, limit)
        return [codec.decode_agent(r) for r in raws]

    async def heartbeat(self, agent_id: str, *, in_flight: int, load: float, now: float,
                        expire_time: float) -> Agent | None:
        """See AgentRegistry.heartbeat."""
        raw = await self._call("heartbeat", agent_id, in_flight, codec.fstr(load),
                               codec.fstr(now), codec.fstr(expire_time))
        return codec.decode_agent(raw) if raw else None

    async def set_state(self, agent_id: str, state: AgentState, *, now: float) -> Agent | None:
        """See AgentRegistry.set_state."""
        raw = await self._call("set_state", agent_id, int(state))
        return codec.decode_agent(raw) if raw else None

    async def expired(self, now: float) -> list[Agent]:
        """See AgentRegistry.expired."""
        return [codec.decode_agent(r) for r in await self._read("expired", codec.fstr(now))]

    async def live_capabilities(self, namespace: str) -> frozenset[str]:
        """See AgentRegistry.live_capabilities (counts kept by the scripts)."""
        counts = await self._r.hgetall(f"{self._base}:caps:{namespace}")
        return frozenset(codec.text(name) for name, n in counts.items() if int(n) > 0)

    async def purge(self, before: float) -> int:
        """See AgentRegistry.purge."""
        return int(await self._call("purge", codec.fstr(before)))

    async def aclose(self) -> None:
        """Nothing of its own: the connection belongs to :class:`RedisStores`."""

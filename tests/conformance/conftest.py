"""Fixtures and helpers shared by the conformance suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.backends.memory import InMemoryAgentRegistry, InMemoryTaskStore
from server.domain.models import Agent, AgentState
from server.ports import AgentRegistry
from tests._services import skip_or_fail
from tests.conformance.test_redis_restart import HAVE_REDIS_SERVER, PrivateRedis

LIVE_UNTIL = 4e9
"""An ``expire_time`` later than any ``now`` of the suites (the year 2096)."""


async def live_agents(agents: AgentRegistry, *agent_ids: str, namespace: str = "ns1",
                      expire_time: float = LIVE_UNTIL,
                      state: AgentState = AgentState.ACTIVE) -> None:
    """Register agents (ACTIVE and unexpired by default), as a lease needs."""
    for agent_id in agent_ids:
        await agents.register(Agent(id=agent_id, display_name=agent_id, namespace=namespace,
                                    state=state, expire_time=expire_time))


def memory_stores() -> tuple[InMemoryTaskStore, InMemoryAgentRegistry]:
    """An in-memory TaskStore and the registry it leases against."""
    agents = InMemoryAgentRegistry()
    return InMemoryTaskStore(agents=agents), agents


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A private redis-server on a free port (the shared one is never restarted or
    flushed), stopped at the end whatever happens."""
    if not HAVE_REDIS_SERVER:
        skip_or_fail("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()

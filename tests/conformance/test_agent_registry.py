"""Conformance suite of the AgentRegistry port: every backend must pass it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from server.backends.memory import InMemoryAgentRegistry
from server.domain.models import Agent, AgentState, Capability
from server.ports import AgentFilter, AgentRegistry
from tests._services import redis_stores
from tests.conftest import redis_url_of

NS = "ns1"
T0 = 1_000.0


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[AgentRegistry]:
    """One AgentRegistry per backend; the Redis one under a unique key prefix."""
    if request.param == "memory":
        mem = InMemoryAgentRegistry()
        yield mem
        await mem.aclose()
        return
    async with redis_stores("agents", redis_url_of(request, request.param)) as stores:
        yield stores.agents


def agent(agent_id: str, *caps: str, ns: str = NS, expire: float = T0 + 10,
          **labels: str) -> Agent:
    return Agent(id=agent_id, display_name=f"agent {agent_id}", namespace=ns,
                 capabilities=tuple(Capability(c, "1.0") for c in caps), max_concurrency=4,
                 labels=labels, version="v1", register_time=T0, heartbeat_time=T0,
                 expire_time=expire, session_token="tok-" + agent_id)


async def test_register_get_roundtrip(registry: AgentRegistry) -> None:
    a = agent("a1", "summarize", "translate", zone="eu")
    assert await registry.register(a) == a
    assert await registry.get("a1") == a
    assert await registry.get("nope") is None
    # re-registering replaces the card
    b = agent("a1", "other")
    await registry.register(b)
    assert await registry.get("a1") == b
    assert await registry.live_capabilities(NS) == frozenset({"other"})


async def test_list_filters_and_pagination(registry: AgentRegistry) -> None:
    await registry.register(agent("a3", "x", zone="eu"))
    await registry.register(agent("a1", "x", "y", zone="us"))
    await registry.register(agent("a2", "y", zone="eu"))
    await registry.register(agent("a0", "x", ns="other"))
    await registry.set_state("a2", AgentState.DRAINING, now=T0)
    page = await registry.list_agents(AgentFilter(NS), after_id="", limit=2)
    assert [a.id for a in page] == ["a1", "a2"]
    page = await registry.list_agents(AgentFilter(NS), after_id="a2", limit=2)
    assert [a.id for a in page] == ["a3"]
    by_cap = await registry.list_agents(AgentFilter(NS, capability="x"), after_id="", limit=9)
    assert [a.id for a in by_cap] == ["a1", "a3"]
    by_label = await registry.list_agents(AgentFilter(NS, labels={"zone": "eu"}), after_id="",
                                          limit=9)
    assert [a.id for a in by_label] == ["a2", "a3"]
    by_state = await registry.list_agents(
        AgentFilter(NS, states=frozenset({AgentState.DRAINING})), after_id="", limit=9)
    assert [a.id for a in by_state] == ["a2"]
    assert [a.id for a in await registry.list_agents(AgentFilter("other"), after_id="",
                                                     limit=9)] == ["a0"]


async def test_heartbeat(registry: AgentRegistry) -> None:
    await registry.register(agent("a1", "x"))
    beat = await registry.heartbeat("a1", in_flight=3, load=0.75, now=T0 + 5,
                                    expire_time=T0 + 15.5)
    assert beat is not None
    assert (beat.in_flight, beat.load, beat.heartbeat_time, beat.expire_time) == (
        3, 0.75, T0 + 5, T0 + 15.5)
    assert await registry.get("a1") == beat
    assert await registry.heartbeat("nope", in_flight=0, load=0, now=T0,
                                    expire_time=T0) is None
    await registry.set_state("a1", AgentState.GONE, now=T0 + 6)
    assert await registry.heartbeat("a1", in_flight=0, load=0, now=T0 + 7,
                                    expire_time=T0 + 20) is None


async def test_set_state_gone_is_final(registry: AgentRegistry) -> None:
    await registry.register(agent("a1", "x"))
    drained = await registry.set_state("a1", AgentState.DRAINING, now=T0)
    assert drained is not None and drained.state is AgentState.DRAINING
    gone = await registry.set_state("a1", AgentState.GONE, now=T0)
    assert gone is not None and gone.state is AgentState.GONE
    still = await registry.set_state("a1", AgentState.ACTIVE, now=T0)
    assert still is not None and still.state is AgentState.GONE
    assert await registry.set_state("nope", AgentState.ACTIVE, now=T0) is None


async def test_expired(registry: AgentRegistry) -> None:
    await registry.register(agent("a1", "x", expire=T0 + 10))
    await registry.register(agent("a2", "x", expire=T0 + 20))
    await registry.register(agent("a3", "x", expire=T0 + 5))
    await registry.set_state("a3", AgentState.GONE, now=T0)
    assert await registry.expired(T0 + 10) == []
    assert [a.id for a in await registry.expired(T0 + 11)] == ["a1"]
    await registry.heartbeat("a1", in_flight=0, load=0, now=T0 + 11, expire_time=T0 + 30)
    assert [a.id for a in await registry.expired(T0 + 21)] == ["a2"]
    await registry.set_state("a2", AgentState.DRAINING, now=T0)
    assert [a.id for a in await registry.expired(T0 + 21)] == ["a2"]


async def test_live_capabilities(registry: AgentRegistry) -> None:
    assert await registry.live_capabilities(NS) == frozenset()
    await registry.register(agent("a1", "x", "y"))
    await registry.register(agent("a2", "y", "z"))
    await registry.register(agent("a3", "w", ns="other"))
    assert await registry.live_capabilities(NS) == frozenset({"x", "y", "z"})
    await registry.set_state("a2", AgentState.DRAINING, now=T0)
    assert await registry.live_capabilities(NS) == frozenset({"x", "y"})
    await registry.set_state("a2", AgentState.ACTIVE, now=T0)
    await registry.set_state("a1", AgentState.GONE, now=T0)
    assert await registry.live_capabilities(NS) == frozenset({"y", "z"})
    assert await registry.live_capabilities("other") == frozenset({"w"})


async def test_purge_keeps_an_agent_that_never_beat_for_the_retention(
        registry: AgentRegistry) -> None:
    """Registered at T0 + 50, never beat (heartbeat_time 0), GONE at T0 + 51: it
    is last seen at its registration, so a purge of what is older than T0 + 10
    keeps it (on the previous code it was dropped at once and a work stream
    opened for it got NOT_FOUND instead of FAILED_PRECONDITION)."""
    silent = replace(agent("a9", "x"), register_time=T0 + 50, heartbeat_time=0.0)
    await registry.register(silent)
    await registry.set_state("a9", AgentState.GONE, now=T0 + 51)
    assert await registry.purge(T0 + 10) == 0
    got = await registry.get("a9")
    assert got is not None and got.state is AgentState.GONE
    assert await registry.purge(T0 + 100) == 1
    assert await registry.get("a9") is None


async def test_purge(registry: AgentRegistry) -> None:
    await registry.register(agent("a1", "x"))
    await registry.register(agent("a2", "x"))
    await registry.register(agent("a3", "x"))
    await registry.heartbeat("a2", in_flight=0, load=0, now=T0 + 50, expire_time=T0 + 60)
    await registry.set_state("a1", AgentState.GONE, now=T0 + 1)
    await registry.set_state("a2", AgentState.GONE, now=T0 + 51)
    assert await registry.purge(T0) == 0
    assert await registry.purge(T0 + 10) == 1
    assert await registry.get("a1") is None
    assert await registry.get("a2") is not None
    assert await registry.purge(T0 + 100) == 1
    assert [a.id for a in await registry.list_agents(AgentFilter(NS), after_id="",
                                                     limit=9)] == ["a3"]
    assert await registry.live_capabilities(NS) == frozenset({"x"})

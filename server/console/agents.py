"""The agents page: the fleet as cards, and draining one."""

from __future__ import annotations

from aiohttp import web

from server.api import auth
from server.api.convert import ID_RE
from server.console import http, render
from server.console.context import console, principal
from server.domain.models import Agent, AgentState
from server.ports import AgentFilter

FLEET_LIMIT = 5000
"""Agents one page shows at most (the overview counts them all)."""


async def fleet(request: web.Request, namespace: str, flt: AgentFilter | None = None,
                limit: int = 100_000) -> list[Agent]:
    """Agents of a namespace, ordered by id (paged reads of the registry)."""
    registry = console(request).services.registry
    flt = flt or AgentFilter(namespace)
    out: list[Agent] = []
    after = ""
    while len(out) < limit:
        page = await registry.list(flt, after_id=after, limit=min(1000, limit - len(out)))
        out.extend(page)
        if len(page) < 1000:
            break
        after = page[-1].id
    return out


def card(request: web.Request, agent: Agent, now: float) -> dict[str, object]:
    """The card of one agent, with its open breakers."""
    c = console(request)
    cfg = c.services.registry.config
    breakers = c.services.scheduler.breakers
    open_caps = [cap for a, cap in breakers.open_keys() if a == agent.id]
    return render.agent(agent, now=now, interval=cfg.heartbeat_interval,
                        misses=cfg.heartbeat_misses, open_breakers=open_caps)


async def list_agents(request: web.Request) -> web.Response:
    """``GET /api/agents?state=&capability=&namespace=``."""
    ns = http.namespace(request)
    console(request).access.check_namespace(principal(request), ns)
    raw_state = http.text(request, "state").upper()
    states: frozenset[AgentState] = frozenset({AgentState.ACTIVE, AgentState.DRAINING})
    if raw_state == "ALL":
        states = frozenset()
    elif raw_state:
        try:
            states = frozenset({AgentState[raw_state]})
        except KeyError:
            raise http.bad("state", "one of ACTIVE, DRAINING, GONE, ALL") from None
    cap = http.text(request, "capability")
    agents = await fleet(request, ns, AgentFilter(ns, cap, states), limit=FLEET_LIMIT + 1)
    now = console(request).services.clock.now()
    cards = [card(request, a, now) for a in agents[:FLEET_LIMIT]]
    order = {"hung": 0, "late": 1, "starting": 2, "ok": 3, "gone": 4}
    cards.sort(key=lambda c: (order.get(str(c["health"]), 5), str(c["name"])))
    return http.reply({"agents": cards, "truncated": len(agents) > FLEET_LIMIT})


async def drain_agent(request: web.Request) -> web.Response:
    """``POST /api/agents/{id}/drain`` ``{"reason"}``: admin, audited."""
    agent_id = request.match_info["id"]
    if not ID_RE.match(agent_id):
        raise http.bad("id", "not an agent id")
    body = await http.json_body(request)
    reason = str(body.get("reason") or "drained from the console")[:1024]
    c = console(request)
    who = principal(request)
    registry = c.services.registry
    before = await registry.get(agent_id)
    c.access.check_namespace(who, before.namespace)
    with auth.acting_as(who), auth.audited("drain", f"agents/{agent_id}", before.namespace):
        agent = await registry.drain(agent_id, reason, c.services.drain_grace)
    return http.reply({"agent": card(request, agent, c.services.clock.now())})

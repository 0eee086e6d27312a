"""The overview: what an operator wants first, computed on the server.

Everything here is an aggregate the stores keep already (counts by state and
by capability, autonomy: ``TaskStore.stats``), the registry's agent cards,
the breaker board, and throughput counted by the live feed from events; the
browser gets a few kilobytes whatever the number of tasks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from aiohttp import web

from server.console import http, render
from server.console.agents import card, fleet
from server.console.context import console, principal
from server.domain.models import AgentState, TaskState
from server.ports import TaskFilter

_WAITING = (TaskState.PENDING, TaskState.QUEUED, TaskState.RETRYING)


async def overview(request: web.Request) -> web.Response:
    """``GET /api/overview?namespace=``."""
    ns = http.namespace(request)
    c = console(request)
    c.access.check_namespace(principal(request), ns)
    scheduler = c.services.scheduler
    now = c.services.clock.now()
    stats = await scheduler.stats(ns)
    agents = await fleet(request, ns)
    live_caps = await scheduler.live_capabilities(ns)

    by_state = Counter(a.state.name for a in agents)
    interval = c.services.registry.config.heartbeat_interval
    classed = [(render.health(a, now=now, interval=interval), a) for a in agents
               if a.state is not AgentState.GONE]
    health = Counter(h for h, _ in classed)
    worst = sorted((a for h, a in classed if h in ("hung", "late")),
                   key=lambda a: a.heartbeat_time)[:10]
    troubled = [card(request, a, now) for a in worst]
    offered: Counter[str] = Counter()
    for a in agents:
        if a.state is AgentState.ACTIVE:
            offered.update(a.capability_names)

    caps: dict[str, dict[str, int]] = defaultdict(
        lambda: {"pending": 0, "queued": 0, "running": 0, "retrying": 0})
    for (cap, state), n in stats.waiting_by_capability.items():
        caps[cap][state.name.lower()] += n
    capabilities = [{"capability": cap, **counts, "agents": offered.get(cap, 0),
                     "unschedulable": cap not in live_caps and any(
                         counts[s.name.lower()] for s in _WAITING)}
                    for cap, counts in sorted(caps.items())]
    for cap in sorted(set(offered) - set(caps)):
        capabilities.append({"capability": cap, "pending": 0, "queued": 0, "running": 0,
                             "retrying": 0, "agents": offered[cap], "unschedulable": False})
    names = {a.id: a.display_name for a in agents}
    breakers = [{"agent_id": agent_id, "agent_name": names.get(agent_id, ""),
                 "capability": cap} for agent_id, cap in scheduler.breakers.open_keys()
                if agent_id in names]
    recent_dead = await scheduler.list_tasks(TaskFilter(ns, TaskState.DEAD_LETTERED),
                                             before_seq=0, limit=5)
    body: dict[str, Any] = {
        "namespace": ns, "time": now,
        "agents": {"by_state": {s.name: by_state.get(s.name, 0) for s in AgentState},
                   "health": dict(health), "troubled": troubled},
        "tasks": {"by_state": {s.name: stats.tasks_by_state.get(s, 0) for s in TaskState},
                  "ended": stats.tasks_ended,
                  "succeeded_autonomously": stats.tasks_succeeded_autonomously,
                  "autonomy": stats.autonomy},
        "capabilities": capabilities,
        "unschedulable": [x["capability"] for x in capabilities if x["unschedulable"]],
        "breakers": breakers,
        "throughput": {"bucket_seconds": 5, "buckets": c.feed.throughput(ns, 5),
                       "lossy": c.feed.lossy},
        "recent_dead_letters": [render.task_row(t) for t in recent_dead],
    }
    return http.reply(body)

"""Pushes a change when an agent's heartbeat health changes, before it is GONE.

A hung agent sends no event: its beats just stop, and the registry declares
it GONE only after ``heartbeat_misses`` intervals. So that the console shows
it *late*, then *not beating*, as it happens, this watch re-reads the agents
of every namespace a page is open on, once per heartbeat interval, and marks
``agents`` changed when some agent's health class (``render.health``)
differs from the last pass. Nothing runs for a namespace no page shows.
"""

from __future__ import annotations

import asyncio
import logging

from server.aio import raise_if_cancelling
from server.console import render
from server.console.feed import Feed
from server.ports import AgentFilter
from server.services.clock import Clock
from server.services.registry import Registry

log = logging.getLogger(__name__)


class LivenessWatch:
    """Heartbeat health of the watched namespaces' agents, pushed on change."""

    def __init__(self, registry: Registry, feed: Feed, clock: Clock) -> None:
        self._registry = registry
        self._feed = feed
        self._clock = clock
        self._last: dict[str, dict[str, str]] = {}

    async def run(self) -> None:
        """Until cancelled: one pass per heartbeat interval."""
        interval = self._registry.config.heartbeat_interval
        while True:
            raise_if_cancelling()
            await asyncio.sleep(interval / 2)
            try:
                await self.check()
            except Exception:
                log.exception("console liveness pass failed")

    async def check(self) -> list[str]:
        """One pass; returns the namespaces whose agents' health changed."""
        cfg = self._registry.config
        now = self._clock.now()
        changed: list[str] = []
        watched = self._feed.watched_namespaces()
        for ns in list(self._last):
            if ns not in watched:
                del self._last[ns]
        for ns in watched:
            health: dict[str, str] = {}
            after = ""
            while True:
                page = await self._registry.list(AgentFilter(ns), after_id=after, limit=1000)
                for agent in page:
                    health[agent.id] = render.health(agent, now=now,
                                                     interval=cfg.heartbeat_interval)
                if len(page) < 1000:
                    break
                after = page[-1].id
            if ns in self._last and self._last[ns] != health:
                self._feed.mark(ns, ("agents",))
                changed.append(ns)
            self._last[ns] = health
        return changed

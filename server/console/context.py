"""What every console handler reaches: the server's services and the console's parts."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from server.api.auth import Principal
from server.console.access import Access
from server.console.audit import AuditTrail
from server.console.feed import Feed
from server.services.approvals import HumanDesk
from server.services.bulk import BulkActions
from server.services.clock import Clock
from server.services.registry import Registry
from server.services.scheduler import Scheduler
from server.services.state import StateService


@dataclass(frozen=True, slots=True)
class ConsoleServices:
    """The same service objects the gRPC servicers use (built in ``server/app.py``)."""

    scheduler: Scheduler
    registry: Registry
    state: StateService
    bulk: BulkActions
    clock: Clock
    drain_grace: float = 10.0
    desk: HumanDesk | None = None
    """Where a person's decisions go (the approvals page)."""


@dataclass(frozen=True, slots=True)
class Console:
    """One running console: services, access rules, live feed, audit trail."""

    services: ConsoleServices
    access: Access
    feed: Feed
    audit: AuditTrail


CONSOLE = web.AppKey("console", Console)
PRINCIPAL = web.RequestKey("principal", Principal)


def console(request: web.Request) -> Console:
    """The console a request belongs to."""
    return request.app[CONSOLE]


def principal(request: web.Request) -> Principal | None:
    """The authenticated caller of a request (None when auth is off)."""
    return request.get(PRINCIPAL)

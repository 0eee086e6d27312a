"""The approvals page: tasks waiting for a person, and a person's decision on one.

Decisions go through the same ``HumanDesk.resolve`` as the ResolveHumanTask
RPC (its roles guard the route), acting as the signed-in principal, so the
audit record names who decided; without auth the body's ``approver`` is
recorded.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from server.api import auth, convert
from server.console import http, render
from server.console.context import console, principal
from server.console.tasks import page_of
from server.domain.errors import FailedPreconditionError, NotFoundError
from server.domain.human import HUMAN_CAPABILITY, Decision
from server.domain.models import TaskState
from server.ports import TaskFilter

_DECISIONS = {"approve": Decision.APPROVE, "reject": Decision.REJECT,
              "input": Decision.SUPPLY_INPUT}


async def list_approvals(request: web.Request) -> web.Response:
    """``GET /api/approvals?namespace=``: tasks waiting for a person, newest first."""
    ns = http.namespace(request)
    console(request).access.check_namespace(principal(request), ns)
    flt = TaskFilter(ns, TaskState.RUNNING, HUMAN_CAPABILITY)
    return http.reply(await page_of(request, flt))


async def decide(request: web.Request) -> web.Response:
    """``POST /api/tasks/{id}/decide`` ``{"decision": "approve"|"reject"|"input",
    "comment", "input", "approver"}``: a person's answer (audited)."""
    task_id = convert.resource_id(request.match_info["id"], "tasks", "id")
    c = console(request)
    desk = c.services.desk
    if desk is None:  # pragma: no cover - the app always wires one
        raise FailedPreconditionError("this console has no human desk")
    body = await http.json_body(request)
    decision = _DECISIONS.get(str(body.get("decision", "")))
    if decision is None:
        raise http.bad("decision", "approve, reject or input")
    if decision is Decision.SUPPLY_INPUT and "input" not in body:
        raise http.bad("input", "required with decision input")
    comment = body.get("comment", "")
    if not isinstance(comment, str) or len(comment.encode()) > 1024:
        raise http.bad("comment", "a string of at most 1024 bytes")
    value: Any = body.get("input")
    who = principal(request)
    task = await c.services.scheduler.get_task(task_id)
    if who is not None and not who.can_see(task.namespace):
        raise NotFoundError("task", f"tasks/{task_id}")  # other namespaces are invisible
    if who is None:
        approver = str(body.get("approver") or "console")[:128]
        role = ""
    else:
        approver, role = who.name, who.role.value
    with auth.acting_as(who), \
            auth.audited(f"human.{decision.name.lower()}", f"tasks/{task_id}", task.namespace):
        done = await desk.resolve(task_id, decision, value=value, comment=comment,
                                  who=approver, role=role)
    return http.reply({"task": render.task_row(done)})

"""The tasks pages: filtered lists, one task in full, re-drive or cancel one."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aiohttp import web

from server.api import auth, convert
from server.console import http, render
from server.console.context import console, principal
from server.domain.errors import AgentMeshError, NotFoundError
from server.domain.models import Task
from server.ports import TaskFilter

PAGE = 50
MAX_SCAN = 20_000
"""Tasks one page request reads at most: a filter that matches little (a label
nobody has, over 100,000 tasks) returns a short page and a cursor rather than
holding the server's event loop for a whole-namespace scan."""


def _filter_key(flt: TaskFilter) -> str:
    # Relative times ("since 15m") move with the clock, so a cursor is bound to
    # the rest of the filter only; a cursor is a keyset position, harmless to forge.
    return "console|" + convert.task_filter_key(replace(flt, created_after=0.0,
                                                        created_before=0.0))


async def page_of(request: web.Request, flt: TaskFilter) -> dict[str, Any]:
    """One page of tasks newest first, with the cursor of the next one."""
    size = http.integer(request, "page_size", PAGE, 1, 500)
    before = convert.decode_page_token(http.text(request, "page_token", 8192),
                                       _filter_key(flt), convert.Cursor.SEQ)
    scheduler = console(request).services.scheduler
    tasks, resume = await scheduler.scan_tasks(flt, before_seq=before, limit=size,
                                               max_scan=MAX_SCAN)
    token = convert.encode_page_token(resume, _filter_key(flt)) if resume else ""
    return {"tasks": [render.task_row(t) for t in tasks], "next_page_token": token,
            "partial": bool(resume) and len(tasks) < size, "scanned_up_to": MAX_SCAN}


async def list_tasks(request: web.Request) -> web.Response:
    """``GET /api/tasks?state=&capability=&label=a=1,b=2&since=&until=&workflow=``."""
    ns = http.namespace(request)
    console(request).access.check_namespace(principal(request), ns)
    flt = http.task_filter(ns, request.query)
    return http.reply(await page_of(request, flt))


async def _visible_task(request: web.Request) -> Task:
    task_id = convert.resource_id(request.match_info["id"], "tasks", "id")
    task = await console(request).services.scheduler.get_task(task_id)
    who = principal(request)
    if who is not None and not who.can_see(task.namespace):
        raise NotFoundError("task", f"tasks/{task_id}")  # other namespaces are invisible
    return task


async def agent_names(request: web.Request, ids: set[str]) -> dict[str, str]:
    """Display names of agents (unknown ids are left out)."""
    registry = console(request).services.registry
    out: dict[str, str] = {}
    for agent_id in ids:
        if not agent_id:
            continue
        try:
            out[agent_id] = (await registry.get(agent_id)).display_name
        except AgentMeshError:  # a purged agent just has no name
            continue
    return out


async def get_task(request: web.Request) -> web.Response:
    """``GET /api/tasks/{id}``: the task with payloads, attempts, tokens, trace id."""
    task = await _visible_task(request)
    names = await agent_names(request, {task.agent_id, *(a.agent_id for a in task.attempts)})
    return http.reply({"task": render.task_detail(task, names)})


async def retry_task(request: web.Request) -> web.Response:
    """``POST /api/tasks/{id}/retry``: re-drive one (admin, audited as ``redrive``)."""
    task = await _visible_task(request)
    c = console(request)
    with auth.acting_as(principal(request)), \
            auth.audited("redrive", f"tasks/{task.id}", task.namespace):
        done = await c.services.scheduler.retry(task.id, None)
    return http.reply({"task": render.task_row(done)})


async def cancel_task(request: web.Request) -> web.Response:
    """``POST /api/tasks/{id}/cancel`` ``{"reason"}``: a client its own work, an admin any."""
    task = await _visible_task(request)
    body = await http.json_body(request)
    reason = str(body.get("reason") or "cancelled from the console")[:1024]
    c = console(request)
    with auth.acting_as(principal(request)):
        auth.check_owner(task.labels, "cancel", f"tasks/{task.id}", task.namespace)
        done = await c.services.scheduler.cancel(task.id, reason)
    return http.reply({"task": render.task_row(done)})

"""The dead-letters page: list by filter; re-drive or cancel all that match.

Bulk actions go through ``server.services.bulk`` (as the BulkRetryTasks and
BulkCancelTasks RPCs do): ``dry_run`` first, so the confirmation dialog shows
exactly how many tasks the filter selects now; then the action, which
reports the ids it acted on. Each is audited as one ``bulk-redrive`` /
``bulk-cancel`` record naming the filter, plus one record per task.
"""

from __future__ import annotations

from aiohttp import web

from server.api import auth, convert
from server.console import http
from server.console.context import console, principal
from server.console.tasks import page_of
from server.domain.models import TaskState
from server.services import bulk


async def list_dead_letters(request: web.Request) -> web.Response:
    """``GET /api/dead-letters?capability=&label=&since=&until=``: newest first."""
    ns = http.namespace(request)
    console(request).access.check_namespace(principal(request), ns)
    flt = http.task_filter(ns, request.query, state=TaskState.DEAD_LETTERED)
    return http.reply(await page_of(request, flt))


async def _bulk(request: web.Request, action: str) -> web.Response:
    body = await http.json_body(request)
    raw_ns = body.get("namespace", "")
    if not isinstance(raw_ns, str):
        raise http.bad("namespace", "expected a string")
    ns = convert.namespace(raw_ns)
    c = console(request)
    who = principal(request)
    c.access.check_namespace(who, ns)
    filters = body.get("filter", {})
    if not isinstance(filters, dict):
        raise http.bad("filter", "expected an object")
    flt = http.task_filter(ns, filters)
    dry_run = body.get("dry_run", False) is True
    limit = body.get("max_tasks", 0)
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise http.bad("max_tasks", "expected a whole number")
    limit = bulk.max_tasks(limit)
    described = _describe(filters, dry_run)
    with auth.acting_as(who):
        if action == "redrive":
            with auth.audited("bulk-redrive", described, ns):
                result = await c.services.bulk.redrive(flt, limit=limit, dry_run=dry_run)
        else:
            reason = str(body.get("reason") or "cancelled in bulk from the console")[:1024]
            with auth.audited("bulk-cancel", described, ns):
                result = await c.services.bulk.cancel(flt, limit=limit, dry_run=dry_run,
                                                      reason=reason)
        if not dry_run:
            for task_id in result.task_ids:
                auth.audit(action, f"tasks/{task_id}", ns, "ok")
    return http.reply({"task_ids": list(result.task_ids), "count": len(result.task_ids),
                       "truncated": result.truncated, "dry_run": dry_run})


def _describe(filters: dict[str, object], dry_run: bool) -> str:
    parts = [f"{k}={v}" for k, v in sorted(filters.items()) if v]
    if dry_run:
        parts.append("dry-run")
    return "tasks?" + "&".join(parts)


async def bulk_retry(request: web.Request) -> web.Response:
    """``POST /api/tasks/bulk-retry`` ``{"namespace", "filter": {...}, "dry_run"}``."""
    return await _bulk(request, "redrive")


async def bulk_cancel(request: web.Request) -> web.Response:
    """``POST /api/tasks/bulk-cancel`` ``{"namespace", "filter", "dry_run", "reason"}``."""
    return await _bulk(request, "cancel")


async def audit_trail(request: web.Request) -> web.Response:
    """``GET /api/audit?namespace=``: the newest audit records of this replica."""
    ns = http.namespace(request)
    c = console(request)
    c.access.check_namespace(principal(request), ns)
    limit = http.integer(request, "limit", 50, 1, 500)
    return http.reply({"records": c.audit.recent(ns, limit)})

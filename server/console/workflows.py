"""The workflows pages: the list, and one workflow's DAG with live step states."""

from __future__ import annotations

from aiohttp import web

from server.api import convert
from server.console import http, render
from server.console.context import console, principal
from server.domain.errors import NotFoundError
from server.domain.models import WorkflowState


async def list_workflows(request: web.Request) -> web.Response:
    """``GET /api/workflows?state=&page_token=``: newest first."""
    ns = http.namespace(request)
    console(request).access.check_namespace(principal(request), ns)
    raw = http.text(request, "state").upper()
    state: WorkflowState | None = None
    if raw:
        try:
            state = WorkflowState[raw]
        except KeyError:
            raise http.bad("state", "one of RUNNING, SUCCEEDED, FAILED, CANCELLED") from None
    size = http.integer(request, "page_size", 50, 1, 500)
    key = f"console-wf|{ns}|{raw}"
    before = convert.decode_page_token(http.text(request, "page_token", 8192), key,
                                       convert.Cursor.SEQ)
    scheduler = console(request).services.scheduler
    wfs = await scheduler.list_workflows(ns, state, before_seq=before, limit=size + 1)
    token = convert.encode_page_token(wfs[size - 1].seq, key) if len(wfs) > size else ""
    return http.reply({"workflows": [render.workflow_row(w) for w in wfs[:size]],
                       "next_page_token": token})


async def get_workflow(request: web.Request) -> web.Response:
    """``GET /api/workflows/{id}``: steps, dependencies and each step's state."""
    wf_id = convert.resource_id(request.match_info["id"], "workflows", "id")
    wf, steps = await console(request).services.scheduler.get_workflow(wf_id)
    who = principal(request)
    if who is not None and not who.can_see(wf.namespace):
        raise NotFoundError("workflow", f"workflows/{wf_id}")
    return http.reply({"workflow": render.workflow(wf, steps)})

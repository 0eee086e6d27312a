"""The state page: keys by prefix with their versions, and the held locks."""

from __future__ import annotations

from aiohttp import web

from server.api import convert
from server.console import http, render
from server.console.context import console, principal
from server.console.tasks import agent_names

LOCK_LIMIT = 1000


async def list_state(request: web.Request) -> web.Response:
    """``GET /api/state?prefix=&page_token=``: keys in order, values rendered."""
    ns = http.namespace(request)
    console(request).access.check_namespace(principal(request), ns)
    limits = convert.Limits()
    prefix = http.text(request, "prefix", limits.max_key_bytes)
    if prefix:
        prefix = convert.state_prefix(prefix, limits)
    size = http.integer(request, "page_size", 100, 1, 1000)
    key = f"console-state|{ns}|{prefix}"
    after = convert.decode_page_token(http.text(request, "page_token", 8192), key,
                                      convert.Cursor.KEY)
    state = console(request).services.state
    entries = await state.list(ns, prefix, after_key=after, limit=size + 1)
    token = convert.encode_page_token(entries[size - 1].key, key) if len(entries) > size else ""
    revision = await state.store.revision(ns)
    return http.reply({"entries": [render.entry(e) for e in entries[:size]],
                       "next_page_token": token, "revision": revision})


async def list_locks(request: web.Request) -> web.Response:
    """``GET /api/locks``: every held lock with its holder and fencing token."""
    ns = http.namespace(request)
    c = console(request)
    c.access.check_namespace(principal(request), ns)
    grants = await c.services.state.store.list_locks(ns, now=c.services.clock.now(),
                                                     limit=LOCK_LIMIT)
    names = await agent_names(request, {g.agent_id for g in grants})
    return http.reply({"locks": [render.lock(g, names) for g in grants]})

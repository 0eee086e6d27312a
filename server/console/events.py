"""``GET /api/events``: the page stream (Server-Sent Events, aiohttp-sse).

Each message is ``{"topics": [...], "many": bool, "time": t}``: the views
that changed (see ``feed.py``); the browser re-reads those it shows. A
``hello`` message opens the stream, comment pings keep proxies from closing
it, and the stream ends when the server stops (the browser's EventSource
reconnects by itself).
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from server.console import http
from server.console.context import console, principal
from server.console.feed import COALESCE

PING_SECONDS = 15.0


async def stream(request: web.Request) -> web.StreamResponse:
    """One browser's live updates for one namespace."""
    ns = http.namespace(request)
    c = console(request)
    c.access.check_namespace(principal(request), ns)
    clock = c.services.clock
    async with c.feed.listen(ns) as listener, sse_response(
            request, ping_interval=PING_SECONDS, sep="\n") as sse:
        await sse.send(orjson.dumps({"namespace": ns, "time": clock.now()}).decode(),
                       event="hello")
        while sse.is_connected() and c.feed.running:
            await listener.changed.wait()
            await asyncio.sleep(COALESCE)
            topics, many = listener.take()
            try:
                await sse.send(orjson.dumps({"topics": topics, "many": many,
                                             "time": clock.now()}).decode(), event="change")
            except ConnectionResetError:
                break  # the browser went away
    return sse

"""The console's aiohttp application and its listener on the server's event loop."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from aiohttp import web

from server.aio import cancel_and_wait
from server.api.auth import TokenTable
from server.console import http
from server.console.access import Access
from server.console.audit import AuditTrail
from server.console.context import CONSOLE, PRINCIPAL, Console, ConsoleServices
from server.console.feed import Feed
from server.console.liveness import LivenessWatch
from server.console.routes import ROUTES, Route
from server.netutil import PortInUseError, ensure_free
from server.ports import Bus

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
"""The built front end (``make console``; committed, see the package docstring)."""


def _guarded(route: Route) -> http.Handler:
    """The handler behind the route's access check (a role the gRPC method allows)."""
    handler, rpc = route.handler, route.rpc
    if rpc is None:
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        who = request.app[CONSOLE].access.authorize(request, rpc)
        if who is not None:
            request[PRINCIPAL] = who
        return await handler(request)

    guarded.__doc__ = handler.__doc__
    return guarded


@web.middleware
async def _headers(request: web.Request, handler: http.Handler) -> web.StreamResponse:
    """No caching of API answers; a strict content policy for the page."""
    response = await handler(request)
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'")
    return response


def build_app(console: Console) -> web.Application:
    """The application: the API routes, then the page (any other GET is the page)."""
    app = web.Application(middlewares=[_headers, http.errors_middleware],
                          client_max_size=1 << 20)
    app[CONSOLE] = console
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _guarded(route))
    index = STATIC / "index.html"

    async def page(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            return http.reply({"error": {"code": "NOT_FOUND", "reason": "NO_SUCH_ROUTE",
                                         "message": f"no API route {request.path}"}}, 404)
        if not index.is_file():
            return web.Response(status=503, text="the console front end is not built: run "
                                "`make console` in the source tree")
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    if (STATIC / "assets").is_dir():
        app.router.add_static("/assets/", STATIC / "assets", append_version=False)
    app.router.add_get("/{tail:.*}", page)
    return app


class ConsoleServer:
    """The console listening on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, services: ConsoleServices, bus: Bus, *, tokens: TokenTable | None,
                 host: str, port: int, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        self._ssl: ssl.SSLContext | None = None
        if tls_cert and tls_key:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(tls_cert, tls_key)
        self.feed = Feed(bus, services.clock)
        self.audit = AuditTrail()
        self.console = Console(services, Access(tokens, secure_cookie=self._ssl is not None),
                               self.feed, self.audit)
        self._liveness = LivenessWatch(services.registry, self.feed, services.clock)
        self._watching: asyncio.Task[None] | None = None
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Where a browser opens it."""
        host = "127.0.0.1" if self._host in ("0.0.0.0", "::", "") else self._host  # noqa: S104
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self._ssl else 'http'}://{host}:{self.port}/"

    async def start(self) -> None:
        """Bind and serve; PortInUseError (nothing left running) when the port is taken."""
        ensure_free(self._host, self._port, "console")
        await self.feed.start()
        self.audit.attach()
        runner = web.AppRunner(build_app(self.console), access_log=None,
                               handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self.feed.stop()
            self.audit.detach()
            if exc.errno == PortInUseError(0, "").errno:
                raise PortInUseError(self._port, "console", self._host) from None
            raise
        self._runner = runner
        self._watching = asyncio.create_task(self._liveness.run(), name="console-liveness")
        bound = runner.addresses
        self.port = int(bound[0][1]) if bound else self._port
        log.info("agentmesh console on %s", self.url)

    async def stop(self) -> None:
        """Close the page streams and the listener. Safe to repeat."""
        watching, self._watching = self._watching, None
        if watching is not None:
            await cancel_and_wait(watching)
        await self.feed.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self.audit.detach()

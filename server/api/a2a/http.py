"""The gateway's HTTP server: A2A JSON-RPC at ``/`` and the agent card, on uvicorn.

Routes come from a2a-sdk (``create_jsonrpc_routes``, ``create_agent_card_routes``:
the spec's JSON-RPC binding and SSE streaming, kept by the A2A project);
uvicorn serves them in the server's own event loop. The socket is bound here,
before anything serves, so a port in use is the same PortInUseError as the
gRPC and metrics ports (``server/netutil.py``). With auth on, the JSON-RPC
route sits behind :class:`~server.api.a2a.access.GatewayAccess` (tokens and
roles as for gRPC); the agent card stays public. With ``serve``'s
``--tls-cert``/``--tls-key`` it serves HTTPS with the same certificate, so a
bearer token never crosses the network in clear. A request body is bounded
by ``max_message_bytes``, as a gRPC message is (413 past it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.types import a2a_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.a2a.access import GatewayAccess
from server.api.a2a.handler import MeshRequestHandler
from server.netutil import PortInUseError, ensure_free

log = logging.getLogger(__name__)


class _NoClientTracebacks(logging.Filter):
    """a2a-sdk's dispatcher logs a client's malformed request (a batch, a missing
    ``jsonrpc``, params that do not parse) twice: at ERROR with a traceback, then at
    WARNING with the parse error it answers. Any client could fill the server's log
    with tracebacks of its own mistakes, so the first is dropped; the WARNING stays."""

    MESSAGES = frozenset({"Failed to validate base JSON-RPC request",
                          "Failed to parse request params"})

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.MESSAGES


_DISPATCHER_LOG = logging.getLogger("a2a.server.routes.jsonrpc_dispatcher")
_QUIET = _NoClientTracebacks()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handling: ``agentmesh serve`` owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave the process's signals alone."""
        yield


class _BodyLimit:
    """ASGI middleware: at most ``limit`` bytes of request body.

    A declared ``Content-Length`` past it is answered 413 at once; a body that
    grows past it while read raises Starlette's 413, which a2a-sdk's
    dispatcher answers as a JSON-RPC "Payload too large" (and the auth guard
    as 413).
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limit = self._limit
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body",
                            "body": f"the body is over {limit} bytes".encode()})
                return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"the body is over {limit} bytes")
            return message

        await self._app(scope, bounded, send)


class A2AServer:
    """The A2A HTTP endpoint of one replica."""

    def __init__(self, handler: MeshRequestHandler,
                 card: Callable[[], Awaitable[a2a_pb2.AgentCard]], *, host: str,
                 port: int, access: GatewayAccess | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 max_body_bytes: int = 4 << 20) -> None:
        self._handler = handler
        self._max_body = max_body_bytes
        self._tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self._access = access or GatewayAccess(None)
        self._card = card
        self._host = host
        self._port = port
        self.url = ""
        """The URL the agent card advertises (set once bound)."""
        self._sock: socket.socket | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "https" if self._tls else "http"

    def bind(self) -> int:
        """Bind the socket (PortInUseError when taken); returns the port."""
        ensure_free(self._host, self._port, "A2A")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise PortInUseError(self._port, "A2A", self._host) from exc
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, which a
        # socket made here is not (proto 0): uvicorn's header and body writes then
        # waited for the client's delayed ACK, 40 ms on every A2A call on Linux
        # (loadtests/chunks_bench.py). Accepted sockets inherit it from this one.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        """Serve on the bound socket until :meth:`stop`."""
        assert self._sock is not None, "bind() first"
        if _QUIET not in _DISPATCHER_LOG.filters:
            _DISPATCHER_LOG.addFilter(_QUIET)
        card = self._card

        async def fresh_card(_: a2a_pb2.AgentCard) -> a2a_pb2.AgentCard:
            return await card()  # skills follow the live agents

        # The template is never served (``fresh_card`` replaces it on every request); it
        # carries a skill only so that a2a-sdk's spec check has none to warn about.
        template = await card()
        if not template.skills:
            template.skills.add(id="-", name="-", description="-", tags=["-"])
        access = self._access
        rpc = [Route(r.path, access.guard(r.endpoint), methods=list(r.methods or ("POST",)))
               for r in create_jsonrpc_routes(self._handler, "/",
                                              context_builder=access.context_builder)]
        app = Starlette(routes=[*create_agent_card_routes(template, card_modifier=fresh_card),
                                *rpc])
        cert, key = self._tls or (None, None)
        config = uvicorn.Config(_BodyLimit(app, self._max_body), log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=1,
                                ssl_certfile=cert, ssl_keyfile=key)
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]),
                                         name="a2a-http")
        # uvicorn has no started event: a bounded poll of its flag (the socket is bound).
        while not self._server.started and not self._task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()

    async def stop(self) -> None:
        """Stop serving (open streams are cut after a second). Safe to repeat."""
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5.0)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

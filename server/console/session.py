"""Sign-in and the session: who is this, and what may they do."""

from __future__ import annotations

from aiohttp import web

from server.api.auth import RPC_ROLES
from server.console import http
from server.console.context import console


def _actions(role: str | None) -> dict[str, bool]:
    """Which actions the UI offers (the server checks each one again)."""
    from server.console.routes import ROUTES  # noqa: PLC0415 - the table imports this module
    out: dict[str, bool] = {}
    for route in ROUTES:
        if route.method == "POST" and route.rpc is not None:
            name = route.rpc.rsplit("/", 1)[-1]
            out[name] = role is None or role in {str(r) for r in RPC_ROLES.get(route.rpc, ())}
    return out


async def whoami(request: web.Request) -> web.Response:
    """``GET /api/session``: auth on or off, the principal, the actions allowed."""
    c = console(request)
    if not c.access.enabled:
        return http.reply({"auth": False, "principal": None, "role": None,
                           "namespaces": ["*"], "actions": _actions(None)})
    token = c.access.token_of(request)
    principal = c.access.authenticate(token) if token else None
    if principal is None:
        return http.reply({"auth": True, "principal": None, "role": None,
                           "namespaces": [], "actions": {}})
    return http.reply({"auth": True, "principal": principal.name, "role": str(principal.role),
                       "namespaces": sorted(principal.namespaces),
                       "actions": _actions(str(principal.role))})


async def login(request: web.Request) -> web.Response:
    """``POST /api/login`` ``{"token"}``: checks the token and keeps it in a cookie."""
    c = console(request)
    body = await http.json_body(request)
    token = body.get("token")
    if not isinstance(token, str) or not token.strip():
        raise http.bad("token", "required")
    principal = c.access.authenticate(token.strip())
    response = http.reply({"principal": principal.name if principal else None,
                           "role": str(principal.role) if principal else None})
    if principal is not None:
        c.access.set_cookie(response, token.strip())
    return response


async def logout(request: web.Request) -> web.Response:
    """``POST /api/logout``: forgets the cookie."""
    response = http.reply({"principal": None})
    console(request).access.clear_cookie(response)
    return response

"""Who may see and do what in the console: the gRPC tokens and roles, unchanged.

With ``--auth-file`` every API call needs a token of that file, sent as
``Authorization: Bearer <token>`` (scripts) or kept in an HttpOnly,
SameSite=Strict cookie after ``POST /api/login`` (the browser). Each route
names the gRPC method it stands for (``routes.py``), and the caller's role
must be one ``server.api.auth.RPC_ROLES`` allows for it: a viewer reads, a
client may cancel its own work, only an admin re-drives, drains or acts in
bulk, exactly as through gRPC. Namespaces are bound as for gRPC. Without an
auth file, as with gRPC, everyone may do everything (loopback use).

Changes (POST) also need the ``X-AgentMesh-Console`` header: a browser
cannot send it from another site without a CORS pre-flight, which the console
never allows, so a cookie alone cannot be ridden cross-site (CSRF).
"""

from __future__ import annotations

from aiohttp import web

from server.api.auth import RPC_ROLES, Principal, TokenTable, namespace_denied
from server.domain.errors import PermissionDeniedError, UnauthenticatedError

COOKIE = "agentmesh_console"
CSRF_HEADER = "X-AgentMesh-Console"


class Access:
    """Authentication and authorization of console requests."""

    def __init__(self, tokens: TokenTable | None, *, secure_cookie: bool) -> None:
        self._tokens = tokens
        self._secure = secure_cookie

    @property
    def enabled(self) -> bool:
        """Whether tokens are required."""
        return self._tokens is not None

    def token_of(self, request: web.Request) -> str | None:
        """The bearer token of the header, else of the cookie."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return request.cookies.get(COOKIE) or None

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal of a token (None when auth is off); UNAUTHENTICATED otherwise."""
        if self._tokens is None:
            return None
        if not token:
            raise UnauthenticatedError("sign in with a token (agentmesh auth)",
                                       reason="MISSING_TOKEN")
        principal = self._tokens.authenticate(token)
        if principal is None:
            raise UnauthenticatedError("unknown token", reason="UNKNOWN_TOKEN")
        return principal

    def authorize(self, request: web.Request, rpc: str) -> Principal | None:
        """The caller, allowed to do what ``rpc`` does (PERMISSION_DENIED otherwise)."""
        principal = self.authenticate(self.token_of(request))
        if request.method not in ("GET", "HEAD") and CSRF_HEADER not in request.headers:
            raise PermissionDeniedError(f"changes need the {CSRF_HEADER} header",
                                        reason="CSRF_HEADER_MISSING")
        if principal is not None and principal.role not in RPC_ROLES.get(rpc, frozenset()):
            raise PermissionDeniedError(
                f"role {principal.role} may not do this ({rpc.rsplit('/', 1)[-1]})",
                reason="ROLE_DENIED", metadata={"role": str(principal.role)})
        return principal

    @staticmethod
    def may(principal: Principal | None, rpc: str) -> bool:
        """Whether the principal's role allows ``rpc`` (the UI hides what it may not do)."""
        return principal is None or principal.role in RPC_ROLES.get(rpc, frozenset())

    @staticmethod
    def check_namespace(principal: Principal | None, namespace: str) -> None:
        """PERMISSION_DENIED for a namespace the token is not bound to."""
        error = namespace_denied(principal, namespace)
        if error is not None:
            raise error

    def set_cookie(self, response: web.StreamResponse, token: str) -> None:
        """Keep the token for the browser (HttpOnly: page scripts never read it)."""
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict",
                            secure=self._secure, path="/")

    @staticmethod
    def clear_cookie(response: web.StreamResponse) -> None:
        """Forget the token."""
        response.del_cookie(COOKIE, path="/")

"""Who may call the A2A gateway: the gRPC tokens and roles, unchanged.

With ``--auth-file`` every JSON-RPC request must carry ``Authorization: Bearer
<token>`` (a token of that file). Each A2A method stands for the gRPC method
whose rule applies (:data:`A2A_METHODS`), and the roles allowed are that
method's in ``server.api.auth.RPC_ROLES``: the one table, asked through
``auth.authenticate`` and ``auth.check_role`` exactly as the gRPC interceptor
asks. The tenant is the namespace and must be one of the token's.

A refusal happens before the request reaches a2a-sdk's dispatcher and is
answered at the HTTP layer, where the A2A spec puts identity: ``401
Unauthorized`` with ``WWW-Authenticate: Bearer`` for a missing or unknown
token, ``403 Forbidden`` for a role or namespace that may not; the body is a
JSON-RPC error (code ``-32000``, the one server-error code A2A does not
reserve) whose ``data`` holds a ``google.rpc.ErrorInfo`` with the same reason
as over gRPC (MISSING_TOKEN, UNKNOWN_TOKEN, ROLE_DENIED, NAMESPACE_DENIED).
The agent card stays public (the spec's discovery path) and declares the
scheme.

A request let through carries its principal to the request handler in the
call context (:func:`principal_of`); the handler acts as it (owner labels,
owner checks on cancel, the approver of a decision), as a servicer does. A
refusal only the handler can find (cancelling another principal's task: 403;
a stream past the server's stream bounds, which gRPC watches count against
too: 429) is raised as :class:`Refused` and answered here the same way, with
or without auth.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from a2a.auth.user import User
from a2a.server.context import ServerCallContext
from a2a.server.routes import DefaultServerCallContextBuilder
from a2a.types import a2a_pb2
from agentmesh.v1 import discovery_pb2, task_pb2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api import auth
from server.api.errors import ERROR_DOMAIN
from server.domain.errors import AgentMeshError, UnauthenticatedError
from server.domain.models import DEFAULT_NAMESPACE

_TASKS = task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name
_DISCOVERY = discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name

A2A_METHODS: Mapping[str, str] = {
    "SendMessage": f"/{_TASKS}/SubmitTask",
    "SendStreamingMessage": f"/{_TASKS}/SubmitTask",
    "GetTask": f"/{_TASKS}/GetTask",
    "ListTasks": f"/{_TASKS}/ListTasks",
    "CancelTask": f"/{_TASKS}/CancelTask",
    "SubscribeToTask": f"/{_TASKS}/WatchTaskChunks",
    "GetExtendedAgentCard": f"/{_DISCOVERY}/ListAgents",  # the card lists the live agents
}
"""A2A method -> the gRPC method whose roles apply. Methods not listed do nothing
here (push notification configs are not offered; unknown methods are
``MethodNotFound``): they need a valid token only."""

REPLY_METHOD = f"/{_TASKS}/ResolveHumanTask"
"""A message naming a task (the answer to an ``input-required`` task) decides it."""

SCHEME = "bearer"
"""The security scheme's name on the agent card."""

REFUSAL_CODE = -32000
_PRINCIPAL = "agentmesh.principal"
_DISCONNECTED = "agentmesh.disconnected"


def security(card: a2a_pb2.AgentCard) -> None:
    """Declare the bearer scheme on ``card`` (securitySchemes + securityRequirements)."""
    card.security_schemes[SCHEME].http_auth_security_scheme.CopyFrom(
        a2a_pb2.HTTPAuthSecurityScheme(
            scheme="Bearer", bearer_format="agentmesh token",
            description="A token of the server's --auth-file (agentmesh auth "
                        "hash-token); roles as for the gRPC API."))
    card.security_requirements.add().schemes[SCHEME].SetInParent()


class Refused(HTTPException):
    """A refusal the request handler found, answered by the guard with ``status``.

    An HTTP exception because a2a-sdk's dispatcher lets those through to the
    HTTP layer; every other error it turns into a JSON-RPC error of its own.
    """

    def __init__(self, error: AgentMeshError, status: int) -> None:
        super().__init__(status_code=status, detail=error.message)
        self.error = error


def disconnected_of(context: ServerCallContext) -> Callable[[], Awaitable[bool]] | None:
    """Whether the request's client has gone (None outside an HTTP request)."""
    check = context.state.get(_DISCONNECTED)
    return check if callable(check) else None


def principal_of(context: ServerCallContext) -> auth.Principal | None:
    """The caller the gateway let through (None when auth is off)."""
    who = context.state.get(_PRINCIPAL)
    return who if isinstance(who, auth.Principal) else None


class _PrincipalUser(User):
    def __init__(self, principal: auth.Principal) -> None:
        self._name = principal.name

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self._name


class _ContextBuilder(DefaultServerCallContextBuilder):
    """a2a-sdk's call context, plus the principal (and without the token)."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        context.state[_DISCONNECTED] = request.is_disconnected
        headers = context.state.get("headers")
        if isinstance(headers, dict):
            headers.pop("authorization", None)
        principal = request.scope.get(_PRINCIPAL)
        if isinstance(principal, auth.Principal):
            context.state[_PRINCIPAL] = principal
            context.user = _PrincipalUser(principal)
        return context


Endpoint = Callable[[Request], Awaitable[Response]]


def _method_of(body: object) -> tuple[str, dict[str, Any], object]:
    """The JSON-RPC method, params and id of a body ("" when it is not a request:
    the dispatcher then answers the JSON-RPC error)."""
    if not isinstance(body, dict):
        return "", {}, None
    method, params = body.get("method"), body.get("params")
    return (method if isinstance(method, str) else "",
            params if isinstance(params, dict) else {}, body.get("id"))


def _rpc(method: str, params: Mapping[str, Any]) -> str | None:
    rpc = A2A_METHODS.get(method)
    if method in ("SendMessage", "SendStreamingMessage"):
        message = params.get("message")
        if isinstance(message, dict) and (message.get("taskId") or message.get("task_id")):
            return REPLY_METHOD
    return rpc


class GatewayAccess:
    """Authentication and authorization of the gateway's JSON-RPC requests."""

    def __init__(self, tokens: auth.TokenTable | None) -> None:
        self._tokens = tokens
        self.context_builder = _ContextBuilder()
        """Builds a2a-sdk's call context with the principal in it."""

    @property
    def enabled(self) -> bool:
        """Whether tokens are required."""
        return self._tokens is not None

    def guard(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` behind the token and role checks (with tokens), answering the
        handler's :class:`Refused` (always)."""
        tokens = self._tokens

        async def guarded(request: Request) -> Response:
            refusal = (await self._check(tokens, request) if tokens is not None
                       else await _unparsable(request))
            if refusal is not None:
                return refusal
            try:
                return await endpoint(request)
            except Refused as exc:
                try:
                    request_id = _method_of(await request.json())[2]  # parsed: cached
                except ValueError:
                    request_id = None
                return _refusal(exc.error, request_id, exc.status_code)

        return guarded

    @staticmethod
    async def _check(tokens: auth.TokenTable, request: Request) -> Response | None:
        """The refusal of a request (None: let through, its principal in the scope)."""
        try:
            principal = auth.authenticate(
                tokens, auth.bearer_of(request.headers.get("authorization")),
                carrier="header")
        except UnauthenticatedError as exc:
            return _refusal(exc, None, 401)
        try:
            body = await request.json()
        except RecursionError:
            return _too_deep()
        except ValueError:
            body = None  # the dispatcher answers the parse error
        except HTTPException as exc:  # over the body limit
            return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {
                "code": -32600, "message": str(exc.detail)}}, status_code=exc.status_code)
        method, params, request_id = _method_of(body)
        try:
            rpc = _rpc(method, params)
            if rpc is not None:
                auth.check_role(principal, rpc)
            tenant = params.get("tenant")
            error = auth.namespace_denied(
                principal, tenant if isinstance(tenant, str) and tenant
                else DEFAULT_NAMESPACE)
            if error is not None:
                raise error
        except AgentMeshError as exc:
            return _refusal(exc, request_id, 403)
        request.scope[_PRINCIPAL] = principal
        return None


async def _unparsable(request: Request) -> Response | None:
    """The answer to a body that JSON nests too deeply for Python's parser (None for
    any other body: the dispatcher answers it, from the body read here).

    ``[[[...]]]`` a hundred thousand deep fits in a request and made the parser raise
    RecursionError, which a2a-sdk answered as an internal error (-32603) with a
    traceback in the log, and the auth guard as HTTP 500.
    """
    try:
        await request.json()
    except RecursionError:
        return _too_deep()
    except ValueError:
        return None  # the body is read and kept: the dispatcher answers -32700
    except HTTPException as exc:  # over the body limit, as the dispatcher answers it
        if exc.status_code != 413:
            raise
        return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {
            "code": -32600, "message": "Payload too large"}})
    return None


def _too_deep() -> Response:
    return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {
        "code": -32700, "message": "Parse error: the JSON nests too deeply"}})


def _refusal(error: AgentMeshError, request_id: object, status: int) -> Response:
    headers = {}
    if status == 401:
        challenge = 'Bearer realm="agentmesh"'
        if error.reason == "UNKNOWN_TOKEN":
            challenge += ', error="invalid_token"'
        headers["WWW-Authenticate"] = challenge
    rid = request_id if isinstance(request_id, str | int) and not isinstance(
        request_id, bool) else None
    return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {
        "code": REFUSAL_CODE, "message": error.message,
        "data": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                  "reason": error.reason, "domain": ERROR_DOMAIN,
                  "metadata": dict(error.metadata)}]}}, status_code=status, headers=headers)

"""Authentication, authorization, namespace binding, stream quotas and audit.

With ``--auth-file`` (``AGENTMESH_AUTH_FILE``) every call must carry
``authorization: Bearer <token>`` metadata. The file lists principals, each
with the SHA-256 of its token (``agentmesh auth hash-token``; tokens are never
stored in clear), one role and the namespaces it is bound to::

    principals:
      - name: billing-agents
        role: agent                # agent | client | admin | viewer
        namespaces: [billing]      # "*" means every namespace
        token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

Tokens are random (``agentmesh auth hash-token --generate`` makes 256-bit
ones), so a plain SHA-256 is as strong as a salted slow hash here and lets a
token be found with one hash and one dictionary look-up per call, rather than
a key-derivation function per principal per call (a CPU denial of service).

One interceptor (:class:`AccessInterceptor`) decides: ``RPC_ROLES`` is the
one table mapping every RPC (full method name) to the roles allowed to call
it. Health checks and server reflection need no token (``PUBLIC_METHODS``).
The interceptor also checks every ``namespace`` field of a request against the
token's namespaces (PERMISSION_DENIED), binds the caller to a contextvar that
the servicers read (:func:`caller`) for the checks only they can make
(resources named by id, agent identity, ownership), and bounds concurrent
streams (RESOURCE_EXHAUSTED; :class:`StreamQuota`, which the A2A gateway's
streams count against too). Audit events go to the ``agentmesh.audit``
logger with the fields principal, role, action, resource, namespace, outcome.
The A2A gateway (``server/api/a2a/access.py``) and the console ask the same
table for the gRPC method each of their requests stands for
(:func:`authenticate`, :func:`check_role`).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import hashlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml
from agentmesh.v1 import bus_pb2, discovery_pb2, state_pb2, task_pb2
from google.protobuf import descriptor
from google.protobuf.message import Message

from server.api import errors
from server.api.handlers import Malformed
from server.domain.errors import (
    AgentMeshError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)

log = logging.getLogger(__name__)
audit_log = logging.getLogger("agentmesh.audit")

ALL_NAMESPACES = "*"
OWNER_LABEL = "agentmesh.dev/owner"
"""Task and workflow label holding the principal that submitted it (set by the server)."""
PRINCIPAL_LABEL = "agentmesh.dev/principal"
"""Agent label holding the principal that registered it (set by the server)."""
RESERVED_LABELS = frozenset({OWNER_LABEL, PRINCIPAL_LABEL})
TOKEN_PREFIX = "amt_"  # noqa: S105 - a prefix that marks agentmesh tokens, not a secret
MIN_TOKEN_LENGTH = 24


class Role(enum.StrEnum):
    """What a principal is."""

    AGENT = "agent"
    """Registers, heartbeats, takes and finishes its own tasks; state and bus."""
    CLIENT = "client"
    """Submits, reads, watches and cancels its own work."""
    ADMIN = "admin"
    """Everything, including re-drive, restore and deregistering others."""
    VIEWER = "viewer"
    """Reads and watches (agents, tasks, workflows, stats, state); changes nothing.
    The console's read-only role."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: Role
    namespaces: frozenset[str]

    def can_see(self, namespace: str) -> bool:
        """Whether the namespace is one of the principal's."""
        return ALL_NAMESPACES in self.namespaces or namespace in self.namespaces

    @property
    def is_admin(self) -> bool:
        """Whether the principal has the admin role."""
        return self.role is Role.ADMIN


# -- the role table --------------------------------------------------------------------

_A, _C, _ADM, _V = Role.AGENT, Role.CLIENT, Role.ADMIN, Role.VIEWER


def _service(module: Any, name: str, rules: Mapping[str, frozenset[Role]],
             ) -> dict[str, frozenset[Role]]:
    full = module.DESCRIPTOR.services_by_name[name].full_name
    return {f"/{full}/{method}": roles for method, roles in rules.items()}


RPC_ROLES: Mapping[str, frozenset[Role]] = {
    **_service(discovery_pb2, "DiscoveryService", {
        "RegisterAgent": frozenset({_A, _ADM}),
        "GetAgent": frozenset({_A, _C, _ADM, _V}),
        "ListAgents": frozenset({_A, _C, _ADM, _V}),
        "DeregisterAgent": frozenset({_A, _ADM}),  # others' agents: admin only (servicer)
        "Heartbeat": frozenset({_A, _ADM}),
        "WatchAgents": frozenset({_A, _C, _ADM, _V}),
        "DrainAgent": frozenset({_ADM}),
    }),
    **_service(task_pb2, "TaskService", {
        "SubmitTask": frozenset({_C, _ADM}),
        "BatchSubmitTasks": frozenset({_C, _ADM}),
        "GetTask": frozenset({_C, _ADM, _V}),
        "ListTasks": frozenset({_C, _ADM, _V}),
        "CancelTask": frozenset({_C, _ADM}),  # others' work: admin only (servicer)
        "RetryTask": frozenset({_ADM}),
        "WatchTasks": frozenset({_C, _ADM, _V}),
        "SubmitWorkflow": frozenset({_C, _ADM}),
        "GetWorkflow": frozenset({_C, _ADM, _V}),
        "ListWorkflows": frozenset({_C, _ADM, _V}),
        "CancelWorkflow": frozenset({_C, _ADM}),  # others' work: admin only (servicer)
        "WatchWorkflow": frozenset({_C, _ADM, _V}),
        "ProcessTasks": frozenset({_A, _ADM}),
        "CompleteTask": frozenset({_A, _ADM}),  # only tasks leased to its agents (servicer)
        "GetStats": frozenset({_C, _ADM, _V}),
        "BulkRetryTasks": frozenset({_ADM}),
        "BulkCancelTasks": frozenset({_ADM}),
        "AppendTaskChunks": frozenset({_A, _ADM}),  # only tasks leased to its agents
        "WatchTaskChunks": frozenset({_C, _ADM, _V}),
        # A person's decision: never an agent (it would approve its own work), nor a viewer.
        "ResolveHumanTask": frozenset({_C, _ADM}),
    }),
    **_service(state_pb2, "StateService", {
        "Get": frozenset({_A, _C, _ADM, _V}),
        "Put": frozenset({_A, _ADM}),
        "Delete": frozenset({_A, _ADM}),
        "List": frozenset({_A, _C, _ADM, _V}),
        "Watch": frozenset({_A, _C, _ADM, _V}),
        "AcquireLock": frozenset({_A, _ADM}),
        "RenewLock": frozenset({_A, _ADM}),
        "ReleaseLock": frozenset({_A, _ADM}),
        "CreateSnapshot": frozenset({_ADM}),
        "ListSnapshots": frozenset({_ADM}),
        "RestoreSnapshot": frozenset({_ADM}),
    }),
    **_service(bus_pb2, "BusService", {
        "Publish": frozenset({_A, _ADM}),
        "Subscribe": frozenset({_A, _C, _ADM}),
        "SubscribeDurable": frozenset({_A, _C, _ADM}),
    }),
}
"""Which roles may call which RPC; a method missing here is refused to everyone."""

PUBLIC_METHODS = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})
"""Reachable without a token: health checks and reflection (no tenant data)."""

CROSS_NAMESPACE_METHODS = frozenset({
    f"/{state_pb2.DESCRIPTOR.services_by_name['StateService'].full_name}/{m}"
    for m in ("ListSnapshots", "RestoreSnapshot")})
"""Methods that touch every namespace: the token must be bound to "*"."""

_EMPTY_MEANS_ALL = frozenset({
    f"/{state_pb2.DESCRIPTOR.services_by_name['StateService'].full_name}/CreateSnapshot"})

ADMIN_ACTIONS: Mapping[str, str] = {
    f"/{task_pb2.DESCRIPTOR.services_by_name['TaskService'].full_name}/RetryTask": "redrive",
    f"/{task_pb2.DESCRIPTOR.services_by_name['TaskService'].full_name}/BulkRetryTasks":
        "bulk-redrive",
    f"/{task_pb2.DESCRIPTOR.services_by_name['TaskService'].full_name}/BulkCancelTasks":
        "bulk-cancel",
    f"/{discovery_pb2.DESCRIPTOR.services_by_name['DiscoveryService'].full_name}/DrainAgent":
        "drain",
    f"/{state_pb2.DESCRIPTOR.services_by_name['StateService'].full_name}/RestoreSnapshot":
        "restore",
    f"/{state_pb2.DESCRIPTOR.services_by_name['StateService'].full_name}/CreateSnapshot":
        "snapshot",
}
"""Admin-only methods whose refusals are audited too."""


# -- tokens ----------------------------------------------------------------------------

def generate_token() -> str:
    """A new random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as stored in the auth file."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class AuthFileError(ValueError):
    """The auth file is missing or malformed."""


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")
_NS = re.compile(r"^(?:\*|[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)$")


class TokenTable:
    """Principals by token hash, loaded from an auth file."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_hash = dict(principals)

    def __len__(self) -> int:
        return len(self._by_hash)

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Read and validate an auth file (AuthFileError names the problem)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise AuthFileError(f"cannot read auth file {path}: {exc}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AuthFileError(f"auth file {path} is not valid YAML: {exc}") from None
        return cls.parse(doc, str(path))

    @classmethod
    def parse(cls, doc: object, source: str = "auth file") -> TokenTable:
        """Validate a parsed auth document."""
        if not isinstance(doc, dict) or not isinstance(doc.get("principals"), list):
            raise AuthFileError(f"{source}: expected a mapping with a `principals` list")
        out: dict[str, Principal] = {}
        names: set[str] = set()
        for i, item in enumerate(doc["principals"]):
            where = f"{source}: principals[{i}]"
            if not isinstance(item, dict):
                raise AuthFileError(f"{where}: expected a mapping")
            unknown = set(item) - {"name", "role", "namespaces", "token_sha256"}
            if unknown:
                raise AuthFileError(f"{where}: unknown keys {sorted(unknown)}"
                                    " (tokens are stored as token_sha256, never in clear)")
            name = item.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise AuthFileError(f"{where}.name: 1-128 letters, digits or '_.@:-'")
            if name in names:
                raise AuthFileError(f"{where}.name: {name!r} appears twice")
            try:
                role = Role(str(item.get("role")))
            except ValueError:
                raise AuthFileError(f"{where}.role: one of agent, client, admin, viewer") from None
            spaces = item.get("namespaces")
            if (not isinstance(spaces, list) or not spaces
                    or not all(isinstance(s, str) and _NS.match(s) for s in spaces)):
                raise AuthFileError(f"{where}.namespaces: a non-empty list of namespaces "
                                    "(lowercase letters, digits, '-') or \"*\"")
            digest = item.get("token_sha256")
            if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
                raise AuthFileError(f"{where}.token_sha256: 64 hex digits "
                                    "(agentmesh auth hash-token)")
            digest = digest.lower()
            if digest in out:
                raise AuthFileError(f"{where}.token_sha256: the same token as "
                                    f"{out[digest].name!r}")
            names.add(name)
            out[digest] = Principal(name, role, frozenset(spaces))
        return cls(out)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a token, or None."""
        # Looking up the SHA-256 of the presented token leaks nothing useful
        # through timing: the caller cannot steer the digest.
        if len(token) > 4096:
            return None
        return self._by_hash.get(hash_token(token))


# -- who may call what: the gRPC interceptor and the A2A gateway ask here ---------------

def authenticate(tokens: TokenTable, token: str | None, *, carrier: str) -> Principal:
    """The principal of a bearer token; UNAUTHENTICATED (MISSING_TOKEN, UNKNOWN_TOKEN).

    ``carrier`` names where the token travels in the message ("metadata" for
    gRPC, "header" for HTTP).
    """
    if token is None:
        raise UnauthenticatedError(f"missing `authorization: Bearer <token>` {carrier}",
                                   reason="MISSING_TOKEN")
    principal = tokens.authenticate(token)
    if principal is None:
        raise UnauthenticatedError("unknown token", reason="UNKNOWN_TOKEN")
    return principal


def check_role(principal: Principal, method: str) -> None:
    """PERMISSION_DENIED (ROLE_DENIED) unless ``RPC_ROLES`` lets the principal call
    ``method`` (a full gRPC method name); refusals of admin actions are audited."""
    roles = RPC_ROLES.get(method)
    if roles is not None and principal.role in roles:
        return
    if method in ADMIN_ACTIONS:
        with _bound(principal):
            audit(ADMIN_ACTIONS[method], method, "", "denied")
    raise PermissionDeniedError(
        f"role {principal.role} may not call {method}", reason="ROLE_DENIED",
        metadata={"role": str(principal.role)})


def bearer_of(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (None when absent)."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


# -- the caller ------------------------------------------------------------------------

_caller: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "agentmesh_caller", default=None)


def caller() -> Principal | None:
    """The authenticated principal of the current call (None when auth is off)."""
    return _caller.get()


def namespace_denied(principal: Principal | None, namespace: str) -> PermissionDeniedError | None:
    """The error for a principal that may not use ``namespace`` (None when it may)."""
    if principal is None or principal.can_see(namespace):
        return None
    return PermissionDeniedError(
        f"the token is not bound to namespace {namespace!r}", reason="NAMESPACE_DENIED",
        metadata={"namespace": namespace[:64]})


def require_visible(namespace: str, kind: str, name: str) -> None:
    """NOT_FOUND for a resource in a namespace the caller is not bound to.

    Resources of other namespaces are invisible (not "forbidden"), so their
    existence leaks nothing.
    """
    who = _caller.get()
    if who is not None and not who.can_see(namespace):
        raise NotFoundError(kind, name)


def owner_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels without the reserved keys, plus the caller as owner when auth is on."""
    out = {k: v for k, v in labels.items() if k not in RESERVED_LABELS}
    who = _caller.get()
    if who is not None:
        out[OWNER_LABEL] = who.name
    return out


def agent_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Agent labels without the reserved keys, plus the registering principal."""
    out = {k: v for k, v in labels.items() if k not in RESERVED_LABELS}
    who = _caller.get()
    if who is not None:
        out[PRINCIPAL_LABEL] = who.name
    return out


def check_owner(labels: Mapping[str, str], action: str, resource: str,
                namespace: str) -> None:
    """A client may only act on its own work; an admin acting on others' is audited."""
    who = _caller.get()
    if who is None or labels.get(OWNER_LABEL) == who.name:
        return
    if not who.is_admin:
        audit(action, resource, namespace, "denied")
        raise PermissionDeniedError(f"{resource} was submitted by another principal",
                                    reason="NOT_OWNER")
    audit(action, resource, namespace, "allowed")


def check_agent_identity(labels: Mapping[str, str], resource: str) -> None:
    """PERMISSION_DENIED unless the agent was registered by the caller (admins pass)."""
    who = _caller.get()
    if who is None or who.is_admin or labels.get(PRINCIPAL_LABEL) == who.name:
        return
    raise PermissionDeniedError(f"{resource} belongs to another principal",
                                reason="NOT_YOUR_AGENT")


# -- audit -------------------------------------------------------------------------------

def audit(action: str, resource: str, namespace: str, outcome: str) -> None:
    """Log one structured audit event on the ``agentmesh.audit`` logger."""
    who = _caller.get()
    fields = {"principal": who.name if who else "anonymous",
              "role": str(who.role) if who else "none",
              "action": action, "resource": resource, "namespace": namespace,
              "outcome": outcome}
    audit_log.info("audit %s %s by %s: %s", action, resource, fields["principal"], outcome,
                   extra={"audit": True, **fields})


@contextlib.contextmanager
def audited(action: str, resource: str, namespace: str) -> Iterator[None]:
    """Audit an admin action with its outcome (ok, or the error's reason)."""
    try:
        yield
    except AgentMeshError as exc:
        audit(action, resource, namespace, f"error:{exc.reason}")
        raise
    except Exception:
        audit(action, resource, namespace, "error")
        raise
    audit(action, resource, namespace, "ok")


# -- namespace fields of requests -----------------------------------------------------

Path_ = tuple[descriptor.FieldDescriptor, ...]
_PATHS: dict[str, list[Path_]] = {}


def _namespace_paths(desc: descriptor.Descriptor, depth: int = 0) -> list[Path_]:
    """Paths to every ``namespace`` string field of a request, at most three deep."""
    out: list[Path_] = []
    for f in desc.fields:
        if f.name == "namespace" and f.type == descriptor.FieldDescriptor.TYPE_STRING:
            out.append((f,))
        elif (f.message_type is not None and depth < 2
              and not f.message_type.GetOptions().map_entry):
            out.extend((f, *sub) for sub in _namespace_paths(f.message_type, depth + 1))
    return out


def _values(msg: Message, path: Path_, top: bool) -> Iterator[str | None]:
    """Namespace values along a path: None for an empty top-level field."""
    head, rest = path[0], path[1:]
    if not rest:
        value = getattr(msg, head.name)
        yield value if value else (None if top else "default")
        return
    if head.is_repeated:
        for item in getattr(msg, head.name):
            yield from _values(item, rest, False)
    elif msg.HasField(head.name):
        yield from _values(getattr(msg, head.name), rest, False)


def requested_namespaces(method: str, request: object) -> Iterator[str]:
    """Every namespace a request names ("default" for an empty field, "*" for all)."""
    if not isinstance(request, Message):
        return
    desc: descriptor.Descriptor = request.DESCRIPTOR  # type: ignore[assignment]
    paths = _PATHS.get(desc.full_name)
    if paths is None:
        paths = _PATHS[desc.full_name] = _namespace_paths(desc)
    for path in paths:
        for value in _values(request, path, True):
            if value is None:
                yield ALL_NAMESPACES if method in _EMPTY_MEANS_ALL else "default"
            else:
                yield value


# -- the interceptor -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Bounds on concurrent streams."""

    max_watch_streams: int = 1024
    """Server-streaming calls (watches, subscriptions) open at once, server-wide."""
    max_streams_per_principal: int = 1024
    """Streaming calls of any kind open at once per principal (auth on only)."""


class StreamQuota:
    """Streams open now, bounded by :class:`StreamLimits`: the gRPC interceptor and the
    A2A gateway count against the same bounds (one count per process)."""

    def __init__(self, limits: StreamLimits | None = None) -> None:
        self._limits = limits or StreamLimits()
        self._watch_streams = 0
        self._by_principal: dict[str, int] = {}

    @property
    def open_watch_streams(self) -> int:
        """Server-streaming calls (watches, subscriptions) open now."""
        return self._watch_streams

    def open(self, principal: Principal | None, *, watch: bool) -> AgentMeshError | None:
        """Count a stream opening; the error (RESOURCE_EXHAUSTED) when a bound is reached
        (then nothing was counted)."""
        limits = self._limits
        if watch and self._watch_streams >= limits.max_watch_streams:
            return ResourceExhaustedError(
                f"at most {limits.max_watch_streams} watch streams are open at once",
                reason="STREAM_LIMIT")
        if principal is not None:
            n = self._by_principal.get(principal.name, 0)
            if n >= limits.max_streams_per_principal:
                return ResourceExhaustedError(
                    f"at most {limits.max_streams_per_principal} streams per principal",
                    reason="STREAM_LIMIT")
            self._by_principal[principal.name] = n + 1
        if watch:
            self._watch_streams += 1
        return None

    def close(self, principal: Principal | None, *, watch: bool) -> None:
        """Count a stream :meth:`open` let through closing."""
        if watch:
            self._watch_streams -= 1
        if principal is not None:
            n = self._by_principal.get(principal.name, 1) - 1
            if n <= 0:
                self._by_principal.pop(principal.name, None)
            else:
                self._by_principal[principal.name] = n

    @contextlib.contextmanager
    def held(self, principal: Principal | None, *, watch: bool = True) -> Iterator[None]:
        """One stream for the block; raises the RESOURCE_EXHAUSTED error past a bound."""
        error = self.open(principal, watch=watch)
        if error is not None:
            raise error
        try:
            yield
        finally:
            self.close(principal, watch=watch)


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Ctx = grpc.aio.ServicerContext[Any, Any]


def _same_kind(handler: Handler | None, error: AgentMeshError) -> Handler:
    """A handler of the RPC's kind that answers ``error`` at once."""
    status = errors.to_status(error)

    async def unary(_request: object, context: Ctx) -> None:
        await context.abort_with_status(status)

    async def streaming(_request: object, context: Ctx) -> AsyncIterator[None]:
        await context.abort_with_status(status)
        yield None  # type: ignore[unreachable]  # makes this an async generator

    if handler is None or not handler.response_streaming:
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary)
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    return grpc.unary_stream_rpc_method_handler(streaming)


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return bearer_of(value.decode("utf-8", "replace") if isinstance(value, bytes)
                             else value)
    return None


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """The one place that decides who may call what.

    With a token table: authenticates the bearer token (UNAUTHENTICATED),
    checks ``RPC_ROLES`` (PERMISSION_DENIED), checks every namespace the
    request names (PERMISSION_DENIED) and binds the principal for the
    servicers. With or without one: bounds concurrent streams
    (RESOURCE_EXHAUSTED).
    """

    def __init__(self, tokens: TokenTable | None, limits: StreamLimits | None = None, *,
                 quota: StreamQuota | None = None) -> None:
        self._tokens = tokens
        self._quota = quota or StreamQuota(limits)

    @property
    def open_watch_streams(self) -> int:
        """Server-streaming calls open now (the A2A gateway's streams included when it
        shares the quota)."""
        return self._quota.open_watch_streams

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """Authenticate, authorize, and wrap the handler (see the class docstring)."""
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method in PUBLIC_METHODS or (handler is None and self._tokens is None):
            return handler
        principal: Principal | None = None
        if self._tokens is not None:
            try:
                principal = authenticate(
                    self._tokens, _bearer(handler_call_details.invocation_metadata),
                    carrier="metadata")
                check_role(principal, method)
            except (UnauthenticatedError, PermissionDeniedError) as exc:
                return _same_kind(handler, exc)
            if method in CROSS_NAMESPACE_METHODS and not principal.can_see(ALL_NAMESPACES):
                return _same_kind(handler, PermissionDeniedError(
                    f"{method} spans every namespace; the token must be bound to \"*\"",
                    reason="NAMESPACE_DENIED"))
        if handler is None:
            return None
        return self._wrap(handler, method, principal)

    # -- wrapping ------------------------------------------------------------------

    def _namespace_error(self, method: str, request: object,
                         principal: Principal | None) -> AgentMeshError | None:
        if principal is None or isinstance(request, Malformed):
            return None
        for ns in requested_namespaces(method, request):
            error = namespace_denied(principal, ns)
            if error is not None:
                return error
        return None

    def _open(self, principal: Principal | None, watch: bool) -> AgentMeshError | None:
        return self._quota.open(principal, watch=watch)

    def _close(self, principal: Principal | None, watch: bool) -> None:
        self._quota.close(principal, watch=watch)

    def _wrap(self, handler: Handler, method: str, principal: Principal | None) -> Handler:
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if not handler.response_streaming:
            if handler.request_streaming:  # pragma: no cover - no client-streaming RPC yet
                return handler
            inner_uu: Any = handler.unary_unary
            if principal is None:
                return handler

            async def unary_unary(request: object, context: Ctx) -> object:
                error = self._namespace_error(method, request, principal)
                if error is not None:
                    await context.abort_with_status(errors.to_status(error))
                with _bound(principal):
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)

        if handler.request_streaming:
            inner_ss: Any = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[object],
                                    context: Ctx) -> AsyncIterator[object]:
                error = self._open(principal, watch=False)
                if error is not None:
                    await context.abort_with_status(errors.to_status(error))
                try:
                    with _bound(principal):
                        async for item in inner_ss(requests, context):
                            yield item
                finally:
                    self._close(principal, watch=False)

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)

        inner_us: Any = handler.unary_stream

        async def unary_stream(request: object, context: Ctx) -> AsyncIterator[object]:
            error = self._namespace_error(method, request, principal)
            if error is None:
                error = self._open(principal, watch=True)
            if error is not None:
                await context.abort_with_status(errors.to_status(error))
            try:
                with _bound(principal):
                    async for item in inner_us(request, context):
                        yield item
            finally:
                self._close(principal, watch=True)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)


@contextlib.contextmanager
def acting_as(principal: Principal | None) -> Iterator[None]:
    """Bind ``principal`` as the caller (the console does, as the interceptor does)."""
    with _bound(principal):
        yield


@contextlib.contextmanager
def _bound(principal: Principal | None) -> Iterator[None]:
    token = _caller.set(principal)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # reset from another context (generator GC)
            _caller.reset(token)

"""The one place where domain errors become gRPC statuses.

Each AgentMeshError class maps to one status code; the status carries a
``google.rpc.ErrorInfo`` (reason, domain, metadata) and, where they apply,
``BadRequest`` field violations or ``RetryInfo``. Anything else becomes
INTERNAL with a generic message and is logged with its traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.api.handlers import Malformed
from server.domain.errors import (
    AbortedError,
    AgentMeshError,
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

log = logging.getLogger(__name__)

ERROR_DOMAIN = "agentmesh.dev"

_CODES: list[tuple[type[AgentMeshError], grpc.StatusCode]] = [
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (AbortedError, grpc.StatusCode.ABORTED),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
]


def status_code_of(error: AgentMeshError) -> grpc.StatusCode:
    """The status code of a domain error."""
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


MAX_MESSAGE_BYTES = 512
MAX_VIOLATIONS = 10
MAX_FIELD_BYTES = 128
MAX_DESCRIPTION_BYTES = 256
"""UTF-8 sizes. The status travels in the trailers, which a gRPC client refuses past 8 KiB
(its soft metadata limit): the client would see RESOURCE_EXHAUSTED instead of
the error. Messages and violations built from hostile input (a 100 KB label
key, a workflow naming thousands of unknown steps) are cut to these sizes."""


def _cut(text: str, limit: int) -> str:
    raw = text.encode("utf-8", "replace")  # a lone surrogate would fail serialization
    if len(raw) <= limit:
        return raw.decode("utf-8")
    return raw[:limit - 3].decode("utf-8", "ignore") + "..."


def to_status(error: AgentMeshError) -> grpc.Status:
    """A grpc.Status with rich details for a domain error (sized to fit the trailers)."""
    code = status_code_of(error)
    details = [_pack(error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))]
    if isinstance(error, InvalidArgumentError) and error.violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=_cut(v.field, MAX_FIELD_BYTES),
                description=_cut(v.description, MAX_DESCRIPTION_BYTES))
            for v in error.violations[:MAX_VIOLATIONS]])))
    if isinstance(error, ResourceExhaustedError) and error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return rpc_status.to_status(status_pb2.Status(
        code=code.value[0], message=_cut(error.message, MAX_MESSAGE_BYTES), details=details))


_INTERNAL = rpc_status.to_status(status_pb2.Status(
    code=code_pb2.INTERNAL, message="internal error; see the server log",
    details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))]))


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
    """Abort the call with the status for ``error`` (never returns)."""
    if isinstance(error, AgentMeshError):
        await context.abort_with_status(to_status(error))
    log.error("unexpected error in %s", _method(context), exc_info=error)
    await context.abort_with_status(_INTERNAL)


def _method(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return str(context._rpc_event.call_details.method.decode())  # type: ignore[attr-defined]
    except AttributeError:
        return "rpc"


def check(request: object) -> None:
    """Refuse a request that could not be parsed or is past a bound (``handlers.Malformed``)."""
    if isinstance(request, Malformed):
        if request.violation is not None:
            raise InvalidArgumentError(request.error, [request.violation],
                                       reason="TOO_MANY_ENTRIES")
        raise InvalidArgumentError(
            f"cannot parse {request.type_name}: {request.error}",
            [FieldViolation("(message)", f"not a valid {request.type_name}")],
            reason="MALFORMED_MESSAGE")


R = TypeVar("R")
Q = TypeVar("Q")
S = TypeVar("S")


def unary(
    fn: Callable[[S, Q, grpc.aio.ServicerContext[Q, R]], Awaitable[R]],
) -> Callable[[S, Q, grpc.aio.ServicerContext[Q, R]], Awaitable[R]]:
    """Map errors of a unary handler to statuses."""
    @functools.wraps(fn)
    async def wrapper(self: S, request: Q, context: grpc.aio.ServicerContext[Q, R]) -> R:
        try:
            check(request)
            return await fn(self, request, context)
        except (AgentMeshError, Exception) as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await abort(context, error)
            raise  # pragma: no cover - abort raises
    return wrapper


def streaming(
    fn: Callable[[S, Q, grpc.aio.ServicerContext[Any, R]], AsyncIterator[R]],
) -> Callable[[S, Q, grpc.aio.ServicerContext[Any, R]], AsyncIterator[R]]:
    """Map errors of a server-streaming (or bidi) handler to statuses."""
    @functools.wraps(fn)
    async def wrapper(self: S, request: Q,
                      context: grpc.aio.ServicerContext[Any, R]) -> AsyncIterator[R]:
        try:
            check(request)
            async for item in fn(self, request, context):
                yield item
        except (AgentMeshError, Exception) as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await abort(context, error)
    return wrapper

"""Errors raised by the SDK and the errors a handler may raise.

Every SDK error derives from :class:`AgentMeshError`. Failed RPCs raise
:class:`RPCError` (or the subclass chosen by the status code) carrying the
``google.rpc`` details the server attached: ``ErrorInfo.reason``,
``BadRequest`` field violations and ``RetryInfo``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from agent_sdk._types import TaskInfo, WorkflowInfo

__all__ = [
    "AbortedError",
    "AgentMeshError",
    "AlreadyExistsError",
    "ChunkRefusedError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NonRetryableError",
    "NotFoundError",
    "PermissionDeniedError",
    "RPCError",
    "ResourceExhaustedError",
    "RetryableError",
    "TaskFailedError",
    "UnauthenticatedError",
    "UnavailableError",
    "WorkflowFailedError",
    "rpc_error_from",
]

_DETAILS_KEY = "grpc-status-details-bin"


class AgentMeshError(Exception):
    """Root of every error raised by agentmesh."""


class RPCError(AgentMeshError):
    """A failed gRPC call, with the status code and parsed rich details."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 status: Any | None = None) -> None:
        """Wrap ``code`` and ``message``; ``status`` is the ``google.rpc.Status``, if any."""
        super().__init__(f"{code.name}: {message}")
        #: The gRPC status code.
        self.code = code
        #: The status message.
        self.message = message
        #: The raw ``google.rpc.Status`` (None when the server sent no details).
        self.status = status
        #: ``ErrorInfo.reason`` ("LEASE_EXPIRED"...), "" when absent.
        self.reason = ""
        #: ``ErrorInfo.domain``, "" when absent.
        self.domain = ""
        #: ``ErrorInfo.metadata``.
        self.metadata: dict[str, str] = {}
        #: ``BadRequest`` field violations as (field, description) pairs.
        self.field_violations: list[tuple[str, str]] = []
        #: ``RetryInfo.retry_delay`` in seconds, None when absent.
        self.retry_after: float | None = None
        if status is not None:
            self._parse(status)

    def _parse(self, status: Any) -> None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason = str(info.reason)
                self.domain = str(info.domain)
                self.metadata = {str(k): str(v) for k, v in info.metadata.items()}
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.field_violations = [(str(v.field), str(v.description))
                                         for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_after = float(retry.retry_delay.ToNanoseconds()) / 1e9


class NotFoundError(RPCError):
    """NOT_FOUND: the named resource does not exist."""


class InvalidArgumentError(RPCError):
    """INVALID_ARGUMENT: see ``field_violations``."""


class AlreadyExistsError(RPCError):
    """ALREADY_EXISTS: a resource with that id exists."""


class FailedPreconditionError(RPCError):
    """FAILED_PRECONDITION: the resource is in the wrong state."""


class AbortedError(RPCError):
    """ABORTED: a version or lease conflict; re-read, then retry."""


class ResourceExhaustedError(RPCError):
    """RESOURCE_EXHAUSTED: a quota or limit; see ``retry_after``."""


class UnavailableError(RPCError):
    """UNAVAILABLE: transient; the server could not be reached."""


class UnauthenticatedError(RPCError):
    """UNAUTHENTICATED: missing or invalid credentials."""


class PermissionDeniedError(RPCError):
    """PERMISSION_DENIED: the caller's role may not do this."""


_BY_CODE: dict[grpc.StatusCode, type[RPCError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def rpc_error_from(error: grpc.aio.AioRpcError) -> RPCError:
    """The typed :class:`RPCError` for a failed call, details parsed from its trailers."""
    code = error.code()
    message = error.details() or ""
    status = None
    trailers = error.trailing_metadata()
    if trailers:
        for key, value in trailers:
            if key == _DETAILS_KEY and isinstance(value, bytes):
                parsed = status_pb2.Status()
                try:
                    parsed.ParseFromString(value)
                except Exception:  # noqa: BLE001 - a garbled trailer must not hide the error
                    break
                if parsed.code == code.value[0]:
                    status = parsed
                    message = str(parsed.message) or message
                break
    return _BY_CODE.get(code, RPCError)(code, message, status)


class TaskFailedError(AgentMeshError):
    """A task ended without success (``run_task``); ``task`` holds its last state."""

    def __init__(self, task: TaskInfo) -> None:
        """Wrap the ended task."""
        failure = task.failure
        detail = f"{failure.error_type}: {failure.message}" if failure else "no failure recorded"
        super().__init__(f"{task.name} ended {task.state}: {detail}")
        #: The task as it ended.
        self.task = task


class ChunkRefusedError(AgentMeshError):
    """A handler's chunk was refused: ``reason`` is CHUNK_TOO_LARGE, CHUNK_LIMIT,
    STALE_LEASE (the lease ended) or NOT_RUNNING (the task ended)."""

    def __init__(self, reason: str, message: str) -> None:
        """Wrap the refusal."""
        super().__init__(f"{reason}: {message}")
        #: Why.
        self.reason = reason
        #: Detail.
        self.message = message


class WorkflowFailedError(AgentMeshError):
    """A workflow ended without success; ``workflow`` holds its last state."""

    def __init__(self, workflow: WorkflowInfo) -> None:
        """Wrap the ended workflow."""
        super().__init__(f"{workflow.name} ended {workflow.state}: {workflow.failure_reason}")
        #: The workflow as it ended.
        self.workflow = workflow


class RetryableError(AgentMeshError):
    """Raised by a handler: this attempt failed, a retry may succeed."""

    def __init__(self, message: str, error_type: str | None = None) -> None:
        """``error_type`` defaults to the class name."""
        super().__init__(message)
        #: Message reported to the server.
        self.message = message
        #: Error type reported to the server.
        self.error_type = error_type or type(self).__name__


class NonRetryableError(AgentMeshError):
    """Raised by a handler: retrying cannot help; the task fails at once."""

    def __init__(self, message: str, error_type: str | None = None) -> None:
        """``error_type`` defaults to the class name."""
        super().__init__(message)
        #: Message reported to the server.
        self.message = message
        #: Error type reported to the server.
        self.error_type = error_type or type(self).__name__

"""The error hierarchy of agentmesh.

Every error is an :class:`AgentMeshError` with a stable ``reason`` (the
``google.rpc.ErrorInfo.reason`` on the wire). The one mapping to gRPC status
codes lives in ``server/api/errors.py``; nothing here knows about gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str


class AgentMeshError(Exception):
    """Root of every agentmesh error."""

    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgumentError(AgentMeshError):
    """The request is malformed; ``violations`` names the fields."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: list[FieldViolation] | None = None,
                 *, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.violations = list(violations or [])

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgumentError:
        """An error about a single field."""
        return cls(f"{field}: {description}", [FieldViolation(field, description)])


class NotFoundError(AgentMeshError):
    """The named resource does not exist."""

    reason = "NOT_FOUND"

    def __init__(self, resource_type: str, resource_name: str) -> None:
        super().__init__(f"{resource_type} {resource_name!r} not found",
                         metadata={"resource": resource_name})
        self.resource_type = resource_type
        self.resource_name = resource_name


class AlreadyExistsError(AgentMeshError):
    """A resource with that name exists already."""

    reason = "ALREADY_EXISTS"


class FailedPreconditionError(AgentMeshError):
    """The resource is in the wrong state for the request."""

    reason = "FAILED_PRECONDITION"


class AbortedError(AgentMeshError):
    """A concurrency conflict: version mismatch or a stale fencing token."""

    reason = "ABORTED"


class StaleLeaseError(AbortedError):
    """A result carried a fencing token that is no longer current."""

    reason = "LEASE_EXPIRED"


class ResourceExhaustedError(AgentMeshError):
    """A limit was reached; ``retry_after`` (seconds) hints when to try again."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after: float | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class UnauthenticatedError(AgentMeshError):
    """No or unknown credentials (session token)."""

    reason = "UNAUTHENTICATED"


class PermissionDeniedError(AgentMeshError):
    """The caller may not do this."""

    reason = "PERMISSION_DENIED"


class UnavailableError(AgentMeshError):
    """A transient failure (backend down, server draining)."""

    reason = "UNAVAILABLE"


class OutOfRangeError(AgentMeshError):
    """A watch asked for history that is gone."""

    reason = "OUT_OF_RANGE"

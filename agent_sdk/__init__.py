"""agentmesh SDK: what agents and clients import.

- :class:`MeshClient` / :class:`SyncMeshClient`: submit and watch tasks and
  workflows, query agents, use the shared state store and the bus.
- :class:`Agent`: register handlers per capability and serve tasks.

Every value returned is a frozen dataclass; no protobuf message leaks out.
"""

from agent_sdk._agent import Agent, Handler, TaskContext
from agent_sdk._client import UNSET, ChannelConfig, MeshClient
from agent_sdk._locks import Lock, LockLostError, SnapshotInfo
from agent_sdk._payload import decode_payload, encode_payload
from agent_sdk._sync import SyncMeshClient
from agent_sdk._types import (
    AgentEvent,
    AgentInfo,
    AttemptInfo,
    BulkResult,
    BusMessage,
    DurableMessage,
    FailureInfo,
    MeshStats,
    RetryPolicy,
    StateEntry,
    StateEvent,
    StepInfo,
    StepSpec,
    TaskChunk,
    TaskInfo,
    WorkflowInfo,
    WorkflowSpec,
)
from agent_sdk._workflow_file import load_workflow_file
from agent_sdk.errors import (
    AbortedError,
    AgentMeshError,
    AlreadyExistsError,
    ChunkRefusedError,
    FailedPreconditionError,
    InvalidArgumentError,
    NonRetryableError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryableError,
    RPCError,
    TaskFailedError,
    UnauthenticatedError,
    UnavailableError,
    WorkflowFailedError,
)

__all__ = [
    "UNSET",
    "AbortedError",
    "Agent",
    "AgentEvent",
    "AgentInfo",
    "AgentMeshError",
    "AlreadyExistsError",
    "AttemptInfo",
    "BulkResult",
    "BusMessage",
    "ChannelConfig",
    "ChunkRefusedError",
    "DurableMessage",
    "FailedPreconditionError",
    "FailureInfo",
    "Handler",
    "InvalidArgumentError",
    "Lock",
    "LockLostError",
    "MeshClient",
    "MeshStats",
    "NonRetryableError",
    "NotFoundError",
    "PermissionDeniedError",
    "RPCError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RetryableError",
    "SnapshotInfo",
    "StateEntry",
    "StateEvent",
    "StepInfo",
    "StepSpec",
    "SyncMeshClient",
    "TaskChunk",
    "TaskContext",
    "TaskFailedError",
    "TaskInfo",
    "UnauthenticatedError",
    "UnavailableError",
    "WorkflowFailedError",
    "WorkflowInfo",
    "WorkflowSpec",
    "decode_payload",
    "encode_payload",
    "load_workflow_file",
]

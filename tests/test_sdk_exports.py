"""Pins the public API of agent_sdk: changing it must be deliberate."""

from __future__ import annotations

import ast
from pathlib import Path

import agent_sdk

EXPECTED = {
    "UNSET",
    "AbortedError",
    "Agent",
    "AgentEvent",
    "AgentInfo",
    "BulkResult",
    "AgentMeshError",
    "AlreadyExistsError",
    "AttemptInfo",
    "BusMessage",
    "DurableMessage",
    "ChannelConfig",
    "ChunkRefusedError",
    "Lock",
    "LockLostError",
    "SnapshotInfo",
    "FailedPreconditionError",
    "FailureInfo",
    "Handler",
    "InvalidArgumentError",
    "MeshClient",
    "MeshStats",
    "NonRetryableError",
    "NotFoundError",
    "PermissionDeniedError",
    "RPCError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RetryableError",
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
}

SDK = Path(agent_sdk.__file__).parent


def test_all_is_pinned() -> None:
    assert set(agent_sdk.__all__) == EXPECTED
    assert len(agent_sdk.__all__) == len(EXPECTED), "duplicates in __all__"


def test_every_export_resolves_and_is_documented() -> None:
    for name in agent_sdk.__all__:
        obj = getattr(agent_sdk, name)
        if name != "UNSET" and name != "Handler":
            assert obj.__doc__, f"{name} has no docstring"


def test_facade_layout() -> None:
    for module in ("_client.py", "_agent.py", "_types.py", "_payload.py", "_workflow_file.py",
                   "_sync.py", "_retry.py", "errors.py", "py.typed"):
        assert (SDK / module).exists(), module


def test_sdk_never_imports_server() -> None:
    for path in SDK.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "server", f"{path.name} imports {name}"


def test_error_hierarchy() -> None:
    rpc_errors = ["NotFoundError", "InvalidArgumentError", "AlreadyExistsError",
                  "FailedPreconditionError", "AbortedError", "ResourceExhaustedError",
                  "UnavailableError", "UnauthenticatedError", "PermissionDeniedError"]
    for name in rpc_errors:
        assert issubclass(getattr(agent_sdk, name), agent_sdk.RPCError)
    for name in ("RPCError", "TaskFailedError", "WorkflowFailedError", "RetryableError",
                 "NonRetryableError"):
        assert issubclass(getattr(agent_sdk, name), agent_sdk.AgentMeshError)

"""Unit tests of agent_sdk that need no server."""

from __future__ import annotations

import math
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.v1 import common_pb2, discovery_pb2, state_pb2, task_pb2
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import agent_sdk
from agent_sdk import (
    AbortedError,
    FailureInfo,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RetryPolicy,
    RPCError,
    StepSpec,
    SyncMeshClient,
    TaskFailedError,
    TaskInfo,
    UnavailableError,
    WorkflowSpec,
    decode_payload,
    encode_payload,
    load_workflow_file,
)
from agent_sdk._types import _time as sdk_time
from agent_sdk._types import (
    agent_from_proto,
    entry_from_proto,
    task_from_proto,
    task_state_value,
    workflow_from_proto,
)
from agent_sdk.errors import rpc_error_from

# ----------------------------------------------------------------------- payloads


@pytest.mark.parametrize("value", [
    {"topic": "agent meshes", "n": [1, 2.5, None, True]},
    [1, "two", {"three": 3}],
    "héllo ✓",
    0,
    -17,
    3.25,
    True,
    False,
    "",
    {},
    [],
])
def test_json_round_trip(value: Any) -> None:
    payload = encode_payload(value)
    assert payload.metadata["encoding"] == b"json/plain"
    assert decode_payload(payload) == value
    # Survives the wire.
    again = common_pb2.Payload.FromString(payload.SerializeToString())
    assert decode_payload(again) == value


def test_bytes_round_trip() -> None:
    payload = encode_payload(b"\x00\xffraw")
    assert payload.metadata["encoding"] == b"binary/plain"
    assert payload.data == b"\x00\xffraw"
    assert decode_payload(payload) == b"\x00\xffraw"
    assert decode_payload(encode_payload(bytearray(b"ab"))) == b"ab"


def test_none_round_trip() -> None:
    payload = encode_payload(None)
    assert payload.metadata["encoding"] == b"binary/null"
    assert payload.data == b""
    assert decode_payload(payload) is None


def test_unknown_encoding_gives_raw_bytes() -> None:
    payload = common_pb2.Payload(metadata={"encoding": b"proto/x"}, data=b"\x08\x01")
    assert decode_payload(payload) == b"\x08\x01"
    assert decode_payload(common_pb2.Payload(data=b"abc")) == b"abc"
    assert decode_payload(common_pb2.Payload()) is None


def test_json_is_compact_utf8() -> None:
    assert encode_payload({"a": "é"}).data == '{"a":"é"}'.encode()


def test_unserialisable_value_raises_type_error() -> None:
    with pytest.raises(TypeError):
        encode_payload(object())


def test_nan_is_encoded_like_json_does() -> None:
    assert math.isnan(decode_payload(encode_payload(float("nan"))))


# ----------------------------------------------------------------- workflow files

EXAMPLE = """\
name: research-report
steps:
  - id: plan
    capability: plan
    input: {topic: "agent meshes"}
  - id: research-history
    capability: research
    depends_on: [plan]
    input: {angle: history}
    retry: {max_attempts: 3, initial_backoff: 0.5}
    timeout: 30
    fallback: research-lite
"""


def test_load_workflow_file(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    spec = load_workflow_file(path)
    assert spec.name == "research-report"
    assert [s.id for s in spec.steps] == ["plan", "research-history"]
    plan, history = spec.steps
    assert plan == StepSpec(id="plan", capability="plan", input={"topic": "agent meshes"})
    assert history.depends_on == ("plan",)
    assert history.input == {"angle": "history"}
    assert history.retry == RetryPolicy(max_attempts=3, initial_backoff=0.5)
    assert history.timeout == 30.0
    assert history.fallback == "research-lite"


def test_workflow_spec_to_proto(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    proto = load_workflow_file(str(path)).to_proto()
    assert proto.display_name == "research-report"
    step = proto.steps[1]
    assert step.capability == "research"
    assert list(step.depends_on) == ["plan"]
    assert decode_payload(step.input) == {"angle": "history"}
    assert step.retry_policy.max_attempts == 3
    assert step.retry_policy.initial_backoff.ToNanoseconds() == 500_000_000
    assert step.timeout.seconds == 30
    assert step.fallback_capability == "research-lite"
    assert not proto.steps[0].HasField("timeout")
    assert not proto.steps[0].HasField("retry_policy")


@pytest.mark.parametrize(("text", "message"), [
    ("- just\n- a list\n", "must be a mapping"),
    ("name: x\n", "workflow.steps: must be a non-empty list"),
    ("name: x\nsteps: []\n", "workflow.steps: must be a non-empty list"),
    ("name: x\nsteps: [{capability: c}]\n", "steps[0].id: is required"),
    ("name: x\nsteps: [{id: a}]\n", "steps[0].capability: is required"),
    ("name: x\nsteps: [{id: a, capability: 3}]\n", "steps[0].capability: must be a string"),
    ("name: x\nsteps: [{id: a, capability: c, colour: red}]\n", "unknown field(s) colour"),
    ("name: x\nsteps: [{id: a, capability: c}, {id: a, capability: c}]\n",
     "steps[1].id: duplicate step id 'a'"),
    ("name: x\nsteps: [{id: a, capability: c, depends_on: [b]}]\n",
     "steps[0].depends_on: unknown step 'b'"),
    ("name: x\nsteps: [{id: a, capability: c, depends_on: 3}]\n",
     "steps[0].depends_on: must be a list"),
    ("name: x\nsteps: [{id: a, capability: c, timeout: -1}]\n",
     "steps[0].timeout: must be a non-negative number"),
    ("name: x\nsteps: [{id: a, capability: c, timeout: soon}]\n",
     "steps[0].timeout: must be a non-negative number"),
    ("name: x\nsteps: [{id: a, capability: c, priority: high}]\n",
     "steps[0].priority: must be an integer"),
    ("name: x\nsteps: [{id: a, capability: c, retry: {max_attempts: many}}]\n",
     "steps[0].retry.max_attempts: must be an integer"),
    ("name: x\nsteps: [{id: a, capability: c, retry: {tries: 3}}]\n",
     "steps[0].retry: unknown field(s) tries"),
    ("name: x\nsteps: [{id: a, capability: c, retry: 3}]\n", "steps[0].retry: must be a mapping"),
    ("name: x\nsteps: {id: a}\n", "workflow.steps: must be a non-empty list"),
    ("name: [x\n", "not valid YAML"),
])
def test_bad_workflow_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.yaml") as info:
        load_workflow_file(path)
    assert message in str(info.value)


def test_missing_workflow_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_workflow_file(tmp_path / "nope.yaml")


def test_workflow_spec_from_dict_accepts_single_dependency_string() -> None:
    spec = WorkflowSpec.from_dict({"name": "w", "steps": [
        {"id": "a", "capability": "c"}, {"id": "b", "capability": "c", "depends_on": "a"}]})
    assert spec.steps[1].depends_on == ("a",)


def test_retry_policy_to_proto() -> None:
    proto = RetryPolicy(max_attempts=5, initial_backoff=0.25, max_backoff=10, multiplier=3,
                        jitter=False, non_retryable_error_types=("ValueError",)).to_proto()
    assert proto.max_attempts == 5
    assert proto.initial_backoff.ToNanoseconds() == 250_000_000
    assert proto.max_backoff.seconds == 10
    assert proto.backoff_multiplier == 3.0
    assert proto.jitter == common_pb2.BACKOFF_JITTER_NONE
    assert list(proto.non_retryable_error_types) == ["ValueError"]
    assert RetryPolicy().to_proto().jitter == common_pb2.BACKOFF_JITTER_FULL


# ------------------------------------------------------------------------- errors


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _aio_error(code: grpc.StatusCode, message: str, details: list[Any]) -> grpc.aio.AioRpcError:
    status = status_pb2.Status(code=code.value[0], message=message,
                               details=[_packed(d) for d in details])
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, message, None)


def test_rpc_error_parses_error_info_and_bad_request() -> None:
    error = rpc_error_from(_aio_error(
        grpc.StatusCode.INVALID_ARGUMENT, "bad task",
        [error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain="agentmesh.dev",
                                     metadata={"field": "task.capability"}),
         error_details_pb2.BadRequest(field_violations=[
             error_details_pb2.BadRequest.FieldViolation(field="task.capability",
                                                          description="is required"),
             error_details_pb2.BadRequest.FieldViolation(field="task.priority",
                                                          description="out of range")])]))
    assert isinstance(error, InvalidArgumentError)
    assert isinstance(error, RPCError)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "bad task"
    assert error.reason == "INVALID_FIELD"
    assert error.domain == "agentmesh.dev"
    assert error.metadata == {"field": "task.capability"}
    assert error.field_violations == [("task.capability", "is required"),
                                      ("task.priority", "out of range")]
    assert error.retry_after is None
    assert "INVALID_ARGUMENT" in str(error)


def test_rpc_error_parses_retry_info() -> None:
    delay = duration_pb2.Duration(seconds=1, nanos=500_000_000)
    error = rpc_error_from(_aio_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full",
        [error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="agentmesh.dev"),
         error_details_pb2.RetryInfo(retry_delay=delay)]))
    assert isinstance(error, ResourceExhaustedError)
    assert error.reason == "QUEUE_FULL"
    assert error.retry_after == pytest.approx(1.5)


@pytest.mark.parametrize(("code", "cls"), [
    (grpc.StatusCode.NOT_FOUND, NotFoundError),
    (grpc.StatusCode.ABORTED, AbortedError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.ALREADY_EXISTS, agent_sdk.AlreadyExistsError),
    (grpc.StatusCode.FAILED_PRECONDITION, agent_sdk.FailedPreconditionError),
    (grpc.StatusCode.UNAUTHENTICATED, agent_sdk.UnauthenticatedError),
    (grpc.StatusCode.PERMISSION_DENIED, agent_sdk.PermissionDeniedError),
    (grpc.StatusCode.INTERNAL, RPCError),
])
def test_rpc_error_class_by_code(code: grpc.StatusCode, cls: type[RPCError]) -> None:
    error = rpc_error_from(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                                "boom", None))
    assert type(error) is cls
    assert error.code is code
    assert error.message == "boom"
    assert error.reason == ""
    assert error.field_violations == []
    assert error.status is None


def test_rpc_error_ignores_garbled_details() -> None:
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", b"\xff\xff not a status"))
    error = rpc_error_from(grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(),
                                                trailers, "gone", None))
    assert isinstance(error, NotFoundError)
    assert error.message == "gone"
    assert error.reason == ""


def test_rpc_error_from_status_directly() -> None:
    status = status_pb2.Status(code=code_pb2.ABORTED, message="version conflict", details=[
        _packed(error_details_pb2.ErrorInfo(reason="VERSION_MISMATCH"))])
    error = AbortedError(grpc.StatusCode.ABORTED, "version conflict", status)
    assert error.reason == "VERSION_MISMATCH"


def test_handler_errors() -> None:
    assert agent_sdk.RetryableError("try later").error_type == "RetryableError"
    error = agent_sdk.NonRetryableError("bad input", "ValidationError")
    assert error.error_type == "ValidationError"
    assert error.message == "bad input"


# -------------------------------------------------------------------- conversions


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def _task_proto(**overrides: Any) -> task_pb2.Task:
    task = task_pb2.Task(
        name="tasks/t1", capability="summarize", input=encode_payload({"text": "hi"}),
        state=task_pb2.TASK_STATE_SUCCEEDED, priority=7, labels={"tenant": "a"},
        output=encode_payload(["done"]), attempt=2, agent="agents/a1",
        workflow="workflows/w1", step_id="s1", create_time=_ts(1_700_000_000),
        update_time=_ts(1_700_000_005), end_time=_ts(1_700_000_006), served_by_fallback=True,
        attempts=[
            task_pb2.TaskAttempt(attempt=1, agent="agents/a0", start_time=_ts(1_700_000_001),
                                 end_time=_ts(1_700_000_002), failure=task_pb2.TaskFailure(
                                     error_type="LEASE_EXPIRED", message="agent gone")),
            task_pb2.TaskAttempt(attempt=2, agent="agents/a1", start_time=_ts(1_700_000_003),
                                 end_time=_ts(1_700_000_006)),
        ])
    for key, value in overrides.items():
        setattr(task, key, value)
    return task


def test_task_info_conversion() -> None:
    info = task_from_proto(_task_proto())
    assert isinstance(info, TaskInfo)
    assert info.name == "tasks/t1"
    assert info.id == "t1"
    assert info.state == "SUCCEEDED"
    assert info.done
    assert info.input == {"text": "hi"}
    assert info.output == ["done"]
    assert info.failure is None
    assert info.attempt == 2
    assert info.agent == "agents/a1"
    assert info.workflow == "workflows/w1"
    assert info.step_id == "s1"
    assert info.priority == 7
    assert info.labels == {"tenant": "a"}
    assert info.served_by_fallback
    assert not info.unschedulable
    assert not info.human_intervened
    assert info.create_time == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert info.end_time is not None and info.end_time.tzinfo is UTC
    first, second = info.attempts
    assert first.failure == FailureInfo("LEASE_EXPIRED", "agent gone", False)
    assert first.agent == "agents/a0"
    assert second.failure is None
    with pytest.raises(AttributeError):
        info.state = "FAILED"  # type: ignore[misc]


def test_task_info_of_a_fresh_task() -> None:
    info = task_from_proto(task_pb2.Task(name="tasks/x", capability="c",
                                         state=task_pb2.TASK_STATE_QUEUED))
    assert info.state == "QUEUED"
    assert not info.done
    assert info.input is None
    assert info.output is None
    assert info.attempts == ()
    assert info.create_time is None
    assert info.end_time is None


@pytest.mark.parametrize("state", ["SUCCEEDED", "FAILED", "CANCELLED", "DEAD_LETTERED"])
def test_terminal_states(state: str) -> None:
    info = task_from_proto(task_pb2.Task(name="tasks/x", state=task_state_value(state)))  # type: ignore[arg-type]
    assert info.done


def test_task_failed_error_message() -> None:
    failed = task_pb2.Task(name="tasks/x", state=task_pb2.TASK_STATE_FAILED,
                           failure=task_pb2.TaskFailure(error_type="ValueError",
                                                        message="bad", non_retryable=True))
    error = TaskFailedError(task_from_proto(failed))
    assert error.task.failure == FailureInfo("ValueError", "bad", True)
    assert "tasks/x ended FAILED: ValueError: bad" in str(error)


def test_state_name_lookup() -> None:
    assert task_state_value("running") == task_pb2.TASK_STATE_RUNNING
    with pytest.raises(ValueError, match="unknown task state 'DONE'"):
        task_state_value("DONE")


def test_workflow_conversion() -> None:
    wf = task_pb2.Workflow(
        name="workflows/w1", display_name="report", state=task_pb2.WORKFLOW_STATE_FAILED,
        failure_reason="step b failed", create_time=_ts(1_700_000_000), steps=[
            task_pb2.WorkflowStep(id="a", capability="plan", task="tasks/a",
                                  state=task_pb2.TASK_STATE_SUCCEEDED,
                                  output=encode_payload({"plan": 1})),
            task_pb2.WorkflowStep(id="b", capability="write", depends_on=["a"],
                                  state=task_pb2.TASK_STATE_FAILED, unschedulable=True,
                                  failure=task_pb2.TaskFailure(error_type="E", message="m"))])
    info = workflow_from_proto(wf)
    assert info.id == "w1"
    assert info.state == "FAILED"
    assert info.done
    assert info.failure_reason == "step b failed"
    assert info.step("a").output == {"plan": 1}
    assert info.step("b").depends_on == ("a",)
    assert info.step("b").failure == FailureInfo("E", "m", False)
    assert info.step("b").unschedulable
    assert info.end_time is None
    with pytest.raises(KeyError):
        info.step("c")


def test_agent_and_entry_conversion() -> None:
    agent = agent_from_proto(discovery_pb2.Agent(
        name="agents/a1", display_name="researcher-1", max_concurrency=4,
        capabilities=[discovery_pb2.Capability(name="research", version="2")],
        state=discovery_pb2.AGENT_STATE_DRAINING, in_flight=2, load=0.5))
    assert agent.id == "a1"
    assert agent.capabilities == ("research",)
    assert agent.state == "DRAINING"
    assert agent.load == 0.5
    entry = entry_from_proto(state_pb2.StateEntry(key="k", value=encode_payload(3), version=2,
                                                  revision=9))
    assert (entry.key, entry.value, entry.version, entry.revision) == ("k", 3, 2, 9)
    assert entry.expire_time is None


# ---------------------------------------------------------------------- clients


def test_client_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="target"):
        agent_sdk.MeshClient([])
    with pytest.raises(ValueError, match="timeout"):
        agent_sdk.MeshClient(timeout=0)
    with pytest.raises(ValueError, match="max_concurrency"):
        agent_sdk.Agent("a", max_concurrency=0)


def test_sync_client_opens_and_closes_without_a_server() -> None:
    with SyncMeshClient("127.0.0.1:1", namespace="ns") as client:
        assert client.namespace == "ns"
    client.close()  # safe to repeat
    with pytest.raises(RuntimeError, match="closed"):
        client.get_task("x")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_server_is_unavailable() -> None:
    targets = [f"127.0.0.1:{_closed_port()}", f"127.0.0.1:{_closed_port()}"]
    async with agent_sdk.MeshClient(targets, timeout=2) as client:
        with pytest.raises(UnavailableError):
            await client.get_task("x")


def test_duplicate_handler_is_refused() -> None:
    agent = agent_sdk.Agent("a")

    @agent.handler("c")
    async def first(task: agent_sdk.TaskContext) -> None:
        return None

    with pytest.raises(ValueError, match="already registered"):
        agent.handler("c")(first)


def test_timestamps_convert_exactly_as_protobuf_does() -> None:
    """The SDK's own Timestamp conversion equals ToDatetime (UTC, microseconds)."""
    for seconds, nanos in ((0, 0), (1, 999_999_999), (1_765_000_000, 123_456_789),
                           (-1, 500_000_000), (-62_135_596_800, 0), (253_402_300_799, 999_999_999)):
        msg = task_pb2.TaskAttempt(start_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
        want = msg.start_time.ToDatetime(tzinfo=UTC)
        assert sdk_time(msg, "start_time") == want, (seconds, nanos)
    assert sdk_time(task_pb2.TaskAttempt(), "start_time") is None

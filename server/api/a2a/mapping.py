"""A2A <-> mesh values: task states, messages, artifacts (the table is in docs/a2a.md).

Pure conversions; the a2a-sdk protobuf types are the A2A spec's own proto.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from a2a.types import a2a_pb2
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message

from server.domain.chunks import ChunkKind, TaskChunk
from server.domain.errors import InvalidArgumentError
from server.domain.human import REJECTED, awaiting_human
from server.domain.models import Payload, Task, TaskState

S = a2a_pb2.TaskState
JSON = b"json/plain"
BINARY = b"binary/plain"
NULL = b"binary/null"
CONTEXT_LABEL = "a2a-context"
"""Task label holding the A2A context id a client gave (else the workflow or task id)."""
RESULT_ARTIFACT = "result"

STATE_TO_A2A: Mapping[TaskState, int] = {
    TaskState.PENDING: S.TASK_STATE_SUBMITTED,
    TaskState.QUEUED: S.TASK_STATE_SUBMITTED,
    TaskState.RUNNING: S.TASK_STATE_WORKING,
    TaskState.RETRYING: S.TASK_STATE_WORKING,
    TaskState.SUCCEEDED: S.TASK_STATE_COMPLETED,
    TaskState.FAILED: S.TASK_STATE_FAILED,
    TaskState.CANCELLED: S.TASK_STATE_CANCELED,
    TaskState.DEAD_LETTERED: S.TASK_STATE_FAILED,
}
"""Each agentmesh state and the A2A state it shows as (exactly docs/a2a.md's table).

Two refinements depend on more than the state: a FAILED task whose failure
is ``REJECTED`` (a person rejected it) is A2A ``rejected``, and a human task
that waits for a person (RUNNING at the desk) is A2A ``input-required``.
"""

A2A_TO_STATES: Mapping[int, frozenset[TaskState]] = {
    a: frozenset(s for s, v in STATE_TO_A2A.items() if v == a) for a in set(STATE_TO_A2A.values())}
FINAL_A2A = frozenset({S.TASK_STATE_COMPLETED, S.TASK_STATE_FAILED, S.TASK_STATE_CANCELED,
                       S.TASK_STATE_REJECTED})


def a2a_state(task: Task) -> int:
    """The A2A state of a mesh task."""
    if task.state is TaskState.FAILED and task.failure is not None \
            and task.failure.error_type == REJECTED:
        return S.TASK_STATE_REJECTED
    if awaiting_input(task):
        return S.TASK_STATE_INPUT_REQUIRED
    return STATE_TO_A2A[task.state]


def awaiting_input(task: Task) -> bool:
    """A task paused for a person (approval or input): see server/services/approvals.py."""
    return awaiting_human(task)


def is_final(state: int) -> bool:
    """Whether an A2A state is terminal (``input-required`` is not: it interrupts)."""
    return state in FINAL_A2A


# -- payloads and parts ---------------------------------------------------------------


def _finite(text: str) -> float | str:
    number = float(text)
    return number if math.isfinite(number) else text


def decode(payload: Payload) -> Any:
    """A payload's value by its encoding (JSON, None, else the bytes).

    What an agent wrote is shown, never refused: A2A's JSON has no NaN or
    Infinity (Python's json writes them, and a protobuf ``Value`` holding one
    cannot be serialized: every read of the task failed with -32603), so
    those numbers arrive as their text (``"NaN"``, ``"Infinity"``, ``"1e999"``);
    a JSON payload that does not parse arrives as its bytes.
    """
    encoding = payload.metadata.get("encoding")
    if encoding == JSON:
        try:
            return json.loads(payload.data, parse_constant=str, parse_float=_finite)
        except (ValueError, RecursionError):  # UnicodeDecodeError too; too deep
            return payload.data
    if encoding == NULL or (encoding is None and not payload.data):
        return None
    return payload.data


def json_payload(value: Any) -> Payload:
    """A JSON payload, as the SDK writes it."""
    return Payload(json.dumps(value, separators=(",", ":")).encode(), {"encoding": JSON})


def parts(value: Any) -> list[a2a_pb2.Part]:
    """A value as A2A parts: text for a string, raw for bytes, data otherwise."""
    if isinstance(value, str):
        return [a2a_pb2.Part(text=value)]
    if isinstance(value, bytes):
        return [a2a_pb2.Part(raw=value, media_type="application/octet-stream")]
    part = a2a_pb2.Part(media_type="application/json")
    part.data.CopyFrom(ParseDict(value, struct_pb2.Value()))
    return [part]


def to_dict(message: Message, field: str) -> Any:
    """A protobuf message (a Struct, a Value, a Part) as JSON values.

    A client's JSON may hold NaN or Infinity (Python's parser takes them, and
    protobuf stores them in a ``Value``) which JSON cannot carry on: refused,
    naming the field, instead of failing as an internal error.
    """
    try:
        return MessageToDict(message)
    except ValueError as exc:
        raise InvalidArgumentError.field(field, f"not valid JSON ({exc})") from None


def message_input(message: a2a_pb2.Message) -> Payload:
    """The task input of a user message.

    One data part: its value. Only text parts: their text, joined by newlines
    (a JSON string). One raw part: its bytes. Anything else: the parts as a
    list of their JSON forms.
    """
    ps = list(message.parts)
    if not ps:
        raise InvalidArgumentError.field("message.parts", "at least one part")
    if len(ps) == 1 and ps[0].HasField("data"):
        return json_payload(to_dict(ps[0].data, "message.parts[0].data"))
    if all(p.WhichOneof("content") == "text" for p in ps):
        return json_payload("\n".join(p.text for p in ps))
    if len(ps) == 1 and ps[0].WhichOneof("content") == "raw":
        return Payload(ps[0].raw, {"encoding": BINARY})
    return json_payload([to_dict(p, f"message.parts[{i}]") for i, p in enumerate(ps)])


def _ts(seconds: float) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def context_id(task: Task) -> str:
    """The A2A context of a mesh task: the client's, else its workflow's, else its own id."""
    return task.labels.get(CONTEXT_LABEL) or task.workflow_id or task.id


def status(task: Task, note: str = "") -> a2a_pb2.TaskStatus:
    """The A2A status of a task; the message says why it failed, or ``note``."""
    out = a2a_pb2.TaskStatus(state=a2a_state(task),  # type: ignore[arg-type]
                             timestamp=_ts(task.update_time))
    text = note
    if not text and task.failure is not None and task.state.terminal:
        text = f"{task.failure.error_type}: {task.failure.message}"
    if not text and awaiting_input(task):
        text = "waiting for a person: approve, reject or supply input"
    if not text and task.state is TaskState.RETRYING:
        text = f"retrying (attempt {task.attempt} failed)"
    if text:
        out.message.CopyFrom(a2a_pb2.Message(
            message_id=f"{task.id}-{task.state.name.lower()}-{task.attempt}",
            context_id=context_id(task), task_id=task.id, role=a2a_pb2.Role.ROLE_AGENT,
            parts=[a2a_pb2.Part(text=text)]))
    return out


def metadata(task: Task) -> struct_pb2.Struct:
    """What A2A has no field for: the exact mesh state, attempt, capability, agent."""
    meta = struct_pb2.Struct()
    meta.update({"agentmesh": {"state": task.state.name, "attempt": task.attempt,
                               "capability": task.capability,
                               "agent": f"agents/{task.agent_id}" if task.agent_id else "",
                               "workflow": f"workflows/{task.workflow_id}"
                               if task.workflow_id else "",
                               "step": task.step_id}})
    return meta


def artifact_id(chunk: TaskChunk) -> str:
    """One artifact per (name, attempt): a retried attempt streams a fresh one."""
    name = chunk.draft.artifact
    return name if chunk.attempt <= 1 else f"{name}-attempt-{chunk.attempt}"


def chunk_parts(chunk: TaskChunk) -> list[a2a_pb2.Part]:
    """The parts of a TEXT or ARTIFACT chunk."""
    if chunk.draft.kind is ChunkKind.TEXT:
        return [a2a_pb2.Part(text=chunk.draft.text)]
    return parts(decode(chunk.draft.data))


def artifacts(task: Task, chunks: Iterable[TaskChunk]) -> list[a2a_pb2.Artifact]:
    """The task's artifacts: its streamed ones assembled, then its result (when it succeeded)."""
    out: dict[str, a2a_pb2.Artifact] = {}
    for chunk in chunks:
        if chunk.draft.kind is ChunkKind.PROGRESS:
            continue
        key = artifact_id(chunk)
        art = out.get(key)
        if art is None:
            art = out[key] = a2a_pb2.Artifact(artifact_id=key, name=chunk.draft.artifact)
        art.parts.extend(chunk_parts(chunk))
    if task.state is TaskState.SUCCEEDED and task.output is not None:
        out[RESULT_ARTIFACT] = result_artifact(task)
    return list(out.values())


def result_artifact(task: Task) -> a2a_pb2.Artifact:
    """The task's output as the ``result`` artifact."""
    return a2a_pb2.Artifact(artifact_id=RESULT_ARTIFACT, name=RESULT_ARTIFACT,
                            parts=parts(decode(task.output or Payload())))


def a2a_task(task: Task, chunks: Iterable[TaskChunk] = ()) -> a2a_pb2.Task:
    """The A2A view of a mesh task."""
    return a2a_pb2.Task(id=task.id, context_id=context_id(task), status=status(task),
                        artifacts=artifacts(task, chunks), metadata=metadata(task))


def status_event(task: Task, note: str = "") -> a2a_pb2.TaskStatusUpdateEvent:
    """A status-update event."""
    return a2a_pb2.TaskStatusUpdateEvent(task_id=task.id, context_id=context_id(task),
                                         status=status(task, note))


def chunk_event(task: Task, chunk: TaskChunk, *,
                append: bool) -> a2a_pb2.TaskArtifactUpdateEvent:
    """An artifact-update event of a TEXT or ARTIFACT chunk (sequence in its metadata)."""
    meta = struct_pb2.Struct()
    meta.update({"agentmesh": {"sequence": chunk.seq, "attempt": chunk.attempt}})
    return a2a_pb2.TaskArtifactUpdateEvent(
        task_id=task.id, context_id=context_id(task),
        artifact=a2a_pb2.Artifact(artifact_id=artifact_id(chunk), name=chunk.draft.artifact,
                                  parts=chunk_parts(chunk)),
        append=append, last_chunk=chunk.draft.last, metadata=meta)


def result_event(task: Task) -> a2a_pb2.TaskArtifactUpdateEvent:
    """The artifact-update event carrying the task's result."""
    return a2a_pb2.TaskArtifactUpdateEvent(
        task_id=task.id, context_id=context_id(task), artifact=result_artifact(task),
        append=False, last_chunk=True)

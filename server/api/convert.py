"""Proto <-> domain conversion, with the validation of every inbound field.

Nothing outside ``server/api`` sees a protobuf message. Every check raises
InvalidArgumentError naming the field (``task.priority``), which the error
mapping turns into INVALID_ARGUMENT with BadRequest field violations.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agentmesh.v1 import (
    bus_pb2,
    common_pb2,
    discovery_pb2,
    state_pb2,
    task_pb2,
)
from google.protobuf import duration_pb2, timestamp_pb2

from server.domain.errors import FieldViolation, InvalidArgumentError, ResourceExhaustedError
from server.domain.models import (
    DEFAULT_NAMESPACE,
    DEFAULT_RETRY_POLICY,
    Agent,
    AgentState,
    Capability,
    Jitter,
    Payload,
    RetryPolicy,
    StateEntry,
    Task,
    TaskAttempt,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowState,
    WorkflowStep,
)

NAMESPACE_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
CAPABILITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,199}$")
SUBJECT_RE = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")
PATTERN_RE = re.compile(r"^(?:[A-Za-z0-9_-]+|\*)(?:\.(?:[A-Za-z0-9_-]+|\*))*(?:\.>)?$|^>$")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Limits:
    """Input limits (from settings)."""

    max_payload_bytes: int = 1 << 20
    max_labels: int = 64
    max_label_bytes: int = 256
    max_key_bytes: int = 512
    max_request_id_bytes: int = 128
    max_attempts: int = 100
    max_watch_pending: int = 10_000
    """Events buffered per watch stream before the watcher is cut off (RESOURCE_EXHAUSTED)."""


def _bad(field: str, description: str) -> InvalidArgumentError:
    return InvalidArgumentError.field(field, description)


_CONTROL_RE = re.compile("[\x00-\x1f\ud800-\udfff]")


def _text(value: str, field: str, max_bytes: int) -> str:
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise _bad(field, f"at most {max_bytes} bytes")
    if _CONTROL_RE.search(value):
        raise _bad(field, "control characters are not allowed")
    return value


def namespace(value: str, field: str = "namespace") -> str:
    """A namespace, "default" when empty."""
    if not value:
        return DEFAULT_NAMESPACE
    if not NAMESPACE_RE.match(value):
        raise _bad(field, "must be 1-63 lowercase letters, digits or '-'")
    return value


def capability(value: str, field: str, *, required: bool = True) -> str:
    """A capability name."""
    if not value:
        if required:
            raise _bad(field, "required")
        return ""
    if not CAPABILITY_RE.match(value):
        raise _bad(field, "must be 1-128 letters, digits or '_.:/-', starting alphanumeric")
    return value


def resource_id(name: str, collection: str, field: str = "name") -> str:
    """The id in "{collection}/{id}"; a bare id is accepted too."""
    if not name:
        raise _bad(field, f"required ({collection}/{{id}})")
    prefix = collection + "/"
    rid = name[len(prefix):] if name.startswith(prefix) else name
    if not ID_RE.match(rid):
        raise _bad(field, f"must be {collection}/{{id}} with an id of letters, digits, '-', '_'")
    return rid


def optional_id(value: str, field: str) -> str:
    """A client-chosen id or ""."""
    if value and not ID_RE.match(value):
        raise _bad(field, "must be letters, digits, '-' or '_' (at most 200)")
    return value


def request_id(value: str, limits: Limits, field: str = "request_id") -> str:
    """An idempotency key."""
    return _text(value, field, limits.max_request_id_bytes)


def labels(value: Mapping[str, str], field: str, limits: Limits) -> dict[str, str]:
    """Labels within limits."""
    if len(value) > limits.max_labels:
        raise _bad(field, f"at most {limits.max_labels} labels")
    for k, v in value.items():
        if not k:
            raise _bad(field, "label keys must not be empty")
        _text(k, f"{field}[{k!r}]", limits.max_label_bytes)
        _text(v, f"{field}[{k!r}]", limits.max_label_bytes)
    return dict(value)


def page_size(value: int) -> int:
    """AIP-158: 0 means the default, too large is lowered, negative is refused."""
    if value < 0:
        raise _bad("page_size", "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(cursor: str | int, filter_key: str) -> str:
    """An opaque token for a keyset cursor, bound to the request's filter."""
    body = {"c": cursor, "f": hashlib.sha256(filter_key.encode()).hexdigest()[:16]}
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def decode_page_token(token: str, filter_key: str) -> str | int | None:
    """The cursor of a token made by encode_page_token; None for an empty token."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        cursor = body["c"]
        fingerprint = body["f"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _bad("page_token", "not a token returned by this API") from exc
    if fingerprint != hashlib.sha256(filter_key.encode()).hexdigest()[:16]:
        raise _bad("page_token", "was issued for a different filter")
    if not isinstance(cursor, str | int):
        raise _bad("page_token", "not a token returned by this API")
    return cursor


def duration(value: duration_pb2.Duration, field: str) -> float:
    """Seconds of a non-negative duration."""
    if not value.seconds and not value.nanos:
        return 0.0
    if value.seconds < 0 or value.nanos < 0:
        raise _bad(field, "must not be negative")
    if not 0 <= value.nanos < 1_000_000_000:
        raise _bad(field, "nanos out of range")
    if value.seconds > 10 * 365 * 86400:
        raise _bad(field, "too long")
    return value.seconds + value.nanos / 1e9


def to_duration(seconds: float) -> duration_pb2.Duration:
    """A Duration message."""
    if not seconds:
        return duration_pb2.Duration()
    nanos = round(seconds * 1e9)
    return duration_pb2.Duration(seconds=int(nanos // 1_000_000_000),
                                 nanos=int(nanos % 1_000_000_000))


def to_timestamp(seconds: float) -> timestamp_pb2.Timestamp | None:
    """A Timestamp message, None for 0."""
    if not seconds:
        return None
    nanos = round(seconds * 1e9)
    return timestamp_pb2.Timestamp(seconds=int(nanos // 1_000_000_000),
                                   nanos=int(nanos % 1_000_000_000))


# -- payloads ----------------------------------------------------------------------

def payload(msg: common_pb2.Payload, field: str, limits: Limits) -> Payload:
    """A payload within the size limit (RESOURCE_EXHAUSTED past it).

    The size is the encoded size (data, metadata and their framing), computed
    in C by protobuf.
    """
    size = msg.ByteSize()
    if size > limits.max_payload_bytes:
        raise ResourceExhaustedError(
            f"{field} is {size} bytes; the limit is {limits.max_payload_bytes}",
            reason="PAYLOAD_TOO_LARGE")
    return Payload(bytes(msg.data), dict(msg.metadata))


def payload_msg(value: Payload) -> common_pb2.Payload:
    """A Payload message."""
    return common_pb2.Payload(data=value.data, metadata=dict(value.metadata))


# -- retry policy ------------------------------------------------------------------

def retry_policy(msg: common_pb2.RetryPolicy, field: str, limits: Limits,
                 default: RetryPolicy = DEFAULT_RETRY_POLICY) -> RetryPolicy:
    """A retry policy; unset fields take the defaults."""
    if not msg.ByteSize():
        return default
    violations: list[FieldViolation] = []
    if msg.max_attempts < 0 or msg.max_attempts > limits.max_attempts:
        violations.append(FieldViolation(f"{field}.max_attempts",
                                         f"must be 0..{limits.max_attempts}"))
    mult = msg.backoff_multiplier
    if math.isnan(mult) or math.isinf(mult) or (mult != 0 and not 1.0 <= mult <= 100.0):
        violations.append(FieldViolation(f"{field}.backoff_multiplier",
                                         "must be 0 (default) or 1..100"))
    if msg.jitter not in (0, 1, 2):
        violations.append(FieldViolation(f"{field}.jitter", "unknown jitter mode"))
    if violations:
        raise InvalidArgumentError(violations[0].field + ": " + violations[0].description,
                                   violations)
    initial = duration(msg.initial_backoff, f"{field}.initial_backoff")
    maximum = duration(msg.max_backoff, f"{field}.max_backoff")
    return RetryPolicy(
        max_attempts=msg.max_attempts or default.max_attempts,
        initial_backoff=initial or default.initial_backoff,
        max_backoff=maximum or default.max_backoff,
        multiplier=mult or default.multiplier,
        jitter=Jitter.NONE if msg.jitter == 2 else Jitter.FULL,
        non_retryable_error_types=tuple(
            _text(t, f"{field}.non_retryable_error_types", 128)
            for t in msg.non_retryable_error_types),
    )


@functools.lru_cache(maxsize=256)
def retry_policy_to_proto(policy: RetryPolicy) -> common_pb2.RetryPolicy:
    """A RetryPolicy message (cached: policies are few and immutable; callers copy it)."""
    return common_pb2.RetryPolicy(
        max_attempts=policy.max_attempts, initial_backoff=to_duration(policy.initial_backoff),
        max_backoff=to_duration(policy.max_backoff), backoff_multiplier=policy.multiplier,
        jitter=(common_pb2.BACKOFF_JITTER_NONE if policy.jitter is Jitter.NONE
                else common_pb2.BACKOFF_JITTER_FULL),
        non_retryable_error_types=list(policy.non_retryable_error_types))


# -- tasks -------------------------------------------------------------------------

def priority(value: int, field: str) -> int:
    """A priority in -1000..1000."""
    if not -1000 <= value <= 1000:
        raise _bad(field, "must be -1000..1000")
    return value


def task_from_submit(req: task_pb2.SubmitTaskRequest, limits: Limits,
                     trace_context: Mapping[str, str]) -> Task:
    """The task of a SubmitTask request."""
    if not req.HasField("task"):
        raise _bad("task", "required")
    t = req.task
    return Task(
        id=optional_id(req.task_id, "task_id"),
        capability=capability(t.capability, "task.capability"),
        namespace=namespace(t.namespace, "task.namespace"),
        input=payload(t.input, "task.input", limits),
        priority=priority(t.priority, "task.priority"),
        labels=labels(t.labels, "task.labels", limits) if t.labels else {},
        retry_policy=retry_policy(t.retry_policy, "task.retry_policy", limits),
        execution_timeout=duration(t.execution_timeout, "task.execution_timeout"),
        fallback_capability=capability(t.fallback_capability, "task.fallback_capability",
                                       required=False),
        # A batch's tasks share the call's context mapping (never mutated).
        trace_context=dict(t.trace_context) if t.trace_context else trace_context,
        schedule_to_start_timeout=duration(t.schedule_to_start_timeout,
                                           "task.schedule_to_start_timeout"),
        heartbeat_timeout=duration(t.heartbeat_timeout, "task.heartbeat_timeout"),
    )


def failure(msg: task_pb2.TaskFailure, field: str) -> TaskFailure:
    """A reported failure."""
    return TaskFailure(
        error_type=_text(msg.error_type or "Error", f"{field}.error_type", 256),
        message=msg.message[:4096], non_retryable=msg.non_retryable)


def failure_to_proto(value: TaskFailure | None) -> task_pb2.TaskFailure | None:
    """A TaskFailure message, None when absent."""
    return None if value is None else failure_msg(value)


def failure_msg(value: TaskFailure) -> task_pb2.TaskFailure:
    """A TaskFailure message."""
    return task_pb2.TaskFailure(error_type=value.error_type, message=value.message,
                                non_retryable=value.non_retryable)


def _attempt_to_proto(a: TaskAttempt) -> task_pb2.TaskAttempt:
    return task_pb2.TaskAttempt(
        attempt=a.attempt, agent=f"agents/{a.agent_id}" if a.agent_id else "",
        start_time=to_timestamp(a.start_time), end_time=to_timestamp(a.end_time or 0.0),
        failure=failure_to_proto(a.failure))


def task_to_proto(task: Task, *, live: frozenset[str] | None = None,
                  with_payloads: bool = True) -> task_pb2.Task:
    """A Task message; ``live`` (capabilities with live agents) sets ``unschedulable``.

    Only fields that differ from their defaults are set (the hot path of
    submit responses and watch streams); the message is the same either way.
    """
    state = task.state
    kw: dict[str, Any] = {
        "name": f"tasks/{task.id}", "capability": task.capability, "state": int(state),
        "namespace": task.namespace, "attempt": task.attempt,
        "retry_policy": retry_policy_to_proto(task.retry_policy),
        "create_time": to_timestamp(task.create_time),
        "update_time": to_timestamp(task.update_time),
    }
    if live is not None and state in _WAITING_STATES:
        kw["unschedulable"] = task.capability not in live and (
            not task.fallback_capability or task.fallback_capability not in live)
    if task.priority:
        kw["priority"] = task.priority
    if task.execution_timeout:
        kw["execution_timeout"] = to_duration(task.execution_timeout)
    if task.fallback_capability:
        kw["fallback_capability"] = task.fallback_capability
    if task.failure is not None:
        kw["failure"] = failure_msg(task.failure)
    if task.agent_id:
        kw["agent"] = f"agents/{task.agent_id}"
    if task.workflow_id:
        kw["workflow"] = f"workflows/{task.workflow_id}"
        kw["step_id"] = task.step_id
    if task.start_time:
        kw["start_time"] = to_timestamp(task.start_time)
    if task.end_time:
        kw["end_time"] = to_timestamp(task.end_time)
    if task.served_by_fallback:
        kw["served_by_fallback"] = True
    if task.attempts:
        kw["attempts"] = [_attempt_to_proto(a) for a in task.attempts]
    if task.human_intervened:
        kw["human_intervened"] = True
    if state is TaskState.RETRYING:
        kw["retry_time"] = to_timestamp(task.retry_time)
    if task.schedule_to_start_timeout:
        kw["schedule_to_start_timeout"] = to_duration(task.schedule_to_start_timeout)
    if task.heartbeat_timeout:
        kw["heartbeat_timeout"] = to_duration(task.heartbeat_timeout)
    if with_payloads:
        kw["input"] = payload_msg(task.input)
        if task.output is not None:
            kw["output"] = payload_msg(task.output)
        if task.dependency_outputs:
            kw["dependency_outputs"] = {step_id: payload_msg(out)
                                        for step_id, out in task.dependency_outputs.items()}
    msg = task_pb2.Task(**kw)
    _set_maps(msg, task)
    return msg


def _set_maps(msg: task_pb2.Task, task: Task) -> None:
    """Copy labels and trace context item by item: protobuf's map kwargs and
    ``map.update()`` take a slower path (measured)."""
    if task.labels:
        labels = msg.labels
        for k, v in task.labels.items():
            labels[k] = v
    if task.trace_context:
        trace = msg.trace_context
        for k, v in task.trace_context.items():
            trace[k] = v


_WAITING_STATES = frozenset({TaskState.QUEUED, TaskState.PENDING, TaskState.RETRYING})


def task_for_agent(task: Task) -> task_pb2.Task:
    """The task as an agent receives it: what the handler needs, no history."""
    msg = task_pb2.Task(
        name=f"tasks/{task.id}", capability=task.capability, state=task_pb2.TASK_STATE_RUNNING,
        priority=task.priority, attempt=task.attempt, namespace=task.namespace,
        workflow=f"workflows/{task.workflow_id}" if task.workflow_id else "",
        step_id=task.step_id, input=payload_msg(task.input))
    _set_maps(msg, task)
    if task.execution_timeout:
        msg.execution_timeout.CopyFrom(to_duration(task.execution_timeout))
    for step_id, out in task.dependency_outputs.items():
        msg.dependency_outputs[step_id].CopyFrom(payload_msg(out))
    return msg


def task_state(value: int, field: str = "state") -> TaskState | None:
    """A task-state filter (UNSPECIFIED means any)."""
    if value == 0:
        return None
    try:
        return TaskState(value)
    except ValueError as exc:
        raise _bad(field, f"unknown task state {value}") from exc


def workflow_state(value: int, field: str = "state") -> WorkflowState | None:
    """A workflow-state filter (UNSPECIFIED means any)."""
    if value == 0:
        return None
    try:
        return WorkflowState(value)
    except ValueError as exc:
        raise _bad(field, f"unknown workflow state {value}") from exc


# -- workflows ---------------------------------------------------------------------

def workflow_from_submit(req: task_pb2.SubmitWorkflowRequest, limits: Limits,
                         trace_context: Mapping[str, str]) -> Workflow:
    """The workflow of a SubmitWorkflow request (the DAG is validated by the service)."""
    if not req.HasField("workflow"):
        raise _bad("workflow", "required")
    w = req.workflow
    steps: list[WorkflowStep] = []
    for i, s in enumerate(w.steps):
        f = f"workflow.steps[{i}]"
        steps.append(WorkflowStep(
            id=s.id, capability=capability(s.capability, f"{f}.capability"),
            input=payload(s.input, f"{f}.input", limits), depends_on=tuple(s.depends_on),
            retry_policy=retry_policy(s.retry_policy, f"{f}.retry_policy", limits),
            timeout=duration(s.timeout, f"{f}.timeout"),
            fallback_capability=capability(s.fallback_capability, f"{f}.fallback_capability",
                                           required=False),
            priority=priority(s.priority, f"{f}.priority"),
            schedule_to_start_timeout=duration(s.schedule_to_start_timeout,
                                               f"{f}.schedule_to_start_timeout"),
            heartbeat_timeout=duration(s.heartbeat_timeout, f"{f}.heartbeat_timeout")))
    return Workflow(
        id=optional_id(req.workflow_id, "workflow_id"),
        namespace=namespace(w.namespace, "workflow.namespace"),
        display_name=_text(w.display_name, "workflow.display_name", 256),
        steps=tuple(steps), labels=labels(w.labels, "workflow.labels", limits),
        trace_context=dict(trace_context))


def workflow_to_proto(wf: Workflow, steps: Mapping[str, Task] | None = None, *,
                      live: frozenset[str] | None = None) -> task_pb2.Workflow:
    """A Workflow message with each step's current task state."""
    msg = task_pb2.Workflow(
        name=f"workflows/{wf.id}", display_name=wf.display_name, state=int(wf.state),  # type: ignore[arg-type]
        failure_reason=wf.failure_reason, namespace=wf.namespace, labels=dict(wf.labels),
        create_time=to_timestamp(wf.create_time), end_time=to_timestamp(wf.end_time))
    for s in wf.steps:
        step = msg.steps.add(
            id=s.id, capability=s.capability, depends_on=list(s.depends_on),
            retry_policy=retry_policy_to_proto(s.retry_policy), timeout=to_duration(s.timeout),
            fallback_capability=s.fallback_capability, priority=s.priority,
            task=f"tasks/{wf.step_tasks.get(s.id, '')}",
            schedule_to_start_timeout=to_duration(s.schedule_to_start_timeout),
            heartbeat_timeout=to_duration(s.heartbeat_timeout))
        step.input.CopyFrom(payload_msg(s.input))
        task = (steps or {}).get(s.id)
        if task is not None:
            step.state = int(task.state)  # type: ignore[assignment]
            step.served_by_fallback = task.served_by_fallback
            if task.output is not None:
                step.output.CopyFrom(payload_msg(task.output))
            if task.failure is not None:
                step.failure.CopyFrom(failure_msg(task.failure))
            if live is not None:
                step.unschedulable = task_to_proto(task, live=live,
                                                   with_payloads=False).unschedulable
    return msg


# -- agents ------------------------------------------------------------------------

def agent_from_register(req: discovery_pb2.RegisterAgentRequest, limits: Limits) -> Agent:
    """The agent card of a RegisterAgent request."""
    if not req.HasField("agent"):
        raise _bad("agent", "required")
    a = req.agent
    if not a.display_name:
        raise _bad("agent.display_name", "required")
    if not a.capabilities:
        raise _bad("agent.capabilities", "at least one capability is required")
    if len(a.capabilities) > 256:
        raise _bad("agent.capabilities", "at most 256 capabilities")
    if not 1 <= a.max_concurrency <= 10_000:
        raise _bad("agent.max_concurrency", "must be 1..10000")
    caps = tuple(
        Capability(capability(c.name, f"agent.capabilities[{i}].name"),
                   _text(c.version, f"agent.capabilities[{i}].version", 64))
        for i, c in enumerate(a.capabilities))
    return Agent(
        id="", display_name=_text(a.display_name, "agent.display_name", 128),
        namespace=namespace(a.namespace, "agent.namespace"), capabilities=caps,
        max_concurrency=a.max_concurrency, labels=labels(a.labels, "agent.labels", limits),
        version=_text(a.version, "agent.version", 64))


def agent_to_proto(agent: Agent) -> discovery_pb2.Agent:
    """An Agent message (never the session token)."""
    return discovery_pb2.Agent(
        name=f"agents/{agent.id}", display_name=agent.display_name,
        capabilities=[discovery_pb2.Capability(name=c.name, version=c.version)
                      for c in agent.capabilities],
        max_concurrency=agent.max_concurrency, labels=dict(agent.labels),
        version=agent.version, state=int(agent.state),  # type: ignore[arg-type]
        in_flight=agent.in_flight, load=agent.load,
        register_time=to_timestamp(agent.register_time),
        heartbeat_time=to_timestamp(agent.heartbeat_time), namespace=agent.namespace)


def agent_state(value: int, field: str = "state") -> AgentState | None:
    """An agent-state filter (UNSPECIFIED means live)."""
    if value == 0:
        return None
    try:
        return AgentState(value)
    except ValueError as exc:
        raise _bad(field, f"unknown agent state {value}") from exc


# -- state -------------------------------------------------------------------------

def state_key(value: str, limits: Limits, field: str = "key") -> str:
    """A state key: printable, not empty, within the size limit."""
    if not value:
        raise _bad(field, "required")
    return _text(value, field, limits.max_key_bytes)


def state_prefix(value: str, limits: Limits, field: str = "prefix") -> str:
    """A key prefix (may be empty)."""
    return _text(value, field, limits.max_key_bytes)


def entry_to_proto(entry: StateEntry, *, with_value: bool = True) -> state_pb2.StateEntry:
    """A StateEntry message."""
    msg = state_pb2.StateEntry(
        key=entry.key, version=entry.version, revision=entry.revision,
        update_time=to_timestamp(entry.update_time),
        expire_time=to_timestamp(entry.expire_time))
    if with_value:
        msg.value.CopyFrom(payload_msg(entry.value))
    return msg


# -- bus ---------------------------------------------------------------------------

def subject(value: str, field: str = "message.subject") -> str:
    """A concrete subject."""
    if not value or len(value) > 256 or not SUBJECT_RE.match(value):
        raise _bad(field, "must be dot-separated tokens of letters, digits, '_' or '-'")
    return value


def subject_pattern(value: str, field: str = "subject") -> str:
    """A subscription pattern with '*' and a trailing '>'."""
    if not value or len(value) > 256 or not PATTERN_RE.match(value):
        raise _bad(field, "must be dot-separated tokens; '*' matches one token, "
                          "a trailing '>' the rest")
    return value


def headers(value: Mapping[str, str], limits: Limits,
            field: str = "message.headers") -> dict[str, str]:
    """Message headers within limits."""
    return labels(value, field, limits)


def bus_message_to_proto(subj: str, data: bytes, hdrs: Mapping[str, str],
                         publish_time: float) -> bus_pb2.BusMessage:
    """A BusMessage; the payload metadata travels in the headers."""
    meta = {k[len("payload-"):]: v.encode() for k, v in hdrs.items()
            if k.startswith("payload-")}
    plain = {k: v for k, v in hdrs.items() if not k.startswith("payload-")}
    return bus_pb2.BusMessage(subject=subj, payload=common_pb2.Payload(data=data, metadata=meta),
                              headers=plain, publish_time=to_timestamp(publish_time))


def payload_headers(value: Payload) -> dict[str, str]:
    """Payload metadata as bus headers (bytes decoded leniently)."""
    return {"payload-" + k: v.decode("utf-8", "replace") for k, v in value.metadata.items()}


def names(values: Iterable[str], collection: str, field: str) -> frozenset[str]:
    """Ids of a list of resource names."""
    return frozenset(resource_id(v, collection, f"{field}[{i}]") for i, v in enumerate(values))


def any_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict copy."""
    return dict(value)

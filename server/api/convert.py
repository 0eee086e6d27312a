"""Proto <-> domain conversion, with the validation of every inbound field.

Nothing outside ``server/api`` sees a protobuf message. Every check raises
InvalidArgumentError naming the field (``task.priority``), which the error
mapping turns into INVALID_ARGUMENT with BadRequest field violations.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, cast, overload

from agentmesh.v1 import (
    bus_pb2,
    common_pb2,
    discovery_pb2,
    state_pb2,
    task_pb2,
)
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from server.api.a2a.cards import parse_card
from server.domain.chunks import DEFAULT_ARTIFACT, ChunkDraft, ChunkKind, TaskChunk
from server.domain.errors import FieldViolation, InvalidArgumentError, ResourceExhaustedError
from server.domain.human import is_human
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
from server.ports import TaskFilter

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
    max_message_bytes: int = 4 << 20
    """Largest message sent or received (``Settings.max_message_bytes``)."""
    max_labels: int = 64
    max_label_bytes: int = 256
    max_key_bytes: int = 512
    max_request_id_bytes: int = 128
    max_attempts: int = 100
    max_watch_pending: int = 10_000
    """Events buffered per watch stream before the watcher is cut off (RESOURCE_EXHAUSTED)."""


MAX_LABELS = 64
"""Entries of a labels or headers map (``Limits.max_labels`` may be lower, not higher)."""
MAX_TRACE_ENTRIES = 8
MAX_TRACE_KEY_BYTES = 64
MAX_TRACE_VALUE_BYTES = 1024
"""A W3C ``traceparent`` is 55 bytes and ``tracestate`` should stay within 512."""
MAX_PAYLOAD_METADATA = 64
MAX_PAYLOAD_METADATA_KEY_BYTES = 256
MAX_WORKFLOW_STEPS = 10_000
"""Hard ceiling of ``Settings.max_workflow_steps`` (which the scheduler enforces)."""
MAX_BATCH = 1000
"""Requests of one BatchSubmitTasks, names of one WatchTasks, reports of one batch."""
MAX_DELIVERY_IDS = 10_000
"""Ids of one DurableAck (the most a durable stream may have in flight)."""

REPEATED_BOUNDS: dict[str, int] = {
    "agentmesh.v1.Payload.metadata": MAX_PAYLOAD_METADATA,
    "agentmesh.v1.RetryPolicy.non_retryable_error_types": 64,
    "agentmesh.v1.BusMessage.headers": MAX_LABELS,
    "agentmesh.v1.DurableAck.delivery_ids": MAX_DELIVERY_IDS,
    "agentmesh.v1.Agent.capabilities": 256,
    "agentmesh.v1.Capability.tags": 32,
    "agentmesh.v1.Capability.examples": 16,
    "agentmesh.v1.Agent.labels": MAX_LABELS,
    "agentmesh.v1.ListAgentsRequest.labels": MAX_LABELS,
    "agentmesh.v1.ListTasksRequest.labels": MAX_LABELS,
    "agentmesh.v1.TaskSelector.labels": MAX_LABELS,
    "agentmesh.v1.Task.labels": MAX_LABELS,
    "agentmesh.v1.Task.trace_context": MAX_TRACE_ENTRIES,
    # Output-only fields of Task, ignored on submit (a client may send back a Task
    # it read): bounded by what the server itself would ever put there.
    "agentmesh.v1.Task.attempts": 100,
    "agentmesh.v1.Task.dependency_outputs": MAX_WORKFLOW_STEPS,
    "agentmesh.v1.BatchSubmitTasksRequest.requests": MAX_BATCH,
    "agentmesh.v1.WatchTasksRequest.names": MAX_BATCH,
    "agentmesh.v1.WatchTasksRequest.states": 16,
    "agentmesh.v1.Workflow.steps": MAX_WORKFLOW_STEPS,
    "agentmesh.v1.Workflow.labels": MAX_LABELS,
    "agentmesh.v1.WorkflowStep.depends_on": MAX_WORKFLOW_STEPS,
    "agentmesh.v1.TaskReportBatch.results": MAX_BATCH,
    "agentmesh.v1.TaskReportBatch.failures": MAX_BATCH,
    "agentmesh.v1.TaskChunkBatch.chunks": MAX_BATCH,
    "agentmesh.v1.AppendTaskChunksRequest.chunks": MAX_BATCH,
}
"""Most entries of every repeated and map field a request can carry, by field.

Checked for every request of every RPC before a servicer sees it
(``count_violation``, called by the deserializer in ``handlers.py``), so a
list or map past its bound is INVALID_ARGUMENT naming it, whatever RPC it came
in. Sizes of the entries are checked where they are stored (``labels``,
``trace_context``, ``payload``...). A field missing here (a new proto field)
gets ``DEFAULT_REPEATED_BOUND``; a test lists every reachable field, so the
table must grow with the protos.
"""
DEFAULT_REPEATED_BOUND = 1000


def _short(key: object) -> str:
    """A map key for a field path, cut so an error stays small."""
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


_MAP, _LIST, _MESSAGE = 0, 1, 2
_Rules = tuple[tuple[str, int, int, bool], ...]
"""Per field: name, kind, bound, and whether its messages need walking too."""
_RULES: dict[str, _Rules] = {}


def _rules(desc: Descriptor) -> _Rules:
    """The fields of ``desc`` that hold (or lead to) a bounded repeated field."""
    rules = _RULES.get(desc.full_name)
    if rules is not None:
        return rules
    _RULES[desc.full_name] = ()  # a recursive message type (none yet) ends here
    found: list[tuple[str, int, int, bool]] = []
    for f in desc.fields:
        sub = f.message_type
        is_map = sub is not None and sub.GetOptions().map_entry
        if sub is not None and is_map:
            sub = sub.fields_by_name["value"].message_type
        deep = sub is not None and bool(_rules(sub))
        if f.is_repeated:
            found.append((f.name, _MAP if is_map else _LIST,
                          REPEATED_BOUNDS.get(f.full_name, DEFAULT_REPEATED_BOUND), deep))
        elif deep:
            found.append((f.name, _MESSAGE, 0, True))
    _RULES[desc.full_name] = rules = tuple(found)
    return rules


_BY_TYPE: dict[type[Message], _Rules] = {}


def count_violation(msg: Message) -> FieldViolation | None:
    """The first repeated or map field of ``msg`` (at any depth) past its bound."""
    found = _walk(msg)
    if found is None:
        return None
    path, description = found
    return FieldViolation("".join(reversed(path)), description)


def _walk(msg: Message) -> tuple[list[str], str] | None:
    """(path parts, innermost first; description) of the first field past its bound."""
    rules = _BY_TYPE.get(type(msg))
    if rules is None:
        rules = _BY_TYPE[type(msg)] = _rules(cast(Descriptor, msg.DESCRIPTOR))
    for name, kind, bound, deep in rules:
        if kind == _MESSAGE:
            if msg.HasField(name):
                found = _walk(getattr(msg, name))
                if found is not None:
                    found[0].append(name + ".")
                    return found
            continue
        value = getattr(msg, name)
        if len(value) > bound:
            return [name], f"at most {bound} entries (got {len(value)})"
        if deep and value:
            items = value.items() if kind == _MAP else enumerate(value)
            for key, item in items:
                found = _walk(item)
                if found is not None:
                    where = _short(key) if kind == _MAP else str(key)
                    found[0].append(f"{name}[{where}].")
                    return found
    return None


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
        _text(k, f"{field}[{_short(k)}]", limits.max_label_bytes)
        _text(v, f"{field}[{_short(k)}]", limits.max_label_bytes)
    return dict(value)


def trace_context_field(value: Mapping[str, str], field: str) -> dict[str, str]:
    """A trace context given in the request: within the entry and size bounds."""
    if len(value) > MAX_TRACE_ENTRIES:
        raise _bad(field, f"at most {MAX_TRACE_ENTRIES} entries")
    for k, v in value.items():
        if not k:
            raise _bad(field, "keys must not be empty")
        _text(k, f"{field}[{_short(k)}]", MAX_TRACE_KEY_BYTES)
        _text(v, f"{field}[{_short(k)}]", MAX_TRACE_VALUE_BYTES)
    return dict(value)


def call_trace_context(value: Mapping[str, str]) -> Mapping[str, str]:
    """The call's own trace context (metadata), without entries past the bounds.

    A tracer's header is not a request field: an oversized one is dropped, as
    W3C asks of a tracestate it cannot handle, rather than failing the call.
    """
    if all(len(v) <= MAX_TRACE_VALUE_BYTES for v in value.values()):
        return value
    return {k: v for k, v in value.items() if len(v) <= MAX_TRACE_VALUE_BYTES}


def page_size(value: int) -> int:
    """AIP-158: 0 means the default, too large is lowered, negative is refused."""
    if value < 0:
        raise _bad("page_size", "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class Cursor(enum.Enum):
    """What a list's page token resumes from; each list RPC names its kind."""

    SEQ = "seq"
    """A store sequence number: an int in 0..2**63-1 (tasks, workflows)."""
    ID = "id"
    """A resource id (``ID_RE``: agents)."""
    KEY = "key"
    """A printable key of at most ``MAX_KEY_CURSOR_BYTES`` (state keys, snapshot names)."""


MAX_SEQ = (1 << 63) - 1
MAX_KEY_CURSOR_BYTES = 1024
"""Longest KEY cursor: at least ``Limits.max_key_bytes`` and any snapshot name."""
MAX_PAGE_TOKEN_CHARS = 8192
"""Longest page token accepted (a KEY cursor of 1024 bytes, JSON-escaped, fits)."""


def encode_page_token(cursor: str | int, filter_key: str) -> str:
    """An opaque token for a keyset cursor, bound to the request's filter."""
    body = {"c": cursor, "f": _fingerprint(filter_key)}
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def _fingerprint(filter_key: str) -> str:
    return hashlib.sha256(filter_key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@overload
def decode_page_token(token: str, filter_key: str, kind: Literal[Cursor.SEQ]) -> int: ...


@overload
def decode_page_token(token: str, filter_key: str,
                      kind: Literal[Cursor.ID, Cursor.KEY]) -> str: ...


def decode_page_token(token: str, filter_key: str, kind: Cursor) -> int | str:
    """The cursor of a token made by encode_page_token, checked to be of ``kind``.

    An empty token means the first page: 0 for a SEQ cursor, "" otherwise.
    Anything else that is not a well-formed token of this list and filter is
    INVALID_ARGUMENT on ``page_token``; a servicer never parses a cursor itself.

    Decision: tokens are validated, not authenticated. The filter fingerprint
    is a plain hash anyone can compute, so a client can forge a token; but a
    cursor only says where a keyset scan of the *same* filter resumes, which
    paging reaches anyway, and the namespace checks apply to the request
    either way. So every token is checked in full (size, shape, fingerprint,
    the cursor's type, range and length for its list) instead of signed: an
    HMAC would need a secret shared by every replica behind a load balancer
    (a per-process one would break paging across replicas) and its rotation,
    for no gain in what a caller can see.
    """
    if not token:
        return 0 if kind is Cursor.SEQ else ""
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise _bad("page_token", "not a token returned by this API")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
    except (ValueError, TypeError, RecursionError) as exc:
        raise _bad("page_token", "not a token returned by this API") from exc
    if not isinstance(body, dict) or set(body) != {"c", "f"}:
        raise _bad("page_token", "not a token returned by this API")
    cursor, fingerprint = body["c"], body["f"]
    if not isinstance(fingerprint, str) or fingerprint != _fingerprint(filter_key):
        raise _bad("page_token", "was issued for a different filter")
    if kind is Cursor.SEQ:
        # bool is an int in Python: refuse it explicitly.
        if isinstance(cursor, int) and not isinstance(cursor, bool) and 0 <= cursor <= MAX_SEQ:
            return cursor
    elif isinstance(cursor, str):
        if kind is Cursor.ID and ID_RE.match(cursor):
            return cursor
        if kind is Cursor.KEY and len(cursor.encode("utf-8", "surrogatepass")) \
                <= MAX_KEY_CURSOR_BYTES and not _CONTROL_RE.search(cursor):
            return cursor
    raise _bad("page_token", "not a token returned by this API")


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


def timestamp(value: timestamp_pb2.Timestamp, field: str) -> float:
    """Unix seconds of a Timestamp; 0 when unset. Outside years 1970..9999 is refused."""
    if not value.seconds and not value.nanos:
        return 0.0
    if value.seconds < 0 or value.seconds > 253_402_300_799:
        raise _bad(field, "must be between 1970 and 9999")
    if not 0 <= value.nanos < 1_000_000_000:
        raise _bad(field, "nanos out of range")
    return value.seconds + value.nanos / 1e9


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
    metadata = msg.metadata
    if metadata:
        for key in metadata:
            _text(key, f"{field}.metadata[{_short(key)}]", MAX_PAYLOAD_METADATA_KEY_BYTES)
    return Payload(bytes(msg.data), dict(metadata))


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
        trace_context=(trace_context_field(t.trace_context, "task.trace_context")
                       if t.trace_context else call_trace_context(trace_context)),
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
        if state is TaskState.RUNNING and is_human(task.capability):
            kw["awaiting_human"] = True
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


def task_filter(msg: task_pb2.ListTasksRequest | task_pb2.TaskSelector, limits: Limits, *,
                prefix: str = "") -> TaskFilter:
    """A TaskFilter from a request's filter fields (``prefix`` names them: "selector.")."""
    after = timestamp(msg.create_after, prefix + "create_after")
    before = timestamp(msg.create_before, prefix + "create_before")
    if after and before and after >= before:
        raise _bad(prefix + "create_before", "must be later than create_after")
    return TaskFilter(
        namespace(msg.namespace, prefix + "namespace"), task_state(msg.state, prefix + "state"),
        capability(msg.capability, prefix + "capability", required=False),
        resource_id(msg.workflow, "workflows", prefix + "workflow") if msg.workflow else "",
        labels(msg.labels, prefix + "labels", limits), after, before)


def task_filter_key(flt: TaskFilter) -> str:
    """What a page token of ``flt`` is bound to (a token of another filter is refused)."""
    state = int(flt.state) if flt.state is not None else 0
    key = f"{flt.namespace}|{state}|{flt.capability}|{flt.workflow_id}"
    if not (flt.labels or flt.created_after or flt.created_before):
        return key  # the form of earlier releases: their tokens stay valid
    labels_ = ",".join(f"{k}={v}" for k, v in sorted(flt.labels.items()))
    return f"{key}|{labels_}|{flt.created_after!r}|{flt.created_before!r}"


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
        trace_context=dict(call_trace_context(trace_context)))


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
    """The agent card of a RegisterAgent request (with the skills of its A2A card)."""
    if not req.HasField("agent"):
        raise _bad("agent", "required")
    a = req.agent
    card = parse_card(req.a2a_agent_card) if req.a2a_agent_card else None
    display_name = a.display_name or (card.name if card is not None else "")
    if not display_name:
        raise _bad("agent.display_name", "required")
    if not a.capabilities and card is None:
        raise _bad("agent.capabilities", "at least one capability is required")
    if len(a.capabilities) + (len(card.skills) if card else 0) > 256:
        raise _bad("agent.capabilities", "at most 256 capabilities")
    if not 1 <= a.max_concurrency <= 10_000:
        raise _bad("agent.max_concurrency", "must be 1..10000")
    for i, c in enumerate(a.capabilities):
        if is_human(c.name):
            raise _bad(f"agent.capabilities[{i}].name",
                       f"{c.name!r} is reserved for steps a person answers")
    if card is not None:
        for i, s in enumerate(card.skills):
            if is_human(s.name):
                raise _bad(f"a2a_agent_card.skills[{i}].id",
                           f"{s.name!r} is reserved for steps a person answers")
    caps = [
        Capability(capability(c.name, f"agent.capabilities[{i}].name"),
                   _text(c.version, f"agent.capabilities[{i}].version", 64),
                   _text(c.description, f"agent.capabilities[{i}].description", 2048),
                   tuple(_text(t, f"agent.capabilities[{i}].tags[{j}]", 64)
                         for j, t in enumerate(c.tags)),
                   tuple(_text(e, f"agent.capabilities[{i}].examples[{j}]", 1024)
                         for j, e in enumerate(c.examples)))
        for i, c in enumerate(a.capabilities)]
    if card is not None:
        # A skill named by a capability too fills what the capability left empty.
        skills = {capability(s.name, f"a2a_agent_card.skills[{i}].id"): s
                  for i, s in enumerate(card.skills)}
        caps = [replace(c, description=c.description or skills[c.name].description,
                        tags=c.tags or skills[c.name].tags,
                        examples=c.examples or skills[c.name].examples)
                if c.name in skills else c for c in caps]
        named = {c.name for c in caps}
        caps += [s for name, s in skills.items() if name not in named]
    return Agent(
        id="", display_name=_text(display_name, "agent.display_name", 128),
        namespace=namespace(a.namespace, "agent.namespace"), capabilities=tuple(caps),
        max_concurrency=a.max_concurrency, labels=labels(a.labels, "agent.labels", limits),
        version=_text(a.version or (card.version if card else ""), "agent.version", 64),
        description=_text(a.description or (card.description if card else ""),
                          "agent.description", 2048))


def agent_to_proto(agent: Agent) -> discovery_pb2.Agent:
    """An Agent message (never the session token)."""
    return discovery_pb2.Agent(
        name=f"agents/{agent.id}", display_name=agent.display_name,
        capabilities=[discovery_pb2.Capability(name=c.name, version=c.version,
                                               description=c.description, tags=c.tags,
                                               examples=c.examples)
                      for c in agent.capabilities],
        max_concurrency=agent.max_concurrency, labels=dict(agent.labels),
        version=agent.version, state=int(agent.state),  # type: ignore[arg-type]
        in_flight=agent.in_flight, load=agent.load,
        register_time=to_timestamp(agent.register_time),
        heartbeat_time=to_timestamp(agent.heartbeat_time), namespace=agent.namespace,
        description=agent.description)


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


# -- chunks ------------------------------------------------------------------------

def chunk_draft(msg: task_pb2.TaskChunk, field: str) -> ChunkDraft:
    """A chunk as an agent sent it (its bounds are checked by the service)."""
    try:
        kind = ChunkKind(msg.kind)
    except ValueError:
        raise _bad(f"{field}.kind", "TEXT, ARTIFACT or PROGRESS") from None
    if msg.data.metadata:
        for key in msg.data.metadata:
            _text(key, f"{field}.data.metadata[{_short(key)}]", MAX_PAYLOAD_METADATA_KEY_BYTES)
    return ChunkDraft(kind, msg.text, Payload(bytes(msg.data.data), dict(msg.data.metadata)),
                      msg.artifact or DEFAULT_ARTIFACT, msg.progress, msg.last_chunk)


def chunk_to_proto(chunk: TaskChunk) -> task_pb2.TaskChunk:
    """A TaskChunk message."""
    d = chunk.draft
    msg = task_pb2.TaskChunk(
        task=f"tasks/{chunk.task_id}", fencing_token=chunk.fencing_token,
        kind=int(d.kind), text=d.text, artifact=d.artifact,  # type: ignore[arg-type]
        progress=d.progress, last_chunk=d.last, sequence=chunk.seq, attempt=chunk.attempt,
        create_time=to_timestamp(chunk.create_time))
    if d.data.data or d.data.metadata:
        msg.data.CopyFrom(payload_msg(d.data))
    return msg


def text(value: str, field: str, max_bytes: int) -> str:
    """A free-text field within ``max_bytes`` (INVALID_ARGUMENT naming it past them)."""
    return _text(value, field, max_bytes)


def _strict_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is past a double's range")
    return number


def decoded_payload(value: Payload) -> Any:
    """A payload's value by its encoding: JSON decoded, else the bytes (base64 text).

    Strict JSON: Python's parser takes NaN and Infinity (and 1e999 as infinity),
    which the decision record would then carry on as JSON no other language parses.
    """
    encoding = value.metadata.get("encoding")
    if encoding == b"json/plain":
        try:
            return json.loads(value.data, parse_constant=_strict_constant,
                              parse_float=_strict_float)
        except RecursionError:  # [[[...]]] past the parser's depth: it was INTERNAL
            raise _bad("input.data", "JSON nested too deeply") from None
        except ValueError as exc:
            raise _bad("input.data", "not JSON though its encoding says json/plain "
                       f"({exc})") from None
    if encoding == b"binary/null" or (encoding is None and not value.data):
        return None
    return {"base64": base64.b64encode(value.data).decode()}

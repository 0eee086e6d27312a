"""Frozen value types of the public API and their conversion from protos.

Only this module and the client/agent modules touch protobuf messages; what
callers receive are the dataclasses below.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agentmesh.v1 import (
    bus_pb2,
    common_pb2,
    discovery_pb2,
    state_pb2,
    task_pb2,
)
from google.protobuf import duration_pb2, timestamp_pb2

from agent_sdk._payload import decode_payload, encode_payload

TERMINAL_TASK_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "DEAD_LETTERED"})


def _enum_names(enum: Any, prefix: str) -> dict[int, str]:
    return {v.number: v.name.removeprefix(prefix) for v in enum.DESCRIPTOR.values}


_TASK_STATES = _enum_names(task_pb2.TaskState, "TASK_STATE_")
_WORKFLOW_STATES = _enum_names(task_pb2.WorkflowState, "WORKFLOW_STATE_")
_AGENT_STATES = _enum_names(discovery_pb2.AgentState, "AGENT_STATE_")
_AGENT_EVENTS = _enum_names(discovery_pb2.AgentEventType, "AGENT_EVENT_TYPE_")
_STATE_EVENTS = _enum_names(state_pb2.StateEventType, "STATE_EVENT_TYPE_")


def _enum_value(names: dict[int, str], name: str, what: str) -> int:
    wanted = name.upper()
    for number, known in names.items():
        if known == wanted and number != 0:
            return number
    choices = ", ".join(n for k, n in sorted(names.items()) if k)
    raise ValueError(f"unknown {what} {name!r}; expected one of {choices}")


def task_state_value(name: str) -> int:
    """The TaskState number of "SUCCEEDED" and friends (ValueError when unknown)."""
    return _enum_value(_TASK_STATES, name, "task state")


def workflow_state_value(name: str) -> int:
    """The WorkflowState number of "RUNNING" and friends."""
    return _enum_value(_WORKFLOW_STATES, name, "workflow state")


def agent_state_value(name: str) -> int:
    """The AgentState number of "ACTIVE" and friends."""
    return _enum_value(_AGENT_STATES, name, "agent state")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _time(msg: Any, name: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime (microseconds), None when unset.

    The same value as ``Timestamp.ToDatetime(tzinfo=UTC)`` at half its cost (a
    task carries up to five timestamps and the SDK converts every one it
    receives).
    """
    if not msg.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, name)
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def to_duration(seconds: float) -> duration_pb2.Duration:
    """A Duration of ``seconds``."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _decode_opt(msg: Any, name: str) -> Any:
    return decode_payload(getattr(msg, name)) if msg.HasField(name) else None


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True, slots=True)
class FailureInfo:
    """Why an attempt failed."""

    #: Error class ("ValueError", "LEASE_EXPIRED"...).
    error_type: str
    #: Human-readable message.
    message: str
    #: True when retrying cannot help.
    non_retryable: bool = False


def _failure(msg: Any, name: str) -> FailureInfo | None:
    if not msg.HasField(name):
        return None
    f: task_pb2.TaskFailure = getattr(msg, name)
    return FailureInfo(f.error_type, f.message, f.non_retryable)


@dataclass(frozen=True, slots=True)
class AttemptInfo:
    """The record of one attempt of a task."""

    #: Attempt number, from 1.
    attempt: int
    #: Agent that ran it ("agents/{id}").
    agent: str
    #: When the lease was granted.
    start_time: datetime | None
    #: When it ended.
    end_time: datetime | None
    #: Why it failed; None when it succeeded or still runs.
    failure: FailureInfo | None


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task as the server last reported it."""

    #: "tasks/{id}".
    name: str
    #: The id part of the name.
    id: str
    #: Capability that runs it.
    capability: str
    #: "PENDING", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
    #: "RETRYING" or "DEAD_LETTERED".
    state: str
    #: Decoded input.
    input: Any
    #: Decoded output (None until it succeeded).
    output: Any
    #: Last failure.
    failure: FailureInfo | None
    #: Number of the current or last attempt.
    attempt: int
    #: Agent that holds or last held the lease.
    agent: str
    #: "workflows/{id}" when the task is a workflow step, else "".
    workflow: str
    #: Step id within the workflow.
    step_id: str
    #: Priority.
    priority: int
    #: Labels.
    labels: dict[str, str]
    #: True while no live agent offers the capability (nor the fallback).
    unschedulable: bool
    #: True when the fallback capability served it.
    served_by_fallback: bool
    #: True once a human re-drove it, or for a task a person answers (capability "human").
    human_intervened: bool
    #: True while it waits for a person (a "human" task: approve, reject or supply input).
    awaiting_human: bool
    #: One entry per attempt.
    attempts: tuple[AttemptInfo, ...]
    #: When it was submitted.
    create_time: datetime | None
    #: When it last changed.
    update_time: datetime | None
    #: When it ended.
    end_time: datetime | None

    @property
    def done(self) -> bool:
        """True in a terminal state (SUCCEEDED, FAILED, CANCELLED, DEAD_LETTERED)."""
        return self.state in TERMINAL_TASK_STATES


def task_from_proto(t: task_pb2.Task) -> TaskInfo:
    """Convert a Task message."""
    return TaskInfo(
        name=t.name,
        id=t.name.removeprefix("tasks/"),
        capability=t.capability,
        state=_TASK_STATES.get(t.state, str(t.state)),
        input=_decode_opt(t, "input"),
        output=_decode_opt(t, "output"),
        failure=_failure(t, "failure"),
        attempt=t.attempt,
        agent=t.agent,
        workflow=t.workflow,
        step_id=t.step_id,
        priority=t.priority,
        labels=dict(t.labels),
        unschedulable=t.unschedulable,
        served_by_fallback=t.served_by_fallback,
        human_intervened=t.human_intervened,
        awaiting_human=t.awaiting_human,
        attempts=tuple(
            AttemptInfo(a.attempt, a.agent, _time(a, "start_time"), _time(a, "end_time"),
                        _failure(a, "failure"))
            for a in t.attempts),
        create_time=_time(t, "create_time"),
        update_time=_time(t, "update_time"),
        end_time=_time(t, "end_time"),
    )


_CHUNK_KINDS = _enum_names(task_pb2.TaskChunkKind, "TASK_CHUNK_KIND_")


@dataclass(frozen=True, slots=True)
class TaskChunk:
    """One streamed piece of a running task's output, as the server kept it."""

    #: "tasks/{id}".
    task: str
    #: Position in the task's chunk log, from 1, with no gaps: resume after it.
    sequence: int
    #: "TEXT" (tokens), "ARTIFACT" (a piece of an artifact) or "PROGRESS".
    kind: str
    #: TEXT: the text; PROGRESS: the note.
    text: str
    #: ARTIFACT: the decoded piece (None otherwise).
    data: Any
    #: Artifact the piece belongs to ("output" unless the handler named one).
    artifact: str
    #: PROGRESS: fraction done, 0..1 (0 when unknown).
    progress: float
    #: True on the last piece of its artifact.
    last: bool
    #: Attempt that produced it (a retried task's chunks carry the new attempt).
    attempt: int
    #: When the server kept it.
    create_time: datetime | None


def chunk_from_proto(c: task_pb2.TaskChunk) -> TaskChunk:
    """Convert a TaskChunk message."""
    return TaskChunk(
        task=c.task, sequence=c.sequence, kind=_CHUNK_KINDS.get(c.kind, str(c.kind)),
        text=c.text, data=_decode_opt(c, "data"), artifact=c.artifact,
        progress=c.progress, last=c.last_chunk, attempt=c.attempt,
        create_time=_time(c, "create_time"))


# ----------------------------------------------------------------------- workflows


@dataclass(frozen=True, slots=True)
class StepInfo:
    """One step of a workflow and the state of its task."""

    #: Step id.
    id: str
    #: Capability that runs it.
    capability: str
    #: Step ids it depends on.
    depends_on: tuple[str, ...]
    #: "tasks/{id}" of the task running it ("" before it exists).
    task: str
    #: Task state name (see TaskInfo.state); "UNSPECIFIED" before the task exists.
    state: str
    #: Decoded output once it succeeded.
    output: Any
    #: Failure of the step.
    failure: FailureInfo | None
    #: True while no live agent offers the capability.
    unschedulable: bool


@dataclass(frozen=True, slots=True)
class WorkflowInfo:
    """A workflow as the server last reported it."""

    #: "workflows/{id}".
    name: str
    #: The id part of the name.
    id: str
    #: Human-readable name.
    display_name: str
    #: "RUNNING", "SUCCEEDED", "FAILED" or "CANCELLED".
    state: str
    #: Why it failed or was cancelled.
    failure_reason: str
    #: The steps.
    steps: tuple[StepInfo, ...]
    #: When it was submitted.
    create_time: datetime | None
    #: When it ended.
    end_time: datetime | None

    @property
    def done(self) -> bool:
        """True once the workflow ended."""
        return self.state in {"SUCCEEDED", "FAILED", "CANCELLED"}

    def step(self, step_id: str) -> StepInfo:
        """The step with id ``step_id`` (KeyError when absent)."""
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)


def workflow_from_proto(w: task_pb2.Workflow) -> WorkflowInfo:
    """Convert a Workflow message."""
    return WorkflowInfo(
        name=w.name,
        id=w.name.removeprefix("workflows/"),
        display_name=w.display_name,
        state=_WORKFLOW_STATES.get(w.state, str(w.state)),
        failure_reason=w.failure_reason,
        steps=tuple(
            StepInfo(id=s.id, capability=s.capability, depends_on=tuple(s.depends_on),
                     task=s.task, state=_TASK_STATES.get(s.state, str(s.state)),
                     output=_decode_opt(s, "output"), failure=_failure(s, "failure"),
                     unschedulable=s.unschedulable)
            for s in w.steps),
        create_time=_time(w, "create_time"),
        end_time=_time(w, "end_time"),
    )


# -------------------------------------------------------------------------- agents


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """A registered agent and its live status."""

    #: "agents/{id}".
    name: str
    #: The id part of the name.
    id: str
    #: Name chosen by the agent process.
    display_name: str
    #: Capability names.
    capabilities: tuple[str, ...]
    #: Most tasks it runs at once.
    max_concurrency: int
    #: Labels.
    labels: dict[str, str]
    #: Agent software version.
    version: str
    #: "ACTIVE", "DRAINING" or "GONE".
    state: str
    #: Tasks leased to it.
    in_flight: int
    #: Last reported load, 0..1.
    load: float
    #: When it registered.
    register_time: datetime | None
    #: When its last heartbeat arrived.
    heartbeat_time: datetime | None


def agent_from_proto(a: discovery_pb2.Agent) -> AgentInfo:
    """Convert an Agent message."""
    return AgentInfo(
        name=a.name,
        id=a.name.removeprefix("agents/"),
        display_name=a.display_name,
        capabilities=tuple(c.name for c in a.capabilities),
        max_concurrency=a.max_concurrency,
        labels=dict(a.labels),
        version=a.version,
        state=_AGENT_STATES.get(a.state, str(a.state)),
        in_flight=a.in_flight,
        load=a.load,
        register_time=_time(a, "register_time"),
        heartbeat_time=_time(a, "heartbeat_time"),
    )


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """Something happened to an agent."""

    #: "JOINED", "UPDATED" or "LEFT".
    type: str
    #: The agent after the event.
    agent: AgentInfo


def agent_event_from_proto(e: discovery_pb2.WatchAgentsResponse) -> AgentEvent:
    """Convert a WatchAgentsResponse."""
    return AgentEvent(_AGENT_EVENTS.get(e.type, str(e.type)), agent_from_proto(e.agent))


@dataclass(frozen=True, slots=True)
class MeshStats:
    """Queue depth and autonomy figures of a namespace."""

    #: Tasks by state name ("QUEUED": 3).
    tasks_by_state: dict[str, int]
    #: Tasks that ended.
    tasks_ended: int
    #: Tasks that succeeded with no human action.
    tasks_succeeded_autonomously: int
    #: tasks_succeeded_autonomously / tasks_ended (1 when nothing ended).
    autonomy: float
    #: Live agents.
    agents_live: int


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk re-drive or cancel acted on (or would, for a dry run)."""

    #: "tasks/{task}" of each, newest first.
    names: list[str]
    #: More tasks matched than max_tasks allowed; run it again for the rest.
    truncated: bool


def stats_from_proto(s: task_pb2.GetStatsResponse) -> MeshStats:
    """Convert a GetStatsResponse."""
    return MeshStats(dict(s.tasks_by_state), s.tasks_ended, s.tasks_succeeded_autonomously,
                     s.autonomy, s.agents_live)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One key of the shared state store."""

    #: The key.
    key: str
    #: Decoded value (None for a delete event).
    value: Any
    #: Version of the key: 1 on create, +1 on every write.
    version: int
    #: Namespace revision of the last write.
    revision: int
    #: When it was last written.
    update_time: datetime | None
    #: When it expires (None without TTL).
    expire_time: datetime | None


def entry_from_proto(e: state_pb2.StateEntry, value: Any = None, *,
                     use_value: bool = False) -> StateEntry:
    """Convert a StateEntry message (``use_value`` substitutes a known value)."""
    return StateEntry(
        key=e.key,
        value=value if use_value else _decode_opt(e, "value"),
        version=e.version,
        revision=e.revision,
        update_time=_time(e, "update_time"),
        expire_time=_time(e, "expire_time"),
    )


@dataclass(frozen=True, slots=True)
class StateEvent:
    """A change of a key."""

    #: "PUT" or "DELETE".
    type: str
    #: The entry after a put, or the key and revision of a delete.
    entry: StateEntry


def state_event_from_proto(e: state_pb2.WatchResponse) -> StateEvent:
    """Convert a state WatchResponse."""
    return StateEvent(_STATE_EVENTS.get(e.type, str(e.type)), entry_from_proto(e.entry))


# ----------------------------------------------------------------------------- bus


@dataclass(frozen=True, slots=True)
class BusMessage:
    """A message delivered by the bus."""

    #: Concrete subject it was published on.
    subject: str
    #: Decoded payload.
    value: Any
    #: Headers (including W3C traceparent/tracestate).
    headers: dict[str, str]
    #: When it was published.
    publish_time: datetime | None


async def _no_ack() -> None:
    """The ``ack`` of a message built by hand: nothing to acknowledge."""


@dataclass(frozen=True, slots=True)
class DurableMessage(BusMessage):
    """A message of a durable subscription: ``await ack()`` once it is handled.

    One not acked when its subscription ends comes again (to another open
    subscription of the same name, or the next one opened).
    """

    #: Delivery id within its subscription.
    delivery_id: int = 0
    #: Acknowledges this delivery (set by ``MeshClient.subscribe_durable``).
    ack: Callable[[], Awaitable[None]] = field(default=_no_ack, repr=False, compare=False)


def bus_message_from_proto(m: bus_pb2.BusMessage) -> BusMessage:
    """Convert a BusMessage message."""
    return BusMessage(m.subject, _decode_opt(m, "payload"), dict(m.headers),
                      _time(m, "publish_time"))


# ------------------------------------------------------------------- retry + specs


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed attempts of a task are retried; zero values take server defaults."""

    #: Total attempts including the first; 0 = server default, 1 = no retry.
    max_attempts: int = 0
    #: Delay before the first retry, in seconds.
    initial_backoff: float = 0.0
    #: Upper bound of any delay, in seconds.
    max_backoff: float = 0.0
    #: Growth factor between attempts; 0 = default (2.0).
    multiplier: float = 0.0
    #: Full jitter when True, exact exponential delays when False.
    jitter: bool = True
    #: Error types that end the task at once.
    non_retryable_error_types: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "retry") -> RetryPolicy:
        """Build from a mapping with the field names above (ValueError on bad shape)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: must be a mapping")
        _no_unknown(data, _RETRY_KEYS, where)
        types = data.get("non_retryable_error_types", ())
        if not isinstance(types, Sequence) or isinstance(types, str) or not all(
                isinstance(t, str) for t in types):
            raise ValueError(f"{where}.non_retryable_error_types: must be a list of strings")
        jitter = data.get("jitter", True)
        if not isinstance(jitter, bool):
            raise ValueError(f"{where}.jitter: must be true or false")
        return cls(
            max_attempts=_int(data, "max_attempts", where, 0),
            initial_backoff=_seconds(data, "initial_backoff", where, 0.0),
            max_backoff=_seconds(data, "max_backoff", where, 0.0),
            multiplier=_seconds(data, "multiplier", where, 0.0),
            jitter=jitter,
            non_retryable_error_types=tuple(types),
        )

    def to_proto(self) -> common_pb2.RetryPolicy:
        """The RetryPolicy message."""
        p = common_pb2.RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_multiplier=self.multiplier,
            jitter=(common_pb2.BACKOFF_JITTER_FULL if self.jitter
                    else common_pb2.BACKOFF_JITTER_NONE),
            non_retryable_error_types=self.non_retryable_error_types,
        )
        if self.initial_backoff:
            p.initial_backoff.CopyFrom(to_duration(self.initial_backoff))
        if self.max_backoff:
            p.max_backoff.CopyFrom(to_duration(self.max_backoff))
        return p


_RETRY_KEYS = frozenset({"max_attempts", "initial_backoff", "max_backoff", "multiplier",
                         "jitter", "non_retryable_error_types"})
_STEP_KEYS = frozenset({"id", "capability", "input", "depends_on", "retry", "timeout",
                        "fallback", "priority"})
_WORKFLOW_KEYS = frozenset({"name", "steps", "labels"})


def _no_unknown(data: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                         f"expected {', '.join(sorted(known))}")


def _int(data: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}.{key}: must be an integer")
    return value


def _seconds(data: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}.{key}: must be a non-negative number")
    return float(value)


def _str(data: Mapping[str, Any], key: str, where: str, *, required: bool) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key}: must be a string")
    if required and not value:
        raise ValueError(f"{where}.{key}: is required")
    return value


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step of a workflow to submit."""

    #: Unique id within the workflow (letters, digits, '-', '_').
    id: str
    #: Capability that runs it.
    capability: str
    #: Input value (encoded as JSON unless bytes/None).
    input: Any = None
    #: Ids of steps that must succeed first.
    depends_on: tuple[str, ...] = ()
    #: Retry policy of the step.
    retry: RetryPolicy | None = None
    #: Longest one attempt may run, in seconds (None = server default).
    timeout: float | None = None
    #: Capability used when no agent of ``capability`` can take it.
    fallback: str = ""
    #: Priority of the step's task.
    priority: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "step") -> StepSpec:
        """Build from a mapping (ValueError naming the bad field)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: must be a mapping")
        _no_unknown(data, _STEP_KEYS, where)
        deps = data.get("depends_on") or ()
        if isinstance(deps, str):
            deps = (deps,)
        if not isinstance(deps, Sequence) or not all(isinstance(d, str) and d for d in deps):
            raise ValueError(f"{where}.depends_on: must be a list of step ids")
        retry = data.get("retry")
        timeout = data.get("timeout")
        return cls(
            id=_str(data, "id", where, required=True),
            capability=_str(data, "capability", where, required=True),
            input=data.get("input"),
            depends_on=tuple(deps),
            retry=None if retry is None else RetryPolicy.from_dict(retry, where=f"{where}.retry"),
            timeout=None if timeout is None else _seconds(data, "timeout", where, 0.0),
            fallback=_str(data, "fallback", where, required=False),
            priority=_int(data, "priority", where, 0),
        )

    def to_proto(self) -> task_pb2.WorkflowStep:
        """The WorkflowStep message."""
        s = task_pb2.WorkflowStep(id=self.id, capability=self.capability,
                                  input=encode_payload(self.input),
                                  depends_on=self.depends_on,
                                  fallback_capability=self.fallback, priority=self.priority)
        if self.retry is not None:
            s.retry_policy.CopyFrom(self.retry.to_proto())
        if self.timeout:
            s.timeout.CopyFrom(to_duration(self.timeout))
        return s


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    """A workflow (DAG of steps) to submit."""

    #: Human-readable name.
    name: str
    #: The steps.
    steps: tuple[StepSpec, ...]
    #: Labels copied to every step task.
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkflowSpec:
        """Build from a mapping like the workflow YAML; ValueError names the bad field.

        Checks the shape, duplicate step ids and dependencies on unknown steps;
        cycles are refused by the server.
        """
        if not isinstance(data, Mapping):
            raise ValueError("workflow: must be a mapping with `name` and `steps`")
        _no_unknown(data, _WORKFLOW_KEYS, "workflow")
        name = _str(data, "name", "workflow", required=False)
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, Sequence) or isinstance(raw_steps, str) or not raw_steps:
            raise ValueError("workflow.steps: must be a non-empty list of steps")
        labels = data.get("labels") or {}
        if not isinstance(labels, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError("workflow.labels: must map strings to strings")
        steps = tuple(StepSpec.from_dict(s, where=f"steps[{i}]") for i, s in enumerate(raw_steps))
        seen: set[str] = set()
        for i, step in enumerate(steps):
            if step.id in seen:
                raise ValueError(f"steps[{i}].id: duplicate step id {step.id!r}")
            seen.add(step.id)
        for i, step in enumerate(steps):
            for dep in step.depends_on:
                if dep not in seen:
                    raise ValueError(f"steps[{i}].depends_on: unknown step {dep!r}")
        return cls(name=name, steps=steps, labels=dict(labels))

    def to_proto(self) -> task_pb2.Workflow:
        """The Workflow message."""
        return task_pb2.Workflow(display_name=self.name,
                                 steps=[s.to_proto() for s in self.steps], labels=self.labels)

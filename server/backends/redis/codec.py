"""JSON codec of the domain values stored in Redis.

The Lua scripts decode and re-encode these documents with ``cjson``, so the
format keeps to what survives that round trip:

- Times and other floats are JSON *strings* (``repr(float)``): cjson prints
  numbers with 14 significant digits, which would round Unix times. The
  scripts format the floats they compute with ``%.17g``, which round-trips.
- Integers (states, attempts, tokens, ``seq``) are JSON numbers (exact below 1e14).
- Bytes are base64 strings.
- cjson encodes an empty Lua table as ``{}``, so every list field also accepts
  an empty object when decoding.

The Python side reads and writes the JSON with orjson (``dumps``/``loads``):
task documents are on the server's hot path, several per task.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import orjson

from server.domain.models import (
    Agent,
    AgentState,
    Capability,
    Jitter,
    Payload,
    RetryPolicy,
    StateEntry,
    StateEvent,
    StateEventType,
    Task,
    TaskAttempt,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowState,
    WorkflowStep,
)

Doc = dict[str, Any]


def fstr(value: float) -> str:
    """A float as the exact string the documents and scripts use."""
    return repr(float(value))


def _f(value: object) -> float:
    if value is None or value == "":
        return 0.0
    return float(value)  # type: ignore[arg-type]


def _list(value: object) -> list[Any]:
    if isinstance(value, list):
        return value
    return []  # cjson writes an empty list as {}


def _map(value: object) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    return {}


def _str_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and value:
        return tuple(map(str, value))
    return ()  # also cjson's {} for an empty list


def _str_map(doc: object) -> dict[str, str]:
    if isinstance(doc, dict) and doc:
        return {str(k): str(v) for k, v in doc.items()}
    return {}


def text(raw: bytes | str) -> str:
    """A Redis reply as text (the clients use ``decode_responses=True``)."""
    return raw.decode() if isinstance(raw, bytes) else raw


def dumps(doc: object) -> str:
    """Compact JSON (orjson: about ten times faster than ``json.dumps`` on task documents)."""
    return orjson.dumps(doc).decode()


def loads(text: str | bytes) -> Any:
    """Parse JSON (orjson: about three times faster than ``json.loads``)."""
    return orjson.loads(text)


# -- payloads and small values ------------------------------------------------------


def _b64encode(data: bytes) -> str:
    """``base64.b64encode(data).decode("ascii")`` in one C call."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def payload_to_doc(p: Payload) -> Doc:
    """Payload -> JSON object (bytes as base64)."""
    meta = p.metadata
    return {"data": _b64encode(p.data),
            "metadata": {k: _b64encode(v) for k, v in meta.items()} if meta else {}}


_b64decode = binascii.a2b_base64
"""``base64.b64decode`` minus its Python-level argument handling: the same result and
errors (``a2b_base64`` accepts ASCII text itself), at a third of the cost."""


def payload_from_doc(doc: object) -> Payload:
    """JSON object -> Payload."""
    if not isinstance(doc, dict):
        return Payload(b"", {})
    meta = doc.get("metadata")
    return Payload(_b64decode(doc.get("data", "")),
                   {k: _b64decode(v) for k, v in meta.items()}
                   if isinstance(meta, dict) and meta else {})


def _failure_to_doc(f: TaskFailure | None) -> Doc | None:
    if f is None:
        return None
    return {"error_type": f.error_type, "message": f.message, "non_retryable": f.non_retryable}


def _failure_from_doc(doc: object) -> TaskFailure | None:
    if not isinstance(doc, dict):
        return None
    return TaskFailure(str(doc.get("error_type", "")), str(doc.get("message", "")),
                       bool(doc.get("non_retryable", False)))


def _retry_to_doc(r: RetryPolicy) -> Doc:
    return {"max_attempts": r.max_attempts, "initial_backoff": fstr(r.initial_backoff),
            "max_backoff": fstr(r.max_backoff), "multiplier": fstr(r.multiplier),
            "jitter": int(r.jitter), "non_retryable_error_types": list(r.non_retryable_error_types)}


def _build_retry(d: Mapping[str, Any], types: tuple[str, ...]) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=int(d.get("max_attempts", 3)), initial_backoff=_f(d.get("initial_backoff")),
        max_backoff=_f(d.get("max_backoff")), multiplier=_f(d.get("multiplier")),
        jitter=Jitter(int(d.get("jitter", Jitter.FULL))), non_retryable_error_types=types)


_RETRY_CACHE: dict[tuple[Any, ...], RetryPolicy] = {}
_RETRY_CACHE_SIZE = 256


def _retry_from_doc(doc: object) -> RetryPolicy:
    """RetryPolicy of a document, shared between equal documents (it is immutable).

    Nearly every task carries one of a few policies (most the default), so a
    small cache keyed by the document's values saves building one per decode.
    Keys that compare equal (``1``, ``1.0``, ``True``) convert to equal values.
    """
    d = _map(doc)
    types = _str_tuple(d.get("non_retryable_error_types"))
    key = (d.get("max_attempts", 3), d.get("initial_backoff"), d.get("max_backoff"),
           d.get("multiplier"), d.get("jitter", Jitter.FULL), types)
    try:
        policy = _RETRY_CACHE.get(key)
    except TypeError:  # an unhashable value in a malformed document
        return _build_retry(d, types)
    if policy is None:
        policy = _build_retry(d, types)
        if len(_RETRY_CACHE) >= _RETRY_CACHE_SIZE:
            _RETRY_CACHE.clear()
        _RETRY_CACHE[key] = policy
    return policy


# -- tasks --------------------------------------------------------------------------


def task_to_doc(t: Task) -> Doc:
    """Task -> JSON object (every field)."""
    return {
        "id": t.id, "capability": t.capability, "namespace": t.namespace,
        "input": payload_to_doc(t.input), "state": int(t.state), "priority": t.priority,
        "labels": dict(t.labels), "retry_policy": _retry_to_doc(t.retry_policy),
        "execution_timeout": fstr(t.execution_timeout),
        "fallback_capability": t.fallback_capability,
        "output": payload_to_doc(t.output) if t.output is not None else None,
        "failure": _failure_to_doc(t.failure), "attempt": t.attempt, "agent_id": t.agent_id,
        "fencing_token": t.fencing_token, "lease_deadline": fstr(t.lease_deadline),
        "workflow_id": t.workflow_id, "step_id": t.step_id, "depends_on": list(t.depends_on),
        "create_time": fstr(t.create_time), "update_time": fstr(t.update_time),
        "start_time": fstr(t.start_time), "end_time": fstr(t.end_time),
        "retry_time": fstr(t.retry_time), "served_by_fallback": t.served_by_fallback,
        "attempts": [{"attempt": a.attempt, "agent_id": a.agent_id,
                      "start_time": fstr(a.start_time),
                      "end_time": fstr(a.end_time) if a.end_time is not None else None,
                      "failure": _failure_to_doc(a.failure)} for a in t.attempts],
        "human_intervened": t.human_intervened, "budget_start": t.budget_start,
        "trace_context": dict(t.trace_context),
        "dependency_outputs": {k: payload_to_doc(v) for k, v in t.dependency_outputs.items()},
        "seq": t.seq,
        "schedule_to_start_timeout": fstr(t.schedule_to_start_timeout),
        "heartbeat_timeout": fstr(t.heartbeat_timeout),
        "queue_deadline": fstr(t.queue_deadline),
    }


_TASK_STATES = {int(s): s for s in TaskState}


def _task_state(value: Any) -> TaskState:
    state = _TASK_STATES.get(value)
    return state if state is not None else TaskState(int(value))


def _attempt_from_doc(a: Mapping[str, Any]) -> TaskAttempt:
    end = a.get("end_time")
    return TaskAttempt(int(a["attempt"]), str(a.get("agent_id", "")), _f(a.get("start_time")),
                       _f(end) if end is not None else None, _failure_from_doc(a.get("failure")))


# ``task_from_doc`` fills a new Task slot by slot, as ``evolve_task`` does:
# ``Task`` is a frozen dataclass without ``__post_init__``, and its generated
# ``__init__`` costs twice as much. The values are produced in this order, which
# must be the dataclass's (checked here at import, with the absence of a hook).
_TASK_ORDER = (
    "id", "capability", "namespace", "input", "state", "priority", "labels", "retry_policy",
    "execution_timeout", "fallback_capability", "output", "failure", "attempt", "agent_id",
    "fencing_token", "lease_deadline", "workflow_id", "step_id", "depends_on", "create_time",
    "update_time", "start_time", "end_time", "retry_time", "served_by_fallback", "attempts",
    "human_intervened", "budget_start", "trace_context", "dependency_outputs", "seq",
    "schedule_to_start_timeout", "heartbeat_timeout", "queue_deadline",
)
if (tuple(f.name for f in fields(Task)) != _TASK_ORDER
        or hasattr(Task, "__post_init__")):  # pragma: no cover - a model change
    raise RuntimeError("codec.task_from_doc no longer matches the Task dataclass")
_TASK_SETTERS: tuple[Callable[[Task, Any], None], ...] = tuple(
    getattr(Task, name).__set__ for name in _TASK_ORDER)
_new_task = object.__new__


def task_from_doc(d: Mapping[str, Any]) -> Task:
    """JSON object -> Task."""
    g = d.get
    output, attempts, outputs = g("output"), g("attempts"), g("dependency_outputs")
    # In _TASK_ORDER. Times are strings; float(x or 0.0) reads "" or an absent one as 0.0.
    values = (
        str(d["id"]), str(d["capability"]), str(d["namespace"]),
        payload_from_doc(g("input")), _task_state(d["state"]), int(g("priority", 0)),
        _str_map(g("labels")), _retry_from_doc(g("retry_policy")),
        float(g("execution_timeout") or 0.0), str(g("fallback_capability", "")),
        payload_from_doc(output) if isinstance(output, dict) else None,
        _failure_from_doc(g("failure")), int(g("attempt", 0)), str(g("agent_id", "")),
        int(g("fencing_token", 0)), float(g("lease_deadline") or 0.0),
        str(g("workflow_id", "")), str(g("step_id", "")), _str_tuple(g("depends_on")),
        float(g("create_time") or 0.0), float(g("update_time") or 0.0),
        float(g("start_time") or 0.0), float(g("end_time") or 0.0),
        float(g("retry_time") or 0.0), bool(g("served_by_fallback", False)),
        tuple(map(_attempt_from_doc, attempts)) if isinstance(attempts, list) else (),
        bool(g("human_intervened", False)), int(g("budget_start", 0)),
        _str_map(g("trace_context")),
        {str(k): payload_from_doc(v) for k, v in outputs.items()}
        if isinstance(outputs, dict) and outputs else {},
        int(g("seq", 0)), float(g("schedule_to_start_timeout") or 0.0),
        float(g("heartbeat_timeout") or 0.0), float(g("queue_deadline") or 0.0),
    )
    task: Task = _new_task(Task)
    for set_field, value in zip(_TASK_SETTERS, values, strict=True):
        set_field(task, value)
    return task


def encode_task(t: Task) -> str:
    """Task -> JSON text."""
    return dumps(task_to_doc(t))


def decode_task(text: str) -> Task:
    """JSON text -> Task."""
    return task_from_doc(loads(text))


# -- workflows ----------------------------------------------------------------------


def workflow_to_doc(w: Workflow) -> Doc:
    """Workflow -> JSON object."""
    return {
        "id": w.id, "namespace": w.namespace, "display_name": w.display_name,
        "steps": [{"id": s.id, "capability": s.capability, "input": payload_to_doc(s.input),
                   "depends_on": list(s.depends_on), "retry_policy": _retry_to_doc(s.retry_policy),
                   "timeout": fstr(s.timeout), "fallback_capability": s.fallback_capability,
                   "priority": s.priority,
                   "schedule_to_start_timeout": fstr(s.schedule_to_start_timeout),
                   "heartbeat_timeout": fstr(s.heartbeat_timeout)} for s in w.steps],
        "step_tasks": dict(w.step_tasks), "state": int(w.state),
        "failure_reason": w.failure_reason, "labels": dict(w.labels),
        "create_time": fstr(w.create_time), "end_time": fstr(w.end_time), "seq": w.seq,
    }


def workflow_from_doc(d: Mapping[str, Any]) -> Workflow:
    """JSON object -> Workflow."""
    return Workflow(
        id=str(d["id"]), namespace=str(d["namespace"]),
        display_name=str(d.get("display_name", "")),
        steps=tuple(WorkflowStep(
            id=str(s["id"]), capability=str(s["capability"]),
            input=payload_from_doc(s.get("input")),
            depends_on=tuple(str(x) for x in _list(s.get("depends_on"))),
            retry_policy=_retry_from_doc(s.get("retry_policy")), timeout=_f(s.get("timeout")),
            fallback_capability=str(s.get("fallback_capability", "")),
            priority=int(s.get("priority", 0)),
            schedule_to_start_timeout=_f(s.get("schedule_to_start_timeout")),
            heartbeat_timeout=_f(s.get("heartbeat_timeout")))
            for s in _list(d.get("steps"))),
        step_tasks=_str_map(d.get("step_tasks")), state=WorkflowState(int(d["state"])),
        failure_reason=str(d.get("failure_reason", "")), labels=_str_map(d.get("labels")),
        create_time=_f(d.get("create_time")), end_time=_f(d.get("end_time")),
        seq=int(d.get("seq", 0)),
    )


def encode_workflow(w: Workflow) -> str:
    """Workflow -> JSON text."""
    return dumps(workflow_to_doc(w))


def decode_workflow(text: str) -> Workflow:
    """JSON text -> Workflow."""
    return workflow_from_doc(loads(text))


# -- agents -------------------------------------------------------------------------


def encode_agent(a: Agent) -> str:
    """Agent -> JSON text."""
    return dumps({
        "id": a.id, "display_name": a.display_name, "namespace": a.namespace,
        "capabilities": [_capability_doc(c) for c in a.capabilities],
        "description": a.description,
        "max_concurrency": a.max_concurrency, "labels": dict(a.labels), "version": a.version,
        "state": int(a.state), "in_flight": a.in_flight, "load": fstr(a.load),
        "register_time": fstr(a.register_time), "heartbeat_time": fstr(a.heartbeat_time),
        "expire_time": fstr(a.expire_time), "session_token": a.session_token,
    })


def _capability_doc(c: Capability) -> Doc:
    doc: Doc = {"name": c.name, "version": c.version}
    if c.description or c.tags or c.examples:  # most cards carry none: keep them small
        doc.update(description=c.description, tags=list(c.tags), examples=list(c.examples))
    return doc


def decode_agent(text: str) -> Agent:
    """JSON text -> Agent."""
    d = loads(text)
    return Agent(
        id=str(d["id"]), display_name=str(d.get("display_name", "")),
        namespace=str(d["namespace"]),
        capabilities=tuple(Capability(str(c["name"]), str(c.get("version", "")),
                                      str(c.get("description", "")),
                                      _str_tuple(c.get("tags")), _str_tuple(c.get("examples")))
                           for c in _list(d.get("capabilities"))),
        description=str(d.get("description", "")),
        max_concurrency=int(d.get("max_concurrency", 1)), labels=_str_map(d.get("labels")),
        version=str(d.get("version", "")), state=AgentState(int(d["state"])),
        in_flight=int(d.get("in_flight", 0)), load=_f(d.get("load")),
        register_time=_f(d.get("register_time")), heartbeat_time=_f(d.get("heartbeat_time")),
        expire_time=_f(d.get("expire_time")), session_token=str(d.get("session_token", "")),
    )


# -- state entries ------------------------------------------------------------------


def entry_from_doc(d: Mapping[str, Any]) -> StateEntry:
    """JSON object -> StateEntry."""
    return StateEntry(key=str(d["key"]), value=payload_from_doc(d.get("value")),
                      version=int(d["version"]), revision=int(d["revision"]),
                      update_time=_f(d.get("update_time")), expire_time=_f(d.get("expire_time")))


def decode_entry(text: str) -> StateEntry:
    """JSON text -> StateEntry."""
    return entry_from_doc(loads(text))


def decode_event(text: str) -> StateEvent:
    """JSON text ``{"type": n, "entry": {...}}`` -> StateEvent."""
    d = loads(text)
    return StateEvent(StateEventType(int(d["type"])), entry_from_doc(d["entry"]))

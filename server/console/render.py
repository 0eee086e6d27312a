"""Domain values as the console's JSON.

Payloads are shown safely: JSON pretty-printed, UTF-8 text as text, anything
else as hex plus base64; every rendering is cut at ``MAX_SHOWN`` bytes with
the full size reported, so a 1 MiB output never reaches the browser whole
and no byte is interpreted as markup (the front end renders text nodes only).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from server.domain.human import awaiting_human
from server.domain.models import Agent, AgentState, Payload, StateEntry, Task, Workflow
from server.ports import LockGrant

MAX_SHOWN = 64 << 10
"""Bytes of one payload the console shows; the size of the rest is reported."""


def payload(value: Payload | None) -> dict[str, Any] | None:
    """``{"kind": "json"|"text"|"binary"|"empty", "text", "size", "encoding", "truncated"}``."""
    if value is None:
        return None
    data = value.data
    encoding = value.metadata.get("encoding", b"").decode("utf-8", "replace")
    out: dict[str, Any] = {"size": len(data), "encoding": encoding,
                           "truncated": len(data) > MAX_SHOWN}
    if not data:
        return {**out, "kind": "empty", "text": ""}
    shown = data[:MAX_SHOWN]
    if not out["truncated"]:
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):  # nested past the parser's depth: as text
            pass
        else:
            return {**out, "kind": "json",
                    "text": json.dumps(parsed, indent=2, ensure_ascii=False, sort_keys=True)}
    try:
        decoded = shown.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not (out["truncated"] and exc.start >= len(shown) - 3):  # a cut mid-character
            return {**out, "kind": "binary", "hex": shown[:4096].hex(" "),
                    "base64": base64.b64encode(shown).decode("ascii")}
        decoded = shown[:exc.start].decode("utf-8")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in decoded):
        return {**out, "kind": "binary", "hex": shown[:4096].hex(" "),
                "base64": base64.b64encode(shown).decode("ascii")}
    return {**out, "kind": "text", "text": decoded}


def trace_id(context: Mapping[str, str]) -> str:
    """The trace id of a W3C ``traceparent`` (``00-<trace>-<span>-<flags>``), or ""."""
    parts = context.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def task_row(task: Task) -> dict[str, Any]:
    """A task as a list row (no payloads)."""
    return {"id": task.id, "capability": task.capability, "state": task.state.name,
            "attempt": task.attempt, "agent_id": task.agent_id, "labels": dict(task.labels),
            "workflow_id": task.workflow_id, "step_id": task.step_id,
            "create_time": task.create_time, "update_time": task.update_time,
            "end_time": task.end_time, "priority": task.priority,
            "error": f"{task.failure.error_type}: {task.failure.message}" if task.failure
            else "", "seq": task.seq, "awaiting_human": awaiting_human(task)}


def task_detail(task: Task, agent_names: Mapping[str, str]) -> dict[str, Any]:
    """Everything about one task, payloads rendered."""
    return {
        **task_row(task),
        "namespace": task.namespace,
        "input": payload(task.input), "output": payload(task.output),
        "failure": None if task.failure is None else {
            "error_type": task.failure.error_type, "message": task.failure.message,
            "non_retryable": task.failure.non_retryable},
        "fencing_token": task.fencing_token, "lease_deadline": task.lease_deadline,
        "start_time": task.start_time, "retry_time": task.retry_time,
        "execution_timeout": task.execution_timeout,
        "fallback_capability": task.fallback_capability,
        "served_by_fallback": task.served_by_fallback,
        "human_intervened": task.human_intervened, "depends_on": list(task.depends_on),
        "trace_id": trace_id(task.trace_context), "trace_context": dict(task.trace_context),
        "retry_policy": {"max_attempts": task.retry_policy.max_attempts,
                         "initial_backoff": task.retry_policy.initial_backoff,
                         "max_backoff": task.retry_policy.max_backoff},
        "agent_name": agent_names.get(task.agent_id, ""),
        "attempts": [{
            "attempt": a.attempt, "agent_id": a.agent_id,
            "agent_name": agent_names.get(a.agent_id, ""), "start_time": a.start_time,
            "end_time": a.end_time,
            "error": f"{a.failure.error_type}: {a.failure.message}" if a.failure else "",
        } for a in task.attempts],
    }


def health(value: Agent, *, now: float, interval: float) -> str:
    """``ok``, ``late`` (a beat missed), ``hung`` (two or more), ``starting``, ``gone``."""
    if value.state is AgentState.GONE:
        return "gone"
    if value.heartbeat_time == 0:
        return "starting"
    missed = int((now - value.heartbeat_time) // interval) if interval > 0 else 0
    return "hung" if missed >= 2 else "late" if missed >= 1 else "ok"


def agent(value: Agent, *, now: float, interval: float, misses: int,
          open_breakers: list[str]) -> dict[str, Any]:
    """An agent card; ``health`` makes a hung agent stand out before it is GONE."""
    age = now - value.heartbeat_time if value.heartbeat_time else None
    live = value.state is not AgentState.GONE
    missed = int(age // interval) if age is not None and interval > 0 and live else None
    return {"id": value.id, "name": value.display_name, "state": value.state.name,
            "capabilities": [c.name for c in value.capabilities],
            "labels": dict(value.labels), "version": value.version,
            "in_flight": value.in_flight, "max_concurrency": value.max_concurrency,
            "load": value.load, "register_time": value.register_time,
            "heartbeat_time": value.heartbeat_time, "heartbeat_age": age,
            "heartbeat_interval": interval, "beats_missed": missed, "misses_allowed": misses,
            "health": health(value, now=now, interval=interval),
            "open_breakers": open_breakers}


def _error(task: Task | None) -> str:
    failure = task.failure if task is not None else None
    return f"{failure.error_type}: {failure.message}" if failure is not None else ""


def workflow(wf: Workflow, steps: Mapping[str, Task]) -> dict[str, Any]:
    """A workflow with its DAG: each step's dependencies and live state."""
    return {"id": wf.id, "name": wf.display_name, "namespace": wf.namespace,
            "state": wf.state.name, "failure_reason": wf.failure_reason,
            "labels": dict(wf.labels), "create_time": wf.create_time, "end_time": wf.end_time,
            "steps": [{
                "id": s.id, "capability": s.capability, "depends_on": list(s.depends_on),
                "task_id": wf.step_tasks.get(s.id, ""),
                "state": steps[s.id].state.name if s.id in steps else "UNKNOWN",
                "attempt": steps[s.id].attempt if s.id in steps else 0,
                "error": _error(steps.get(s.id)),
            } for s in wf.steps]}


def workflow_row(wf: Workflow) -> dict[str, Any]:
    """A workflow as a list row."""
    return {"id": wf.id, "name": wf.display_name, "state": wf.state.name,
            "steps": len(wf.steps), "create_time": wf.create_time, "end_time": wf.end_time,
            "failure_reason": wf.failure_reason, "seq": wf.seq}


def entry(value: StateEntry) -> dict[str, Any]:
    """A state entry (its value rendered)."""
    return {"key": value.key, "version": value.version, "revision": value.revision,
            "update_time": value.update_time, "expire_time": value.expire_time,
            "value": payload(value.value)}


def lock(grant: LockGrant, agent_names: Mapping[str, str]) -> dict[str, Any]:
    """A held lock: holder, agent and fencing token."""
    return {"name": grant.name, "owner": grant.owner, "agent_id": grant.agent_id,
            "agent_name": agent_names.get(grant.agent_id, ""),
            "fencing_token": grant.fencing_token, "expire_time": grant.expire_time}

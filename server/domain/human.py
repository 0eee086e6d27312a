"""Steps that need a person: approvals and input, as pure rules.

A task (or workflow step) of the reserved capability ``human`` waits for a
person instead of an agent. The server's human desk (``server/services/
approvals.py``) takes it as soon as it is QUEUED, so it is RUNNING while it
waits (``awaiting_human``; A2A ``input-required``), with the approval timeout
as its lease: past it the attempt ends like any expired lease and, with one
attempt, the task is dead-lettered (and the timeout escalated). A decision
completes or fails it through the ordinary fenced report paths.

A human step is human action by definition: it is created with
``human_intervened`` set, so autonomy (tasks that succeeded with no human
action / tasks that ended) never counts it as autonomous.
"""

from __future__ import annotations

import enum
from dataclasses import replace
from typing import Any

from server.domain.models import DEFAULT_RETRY_POLICY, RetryPolicy, Task, TaskState

HUMAN_CAPABILITY = "human"
"""The reserved capability of steps a person answers (no agent may offer it)."""
REJECTED = "REJECTED"
"""error_type of a task a person rejected (A2A ``rejected``)."""
NOT_AWAITING_HUMAN = "NOT_AWAITING_HUMAN"
DESK_PREFIX = "human-desk-"
"""Agent ids of the server's human desks (one per namespace)."""
HUMAN_RETRY_POLICY = RetryPolicy(max_attempts=1)
"""A human task's default policy: a timeout dead-letters it at once (no silent re-ask)."""


class Decision(enum.IntEnum):
    """A person's answer (values match the proto enum)."""

    APPROVE = 1
    REJECT = 2
    SUPPLY_INPUT = 3


def is_human(capability: str) -> bool:
    """Whether tasks of ``capability`` wait for a person."""
    return capability == HUMAN_CAPABILITY


def desk_id(namespace: str) -> str:
    """The human desk agent of a namespace."""
    return f"{DESK_PREFIX}{namespace}"


def is_desk(agent_id: str) -> bool:
    """Whether an agent id is a human desk's (the server's own, listed nowhere)."""
    return agent_id.startswith(DESK_PREFIX)


def awaiting_human(task: Task) -> bool:
    """A human task the desk holds: it waits for a decision now."""
    return task.state is TaskState.RUNNING and is_human(task.capability)


def prepare(task: Task) -> Task:
    """A task as submitted, made a human task's defaults when it is one."""
    if not is_human(task.capability):
        return task
    policy = HUMAN_RETRY_POLICY if task.retry_policy == DEFAULT_RETRY_POLICY else task.retry_policy
    return replace(task, human_intervened=True, retry_policy=policy)


def decision_record(task: Task, decision: Decision, *, who: str, role: str, when: float,
                    comment: str, value: Any) -> dict[str, Any]:
    """What the audit keeps and the task outputs: who decided what, when, about which task."""
    return {"task": f"tasks/{task.id}", "workflow": task.workflow_id, "step": task.step_id,
            "decision": decision.name.lower(), "by": who, "role": role, "time": when,
            "comment": comment, "input": value}


__all__ = [
    "DESK_PREFIX",
    "HUMAN_CAPABILITY",
    "HUMAN_RETRY_POLICY",
    "NOT_AWAITING_HUMAN",
    "REJECTED",
    "Decision",
    "awaiting_human",
    "decision_record",
    "desk_id",
    "is_desk",
    "is_human",
    "prepare",
]

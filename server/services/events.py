"""System subjects on the bus and their small JSON bodies.

Replicas tell each other about changes through these subjects; watchers
subscribe to them and read the current record from the store, so an event
never has to carry a whole task. User subjects live under ``ns.<namespace>.``
and can never collide with ``_sys.``.
"""

from __future__ import annotations

import json
from typing import Any

ORIGIN_HEADER = "am-origin"


def task_subject(namespace: str) -> str:
    """Task state changes of a namespace."""
    return f"_sys.task.{namespace}"


def workflow_subject(namespace: str) -> str:
    """Workflow state changes of a namespace."""
    return f"_sys.workflow.{namespace}"


def ready_subject(namespace: str) -> str:
    """Work became ready in a namespace (body: capability names)."""
    return f"_sys.ready.{namespace}"


READY_ALL = "_sys.ready.*"
CANCEL_SUBJECT = "_sys.cancel"


def agent_subject(namespace: str) -> str:
    """Agent join/update/leave events of a namespace."""
    return f"_sys.agent.{namespace}"


def state_subject(namespace: str) -> str:
    """State store writes of a namespace (body: revision)."""
    return f"_sys.state.{namespace}"


def user_subject(namespace: str, subject: str) -> str:
    """A BusService subject inside its namespace."""
    return f"ns.{namespace}.{subject}"


def encode(body: dict[str, Any]) -> bytes:
    """Compact JSON."""
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    """Parse a body; malformed input gives an empty dict."""
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

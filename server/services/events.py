"""System subjects on the bus and their small JSON bodies.

Replicas tell each other about changes through these subjects; watchers
subscribe to them and read the current record from the store, so an event
never has to carry a whole task. User subjects live under ``<namespace>.``
(on the wire ``agentmesh.<namespace>.``, with the default key prefix) and can
never collide with ``_sys.``: a namespace starts with a letter or digit.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping
from typing import Any

from server.domain.errors import UnavailableError
from server.ports import Bus

log = logging.getLogger(__name__)

ORIGIN_HEADER = "am-origin"


class AgentEventType(enum.IntEnum):
    """What happened to an agent (values match the proto enum)."""

    JOINED = 1
    UPDATED = 2
    LEFT = 3


_ENDED_STATES = frozenset({4, 5, 6, 8})  # SUCCEEDED, FAILED, CANCELLED, DEAD_LETTERED


def task_subject(namespace: str, state: int) -> str:
    """Subject of a change into ``state``: ``_sys.task.<ns>.<live|ended>.<state>``.

    The state is in the subject so a watcher subscribes to just what it wants
    and the bus (NATS: the server) drops the rest before it is buffered.
    """
    kind = "ended" if state in _ENDED_STATES else "live"
    return f"_sys.task.{namespace}.{kind}.{state}"


def task_pattern(namespace: str, states: frozenset[int] = frozenset()) -> str:
    """The narrowest pattern covering changes into ``states`` (empty: all)."""
    if len(states) == 1:
        return task_subject(namespace, next(iter(states)))
    if states and states <= _ENDED_STATES:
        return f"_sys.task.{namespace}.ended.*"
    return f"_sys.task.{namespace}.>"


def workflow_subject(namespace: str) -> str:
    """Workflow state changes of a namespace."""
    return f"_sys.workflow.{namespace}"


def ready_subject(namespace: str) -> str:
    """Work became ready in a namespace (body: capability names)."""
    return f"_sys.ready.{namespace}"


READY_ALL = "_sys.ready.*"


def ready_namespace(subject: str) -> str | None:
    """The namespace of a ``ready_subject`` (None for any other subject)."""
    prefix = ready_subject("")
    rest = subject[len(prefix):] if subject.startswith(prefix) else ""
    return rest or None
CANCEL_SUBJECT = "_sys.cancel"


def breaker_subject(namespace: str) -> str:
    """Circuit-breaker outcomes of a namespace (body: agent, cap, ok); see services/breakers.py."""
    return f"_sys.breaker.{namespace}"


BREAKER_ALL = "_sys.breaker.*"
AGENT_STATE_ALL = "_sys.agent.*.state"
"""Agents joining, leaving or changing state, in every namespace (not load changes)."""


def agent_subject(namespace: str, *, load: bool = False) -> str:
    """Agent events of a namespace: ``.state`` for joins, leaves and state changes,
    ``.load`` for beats that only change in-flight/load (the dispatcher, which
    subscribes to ``AGENT_STATE_ALL``, never receives those)."""
    return f"_sys.agent.{namespace}.{'load' if load else 'state'}"


def agent_pattern(namespace: str) -> str:
    """Every agent event of a namespace (what WatchAgents streams)."""
    return f"_sys.agent.{namespace}.*"


def state_subject(namespace: str) -> str:
    """State store writes of a namespace (body: revision)."""
    return f"_sys.state.{namespace}"


def user_subject(namespace: str, subject: str) -> str:
    """A BusService subject inside its namespace."""
    return f"{namespace}.{subject}"


def task_event(task_id: str, state: int, workflow_id: str, capability: str,
               update_time: float = 0.0) -> bytes:
    """The body of a task event, built directly (hot path).

    Ids and capability names are validated to ``[A-Za-z0-9_.:/-]``, so they
    never need JSON escaping; ``encode`` is used for anything else. ``u`` (the
    version's ``update_time``, exact through ``repr``) lets a watcher on the
    replica that made the change use the version it already holds.
    """
    return (f'{{"id":"{task_id}","state":{state},"wf":"{workflow_id}",'
            f'"cap":"{capability}","u":{update_time!r}}}').encode()


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


async def announce(bus: Bus, subject: str, data: bytes,
                   headers: Mapping[str, str] | None = None) -> None:
    """Publish a system notification; a bus that is unavailable drops it.

    Notifications only wake watchers and dispatchers up: the store is the
    source of truth, watchers re-read it, and the scheduler's maintenance tick
    re-checks for work, so a lost one delays and never loses anything.
    """
    try:
        await bus.publish(subject, data, headers)
    except UnavailableError as exc:
        log.debug("notification on %s dropped: %s", subject, exc)


async def announce_agent(bus: Bus, kind: AgentEventType, agent_id: str, namespace: str,
                         now: float, *, load: bool = False) -> None:
    """Publish an agent event (``load``: a beat that changed only in-flight/load)."""
    await announce(bus, agent_subject(namespace, load=load),
                   encode({"id": agent_id, "type": int(kind), "time": now}))

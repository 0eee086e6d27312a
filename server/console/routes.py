"""The route table: every console URL, its handler, and the gRPC method it stands for.

A route's ``rpc`` is the gRPC method whose roles (``server.api.auth.RPC_ROLES``)
may use it, so the console can never let a role do what gRPC would refuse:
reading a task needs what ``GetTask`` needs, a bulk re-drive what
``BulkRetryTasks`` needs. ``None`` marks the few routes open to everyone
(sign-in, the session, the page itself). A new page adds its module and its
rows here.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.api.auth import RPC_ROLES
from server.console import (
    agents,
    approvals,
    dead_letters,
    events,
    overview,
    session,
    state,
    tasks,
    workflows,
)
from server.console.http import Handler


def _rpc(service: str, method: str) -> str:
    """The full path of a gRPC method of the role table (it must have a rule)."""
    (path,) = [p for p in RPC_ROLES if p.endswith(f".{service}/{method}")]
    return path


def _task(method: str) -> str:
    return _rpc("TaskService", method)


def _agents(method: str) -> str:
    return _rpc("DiscoveryService", method)


def _state(method: str) -> str:
    return _rpc("StateService", method)


@dataclass(frozen=True, slots=True)
class Route:
    """One URL of the console API."""

    method: str
    path: str
    handler: Handler
    rpc: str | None
    """The gRPC method whose roles may call this route; None: open to everyone."""


ROUTES: tuple[Route, ...] = (
    # session
    Route("GET", "/api/session", session.whoami, None),
    Route("POST", "/api/login", session.login, None),
    Route("POST", "/api/logout", session.logout, None),
    # overview and live updates
    Route("GET", "/api/overview", overview.overview, _task("GetStats")),
    Route("GET", "/api/events", events.stream, _task("WatchTasks")),
    # agents
    Route("GET", "/api/agents", agents.list_agents, _agents("ListAgents")),
    Route("POST", "/api/agents/{id}/drain", agents.drain_agent, _agents("DrainAgent")),
    # tasks
    Route("GET", "/api/tasks", tasks.list_tasks, _task("ListTasks")),
    Route("POST", "/api/tasks/bulk-retry", dead_letters.bulk_retry, _task("BulkRetryTasks")),
    Route("POST", "/api/tasks/bulk-cancel", dead_letters.bulk_cancel,
          _task("BulkCancelTasks")),
    Route("GET", "/api/tasks/{id}", tasks.get_task, _task("GetTask")),
    Route("POST", "/api/tasks/{id}/retry", tasks.retry_task, _task("RetryTask")),
    Route("POST", "/api/tasks/{id}/cancel", tasks.cancel_task, _task("CancelTask")),
    # people: tasks waiting for a decision
    Route("GET", "/api/approvals", approvals.list_approvals, _task("ListTasks")),
    Route("POST", "/api/tasks/{id}/decide", approvals.decide, _task("ResolveHumanTask")),
    # dead letters and the audit trail
    Route("GET", "/api/dead-letters", dead_letters.list_dead_letters, _task("ListTasks")),
    Route("GET", "/api/audit", dead_letters.audit_trail, _task("ListTasks")),
    # workflows
    Route("GET", "/api/workflows", workflows.list_workflows, _task("ListWorkflows")),
    Route("GET", "/api/workflows/{id}", workflows.get_workflow, _task("GetWorkflow")),
    # state
    Route("GET", "/api/state", state.list_state, _state("List")),
    Route("GET", "/api/locks", state.list_locks, _state("List")),
)

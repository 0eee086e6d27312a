"""OpenTelemetry tracing of the control plane (opt-in through ``OTEL_*`` env vars).

`setup_tracing` installs the tracer provider (the same rules as the SDK's, see
``agent_sdk/_tracing.py``: on only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_TRACES_EXPORTER`` asks for it). When it is off, `server_interceptors`
returns nothing and `TracingObserver` is not installed, so tracing costs
nothing.

Spans of a task, all children of the submitter's span (the W3C context in
``Task.trace_context``, taken from the ``traceparent`` metadata of the submit
call and copied into every step of a workflow):

- the gRPC SERVER span of each unary call (opentelemetry-instrumentation-grpc),
- ``queue wait <capability>``: from the moment the task became QUEUED (its
  creation, its promotion when its dependencies finished, or its requeue) to
  its assignment,
- ``assign <capability>``: the lease handed to an agent (agent id, attempt,
  fencing token),
- ``result <capability>``: from the assignment to the result (or failure)
  being recorded, with the outcome.

The agent's ``handle <capability>`` span (``agent_sdk``) has the same parent,
so a workflow is one trace across the client, every replica and every agent.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import grpc

from agent_sdk._tracing import configure_tracing, extract_context, sampled, traced_call, tracer
from server.domain.models import Lease, TaskState
from server.ports import Transition

log = logging.getLogger(__name__)

__all__ = ["TracingObserver", "server_interceptors", "setup_tracing"]

_MAX_REMEMBERED: Final = 100_000
_MAX_CONTEXTS: Final = 4096
_NS: Final = 1_000_000_000


def setup_tracing(service_name: str = "agentmesh-server") -> bool:
    """Configure tracing from the environment once; returns whether it is on."""
    on = configure_tracing(service_name)
    if on:
        log.info("tracing on (OpenTelemetry, exporter from OTEL_* env vars)")
    return on


def server_interceptors(enabled: bool) -> list[grpc.aio.ServerInterceptor]:
    """The OpenTelemetry server interceptor when ``enabled``, else ``[]``.

    It extracts the W3C context from the call metadata and makes a SERVER
    span current around each unary handler; the session-long streams
    (heartbeats, work stream, watches) are not traced.
    """
    if not enabled:
        return []
    from opentelemetry.instrumentation import grpc as otel_grpc  # noqa: PLC0415

    interceptor: grpc.aio.ServerInterceptor = otel_grpc.aio_server_interceptor(  # type: ignore[no-untyped-call]
        filter_=traced_call)
    return [interceptor]


def _ns(seconds: float) -> int:
    return int(seconds * _NS)


_RESULT_STATES: Final = frozenset({
    TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.DEAD_LETTERED,
    TaskState.RETRYING, TaskState.QUEUED,
})


class TracingObserver:
    """Scheduler observer that emits the queue-wait, assignment and result spans.

    Spans are created after the fact with explicit start and end times, as
    children of the task's stored trace context; a task without one gets no
    span. Only installed when tracing is on.
    """

    def __init__(self) -> None:
        """Start with no remembered queue entry times."""
        self._queued_at: OrderedDict[str, float] = OrderedDict()
        self._contexts: OrderedDict[str, Any] = OrderedDict()

    def _context(self, trace_context: Mapping[str, str]) -> Any:
        """The parsed parent context, cached: a workflow's steps (and a batch's
        tasks) share one, and parsing is the costly part of a span."""
        key = trace_context.get("traceparent", "") + "|" + trace_context.get("tracestate", "")
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = extract_context(trace_context)
            if len(self._contexts) > _MAX_CONTEXTS:
                self._contexts.popitem(last=False)
        return ctx

    def transition(self, transition: Transition, now: float) -> None:
        """Remember when tasks became QUEUED; emit result spans of finished attempts."""
        for change in transition.tasks:
            task = change.task
            if not task.trace_context or not sampled(task.trace_context):
                continue
            if (task.state is TaskState.QUEUED
                    and change.previous_state is not TaskState.QUEUED):
                self._remember(task.id, now)
            if change.previous_state is TaskState.RUNNING and task.state in _RESULT_STATES:
                outcome = task.state.name.lower()
                span = tracer().start_span(
                    f"result {task.capability}", context=self._context(task.trace_context),
                    start_time=_ns(task.start_time or now), attributes=self._attrs(
                        task.id, task.workflow_id, task.capability, task.attempt)
                    | {"agentmesh.outcome": outcome, "agentmesh.agent_id": task.agent_id})
                if task.failure is not None:
                    span.set_attribute("error.type", task.failure.error_type)
                if task.state is not TaskState.SUCCEEDED:
                    from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

                    span.set_status(Status(StatusCode.ERROR, outcome))
                span.end(end_time=_ns(now))

    def dispatched(self, lease: Lease, now: float) -> None:
        """Emit the queue-wait span (queued -> now) and the assignment span."""
        task = lease.task
        queued = self._queued_at.pop(task.id, None)
        if not task.trace_context or not sampled(task.trace_context):
            return
        if queued is None:
            queued = task.create_time if task.attempt <= 1 else now
        ctx = self._context(task.trace_context)
        attrs = self._attrs(task.id, task.workflow_id, task.capability, task.attempt)
        t = tracer()
        wait = t.start_span(f"queue wait {task.capability}", context=ctx,
                            start_time=_ns(min(queued, now)), attributes=attrs)
        wait.end(end_time=_ns(now))
        from opentelemetry.trace import SpanKind  # noqa: PLC0415

        assign = t.start_span(f"assign {task.capability}", context=ctx, kind=SpanKind.PRODUCER,
                              start_time=_ns(now), attributes=attrs | {
                                  "agentmesh.agent_id": task.agent_id,
                                  "agentmesh.fencing_token": lease.fencing_token})
        assign.end(end_time=_ns(now))

    def stale_result(self, task_id: str) -> None:
        """Nothing to trace."""

    def breaker_changed(self, agent_id: str, capability: str, state: str) -> None:
        """Nothing to trace."""

    def _remember(self, task_id: str, now: float) -> None:
        queued = self._queued_at
        queued[task_id] = now
        queued.move_to_end(task_id)
        while len(queued) > _MAX_REMEMBERED:
            queued.popitem(last=False)

    @staticmethod
    def _attrs(task_id: str, workflow_id: str, capability: str, attempt: int) -> dict[str, Any]:
        attrs: dict[str, Any] = {"agentmesh.task_id": task_id,
                                 "agentmesh.capability": capability,
                                 "agentmesh.attempt": attempt}
        if workflow_id:
            attrs["agentmesh.workflow_id"] = workflow_id
        return attrs

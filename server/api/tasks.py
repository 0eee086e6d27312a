"""TaskService servicer: thin, converts and delegates to the Scheduler."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import grpc
from agentmesh.v1 import task_pb2, task_pb2_grpc

from server.api import auth, convert, errors
from server.api.convert import Limits
from server.api.streams import Duplex, first_message
from server.domain.chunks import CHUNK_LIMIT
from server.domain.errors import (
    AgentMeshError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    StaleLeaseError,
)
from server.domain.human import Decision
from server.domain.models import AgentState, TaskFailure, TaskState
from server.ports import AgentFilter, TaskFilter
from server.services import bulk
from server.services.approvals import HumanDesk
from server.services.bulk import BulkActions
from server.services.chunks import TaskChunks
from server.services.registry import Registry
from server.services.scheduler import Scheduler
from server.services.sessions import (
    Assignment,
    Cancellation,
    Outbound,
    SessionEnded,
    WorkerSession,
)

Ctx = grpc.aio.ServicerContext[Any, Any]
_TRACE_KEYS = ("traceparent", "tracestate")
MAX_BATCH = 1000


def trace_context(context: Ctx) -> dict[str, str]:
    """The W3C trace context of the incoming call, if any."""
    md = context.invocation_metadata() or ()
    return {str(k): str(v) for k, v in md if k in _TRACE_KEYS}


class TaskServicer(task_pb2_grpc.TaskServiceServicer):
    """gRPC face of the task queue."""

    def __init__(self, scheduler: Scheduler, registry: Registry, limits: Limits,
                 chunks: TaskChunks, desk: HumanDesk, *,
                 bulk: BulkActions | None = None) -> None:
        self._scheduler = scheduler
        self._registry = registry
        self._limits = limits
        self._chunks = chunks
        self._bulk = bulk or BulkActions(scheduler)
        self._desk = desk

    async def _task_msg(self, task_id: str) -> task_pb2.Task:
        task = await self._scheduler.get_task(task_id)
        auth.require_visible(task.namespace, "task", f"tasks/{task_id}")
        live = await self._scheduler.live_capabilities(task.namespace)
        return convert.task_to_proto(task, live=live)

    @errors.unary
    async def SubmitTask(self, request: task_pb2.SubmitTaskRequest,
                         context: Ctx) -> task_pb2.SubmitTaskResponse:
        """See the proto."""
        task = convert.task_from_submit(request, self._limits, trace_context(context))
        task = replace(task, labels=auth.owner_labels(task.labels))
        stored = await self._scheduler.submit(
            task, request_id=convert.request_id(request.request_id, self._limits))
        return task_pb2.SubmitTaskResponse(task=convert.task_to_proto(stored))

    @errors.unary
    async def BatchSubmitTasks(self, request: task_pb2.BatchSubmitTasksRequest,
                               context: Ctx) -> task_pb2.BatchSubmitTasksResponse:
        """See the proto."""
        if not request.requests:
            raise InvalidArgumentError.field("requests", "at least one request")
        if len(request.requests) > MAX_BATCH:
            raise InvalidArgumentError.field("requests", f"at most {MAX_BATCH} requests")
        trace = trace_context(context)
        parsed = []
        for i, item in enumerate(request.requests):
            try:
                task = convert.task_from_submit(item, self._limits, trace)
                owned = auth.owner_labels(task.labels)
                if owned != task.labels:
                    task = replace(task, labels=owned)
                parsed.append((task, convert.request_id(item.request_id, self._limits)))
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(
                    f"requests[{i}].{exc.message}",
                    [FieldViolation(f"requests[{i}].{v.field}", v.description)
                     for v in exc.violations]) from exc
        stored = await self._scheduler.submit_many(parsed)
        return task_pb2.BatchSubmitTasksResponse(tasks=[convert.task_to_proto(t) for t in stored])

    @errors.unary
    async def GetTask(self, request: task_pb2.GetTaskRequest,
                      context: Ctx) -> task_pb2.GetTaskResponse:
        """See the proto."""
        return task_pb2.GetTaskResponse(
            task=await self._task_msg(convert.resource_id(request.name, "tasks")))

    @errors.unary
    async def ListTasks(self, request: task_pb2.ListTasksRequest,
                        context: Ctx) -> task_pb2.ListTasksResponse:
        """See the proto."""
        size = convert.page_size(request.page_size)
        flt = convert.task_filter(request, self._limits)
        ns = flt.namespace
        fkey = convert.task_filter_key(flt)
        before = convert.decode_page_token(request.page_token, fkey, convert.Cursor.SEQ)
        tasks = await self._scheduler.list_tasks(flt, before_seq=before,
                                                 limit=size + 1)
        token = convert.encode_page_token(tasks[size - 1].seq, fkey) if len(tasks) > size else ""
        live = await self._scheduler.live_capabilities(ns)
        return task_pb2.ListTasksResponse(
            tasks=[convert.task_to_proto(t, live=live) for t in tasks[:size]],
            next_page_token=token)

    @errors.unary
    async def CancelTask(self, request: task_pb2.CancelTaskRequest,
                         context: Ctx) -> task_pb2.CancelTaskResponse:
        """See the proto."""
        task_id = convert.resource_id(request.name, "tasks")
        if auth.caller() is not None:
            before = await self._scheduler.get_task(task_id)
            auth.require_visible(before.namespace, "task", f"tasks/{task_id}")
            auth.check_owner(before.labels, "cancel", f"tasks/{task_id}", before.namespace)
        task = await self._scheduler.cancel(task_id, request.reason[:1024])
        return task_pb2.CancelTaskResponse(task=convert.task_to_proto(task))

    @errors.unary
    async def RetryTask(self, request: task_pb2.RetryTaskRequest,
                        context: Ctx) -> task_pb2.RetryTaskResponse:
        """See the proto."""
        new_input = (convert.payload(request.input, "input", self._limits)
                     if request.HasField("input") else None)
        task_id = convert.resource_id(request.name, "tasks")
        before = await self._scheduler.get_task(task_id)
        auth.require_visible(before.namespace, "task", f"tasks/{task_id}")
        with auth.audited("redrive", f"tasks/{task_id}", before.namespace):
            task = await self._scheduler.retry(task_id, new_input)
        return task_pb2.RetryTaskResponse(task=convert.task_to_proto(task))

    @errors.streaming
    async def WatchTasks(self, request: task_pb2.WatchTasksRequest,
                         context: Ctx) -> AsyncIterator[task_pb2.WatchTasksResponse]:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        names = convert.names(request.names, "tasks", "names")
        wf = (convert.resource_id(request.workflow, "workflows", "workflow")
              if request.workflow else "")
        cap = convert.capability(request.capability, "capability", required=False)
        states = frozenset(int(s) for s in (convert.task_state(v, f"states[{i}]")
                                            for i, v in enumerate(request.states)) if s)
        if request.max_batch_size < 0:
            raise InvalidArgumentError.field("max_batch_size", "must not be negative")
        max_batch = min(request.max_batch_size, MAX_BATCH)
        batches = self._scheduler.watch_task_batches(
            ns, names=names, capability=cap, workflow_id=wf, states=states,
            max_pending=self._limits.max_watch_pending, max_batch=max(1, max_batch))
        try:
            async for batch in batches:
                if max_batch > 1:
                    yield task_pb2.WatchTasksResponse(
                        tasks=[convert.task_to_proto(t) for t in batch])
                else:
                    yield task_pb2.WatchTasksResponse(task=convert.task_to_proto(batch[0]))
        finally:
            await batches.aclose()

    @errors.unary
    async def SubmitWorkflow(self, request: task_pb2.SubmitWorkflowRequest,
                             context: Ctx) -> task_pb2.SubmitWorkflowResponse:
        """See the proto."""
        wf = convert.workflow_from_submit(request, self._limits, trace_context(context))
        wf = replace(wf, labels=auth.owner_labels(wf.labels))
        stored = await self._scheduler.submit_workflow(
            wf, request_id=convert.request_id(request.request_id, self._limits))
        wf2, steps = await self._scheduler.get_workflow(stored.id)
        return task_pb2.SubmitWorkflowResponse(workflow=convert.workflow_to_proto(wf2, steps))

    @errors.unary
    async def GetWorkflow(self, request: task_pb2.GetWorkflowRequest,
                          context: Ctx) -> task_pb2.GetWorkflowResponse:
        """See the proto."""
        wf, steps = await self._scheduler.get_workflow(
            convert.resource_id(request.name, "workflows"))
        auth.require_visible(wf.namespace, "workflow", f"workflows/{wf.id}")
        live = await self._scheduler.live_capabilities(wf.namespace)
        return task_pb2.GetWorkflowResponse(workflow=convert.workflow_to_proto(wf, steps,
                                                                               live=live))

    @errors.unary
    async def ListWorkflows(self, request: task_pb2.ListWorkflowsRequest,
                            context: Ctx) -> task_pb2.ListWorkflowsResponse:
        """See the proto."""
        size = convert.page_size(request.page_size)
        ns = convert.namespace(request.namespace)
        state = convert.workflow_state(request.state)
        fkey = f"{ns}|{request.state}"
        before = convert.decode_page_token(request.page_token, fkey, convert.Cursor.SEQ)
        wfs = await self._scheduler.list_workflows(ns, state, before_seq=before,
                                                   limit=size + 1)
        token = convert.encode_page_token(wfs[size - 1].seq, fkey) if len(wfs) > size else ""
        return task_pb2.ListWorkflowsResponse(
            workflows=[convert.workflow_to_proto(w) for w in wfs[:size]], next_page_token=token)

    @errors.unary
    async def CancelWorkflow(self, request: task_pb2.CancelWorkflowRequest,
                             context: Ctx) -> task_pb2.CancelWorkflowResponse:
        """See the proto."""
        wf_id = convert.resource_id(request.name, "workflows")
        if auth.caller() is not None:
            before, _ = await self._scheduler.get_workflow(wf_id)
            auth.require_visible(before.namespace, "workflow", f"workflows/{wf_id}")
            auth.check_owner(before.labels, "cancel", f"workflows/{wf_id}", before.namespace)
        wf = await self._scheduler.cancel_workflow(wf_id, request.reason[:1024])
        wf2, steps = await self._scheduler.get_workflow(wf.id)
        return task_pb2.CancelWorkflowResponse(workflow=convert.workflow_to_proto(wf2, steps))

    @errors.streaming
    async def WatchWorkflow(self, request: task_pb2.WatchWorkflowRequest,
                            context: Ctx) -> AsyncIterator[task_pb2.WatchWorkflowResponse]:
        """See the proto."""
        wf_id = convert.resource_id(request.name, "workflows")
        if auth.caller() is not None:
            before, _ = await self._scheduler.get_workflow(wf_id)
            auth.require_visible(before.namespace, "workflow", f"workflows/{wf_id}")
        async for wf, steps in self._scheduler.watch_workflow(
                wf_id, max_pending=self._limits.max_watch_pending):
            live = await self._scheduler.live_capabilities(wf.namespace)
            yield task_pb2.WatchWorkflowResponse(
                workflow=convert.workflow_to_proto(wf, steps, live=live))

    @errors.streaming
    async def ProcessTasks(self, request_iterator: AsyncIterator[task_pb2.ProcessTasksRequest],
                           context: Ctx) -> AsyncIterator[task_pb2.ProcessTasksResponse]:
        """See the proto."""
        first = await first_message(request_iterator, "open", "open")
        agent_id = convert.resource_id(first.open.agent, "agents", "open.agent")
        agent = await self._registry.authenticate(agent_id, first.open.session_token)
        auth.check_agent_identity(agent.labels, f"agents/{agent.id}")
        scheduler = self._scheduler
        leases = scheduler.leases
        ended: list[SessionEnded] = []

        def send(item: Outbound) -> None:
            if isinstance(item, SessionEnded):
                ended.append(item)
                duplex.send(None)
                return
            duplex.send(_outbound(item))

        session = WorkerSession(agent.id, agent.namespace,
                                tuple(sorted(agent.capability_names)), agent.max_concurrency,
                                send, ack_reports=first.open.ack_reports)

        async def report_results(results: Sequence[task_pb2.TaskResult], field: str) -> None:
            items = []
            for i, r in enumerate(results):
                task_id = convert.resource_id(r.task, "tasks", f"{field}[{i}].task")
                try:
                    output = convert.payload(r.output, f"{field}[{i}].output", self._limits)
                except (InvalidArgumentError, ResourceExhaustedError) as exc:
                    # One bad output fails its own attempt for good (a retry would
                    # produce it again); the stream and the agent's other leases go on.
                    outcome = await leases.report_failure(session, task_id, r.fencing_token,
                                                          TaskFailure(INVALID_OUTPUT,
                                                                      exc.message[:512],
                                                                      non_retryable=True))
                    leases.acknowledge(session, task_id, r.fencing_token, outcome)
                    continue
                items.append((task_id, r.fencing_token, output))
            if not items:
                return
            outcomes = await leases.report_results(session, items)
            for (task_id, token, _), outcome in zip(items, outcomes, strict=True):
                leases.acknowledge(session, task_id, token, outcome)

        async def report_failure(f: task_pb2.TaskFailureReport, field: str) -> None:
            task_id = convert.resource_id(f.task, "tasks", f"{field}.task")
            outcome = await leases.report_failure(
                session, task_id, f.fencing_token, convert.failure(f.failure, field))
            leases.acknowledge(session, task_id, f.fencing_token, outcome)

        async def report_chunks(chunks: Sequence[task_pb2.TaskChunk]) -> None:
            # Consecutive chunks of one lease go to the store together, in order.
            groups: list[tuple[str, int, list[tuple[int, task_pb2.TaskChunk]]]] = []
            for i, c in enumerate(chunks):
                task_id = convert.resource_id(c.task, "tasks", f"chunks.chunks[{i}].task")
                if groups and groups[-1][0] == task_id and groups[-1][1] == c.fencing_token:
                    groups[-1][2].append((i, c))
                else:
                    groups.append((task_id, c.fencing_token, [(i, c)]))
            for task_id, token, items in groups:
                try:
                    drafts = [convert.chunk_draft(c, f"chunks.chunks[{i}]") for i, c in items]
                    await self._chunks.append(session, task_id, token, drafts,
                                              f"chunks.chunks[{items[0][0]}:]")
                except AgentMeshError as exc:
                    duplex.send(_chunk_refusal(task_id, token, exc))

        async def handle(req: task_pb2.ProcessTasksRequest) -> None:
            kind = req.WhichOneof("kind")
            if kind == "credit":
                if req.credit.count < 1:
                    raise InvalidArgumentError.field("credit.count", "must be at least 1")
                scheduler.grant(session, req.credit.count)
            elif kind == "result":
                await report_results([req.result], "result")
            elif kind == "failure":
                await report_failure(req.failure, "failure")
            elif kind == "reports":
                if req.reports.results:
                    await report_results(req.reports.results, "reports.results")
                for i, f in enumerate(req.reports.failures):
                    await report_failure(f, f"reports.failures[{i}]")
            elif kind == "chunks":
                await report_chunks(req.chunks.chunks)
            elif kind == "progress":
                p = req.progress
                task_id = convert.resource_id(p.task, "tasks", "progress.task")
                if not await leases.holds(session, task_id, p.fencing_token):
                    # Not (or no longer) this stream's lease: a progress that crossed a
                    # cancellation or an expiry. Tell the agent to stop that attempt;
                    # the stream and the agent's other tasks carry on.
                    send(Cancellation(task_id, p.fencing_token, "not leased to this stream"))
                    return
                await leases.renew(session, task_id, p.fencing_token)
            else:
                raise InvalidArgumentError.field("kind", f"unexpected message `{kind}`")

        duplex: Duplex[task_pb2.ProcessTasksRequest, task_pb2.ProcessTasksResponse] = Duplex(
            request_iterator, handle, max_outbox=4 * agent.max_concurrency + 64,
            pack=lambda ready: _pack_assignments(ready, self._limits.max_message_bytes))
        await scheduler.open_session(session)
        try:
            yield task_pb2.ProcessTasksResponse(opened=task_pb2.ProcessTasksOpened(
                agent=f"agents/{agent.id}",
                max_chunk_bytes=self._chunks.limits.max_chunk_bytes,
                max_chunks_per_task=self._chunks.limits.max_chunks_per_task))
            async for response in duplex.responses():
                yield response
            if ended:
                # The server ended the session (the agent is GONE): a status the
                # agent can act on (register again), not a quiet end of stream.
                raise FailedPreconditionError(ended[0].message, reason=ended[0].reason)
        finally:
            await scheduler.close_session(session)

    @errors.unary
    async def CompleteTask(self, request: task_pb2.CompleteTaskRequest,
                           context: Ctx) -> task_pb2.CompleteTaskResponse:
        """See the proto."""
        task_id = convert.resource_id(request.task, "tasks", "task")
        kind = request.WhichOneof("outcome")
        if kind is None:
            raise InvalidArgumentError.field("outcome", "set output or failure")
        output = (convert.payload(request.output, "output", self._limits)
                  if kind == "output" else None)
        failure = convert.failure(request.failure, "failure") if kind == "failure" else None
        if auth.caller() is not None:
            await self._check_leased_to_caller(task_id)
        task = await self._scheduler.complete_unary(task_id, request.fencing_token, output,
                                                    failure)
        return task_pb2.CompleteTaskResponse(task=convert.task_to_proto(task))

    @errors.unary
    async def AppendTaskChunks(self, request: task_pb2.AppendTaskChunksRequest,
                               context: Ctx) -> task_pb2.AppendTaskChunksResponse:
        """See the proto."""
        task_id = convert.resource_id(request.task, "tasks", "task")
        drafts = [convert.chunk_draft(c, f"chunks[{i}]") for i, c in enumerate(request.chunks)]
        if auth.caller() is not None:
            await self._check_leased_to_caller(task_id)
        added = await self._chunks.append(None, task_id, request.fencing_token, drafts)
        return task_pb2.AppendTaskChunksResponse(
            chunks=[convert.chunk_to_proto(c) for c in added])

    @errors.streaming
    async def WatchTaskChunks(self, request: task_pb2.WatchTaskChunksRequest,
                              context: Ctx) -> AsyncIterator[task_pb2.WatchTaskChunksResponse]:
        """See the proto."""
        task_id = convert.resource_id(request.name, "tasks")
        if request.after_sequence < 0:
            raise InvalidArgumentError.field("after_sequence", "must not be negative")
        first = await self._scheduler.get_task(task_id)
        auth.require_visible(first.namespace, "task", f"tasks/{task_id}")
        stream = self._chunks.watch(task_id, request.after_sequence)
        try:
            async for item in stream:
                if isinstance(item, list):
                    yield task_pb2.WatchTaskChunksResponse(
                        chunks=[convert.chunk_to_proto(c) for c in item])
                else:
                    live = await self._scheduler.live_capabilities(item.namespace)
                    yield task_pb2.WatchTaskChunksResponse(
                        task=convert.task_to_proto(item, live=live))
        finally:
            await stream.aclose()

    @errors.unary
    async def ResolveHumanTask(self, request: task_pb2.ResolveHumanTaskRequest,
                               context: Ctx) -> task_pb2.ResolveHumanTaskResponse:
        """See the proto; the approver is the caller's principal when auth is on."""
        task_id = convert.resource_id(request.name, "tasks")
        try:
            decision = Decision(request.decision)
        except ValueError:
            raise InvalidArgumentError.field(
                "decision", "APPROVE, REJECT or SUPPLY_INPUT") from None
        if decision is Decision.SUPPLY_INPUT and not request.HasField("input"):
            raise InvalidArgumentError.field("input", "required with SUPPLY_INPUT")
        value = (convert.decoded_payload(convert.payload(request.input, "input", self._limits))
                 if request.HasField("input") else None)
        comment = convert.text(request.comment, "comment", 1024)
        who = auth.caller()
        if who is None:
            approver, role = convert.text(request.approver, "approver", 128) or "anonymous", ""
        else:
            approver, role = who.name, who.role.value
        task = await self._scheduler.get_task(task_id)
        auth.require_visible(task.namespace, "task", f"tasks/{task_id}")
        with auth.audited(f"human.{decision.name.lower()}", f"tasks/{task_id}", task.namespace):
            done = await self._desk.resolve(task_id, decision, value=value, comment=comment,
                                            who=approver, role=role)
        return task_pb2.ResolveHumanTaskResponse(task=convert.task_to_proto(done))

    async def _check_leased_to_caller(self, task_id: str) -> None:
        """PERMISSION_DENIED unless the task is leased to an agent of the caller."""
        task = await self._scheduler.get_task(task_id)
        auth.require_visible(task.namespace, "task", f"tasks/{task_id}")
        labels: Mapping[str, str] = {}
        if task.agent_id:
            try:
                labels = (await self._registry.get(task.agent_id)).labels
            except NotFoundError:
                labels = {}
        auth.check_agent_identity(labels, f"tasks/{task_id}")

    @errors.unary
    async def BulkRetryTasks(self, request: task_pb2.BulkRetryTasksRequest,
                             context: Ctx) -> task_pb2.BulkRetryTasksResponse:
        """Audited as one ``bulk-redrive`` record plus one ``redrive`` per task."""
        flt, limit = self._selection(request.selector, request.max_tasks)
        with auth.audited("bulk-redrive", _describe(flt, request.dry_run), flt.namespace):
            result = await self._bulk.redrive(flt, limit=limit, dry_run=request.dry_run)
        if not request.dry_run:
            for task_id in result.task_ids:
                auth.audit("redrive", f"tasks/{task_id}", flt.namespace, "ok")
        return task_pb2.BulkRetryTasksResponse(
            names=[f"tasks/{t}" for t in result.task_ids], truncated=result.truncated)

    @errors.unary
    async def BulkCancelTasks(self, request: task_pb2.BulkCancelTasksRequest,
                              context: Ctx) -> task_pb2.BulkCancelTasksResponse:
        """Audited as one ``bulk-cancel`` record plus one ``cancel`` per task."""
        flt, limit = self._selection(request.selector, request.max_tasks)
        reason = request.reason[:1024] or "cancelled in bulk"
        with auth.audited("bulk-cancel", _describe(flt, request.dry_run), flt.namespace):
            result = await self._bulk.cancel(flt, limit=limit, dry_run=request.dry_run,
                                             reason=reason)
        if not request.dry_run:
            for task_id in result.task_ids:
                auth.audit("cancel", f"tasks/{task_id}", flt.namespace, "ok")
        return task_pb2.BulkCancelTasksResponse(
            names=[f"tasks/{t}" for t in result.task_ids], truncated=result.truncated)

    def _selection(self, sel: task_pb2.TaskSelector, max_tasks: int) -> tuple[TaskFilter, int]:
        flt = convert.task_filter(sel, self._limits, prefix="selector.")
        return flt, bulk.max_tasks(max_tasks)

    @errors.unary
    async def GetStats(self, request: task_pb2.GetStatsRequest,
                       context: Ctx) -> task_pb2.GetStatsResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        stats = await self._scheduler.stats(ns)
        by_state: Mapping[TaskState, int] = stats.tasks_by_state
        live = await self._registry.list(AgentFilter(ns, states=frozenset({AgentState.ACTIVE})),
                                         after_id="", limit=100_000)
        return task_pb2.GetStatsResponse(
            tasks_by_state={s.name: n for s, n in by_state.items()},
            tasks_ended=stats.tasks_ended,
            tasks_succeeded_autonomously=stats.tasks_succeeded_autonomously,
            autonomy=stats.autonomy, agents_live=len(live))


def _describe(flt: TaskFilter, dry_run: bool) -> str:
    """The audit resource of a bulk action: its filter, readable."""
    parts = [f"state={flt.state.name}" if flt.state is not None else "",
             f"capability={flt.capability}" if flt.capability else "",
             f"workflow={flt.workflow_id}" if flt.workflow_id else "",
             *(f"label:{k}={v}" for k, v in sorted(flt.labels.items())),
             f"created>={flt.created_after:.0f}" if flt.created_after else "",
             f"created<{flt.created_before:.0f}" if flt.created_before else "",
             "dry-run" if dry_run else ""]
    return "tasks?" + "&".join(p for p in parts if p)


PACK_HEADROOM = 1024
"""Bytes every packed message keeps under the message limit."""
ASSIGNMENT_TOO_LARGE = "ASSIGNMENT_TOO_LARGE"
INVALID_OUTPUT = "INVALID_OUTPUT"
"""A reported output the server cannot keep (over the payload limit, bad metadata)."""


def _pack_assignments(
        ready: list[task_pb2.ProcessTasksResponse], max_bytes: int,
) -> tuple[list[task_pb2.ProcessTasksResponse], list[task_pb2.ProcessTasksRequest]]:
    """Merge the ready assignments into batch messages, each within the message limit.

    Sizes are measured (``ByteSize``, with the framing of the batch) and every
    message stays ``PACK_HEADROOM`` under ``max_bytes``, so a burst of large
    tasks goes out as several batches instead of one message gRPC refuses to
    send (which ended the agent's stream). A standalone task always fits
    (``Settings`` keeps ``MESSAGE_HEADROOM_BYTES`` next to the payload limit);
    a workflow step carries its upstream results too, whose sizes are known
    only once they ran, so a step whose assignment fits in no message is not
    sent: it is answered for the agent as a non-retryable
    ASSIGNMENT_TOO_LARGE failure (its workflow fails with that reason) and
    the stream carries on. Returns (messages, failure reports to handle).
    """
    budget = max_bytes - PACK_HEADROOM
    out: list[task_pb2.ProcessTasksResponse] = []
    refused: list[task_pb2.ProcessTasksRequest] = []
    batch: list[task_pb2.ProcessTasksResponse] = []
    used = 0
    for response in ready:
        if response.WhichOneof("kind") != "assignment":
            out.append(response)
            continue
        size = response.assignment.ByteSize()
        item = size + 1 + _varint_len(size)  # tag and length within the batch
        if item + 8 > budget:  # 8: the batch's own tag and length
            refused.append(_too_large(response.assignment, size, max_bytes))
            continue
        if batch and used + item + 8 > budget:
            out.append(_batch(batch))
            batch, used = [], 0
        batch.append(response)
        used += item
    if batch:
        out.append(_batch(batch))
    return out, refused


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _batch(responses: list[task_pb2.ProcessTasksResponse]) -> task_pb2.ProcessTasksResponse:
    if len(responses) == 1:
        return responses[0]
    return task_pb2.ProcessTasksResponse(assignments=task_pb2.TaskAssignmentBatch(
        assignments=[r.assignment for r in responses]))


def _too_large(assignment: task_pb2.TaskAssignment, size: int,
               max_bytes: int) -> task_pb2.ProcessTasksRequest:
    """The failure report that answers an assignment no message can carry."""
    task = assignment.task
    upstream = sum(p.ByteSize() for p in task.dependency_outputs.values())
    return task_pb2.ProcessTasksRequest(failure=task_pb2.TaskFailureReport(
        task=task.name, fencing_token=assignment.fencing_token,
        failure=task_pb2.TaskFailure(
            error_type=ASSIGNMENT_TOO_LARGE, non_retryable=True,
            message=f"the assignment is {size} bytes (input {task.input.ByteSize()}, upstream "
                    f"results {upstream}); a message is limited to {max_bytes} bytes: pass "
                    "large data by reference (a state key, a blob)")))


def _chunk_refusal(task_id: str, token: int,
                   exc: AgentMeshError) -> task_pb2.ProcessTasksResponse:
    """The ack that tells the agent why chunks of one lease were refused."""
    if isinstance(exc, StaleLeaseError):
        outcome, reason = task_pb2.TASK_REPORT_OUTCOME_STALE_LEASE, ""
    elif isinstance(exc, FailedPreconditionError | NotFoundError):
        outcome, reason = task_pb2.TASK_REPORT_OUTCOME_NOT_RUNNING, ""
    else:
        outcome = task_pb2.TASK_REPORT_OUTCOME_INVALID
        reason = CHUNK_LIMIT if isinstance(exc, ResourceExhaustedError) else exc.reason
    return task_pb2.ProcessTasksResponse(chunk_ack=task_pb2.TaskChunkAck(
        task=f"tasks/{task_id}", fencing_token=token, outcome=outcome, reason=reason,
        message=exc.message[:1024]))


def _outbound(item: Outbound) -> task_pb2.ProcessTasksResponse | None:
    if item is None or isinstance(item, SessionEnded):
        return None
    if isinstance(item, Assignment):
        lease = item.lease
        return task_pb2.ProcessTasksResponse(assignment=task_pb2.TaskAssignment(
            task=convert.task_for_agent(lease.task), fencing_token=lease.fencing_token,
            lease_expire_time=convert.to_timestamp(lease.deadline)))
    if isinstance(item, Cancellation):
        return task_pb2.ProcessTasksResponse(cancellation=task_pb2.TaskCancellation(
            task=f"tasks/{item.task_id}", fencing_token=item.fencing_token, reason=item.reason))
    return task_pb2.ProcessTasksResponse(ack=task_pb2.TaskReportAck(
        task=f"tasks/{item.task_id}", fencing_token=item.fencing_token,
        outcome=item.outcome))  # type: ignore[arg-type]

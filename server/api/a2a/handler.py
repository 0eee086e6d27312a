"""The a2a-sdk RequestHandler of the gateway: A2A calls on the mesh's own services.

The mesh is the task store: an A2A task *is* a mesh task (same id), so get,
list, cancel and subscribe read and change the mesh directly, on any replica.
A message names a skill (a capability) in its metadata (``"skill"``; when the
mesh offers exactly one, it may be left out); its message id is the submit's
idempotency key, so a client that re-sends a message gets the same task.

With auth on, the gateway (``access.py``) has let the caller through with a
role that may do what the method does; here each method acts as that
principal, as a gRPC servicer does: a submitted task is owned by it, only
its own tasks may it cancel (an admin any), and it is the approver it
records when its message decides an ``input-required`` task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator

from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.types import a2a_pb2
from a2a.utils.errors import (
    InternalError,
    InvalidParamsError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)

from server.api import auth, convert
from server.api.a2a import mapping
from server.api.a2a.access import Refused, disconnected_of, principal_of
from server.domain.chunks import ChunkKind, TaskChunk
from server.domain.errors import (
    AgentMeshError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from server.domain.human import HUMAN_CAPABILITY, Decision, is_human
from server.domain.models import Payload, Task
from server.ports import TaskFilter
from server.services.approvals import HumanDesk
from server.services.chunks import TaskChunks
from server.services.scheduler import Scheduler

MAX_PAGE = 100
DISCONNECT_POLL = 0.5
"""Seconds between checks that a blocking send's client is still there."""
MAX_REQUEST_ID = convert.Limits().max_request_id_bytes
_DECISIONS = {"approve": Decision.APPROVE, "approved": Decision.APPROVE,
              "reject": Decision.REJECT, "rejected": Decision.REJECT}


@contextlib.contextmanager
def a2a_errors() -> Iterator[None]:
    """Mesh errors as the A2A errors the spec names."""
    try:
        yield
    except NotFoundError as exc:
        raise TaskNotFoundError(exc.message) from None
    except InvalidArgumentError as exc:
        raise InvalidParamsError(exc.message) from None
    except FailedPreconditionError as exc:  # cancel of a task that has ended
        raise TaskNotCancelableError(exc.message) from None
    except PermissionDeniedError as exc:  # another principal's task: 403, as the guard's
        raise Refused(exc, 403) from None
    except ResourceExhaustedError as exc:
        if exc.reason == "PAYLOAD_TOO_LARGE":  # the request's fault, not the server's load
            raise InvalidParamsError(exc.message) from None
        raise Refused(exc, 429) from None
    except AgentMeshError as exc:
        raise InternalError(f"{exc.reason}: {exc.message}") from None


def _request_id(message_id: str) -> str:
    """The idempotency key of a message: its id, or the id's digest when longer than a
    request id may be (cutting it made two messages that differ past 124 characters one
    task)."""
    if not message_id:
        return ""
    key = f"a2a:{message_id}"
    if len(key.encode("utf-8", "surrogatepass")) <= MAX_REQUEST_ID:
        return key
    return "a2a:sha256:" + hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()


class MeshRequestHandler(RequestHandler):
    """A2A requests served by the mesh."""

    def __init__(self, scheduler: Scheduler, chunks: TaskChunks, desk: HumanDesk, *,
                 card: Callable[[], Awaitable[a2a_pb2.AgentCard]],
                 quota: auth.StreamQuota | None = None,
                 limits: convert.Limits | None = None) -> None:
        self._scheduler = scheduler
        self._limits = limits or convert.Limits()
        self._chunks = chunks
        self._desk = desk
        self._card = card
        self._quota = quota or auth.StreamQuota()

    @contextlib.contextmanager
    def _stream(self, context: ServerCallContext) -> Iterator[None]:
        """One watch stream for the block, counted as gRPC watches are (429 past the
        server's bounds: ``max_watch_streams``, ``max_streams_per_principal``)."""
        principal = principal_of(context)
        error = self._quota.open(principal, watch=True)
        if error is not None:
            raise Refused(error, 429)
        try:
            yield
        finally:
            self._quota.close(principal, watch=True)

    @staticmethod
    def _namespace(tenant: str) -> str:
        """The tenant as a namespace (``default`` when empty), checked as gRPC checks one:
        an unchecked one reached the store and then failed at the bus (-32603)."""
        with a2a_errors():
            return convert.namespace(tenant, "tenant")

    async def _task(self, task_id: str, tenant: str) -> Task:
        if not task_id:
            raise InvalidParamsError("id: required (the task's id)")
        namespace = self._namespace(tenant)
        with a2a_errors():
            task = await self._scheduler.get_task(task_id)
        if task.namespace != namespace:
            raise TaskNotFoundError(f"task {task_id!r} not found")
        return task

    def _input(self, message: a2a_pb2.Message) -> Payload:
        """The message's input, within ``max_payload_bytes`` as a gRPC payload is (the
        same check); InvalidParamsError past it."""
        value = mapping.message_input(message)
        return convert.payload(convert.payload_msg(value), "message.parts", self._limits)

    async def _skill(self, params: a2a_pb2.SendMessageRequest, namespace: str) -> str:
        with a2a_errors():
            meta = {**mapping.to_dict(params.message.metadata, "message.metadata"),
                    **mapping.to_dict(params.metadata, "metadata")}
        skill = meta.get("skill")
        # the skills on the card: the human desk's capability is not one (with it, "exactly
        # one live" never held, as the desk is always live)
        live = await self._scheduler.live_capabilities(namespace) - {HUMAN_CAPABILITY}
        if skill is None and len(live) == 1:
            return next(iter(live))
        if not isinstance(skill, str) or not skill:
            raise InvalidParamsError(
                "name the skill in the message metadata (\"skill\"): one of "
                + (", ".join(sorted(live)) or "none (no agent is live)"))
        with a2a_errors():  # a name no agent could ever register would wait forever
            skill = convert.capability(skill, "message.metadata.skill")
        if skill not in live and not is_human(skill):
            # The card is what an A2A client may ask for: a skill no live agent offers
            # would sit in `submitted` with no word why (a blocking send hung).
            raise InvalidParamsError(
                f"no live agent offers the skill {skill!r}; the skills now: "
                + (", ".join(sorted(live)) or "none (no agent is live)"))
        return skill

    async def _submit(self, params: a2a_pb2.SendMessageRequest) -> Task:
        message = params.message
        namespace = self._namespace(params.tenant)
        if message.task_id:
            return await self._answer(params)
        skill = await self._skill(params, namespace)
        labels = {}
        if message.context_id:
            if len(message.context_id.encode()) > 256:
                raise InvalidParamsError("message.context_id: at most 256 bytes")
            labels[mapping.CONTEXT_LABEL] = message.context_id
        with a2a_errors():
            task = Task(id=uuid.uuid4().hex, capability=skill, namespace=namespace,
                        input=self._input(message),
                        labels=auth.owner_labels(labels))
            return await self._scheduler.submit(task, request_id=_request_id(message.message_id))

    async def _answer(self, params: a2a_pb2.SendMessageRequest) -> Task:
        """A message to an ``input-required`` task: a person's decision.

        A data part ``{"decision": "approve" | "reject", "comment": ...}`` or a
        text of just "approve" / "reject" decides; anything else is the input
        the task outputs (SUPPLY_INPUT). The approver is the caller's
        principal (``a2a`` when auth is off), audited as through gRPC.
        """
        message = params.message
        task = await self._task(message.task_id, params.tenant)
        if not mapping.awaiting_input(task):
            raise UnsupportedOperationError(
                f"task {task.id} is not input-required: a mesh task takes one message; "
                "send a new message for a new task")
        with a2a_errors():
            # as ResolveHumanTask reads its input (bytes as {"base64": ...}): a raw part
            # was bytes, which the decision record could not hold (-32603)
            value = convert.decoded_payload(self._input(message))
        decision, comment = Decision.SUPPLY_INPUT, ""
        if isinstance(value, dict) and str(value.get("decision", "")).lower() in _DECISIONS:
            decision = _DECISIONS[str(value["decision"]).lower()]
            comment = str(value.get("comment", ""))[:1024]
            value = value.get("input")
        elif isinstance(value, str) and value.strip().lower() in _DECISIONS:
            decision, value = _DECISIONS[value.strip().lower()], None
        who = auth.caller()
        with a2a_errors(), auth.audited(f"human.{decision.name.lower()}", f"tasks/{task.id}",
                                        task.namespace):
            return await self._desk.resolve(task.id, decision, value=value, comment=comment,
                                            who=who.name if who else "a2a",
                                            role=who.role.value if who else "")

    # -- the A2A methods -------------------------------------------------------------

    async def on_message_send(self, params: a2a_pb2.SendMessageRequest,
                              context: ServerCallContext) -> a2a_pb2.Task | a2a_pb2.Message:
        """Submit the task; unless ``return_immediately``, wait until it ends or needs input.

        The wait's stream place is taken before the submit: a send refused past the stream
        bounds (429) has submitted nothing (it did, and a client retrying with a new
        message id got the task twice)."""
        if params.configuration.return_immediately:
            with auth.acting_as(principal_of(context)):
                return mapping.a2a_task(await self._submit(params))
        with self._stream(context):
            with auth.acting_as(principal_of(context)):
                task = await self._submit(params)
            return await self._while_connected(task, context)

    async def _while_connected(self, task: Task,
                               context: ServerCallContext) -> a2a_pb2.Task:
        """:meth:`_until_settled`, given up once the client has gone.

        A blocking send whose client disconnected (a timeout) went on waiting for the
        task to end, holding its watch and its stream place all along: an hour for an
        approval, and abandoned retries filled ``max_watch_streams``. The task itself
        goes on; the answer nobody reads is the task as it is.
        """
        gone = disconnected_of(context)
        wait = asyncio.ensure_future(self._until_settled(task))
        try:
            while True:
                done, _ = await asyncio.wait({wait}, timeout=DISCONNECT_POLL)
                if done:
                    return wait.result()
                if gone is not None and await gone():
                    break
        finally:
            if not wait.done():
                wait.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await wait
        with a2a_errors():
            return mapping.a2a_task(await self._scheduler.get_task(task.id))

    async def _until_settled(self, task: Task) -> a2a_pb2.Task:
        """The task once it has ended or needs input, with its chunks."""
        chunks: list[TaskChunk] = []
        stream = self._chunks.watch(task.id)
        try:
            # The watch ends by itself once the task has ended (chunks first).
            async for item in stream:
                if isinstance(item, list):
                    chunks.extend(item)
                    continue
                task = item
                if mapping.a2a_state(task) == a2a_pb2.TASK_STATE_INPUT_REQUIRED:
                    break
        finally:
            await stream.aclose()
        return mapping.a2a_task(task, chunks)

    async def on_message_send_stream(self, params: a2a_pb2.SendMessageRequest,
                                     context: ServerCallContext,
                                     ) -> AsyncGenerator[Event, None]:
        """Submit the task, then stream its status and artifact updates (with
        ``return_immediately``, only the submitted task); the stream's place is taken
        before the submit, as in :meth:`on_message_send`."""
        if params.configuration.return_immediately:
            with auth.acting_as(principal_of(context)):
                task = await self._submit(params)
            yield mapping.a2a_task(task)
            return
        with self._stream(context):
            with auth.acting_as(principal_of(context)):
                task = await self._submit(params)
            async for event in self._events(task, snapshot=False):
                yield event

    async def on_subscribe_to_task(self, params: a2a_pb2.SubscribeToTaskRequest,
                                   context: ServerCallContext,
                                   ) -> AsyncGenerator[Event, None]:
        """The task as it is (artifacts streamed so far included), then what follows."""
        task = await self._task(params.id, params.tenant)
        state = mapping.a2a_state(task)
        if mapping.is_final(state):
            # The spec: subscribing to a task in a terminal state is UnsupportedOperationError
            # (nothing further will stream); GetTask returns it with its artifacts.
            raise UnsupportedOperationError(
                f"task {task.id} has ended ({a2a_pb2.TaskState.Name(state)}): nothing more "
                "will stream; GetTask returns it with its artifacts")
        with self._stream(context):
            async for event in self._events(task, snapshot=True):
                yield event

    async def _events(self, task: Task, *, snapshot: bool,
                      ) -> AsyncGenerator[Event, None]:
        """Task first, then updates in order, until a final or input-required state.

        With ``snapshot`` the first Task carries the artifacts streamed so far
        and the updates start after them: nothing is sent twice.
        """
        prior = await self._chunks.kept(task.id) if snapshot else []
        seen = {mapping.artifact_id(c) for c in prior}
        stream = self._chunks.watch(task.id, prior[-1].seq if prior else 0)
        try:
            first = True
            async for item in stream:
                if isinstance(item, list):
                    for chunk in item:
                        yield self._chunk_event(task, chunk, seen)
                    continue
                task = item
                state = mapping.a2a_state(task)
                if first:
                    # Even when it has ended, chunks may follow (then the task again).
                    first = False
                    yield mapping.a2a_task(task, prior)
                    continue
                if state == a2a_pb2.TASK_STATE_COMPLETED and task.output is not None:
                    yield mapping.result_event(task)
                yield mapping.status_event(task)
                if mapping.is_final(state) or state == a2a_pb2.TASK_STATE_INPUT_REQUIRED:
                    return
        finally:
            await stream.aclose()

    @staticmethod
    def _chunk_event(task: Task, chunk: TaskChunk, seen: set[str]) -> Event:
        if chunk.draft.kind is ChunkKind.PROGRESS:
            pct = f" ({chunk.draft.progress * 100:.0f}%)" if chunk.draft.progress else ""
            return mapping.status_event(task, f"{chunk.draft.text}{pct}")
        key = mapping.artifact_id(chunk)
        append = key in seen
        seen.add(key)
        return mapping.chunk_event(task, chunk, append=append)

    async def on_get_task(self, params: a2a_pb2.GetTaskRequest,
                          context: ServerCallContext) -> a2a_pb2.Task | None:
        """The task with its artifacts (streamed ones assembled, then the result)."""
        task = await self._task(params.id, params.tenant)
        return mapping.a2a_task(task, await self._chunks.kept(task.id))

    async def on_list_tasks(self, params: a2a_pb2.ListTasksRequest,
                            context: ServerCallContext) -> a2a_pb2.ListTasksResponse:
        """Tasks of the tenant's namespace, newest first, filtered by context and state."""
        namespace = self._namespace(params.tenant)
        size = min(params.page_size or 50, MAX_PAGE)
        if params.page_size < 0:
            raise InvalidParamsError("page_size must not be negative")
        try:
            before = int(params.page_token) if params.page_token else 0
        except ValueError:
            raise InvalidParamsError("page_token is not one this server gave") from None
        if before < 0:
            raise InvalidParamsError("page_token is not one this server gave")
        wanted = params.status
        if wanted not in a2a_pb2.TaskState.values():  # it listed nothing, as if none matched
            raise InvalidParamsError(f"status: {wanted} is no A2A task state")
        states = mapping.A2A_TO_STATES.get(wanted) if wanted else None
        flt = TaskFilter(namespace, next(iter(states)) if states and len(states) == 1 else None)
        out: list[a2a_pb2.Task] = []
        token = ""
        scanned = 0
        while len(out) < size and scanned < 10 * MAX_PAGE:
            page = await self._scheduler.list_tasks(flt, before_seq=before, limit=size)
            if not page:
                token = ""
                break
            scanned += len(page)
            for task in page:
                before = task.seq
                if params.context_id and mapping.context_id(task) != params.context_id:
                    continue
                if wanted and mapping.a2a_state(task) != wanted:
                    continue
                out.append(mapping.a2a_task(task) if params.include_artifacts
                           else a2a_pb2.Task(id=task.id, context_id=mapping.context_id(task),
                                             status=mapping.status(task),
                                             metadata=mapping.metadata(task)))
                if len(out) == size:
                    break
            token = str(before) if before > 1 else ""
            if len(page) < size:
                if len(out) < size:
                    token = ""
                break
        return a2a_pb2.ListTasksResponse(tasks=out, next_page_token=token, page_size=size,
                                         total_size=len(out))

    async def on_cancel_task(self, params: a2a_pb2.CancelTaskRequest,
                             context: ServerCallContext) -> a2a_pb2.Task | None:
        """Cancel the task (the caller's own, unless an admin); one that has ended is not
        cancelable."""
        task = await self._task(params.id, params.tenant)
        with a2a_errors(), auth.acting_as(principal_of(context)):
            auth.check_owner(task.labels, "cancel", f"tasks/{task.id}", task.namespace)
            task = await self._scheduler.cancel(task.id, "cancelled through A2A")
        return mapping.a2a_task(task)

    async def on_get_extended_agent_card(self, params: a2a_pb2.GetExtendedAgentCardRequest,
                                         context: ServerCallContext) -> a2a_pb2.AgentCard:
        """The same card as the public one."""
        return await self._card()

    # -- push notifications: not offered (the card says so) ----------------------------

    async def on_create_task_push_notification_config(
            self, params: a2a_pb2.TaskPushNotificationConfig,
            context: ServerCallContext) -> a2a_pb2.TaskPushNotificationConfig:
        """Not offered."""
        raise PushNotificationNotSupportedError

    async def on_get_task_push_notification_config(
            self, params: a2a_pb2.GetTaskPushNotificationConfigRequest,
            context: ServerCallContext) -> a2a_pb2.TaskPushNotificationConfig:
        """Not offered."""
        raise PushNotificationNotSupportedError

    async def on_list_task_push_notification_configs(
            self, params: a2a_pb2.ListTaskPushNotificationConfigsRequest,
            context: ServerCallContext) -> a2a_pb2.ListTaskPushNotificationConfigsResponse:
        """Not offered."""
        raise PushNotificationNotSupportedError

    async def on_delete_task_push_notification_config(
            self, params: a2a_pb2.DeleteTaskPushNotificationConfigRequest,
            context: ServerCallContext) -> None:
        """Not offered."""
        raise PushNotificationNotSupportedError


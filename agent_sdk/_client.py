"""MeshClient: the asyncio client for tasks, workflows, agents, state and the bus."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

import grpc
from agentmesh.v1 import (
    bus_pb2,
    bus_pb2_grpc,
    discovery_pb2,
    discovery_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

from agent_sdk._auth import PemSource, bearer_token_interceptors, tls_credentials
from agent_sdk._locks import Lock, SnapshotInfo, hold
from agent_sdk._payload import encode_payload
from agent_sdk._retry import IDEMPOTENT_RETRYABLE_CODES, backoff_delay
from agent_sdk._tracing import client_interceptors as _tracing_interceptors
from agent_sdk._types import (
    AgentEvent,
    AgentInfo,
    BulkResult,
    BusMessage,
    DurableMessage,
    MeshStats,
    RetryPolicy,
    StateEntry,
    StateEvent,
    TaskChunk,
    TaskInfo,
    WorkflowInfo,
    WorkflowSpec,
    agent_event_from_proto,
    agent_from_proto,
    agent_state_value,
    bus_message_from_proto,
    chunk_from_proto,
    entry_from_proto,
    state_event_from_proto,
    stats_from_proto,
    task_from_proto,
    task_state_value,
    to_duration,
    workflow_from_proto,
    workflow_state_value,
)
from agent_sdk.errors import (
    AbortedError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RPCError,
    TaskFailedError,
    rpc_error_from,
)

__all__ = ["UNSET", "ChannelConfig", "MeshClient"]


def _time(ts: Any) -> dt.datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=dt.UTC)  # type: ignore[no-any-return]


def _snapshot(msg: Any) -> SnapshotInfo:
    return SnapshotInfo(
        name=msg.name, create_time=_time(msg.create_time), size_bytes=msg.size_bytes,
        namespace=msg.namespace, revisions=dict(msg.revisions), entry_count=msg.entry_count,
        task_count=msg.task_count, workflow_count=msg.workflow_count)

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Item = TypeVar("Item")


class _Unset:
    """Type of :data:`UNSET`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


#: Marks an argument that was not given (``retry_task(input=...)``).
UNSET: Final = _Unset()

_TERMINAL_TASK_STATES = frozenset(task_state_value(s) for s in
                                  ("SUCCEEDED", "FAILED", "CANCELLED", "DEAD_LETTERED"))
_MAX_PAGE = 1000
_MAX_SUBMIT_BATCH = 500
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
"""The server's default ``max_message_bytes``: what a channel sends and receives."""
MESSAGE_HEADROOM = 64 << 10
"""Bytes a batched message keeps under the limit (a response echoes its requests'
payloads with the server's fields added)."""
_WATCH_BATCH = 256
"""Most task changes the server may put in one watch response (fewer messages under load)."""
# Errors after which a broken workflow watch is re-read and reopened.
_REWATCH_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNKNOWN})


def _name(value: str, collection: str) -> str:
    """Accept "tasks/x" or "x"; return "tasks/x"."""
    prefix = collection + "/"
    return value if value.startswith(prefix) else prefix + value


# Own subchannels per channel (a failed connection of another client in the
# process must not fail ours) and reconnect quickly after a server restart.
# The message size limits come from ChannelConfig.max_message_bytes.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """How channels to the mesh are made (shared by MeshClient and Agent).

    ``credentials`` switches to TLS (``grpc.ssl_channel_credentials``, with a
    client certificate for mTLS); ``interceptors`` run on every call (auth
    metadata, tracing); ``options`` are extra gRPC channel arguments.
    ``max_message_bytes`` is the largest message sent or received: it must
    match the server's ``max_message_bytes`` (4 MiB by default, as here);
    the agent and the client split their batches to stay under it.
    """

    credentials: grpc.ChannelCredentials | None = None
    interceptors: tuple[grpc.aio.ClientInterceptor, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def secure(cls, *, token: str | None = None, tls_ca: PemSource | None = None,
               tls_cert: PemSource | None = None, tls_key: PemSource | None = None,
               base: ChannelConfig | None = None) -> ChannelConfig:
        """A config that sends ``token`` as a bearer token and/or uses TLS.

        TLS is on when any of ``tls_ca`` (CA that signed the server
        certificate), ``tls_cert``/``tls_key`` (client certificate for mTLS)
        is given. ``base`` keeps its interceptors and options (and its
        credentials when no TLS option is given).
        """
        base = base or cls()
        credentials = base.credentials
        if tls_ca is not None or tls_cert is not None or tls_key is not None:
            credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        interceptors = base.interceptors
        if token:
            interceptors = (*bearer_token_interceptors(token), *interceptors)
        return cls(credentials, interceptors, base.options, base.max_message_bytes)


class _Conn:
    """A channel to one target and the stubs on it."""

    __slots__ = ("bus", "channel", "discovery", "max_message_bytes", "state", "target",
                 "tasks")

    def __init__(self, target: str, config: ChannelConfig | None = None) -> None:
        self.target = target
        config = config or ChannelConfig()
        self.max_message_bytes = config.max_message_bytes
        given = {name for name, _ in config.options}
        sizes = [(name, config.max_message_bytes) for name in
                 ("grpc.max_receive_message_length", "grpc.max_send_message_length")
                 if name not in given]
        options = [*_CHANNEL_OPTIONS, *sizes, *config.options]
        # Tracing (only when OTEL_* asks for it) runs outermost, so its span covers
        # the caller's own interceptors (auth metadata...).
        interceptors = [*_tracing_interceptors(), *config.interceptors] or None
        if config.credentials is not None:
            self.channel = grpc.aio.secure_channel(target, config.credentials, options=options,
                                                   interceptors=interceptors)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options,
                                                     interceptors=interceptors)
        self.tasks = task_pb2_grpc.TaskServiceStub(self.channel)
        self.discovery = discovery_pb2_grpc.DiscoveryServiceStub(self.channel)
        self.state = state_pb2_grpc.StateServiceStub(self.channel)
        self.bus = bus_pb2_grpc.BusServiceStub(self.channel)


class _Targets:
    """Channels to a list of targets; fails over to the next on UNAVAILABLE.

    Channels are created lazily, one per target, and all closed by ``aclose``.
    """

    def __init__(self, target: str | Sequence[str], config: ChannelConfig | None = None) -> None:
        self._config = config
        targets = [target] if isinstance(target, str) else list(target)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError("target must be a non-empty address or list of addresses")
        self.targets = targets
        self._index = 0
        self._conns: dict[str, _Conn] = {}

    def current(self) -> _Conn:
        """The connection to the current target."""
        target = self.targets[self._index]
        conn = self._conns.get(target)
        if conn is None:
            conn = self._conns[target] = _Conn(target, self._config)
        return conn

    def failover(self, conn: _Conn) -> None:
        """Move to the next target if ``conn`` is still the current one."""
        if len(self.targets) > 1 and self.targets[self._index] == conn.target:
            self._index = (self._index + 1) % len(self.targets)
            log.info("%s unavailable; failing over to %s", conn.target,
                     self.targets[self._index])

    async def aclose(self) -> None:
        """Close every channel."""
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.channel.close()


_Submit = tuple[task_pb2.SubmitTaskRequest, "asyncio.Future[task_pb2.Task]"]


def _submit_batches(pending: list[_Submit], max_message_bytes: int) -> list[list[_Submit]]:
    """Split queued submits so each BatchSubmitTasks call, and its answer (which
    echoes every input with the server's fields), stays within the message limit."""
    budget = max_message_bytes - MESSAGE_HEADROOM
    batches: list[list[_Submit]] = []
    batch: list[_Submit] = []
    used = 0
    for item in pending:
        size = item[0].ByteSize() + 512  # the answer's Task adds names, times, policy
        if batch and used + size > budget:
            batches.append(batch)
            batch, used = [], 0
        batch.append(item)
        used += size
    if batch:
        batches.append(batch)
    return batches


class MeshClient:
    """Asyncio client of an agentmesh control plane.

    ``target`` is one ``host:port`` or several; with several, a call that meets
    UNAVAILABLE moves on to the next. Every unary call has a deadline
    (``timeout`` seconds unless the call says otherwise). UNAVAILABLE is retried
    with jittered backoff only for reads and for calls carrying a request_id
    (submits always carry one); ABORTED is never retried automatically.

    Use it as ``async with MeshClient(...) as client:`` or call ``aclose()``.
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *,
                 namespace: str = "default", timeout: float = 10.0,
                 batch_submits: bool = True, channel: ChannelConfig | None = None,
                 token: str | None = None, tls_ca: PemSource | None = None,
                 tls_cert: PemSource | None = None, tls_key: PemSource | None = None) -> None:
        """Configure the client; channels open lazily on the first call.

        ``token`` is sent as ``authorization: Bearer <token>`` on every call;
        ``tls_ca`` turns TLS on (verifying the server against that CA) and
        ``tls_cert``/``tls_key`` add a client certificate (mTLS); see
        :meth:`ChannelConfig.secure`.

        With ``batch_submits`` (the default), ``submit_task`` calls made in the
        same event-loop iteration travel together in one BatchSubmitTasks call
        (up to 500), like a producer that batches with no linger: a lone call
        goes out at once as a plain SubmitTask, so latency does not grow.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if token or tls_ca is not None or tls_cert is not None or tls_key is not None:
            channel = ChannelConfig.secure(token=token, tls_ca=tls_ca, tls_cert=tls_cert,
                                           tls_key=tls_key, base=channel)
        self._targets = _Targets(target, channel)
        self._namespace = namespace
        self._timeout = timeout
        self._attempts = 2 + len(self._targets.targets)
        self._closed = False
        self._batch_submits = batch_submits
        self._pending: list[tuple[task_pb2.SubmitTaskRequest,
                                  asyncio.Future[task_pb2.Task]]] = []
        self._flush_scheduled = False
        self._senders: set[asyncio.Task[None]] = set()

    @property
    def namespace(self) -> str:
        """The namespace every call uses."""
        return self._namespace

    async def __aenter__(self) -> MeshClient:
        """Return self."""
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the client."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channels (safe to repeat). Open watch iterators end with an error."""
        self._closed = True
        for sender in list(self._senders):
            sender.cancel()
        if self._senders:
            await asyncio.wait(list(self._senders))
        await self._targets.aclose()

    # ------------------------------------------------------------------ plumbing

    def _conn(self) -> _Conn:
        if self._closed:
            raise RuntimeError("MeshClient is closed")
        return self._targets.current()

    async def _unary(self, rpc: Callable[[_Conn], grpc.aio.UnaryUnaryMultiCallable[Req, Resp]],
                     request: Req, *, safe: bool, deadline: float | None = None) -> Resp:
        """Call with a deadline; retry UNAVAILABLE (and DEADLINE_EXCEEDED) when ``safe``."""
        if deadline is None:
            deadline = self._timeout
        attempt = 0
        while True:
            conn = self._conn()
            try:
                return await rpc(conn)(request, timeout=deadline)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._targets.failover(conn)
                attempt += 1
                if not safe or code not in IDEMPOTENT_RETRYABLE_CODES \
                        or attempt >= self._attempts:
                    raise rpc_error_from(exc) from None
                delay = backoff_delay(attempt - 1, base=0.2, cap=2.0)
                log.debug("%s on %s; retrying in %.2fs", code.name, conn.target, delay)
                await asyncio.sleep(delay)

    async def _stream(self, rpc: Callable[[_Conn], grpc.aio.UnaryStreamCall[Any, Resp]
                                          | grpc.aio.StreamStreamCall[Any, Resp]],
                      convert: Callable[[Resp], Item]) -> AsyncGenerator[Item, None]:
        """Iterate a stream's responses, converting items and errors; cancel it when left."""
        conn = self._conn()
        call = rpc(conn)
        try:
            async for item in call:
                yield convert(item)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._targets.failover(conn)
            raise rpc_error_from(exc) from None
        finally:
            call.cancel()

    async def _pages(self, fetch: Callable[[int, str], Any], key: str, limit: int,
                     convert: Callable[[Any], Item]) -> list[Item]:
        """Follow page tokens until ``limit`` items or the end."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        out: list[Item] = []
        token = ""
        while len(out) < limit:
            response = await fetch(min(limit - len(out), _MAX_PAGE), token)
            out.extend(convert(x) for x in getattr(response, key))
            token = response.next_page_token
            if not token:
                break
        return out[:limit]

    # --------------------------------------------------------------------- tasks

    async def submit_task(self, capability: str, input: Any = None, *,
                          priority: int = 0, labels: Mapping[str, str] | None = None,
                          task_id: str = "", request_id: str = "",
                          retry: RetryPolicy | None = None,
                          timeout: float | None = None,  # noqa: ASYNC109 - execution timeout
                          fallback: str = "") -> TaskInfo:
        """Queue a task for an agent offering ``capability``.

        ``timeout`` is the execution timeout of one attempt (server default when
        None). Without ``request_id`` a fresh one is generated, so the submit is
        safely retried when the server is unreachable.
        """
        task = task_pb2.Task(capability=capability, input=encode_payload(input),
                             priority=priority, labels=labels or {},
                             fallback_capability=fallback, namespace=self._namespace)
        if retry is not None:
            task.retry_policy.CopyFrom(retry.to_proto())
        if timeout is not None:
            task.execution_timeout.CopyFrom(to_duration(timeout))
        request = task_pb2.SubmitTaskRequest(task=task, task_id=task_id,
                                             request_id=request_id or uuid.uuid4().hex)
        if not self._batch_submits:
            response = await self._unary(lambda c: c.tasks.SubmitTask, request, safe=True)
            return task_from_proto(response.task)
        self._conn()  # raises when closed
        loop = asyncio.get_running_loop()
        future: asyncio.Future[task_pb2.Task] = loop.create_future()
        self._pending.append((request, future))
        if len(self._pending) >= _MAX_SUBMIT_BATCH:
            self._flush_submits()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_submits)
        return task_from_proto(await future)

    def _flush_submits(self) -> None:
        """Send what submit_task queued in this loop iteration (in calls that fit a message)."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        loop = asyncio.get_running_loop()
        for batch in _submit_batches(pending, self._targets.current().max_message_bytes):
            sender = loop.create_task(self._send_submits(batch))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)

    async def _send_submits(self, batch: list[tuple[task_pb2.SubmitTaskRequest,
                                                    asyncio.Future[task_pb2.Task]]]) -> None:
        """One call for the batch; on a refused batch, one call per request.

        Every request carries its own request_id, so re-sending the requests of
        a batch that was partly queued cannot queue anything twice.
        """
        try:
            if len(batch) > 1:
                try:
                    response = await self._unary(
                        lambda c: c.tasks.BatchSubmitTasks,
                        task_pb2.BatchSubmitTasksRequest(requests=[r for r, _ in batch]),
                        safe=True)
                except (InvalidArgumentError, ResourceExhaustedError):
                    pass  # find out which request it was: one by one below
                else:
                    for (_, future), task in zip(batch, response.tasks, strict=True):
                        if not future.done():
                            future.set_result(task)
                    return
            for request, future in batch:
                if future.done():
                    continue
                try:
                    single = await self._unary(lambda c: c.tasks.SubmitTask, request, safe=True)
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(single.task)
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def get_task(self, task: str) -> TaskInfo:
        """The task named "tasks/x" (or "x")."""
        response = await self._unary(lambda c: c.tasks.GetTask,
                                     task_pb2.GetTaskRequest(name=_name(task, "tasks")),
                                     safe=True)
        return task_from_proto(response.task)

    async def list_tasks(self, *, state: str | None = None, capability: str = "",
                         workflow: str = "", limit: int = 100,
                         labels: Mapping[str, str] | None = None,
                         created_after: float = 0.0,
                         created_before: float = 0.0) -> list[TaskInfo]:
        """Up to ``limit`` tasks, newest first, filtered by state name, capability,
        workflow, labels (all must match) and creation time (Unix seconds,
        ``after <= create_time < before``; 0 means unbounded)."""
        base = self._task_selector(state, capability, workflow, labels=labels,
                                   created_after=created_after, created_before=created_before)

        async def fetch(size: int, token: str) -> task_pb2.ListTasksResponse:
            request = task_pb2.ListTasksRequest(
                state=base.state, page_size=size, page_token=token,
                capability=base.capability, workflow=base.workflow, namespace=base.namespace,
                labels=dict(base.labels))
            if base.HasField("create_after"):
                request.create_after.CopyFrom(base.create_after)
            if base.HasField("create_before"):
                request.create_before.CopyFrom(base.create_before)
            return await self._unary(lambda c: c.tasks.ListTasks, request, safe=True)

        return await self._pages(fetch, "tasks", limit, task_from_proto)

    def _task_selector(self, state: str | None, capability: str, workflow: str, *,
                       labels: Mapping[str, str] | None, created_after: float,
                       created_before: float) -> task_pb2.TaskSelector:
        sel = task_pb2.TaskSelector(
            namespace=self._namespace,
            state=task_state_value(state) if state else 0,  # type: ignore[arg-type]
            capability=capability, workflow=_name(workflow, "workflows") if workflow else "",
            labels=dict(labels or {}))
        if created_after:
            sel.create_after.FromNanoseconds(round(created_after * 1e9))
        if created_before:
            sel.create_before.FromNanoseconds(round(created_before * 1e9))
        return sel

    async def bulk_retry_tasks(self, *, state: str | None = None, capability: str = "",
                               workflow: str = "", labels: Mapping[str, str] | None = None,
                               created_after: float = 0.0, created_before: float = 0.0,
                               max_tasks: int = 0, dry_run: bool = False) -> BulkResult:
        """Re-drive every matching task (DEAD_LETTERED unless ``state`` says FAILED or
        CANCELLED), at most ``max_tasks`` (0: the server's default of 1000). Admin only."""
        request = task_pb2.BulkRetryTasksRequest(
            selector=self._task_selector(state, capability, workflow, labels=labels,
                                         created_after=created_after,
                                         created_before=created_before),
            max_tasks=max_tasks, dry_run=dry_run)
        response = await self._unary(lambda c: c.tasks.BulkRetryTasks, request,
                                     safe=dry_run)
        return BulkResult(list(response.names), response.truncated)

    async def bulk_cancel_tasks(self, *, state: str | None = None, capability: str = "",
                                workflow: str = "", labels: Mapping[str, str] | None = None,
                                created_after: float = 0.0, created_before: float = 0.0,
                                max_tasks: int = 0, dry_run: bool = False,
                                reason: str = "") -> BulkResult:
        """Cancel every matching task that has not ended, at most ``max_tasks``. Admin only."""
        request = task_pb2.BulkCancelTasksRequest(
            selector=self._task_selector(state, capability, workflow, labels=labels,
                                         created_after=created_after,
                                         created_before=created_before),
            max_tasks=max_tasks, dry_run=dry_run, reason=reason)
        response = await self._unary(lambda c: c.tasks.BulkCancelTasks, request,
                                     safe=dry_run)
        return BulkResult(list(response.names), response.truncated)

    async def cancel_task(self, task: str, reason: str = "") -> TaskInfo:
        """Cancel a task that has not ended; a running attempt is told to stop."""
        request = task_pb2.CancelTaskRequest(name=_name(task, "tasks"), reason=reason)
        response = await self._unary(lambda c: c.tasks.CancelTask, request, safe=False)
        return task_from_proto(response.task)

    # ----------------------------------------------------------------- people

    async def list_approvals(self, *, limit: int = 100) -> list[TaskInfo]:
        """Tasks waiting for a person now (capability ``human``), newest first."""
        return [t for t in await self.list_tasks(state="RUNNING", capability="human",
                                                 limit=limit) if t.awaiting_human]

    async def approve(self, task: str, *, comment: str = "", input: Any = UNSET,
                      approver: str = "") -> TaskInfo:
        """Approve a task waiting for a person: it succeeds and its workflow goes on.

        ``approver`` is recorded when the server runs without auth (with auth
        the caller's principal is). ``input`` is optional data passed on.
        """
        return await self._resolve(task, task_pb2.HUMAN_DECISION_APPROVE, comment, input,
                                   approver)

    async def reject(self, task: str, *, comment: str = "", approver: str = "") -> TaskInfo:
        """Reject a task waiting for a person: it fails (REJECTED) and so does its workflow."""
        return await self._resolve(task, task_pb2.HUMAN_DECISION_REJECT, comment, UNSET,
                                   approver)

    async def supply_input(self, task: str, value: Any, *, comment: str = "",
                           approver: str = "") -> TaskInfo:
        """Answer a task waiting for a person with ``value`` (its output downstream)."""
        return await self._resolve(task, task_pb2.HUMAN_DECISION_SUPPLY_INPUT, comment, value,
                                   approver)

    async def _resolve(self, task: str, decision: int, comment: str, value: Any,
                       approver: str) -> TaskInfo:
        request = task_pb2.ResolveHumanTaskRequest(
            name=_name(task, "tasks"), decision=decision,  # type: ignore[arg-type]
            comment=comment, approver=approver)
        if not isinstance(value, _Unset):
            request.input.CopyFrom(encode_payload(value))
        response = await self._unary(lambda c: c.tasks.ResolveHumanTask, request, safe=False)
        return task_from_proto(response.task)

    async def retry_task(self, task: str, input: Any = UNSET) -> TaskInfo:
        """Re-drive a task that ended without success, optionally with a new input."""
        request = task_pb2.RetryTaskRequest(name=_name(task, "tasks"))
        if not isinstance(input, _Unset):
            request.input.CopyFrom(encode_payload(input))
        response = await self._unary(lambda c: c.tasks.RetryTask, request, safe=False)
        return task_from_proto(response.task)

    def watch_tasks(self, *, names: Sequence[str] = (), capability: str = "",
                    workflow: str = "", states: Sequence[str] = ()) -> AsyncIterator[TaskInfo]:
        """Iterate task changes matching the filter (from now on).

        ``states`` (names like "SUCCEEDED") keeps only changes into those states;
        the server filters before it reads anything, so it is cheap.
        """
        request = task_pb2.WatchTasksRequest(
            names=[_name(n, "tasks") for n in names], capability=capability,
            workflow=_name(workflow, "workflows") if workflow else "",
            namespace=self._namespace,
            states=[task_state_value(s) for s in states],  # type: ignore[misc]
            max_batch_size=_WATCH_BATCH)
        return _flatten(self._stream(lambda c: c.tasks.WatchTasks(request),
                                     lambda r: [task_from_proto(t) for t in r.tasks]))

    def watch_chunks(self, task: str, *, after_sequence: int = 0,
                     ) -> AsyncIterator[TaskChunk | TaskInfo]:
        """Iterate a task's streamed chunks in order, and the task at each state change.

        The first item is the task as it is now; then its chunks after
        ``after_sequence`` (0: from the first), each exactly once, with the
        task again after each change of its state. The iteration ends once the
        task has ended and every chunk was received. To resume after a broken
        stream, pass the ``sequence`` of the last chunk received.
        """
        if after_sequence < 0:
            raise ValueError("after_sequence must not be negative")
        request = task_pb2.WatchTaskChunksRequest(name=_name(task, "tasks"),
                                                  after_sequence=after_sequence)

        def convert(r: task_pb2.WatchTaskChunksResponse) -> list[TaskChunk | TaskInfo]:
            if r.HasField("task"):
                return [task_from_proto(r.task)]
            return [chunk_from_proto(c) for c in r.chunks]

        return _flatten(self._stream(lambda c: c.tasks.WatchTaskChunks(request), convert))

    async def wait_task(self, task: str,
                        timeout: float | None = None) -> TaskInfo:  # noqa: ASYNC109 - API
        """Wait until the task ends (TimeoutError after ``timeout`` seconds)."""
        name = _name(task, "tasks")
        async with asyncio.timeout(timeout):
            return await self._wait_task(name)

    async def _wait_task(self, name: str) -> TaskInfo:
        conn = self._conn()
        call = conn.tasks.WatchTasks(task_pb2.WatchTasksRequest(
            names=[name], namespace=self._namespace,
            states=sorted(_TERMINAL_TASK_STATES)))  # type: ignore[arg-type]
        ended: list[TaskInfo] = []
        event = asyncio.Event()

        async def pump() -> None:
            async for response in call:
                if response.task.state in _TERMINAL_TASK_STATES:
                    ended.append(task_from_proto(response.task))
                    event.set()
                    return

        pumping = asyncio.create_task(pump())
        try:
            # Read after subscribing so no change is missed; the watch then
            # reports the end. A backed-off poll covers a watch that broke or
            # a change between opening the watch and the server subscribing.
            poll = 0.25
            while True:
                info = await self.get_task(name)
                if info.done:
                    return info
                try:
                    async with asyncio.timeout(poll):
                        await event.wait()
                except TimeoutError:
                    poll = min(poll * 2, 5.0)
                    continue
                return ended[0]
        finally:
            pumping.cancel()
            call.cancel()
            await asyncio.wait([pumping])
            if not pumping.cancelled() and pumping.exception() is not None:
                log.debug("watch of %s ended: %s", name, pumping.exception())

    async def run_task(self, capability: str, input: Any = None, *,
                       wait_timeout: float | None = None, **kw: Any) -> Any:
        """Submit a task, wait for it, and return its decoded output.

        ``kw`` goes to :meth:`submit_task`. Raises :class:`TaskFailedError` when
        the task ends without success, ``TimeoutError`` after ``wait_timeout``.
        """
        submitted = await self.submit_task(capability, input, **kw)
        info = submitted if submitted.done else await self.wait_task(submitted.name,
                                                                     wait_timeout)
        if info.state != "SUCCEEDED":
            raise TaskFailedError(info)
        return info.output

    # ----------------------------------------------------------------- workflows

    async def submit_workflow(self, spec: WorkflowSpec | Mapping[str, Any], *,
                              workflow_id: str = "", request_id: str = "") -> WorkflowInfo:
        """Start a workflow (a spec or a mapping shaped like the workflow YAML).

        Without ``request_id`` a fresh one is generated (safe retries).
        """
        if not isinstance(spec, WorkflowSpec):
            spec = WorkflowSpec.from_dict(spec)
        workflow = spec.to_proto()
        workflow.namespace = self._namespace
        request = task_pb2.SubmitWorkflowRequest(workflow=workflow, workflow_id=workflow_id,
                                                 request_id=request_id or uuid.uuid4().hex)
        response = await self._unary(lambda c: c.tasks.SubmitWorkflow, request, safe=True)
        return workflow_from_proto(response.workflow)

    async def get_workflow(self, name: str) -> WorkflowInfo:
        """The workflow "workflows/x" (or "x") with the state of every step."""
        request = task_pb2.GetWorkflowRequest(name=_name(name, "workflows"))
        response = await self._unary(lambda c: c.tasks.GetWorkflow, request, safe=True)
        return workflow_from_proto(response.workflow)

    def watch_workflow(self, name: str) -> AsyncIterator[WorkflowInfo]:
        """Iterate the workflow now and after every step change, until it ends."""
        request = task_pb2.WatchWorkflowRequest(name=_name(name, "workflows"))
        return self._stream(lambda c: c.tasks.WatchWorkflow(request),
                            lambda r: workflow_from_proto(r.workflow))

    async def wait_workflow(self, name: str,
                            timeout: float | None = None,  # noqa: ASYNC109 - API
                            ) -> WorkflowInfo:
        """Wait until the workflow ends (TimeoutError after ``timeout`` seconds)."""
        request = task_pb2.WatchWorkflowRequest(name=_name(name, "workflows"))
        attempt = 0
        async with asyncio.timeout(timeout):
            while True:
                watch = self._stream(lambda c: c.tasks.WatchWorkflow(request),
                                     lambda r: workflow_from_proto(r.workflow))
                try:
                    async with contextlib.aclosing(watch):
                        async for info in watch:
                            attempt = 0
                            if info.done:
                                return info
                except RPCError as exc:
                    if exc.code not in _REWATCH_CODES:
                        raise
                    log.debug("watch of %s broke: %s; re-reading", name, exc)
                info = await self.get_workflow(name)
                if info.done:
                    return info
                await asyncio.sleep(backoff_delay(attempt, base=0.1, cap=2.0))
                attempt += 1

    async def cancel_workflow(self, name: str, reason: str = "") -> WorkflowInfo:
        """Cancel every step of the workflow that has not ended."""
        request = task_pb2.CancelWorkflowRequest(name=_name(name, "workflows"), reason=reason)
        response = await self._unary(lambda c: c.tasks.CancelWorkflow, request, safe=False)
        return workflow_from_proto(response.workflow)

    async def list_workflows(self, *, state: str | None = None,
                             limit: int = 100) -> list[WorkflowInfo]:
        """Up to ``limit`` workflows, newest first."""
        state_value = workflow_state_value(state) if state else 0

        async def fetch(size: int, token: str) -> task_pb2.ListWorkflowsResponse:
            request = task_pb2.ListWorkflowsRequest(
                state=state_value,  # type: ignore[arg-type]
                page_size=size, page_token=token, namespace=self._namespace)
            return await self._unary(lambda c: c.tasks.ListWorkflows, request, safe=True)

        return await self._pages(fetch, "workflows", limit, workflow_from_proto)

    # -------------------------------------------------------------------- agents

    async def list_agents(self, *, capability: str = "", state: str | None = None,
                          labels: Mapping[str, str] | None = None,
                          limit: int = 1000) -> list[AgentInfo]:
        """Agents by name; ``state`` None means live ones (ACTIVE and DRAINING)."""
        state_value = agent_state_value(state) if state else 0

        async def fetch(size: int, token: str) -> discovery_pb2.ListAgentsResponse:
            request = discovery_pb2.ListAgentsRequest(
                capability=capability, page_size=size, page_token=token,
                state=state_value,  # type: ignore[arg-type]
                labels=labels or {}, namespace=self._namespace)
            return await self._unary(lambda c: c.discovery.ListAgents, request, safe=True)

        return await self._pages(fetch, "agents", limit, agent_from_proto)

    async def get_agent(self, name: str) -> AgentInfo:
        """The agent "agents/x" (or "x")."""
        request = discovery_pb2.GetAgentRequest(name=_name(name, "agents"))
        response = await self._unary(lambda c: c.discovery.GetAgent, request, safe=True)
        return agent_from_proto(response.agent)

    async def drain_agent(self, name: str, reason: str = "",
                          grace_period: float = 0.0) -> AgentInfo:
        """Drain the agent "agents/x" (or "x"): no new work, told to finish and leave.
        ``grace_period`` 0 means the server's drain grace. Admin only."""
        request = discovery_pb2.DrainAgentRequest(name=_name(name, "agents"), reason=reason)
        if grace_period:
            request.grace_period.FromNanoseconds(round(grace_period * 1e9))
        response = await self._unary(lambda c: c.discovery.DrainAgent, request, safe=True)
        return agent_from_proto(response.agent)

    def watch_agents(self, *, capability: str = "",
                     include_existing: bool = True) -> AsyncIterator[AgentEvent]:
        """Iterate join/update/leave events (first a JOINED per live agent by default)."""
        request = discovery_pb2.WatchAgentsRequest(capability=capability,
                                                   namespace=self._namespace,
                                                   include_existing=include_existing)
        return self._stream(lambda c: c.discovery.WatchAgents(request), agent_event_from_proto)

    async def stats(self) -> MeshStats:
        """Queue depth and autonomy figures of the namespace."""
        request = task_pb2.GetStatsRequest(namespace=self._namespace)
        response = await self._unary(lambda c: c.tasks.GetStats, request, safe=True)
        return stats_from_proto(response)

    # --------------------------------------------------------------------- state

    async def get_state(self, key: str) -> StateEntry | None:
        """The entry of ``key``, or None when it does not exist."""
        request = state_pb2.GetRequest(namespace=self._namespace, key=key)
        try:
            response = await self._unary(lambda c: c.state.Get, request, safe=True)
        except NotFoundError:
            return None
        return entry_from_proto(response.entry)

    async def put_state(self, key: str, value: Any, *, expected_version: int | None = None,
                        ttl: float | None = None, lock: str = "",
                        fencing_token: int = 0) -> StateEntry:
        """Write ``key``. With ``expected_version`` the write is a compare-and-set
        (0: the key must not exist) and a conflict raises :class:`AbortedError`.
        With ``lock`` and ``fencing_token`` the write lands only while that grant
        is the lock's current one (else :class:`AbortedError`).
        """
        request = state_pb2.PutRequest(namespace=self._namespace, key=key,
                                       value=encode_payload(value), lock=lock,
                                       fencing_token=fencing_token)
        if expected_version is not None:
            request.expected_version = expected_version
        if ttl is not None:
            request.ttl.CopyFrom(to_duration(ttl))
        response = await self._unary(lambda c: c.state.Put, request, safe=False)
        return entry_from_proto(response.entry, value, use_value=True)

    async def delete_state(self, key: str, *, expected_version: int | None = None,
                           lock: str = "", fencing_token: int = 0) -> int:
        """Delete ``key`` (optionally compare-and-set, optionally fenced by a lock);
        returns the revision of the delete."""
        request = state_pb2.DeleteRequest(namespace=self._namespace, key=key, lock=lock,
                                          fencing_token=fencing_token)
        if expected_version is not None:
            request.expected_version = expected_version
        response = await self._unary(lambda c: c.state.Delete, request, safe=False)
        return response.revision

    # ------------------------------------------------------------------ locks

    async def acquire_lock(self, name: str, *, lease: float = 10.0, wait: float = 0.0,
                           owner: str = "") -> tuple[int, dt.datetime | None]:
        """Take a lock for ``lease`` seconds, waiting up to ``wait`` seconds.

        Returns (fencing token, expiry). A lock still held after ``wait`` raises
        :class:`AbortedError` (reason LOCK_HELD).
        """
        request = state_pb2.AcquireLockRequest(
            namespace=self._namespace, name=name, owner=owner,
            lease_duration=to_duration(lease), wait_timeout=to_duration(wait))
        response = await self._unary(lambda c: c.state.AcquireLock, request, safe=False,
                                     deadline=self._timeout + wait)
        return response.fencing_token, _time(response.expire_time)

    async def renew_lock(self, name: str, fencing_token: int, *,
                         lease: float = 10.0) -> dt.datetime | None:
        """Extend a held lock; returns the new expiry (AbortedError when not held)."""
        response = await self._unary(lambda c: c.state.RenewLock, state_pb2.RenewLockRequest(
            namespace=self._namespace, name=name, fencing_token=fencing_token,
            lease_duration=to_duration(lease)), safe=True)
        return _time(response.expire_time)

    async def release_lock(self, name: str, fencing_token: int) -> None:
        """Release a held lock (repeating it is harmless)."""
        await self._unary(lambda c: c.state.ReleaseLock, state_pb2.ReleaseLockRequest(
            namespace=self._namespace, name=name, fencing_token=fencing_token), safe=True)

    def lock(self, name: str, *, lease: float = 10.0, wait: float = 30.0,
             owner: str = "") -> contextlib.AbstractAsyncContextManager[Lock]:
        """``async with client.lock("name", lease=10) as lock:`` hold a lock.

        The lease renews in the background; writes through ``lock.put`` /
        ``lock.delete`` are fenced, so once the lock is lost they no longer land.
        """
        return hold(self, name, lease=lease, wait=wait, owner=owner)

    # -------------------------------------------------------------- snapshots

    async def create_snapshot(self, namespace: str = "") -> SnapshotInfo:
        """Write a snapshot of the state (one namespace, or all when empty) and tasks."""
        response = await self._unary(lambda c: c.state.CreateSnapshot,
                                     state_pb2.CreateSnapshotRequest(namespace=namespace),
                                     safe=False, deadline=max(self._timeout, 60.0))
        return _snapshot(response.snapshot)

    async def list_snapshots(self, *, limit: int = 1000) -> list[SnapshotInfo]:
        """Stored snapshots."""
        out: list[SnapshotInfo] = []
        token = ""
        while len(out) < limit:
            response = await self._unary(lambda c: c.state.ListSnapshots,
                                         state_pb2.ListSnapshotsRequest(
                                             page_size=min(_MAX_PAGE, limit - len(out)),
                                             page_token=token), safe=True)
            out += [_snapshot(s) for s in response.snapshots]
            token = response.next_page_token
            if not token:
                break
        return out

    async def restore_snapshot(self, name: str) -> SnapshotInfo:
        """Load a snapshot into an empty store (FailedPreconditionError otherwise)."""
        response = await self._unary(lambda c: c.state.RestoreSnapshot,
                                     state_pb2.RestoreSnapshotRequest(name=name),
                                     safe=False, deadline=max(self._timeout, 60.0))
        return _snapshot(response.snapshot)

    async def list_state(self, prefix: str = "", *, limit: int = 1000) -> list[StateEntry]:
        """Entries whose key starts with ``prefix``, ordered by key."""

        async def fetch(size: int, token: str) -> state_pb2.ListResponse:
            request = state_pb2.ListRequest(namespace=self._namespace, page_size=size,
                                            page_token=token, prefix=prefix)
            return await self._unary(lambda c: c.state.List, request, safe=True)

        return await self._pages(fetch, "entries", limit, entry_from_proto)

    def watch_state(self, prefix: str = "", *,
                    after_revision: int = 0) -> AsyncIterator[StateEvent]:
        """Iterate changes under ``prefix`` after ``after_revision`` (0: from now on)."""
        request = state_pb2.WatchRequest(namespace=self._namespace, prefix=prefix,
                                         after_revision=after_revision)
        return self._stream(lambda c: c.state.Watch(request), state_event_from_proto)

    async def update_state(self, key: str, fn: Callable[[Any | None], Any], *,
                           attempts: int = 10) -> StateEntry:
        """Read-modify-write ``key``: ``fn(current value or None)`` gives the new value.

        The write is a compare-and-set on the version read; on a conflict the
        key is re-read and ``fn`` applied again, up to ``attempts`` times, with
        jittered backoff. Raises :class:`AbortedError` when every attempt lost.
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        for attempt in range(attempts):
            current = await self.get_state(key)
            value = fn(None if current is None else current.value)
            try:
                return await self.put_state(
                    key, value, expected_version=0 if current is None else current.version)
            except AbortedError:
                if attempt + 1 >= attempts:
                    raise
                await asyncio.sleep(backoff_delay(attempt, base=0.01, cap=0.5))
        raise AssertionError("unreachable")  # pragma: no cover

    # ----------------------------------------------------------------------- bus

    async def publish(self, subject: str, value: Any, *,
                      headers: Mapping[str, str] | None = None) -> None:
        """Publish ``value`` on ``subject``."""
        request = bus_pb2.PublishRequest(
            namespace=self._namespace,
            message=bus_pb2.BusMessage(subject=subject, payload=encode_payload(value),
                                       headers=headers or {}))
        await self._unary(lambda c: c.bus.Publish, request, safe=False)

    def subscribe(self, subject: str, *, queue_group: str = "") -> AsyncIterator[BusMessage]:
        """Iterate messages published on subjects matching ``subject`` ("a.*", "a.>")."""
        request = bus_pb2.SubscribeRequest(namespace=self._namespace, subject=subject,
                                           queue_group=queue_group)
        return self._stream(lambda c: c.bus.Subscribe(request),
                            lambda r: bus_message_from_proto(r.message))


    def subscribe_durable(self, subject: str, name: str, *,
                          max_in_flight: int = 0) -> AsyncGenerator[DurableMessage, None]:
        """Messages of the durable consumer ``name`` (at least once; see the proto).

        ``await message.ack()`` once a message is handled. Messages published
        while no subscription of ``name`` is open wait for the next one; one
        not acked when the subscription ends comes again. The subscription
        exists once the first ``__anext__`` is awaited; it does not fail over
        by itself (open it again: nothing acked is lost).
        """
        requests: asyncio.Queue[bus_pb2.SubscribeDurableRequest] = asyncio.Queue()
        requests.put_nowait(bus_pb2.SubscribeDurableRequest(open=bus_pb2.DurableOpen(
            namespace=self._namespace, subject=subject, durable_name=name,
            max_in_flight=max_in_flight)))

        async def outgoing() -> AsyncIterator[bus_pb2.SubscribeDurableRequest]:
            while True:
                yield await requests.get()

        def delivered(response: bus_pb2.SubscribeDurableResponse) -> DurableMessage:
            async def ack() -> None:
                requests.put_nowait(bus_pb2.SubscribeDurableRequest(
                    ack=bus_pb2.DurableAck(delivery_ids=[response.delivery_id])))

            m = bus_message_from_proto(response.message)
            return DurableMessage(m.subject, m.value, m.headers, m.publish_time,
                                  response.delivery_id, ack)

        return self._stream(lambda c: c.bus.SubscribeDurable(outgoing()), delivered)


async def _flatten(batches: AsyncGenerator[list[Item], None]) -> AsyncGenerator[Item, None]:
    """The items of a stream of lists, one by one (closing the stream when left)."""
    try:
        async for batch in batches:
            for item in batch:
                yield item
    finally:
        await batches.aclose()

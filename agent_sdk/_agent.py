"""Agent: registers handlers per capability and runs the heartbeat and work streams.

One session is: ``RegisterAgent`` -> ``Heartbeat`` (bidi) + ``ProcessTasks``
(bidi). Flow control is credit based: the agent grants ``max_concurrency``
credits and one more for every freed slot, so no more than ``max_concurrency``
handlers ever run. Each stream has exactly one writer coroutine; handlers hand
their results to the work stream's writer through a bounded queue (a full queue
makes the handler wait: back-pressure, nothing is dropped). When a stream
breaks, running handlers are cancelled (the server requeues their leases) and
the agent registers again with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any, TypeAlias, TypeVar

import grpc
from agentmesh.v1 import discovery_pb2, task_pb2

from agent_sdk._auth import PemSource
from agent_sdk._client import DEFAULT_MAX_MESSAGE_BYTES, ChannelConfig, _Conn, _Targets
from agent_sdk._payload import decode_payload, encode_payload
from agent_sdk._retry import backoff_delay
from agent_sdk._tracing import configure_tracing, handler_span, task_log_context
from agent_sdk.errors import (
    ChunkRefusedError,
    NonRetryableError,
    RetryableError,
    rpc_error_from,
)

__all__ = ["Agent", "Handler", "TaskContext"]

log = logging.getLogger(__name__)

#: A handler: ``fn(task) -> output``, async or sync (sync ones run in a thread).
Handler: TypeAlias = Callable[["TaskContext"], Any]
H = TypeVar("H", bound=Handler)

_ACCEPTED = task_pb2.TASK_REPORT_OUTCOME_ACCEPTED
_STALE = task_pb2.TASK_REPORT_OUTCOME_STALE_LEASE
_OPEN_TIMEOUT = 10.0
_FLUSH_TIMEOUT = 5.0


class _SessionLost(Exception):
    """A stream ended; register again."""


class TaskContext:
    """What a handler receives: the task's fields, its decoded input and upstream outputs."""

    def __init__(self, task: task_pb2.Task, fencing_token: int, session: _Session) -> None:
        """Built by the agent for every assignment."""
        self._task = task
        self._session = session
        #: Fencing token of this lease.
        self.fencing_token = fencing_token
        #: "tasks/{id}".
        self.name: str = task.name
        #: The id part of the name.
        self.task_id: str = task.name.removeprefix("tasks/")
        #: Capability the task asked for (or its fallback).
        self.capability: str = task.capability
        #: Attempt number, from 1.
        self.attempt: int = task.attempt
        #: "workflows/{id}" when the task is a workflow step, else "".
        self.workflow: str = task.workflow
        #: Step id within the workflow.
        self.step_id: str = task.step_id
        #: Set when the server cancels the task (the handler is cancelled too).
        self.cancelled = asyncio.Event()
        #: Set when the server refused a chunk (see :meth:`emit`); later emits raise.
        self.chunk_refusal: ChunkRefusedError | None = None

    @cached_property
    def input(self) -> Any:
        """The decoded input."""
        return decode_payload(self._task.input) if self._task.HasField("input") else None

    @cached_property
    def upstream(self) -> dict[str, Any]:
        """Decoded outputs of the dependency steps, by step id."""
        return {k: decode_payload(v) for k, v in self._task.dependency_outputs.items()}

    @cached_property
    def labels(self) -> dict[str, str]:
        """The task's labels."""
        return dict(self._task.labels)

    @cached_property
    def trace_context(self) -> dict[str, str]:
        """W3C trace context (traceparent, tracestate)."""
        return dict(self._task.trace_context)

    async def progress(self, message: str = "") -> None:
        """Report progress; also renews the lease of a long-running attempt."""
        session = self._session
        if session.closed or self.cancelled.is_set():
            return
        await session.outbox.put(task_pb2.ProcessTasksRequest(progress=task_pb2.TaskProgress(
            task=self.name, fencing_token=self.fencing_token, message=message)))


    async def emit(self, text: str, *, artifact: str = "output", last: bool = False) -> None:
        """Stream text (LLM tokens...) to the task's watchers while the handler runs.

        Chunks reach watchers in the order emitted, numbered from 1, and are
        kept with the task (``MeshClient.watch_chunks``; A2A artifact updates).
        Raises :class:`ChunkRefusedError` when the chunk is over the server's
        size limit or an earlier chunk was refused (count limit, lease ended).
        """
        await self._emit(task_pb2.TaskChunk(kind=task_pb2.TASK_CHUNK_KIND_TEXT, text=text,
                                            artifact=artifact, last_chunk=last))

    async def emit_artifact(self, data: Any, *, artifact: str = "output",
                            last: bool = False) -> None:
        """Stream a piece of an artifact (any JSON value, or bytes); see :meth:`emit`."""
        await self._emit(task_pb2.TaskChunk(kind=task_pb2.TASK_CHUNK_KIND_ARTIFACT,
                                            data=encode_payload(data), artifact=artifact,
                                            last_chunk=last))

    async def emit_progress(self, message: str, fraction: float = 0.0) -> None:
        """Stream a progress note (``fraction`` 0..1, 0 when unknown); see :meth:`emit`.

        Unlike :meth:`progress` it does not renew the lease.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must be within 0..1")
        await self._emit(task_pb2.TaskChunk(kind=task_pb2.TASK_CHUNK_KIND_PROGRESS,
                                            text=message, progress=fraction))

    async def _emit(self, chunk: task_pb2.TaskChunk) -> None:
        if self.chunk_refusal is not None:
            raise self.chunk_refusal
        session = self._session
        size = len(chunk.text.encode()) + chunk.data.ByteSize() + len(chunk.artifact)
        if session.max_chunk_bytes and size > session.max_chunk_bytes:
            raise ChunkRefusedError("CHUNK_TOO_LARGE", (
                f"the chunk is {size} bytes; the server keeps at most "
                f"{session.max_chunk_bytes} per chunk"))
        if session.closed or self.cancelled.is_set():
            return
        chunk.task = self.name
        chunk.fencing_token = self.fencing_token
        await session.outbox.put(task_pb2.ProcessTasksRequest(
            chunks=task_pb2.TaskChunkBatch(chunks=[chunk])))


class _Running:
    """A running handler."""

    __slots__ = ("context", "task")

    def __init__(self, task: asyncio.Task[None], context: TaskContext) -> None:
        self.task = task
        self.context = context


class _Session:
    """Per-session state shared by the stream coroutines and the handlers."""

    def __init__(self, name: str, token: str, outbox_size: int,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.name = name
        self.token = token
        #: Largest message the work stream may send (the channel's limit).
        self.max_message_bytes = max_message_bytes
        self.outbox: asyncio.Queue[task_pb2.ProcessTasksRequest | None] = asyncio.Queue(
            maxsize=outbox_size)
        self.credits = 0
        self.closed = False
        #: Largest chunk the server keeps (0: not told).
        self.max_chunk_bytes = 0
        #: Set when the server asks this session to drain (it is shutting down).
        self.drain = asyncio.Event()
        self.drain_grace: float | None = None
        #: The drain was an operator's (DrainAgent): stop after it, do not reconnect.
        self.leave = False


class Agent:
    """A worker process that offers capabilities to the mesh.

    ::

        agent = Agent("researcher-1")

        @agent.handler("research")
        async def research(task: TaskContext) -> dict[str, str]:
            return {"summary": task.input["topic"]}

        await agent.run(install_signal_handlers=True)
    """

    def __init__(self, name: str, *, target: str | Sequence[str] = "127.0.0.1:50051",
                 namespace: str = "default", max_concurrency: int = 4,
                 labels: Mapping[str, str] | None = None, version: str = "",
                 channel: ChannelConfig | None = None, token: str | None = None,
                 tls_ca: PemSource | None = None, tls_cert: PemSource | None = None,
                 tls_key: PemSource | None = None, description: str = "",
                 a2a_card: str | Mapping[str, Any] | None = None) -> None:
        """Configure the agent; nothing connects until :meth:`run`.

        ``description`` says what the agent does (the mesh's A2A card shows it).
        ``a2a_card`` is an A2A agent card (its JSON text or the parsed object):
        an A2A-described agent joins with its skills as capabilities; register
        a handler for each skill id.

        ``channel`` sets TLS credentials, call interceptors and channel options.
        ``token`` (bearer token of an ``agent`` principal) and ``tls_ca`` /
        ``tls_cert`` / ``tls_key`` (TLS, mTLS) are shortcuts for
        :meth:`ChannelConfig.secure`.
        """
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._display_name = name
        if token or tls_ca is not None or tls_cert is not None or tls_key is not None:
            channel = ChannelConfig.secure(token=token, tls_ca=tls_ca, tls_cert=tls_cert,
                                           tls_key=tls_key, base=channel)
        configure_tracing("agentmesh-agent")  # no-op unless OTEL_* asks for tracing
        self._targets = _Targets(target, channel)
        self._namespace = namespace
        self._max_concurrency = max_concurrency
        self._labels = dict(labels or {})
        self._version = version
        self._description = description
        self._a2a_card = (a2a_card if isinstance(a2a_card, str) or a2a_card is None
                          else json.dumps(dict(a2a_card)))
        self._handlers: dict[str, tuple[Handler, bool]] = {}
        self._capability_versions: dict[str, str] = {}
        self._capability_info: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}
        self._running: dict[str, _Running] = {}
        self._agent_name = ""
        self._rpc_timeout = 10.0
        self._heartbeat_interval = 5.0
        self._grace = 10.0
        self._accepting = True
        self._stop_requested: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._run_active = False

    # ------------------------------------------------------------------ public

    @property
    def agent_name(self) -> str:
        """"agents/{id}" once registered, "" before."""
        return self._agent_name

    @property
    def running_tasks(self) -> int:
        """Handlers running now."""
        return len(self._running)

    def handler(self, capability: str, version: str = "", *, description: str = "",
                tags: Sequence[str] = (), examples: Sequence[str] = ()) -> Callable[[H], H]:
        """Register ``fn(task: TaskContext) -> output`` for ``capability``.

        ``description``, ``tags`` and ``examples`` describe it as an A2A skill of
        the mesh's agent card.

        ``fn`` may be async or sync; sync handlers run via ``asyncio.to_thread``.
        Raise :class:`RetryableError` or :class:`NonRetryableError` to choose how
        the failure is reported; any other exception is reported as retryable with
        the exception's class name as error type.
        """
        if not capability:
            raise ValueError("capability must not be empty")

        def register(fn: H) -> H:
            if capability in self._handlers:
                raise ValueError(f"a handler for {capability!r} is already registered")
            self._handlers[capability] = (fn, inspect.iscoroutinefunction(fn))
            self._capability_versions[capability] = version
            self._capability_info[capability] = (description, tuple(tags), tuple(examples))
            return fn

        return register

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT with ``install_signal_handlers``).

        Transient errors never end it: a broken session is re-established with
        jittered exponential backoff (capped at ~5 s).
        """
        if not self._handlers:
            raise RuntimeError("register at least one handler before run()")
        if self._run_active:
            raise RuntimeError("the agent is already running")
        self._run_active = True
        if self._stop_requested is None:
            self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        stop_requested = self._stop_requested
        loop = asyncio.get_running_loop()
        signals: list[signal.Signals] = []
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._request_stop, None)
                signals.append(sig)
        try:
            attempt = 0
            while not stop_requested.is_set():
                conn = self._targets.current()
                session: _Session | None = None
                try:
                    session = await self._register(conn)
                    attempt = 0
                    await self._serve(conn, session)
                    if session.drain.is_set() and session.leave:
                        log.info("agent %s: drained by an operator; stopped",
                                 self._display_name)
                        stop_requested.set()
                    elif session.drain.is_set():
                        # That server is shutting down: continue on the next one.
                        self._targets.failover(conn)
                except (grpc.aio.AioRpcError, _SessionLost, OSError,
                        asyncio.InvalidStateError) as exc:
                    if isinstance(exc, grpc.aio.AioRpcError):
                        if exc.code() == grpc.StatusCode.UNAVAILABLE:
                            self._targets.failover(conn)
                        reason: object = rpc_error_from(exc)
                    else:
                        reason = exc
                    if not stop_requested.is_set():
                        log.warning("agent %s: session lost (%s); reconnecting",
                                    self._display_name, reason)
                finally:
                    await self._cancel_running()
                    if session is not None:
                        session.closed = True
                        if stop_requested.is_set():
                            await self._deregister(conn, session)
                if stop_requested.is_set():
                    break
                delay = backoff_delay(attempt, base=0.1, cap=5.0)
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop_requested.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self._cancel_running()
            await self._targets.aclose()
            self._run_active = False
            self._stopped.set()
            log.info("agent %s stopped", self._display_name)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work, let in-flight handlers finish for up to ``grace``
        seconds and report their results, cancel the rest and deregister.

        Safe to call repeatedly and from any task; returns once :meth:`run` ended.
        """
        self._request_stop(grace)
        if self._run_active and self._stopped is not None:
            await self._stopped.wait()

    # --------------------------------------------------------------- internals

    def _request_stop(self, grace: float | None) -> None:
        if self._stop_requested is None:
            self._stop_requested = asyncio.Event()
        if self._stop_requested.is_set():
            return
        if grace is not None:
            self._grace = max(0.0, grace)
        log.info("agent %s stopping (grace %.1fs)", self._display_name, self._grace)
        self._stop_requested.set()

    def _card(self) -> discovery_pb2.Agent:
        return discovery_pb2.Agent(
            display_name=self._display_name,
            capabilities=[discovery_pb2.Capability(name=c, version=v,
                                                   description=self._capability_info[c][0],
                                                   tags=self._capability_info[c][1],
                                                   examples=self._capability_info[c][2])
                          for c, v in self._capability_versions.items()],
            max_concurrency=self._max_concurrency, labels=self._labels,
            version=self._version, namespace=self._namespace, description=self._description)

    async def _register(self, conn: _Conn) -> _Session:
        response = await conn.discovery.RegisterAgent(
            discovery_pb2.RegisterAgentRequest(agent=self._card(),
                                               a2a_agent_card=self._a2a_card or ""),
            timeout=self._rpc_timeout)
        self._agent_name = response.agent.name
        self._heartbeat_interval = (response.heartbeat_interval.ToTimedelta().total_seconds()
                                    or 5.0)
        log.info("agent %s registered as %s on %s", self._display_name, self._agent_name,
                 conn.target)
        return _Session(response.agent.name, response.session_token,
                        2 * self._max_concurrency + 16, conn.max_message_bytes)

    async def _deregister(self, conn: _Conn, session: _Session) -> None:
        try:
            await conn.discovery.DeregisterAgent(
                discovery_pb2.DeregisterAgentRequest(name=session.name,
                                                     session_token=session.token),
                timeout=min(self._rpc_timeout, 5.0))
        except grpc.aio.AioRpcError as exc:
            log.info("deregistering %s: %s", session.name, rpc_error_from(exc))

    async def _serve(self, conn: _Conn, session: _Session) -> None:
        """Run one session until a stream breaks or a stop has drained it."""
        heartbeat = conn.discovery.Heartbeat()
        work = conn.tasks.ProcessTasks()
        try:
            await heartbeat.write(discovery_pb2.HeartbeatRequest(
                open=discovery_pb2.HeartbeatOpen(agent=session.name,
                                                 session_token=session.token)))
            # The server accepts a work stream only once the heartbeat stream is
            # open and answered: wait for its first ack.
            async with asyncio.timeout(_OPEN_TIMEOUT):
                ack = await heartbeat.read()
            if ack is grpc.aio.EOF or not isinstance(ack, discovery_pb2.HeartbeatResponse):
                raise _SessionLost("the heartbeat stream did not open")
            await work.write(task_pb2.ProcessTasksRequest(
                open=task_pb2.ProcessTasksOpen(agent=session.name,
                                               session_token=session.token)))
            async with asyncio.timeout(_OPEN_TIMEOUT):
                first = await work.read()
            if first is grpc.aio.EOF or not isinstance(first, task_pb2.ProcessTasksResponse) \
                    or first.WhichOneof("kind") != "opened":
                raise _SessionLost("the work stream did not open")
            session.max_chunk_bytes = first.opened.max_chunk_bytes
            self._accepting = True
            await work.write(task_pb2.ProcessTasksRequest(
                credit=task_pb2.TaskCredit(count=self._max_concurrency)))
            jobs = [
                asyncio.create_task(self._beat(heartbeat, session)),
                asyncio.create_task(self._read_heartbeats(heartbeat, session)),
                asyncio.create_task(self._write_work(work, session)),
                asyncio.create_task(self._read_work(work, session)),
                asyncio.create_task(self._drain_on_stop(work, session)),
            ]
            try:
                done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
                for job in done:
                    job.result()
            finally:
                for job in jobs:
                    job.cancel()
                await asyncio.wait(jobs)
        finally:
            session.closed = True
            heartbeat.cancel()
            work.cancel()

    async def _beat(self, call: grpc.aio.StreamStreamCall[
            discovery_pb2.HeartbeatRequest, discovery_pb2.HeartbeatResponse],
            session: _Session) -> None:
        """The heartbeat stream's only writer: one beat per interval."""
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            in_flight = len(self._running)
            await call.write(discovery_pb2.HeartbeatRequest(beat=discovery_pb2.HeartbeatBeat(
                in_flight=in_flight, load=in_flight / self._max_concurrency)))

    async def _read_heartbeats(self, call: grpc.aio.StreamStreamCall[
            discovery_pb2.HeartbeatRequest, discovery_pb2.HeartbeatResponse],
            session: _Session) -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF or not isinstance(response,
                                                          discovery_pb2.HeartbeatResponse):
                break
            kind = response.WhichOneof("kind")
            if kind == "ack":
                interval = response.ack.heartbeat_interval.ToTimedelta().total_seconds()
                if interval > 0:
                    self._heartbeat_interval = interval
            elif kind == "drain":
                grace = response.drain.grace_period.ToTimedelta().total_seconds()
                log.info("agent %s: %s (%s); finishing in-flight work, then %s",
                         self._display_name,
                         "drained by an operator" if response.drain.leave
                         else "server asks to drain", response.drain.reason or "no reason given",
                         "stopping" if response.drain.leave else "reconnecting")
                session.drain_grace = grace if grace > 0 else None
                session.leave = response.drain.leave
                session.drain.set()
        raise _SessionLost("the heartbeat stream ended")

    async def _write_work(self, call: grpc.aio.StreamStreamCall[
            task_pb2.ProcessTasksRequest, task_pb2.ProcessTasksResponse],
            session: _Session) -> None:
        """The work stream's only writer.

        Every report ready at one moment goes out in one ``reports`` batch; a
        reported result or failure returns its slot to the server implicitly,
        so only slots freed without a report (server cancellations) need an
        explicit credit.
        """
        outbox = session.outbox
        while True:
            ready = [await outbox.get()]
            while not outbox.empty():
                ready.append(outbox.get_nowait())
            results: list[task_pb2.TaskResult] = []
            failures: list[task_pb2.TaskFailureReport] = []
            chunks: list[task_pb2.TaskChunk] = []
            for message in ready:
                if message is None:
                    continue
                kind = message.WhichOneof("kind")
                if kind == "result":
                    results.append(message.result)
                elif kind == "failure":
                    failures.append(message.failure)
                elif kind == "chunks":
                    chunks.extend(message.chunks.chunks)
                else:
                    await call.write(message)
            # Chunks go before the results: a handler's chunks precede its result.
            for batch in chunk_batches(chunks, session.max_message_bytes):
                await call.write(batch)
            if len(results) + len(failures) == 1:
                await call.write(task_pb2.ProcessTasksRequest(result=results[0]) if results
                                 else task_pb2.ProcessTasksRequest(failure=failures[0]))
            elif results or failures:
                for batch in report_batches(results, failures, session.max_message_bytes):
                    await call.write(batch)
            for _ in ready:
                outbox.task_done()
            if session.credits and self._accepting:
                count, session.credits = session.credits, 0
                await call.write(task_pb2.ProcessTasksRequest(
                    credit=task_pb2.TaskCredit(count=count)))

    async def _read_work(self, call: grpc.aio.StreamStreamCall[
            task_pb2.ProcessTasksRequest, task_pb2.ProcessTasksResponse],
            session: _Session) -> None:
        running = self._running
        while True:
            response = await call.read()
            if response is grpc.aio.EOF or not isinstance(response,
                                                          task_pb2.ProcessTasksResponse):
                break
            kind = response.WhichOneof("kind")
            if kind == "assignment":
                self._start(response.assignment, session)
            elif kind == "assignments":
                for assignment in response.assignments.assignments:
                    self._start(assignment, session)
            elif kind == "ack":
                # Only refused reports are acknowledged.
                ack = response.ack
                if ack.outcome != _ACCEPTED:
                    log.info("result for %s (token %d) refused: %s", ack.task,
                             ack.fencing_token,
                             "stale lease" if ack.outcome == _STALE else "not running")
            elif kind == "chunk_ack":
                self._chunk_refused(response.chunk_ack)
            elif kind == "cancellation":
                c = response.cancellation
                entry = running.get(c.task)
                if entry is not None and entry.context.fencing_token == c.fencing_token:
                    log.info("task %s cancelled by the server: %s", c.task,
                             c.reason or "no reason given")
                    entry.context.cancelled.set()
                    entry.task.cancel()
        raise _SessionLost("the work stream ended")

    def _chunk_refused(self, ack: task_pb2.TaskChunkAck) -> None:
        """Remember a refusal on the handler's context: its next emit raises it."""
        reason = ack.reason or {_STALE: "STALE_LEASE"}.get(ack.outcome, "NOT_RUNNING")
        log.info("chunks of %s (token %d) refused: %s %s", ack.task, ack.fencing_token,
                 reason, ack.message)
        entry = self._running.get(ack.task)
        if entry is not None and entry.context.fencing_token == ack.fencing_token:
            entry.context.chunk_refusal = ChunkRefusedError(reason, ack.message)

    def _start(self, assignment: task_pb2.TaskAssignment, session: _Session) -> None:
        """Run the handler of one assignment (the hot path: keep it lean)."""
        if not self._accepting:
            # Stopping: leave it leased; deregistering requeues it at once.
            return
        task = assignment.task
        context = TaskContext(task, assignment.fencing_token, session)
        with task_log_context(context.task_id, context.workflow,
                              self._agent_name.removeprefix("agents/"), task.trace_context):
            job = asyncio.create_task(self._run_handler(context, session))
        self._running[task.name] = _Running(job, context)

    async def _run_handler(self, context: TaskContext, session: _Session) -> None:
        name = context.name
        message: task_pb2.ProcessTasksRequest | None = None
        try:
            entry = self._handlers.get(context.capability)
            if entry is None:
                raise NonRetryableError(f"no handler for capability {context.capability!r}",
                                        "UnknownCapability")
            fn, is_async = entry
            with handler_span(context.capability, context.task_id, workflow=context.workflow,
                              attempt=context.attempt,
                              agent_id=self._agent_name.removeprefix("agents/"),
                              trace_context=context._task.trace_context):
                if is_async:
                    output = await fn(context)
                else:
                    output = await asyncio.to_thread(fn, context)
                    if inspect.isawaitable(output):
                        output = await output
            if not context.cancelled.is_set():
                message = task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
                    task=name, fencing_token=context.fencing_token,
                    output=encode_payload(output)))
                size = message.ByteSize()
                if size > session.max_message_bytes - REPORT_HEADROOM:
                    # gRPC would refuse to send it and end the stream (and every
                    # other task's lease): report the failure instead.
                    message = _failure(
                        name, context.fencing_token, "OutputTooLarge",
                        f"the output is {size} bytes; a message is limited to "
                        f"{session.max_message_bytes} bytes", non_retryable=True)
        except asyncio.CancelledError:
            if context.cancelled.is_set() and not session.closed:
                # Cancelled by the server: report nothing, free the slot.
                self._forget(context)
                session.credits += 1
                with contextlib.suppress(asyncio.QueueFull):
                    session.outbox.put_nowait(None)
            raise
        except (RetryableError, NonRetryableError) as exc:
            log.info("task %s failed: %s: %s", name, exc.error_type, exc.message)
            message = _failure(name, context.fencing_token, exc.error_type, exc.message,
                               non_retryable=isinstance(exc, NonRetryableError))
        except Exception as exc:
            log.exception("handler for %s failed on %s", context.capability, name)
            message = _failure(name, context.fencing_token, type(exc).__name__, str(exc),
                               non_retryable=False)
        self._forget(context)
        if session.closed:
            return
        await session.outbox.put(message)

    def _forget(self, context: TaskContext) -> None:
        entry = self._running.get(context.name)
        if entry is not None and entry.context is context:
            del self._running[context.name]

    async def _drain_on_stop(self, call: grpc.aio.StreamStreamCall[
            task_pb2.ProcessTasksRequest, task_pb2.ProcessTasksResponse],
            session: _Session) -> None:
        """On stop: no more credits, wait in-flight handlers up to the grace period,
        flush their results and wait for the server to end the stream."""
        assert self._stop_requested is not None
        stop = asyncio.ensure_future(self._stop_requested.wait())
        drain = asyncio.ensure_future(session.drain.wait())
        try:
            await asyncio.wait([stop, drain], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            drain.cancel()
        stopping = self._stop_requested.is_set()
        if not stopping and session.drain_grace is not None:
            self._grace = session.drain_grace
        self._accepting = False
        jobs = [r.task for r in self._running.values()]
        if jobs:
            log.info("agent %s: waiting up to %.1fs for %d task(s)", self._display_name,
                     self._grace, len(jobs))
            _, pending = await asyncio.wait(jobs, timeout=self._grace)
            if pending:
                log.warning("agent %s: cancelling %d task(s) still running after the grace "
                            "period", self._display_name, len(pending))
                await self._cancel_running()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FLUSH_TIMEOUT):
                await session.outbox.join()
        await call.done_writing()
        # The server handles every report before it ends the stream, so waiting
        # for the end means no result is still in the pipe when we deregister.
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
            async with asyncio.timeout(_FLUSH_TIMEOUT):
                await call.code()

    async def _cancel_running(self) -> None:
        """Cancel every running handler and wait until they ended."""
        if not self._running:
            return
        jobs = [r.task for r in self._running.values()]
        self._running.clear()
        for job in jobs:
            job.cancel()
        await asyncio.wait(jobs)


REPORT_HEADROOM = 1024
"""Bytes a report message keeps under the message limit."""
MAX_REPORTS = 1000
"""Most results plus failures in one ``reports`` batch (the server's bound)."""


def report_batches(results: Sequence[task_pb2.TaskResult],
                   failures: Sequence[task_pb2.TaskFailureReport],
                   max_message_bytes: int) -> list[task_pb2.ProcessTasksRequest]:
    """``reports`` messages holding every report, each within the message limit.

    Sizes are measured (``ByteSize`` plus the framing of each entry), so six
    results of 1 MB finishing together go out as two or three messages instead
    of one the server refuses (which would end the stream).
    """
    budget = max_message_bytes - REPORT_HEADROOM
    out: list[task_pb2.ProcessTasksRequest] = []
    batch = task_pb2.TaskReportBatch()
    used = count = 0
    reports: list[task_pb2.TaskResult | task_pb2.TaskFailureReport] = [*results, *failures]
    for report in reports:
        size = report.ByteSize()
        item = size + 1 + max(1, (size.bit_length() + 6) // 7)
        if count and (used + item + 8 > budget or count >= MAX_REPORTS):
            out.append(task_pb2.ProcessTasksRequest(reports=batch))
            batch = task_pb2.TaskReportBatch()
            used = count = 0
        if isinstance(report, task_pb2.TaskResult):
            batch.results.append(report)
        else:
            batch.failures.append(report)
        used += item
        count += 1
    if count:
        out.append(task_pb2.ProcessTasksRequest(reports=batch))
    return out


def chunk_batches(chunks: Sequence[task_pb2.TaskChunk],
                  max_message_bytes: int) -> list[task_pb2.ProcessTasksRequest]:
    """``chunks`` messages holding every chunk in order, each within the message limit."""
    budget = max_message_bytes - REPORT_HEADROOM
    out: list[task_pb2.ProcessTasksRequest] = []
    batch = task_pb2.TaskChunkBatch()
    used = 0
    for chunk in chunks:
        size = chunk.ByteSize()
        item = size + 1 + max(1, (size.bit_length() + 6) // 7)
        if batch.chunks and (used + item + 8 > budget or len(batch.chunks) >= MAX_REPORTS):
            out.append(task_pb2.ProcessTasksRequest(chunks=batch))
            batch = task_pb2.TaskChunkBatch()
            used = 0
        batch.chunks.append(chunk)
        used += item
    if batch.chunks:
        out.append(task_pb2.ProcessTasksRequest(chunks=batch))
    return out


def _failure(task: str, token: int, error_type: str, message: str, *,
             non_retryable: bool) -> task_pb2.ProcessTasksRequest:
    return task_pb2.ProcessTasksRequest(failure=task_pb2.TaskFailureReport(
        task=task, fencing_token=token, failure=task_pb2.TaskFailure(
            error_type=error_type, message=message, non_retryable=non_retryable)))


"""Redis TaskStore: every transition is one call of a Lua function (``tasks.lua``).

See the package docstring for the key layout. Each method is one round trip.
The resilience indexes (schedule-to-start timers, fallback queues, RUNNING
counters, rate buckets) live under the same hash tag::

    {P}:s2s                           zset  QUEUED task ids by queue_deadline
    {P}:fbq:<ns>:<len(fb)>:<fb>:<cap> zset  QUEUED tasks of <cap> whose fallback is <fb>
    {P}:fbp:<len(ns)>:<ns>:<fb>       set   primaries with tasks in a fallback queue of <fb>
    {P}:running:<len(ns)>:<ns>        hash  RUNNING count per "c:"+cap and "l:"+label=value
    {P}:bucket:<len(ns)>:<ns>         hash  token bucket per capability (<cap>:t, <cap>:s)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from server.backends.redis import codec
from server.backends.redis._client import RedisClient
from server.backends.redis._durability import NONE, Durability
from server.backends.redis._scripts import Library
from server.domain.errors import (
    AgentMeshError,
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    StaleLeaseError,
)
from server.domain.limits import NO_FALLBACK, NO_LIMITS, DispatchLimits, LeaseScope
from server.domain.models import (
    Lease,
    Payload,
    Stats,
    Task,
    TaskChange,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowState,
    evolve_task,
)
from server.ports import FailVerdict, TaskFilter, TaskRecords, Transition

logger = logging.getLogger(__name__)

_VERDICTS = {FailVerdict.RETRY: "retry", FailVerdict.FAIL: "fail",
             FailVerdict.DEAD_LETTER: "dead_letter"}


def _transition(reply: list[Any], *, parsed: bool = False) -> Transition:
    """Decode ``[status, workflow, prev, task, prev, task, ...]``.

    The workflow and tasks are JSON texts (a Redis array reply) or, with
    ``parsed``, documents already (the one-JSON replies of the batch scripts).
    """
    doc: Any = _same if parsed else codec.loads
    wf = reply[1]
    changes = tuple(TaskChange(codec.task_from_doc(doc(reply[i + 1])),
                               TaskState(int(reply[i])) if reply[i] else None)
                    for i in range(2, len(reply), 2))
    return Transition(changes, codec.workflow_from_doc(doc(wf)) if wf else None)


def raise_fenced(task_id: str, fencing_token: int, reply: list[Any]) -> None:
    """The errors of a fenced call's reply: ``["notfound"]`` or ``["stale", state,
    current token]`` (the Lua ``running`` check); any other reply passes."""
    status = reply[0]
    if status == "notfound":
        raise NotFoundError("task", f"tasks/{task_id}")
    if status == "stale":
        state, current = TaskState(int(reply[1])), int(reply[2])
        raise StaleLeaseError(
            f"tasks/{task_id}: fencing token {fencing_token} is stale "
            f"(task is {state.name}, current token {current})",
            metadata={"task": f"tasks/{task_id}", "current_token": str(current)})


def _same(value: Any) -> Any:
    return value


def _already_exists(name: str) -> AlreadyExistsError:
    """The refusal of a create whose id is taken (``tasks/<id>``, ``workflows/<id>``)."""
    return AlreadyExistsError(f"{name} already exists", metadata={"existing": name})


class RedisTaskStore:
    """TaskStore on Redis; safe to share between server replicas.

    Build it with :meth:`server.backends.redis.RedisStores.connect`, or pass a
    ``redis.asyncio.Redis`` created with ``decode_responses=True`` and the
    deployment's key prefix.
    """

    def __init__(self, client: RedisClient, prefix: str = "agentmesh", *,
                 durability: Durability = NONE) -> None:
        self._r = client
        self._base = "{" + prefix + "}"
        self.library = Library(client, "tasks", durability)
        """The ``tasks.lua`` library (loaded by :meth:`RedisStores.connect`, or on first use)."""

    def _key(self, kind: str, name: str) -> str:
        return f"{self._base}:{kind}:{name}"

    async def _call(self, *args: str | int | float) -> Any:
        return await self.library.call([self._base], args)

    async def _read(self, *args: str | int | float) -> Any:
        """A read-only op (FCALL_RO)."""
        return await self.library.call_ro([self._base], args)

    def _raise(self, task_id: str, fencing_token: int, reply: list[Any]) -> None:
        raise_fenced(task_id, fencing_token, reply)
        if reply[0] != "ok":  # pragma: no cover - a script/contract mismatch
            raise RuntimeError(f"unexpected reply from tasks.lua: {reply!r}")

    # -- create / read ---------------------------------------------------------------

    async def create_task(
        self, task: Task, *, request_id: str = "", max_queued: int = 0
    ) -> tuple[Task, bool, Transition]:
        """See TaskStore.create_task (the one-item case of ``create_tasks``)."""
        results, full = await self.create_tasks([(task, request_id)], max_queued=max_queued)
        if full:
            raise ResourceExhaustedError(
                f"namespace {task.namespace!r} has {max_queued} tasks waiting (the limit)",
                retry_after=1.0, reason="QUEUE_FULL")
        return results[0]

    async def create_tasks(
        self, items: Sequence[tuple[Task, str]], *, max_queued: int = 0,
    ) -> tuple[list[tuple[Task, bool, Transition]], bool]:
        """See TaskStore.create_tasks (one script call).

        A created task is rebuilt from the submitted one plus the ``seq`` and
        ``queue_deadline`` the script set, rather than decoded from the stored
        document: the same value (``tests/conformance/test_redis_codec.py``).
        """
        docs = codec.dumps([[codec.task_to_doc(t), rid] for t, rid in items])
        reply = codec.loads(await self._call("create_tasks", docs, max_queued))
        if reply and reply[0][0] == "exists":
            raise _already_exists(str(reply[0][1]))
        out: list[tuple[Task, bool, Transition]] = []
        for (submitted, _), item in zip(items, reply, strict=False):
            status = item[0]
            if status == "full":
                return out, True
            if status == "dup":
                out.append((codec.task_from_doc(item[1]), False, Transition()))
            else:
                # The stored task is the one sent with the three fields the script set.
                prev = TaskState(int(item[1])) if item[1] else None
                task = evolve_task(submitted, state=TaskState.QUEUED, seq=int(item[2]),
                                   queue_deadline=float(item[3] or 0.0))
                out.append((task, True, Transition((TaskChange(task, prev),))))
        return out, False

    async def create_workflow(
        self, workflow: Workflow, tasks: Sequence[Task], *, request_id: str = "",
        max_queued: int = 0,
    ) -> tuple[Workflow, bool, Transition]:
        """See TaskStore.create_workflow."""
        docs = json.dumps([codec.task_to_doc(t) for t in tasks], separators=(",", ":"))
        reply = await self._call("create_workflow", codec.encode_workflow(workflow), docs,
                                 request_id, max_queued)
        if reply[0] == "dup":
            return codec.decode_workflow(reply[1]), False, Transition()
        if reply[0] == "exists":
            raise _already_exists(str(reply[1]))
        if reply[0] == "full":
            raise ResourceExhaustedError(
                f"namespace {workflow.namespace!r} would exceed {max_queued} waiting tasks",
                retry_after=1.0, reason="QUEUE_FULL")
        tr = _transition(reply)
        assert tr.workflow is not None
        return tr.workflow, True, tr

    async def get_task(self, task_id: str) -> Task | None:
        """See TaskStore.get_task."""
        raw = await self._r.get(self._key("task", task_id))
        return codec.decode_task(codec.text(raw)) if raw else None

    async def get_tasks(self, task_ids: Sequence[str]) -> list[Task | None]:
        """See TaskStore.get_tasks (one MGET: every key shares the deployment's hash tag)."""
        if not task_ids:
            return []
        raws = await self._r.mget([self._key("task", t) for t in task_ids])
        return [codec.decode_task(codec.text(raw)) if raw else None for raw in raws]

    async def list_tasks(self, flt: TaskFilter, *, before_seq: int, limit: int) -> list[Task]:
        """See TaskStore.list_tasks (a server-side scan of the namespace, newest first)."""
        if limit <= 0:
            return []
        state = int(flt.state) if flt.state is not None else 0
        labels = json.dumps(dict(flt.labels), separators=(",", ":")) if flt.labels else ""
        raws = await self._read("list_tasks", flt.namespace, state, flt.capability,
                                flt.workflow_id, before_seq, limit, labels,
                                repr(flt.created_after), repr(flt.created_before))
        return [codec.decode_task(r) for r in raws]

    async def scan_tasks(self, flt: TaskFilter, *, before_seq: int, limit: int,
                         max_scan: int) -> tuple[list[Task], int]:
        """See TaskStore.scan_tasks: the ids by seq (one ZREVRANGEBYSCORE of at most
        ``max_scan``), their documents (one MGET), filtered here. Two reads, not one
        atomic step: a list is a snapshot of nothing in particular anyway."""
        if limit <= 0 or max_scan <= 0:
            return [], 0
        high = f"({before_seq}" if before_seq else "+inf"
        ids: list[tuple[Any, float]] = await self._r.zrevrangebyscore(  # type: ignore[assignment]
            self._key("tasks", flt.namespace), high, "-inf", start=0, num=max_scan,
            withscores=True)
        if not ids:
            return [], 0
        raws = await self._r.mget([self._key("task", codec.text(i)) for i, _ in ids])
        out: list[Task] = []
        for (_, score), raw in zip(ids, raws, strict=True):
            if not raw:
                continue
            task = codec.decode_task(codec.text(raw))
            if flt.matches(task):
                out.append(task)
                if len(out) >= limit:
                    return out, int(score)
        return out, int(ids[-1][1]) if len(ids) == max_scan else 0

    async def get_workflow(self, workflow_id: str) -> Workflow | None:
        """See TaskStore.get_workflow."""
        raw = await self._r.get(self._key("wf", workflow_id))
        return codec.decode_workflow(codec.text(raw)) if raw else None

    async def list_workflows(
        self, namespace: str, state: WorkflowState | None, *, before_seq: int, limit: int
    ) -> list[Workflow]:
        """See TaskStore.list_workflows."""
        if limit <= 0:
            return []
        raws = await self._read("list_workflows", namespace,
                                int(state) if state is not None else 0, before_seq, limit)
        return [codec.decode_workflow(r) for r in raws]

    # -- leases ----------------------------------------------------------------------

    async def lease_next(
        self, namespace: str, capabilities: Sequence[str], agent_id: str, *,
        now: float, default_timeout: float, scope: LeaseScope = NO_FALLBACK,
        limits: DispatchLimits = NO_LIMITS,
    ) -> Lease | None:
        """See TaskStore.lease_next (the one-lease case of ``lease_batch``)."""
        leases = await self.lease_batch(namespace, capabilities, agent_id, now=now,
                                        default_timeout=default_timeout, count=1, scope=scope,
                                        limits=limits)
        return leases[0] if leases else None

    async def lease_batch(
        self, namespace: str, capabilities: Sequence[str], agent_id: str, *,
        now: float, default_timeout: float, count: int, scope: LeaseScope = NO_FALLBACK,
        limits: DispatchLimits = NO_LIMITS,
    ) -> list[Lease]:
        """See TaskStore.lease_batch (one script call for up to ``count`` leases).

        The script reads the agent's liveness from ``{P}:agents_active`` (kept
        by ``agents.lua``; same hash tag) before it leases anything.
        """
        if count <= 0 or (not capabilities and not scope.fallback_for):
            return []
        scope_doc = codec.dumps({"fb": list(scope.fallback_for),
                                 "avail": sorted(scope.available)})
        reply = await self._call("lease_batch", namespace, agent_id, codec.fstr(now),
                                 codec.fstr(default_timeout), scope_doc,
                                 codec.dumps(limits.to_doc()), count, *capabilities)
        leases = []
        for doc in codec.loads(reply):
            task = codec.task_from_doc(doc)
            leases.append(Lease(task, task.fencing_token, task.lease_deadline))
        return leases

    async def renew_lease(self, task_id: str, fencing_token: int, deadline: float) -> Task:
        """See TaskStore.renew_lease."""
        reply = await self._call("renew_lease", task_id, fencing_token, codec.fstr(deadline))
        self._raise(task_id, fencing_token, reply)
        return codec.decode_task(reply[1])

    async def expired_leases(self, now: float, limit: int) -> list[Task]:
        """See TaskStore.expired_leases.

        Unlike the in-memory store this does not consume the expiry: a task is
        reported again until someone moves it on (``fail`` is fenced, so two
        reapers racing on one task is harmless).
        """
        if limit <= 0:
            return []
        raws = await self._read("expired_leases", codec.fstr(now), limit)
        return [codec.decode_task(r) for r in raws]

    async def leases_of(self, agent_id: str) -> list[Task]:
        """See TaskStore.leases_of."""
        raws = await self._read("leases_of", agent_id)
        return [codec.decode_task(r) for r in raws]

    # -- results ---------------------------------------------------------------------

    async def complete(self, task_id: str, fencing_token: int, output: Payload, *,
                       now: float) -> Transition:
        """See TaskStore.complete (the one-item case of ``complete_many``)."""
        result = (await self.complete_many([(task_id, fencing_token, output)], now=now))[0]
        if isinstance(result, AgentMeshError):
            raise result
        return result

    async def complete_many(self, items: Sequence[tuple[str, int, Payload]], *,
                            now: float) -> list[Transition | AgentMeshError]:
        """See TaskStore.complete_many (one script call)."""
        if not items:
            return []
        docs = codec.dumps([[task_id, str(token), codec.payload_to_doc(output)]
                            for task_id, token, output in items])
        replies = codec.loads(await self._call("complete_many", docs, codec.fstr(now)))
        out: list[Transition | AgentMeshError] = []
        for (task_id, token, _), reply in zip(items, replies, strict=True):
            try:
                self._raise(task_id, token, reply)
            except AgentMeshError as exc:
                out.append(exc)
            else:
                out.append(_transition(reply, parsed=True))
        return out

    async def fail(self, task_id: str, fencing_token: int, failure: TaskFailure, *,
                   verdict: FailVerdict, retry_at: float, now: float) -> Transition:
        """See TaskStore.fail."""
        doc = {"error_type": failure.error_type, "message": failure.message,
               "non_retryable": failure.non_retryable}
        reply = await self._call("fail", task_id, fencing_token, json.dumps(doc),
                                 _VERDICTS[verdict], codec.fstr(retry_at), codec.fstr(now))
        self._raise(task_id, fencing_token, reply)
        return _transition(reply)

    async def promote_due(self, now: float, limit: int) -> Transition:
        """See TaskStore.promote_due."""
        if limit <= 0:
            return Transition()
        return _transition(await self._call("promote_due", codec.fstr(now), limit))

    async def expire_queued(self, now: float, limit: int) -> Transition:
        """See TaskStore.expire_queued."""
        if limit <= 0:
            return Transition()
        return _transition(await self._call("expire_queued", codec.fstr(now), limit))

    # -- human and client actions ------------------------------------------------------

    async def cancel_task(self, task_id: str, reason: str, *, now: float) -> Transition:
        """See TaskStore.cancel_task."""
        reply = await self._call("cancel_task", task_id, reason, codec.fstr(now))
        if reply[0] == "ended":
            raise FailedPreconditionError(
                f"tasks/{task_id} already ended ({TaskState(int(reply[1])).name})",
                reason="TASK_ENDED")
        self._raise(task_id, 0, reply)
        return _transition(reply)

    async def cancel_workflow(self, workflow_id: str, reason: str, *, now: float) -> Transition:
        """See TaskStore.cancel_workflow."""
        reply = await self._call("cancel_workflow", workflow_id, reason, codec.fstr(now))
        if reply[0] == "notfound":
            raise NotFoundError("workflow", f"workflows/{workflow_id}")
        if reply[0] == "ended":
            raise FailedPreconditionError(
                f"workflows/{workflow_id} already ended ({WorkflowState(int(reply[1])).name})",
                reason="WORKFLOW_ENDED")
        return _transition(reply)

    async def redrive(self, task_id: str, new_input: Payload | None, *, now: float) -> Transition:
        """See TaskStore.redrive."""
        raw_input = json.dumps(codec.payload_to_doc(new_input)) if new_input is not None else ""
        reply = await self._call("redrive", task_id, raw_input, codec.fstr(now))
        if reply[0] == "notredrivable":
            raise FailedPreconditionError(
                f"tasks/{task_id} is {TaskState(int(reply[1])).name}; only dead-lettered, "
                "failed or cancelled tasks can be re-driven", reason="TASK_NOT_REDRIVABLE")
        self._raise(task_id, 0, reply)
        return _transition(reply)

    async def stats(self, namespace: str) -> Stats:
        """See TaskStore.stats (counters kept by the scripts, one HGETALL)."""
        reply = await self._r.hgetall(self._key("stats", namespace))
        raw = {codec.text(k): codec.text(v) for k, v in reply.items()}
        by_state: dict[TaskState, int] = {}
        by_cap: dict[tuple[str, TaskState], int] = {}
        for field, value in raw.items():
            if field.isdigit() and int(value) > 0:
                by_state[TaskState(int(field))] = int(value)
            elif field.startswith("c:") and int(value) > 0:
                _, state, capability = field.split(":", 2)
                by_cap[(capability, TaskState(int(state)))] = int(value)
        return Stats(by_state, int(raw.get("ended", 0)), int(raw.get("autonomous", 0)), by_cap)

    # -- snapshots -------------------------------------------------------------------

    async def export_records(self, namespace: str | None) -> TaskRecords:
        """See SnapshotSource.export_records.

        One script (atomic). It finds the namespaces with SCAN over the
        ``{P}:tasks:*`` / ``{P}:wfs:*`` indexes, so it blocks Redis for a walk
        of the keyspace: fine for a snapshot, never on a hot path.
        """
        reply = await self._read("export", namespace or "", "1" if namespace is not None else "")
        seq, tasks, wfs = int(reply[0]), reply[1], reply[2]
        return TaskRecords(tuple(sorted((codec.decode_task(t) for t in tasks),
                                        key=lambda t: t.seq)),
                           tuple(sorted((codec.decode_workflow(w) for w in wfs),
                                        key=lambda w: w.seq)), seq)

    async def import_records(self, records: TaskRecords, *, dry_run: bool = False) -> None:
        """See SnapshotSource.import_records (one script: checked and written atomically)."""
        tasks = json.dumps([codec.task_to_doc(t) for t in records.tasks],
                           separators=(",", ":"))
        wfs = json.dumps([codec.workflow_to_doc(w) for w in records.workflows],
                         separators=(",", ":"))
        reply = await self._call("import", tasks, wfs, records.seq, "1" if dry_run else "")
        if reply[0] == "busy":
            busy = sorted(str(x) for x in reply[1:])
            raise FailedPreconditionError(
                f"cannot restore into namespace(s) {', '.join(busy)} holding tasks",
                reason="STORE_NOT_EMPTY", metadata={"namespaces": ",".join(busy)})

    async def aclose(self) -> None:
        """Nothing of its own: the connection belongs to :class:`RedisStores`."""

"""Snapshots: the whole state and the task/workflow records in one blob.

Format: gzip of one JSON document (``FORMAT``)::

    {"format": "agentmesh.snapshot/v1", "name": "snapshots/<stamp>-<id>",
     "create_time": <unix>, "namespace": "" | "<ns>",
     "state": {"<ns>": {"revision": n, "entries": [entry...], "locks": {"<name>": token}}},
     "task_seq": n, "tasks": [task...], "workflows": [workflow...]}

stored under ``snapshots/<UTC stamp>-<id>.json.gz`` in the BlobStore, so keys
sort by time. Entries keep their versions and the namespace revision, lock
counters keep the last fencing token (holders are not kept: after a restore
every lock is free, and its next token is larger than any granted before).
Task and workflow documents are those of the Redis codec (pure JSON, no Redis).

Consistency: each store exports in one atomic step, so every namespace's
state reflects exactly one revision (memory: no await while copying; Redis:
one Lua script, which blocks Redis for the copy, O(entries), the price of a
consistent cut without MVCC). State and tasks are two steps: on memory they
run back to back without yielding (one cut); on Redis the task records are a
second cut taken right after the state's.

Namespaces whose name starts with ``_`` are internal (the periodic job's
guard lock lives in ``_system``) and are neither exported nor restored.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.aio import raise_if_cancelling
from server.backends.redis import codec
from server.domain.errors import AbortedError, InvalidArgumentError, NotFoundError
from server.domain.models import StateEntry, TaskState
from server.ports import BlobStore, Bus, NamespaceDump, SnapshotSource, StateStore, TaskRecords
from server.services import events
from server.services.clock import Clock

log = logging.getLogger(__name__)

FORMAT = "agentmesh.snapshot/v1"
PREFIX = "snapshots/"
SUFFIX = ".json.gz"
SYSTEM_NAMESPACE = "_system"
PERIODIC_LOCK = "snapshot-periodic"


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What a snapshot holds (counts are 0 when only listed)."""

    name: str
    create_time: float
    size_bytes: int = 0
    namespace: str = ""
    revisions: Mapping[str, int] = field(default_factory=dict)
    entry_count: int = 0
    task_count: int = 0
    workflow_count: int = 0


def _stamp(now: float) -> str:
    t = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    return t.strftime("%Y%m%dT%H%M%S") + f"{t.microsecond // 1000:03d}Z"


def _time_of(name: str) -> float:
    stamp = name.removeprefix(PREFIX).split("-", 1)[0]
    try:
        t = dt.datetime.strptime(stamp[:15], "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
        return t.timestamp() + int(stamp[15:18]) / 1000
    except ValueError:
        return 0.0


def snapshot_name(value: str) -> str:
    """``snapshots/<id>`` (or a bare id) -> the canonical name; InvalidArgumentError."""
    sid = value.removeprefix(PREFIX)
    if not sid or "/" in sid or sid.startswith(".") or len(sid) > 200 or not sid.isprintable():
        raise InvalidArgumentError.field("name", "must be snapshots/{snapshot}")
    return PREFIX + sid


def _entry_doc(e: StateEntry) -> dict[str, Any]:
    return {"key": e.key, "value": codec.payload_to_doc(e.value), "version": e.version,
            "revision": e.revision, "update_time": e.update_time, "expire_time": e.expire_time}


def encode(info: SnapshotInfo, state: Mapping[str, NamespaceDump], records: TaskRecords) -> bytes:
    """The gzip JSON blob of a snapshot."""
    doc = {
        "format": FORMAT, "name": info.name, "create_time": info.create_time,
        "namespace": info.namespace,
        "state": {ns: {"revision": d.revision, "entries": [_entry_doc(e) for e in d.entries],
                       "locks": dict(d.lock_tokens)} for ns, d in state.items()},
        "task_seq": records.seq,
        "tasks": [codec.task_to_doc(t) for t in records.tasks],
        "workflows": [codec.workflow_to_doc(w) for w in records.workflows],
    }
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=6)


def decode(blob: bytes) -> tuple[SnapshotInfo, dict[str, NamespaceDump], TaskRecords]:
    """Parse a snapshot blob; InvalidArgumentError when it is not one."""
    try:
        doc = json.loads(gzip.decompress(blob))
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        state = {
            str(ns): NamespaceDump(
                int(d["revision"]),
                tuple(codec.entry_from_doc(e) for e in d["entries"]),
                {str(k): int(v) for k, v in d.get("locks", {}).items()})
            for ns, d in doc["state"].items()}
        records = TaskRecords(tuple(codec.task_from_doc(t) for t in doc["tasks"]),
                              tuple(codec.workflow_from_doc(w) for w in doc["workflows"]),
                              int(doc["task_seq"]))
        info = SnapshotInfo(
            str(doc["name"]), float(doc["create_time"]), len(blob), str(doc["namespace"]),
            {ns: d.revision for ns, d in state.items()},
            sum(len(d.entries) for d in state.values()), len(records.tasks),
            len(records.workflows))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidArgumentError(f"not an agentmesh snapshot: {exc}",
                                   reason="BAD_SNAPSHOT") from exc
    return info, state, records


class SnapshotService:
    """Create, list and restore snapshots; optionally every ``interval`` seconds."""

    def __init__(self, state: StateStore, tasks: SnapshotSource, blob: BlobStore, bus: Bus,
                 clock: Clock) -> None:
        self._state = state
        self._tasks = tasks
        self._blob = blob
        self._bus = bus
        self._clock = clock
        self._replica = uuid.uuid4().hex[:12]

    async def create(self, namespace: str | None = None) -> SnapshotInfo:
        """Export both stores (see the module docstring) and store the blob."""
        now = self._clock.now()
        # Memory: neither export awaits, so the two run as one cut.
        state = await self._state.export_state(namespace, now=now)
        records = await self._tasks.export_records(namespace)
        state = {ns: d for ns, d in state.items() if not ns.startswith("_")}
        name = f"{PREFIX}{_stamp(now)}-{uuid.uuid4().hex[:8]}"
        info = SnapshotInfo(name, now, 0, namespace or "",
                            {ns: d.revision for ns, d in state.items()},
                            sum(len(d.entries) for d in state.values()), len(records.tasks),
                            len(records.workflows))
        blob = await asyncio.to_thread(encode, info, state, records)
        await self._blob.put(name + SUFFIX, blob)
        log.info("snapshot %s: %d entries, %d tasks, %d bytes", name, info.entry_count,
                 info.task_count, len(blob))
        return SnapshotInfo(name, now, len(blob), info.namespace, info.revisions,
                            info.entry_count, info.task_count, info.workflow_count)

    async def list(self, *, before_name: str = "", limit: int = 100) -> list[SnapshotInfo]:
        """Stored snapshots, newest first, with names < ``before_name`` (when set)."""
        blobs = [b for b in await self._blob.list(PREFIX) if b.key.endswith(SUFFIX)]
        out: list[SnapshotInfo] = []
        for b in sorted(blobs, key=lambda b: b.key, reverse=True):
            name = b.key.removesuffix(SUFFIX)
            if before_name and name >= before_name:
                continue
            out.append(SnapshotInfo(name, _time_of(name) or b.modified, b.size))
            if len(out) >= limit:
                break
        return out

    async def restore(self, name: str) -> SnapshotInfo:
        """Load a snapshot into empty namespaces (FailedPreconditionError otherwise).

        Both stores are checked first (dry run), then written, each atomically.
        Afterwards watchers and schedulers are told (state revisions, ready work).
        """
        name = snapshot_name(name)
        try:
            blob = await self._blob.get(name + SUFFIX)
        except NotFoundError:
            raise NotFoundError("snapshot", name) from None
        info, state, records = await asyncio.to_thread(decode, blob)
        state = {ns: d for ns, d in state.items() if not ns.startswith("_")}
        await self._state.import_state(state, dry_run=True)
        await self._tasks.import_records(records, dry_run=True)
        await self._state.import_state(state)
        await self._tasks.import_records(records)
        for ns, d in state.items():
            await self._bus.publish(events.state_subject(ns), events.encode({"rev": d.revision}))
        ready: dict[str, set[str]] = {}
        for t in records.tasks:
            if t.state is TaskState.QUEUED:
                ready.setdefault(t.namespace, set()).add(t.capability)
        for ns, caps in ready.items():
            await self._bus.publish(events.ready_subject(ns),
                                    events.encode({"caps": sorted(caps)}))
        log.info("restored snapshot %s: %d entries, %d tasks", name, info.entry_count,
                 info.task_count)
        return info

    async def run_periodic(self, interval: float) -> None:
        """Take a snapshot every ``interval`` seconds, one replica per interval.

        Every replica runs this loop; each round first takes the lock
        ``_system/snapshot-periodic`` for 0.9 x interval (never released, it
        just expires), so only the replica that gets it writes that round.
        """
        while True:
            raise_if_cancelling()
            await asyncio.sleep(interval)
            try:
                await self._state.acquire_lock(
                    SYSTEM_NAMESPACE, PERIODIC_LOCK, f"replica-{self._replica}", agent_id="",
                    ttl=interval * 0.9, now=self._clock.now())
            except AbortedError:
                continue  # another replica has this round
            try:
                await self.create()
            except Exception:
                log.exception("periodic snapshot failed")

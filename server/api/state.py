"""StateService servicer: thin, converts and delegates to StateService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from agentmesh.v1 import state_pb2, state_pb2_grpc
from google.protobuf import duration_pb2

from server.api import auth, convert, errors
from server.api.convert import Limits
from server.domain.errors import InvalidArgumentError, NotFoundError, UnavailableError
from server.domain.models import StateEventType
from server.services.snapshots import SnapshotInfo, SnapshotService
from server.services.state import StateService

MAX_LEASE = 86_400.0
"""Longest lock lease (one day)."""
DEADLINE_MARGIN = 0.05
"""A blocked acquire answers this long before the call's deadline."""

Ctx = grpc.aio.ServicerContext[Any, Any]


class StateServicer(state_pb2_grpc.StateServiceServicer):
    """gRPC face of the versioned KV."""

    def __init__(self, state: StateService, limits: Limits,
                 snapshots: SnapshotService | None = None) -> None:
        self._state = state
        self._limits = limits
        self._snapshots = snapshots

    def _fence(self, lock: str, token: int) -> tuple[str, int] | None:
        if not lock and not token:
            return None
        if not lock:
            raise InvalidArgumentError.field("lock", "required with fencing_token")
        if token <= 0:
            raise InvalidArgumentError.field("fencing_token", "required (> 0) with lock")
        return convert.state_key(lock, self._limits, "lock"), token

    @staticmethod
    def _lease(value: duration_pb2.Duration, field: str) -> float:
        seconds = convert.duration(value, field)
        if seconds <= 0:
            raise InvalidArgumentError.field(field, "required, must be positive")
        if seconds > MAX_LEASE:
            raise InvalidArgumentError.field(field, f"must be at most {MAX_LEASE:.0f}s")
        return seconds

    def _snapshot_service(self) -> SnapshotService:
        if self._snapshots is None:
            raise UnavailableError("snapshots are not configured on this server",
                                   reason="SNAPSHOTS_DISABLED")
        return self._snapshots

    @errors.unary
    async def Get(self, request: state_pb2.GetRequest, context: Ctx) -> state_pb2.GetResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        key = convert.state_key(request.key, self._limits)
        entry = await self._state.get(ns, key)
        if entry is None:
            raise NotFoundError("key", key)
        return state_pb2.GetResponse(entry=convert.entry_to_proto(entry))

    @errors.unary
    async def Put(self, request: state_pb2.PutRequest, context: Ctx) -> state_pb2.PutResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        key = convert.state_key(request.key, self._limits)
        value = convert.payload(request.value, "value", self._limits)
        expected = request.expected_version if request.HasField("expected_version") else None
        if expected is not None and expected < 0:
            raise InvalidArgumentError.field("expected_version", "must not be negative")
        ttl = convert.duration(request.ttl, "ttl")
        fence = self._fence(request.lock, request.fencing_token)
        entry = await self._state.put(ns, key, value, expected_version=expected, ttl=ttl,
                                      fence=fence)
        return state_pb2.PutResponse(entry=convert.entry_to_proto(entry, with_value=False))

    @errors.unary
    async def Delete(self, request: state_pb2.DeleteRequest,
                     context: Ctx) -> state_pb2.DeleteResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        key = convert.state_key(request.key, self._limits)
        expected = request.expected_version if request.HasField("expected_version") else None
        fence = self._fence(request.lock, request.fencing_token)
        revision = await self._state.delete(ns, key, expected_version=expected, fence=fence)
        return state_pb2.DeleteResponse(revision=revision)

    @errors.unary
    async def List(self, request: state_pb2.ListRequest, context: Ctx) -> state_pb2.ListResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        size = convert.page_size(request.page_size)
        prefix = convert.state_prefix(request.prefix, self._limits)
        fkey = f"{ns}|{prefix}"
        after = convert.decode_page_token(request.page_token, fkey, convert.Cursor.KEY)
        entries = await self._state.list(ns, prefix, after_key=after, limit=size + 1)
        token = (convert.encode_page_token(entries[size - 1].key, fkey)
                 if len(entries) > size else "")
        return state_pb2.ListResponse(
            entries=[convert.entry_to_proto(e) for e in entries[:size]], next_page_token=token)

    @errors.streaming
    async def Watch(self, request: state_pb2.WatchRequest,
                    context: Ctx) -> AsyncIterator[state_pb2.WatchResponse]:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        prefix = convert.state_prefix(request.prefix, self._limits)
        if request.after_revision < 0:
            raise InvalidArgumentError.field("after_revision", "must not be negative")
        async for event in self._state.watch(ns, prefix, request.after_revision):
            yield state_pb2.WatchResponse(
                type=(state_pb2.STATE_EVENT_TYPE_PUT if event.type is StateEventType.PUT
                      else state_pb2.STATE_EVENT_TYPE_DELETE),
                entry=convert.entry_to_proto(event.entry))

    @errors.unary
    async def AcquireLock(self, request: state_pb2.AcquireLockRequest,
                          context: Ctx) -> state_pb2.AcquireLockResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        name = convert.state_key(request.name, self._limits, "name")
        owner = request.owner
        if len(owner.encode()) > 256 or not owner.isprintable():
            raise InvalidArgumentError.field("owner", "at most 256 printable bytes")
        lease = self._lease(request.lease_duration, "lease_duration")
        wait = convert.duration(request.wait_timeout, "wait_timeout")
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining - DEADLINE_MARGIN))
        agent = convert.resource_id(request.agent, "agents", "agent") if request.agent else ""
        grant = await self._state.acquire_lock(ns, name, owner, lease=lease, wait=wait,
                                               agent_id=agent)
        return state_pb2.AcquireLockResponse(fencing_token=grant.fencing_token,
                                             expire_time=convert.to_timestamp(grant.expire_time))

    @errors.unary
    async def RenewLock(self, request: state_pb2.RenewLockRequest,
                        context: Ctx) -> state_pb2.RenewLockResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        name = convert.state_key(request.name, self._limits, "name")
        if request.fencing_token <= 0:
            raise InvalidArgumentError.field("fencing_token", "required (> 0)")
        lease = self._lease(request.lease_duration, "lease_duration")
        grant = await self._state.renew_lock(ns, name, request.fencing_token, lease=lease)
        return state_pb2.RenewLockResponse(expire_time=convert.to_timestamp(grant.expire_time))

    @errors.unary
    async def ReleaseLock(self, request: state_pb2.ReleaseLockRequest,
                          context: Ctx) -> state_pb2.ReleaseLockResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        name = convert.state_key(request.name, self._limits, "name")
        if request.fencing_token <= 0:
            raise InvalidArgumentError.field("fencing_token", "required (> 0)")
        await self._state.release_lock(ns, name, request.fencing_token)
        return state_pb2.ReleaseLockResponse()

    @errors.unary
    async def CreateSnapshot(self, request: state_pb2.CreateSnapshotRequest,
                             context: Ctx) -> state_pb2.CreateSnapshotResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace) if request.namespace else None
        with auth.audited("snapshot", "snapshots", ns or auth.ALL_NAMESPACES):
            info = await self._snapshot_service().create(ns)
        return state_pb2.CreateSnapshotResponse(snapshot=_snapshot_to_proto(info))

    @errors.unary
    async def ListSnapshots(self, request: state_pb2.ListSnapshotsRequest,
                            context: Ctx) -> state_pb2.ListSnapshotsResponse:
        """See the proto."""
        size = convert.page_size(request.page_size)
        before = convert.decode_page_token(request.page_token, "snapshots", convert.Cursor.KEY)
        infos = await self._snapshot_service().list(before_name=before,
                                                    limit=size + 1)
        token = (convert.encode_page_token(infos[size - 1].name, "snapshots")
                 if len(infos) > size else "")
        return state_pb2.ListSnapshotsResponse(
            snapshots=[_snapshot_to_proto(i) for i in infos[:size]], next_page_token=token)

    @errors.unary
    async def RestoreSnapshot(self, request: state_pb2.RestoreSnapshotRequest,
                              context: Ctx) -> state_pb2.RestoreSnapshotResponse:
        """See the proto."""
        if not request.name:
            raise InvalidArgumentError.field("name", "required (snapshots/{snapshot})")
        with auth.audited("restore", request.name[:256], auth.ALL_NAMESPACES):
            info = await self._snapshot_service().restore(request.name)
        return state_pb2.RestoreSnapshotResponse(snapshot=_snapshot_to_proto(info))


def _snapshot_to_proto(info: SnapshotInfo) -> state_pb2.Snapshot:
    return state_pb2.Snapshot(
        name=info.name, create_time=convert.to_timestamp(info.create_time),
        size_bytes=info.size_bytes, namespace=info.namespace, revisions=dict(info.revisions),
        entry_count=info.entry_count, task_count=info.task_count,
        workflow_count=info.workflow_count)

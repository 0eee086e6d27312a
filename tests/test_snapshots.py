"""Snapshots: round trip into a fresh mesh (local dir and S3 via moto_server), and a
snapshot taken under concurrent writes reflects exactly one revision."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import boto3
import grpc
import pytest
from agentmesh.v1 import common_pb2, state_pb2, state_pb2_grpc, task_pb2, task_pb2_grpc
from google.protobuf import duration_pb2

from server.app import running_server
from server.backends.redis import RedisStores
from server.blob import open_blob_store
from server.services import snapshots
from tests._services import require_redis, unique_prefix
from tests.conformance.test_blob import REGION, _dummy_aws_credentials, moto_endpoint
from tests.conftest import embedded_settings

__all__ = ["moto_endpoint"]  # the session fixture, re-used


def val(text: str) -> common_pb2.Payload:
    return common_pb2.Payload(data=text.encode(), metadata={"encoding": b"text/plain"})


async def _fill(channel: grpc.aio.Channel) -> tuple[str, int]:
    """State in two namespaces, a lock, a task; returns (task name, lock token)."""
    st = state_pb2_grpc.StateServiceStub(channel)
    for i in range(5):
        await st.Put(state_pb2.PutRequest(key=f"k{i}", value=val(f"v{i}")))
    await st.Put(state_pb2.PutRequest(key="k0", value=val("v0b")))
    await st.Delete(state_pb2.DeleteRequest(key="k4"))
    await st.Put(state_pb2.PutRequest(namespace="team-b", key="x", value=val("bx")))
    grant = await st.AcquireLock(state_pb2.AcquireLockRequest(
        name="L", owner="o", lease_duration=duration_pb2.Duration(seconds=60)))
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
        task=task_pb2.Task(capability="echo", input=val("in"))))
    return sub.task.name, grant.fencing_token


async def _round_trip(blob: str, **extra: object) -> None:
    async with running_server(embedded_settings(blob=blob, **extra)) as first, \
            grpc.aio.insecure_channel(first.address) as ch:
        task_name, token = await _fill(ch)
        st = state_pb2_grpc.StateServiceStub(ch)
        made = (await st.CreateSnapshot(state_pb2.CreateSnapshotRequest())).snapshot
        assert made.name.startswith("snapshots/") and made.size_bytes > 0
        assert dict(made.revisions) == {"default": 7, "team-b": 1}
        assert (made.entry_count, made.task_count) == (5, 1)
        listed = await st.ListSnapshots(state_pb2.ListSnapshotsRequest())
        assert [s.name for s in listed.snapshots] == [made.name]
        with pytest.raises(grpc.aio.AioRpcError) as err:  # this store is not empty
            await st.RestoreSnapshot(state_pb2.RestoreSnapshotRequest(name=made.name))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    async with running_server(embedded_settings(blob=blob, **extra)) as second, \
            grpc.aio.insecure_channel(second.address) as ch:
        st = state_pb2_grpc.StateServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await st.RestoreSnapshot(state_pb2.RestoreSnapshotRequest(name="snapshots/nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        restored = (await st.RestoreSnapshot(
            state_pb2.RestoreSnapshotRequest(name=made.name))).snapshot
        assert restored.entry_count == 5 and dict(restored.revisions)["default"] == 7
        listed = await st.List(state_pb2.ListRequest())
        assert [(e.key, e.value.data, e.version) for e in listed.entries] == [
            ("k0", b"v0b", 2), ("k1", b"v1", 1), ("k2", b"v2", 1), ("k3", b"v3", 1)]
        x = await st.Get(state_pb2.GetRequest(namespace="team-b", key="x"))
        assert x.entry.value.data == b"bx"
        nxt = await st.Put(state_pb2.PutRequest(key="k1", value=val("new"), expected_version=1))
        assert nxt.entry.revision == 8  # revisions continue
        grant = await st.AcquireLock(state_pb2.AcquireLockRequest(
            name="L", owner="p", lease_duration=duration_pb2.Duration(seconds=5)))
        assert grant.fencing_token > token  # lock holders are not restored, counters are
        got = await task_pb2_grpc.TaskServiceStub(ch).GetTask(
            task_pb2.GetTaskRequest(name=task_name))
        assert got.task.input.data == b"in"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await st.RestoreSnapshot(state_pb2.RestoreSnapshotRequest(name=made.name))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_round_trip_local_dir(tmp_path: Path) -> None:
    await _round_trip(str(tmp_path / "snaps"))


async def test_round_trip_s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _dummy_aws_credentials(monkeypatch)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    bucket = f"amtest-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION).create_bucket(
        Bucket=bucket)
    await _round_trip(f"s3://{bucket}/mesh1", s3_endpoint=moto_endpoint)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_snapshot_under_concurrent_writes_is_one_revision(
        backend: str, tmp_path: Path) -> None:
    extra: dict[str, object] = {"blob": str(tmp_path / "snaps")}
    prefix = unique_prefix("snap")
    if backend == "redis":
        extra.update(store=require_redis(), key_prefix=prefix)
    try:
        async with running_server(embedded_settings(**extra)) as mesh, \
                grpc.aio.insecure_channel(mesh.address) as ch:
            st = state_pb2_grpc.StateServiceStub(ch)
            acked: list[tuple[str, int]] = []
            first_batch, stop = asyncio.Event(), asyncio.Event()
            stop_at = [1 << 30]

            async def writer(w: int) -> None:
                i = 0
                while not stop.is_set():
                    key = f"w{w}/{i}"
                    resp = await st.Put(state_pb2.PutRequest(key=key, value=val(key)))
                    acked.append((key, resp.entry.revision))
                    i += 1
                    if len(acked) >= 50:
                        first_batch.set()
                    if len(acked) >= stop_at[0]:
                        stop.set()

            async def snapshot_midway() -> str:
                await first_batch.wait()
                try:
                    made = await st.CreateSnapshot(state_pb2.CreateSnapshotRequest())
                    return made.snapshot.name
                finally:
                    stop_at[0] = len(acked) + 30  # let more writes land, then stop

            async with asyncio.timeout(8):
                results = await asyncio.gather(snapshot_midway(),
                                               *[writer(w) for w in range(8)])
            name = str(results[0])
            blob = open_blob_store(str(tmp_path / "snaps"))
            _, state, _ = snapshots.decode(await blob.get(name + snapshots.SUFFIX))
            dump = state["default"]
            rev = dump.revision
            held = {e.key: e.revision for e in dump.entries}
            assert all(r <= rev for r in held.values())
            before = {k for k, r in acked if r <= rev}
            after = {k for k, r in acked if r > rev}
            assert before and after  # writes went on on both sides of the snapshot
            assert set(held) == before  # every write up to the revision, nothing later
            assert max(r for _, r in acked if r <= rev) == rev
    finally:
        if backend == "redis":
            stores = await RedisStores.connect(require_redis(), prefix=prefix)
            await stores.delete_all_keys()
            await stores.aclose()

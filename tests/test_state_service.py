"""StateService over real gRPC with raw stubs: CAS, TTL, List, resumable Watch, locks, fencing."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.v1 import common_pb2, state_pb2, state_pb2_grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server import app as app_module
from server.app import Mesh, running_server
from server.backends.memory import InMemoryStateStore
from server.services import state as state_module
from server.services.clock import ManualClock
from tests.conftest import embedded_settings
from tests.test_protocol import RawAgent

LOG_SIZE = 16


@pytest.fixture
def clock() -> ManualClock:
    """The mesh's clock: tests move it to expire TTLs and leases."""
    return ManualClock()


@pytest.fixture
async def mesh(clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Mesh]:
    """An embedded mesh on a manual clock with a short watch history."""
    monkeypatch.setattr(app_module, "InMemoryStateStore",
                        functools.partial(InMemoryStateStore, log_size=LOG_SIZE))
    async with running_server(embedded_settings(), clock=clock) as running:
        yield running


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> state_pb2_grpc.StateServiceStub:
    """A raw StateService stub."""
    return state_pb2_grpc.StateServiceStub(channel)


def val(text: str) -> common_pb2.Payload:
    return common_pb2.Payload(data=text.encode(), metadata={"encoding": b"text/plain"})


def dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def info_of(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


async def put(stub: state_pb2_grpc.StateServiceStub, key: str, text: str,
              **kw: object) -> state_pb2.StateEntry:
    resp = await stub.Put(state_pb2.PutRequest(key=key, value=val(text), **kw))  # type: ignore[arg-type]
    return resp.entry


async def test_cas_put_aborted_on_mismatch(stub: state_pb2_grpc.StateServiceStub) -> None:
    first = await put(stub, "cfg", "a", expected_version=0)
    assert first.version == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await put(stub, "cfg", "b", expected_version=0)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert info_of(err.value).reason == "VERSION_MISMATCH"
    assert (await put(stub, "cfg", "b", expected_version=1)).version == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Delete(state_pb2.DeleteRequest(key="cfg", expected_version=1))
    assert err.value.code() == grpc.StatusCode.ABORTED
    got = await stub.Get(state_pb2.GetRequest(key="cfg"))
    assert got.entry.value.data == b"b" and got.entry.version == 2


async def test_ttl(stub: state_pb2_grpc.StateServiceStub, clock: ManualClock) -> None:
    entry = await put(stub, "session", "x", ttl=dur(10))
    assert entry.expire_time.ToNanoseconds() == int((clock.now() + 10) * 1e9)
    clock.advance(9)
    assert (await stub.Get(state_pb2.GetRequest(key="session"))).entry.value.data == b"x"
    clock.advance(1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Get(state_pb2.GetRequest(key="session"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_pagination(stub: state_pb2_grpc.StateServiceStub) -> None:
    keys = [f"p/{i:02d}" for i in range(7)]
    for key in reversed(keys):
        await put(stub, key, key)
    await put(stub, "q/else", "x")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = await stub.List(state_pb2.ListRequest(prefix="p/", page_size=3, page_token=token))
        seen += [e.key for e in resp.entries]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert seen == keys and pages == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.List(state_pb2.ListRequest(prefix="q/", page_token=resp.next_page_token or "x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_resume_no_gap_no_duplicate(stub: state_pb2_grpc.StateServiceStub) -> None:
    for i in range(1, 7):
        await put(stub, f"w/{i}", str(i))  # revisions 1..6
    call = stub.Watch(state_pb2.WatchRequest(prefix="w/", after_revision=1))
    got: list[int] = []
    async for msg in call:
        got.append(msg.entry.revision)
        if len(got) == 3:
            break
    call.cancel()  # disconnect after revision 4
    assert got == [2, 3, 4]
    for i in range(7, 10):
        await put(stub, f"w/{i}", str(i))  # revisions 7..9 while disconnected
    await stub.Delete(state_pb2.DeleteRequest(key="w/1"))  # revision 10
    resumed = stub.Watch(state_pb2.WatchRequest(prefix="w/", after_revision=got[-1]))
    rest: list[tuple[int, int]] = []
    async with asyncio.timeout(5):
        async for msg in resumed:
            rest.append((msg.type, msg.entry.revision))
            if msg.entry.revision == 11:
                break
            if msg.entry.revision == 10:
                await put(stub, "w/after", "live")  # revision 11, seen live
    resumed.cancel()
    assert [r for _, r in rest] == list(range(5, 12))
    assert rest[5] == (state_pb2.STATE_EVENT_TYPE_DELETE, 10)


async def test_watch_out_of_range_when_history_trimmed(
        stub: state_pb2_grpc.StateServiceStub) -> None:
    for i in range(LOG_SIZE + 5):
        await put(stub, "hot", str(i))
    call = stub.Watch(state_pb2.WatchRequest(after_revision=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(5):
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "list again" in (err.value.details() or "")


async def test_lock_acquire_renew_release(stub: state_pb2_grpc.StateServiceStub,
                                          clock: ManualClock) -> None:
    a = await stub.AcquireLock(state_pb2.AcquireLockRequest(
        name="leader", owner="a", lease_duration=dur(5)))
    assert a.fencing_token == 1
    assert a.expire_time.ToNanoseconds() == int((clock.now() + 5) * 1e9)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcquireLock(state_pb2.AcquireLockRequest(
            name="leader", owner="b", lease_duration=dur(5)))
    assert err.value.code() == grpc.StatusCode.ABORTED
    info = info_of(err.value)
    assert info.reason == "LOCK_HELD" and info.metadata["owner"] == "a"
    clock.advance(4)
    renewed = await stub.RenewLock(state_pb2.RenewLockRequest(
        name="leader", fencing_token=a.fencing_token, lease_duration=dur(5)))
    assert renewed.expire_time.ToNanoseconds() == int((clock.now() + 5) * 1e9)
    await stub.ReleaseLock(state_pb2.ReleaseLockRequest(name="leader",
                                                        fencing_token=a.fencing_token))
    await stub.ReleaseLock(state_pb2.ReleaseLockRequest(name="leader",
                                                        fencing_token=a.fencing_token))
    b = await stub.AcquireLock(state_pb2.AcquireLockRequest(
        name="leader", owner="b", lease_duration=dur(5)))
    assert b.fencing_token == 2
    for bad in (state_pb2.RenewLockRequest(name="leader", fencing_token=a.fencing_token,
                                           lease_duration=dur(5)),):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RenewLock(bad)
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert info_of(err.value).reason == "STALE_FENCING_TOKEN"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReleaseLock(state_pb2.ReleaseLockRequest(name="leader",
                                                            fencing_token=a.fencing_token))
    assert err.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcquireLock(state_pb2.AcquireLockRequest(name="leader", owner="c"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # lease_duration required


async def test_blocking_acquire_succeeds_when_holder_releases(
        stub: state_pb2_grpc.StateServiceStub, monkeypatch: pytest.MonkeyPatch) -> None:
    # No periodic recheck within the test: only the release's event can wake the waiter.
    monkeypatch.setattr(state_module, "LOCK_RECHECK", 3600.0)
    a = await stub.AcquireLock(state_pb2.AcquireLockRequest(
        name="job", owner="a", lease_duration=dur(60)))
    waiter = asyncio.ensure_future(stub.AcquireLock(state_pb2.AcquireLockRequest(
        name="job", owner="b", lease_duration=dur(60), wait_timeout=dur(20))))
    # The server-side wait is not observable from outside: give the call time to
    # reach it (if it has not, it takes the released lock at once: still correct).
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await stub.ReleaseLock(state_pb2.ReleaseLockRequest(name="job",
                                                        fencing_token=a.fencing_token))
    b = await asyncio.wait_for(waiter, 15)
    assert b.fencing_token == 2


async def test_blocking_acquire_times_out_with_lock_held(
        stub: state_pb2_grpc.StateServiceStub) -> None:
    await stub.AcquireLock(state_pb2.AcquireLockRequest(
        name="busy", owner="a", lease_duration=dur(60)))
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcquireLock(state_pb2.AcquireLockRequest(
            name="busy", owner="b", lease_duration=dur(60), wait_timeout=dur(0.3)))
    assert 0.25 < loop.time() - start < 2
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert info_of(err.value).reason == "LOCK_HELD"
    # a call deadline shorter than wait_timeout still gets the ABORTED answer
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcquireLock(state_pb2.AcquireLockRequest(
            name="busy", owner="b", lease_duration=dur(60), wait_timeout=dur(30)), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.ABORTED


async def test_lock_freed_when_agent_goes_away(channel: grpc.aio.Channel,
                                               stub: state_pb2_grpc.StateServiceStub) -> None:
    agent = RawAgent(channel, "locker", ["noop"])
    await agent.register()
    held = await stub.AcquireLock(state_pb2.AcquireLockRequest(
        name="shard-1", owner="locker", lease_duration=dur(600), agent=agent.agent))
    waiter = asyncio.ensure_future(stub.AcquireLock(state_pb2.AcquireLockRequest(
        name="shard-1", owner="other", lease_duration=dur(60), wait_timeout=dur(5))))
    agent.hb.cancel()  # the heartbeat stream breaks: the agent is gone at once
    got = await asyncio.wait_for(waiter, 5)
    assert got.fencing_token == held.fencing_token + 1


async def test_fencing_stale_holder_write_refused(stub: state_pb2_grpc.StateServiceStub,
                                                  clock: ManualClock) -> None:
    a = await stub.AcquireLock(state_pb2.AcquireLockRequest(
        name="owner-of-x", owner="a", lease_duration=dur(2)))
    await put(stub, "x", "a-1", lock="owner-of-x", fencing_token=a.fencing_token)
    clock.advance(3)  # a's lease ends while it is paused
    b = await stub.AcquireLock(state_pb2.AcquireLockRequest(
        name="owner-of-x", owner="b", lease_duration=dur(2)))
    assert b.fencing_token > a.fencing_token
    b_entry = await put(stub, "x", "b-1", lock="owner-of-x", fencing_token=b.fencing_token)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await put(stub, "x", "a-late", lock="owner-of-x", fencing_token=a.fencing_token)
    assert err.value.code() == grpc.StatusCode.ABORTED
    info = info_of(err.value)
    assert info.reason == "STALE_FENCING_TOKEN"
    assert info.metadata["current_token"] == str(b.fencing_token)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Delete(state_pb2.DeleteRequest(key="x", lock="owner-of-x",
                                                  fencing_token=a.fencing_token))
    assert err.value.code() == grpc.StatusCode.ABORTED
    got = await stub.Get(state_pb2.GetRequest(key="x"))
    assert got.entry.value.data == b"b-1" and got.entry.version == b_entry.version
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await put(stub, "x", "?", fencing_token=3)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

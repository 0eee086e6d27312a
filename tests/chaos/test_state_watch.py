"""State watch resumes across a replica SIGKILL: nothing missed, nothing twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import grpc
import pytest
from agentmesh.v1 import common_pb2, state_pb2, state_pb2_grpc

from tests._services import require_nats, require_redis, unique_prefix
from tests.chaos._harness import Server

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


def put(i: int) -> state_pb2.PutRequest:
    return state_pb2.PutRequest(key=f"job/{i:03d}", value=common_pb2.Payload(
        data=json.dumps(i).encode(), metadata={"encoding": b"json/plain"}))


async def test_watch_resumes_on_another_replica_after_sigkill(servers: list[Server]) -> None:
    env = {"AGENTMESH_STORE": require_redis(), "AGENTMESH_BUS": require_nats(),
           "AGENTMESH_KEY_PREFIX": unique_prefix("watch")}
    a, b = await Server(env).start(), await Server(env).start()
    servers += [a, b]
    seen: list[tuple[int, str]] = []
    async with grpc.aio.insecure_channel(b.address) as cb, \
            grpc.aio.insecure_channel(a.address) as ca:
        writer = state_pb2_grpc.StateServiceStub(cb)
        first = await writer.Put(put(0))
        start = first.entry.revision
        watch_a = state_pb2_grpc.StateServiceStub(ca).Watch(
            state_pb2.WatchRequest(prefix="job/", after_revision=start))
        for i in range(1, 21):
            await writer.Put(put(i))
        async with asyncio.timeout(10):
            async for ev in watch_a:
                seen.append((ev.entry.revision, ev.entry.key))
                if len(seen) == 10:
                    break
        a.kill()  # SIGKILL the replica the watcher was on
        for i in range(21, 41):  # writes go on through the surviving replica
            await writer.Put(put(i))
        last = seen[-1][0]
        watch_b = writer.Watch(state_pb2.WatchRequest(prefix="job/", after_revision=last))
        async with asyncio.timeout(10):
            async for ev in watch_b:
                seen.append((ev.entry.revision, ev.entry.key))
                if len(seen) == 40:
                    break
        watch_b.cancel()
    revisions = [r for r, _ in seen]
    assert revisions == sorted(set(revisions)), "no change seen twice, in revision order"
    assert [k for _, k in seen] == [f"job/{i:03d}" for i in range(1, 41)], "nothing missed"

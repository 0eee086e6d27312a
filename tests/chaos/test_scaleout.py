"""Three replicas on the Redis Cluster and the NATS cluster act as one mesh.

Three replicas (in this process, each its own gRPC server and store and bus
clients) on the session's Redis Cluster and NATS cluster (``tests/conftest.py``),
one chaos agent process connected to each (raw stubs; every result reported
through CompleteTask and logged), and a submitter spreading tasks over the
three replicas. Throughput is measured by
``loadtests/scaleout_bench.py``; this test asserts only what must hold at any
speed: every acknowledged task ran to SUCCEEDED with exactly one accepted
result, each agent (so each replica) did part of the work, and nothing is in
the store that was not submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest
from agentmesh.v1 import task_pb2, task_pb2_grpc

from server.app import running_server
from tests._services import unique_prefix
from tests.chaos._harness import AgentProc, Client, Server, assert_invariants, js
from tests.clusters import NatsCluster, RedisCluster
from tests.conftest import embedded_settings

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

CAP = "scaleout"
TASKS = 300
REPLICAS = 3


async def test_three_replicas_on_the_clusters_lose_and_double_nothing(
        tmp_path: Path, procs: list[AgentProc | Server],
        shared_redis_cluster: RedisCluster, shared_nats_cluster: NatsCluster) -> None:
    settings = embedded_settings(store=shared_redis_cluster.url, bus=shared_nats_cluster.url,
                                 key_prefix=unique_prefix("scale"), durability="auto",
                                 heartbeat_interval=0.5, heartbeat_misses=6)
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(running_server(settings))
                   for _ in range(REPLICAS)]
        await _run(tmp_path, procs, [s.address for s in servers])


async def _run(tmp_path: Path, procs: list[AgentProc | Server], targets: list[str]) -> None:
    agents = [AgentProc(tmp_path, f"ag{i}", [targets[i]], CAP, concurrency=16, work=0.005)
              for i in range(REPLICAS)]
    procs.extend(agents)
    async with asyncio.timeout(20):
        while sum(len(a.events("connected")) for a in agents) < REPLICAS:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    sem = asyncio.Semaphore(32)
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    names: dict[str, str] = {}

    async def submit(i: int) -> None:
        request_id = str(uuid.uuid4())
        async with sem:
            resp = await task_pb2_grpc.TaskServiceStub(channels[i % REPLICAS]).SubmitTask(
                task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability=CAP, input=js(i)),
                                           request_id=request_id), timeout=10)
        names[request_id] = resp.task.name

    try:
        await asyncio.gather(*(submit(i) for i in range(TASKS)))
    finally:
        for ch in channels:
            await ch.close()
    client = Client(targets)
    submitted = list(names.values())
    assert len(set(submitted)) == TASKS
    async with asyncio.timeout(60):
        while not await client.all_ended(submitted):  # noqa: ASYNC110 - other processes
            await asyncio.sleep(0.2)
    await assert_invariants(client, submitted, agents)
    per_agent = Counter({a.name: len(a.events("accepted")) for a in agents})
    assert sum(per_agent.values()) == TASKS
    assert all(per_agent[a.name] > 0 for a in agents), per_agent  # every replica served
    async with grpc.aio.insecure_channel(targets[2]) as ch:
        listed: list[str] = []
        token = ""
        while True:
            page = await task_pb2_grpc.TaskServiceStub(ch).ListTasks(task_pb2.ListTasksRequest(
                capability=CAP, page_size=500, page_token=token), timeout=10)
            listed += [t.name for t in page.tasks]
            token = page.next_page_token
            if not token:
                break
    assert sorted(listed) == sorted(submitted)

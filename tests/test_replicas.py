"""Several replicas sharing Redis and NATS act as one mesh."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.v1 import discovery_pb2, discovery_pb2_grpc, task_pb2, task_pb2_grpc

from server.app import Mesh, running_server
from tests._services import require_nats, require_redis, unique_prefix
from tests.conftest import embedded_settings
from tests.test_protocol import RawAgent, js, next_kind, until_state


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[Mesh, Mesh]]:
    """Two replicas on one Redis prefix and one NATS subject prefix."""
    redis_url, nats_url = require_redis(), require_nats()
    prefix = unique_prefix("rep")
    settings = embedded_settings(store=redis_url, bus=nats_url, key_prefix=prefix)
    async with running_server(settings) as a, running_server(settings) as b:
        yield a, b
    from server.backends.redis import RedisStores  # noqa: PLC0415

    stores = await RedisStores.connect(redis_url, prefix=prefix)
    await stores.delete_all_keys()
    await stores.aclose()


async def test_agent_on_a_receives_task_submitted_on_b(replicas: tuple[Mesh, Mesh]) -> None:
    a, b = replicas
    async with grpc.aio.insecure_channel(a.address) as ca, \
            grpc.aio.insecure_channel(b.address) as cb:
        agent = RawAgent(ca, "on-a", ["cross"])
        await agent.register()
        work = agent.open_work()
        await next_kind(work, "opened")
        # ListAgents on B shows the agent connected to A.
        listed = await discovery_pb2_grpc.DiscoveryServiceStub(cb).ListAgents(
            discovery_pb2.ListAgentsRequest(capability="cross"))
        assert [x.name for x in listed.agents] == [agent.agent]
        tb = task_pb2_grpc.TaskServiceStub(cb)
        watch = tb.WatchTasks(task_pb2.WatchTasksRequest(capability="cross"))
        await asyncio.sleep(0.2)  # let B's watch subscription reach NATS
        sub = await tb.SubmitTask(task_pb2.SubmitTaskRequest(
            task=task_pb2.Task(capability="cross", input=js("hi"))))
        assignment = (await next_kind(work, "assignment")).assignment
        assert assignment.task.name == sub.task.name
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=sub.task.name, fencing_token=assignment.fencing_token, output=js("done"))))
        await until_state(tb, sub.task.name, task_pb2.TASK_STATE_SUCCEEDED)
        # WatchTasks on B sees the change that happened on A.
        seen = []
        async with asyncio.timeout(5):
            async for ev in watch:
                seen.append(ev.task.state)
                if ev.task.state == task_pb2.TASK_STATE_SUCCEEDED:
                    break
        assert seen[-1] == task_pb2.TASK_STATE_SUCCEEDED
        watch.cancel()
        got = await tb.GetTask(task_pb2.GetTaskRequest(name=sub.task.name))
        assert json.loads(got.task.output.data) == "done"
        agent.out.put_nowait(None)
        agent.hb_out.put_nowait(None)


async def test_many_tasks_each_leased_once_across_replicas(
        replicas: tuple[Mesh, Mesh]) -> None:
    """Agents on both replicas compete for one queue: every task runs exactly once."""
    a, b = replicas
    async with grpc.aio.insecure_channel(a.address) as ca, \
            grpc.aio.insecure_channel(b.address) as cb:
        agents = [RawAgent(ca, "a1", ["race"], 4), RawAgent(cb, "b1", ["race"], 4)]
        works = []
        for ag in agents:
            await ag.register()
            w = ag.open_work()
            await next_kind(w, "opened")
            works.append(w)
        n = 40
        tb = task_pb2_grpc.TaskServiceStub(cb)
        names = {(await tb.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
            capability="race", input=js(i))))).task.name for i in range(n)}
        got: dict[str, str] = {}

        async def serve(ag: RawAgent, w: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
            while len(got) < n:
                try:
                    msg = await asyncio.wait_for(w.read(), 0.5)
                except TimeoutError:
                    continue
                kind = msg.WhichOneof("kind")
                if kind == "assignment":
                    batch = [msg.assignment]
                elif kind == "assignments":
                    batch = list(msg.assignments.assignments)
                else:
                    continue
                results = []
                for t in batch:
                    assert t.task.name not in got, "a task was leased twice"
                    got[t.task.name] = ag.name
                    results.append(task_pb2.TaskResult(
                        task=t.task.name, fencing_token=t.fencing_token, output=js(ag.name)))
                # Each reported result returns its slot: no credit message needed.
                ag.out.put_nowait(task_pb2.ProcessTasksRequest(
                    reports=task_pb2.TaskReportBatch(results=results)))

        async with asyncio.timeout(20):
            await asyncio.gather(*(serve(ag, w) for ag, w in zip(agents, works, strict=True)))
        assert set(got) == names
        assert set(got.values()) == {"a1", "b1"}, "both replicas' agents took work"
        stats = await tb.GetStats(task_pb2.GetStatsRequest())
        assert stats.tasks_by_state["SUCCEEDED"] == n
        for ag in agents:
            ag.out.put_nowait(None)
            ag.hb_out.put_nowait(None)

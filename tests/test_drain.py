"""Graceful drain: NOT_SERVING, agents told to drain, in-flight results accepted."""

from __future__ import annotations

import asyncio

import grpc
from agentmesh.v1 import task_pb2, task_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import running_server
from tests.conftest import embedded_settings
from tests.test_protocol import RawAgent, js, next_kind, until_state


async def test_drain_accepts_in_flight_results() -> None:
    async with running_server(embedded_settings(drain_grace=5.0)) as mesh, \
            grpc.aio.insecure_channel(mesh.address) as ch:
        agent = RawAgent(ch, "drainee", ["work"], concurrency=2)
        await agent.register()
        work = agent.open_work()
        await next_kind(work, "opened")
        tasks = task_pb2_grpc.TaskServiceStub(ch)
        sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
            task=task_pb2.Task(capability="work")))
        assignment = (await next_kind(work, "assignment")).assignment
        first_ack = await asyncio.wait_for(agent.hb.read(), 5)
        assert first_ack.WhichOneof("kind") == "ack"

        drain = asyncio.create_task(mesh.drain())
        directive = await asyncio.wait_for(agent.hb.read(), 5)
        assert directive.WhichOneof("kind") == "drain"
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # New work is not dispatched while draining.
        later = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
            task=task_pb2.Task(capability="work")))
        assert not drain.done()
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=sub.task.name, fencing_token=assignment.fencing_token, output=js("ok"))))
        await until_state(tasks, sub.task.name, task_pb2.TASK_STATE_SUCCEEDED)
        await asyncio.wait_for(drain, 5)  # ends as soon as nothing is in flight
        done = await tasks.GetTask(task_pb2.GetTaskRequest(name=sub.task.name))
        assert done.task.state == task_pb2.TASK_STATE_SUCCEEDED
        queued = await tasks.GetTask(task_pb2.GetTaskRequest(name=later.task.name))
        assert queued.task.state == task_pb2.TASK_STATE_QUEUED  # kept, not lost
        agent.out.put_nowait(None)
        agent.hb_out.put_nowait(None)

"""Graceful drain: NOT_SERVING, agents told to drain, in-flight results accepted."""

from __future__ import annotations

import asyncio

import grpc
import pytest
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
        drain = asyncio.create_task(mesh.drain())
        directive = await agent.directive()
        assert directive.WhichOneof("kind") == "drain"
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # No new work is accepted while draining: the embedded store would lose
        # it at exit, so the client is told to go elsewhere (UNAVAILABLE).
        for call in (
                tasks.SubmitTask(task_pb2.SubmitTaskRequest(
                    task=task_pb2.Task(capability="work"))),
                tasks.BatchSubmitTasks(task_pb2.BatchSubmitTasksRequest(requests=[
                    task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="work"))])),
                tasks.SubmitWorkflow(task_pb2.SubmitWorkflowRequest(
                    workflow=task_pb2.Workflow(steps=[task_pb2.WorkflowStep(
                        id="a", capability="work")])))):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
        assert not drain.done()
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=sub.task.name, fencing_token=assignment.fencing_token, output=js("ok"))))
        await until_state(tasks, sub.task.name, task_pb2.TASK_STATE_SUCCEEDED)
        await asyncio.wait_for(drain, 5)  # ends as soon as nothing is in flight
        done = await tasks.GetTask(task_pb2.GetTaskRequest(name=sub.task.name))
        assert done.task.state == task_pb2.TASK_STATE_SUCCEEDED
        listed = await tasks.ListTasks(task_pb2.ListTasksRequest())
        assert [t.name for t in listed.tasks] == [sub.task.name], "nothing refused was kept"
        agent.out.put_nowait(None)
        agent.hb_out.put_nowait(None)

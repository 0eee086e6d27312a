"""Liveness and leases, from outside: raw stubs against a live embedded mesh.

A hung agent (its process paused: streams open, no beats) must stop receiving
work within three heartbeat intervals, its work stream must end with a status
it can act on, and its tasks must run elsewhere. A work stream without a
heartbeat session is refused. The stream tells the truth about each report.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from agentmesh.v1 import common_pb2, task_pb2, task_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.app import Mesh
from server.domain.models import RetryPolicy, Task, TaskAttempt, TaskFailure
from server.domain.retry import (
    DELIVERY_FAILED,
    MAX_UNCHARGED,
    RetryVerdict,
    decide,
    uncharged_attempts,
)
from tests.test_protocol import RawAgent, js, next_kind, until_state

WAIT = 5.0


def reason_of(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call."""
    status = rpc_status.from_call(err)
    assert status is not None, err
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def stream_error(call: grpc.aio.StreamStreamCall,  # type: ignore[type-arg]
                       timeout: float = WAIT) -> grpc.aio.AioRpcError:  # noqa: ASYNC109
    """Read a stream until it fails; the error (a clean end fails the test)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                msg = await call.read()
            except grpc.aio.AioRpcError as err:
                return err
            assert msg is not grpc.aio.EOF, "the stream ended without a status"


async def test_hung_agent_gets_no_new_work_and_its_stream_ends(
        mesh: Mesh, channel: grpc.aio.Channel) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    hung = RawAgent(channel, "hung", ["job"], concurrency=8)
    await hung.register()
    hung_work = hung.open_work()
    await next_kind(hung_work, "opened")
    first = (await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
        task=task_pb2.Task(capability="job")))).task
    leased = (await next_kind(hung_work, "assignment")).assignment
    assert leased.task.name == first.name

    survivor = RawAgent(channel, "survivor", ["job"], concurrency=16)
    await survivor.register()
    live_work = survivor.open_work()
    await next_kind(live_work, "opened")

    # The hung process: its streams stay open, it sends nothing more.
    hung.beating = False
    gone_within = 3 * hung.interval + 1.0
    err = await stream_error(hung_work, timeout=gone_within + WAIT)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(err) == "SESSION_ENDED"

    # Fresh work and the requeued task all go to the agent that kept beating.
    fresh = [(await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
        task=task_pb2.Task(capability="job")))).task.name for _ in range(12)]
    seen: dict[str, int] = {}
    async with asyncio.timeout(WAIT):
        while len(seen) < 13:
            a = (await next_kind(live_work, "assignment")).assignment
            seen[a.task.name] = a.fencing_token
            survivor.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
                task=a.task.name, fencing_token=a.fencing_token, output=js("done"))))
    assert set(seen) == {first.name, *fresh}
    assert seen[first.name] == leased.fencing_token + 1
    for name in [first.name, *fresh]:
        done = await until_state(tasks, name, task_pb2.TASK_STATE_SUCCEEDED)
        assert {a.agent for a in done.attempts} - {hung.agent} == {survivor.agent}
        assert all(a.agent != hung.agent for a in done.attempts[1:]), "leased to a GONE agent"
    requeued = (await tasks.GetTask(task_pb2.GetTaskRequest(name=first.name))).task
    assert [a.agent for a in requeued.attempts] == [hung.agent, survivor.agent]
    assert requeued.attempts[0].failure.error_type == "AGENT_GONE"

    # The late result of the hung attempt (SIGCONT) is refused: the task has ended.
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await tasks.CompleteTask(task_pb2.CompleteTaskRequest(
            task=first.name, fencing_token=leased.fencing_token, output=js("zombie")))
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    survivor.out.put_nowait(None)
    survivor.hb_out.put_nowait(None)
    hung.hb_out.put_nowait(None)


async def test_broken_heartbeat_stream_ends_the_work_stream_at_once(
        mesh: Mesh, channel: grpc.aio.Channel) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    agent = RawAgent(channel, "half", ["job"], concurrency=1)
    await agent.register()
    work = agent.open_work()
    await next_kind(work, "opened")
    sub = (await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
        task=task_pb2.Task(capability="job")))).task
    await next_kind(work, "assignment")
    agent.hb.cancel()  # only the heartbeat stream breaks
    err = await stream_error(work, timeout=1.0)  # well under one heartbeat interval
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(err) == "SESSION_ENDED"
    got = await until_state(tasks, sub.name, task_pb2.TASK_STATE_QUEUED)
    assert got.attempts[0].failure.error_type == "AGENT_GONE"


async def test_work_stream_without_a_heartbeat_session_is_refused(
        mesh: Mesh, channel: grpc.aio.Channel) -> None:
    agent = RawAgent(channel, "no-beat", ["job"])
    await agent.register(heartbeat=False)
    err = await stream_error(agent.open_work())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(err) == "NO_HEARTBEAT_SESSION"
    assert "Heartbeat" in (err.details() or "")


async def test_reports_are_acknowledged_truthfully(
        mesh: Mesh, channel: grpc.aio.Channel) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    agent = RawAgent(channel, "acked", ["job"], concurrency=2)
    await agent.register()
    work = agent.open_work(ack_reports=True)
    await next_kind(work, "opened")
    sub = (await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
        task=task_pb2.Task(capability="job")))).task
    a = (await next_kind(work, "assignment")).assignment

    def report(name: str, token: int) -> None:
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=name, fencing_token=token, output=js("r"))))

    report(sub.name, a.fencing_token)
    ack = (await next_kind(work, "ack")).ack
    assert (ack.task, ack.fencing_token, ack.outcome) == (
        sub.name, a.fencing_token, task_pb2.TASK_REPORT_OUTCOME_ACCEPTED)
    # An unknown task is not running (it was never STALE_LEASE).
    report("tasks/never-was", 1)
    ack = (await next_kind(work, "ack")).ack
    assert (ack.task, ack.outcome) == ("tasks/never-was", task_pb2.TASK_REPORT_OUTCOME_NOT_RUNNING)
    # The same result again: the task has ended, so NOT_RUNNING.
    report(sub.name, a.fencing_token + 1)
    ack = (await next_kind(work, "ack")).ack
    assert ack.outcome == task_pb2.TASK_REPORT_OUTCOME_NOT_RUNNING
    # A live task whose lease moved on is STALE_LEASE.
    live = (await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
        task=task_pb2.Task(capability="job")))).task
    b = (await next_kind(work, "assignment")).assignment
    await mesh.scheduler.release_agent(agent.agent.removeprefix("agents/"))
    got = (await tasks.GetTask(task_pb2.GetTaskRequest(name=live.name))).task
    assert got.attempts[0].failure.error_type == "AGENT_GONE", "requeued when the call returned"
    report(live.name, b.fencing_token)
    ack = (await next_kind(work, "ack")).ack
    assert (ack.task, ack.outcome) == (live.name, task_pb2.TASK_REPORT_OUTCOME_STALE_LEASE)
    agent.out.put_nowait(None)
    agent.hb_out.put_nowait(None)


async def test_complete_task_says_why_it_refuses(
        mesh: Mesh, channel: grpc.aio.Channel) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await tasks.CompleteTask(task_pb2.CompleteTaskRequest(
            task="tasks/nope", fencing_token=1, output=js("x")))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_task_lifecycle_is_logged_with_ids(
        mesh: Mesh, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.services")
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    agent = RawAgent(channel, "logged", ["job"], concurrency=1)
    await agent.register()
    work = agent.open_work()
    await next_kind(work, "opened")
    sub = (await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
        capability="job", retry_policy=common_pb2.RetryPolicy(max_attempts=1))))).task
    a = (await next_kind(work, "assignment")).assignment
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(failure=task_pb2.TaskFailureReport(
        task=sub.name, fencing_token=a.fencing_token,
        failure=task_pb2.TaskFailure(error_type="Boom", message="no"))))
    await until_state(tasks, sub.name, task_pb2.TASK_STATE_DEAD_LETTERED)
    task_id = sub.name.removeprefix("tasks/")
    mine = [r for r in caplog.records if getattr(r, "task_id", None) == task_id]
    dead = [r for r in mine if getattr(r, "event", "") == "dead_lettered"]
    assert dead, [r.getMessage() for r in mine]
    assert dead[0].agent_id == agent.agent.removeprefix("agents/")  # type: ignore[attr-defined]
    assert dead[0].error_type == "Boom"  # type: ignore[attr-defined]
    assert hasattr(dead[0], "workflow_id")
    agent.out.put_nowait(None)
    agent.hb_out.put_nowait(None)


def test_an_undelivered_attempt_costs_nothing_up_to_a_bound() -> None:
    policy = RetryPolicy(max_attempts=2)
    lost = TaskFailure(DELIVERY_FAILED, "the server could not send it")
    task = Task(id="t", capability="c", attempt=2, attempts=(
        TaskAttempt(1, "a", 0.0, 1.0, lost), TaskAttempt(2, "a", 1.0)))
    assert uncharged_attempts(task) == 1
    # Attempt 2 failing for real is, in charged attempts, the first: retried.
    charged = task.attempt - uncharged_attempts(task)
    assert decide(policy, charged, TaskFailure("Boom")).verdict is RetryVerdict.RETRY
    # Without the forgiveness it would have dead-lettered.
    assert decide(policy, task.attempt, TaskFailure("Boom")).verdict is \
        RetryVerdict.DEAD_LETTER
    # A delivery failure retries at once; past the bound it counts like any other.
    assert decide(policy, 1, lost).delay == 0.0
    many = Task(id="t", capability="c", attempt=10, attempts=tuple(
        TaskAttempt(i, "a", 0.0, 1.0, lost) for i in range(1, 11)))
    assert uncharged_attempts(many) == MAX_UNCHARGED
    assert decide(policy, many.attempt - MAX_UNCHARGED, lost).verdict is \
        RetryVerdict.DEAD_LETTER


async def test_one_oversized_result_fails_its_task_and_the_stream_goes_on(
        mesh: Mesh, channel: grpc.aio.Channel) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    agent = RawAgent(channel, "bloated", ["job"], concurrency=2)
    await agent.register()
    work = agent.open_work(ack_reports=True)
    await next_kind(work, "opened")
    names = [(await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
        task=task_pb2.Task(capability="job")))).task.name for _ in range(2)]
    got = {}
    while len(got) < 2:
        a = (await next_kind(work, "assignment")).assignment
        got[a.task.name] = a.fencing_token
    too_big = common_pb2.Payload(data=b"x" * (mesh.settings.max_payload_bytes + 1))
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
        task=names[0], fencing_token=got[names[0]], output=too_big)))
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
        task=names[1], fencing_token=got[names[1]], output=js("fine"))))
    acks = [(await next_kind(work, "ack")).ack for _ in range(2)]
    assert {a.task for a in acks} == set(names)
    assert all(a.outcome == task_pb2.TASK_REPORT_OUTCOME_ACCEPTED for a in acks)
    failed = await until_state(tasks, names[0], task_pb2.TASK_STATE_FAILED)
    assert failed.attempts[0].failure.error_type == "INVALID_OUTPUT"
    assert len(failed.attempts) == 1, "not retried: the same output would come again"
    await until_state(tasks, names[1], task_pb2.TASK_STATE_SUCCEEDED)
    agent.out.put_nowait(None)
    agent.hb_out.put_nowait(None)

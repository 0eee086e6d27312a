"""The wire protocol end to end with raw stubs (what a Go or TS agent does)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.domain.models import Task


def js(value: object) -> common_pb2.Payload:
    return common_pb2.Payload(data=json.dumps(value).encode(),
                              metadata={"encoding": b"json/plain"})


class RawAgent:
    """A minimal agent speaking the protocol by hand.

    ``register`` opens the heartbeat stream and waits for its first ack (a
    work stream is refused before that); a background task then beats every
    interval while ``beating`` is true, and a reader queues what else the
    heartbeat stream says (drain directives) in ``directives``.
    """

    def __init__(self, channel: grpc.aio.Channel, name: str, caps: list[str],
                 concurrency: int = 2, *, auto_beat: bool = True) -> None:
        self.channel = channel
        self.auto_beat = auto_beat
        self.name = name
        self.caps = caps
        self.concurrency = concurrency
        self.out: asyncio.Queue[task_pb2.ProcessTasksRequest | None] = asyncio.Queue()
        self.hb_out: asyncio.Queue[discovery_pb2.HeartbeatRequest | None] = asyncio.Queue()
        self.directives: asyncio.Queue[discovery_pb2.HeartbeatResponse | None] = asyncio.Queue()
        self.agent = ""
        self.token = ""
        self.beating = True
        self.interval = 0.2
        self._jobs: list[asyncio.Task[None]] = []

    async def register(self, *, heartbeat: bool = True) -> None:
        disc = discovery_pb2_grpc.DiscoveryServiceStub(self.channel)
        resp = await disc.RegisterAgent(discovery_pb2.RegisterAgentRequest(
            agent=discovery_pb2.Agent(
                display_name=self.name, max_concurrency=self.concurrency,
                capabilities=[discovery_pb2.Capability(name=c) for c in self.caps])))
        self.agent, self.token = resp.agent.name, resp.session_token
        self.interval = resp.heartbeat_interval.ToTimedelta().total_seconds() or 0.2
        if not heartbeat:
            return
        await self.hb_out.put(discovery_pb2.HeartbeatRequest(
            open=discovery_pb2.HeartbeatOpen(agent=self.agent, session_token=self.token)))
        self.hb = disc.Heartbeat(self._drain(self.hb_out))
        self.opened = await asyncio.wait_for(self.hb.read(), 5)
        assert self.opened is not grpc.aio.EOF and self.opened.WhichOneof("kind") == "ack"
        if self.auto_beat:
            self._jobs = [asyncio.create_task(self._beat()),
                          asyncio.create_task(self._read_hb())]

    async def _beat(self) -> None:
        while not self.hb.done():
            await asyncio.sleep(self.interval / 2)
            if self.beating:
                self.hb_out.put_nowait(discovery_pb2.HeartbeatRequest(
                    beat=discovery_pb2.HeartbeatBeat(in_flight=0, load=0.0)))

    async def _read_hb(self) -> None:
        try:
            while True:
                msg = await self.hb.read()
                if msg is grpc.aio.EOF:
                    break
                if msg.WhichOneof("kind") != "ack":
                    self.directives.put_nowait(msg)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self.directives.put_nowait(None)

    async def directive(self, timeout: float = 5.0) -> discovery_pb2.HeartbeatResponse:  # noqa: ASYNC109
        """The next heartbeat message that is not an ack (a drain directive)."""
        msg = await asyncio.wait_for(self.directives.get(), timeout)
        assert msg is not None, "the heartbeat stream ended"
        return msg

    async def _drain(self, q: asyncio.Queue) -> AsyncIterator:  # type: ignore[type-arg]
        while True:
            item = await q.get()
            if item is None:
                return
            yield item

    def open_work(self, *, ack_reports: bool = False) -> grpc.aio.StreamStreamCall:  # type: ignore[type-arg]
        self.out.put_nowait(task_pb2.ProcessTasksRequest(
            open=task_pb2.ProcessTasksOpen(agent=self.agent, session_token=self.token,
                                           ack_reports=ack_reports)))
        self.out.put_nowait(task_pb2.ProcessTasksRequest(
            credit=task_pb2.TaskCredit(count=self.concurrency)))
        return task_pb2_grpc.TaskServiceStub(self.channel).ProcessTasks(self._drain(self.out))


async def refused_as_stale(tasks: task_pb2_grpc.TaskServiceStub, name: str, token: int,
                           output: str = "late") -> grpc.aio.AioRpcError:
    """CompleteTask with a token that is not the current lease's: ABORTED (returned)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.CompleteTask(task_pb2.CompleteTaskRequest(
            task=name, fencing_token=token, output=js(output)))
    assert err.value.code() == grpc.StatusCode.ABORTED
    return err.value


async def until_state(tasks: task_pb2_grpc.TaskServiceStub, name: str, state: int,
                      limit: float = 5.0) -> task_pb2.Task:
    """Poll GetTask until the task reaches ``state`` (accepted results are not acked)."""
    async with asyncio.timeout(limit):
        while True:
            task = (await tasks.GetTask(task_pb2.GetTaskRequest(name=name))).task
            if task.state == state:
                return task
            await asyncio.sleep(0.01)


_PENDING: dict[int, list[task_pb2.ProcessTasksResponse]] = {}


async def next_kind(call: grpc.aio.StreamStreamCall, kind: str) -> task_pb2.ProcessTasksResponse:  # type: ignore[type-arg]
    """The next message of a kind; batched assignments are handed out one by one."""
    pending = _PENDING.setdefault(id(call), [])
    if kind == "assignment" and pending:
        return pending.pop(0)
    while True:
        msg = await asyncio.wait_for(call.read(), 5)
        assert msg is not grpc.aio.EOF
        got = msg.WhichOneof("kind")
        if kind == "assignment" and got == "assignments":
            pending.extend(task_pb2.ProcessTasksResponse(assignment=a)
                           for a in msg.assignments.assignments)
            return pending.pop(0)
        if got == kind:
            return msg


async def test_task_round_trip_and_stale_token(channel: grpc.aio.Channel) -> None:
    agent = RawAgent(channel, "raw-1", ["echo"])
    await agent.register()
    work = agent.open_work()
    assert (await next_kind(work, "opened")).opened.agent == agent.agent
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
        task=task_pb2.Task(capability="echo", input=js({"x": 1}))))
    assert sub.task.state == task_pb2.TASK_STATE_QUEUED
    assignment = (await next_kind(work, "assignment")).assignment
    assert assignment.task.name == sub.task.name
    assert json.loads(assignment.task.input.data) == {"x": 1}
    token = assignment.fencing_token
    # A result with a wrong token is refused and changes nothing.
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
        task=sub.task.name, fencing_token=token + 7, output=js("forged"))))
    ack = (await next_kind(work, "ack")).ack
    assert ack.outcome == task_pb2.TASK_REPORT_OUTCOME_STALE_LEASE
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
        task=sub.task.name, fencing_token=token, output=js({"y": 2}))))
    await until_state(tasks, sub.task.name, task_pb2.TASK_STATE_SUCCEEDED)
    got = await tasks.GetTask(task_pb2.GetTaskRequest(name=sub.task.name))
    assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert json.loads(got.task.output.data) == {"y": 2}
    # The same lease reporting again (a re-delivery) is accepted without effect.
    again = await tasks.CompleteTask(task_pb2.CompleteTaskRequest(
        task=sub.task.name, fencing_token=token, output=js("late")))
    assert json.loads(again.task.output.data) == {"y": 2}, "the first result stays"
    # Any other token is refused: the task has ended, so FAILED_PRECONDITION
    # (TASK_NOT_RUNNING, with the state), not LEASE_EXPIRED.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tasks.CompleteTask(task_pb2.CompleteTaskRequest(
            task=sub.task.name, fencing_token=token + 1, output=js("forged")))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(refused.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "TASK_NOT_RUNNING"
    assert info.metadata["state"] == "SUCCEEDED"
    got = await tasks.GetTask(task_pb2.GetTaskRequest(name=sub.task.name))
    assert json.loads(got.task.output.data) == {"y": 2}
    agent.out.put_nowait(None)
    agent.hb_out.put_nowait(None)


async def test_broken_stream_requeues_to_another_agent(channel: grpc.aio.Channel) -> None:
    a1 = RawAgent(channel, "doomed", ["slow"], concurrency=1)
    await a1.register()
    w1 = a1.open_work()
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="slow")))
    first = (await next_kind(w1, "assignment")).assignment
    a2 = RawAgent(channel, "survivor", ["slow"], concurrency=1)
    await a2.register()
    w2 = a2.open_work()
    await next_kind(w2, "opened")
    w1.cancel()  # the agent's work stream breaks mid-task
    a1.hb.cancel()
    second = (await next_kind(w2, "assignment")).assignment
    assert second.task.name == sub.task.name
    assert second.fencing_token > first.fencing_token
    assert second.task.attempt == 2
    # The zombie's late result is refused; the survivor's is accepted.
    await refused_as_stale(tasks, sub.task.name, first.fencing_token, "zombie")
    a2.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
        task=sub.task.name, fencing_token=second.fencing_token, output=js("ok"))))
    await until_state(tasks, sub.task.name, task_pb2.TASK_STATE_SUCCEEDED)
    got = await tasks.GetTask(task_pb2.GetTaskRequest(name=sub.task.name))
    assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert json.loads(got.task.output.data) == "ok"
    assert [a.agent for a in got.task.attempts] == [a1.agent, a2.agent]
    a2.out.put_nowait(None)
    a2.hb_out.put_nowait(None)


async def test_workflow_outputs_flow_downstream(channel: grpc.aio.Channel) -> None:
    agent = RawAgent(channel, "wf", ["a", "b"], concurrency=4)
    await agent.register()
    work = agent.open_work()
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    wf = (await tasks.SubmitWorkflow(task_pb2.SubmitWorkflowRequest(workflow=task_pb2.Workflow(
        steps=[task_pb2.WorkflowStep(id="first", capability="a", input=js(1)),
               task_pb2.WorkflowStep(id="second", capability="a", input=js(2)),
               task_pb2.WorkflowStep(id="join", capability="b",
                                     depends_on=["first", "second"])])))).workflow
    seen = {}
    for _ in range(3):
        a = (await next_kind(work, "assignment")).assignment
        seen[a.task.step_id] = a
        if a.task.step_id == "join":
            ups = {k: json.loads(v.data) for k, v in a.task.dependency_outputs.items()}
            assert ups == {"first": 10, "second": 20}
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
            task=a.task.name, fencing_token=a.fencing_token,
            output=js(json.loads(a.task.input.data or b"0") * 10))))
        agent.out.put_nowait(task_pb2.ProcessTasksRequest(credit=task_pb2.TaskCredit(count=1)))
    assert set(seen) == {"first", "second", "join"}
    async with asyncio.timeout(10):  # WatchWorkflow: the current state, then every change
        async for update in tasks.WatchWorkflow(task_pb2.WatchWorkflowRequest(name=wf.name)):
            if update.workflow.state != task_pb2.WORKFLOW_STATE_RUNNING:
                break
    assert update.workflow.state == task_pb2.WORKFLOW_STATE_SUCCEEDED
    agent.out.put_nowait(None)
    agent.hb_out.put_nowait(None)


async def test_cycle_is_refused_with_its_path(channel: grpc.aio.Channel) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.SubmitWorkflow(task_pb2.SubmitWorkflowRequest(workflow=task_pb2.Workflow(
            steps=[task_pb2.WorkflowStep(id="a", capability="x", depends_on=["c"]),
                   task_pb2.WorkflowStep(id="b", capability="x", depends_on=["a"]),
                   task_pb2.WorkflowStep(id="c", capability="x", depends_on=["b"])])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a -> c -> b -> a" in (err.value.details() or "")


async def test_orphaned_lease_is_handed_over(mesh: object, channel: grpc.aio.Channel) -> None:
    """A lease committed in the store whose reply was lost still reaches the agent."""
    from server.app import Mesh  # noqa: PLC0415

    assert isinstance(mesh, Mesh)
    agent = RawAgent(channel, "orphan-host", ["orph"], concurrency=2)
    await agent.register()
    work = agent.open_work()
    await next_kind(work, "opened")
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    # Lease straight in the store, as a retried script whose first reply was lost would.
    store = mesh.scheduler._tasks
    await store.create_task(Task(id="orphan-1", capability="orph", create_time=time.time()))
    agent_id = agent.agent.removeprefix("agents/")
    lease = await store.lease_next("default", ["orph"], agent_id, now=time.time(),
                                   default_timeout=300)
    assert lease is not None
    found = await mesh.scheduler.reconcile(time.time() + 5)
    assert found == 1
    got = (await next_kind(work, "assignment")).assignment
    assert got.task.name == "tasks/orphan-1" and got.fencing_token == lease.fencing_token
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
        task=got.task.name, fencing_token=got.fencing_token, output=js("ok"))))
    done = await until_state(tasks, "tasks/orphan-1", task_pb2.TASK_STATE_SUCCEEDED)
    assert done.attempt == 1, "handed over, not re-run"
    agent.out.put_nowait(None)
    agent.hb_out.put_nowait(None)



async def test_late_progress_does_not_end_the_stream(channel: grpc.aio.Channel) -> None:
    """Progress for a lease the stream no longer holds gets a cancellation; the
    stream and the agent's other work carry on."""
    agent = RawAgent(channel, "late-progress", ["lp"], concurrency=2)
    await agent.register()
    work = agent.open_work()
    await next_kind(work, "opened")
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(progress=task_pb2.TaskProgress(
        task="tasks/gone", fencing_token=3)))
    cancel = (await next_kind(work, "cancellation")).cancellation
    assert (cancel.task, cancel.fencing_token) == ("tasks/gone", 3)
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="lp")))
    got = (await next_kind(work, "assignment")).assignment
    assert got.task.name == sub.task.name
    agent.out.put_nowait(None)
    agent.hb_out.put_nowait(None)


async def test_watch_tasks_batches_changes_that_are_ready_together(
        channel: grpc.aio.Channel) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in tasks.WatchTasks(task_pb2.WatchTasksRequest(max_batch_size=-1)):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_size" in (err.value.details() or "")

    queued = [task_pb2.TASK_STATE_QUEUED]
    batched = tasks.WatchTasks(task_pb2.WatchTasksRequest(
        capability="batchy", states=queued, max_batch_size=16))  # type: ignore[arg-type]
    single = tasks.WatchTasks(task_pb2.WatchTasksRequest(
        capability="batchy", states=queued))  # type: ignore[arg-type]
    fence = task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="batchy"))
    # The watches are live once they see a change; the fence is that change.
    async with asyncio.timeout(5):
        while True:
            await tasks.SubmitTask(fence)
            try:
                async with asyncio.timeout(0.2):
                    first_b = await batched.read()
                    first_s = await single.read()
                break
            except TimeoutError:
                continue
    assert len(first_b.tasks) >= 1 and not first_b.HasField("task")
    assert first_s.HasField("task") and not first_s.tasks

    submitted = await tasks.BatchSubmitTasks(task_pb2.BatchSubmitTasksRequest(
        requests=[task_pb2.SubmitTaskRequest(task=task_pb2.Task(
            capability="batchy", input=js(i))) for i in range(40)]))
    want = [t.name for t in submitted.tasks]
    sizes: list[int] = []
    got: list[str] = []
    async with asyncio.timeout(5):
        while len(got) < len(want):
            response = await batched.read()
            assert not response.HasField("task")
            sizes.append(len(response.tasks))
            got.extend(t.name for t in response.tasks if t.name in want)
    # Nothing lost, nothing twice, in order; never more than asked per response,
    # and the 40 changes made in one step came in fewer than 40 responses.
    assert got == want
    assert max(sizes) <= 16 and len(sizes) < len(want), sizes
    got_single: list[str] = []
    async with asyncio.timeout(5):
        while len(got_single) < len(want):
            response = await single.read()
            assert not response.tasks
            if response.task.name in want:
                got_single.append(response.task.name)
    assert got_single == want
    batched.cancel()
    single.cancel()

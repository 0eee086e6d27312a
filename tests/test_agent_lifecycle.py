"""An agent's life as the registry sees it: heartbeats, expiry, broken streams,
watch events, and cancellation of the task it runs.

Raw protocol agents (``RawAgent``) where the wire matters, the SDK ``Agent``
for what a handler sees. Heartbeat expiry runs the whole server on a
``ManualClock``: the test moves time, so "3 missed intervals" is exact and
nothing sleeps; with a frozen clock nothing can expire by accident either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.v1 import discovery_pb2, discovery_pb2_grpc, task_pb2, task_pb2_grpc

from agent_sdk import Agent, MeshClient, TaskContext
from server.app import Mesh, running_server
from server.services.clock import ManualClock
from tests.conftest import embedded_settings
from tests.test_protocol import RawAgent, js, next_kind, refused_as_stale, until_state

INTERVAL = 1.0  # heartbeat interval of the manual-clock meshes (misses: 3)
WAIT = 10.0
ACTIVE = discovery_pb2.AGENT_STATE_ACTIVE
DRAINING = discovery_pb2.AGENT_STATE_DRAINING
GONE = discovery_pb2.AGENT_STATE_GONE
JOINED = discovery_pb2.AGENT_EVENT_TYPE_JOINED
UPDATED = discovery_pb2.AGENT_EVENT_TYPE_UPDATED
LEFT = discovery_pb2.AGENT_EVENT_TYPE_LEFT


@pytest.fixture
def clock() -> ManualClock:
    """The mesh's clock; only the test moves it."""
    return ManualClock(time.time())


@pytest.fixture
async def mesh(clock: ManualClock) -> AsyncIterator[Mesh]:
    """An embedded mesh on a manual clock (heartbeat interval 1 s, 3 misses)."""
    settings = embedded_settings(heartbeat_interval=INTERVAL, heartbeat_misses=3)
    async with running_server(settings, clock=clock) as running:
        yield running


@pytest.fixture
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to the mesh."""
    async with grpc.aio.insecure_channel(mesh.address) as ch:
        yield ch


async def beat(agent: RawAgent) -> discovery_pb2.HeartbeatAck:
    """Send one beat and return its ack (skipping nothing else: acks only here)."""
    agent.hb_out.put_nowait(discovery_pb2.HeartbeatRequest(
        beat=discovery_pb2.HeartbeatBeat(in_flight=0, load=0.0)))
    response = await asyncio.wait_for(agent.hb.read(), WAIT)
    assert response.WhichOneof("kind") == "ack", response
    return response.ack


async def agent_state(channel: grpc.aio.Channel, name: str) -> int:
    """GetAgent's state."""
    disc = discovery_pb2_grpc.DiscoveryServiceStub(channel)
    return (await disc.GetAgent(discovery_pb2.GetAgentRequest(name=name))).agent.state


async def until_agent_state(channel: grpc.aio.Channel, name: str, state: int) -> None:
    """Poll GetAgent until the agent is in ``state``."""
    async with asyncio.timeout(WAIT):
        while True:
            if await agent_state(channel, name) == state:
                return
            await asyncio.sleep(0.01)


def close(*agents: RawAgent) -> None:
    """End the agents' request streams."""
    for agent in agents:
        agent.out.put_nowait(None)
        agent.hb_out.put_nowait(None)


# ------------------------------------------------------------------- heartbeats


async def test_silent_agent_is_gone_after_three_missed_intervals_and_its_task_moves(
        mesh: Mesh, channel: grpc.aio.Channel, clock: ManualClock) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    hung = RawAgent(channel, "hung", ["slow"], concurrency=1, auto_beat=False)
    await hung.register()
    work = hung.open_work()
    await next_kind(work, "opened")
    sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="slow")))
    first = (await next_kind(work, "assignment")).assignment

    clock.advance(INTERVAL)
    ack = await beat(hung)  # its last beat: after this the process hangs, streams open
    last_beat = clock.now()
    expire = ack.expire_time.ToNanoseconds() / 1e9
    assert expire == pytest.approx(last_beat + 3 * INTERVAL, abs=1e-3)

    survivor = RawAgent(channel, "survivor", ["slow"], concurrency=1, auto_beat=False)
    await survivor.register()
    w2 = survivor.open_work()
    await next_kind(w2, "opened")

    # Just under three intervals of silence: still ACTIVE, the task stays where it is.
    clock.advance(3 * INTERVAL - 0.1)
    await beat(survivor)
    assert await mesh.registry.expire() == 0
    assert await agent_state(channel, hung.agent) == ACTIVE
    got = (await tasks.GetTask(task_pb2.GetTaskRequest(name=sub.task.name))).task
    assert (got.state, got.agent) == (task_pb2.TASK_STATE_RUNNING, hung.agent)

    # Past three intervals: GONE (the expiry loop notices on its own) and the
    # lease moves to the agent that kept beating.
    clock.advance(0.2)
    await until_agent_state(channel, hung.agent, GONE)
    assert await agent_state(channel, survivor.agent) == ACTIVE
    second = (await next_kind(w2, "assignment")).assignment
    assert second.task.name == sub.task.name
    assert second.fencing_token > first.fencing_token
    assert second.task.attempt == 2
    # The hung agent's late result is refused; the survivor's is accepted.
    await refused_as_stale(tasks, sub.task.name, first.fencing_token)
    done = await tasks.CompleteTask(task_pb2.CompleteTaskRequest(
        task=sub.task.name, fencing_token=second.fencing_token, output=js("ok")))
    assert done.task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert [a.agent for a in done.task.attempts] == [hung.agent, survivor.agent]
    assert done.task.attempts[0].failure.error_type == "AGENT_GONE"
    close(hung, survivor)


async def test_broken_heartbeat_stream_is_gone_at_once(
        mesh: Mesh, channel: grpc.aio.Channel) -> None:
    """The clock never moves, so expiry cannot be what ends the session."""
    agent = RawAgent(channel, "fragile", ["x"], auto_beat=False)
    await agent.register()
    assert await agent_state(channel, agent.agent) == ACTIVE
    agent.hb.cancel()  # the connection breaks
    await until_agent_state(channel, agent.agent, GONE)
    disc = discovery_pb2_grpc.DiscoveryServiceStub(channel)
    live = await disc.ListAgents(discovery_pb2.ListAgentsRequest())
    assert agent.agent not in [a.name for a in live.agents]
    # The session is over: the old token opens nothing.
    again = RawAgent(channel, "fragile", ["x"], auto_beat=False)
    again.agent, again.token = agent.agent, agent.token
    work = again.open_work()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await next_kind(work, "opened")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ------------------------------------------------------------------ WatchAgents


async def next_event(watch: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
                     name: str) -> discovery_pb2.WatchAgentsResponse:
    """The next event about the agent ``name``."""
    while True:
        event = await asyncio.wait_for(watch.read(), WAIT)
        assert event is not grpc.aio.EOF
        if event.agent.name == name:
            return event


async def test_watch_agents_streams_joined_then_left(channel: grpc.aio.Channel) -> None:
    disc = discovery_pb2_grpc.DiscoveryServiceStub(channel)
    early = RawAgent(channel, "early", ["w"], auto_beat=False)
    await early.register()
    watch = disc.WatchAgents(discovery_pb2.WatchAgentsRequest(include_existing=True))
    # include_existing: a JOINED for the agent that was already there.
    existing = await next_event(watch, early.agent)
    assert (existing.type, existing.agent.state) == (JOINED, ACTIVE)

    late = RawAgent(channel, "late", ["w"], auto_beat=False)
    await late.register()
    joined = await next_event(watch, late.agent)
    assert (joined.type, joined.agent.state) == (JOINED, ACTIVE)
    assert joined.agent.display_name == "late"

    await disc.DeregisterAgent(discovery_pb2.DeregisterAgentRequest(
        name=late.agent, session_token=late.token))
    left = await next_event(watch, late.agent)
    assert (left.type, left.agent.state) == (LEFT, GONE)

    early.hb.cancel()  # a broken stream is a LEFT too
    left = await next_event(watch, early.agent)
    assert (left.type, left.agent.state) == (LEFT, GONE)
    watch.cancel()
    close(late)


async def test_watch_agents_streams_updated_when_the_agent_drains(
        mesh: Mesh, channel: grpc.aio.Channel) -> None:
    """JOINED, UPDATED (DRAINING) on the server's drain, LEFT when it goes."""
    disc = discovery_pb2_grpc.DiscoveryServiceStub(channel)
    agent = RawAgent(channel, "drained", ["w"], auto_beat=False)
    await agent.register()
    # Registered before the watch opens: its one JOINED comes from include_existing,
    # and the watch is subscribed once that JOINED is read.
    watch = disc.WatchAgents(discovery_pb2.WatchAgentsRequest(include_existing=True))
    events = [await next_event(watch, agent.agent)]
    await mesh.drain(grace=0.0)
    directive = await asyncio.wait_for(agent.hb.read(), WAIT)
    assert directive.WhichOneof("kind") == "drain"
    draining_state = await agent_state(channel, agent.agent)
    await disc.DeregisterAgent(discovery_pb2.DeregisterAgentRequest(
        name=agent.agent, session_token=agent.token))
    while events[-1].type != LEFT:
        events.append(await next_event(watch, agent.agent))
    watch.cancel()
    close(agent)
    seen = [(discovery_pb2.AgentEventType.Name(e.type).removeprefix("AGENT_EVENT_TYPE_"),
             discovery_pb2.AgentState.Name(e.agent.state).removeprefix("AGENT_STATE_"))
            for e in events]
    during = discovery_pb2.AgentState.Name(draining_state).removeprefix("AGENT_STATE_")
    assert (seen, during) == ([("JOINED", "ACTIVE"), ("UPDATED", "DRAINING"),
                               ("LEFT", "GONE")], "DRAINING"), \
        f"watch events {seen}; GetAgent during the drain: {during}"


async def test_watch_agents_streams_updated_when_the_load_changes(
        channel: grpc.aio.Channel) -> None:
    """A beat that changes in_flight/load is an UPDATED (still ACTIVE); the same
    beat again is not (the next event is the LEFT)."""
    disc = discovery_pb2_grpc.DiscoveryServiceStub(channel)
    agent = RawAgent(channel, "busy", ["w"], auto_beat=False)
    await agent.register()
    watch = disc.WatchAgents(discovery_pb2.WatchAgentsRequest(include_existing=True))
    assert (await next_event(watch, agent.agent)).type == JOINED
    for _ in range(2):
        agent.hb_out.put_nowait(discovery_pb2.HeartbeatRequest(
            beat=discovery_pb2.HeartbeatBeat(in_flight=3, load=0.75)))
        assert (await asyncio.wait_for(agent.hb.read(), WAIT)).WhichOneof("kind") == "ack"
    updated = await next_event(watch, agent.agent)
    assert (updated.type, updated.agent.state) == (UPDATED, ACTIVE)
    assert (updated.agent.in_flight, updated.agent.load) == (3, 0.75)
    await disc.DeregisterAgent(discovery_pb2.DeregisterAgentRequest(
        name=agent.agent, session_token=agent.token))
    assert (await next_event(watch, agent.agent)).type == LEFT
    watch.cancel()
    close(agent)


# ------------------------------------------------------------------- CancelTask


async def test_cancel_running_task_reaches_the_agent_and_refuses_its_result(
        channel: grpc.aio.Channel) -> None:
    agent = RawAgent(channel, "worker", ["long"], concurrency=2, auto_beat=False)
    await agent.register()
    work = agent.open_work()
    await next_kind(work, "opened")
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="long")))
    assignment = (await next_kind(work, "assignment")).assignment
    await until_state(tasks, sub.task.name, task_pb2.TASK_STATE_RUNNING)

    cancelled = await tasks.CancelTask(task_pb2.CancelTaskRequest(
        name=sub.task.name, reason="operator changed their mind"))
    assert cancelled.task.state == task_pb2.TASK_STATE_CANCELLED
    notice = (await next_kind(work, "cancellation")).cancellation
    assert (notice.task, notice.fencing_token) == (sub.task.name, assignment.fencing_token)
    assert notice.reason == "operator changed their mind"

    # A result sent afterwards on the stream is refused...
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
        task=sub.task.name, fencing_token=assignment.fencing_token, output=js("too late"))))
    ack = (await next_kind(work, "ack")).ack
    # NOT_RUNNING, not STALE_LEASE: the task has ended (cancelled), no attempt will follow.
    assert (ack.task, ack.outcome) == (sub.task.name, task_pb2.TASK_REPORT_OUTCOME_NOT_RUNNING)
    # ...and so is one sent through CompleteTask: FAILED_PRECONDITION naming the state.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.CompleteTask(task_pb2.CompleteTaskRequest(
            task=sub.task.name, fencing_token=assignment.fencing_token, output=js("too late")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CANCELLED" in (err.value.details() or "")
    got = (await tasks.GetTask(task_pb2.GetTaskRequest(name=sub.task.name))).task
    assert got.state == task_pb2.TASK_STATE_CANCELLED
    assert not got.HasField("output")
    close(agent)


async def test_sdk_cancel_cancels_the_running_handler(mesh: Mesh) -> None:
    agent = Agent("cancellable", target=mesh.address, max_concurrency=1)
    started = asyncio.Event()
    saw_cancel = asyncio.Event()
    flagged: list[bool] = []

    @agent.handler("forever")
    async def forever(task: TaskContext) -> str:
        if task.input == "quick":
            return "quick done"
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            flagged.append(task.cancelled.is_set())
            saw_cancel.set()
            raise
        return "unreachable"

    run = asyncio.create_task(agent.run())
    try:
        async with MeshClient(mesh.address) as client:
            stuck = await client.submit_task("forever", "stuck")
            await asyncio.wait_for(started.wait(), WAIT)
            info = await client.cancel_task(stuck.name, reason="no longer needed")
            assert info.state == "CANCELLED"
            await asyncio.wait_for(saw_cancel.wait(), WAIT)
            assert flagged == [True], "TaskContext.cancelled is set before the handler ends"
            # The one slot came back: the next task runs on the same agent.
            assert await client.run_task("forever", "quick", wait_timeout=WAIT) == "quick done"
            final = await client.get_task(stuck.name)
            assert (final.state, final.output) == ("CANCELLED", None)
    finally:
        await agent.stop(grace=1.0)
        await asyncio.wait_for(run, WAIT)

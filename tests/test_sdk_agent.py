"""The SDK ``Agent`` and ``MeshClient`` against real meshes.

In-process meshes (``running_server`` on a free port) for the behaviour of one
session; ``agentmesh serve`` subprocesses (the chaos harness ``Server``) where
a server has to die or restart. Nothing waits a fixed time: each test awaits
the handler event, task state or registration it expects, with a generous
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from agent_sdk import Agent, MeshClient, SyncMeshClient, TaskContext
from agent_sdk.errors import AbortedError
from server.app import Mesh, running_server
from tests._services import free_port
from tests.chaos._harness import Server
from tests.conftest import embedded_settings

# Beats every second, gone after 3 s of silence: a loaded machine cannot make a
# healthy agent look dead (the shared fixture's 0.2 s gives only 0.6 s).
SERVER_ENV = {"AGENTMESH_HEARTBEAT_INTERVAL": "1.0"}
WAIT = 30.0


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    """An embedded mesh with a 1 s heartbeat interval."""
    async with running_server(embedded_settings(heartbeat_interval=1.0)) as running:
        yield running


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """``agentmesh serve`` subprocesses started by a test; all killed at the end."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


@contextlib.asynccontextmanager
async def running(agent: Agent, grace: float = 2.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``agent`` for the block; stop it and wait for ``run`` to end after."""
    run = asyncio.create_task(agent.run())
    try:
        yield run
    finally:
        await agent.stop(grace=grace)
        await asyncio.wait_for(run, WAIT)


async def until(predicate: Callable[[], Any], what: str, limit: float = WAIT) -> None:
    """Poll ``predicate`` (sync or async) until it is true; AssertionError after ``limit``."""
    try:
        async with asyncio.timeout(limit):
            while True:
                value = predicate()
                if asyncio.iscoroutine(value):
                    value = await value
                if value:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {limit}s: {what}") from None


# ---------------------------------------------------------------- concurrency


async def test_peak_concurrency_equals_max_concurrency(mesh: Mesh) -> None:
    """With K slots and many queued tasks, exactly K handlers run at once, never more."""
    limit, total = 3, 12
    agent = Agent("bounded", target=mesh.address, max_concurrency=limit)
    changed = asyncio.Condition()
    gate = asyncio.Semaphore(0)
    now_running = 0
    peak = 0
    started: list[str] = []

    @agent.handler("hold")
    async def hold(task: TaskContext) -> Any:
        nonlocal now_running, peak
        now_running += 1
        peak = max(peak, now_running)
        started.append(task.name)
        async with changed:
            changed.notify_all()
        try:
            await gate.acquire()
        finally:
            now_running -= 1
        return task.input

    async def wait_started(count: int) -> None:
        async with changed, asyncio.timeout(WAIT):
            await changed.wait_for(lambda: len(started) >= count)

    async with MeshClient(mesh.address) as client:
        # Everything is queued before the agent connects, so its first grant
        # could be filled many times over if the limit were not enforced.
        names = [(await client.submit_task("hold", i)).name for i in range(total)]
        async with running(agent):
            await wait_started(limit)
            assert now_running == limit and peak == limit
            # Free one slot at a time; each freed slot is refilled before the next.
            for released in range(1, total + 1):
                gate.release()
                await wait_started(min(total, limit + released))
                assert peak == limit, f"{peak} handlers ran at once (limit {limit})"
            done = [await client.wait_task(n, timeout=WAIT) for n in names]
    assert peak == limit
    assert sorted(started) == sorted(names), "every task ran exactly once"
    assert [(t.state, t.output) for t in done] == [("SUCCEEDED", i) for i in range(total)]


async def test_async_and_sync_handlers_both_work(mesh: Mesh) -> None:
    """An async handler runs on the loop; a sync one runs in a thread and does not
    block the loop (the async task completes while the sync handler is blocked)."""
    agent = Agent("both-kinds", target=mesh.address, max_concurrency=2)
    loop_thread = threading.get_ident()
    ran_on: dict[str, int] = {}
    sync_started = threading.Event()
    release_sync = threading.Event()

    @agent.handler("double")
    async def double(task: TaskContext) -> int:
        ran_on["async"] = threading.get_ident()
        return int(task.input) * 2

    @agent.handler("shout")
    def shout(task: TaskContext) -> str:
        ran_on["sync"] = threading.get_ident()
        sync_started.set()
        if not release_sync.wait(WAIT):
            raise TimeoutError("never released: was the event loop blocked?")
        return str(task.input).upper()

    async with running(agent), MeshClient(mesh.address) as client:
        blocked = await client.submit_task("shout", "quiet")
        assert await asyncio.to_thread(sync_started.wait, WAIT)
        # The sync handler is blocked in its thread; the loop still serves tasks.
        assert await client.run_task("double", 21, wait_timeout=WAIT) == 42
        release_sync.set()
        done = await client.wait_task(blocked.name, timeout=WAIT)
    assert (done.state, done.output) == ("SUCCEEDED", "QUIET")
    assert ran_on["async"] == loop_thread
    assert ran_on["sync"] != loop_thread


# ------------------------------------------------------------- reconnect, failover


@pytest.mark.slow
async def test_agent_reconnects_by_itself_after_a_server_restart(
        servers: list[Server]) -> None:
    first = await Server(SERVER_ENV).start()
    servers.append(first)
    agent = Agent("phoenix", target=first.address)
    handled: list[str] = []

    @agent.handler("rise")
    async def rise(task: TaskContext) -> int:
        handled.append(task.name)
        return int(task.input) + 1

    async with running(agent):
        async with MeshClient(first.address) as client:
            assert await client.run_task("rise", 1, wait_timeout=WAIT) == 2
        old_session = agent.agent_name
        first.stop()  # SIGKILL: the agent's streams break without a goodbye
        restarted = await Server(SERVER_ENV, port=first.port).start()
        servers.append(restarted)
        # A fresh process: its memory store knows no agent, so the task below
        # can only run if the agent registers again by itself.
        async with MeshClient(restarted.address) as client:
            later = await client.submit_task("rise", 41)
            done = await client.wait_task(later.name, timeout=WAIT)
            live = await client.list_agents(capability="rise")
    assert (done.state, done.output) == ("SUCCEEDED", 42)
    assert agent.agent_name != old_session, "a new session on the restarted server"
    assert agent.agent_name in [a.name for a in live if a.state == "ACTIVE"]
    assert len(handled) == 2


async def test_first_target_down_agent_and_client_use_the_second(mesh: Mesh) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    targets = [dead, mesh.address]
    agent = Agent("second-choice", target=targets)

    @agent.handler("hop")
    async def hop(task: TaskContext) -> str:
        return f"hopped {task.input}"

    async with running(agent), MeshClient(targets) as client:
        assert await client.run_task("hop", 1, wait_timeout=WAIT) == "hopped 1"
        assert [a.display_name for a in await client.list_agents()] == ["second-choice"]


@pytest.mark.slow
async def test_first_server_killed_agent_and_client_fail_over_to_the_second(
        mesh: Mesh, servers: list[Server]) -> None:
    first = await Server(SERVER_ENV).start()
    servers.append(first)
    targets = [first.address, mesh.address]
    agent = Agent("nomad", target=targets)

    @agent.handler("hop")
    async def hop(task: TaskContext) -> str:
        return f"hopped {task.input}"

    async with running(agent), MeshClient(targets) as client, \
            MeshClient(mesh.address) as second:
        assert await client.run_task("hop", 1, wait_timeout=WAIT) == "hopped 1"
        # So far everything went through the first server.
        assert await second.list_agents() == []
        assert await second.list_tasks() == []
        first.stop()  # SIGKILL
        assert await client.run_task("hop", 2, wait_timeout=WAIT) == "hopped 2"
        # The work went on through the second server.
        [task] = await second.list_tasks()
        assert (task.state, task.output) == ("SUCCEEDED", "hopped 2")
        assert task.agent == agent.agent_name
        live = await second.list_agents()
        assert agent.agent_name in [a.name for a in live if a.display_name == "nomad"]


# ----------------------------------------------------------------------- drain


async def test_stop_lets_the_in_flight_handler_finish_and_takes_no_new_work(
        mesh: Mesh) -> None:
    agent = Agent("drainer", target=mesh.address, max_concurrency=2)
    started = asyncio.Event()
    release = asyncio.Event()
    ran: list[str] = []
    cancelled: list[str] = []

    @agent.handler("job")
    async def job(task: TaskContext) -> dict[str, Any]:
        ran.append(task.name)
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(task.name)
            raise
        return {"done": task.input}

    run = asyncio.create_task(agent.run())
    async with MeshClient(mesh.address) as client:
        first = await client.submit_task("job", 1)
        await asyncio.wait_for(started.wait(), WAIT)
        session = agent.agent_name
        stopping = asyncio.create_task(agent.stop(grace=WAIT))
        second = await client.submit_task("job", 2)
        # The agent still holds a free credit, so the server hands it the new task;
        # a stopping agent must leave it alone (deregistering requeues it).
        await until(lambda: _state_is(client, second.name, "RUNNING"),
                    "the second task was never dispatched")
        assert not stopping.done(), "stop returned while a handler was still running"
        release.set()
        await asyncio.wait_for(stopping, WAIT)
        await asyncio.wait_for(run, WAIT)
        done = await client.get_task(first.name)
        assert (done.state, done.output) == ("SUCCEEDED", {"done": 1})
        assert ran == [first.name], "the stopping agent ran new work"
        assert cancelled == []
        assert (await client.get_agent(session)).state == "GONE"
        requeued = await client.get_task(second.name)
        assert requeued.state == "QUEUED", "the task it did not run is back in the queue"
        # Not lost: the next agent runs it.
        finisher = Agent("finisher", target=mesh.address)
        finisher.handler("job")(lambda task: {"done": task.input})
        async with running(finisher):
            later = await client.wait_task(second.name, timeout=WAIT)
        assert (later.state, later.output) == ("SUCCEEDED", {"done": 2})


async def test_server_drain_lets_the_sdk_handler_finish(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """The server's drain directive: the agent finishes the in-flight handler and
    its result is accepted before the drain ends."""
    caplog.set_level(logging.INFO, logger="agent_sdk._agent")
    agent = Agent("obedient", target=mesh.address, max_concurrency=2)
    started = asyncio.Event()
    release = asyncio.Event()

    @agent.handler("job")
    async def job(task: TaskContext) -> str:
        started.set()
        await release.wait()
        return "finished"

    async with running(agent), MeshClient(mesh.address) as client:
        task = await client.submit_task("job")
        await asyncio.wait_for(started.wait(), WAIT)
        draining = asyncio.create_task(mesh.drain(grace=WAIT))
        await until(lambda: "server asks to drain" in caplog.text,
                    "the agent was never told to drain")
        assert not draining.done(), "the drain ended with a task in flight"
        release.set()
        await asyncio.wait_for(draining, WAIT)  # ends once the result is in
        done = await client.get_task(task.name)
    assert (done.state, done.output) == ("SUCCEEDED", "finished")


async def _state_is(client: MeshClient, name: str, state: str) -> bool:
    return (await client.get_task(name)).state == state


# -------------------------------------------------------------- SyncMeshClient


async def test_sync_client_submits_waits_and_uses_state(mesh: Mesh) -> None:
    agent = Agent("greeter", target=mesh.address)

    @agent.handler("greet")
    async def greet(task: TaskContext) -> str:
        return f"hello {task.input}"

    def blocking_program() -> dict[str, Any]:
        """What a blocking script does; runs in a thread, the mesh is on the loop."""
        with SyncMeshClient(mesh.address, timeout=10) as client:
            out: dict[str, Any] = {}
            out["put"] = client.put_state("cfg/mode", {"fast": True})
            out["got"] = client.get_state("cfg/mode")
            out["missing"] = client.get_state("cfg/none")
            try:
                client.put_state("cfg/mode", "stale", expected_version=out["put"].version + 7)
            except AbortedError as exc:
                out["conflict"] = exc
            out["submitted"] = client.submit_task("greet", "ada")
            out["done"] = client.wait_task(out["submitted"].name, timeout=WAIT)
            out["ran"] = client.run_task("greet", "bob", wait_timeout=WAIT)
        return out

    async with running(agent), MeshClient(mesh.address) as check:
        out = await asyncio.to_thread(blocking_program)
        stored = await check.get_state("cfg/mode")
    assert out["got"].value == {"fast": True}
    assert out["got"].version == out["put"].version >= 1
    assert out["missing"] is None
    assert isinstance(out.get("conflict"), AbortedError)
    assert stored is not None and stored.value == {"fast": True}, "the stale write landed"
    assert out["submitted"].state in ("QUEUED", "RUNNING", "SUCCEEDED")
    assert (out["done"].state, out["done"].output) == ("SUCCEEDED", "hello ada")
    assert out["ran"] == "hello bob"

"""Streamed partial results end to end: SDK handler -> work stream -> store -> watchers.

A handler's chunks reach a watcher in order, each once; a watcher that
reconnects with its last sequence misses nothing and repeats nothing; a chunk
of a stale lease is refused like a stale result and the stream carries on;
the bounds answer with clear statuses (field details, reasons).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.v1 import task_pb2, task_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agent_sdk import Agent, ChunkRefusedError, MeshClient, TaskChunk, TaskContext, TaskInfo
from server.app import Mesh, running_server
from tests.conftest import embedded_settings
from tests.test_cli import cli
from tests.test_liveness import reason_of
from tests.test_protocol import RawAgent, next_kind
from tests.test_sdk_agent import running

WAIT = 20.0


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    """An embedded mesh with small chunk bounds."""
    async with running_server(embedded_settings(heartbeat_interval=1.0, max_chunk_bytes=4096,
                                                max_chunks_per_task=50)) as m:
        yield m


async def test_chunks_stream_in_order_and_a_reconnect_resumes_exactly(mesh: Mesh) -> None:
    halfway, go_on = asyncio.Event(), asyncio.Event()
    agent = Agent("writer", target=mesh.address, max_concurrency=2)

    @agent.handler("write")
    async def write(task: TaskContext) -> str:
        for i in range(10):
            await task.emit(f"tok{i} ")
        await task.emit_progress("half way", 0.5)
        halfway.set()
        await go_on.wait()
        for i in range(10, 20):
            await task.emit(f"tok{i} ")
        await task.emit_artifact({"words": 20}, artifact="stats", last=True)
        return "done"

    async with MeshClient(mesh.address) as client, running(agent):
        task = await client.submit_task("write", {})
        await asyncio.wait_for(halfway.wait(), WAIT)
        # First watcher: reads until the progress note, then goes away.
        first: list[TaskChunk] = []
        async with asyncio.timeout(WAIT):
            stream = client.watch_chunks(task.name)
            async for item in stream:
                if isinstance(item, TaskChunk):
                    first.append(item)
                    if item.kind == "PROGRESS":
                        break
            await stream.aclose()  # type: ignore[attr-defined]
        assert [c.sequence for c in first] == list(range(1, 12))
        assert [c.text for c in first[:10]] == [f"tok{i} " for i in range(10)]
        assert (first[10].text, first[10].progress) == ("half way", 0.5)
        go_on.set()
        # Reconnect from the last sequence received: the rest, exactly once.
        rest: list[TaskChunk] = []
        states: list[str] = []
        async with asyncio.timeout(WAIT):
            async for item in client.watch_chunks(task.name, after_sequence=first[-1].sequence):
                if isinstance(item, TaskChunk):
                    rest.append(item)
                else:
                    assert isinstance(item, TaskInfo)
                    states.append(item.state)
        assert [c.sequence for c in rest] == list(range(12, 23))
        assert [c.text for c in rest[:10]] == [f"tok{i} " for i in range(10, 20)]
        assert (rest[-1].kind, rest[-1].artifact, rest[-1].data, rest[-1].last) == (
            "ARTIFACT", "stats", {"words": 20}, True)
        assert states[-1] == "SUCCEEDED"  # the stream ends with the ended task
        assert {c.attempt for c in first + rest} == {1}
        # A watcher after the end gets everything kept, then the end.
        replay = [i async for i in client.watch_chunks(task.name)]
        assert [c.sequence for c in replay if isinstance(c, TaskChunk)] == list(range(1, 23))


async def test_the_sdk_refuses_an_oversized_chunk_and_reports_the_count_limit(
        mesh: Mesh) -> None:
    outcomes: list[str] = []
    agent = Agent("chatty", target=mesh.address)

    @agent.handler("chat")
    async def chat(task: TaskContext) -> int:
        try:
            await task.emit("x" * 5000)
        except ChunkRefusedError as exc:
            outcomes.append(exc.reason)
        sent = 0
        try:
            for _ in range(100):
                await task.emit("y")
                sent += 1
                await asyncio.sleep(0.001)
        except ChunkRefusedError as exc:
            outcomes.append(exc.reason)
        return sent

    async with MeshClient(mesh.address) as client, running(agent):
        task = await client.submit_task("chat", {})
        done = await client.wait_task(task.name, WAIT)
        kept = [c async for c in client.watch_chunks(task.name) if isinstance(c, TaskChunk)]
    assert outcomes == ["CHUNK_TOO_LARGE", "CHUNK_LIMIT"]
    assert len(kept) == 50 and [c.sequence for c in kept] == list(range(1, 51))
    assert done.state == "SUCCEEDED" and done.output >= 50


def _violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    out = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [v.field for v in bad.field_violations]
    return out


async def test_stale_chunks_are_refused_like_stale_results(
        mesh: Mesh, channel: grpc.aio.Channel) -> None:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    agent = RawAgent(channel, "raw-writer", ["write"], concurrency=2)
    await agent.register()
    work = agent.open_work()
    await next_kind(work, "opened")
    sub = (await tasks.SubmitTask(task_pb2.SubmitTaskRequest(
        task=task_pb2.Task(capability="write")))).task
    a = (await next_kind(work, "assignment")).assignment

    def chunk(token: int, text: str) -> task_pb2.TaskChunk:
        return task_pb2.TaskChunk(task=sub.name, fencing_token=token, text=text,
                                  kind=task_pb2.TASK_CHUNK_KIND_TEXT)

    agent.out.put_nowait(task_pb2.ProcessTasksRequest(chunks=task_pb2.TaskChunkBatch(
        chunks=[chunk(a.fencing_token, "ok1"), chunk(a.fencing_token + 7, "forged")])))
    ack = (await next_kind(work, "chunk_ack")).chunk_ack
    assert (ack.fencing_token, ack.outcome) == (a.fencing_token + 7,
                                                task_pb2.TASK_REPORT_OUTCOME_STALE_LEASE)
    # The lease ends (the agent's leases are requeued): its chunks are stale now.
    await mesh.scheduler.release_agent(agent.agent.removeprefix("agents/"))
    b = (await next_kind(work, "assignment")).assignment  # the retry comes back here
    assert b.fencing_token > a.fencing_token
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(chunks=task_pb2.TaskChunkBatch(
        chunks=[chunk(a.fencing_token, "zombie")])))
    ack = (await next_kind(work, "chunk_ack")).chunk_ack
    assert ack.outcome == task_pb2.TASK_REPORT_OUTCOME_STALE_LEASE
    # Outside the stream: ABORTED for a stale lease of a live task ...
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await tasks.AppendTaskChunks(task_pb2.AppendTaskChunksRequest(
            task=sub.name, fencing_token=a.fencing_token, chunks=[chunk(0, "late")]))
    assert (stale.value.code(), reason_of(stale.value)) == (grpc.StatusCode.ABORTED,
                                                            "LEASE_EXPIRED")
    # ... INVALID_ARGUMENT naming the field for a chunk over the size bound ...
    with pytest.raises(grpc.aio.AioRpcError) as big:
        await tasks.AppendTaskChunks(task_pb2.AppendTaskChunksRequest(
            task=sub.name, fencing_token=b.fencing_token,
            chunks=[chunk(0, "fine"), chunk(0, "x" * 5000)]))
    assert (big.value.code(), reason_of(big.value)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                        "CHUNK_TOO_LARGE")
    assert _violations(big.value) == ["chunks[1].text"]
    ok = await tasks.AppendTaskChunks(task_pb2.AppendTaskChunksRequest(
        task=sub.name, fencing_token=b.fencing_token, chunks=[chunk(0, "ok2")]))
    assert [(c.sequence, c.attempt) for c in ok.chunks] == [(2, 2)]
    # ... and FAILED_PRECONDITION once the task has ended.
    agent.out.put_nowait(task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
        task=sub.name, fencing_token=b.fencing_token)))
    watch = tasks.WatchTaskChunks(task_pb2.WatchTaskChunksRequest(name=sub.name))
    got = [r async for r in watch]
    texts = [c.text for r in got for c in r.chunks]
    assert texts == ["ok1", "ok2"]  # nothing refused was kept
    assert got[-1].task.state == task_pb2.TASK_STATE_SUCCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await tasks.AppendTaskChunks(task_pb2.AppendTaskChunksRequest(
            task=sub.name, fencing_token=b.fencing_token, chunks=[chunk(0, "after")]))
    assert (ended.value.code(), reason_of(ended.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "TASK_NOT_RUNNING")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await tasks.WatchTaskChunks(task_pb2.WatchTaskChunksRequest(name="tasks/nope")).read()
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    agent.out.put_nowait(None)
    agent.hb_out.put_nowait(None)


async def test_cli_tasks_watch_chunks_prints_the_stream_and_resumes(
        mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    agent = Agent("cli-writer", target=mesh.address)

    @agent.handler("write")
    async def write(task: TaskContext) -> str:
        for word in ("Hello", ", ", "world"):
            await task.emit(word)
        await task.emit_progress("polishing", 0.9)
        await task.emit("!")
        return "ok"

    async with MeshClient(mesh.address) as client, running(agent):
        task = await client.submit_task("write", {})
        await client.wait_task(task.name, WAIT)
    server = ("--server", mesh.address)
    status, out, err = await cli(capsys, *server, "tasks", "watch", task.id, "--chunks")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert "Hello, world" in lines and "#4  progress 90% polishing" in lines and "!" in lines
    assert "SUCCEEDED" in lines[-1]
    status, out, _ = await cli(capsys, *server, "--json", "tasks", "watch", task.id,
                               "--chunks", "--after", "3")
    items = [json.loads(line) for line in out.splitlines()]
    assert [i["sequence"] for i in items if "sequence" in i] == [4, 5]
    assert items[-1]["state"] == "SUCCEEDED" and status == 0
    status, _, err = await cli(capsys, *server, "tasks", "watch", task.id, "x", "--chunks")
    assert status == 2 and "exactly one task" in err
    for after in ("-3", str(1 << 63)):  # past int64 it was "ValueError: ..." and status 1
        status, _, err = await cli(capsys, *server, "tasks", "watch", task.id, "--chunks",
                                   "--after", after)
        assert status == 2 and "--after must be a sequence number" in err, (after, err)

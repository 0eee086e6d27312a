"""Batches respect the gRPC message limit, both ways.

Six ready tasks of about 1 MB each used to leave the server as one
``assignments`` message of about 6 MB, over the 4 MiB limit: the send failed
and the agent's stream died. The same held for an agent's six 1 MB results
reported together, and for a client's six 1 MB submits batched into one call.
Now every batch is measured and split, a task that passes the submit checks
always fits in an assignment, and a workflow step whose upstream results make
its assignment too large for any message fails (ASSIGNMENT_TOO_LARGE) without
touching the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agentmesh.v1 import common_pb2, task_pb2
from google.protobuf import timestamp_pb2
from pydantic import ValidationError

from agent_sdk import Agent, ChannelConfig, MeshClient, StepSpec, TaskContext, WorkflowSpec
from agent_sdk._agent import MAX_REPORTS, report_batches
from agent_sdk._client import DEFAULT_MAX_MESSAGE_BYTES, _submit_batches
from server.api import convert
from server.api.tasks import ASSIGNMENT_TOO_LARGE, PACK_HEADROOM, _pack_assignments
from server.app import Mesh, running_server
from server.settings import MESSAGE_HEADROOM_BYTES, Settings
from tests.conftest import embedded_settings

WAIT = 60.0
MB = 1_000_000


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    run = asyncio.create_task(agent.run())
    try:
        yield run
    finally:
        await agent.stop(grace=2.0)
        await asyncio.wait_for(run, WAIT)


def _assignment(task_id: str, data: bytes) -> task_pb2.ProcessTasksResponse:
    return task_pb2.ProcessTasksResponse(assignment=task_pb2.TaskAssignment(
        task=task_pb2.Task(name=f"tasks/{task_id}", capability="c",
                           input=common_pb2.Payload(data=data)),
        fencing_token=1))


# -- the pieces ------------------------------------------------------------------------


def test_settings_leave_room_next_to_a_payload() -> None:
    assert Settings().max_payload_bytes + MESSAGE_HEADROOM_BYTES <= Settings().max_message_bytes
    with pytest.raises(ValidationError, match="max_payload_bytes"):
        Settings(max_payload_bytes=4 << 20)
    with pytest.raises(ValidationError, match="max_payload_bytes"):
        Settings(max_message_bytes=1 << 20, max_payload_bytes=1 << 20)
    Settings(max_message_bytes=16 << 20, max_payload_bytes=8 << 20)
    with pytest.raises(ValidationError):
        Settings(max_workflow_steps=convert.MAX_WORKFLOW_STEPS + 1)


def test_a_task_at_every_bound_fits_in_one_assignment() -> None:
    """What the submit checks let through always fits: the headroom is enough."""
    limits = convert.Limits()
    worst = task_pb2.SubmitTaskRequest(
        task_id="t" * 200, request_id="r" * limits.max_request_id_bytes,
        task=task_pb2.Task(
            capability="c" * 128, namespace="n" * 63, priority=-1000,
            labels={f"{i:03d}" + "k" * (limits.max_label_bytes - 3): "v" * limits.max_label_bytes
                    for i in range(limits.max_labels)},
            trace_context={f"{i}" + "k" * (convert.MAX_TRACE_KEY_BYTES - 1):
                           "v" * convert.MAX_TRACE_VALUE_BYTES
                           for i in range(convert.MAX_TRACE_ENTRIES)}))
    meta = {"encoding": b"json/plain"}
    empty = common_pb2.Payload(metadata=meta).ByteSize()
    worst.task.input.CopyFrom(common_pb2.Payload(
        metadata=meta, data=b"x" * (limits.max_payload_bytes - empty - 4)))
    assert worst.task.input.ByteSize() <= limits.max_payload_bytes
    task = convert.task_from_submit(worst, limits, {})
    # The owner label auth adds, and the longest workflow step id and name.
    task = dataclasses.replace(task, labels={**task.labels, "agentmesh.owner": "o" * 256},
                               id="w" * 200 + "-" + "s" * 64, workflow_id="w" * 200,
                               step_id="s" * 64, attempt=100, execution_timeout=1e9)
    message = task_pb2.ProcessTasksResponse(assignment=task_pb2.TaskAssignment(
        task=convert.task_for_agent(task), fencing_token=2**63 - 1,
        lease_expire_time=timestamp_pb2.Timestamp(seconds=2**40, nanos=999_999_999)))
    overhead = message.ByteSize() - worst.task.input.ByteSize()
    assert overhead + PACK_HEADROOM + 8 < MESSAGE_HEADROOM_BYTES, overhead
    packed, refused = _pack_assignments([message], Settings().max_message_bytes)
    assert packed == [message] and refused == []


def test_pack_splits_by_size_and_refuses_what_fits_nowhere() -> None:
    limit = 4 << 20
    ready = [_assignment(f"t{i}", b"x" * MB) for i in range(6)]
    ack = task_pb2.ProcessTasksResponse(ack=task_pb2.TaskReportAck(task="tasks/a"))
    packed, refused = _pack_assignments([*ready[:3], ack, *ready[3:]], limit)
    assert refused == []
    assert all(m.ByteSize() <= limit - PACK_HEADROOM for m in packed)
    names = []
    for m in packed:
        if m.WhichOneof("kind") == "assignments":
            names += [a.task.name for a in m.assignments.assignments]
        elif m.WhichOneof("kind") == "assignment":
            names.append(m.assignment.task.name)
    assert names == [f"tasks/t{i}" for i in range(6)]
    assert ack in packed and len(packed) >= 3  # 6 MB: at least two batches, plus the ack
    # Small ones still travel together.
    small = [_assignment(f"s{i}", b"x") for i in range(50)]
    packed, _ = _pack_assignments(small, limit)
    assert len(packed) == 1 and len(packed[0].assignments.assignments) == 50
    # One that no message can carry is answered as a failure, the rest go out.
    huge = _assignment("huge", b"x" * limit)
    packed, refused = _pack_assignments([huge, small[0]], limit)
    assert packed == [small[0]]
    assert len(refused) == 1
    report = refused[0].failure
    assert report.task == "tasks/huge" and report.fencing_token == 1
    assert report.failure.error_type == ASSIGNMENT_TOO_LARGE and report.failure.non_retryable


def test_sdk_report_and_submit_batches_fit_a_message() -> None:
    results = [task_pb2.TaskResult(task=f"tasks/{i}", fencing_token=1,
                                   output=common_pb2.Payload(data=b"x" * MB)) for i in range(6)]
    failures = [task_pb2.TaskFailureReport(task="tasks/f", fencing_token=1)]
    batches = report_batches(results, failures, DEFAULT_MAX_MESSAGE_BYTES)
    assert len(batches) >= 2
    assert all(b.ByteSize() < DEFAULT_MAX_MESSAGE_BYTES for b in batches)
    assert sum(len(b.reports.results) for b in batches) == 6
    assert sum(len(b.reports.failures) for b in batches) == 1
    many = [task_pb2.TaskResult(task=f"tasks/{i}") for i in range(2500)]
    counted = report_batches(many, [], DEFAULT_MAX_MESSAGE_BYTES)
    assert [len(b.reports.results) for b in counted] == [MAX_REPORTS, MAX_REPORTS, 500]
    assert MAX_REPORTS <= convert.REPEATED_BOUNDS["agentmesh.v1.TaskReportBatch.results"]

    loop = asyncio.new_event_loop()
    try:
        pending = [(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
            capability="c", input=common_pb2.Payload(data=b"x" * MB))), loop.create_future())
            for _ in range(6)]
        split = _submit_batches(pending, DEFAULT_MAX_MESSAGE_BYTES)
        assert [len(b) for b in split] in ([4, 2], [3, 3], [3, 2, 1])
        assert [r for b in split for r, _ in b] == [r for r, _ in pending]
    finally:
        loop.close()


# -- end to end -------------------------------------------------------------------------


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    """Default limits (4 MiB messages, 1 MiB payloads), a 1 s heartbeat."""
    async with running_server(embedded_settings(heartbeat_interval=1.0)) as running_mesh:
        yield running_mesh


async def test_six_1mb_tasks_all_succeed_on_their_first_attempt(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """The testers' case: six ready ~1 MB tasks, one agent, every batch within 4 MiB."""
    caplog.set_level(logging.WARNING)
    big = "x" * MB  # JSON-encoded: 1,000,002 bytes, under the 1 MiB payload limit
    started: list[str] = []
    all_started = asyncio.Event()

    agent = Agent("big-worker", target=mesh.address, max_concurrency=8)

    @agent.handler("big")
    async def handle(task: TaskContext) -> str:
        started.append(task.name)
        if len(started) == 6:
            all_started.set()
        await all_started.wait()  # six ~0.9 MB results finish together: one report burst
        return task.input[:900_000]

    async with MeshClient(mesh.address) as client:
        # Queued before the agent connects: its 8 credits take all six at once.
        tasks = await asyncio.gather(*(client.submit_task("big", big) for _ in range(6)))
        async with running(agent):
            done = await asyncio.wait_for(
                asyncio.gather(*(client.wait_task(t.name) for t in tasks)), WAIT)
            session = agent.agent_name
        assert [t.state for t in done] == ["SUCCEEDED"] * 6
        assert [t.attempt for t in done] == [1] * 6
        for t in tasks:
            info = await client.get_task(t.name)
            assert info.state == "SUCCEEDED" and info.attempt == 1
            assert len(info.output) == 900_000
        assert await client.list_tasks(state="DEAD_LETTERED") == []
    assert sorted(started) == sorted(t.name for t in tasks)  # each delivered once
    assert session == agent.agent_name  # one session: the stream never broke
    lost = [r.getMessage() for r in caplog.records if "session lost" in r.getMessage()]
    assert lost == []


async def test_a_step_whose_upstream_results_fit_no_message_fails_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    """Small limits (256 KiB messages, 128 KiB payloads), configured on both sides."""
    caplog.set_level(logging.WARNING)
    limit = 256 << 10
    settings = embedded_settings(heartbeat_interval=1.0, max_message_bytes=limit,
                                 max_payload_bytes=128 << 10)
    channel = ChannelConfig(max_message_bytes=limit)
    async with running_server(settings) as mesh, \
            MeshClient(mesh.address, channel=channel) as client:
        agent = Agent("fan-in", target=mesh.address, max_concurrency=4, channel=channel)
        joined: list[Any] = []

        @agent.handler("part")
        async def part(task: TaskContext) -> str:
            return "p" * 100_000

        @agent.handler("join")
        async def join(task: TaskContext) -> int:
            joined.append(task.name)
            return len(task.upstream)

        @agent.handler("small")
        async def small(task: TaskContext) -> str:
            return "ok"

        spec = WorkflowSpec("fan-in", (
            StepSpec("a", "part"), StepSpec("b", "part"), StepSpec("c", "part"),
            StepSpec("j", "join", depends_on=("a", "b", "c"))))
        async with running(agent):
            submitted = await client.submit_workflow(spec)
            wf_id = submitted.name.removeprefix("workflows/")

            async def ended() -> bool:
                wf, _ = await mesh.scheduler.get_workflow(wf_id)
                return wf.state.name != "RUNNING"

            async with asyncio.timeout(WAIT):
                while True:
                    if await ended():
                        break
                    await asyncio.sleep(0.05)
            wf, steps = await mesh.scheduler.get_workflow(wf_id)
            assert wf.state.name == "FAILED"
            assert ASSIGNMENT_TOO_LARGE in wf.failure_reason
            failed = steps["j"]
            assert failed.state.name == "FAILED" and failed.attempt == 1
            assert failed.failure is not None
            assert failed.failure.error_type == ASSIGNMENT_TOO_LARGE
            assert failed.failure.non_retryable
            assert {s: steps[s].state.name for s in "abc"} == dict.fromkeys("abc", "SUCCEEDED")
            # The same session carries on.
            session = agent.agent_name
            assert await asyncio.wait_for(client.run_task("small", None), WAIT) == "ok"
            assert agent.agent_name == session
        assert joined == []
    assert [r for r in caplog.records if "session lost" in r.getMessage()] == []

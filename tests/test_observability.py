"""Metrics a running mesh really records: gRPC calls, periodic gauges, bus counters, logs.

Real parts: an embedded mesh on a free port, a real `agent_sdk.Agent` and
`MeshClient`, the real interceptor chain. Values are read from the mesh's
`MeshMetrics` registry (the live Prometheus round trip is
tests/test_prometheus_live.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import structlog
from agentmesh.v1 import task_pb2, task_pb2_grpc

from agent_sdk import Agent, MeshClient, TaskContext
from server.app import Mesh, running_server
from server.observability.bus import MeteredBus, subject_kind
from server.observability.logging import configure_logging
from tests.conftest import embedded_settings

GET_TASK = "/agentmesh.v1.TaskService/GetTask"
SUBMIT = "/agentmesh.v1.TaskService/SubmitTask"
WATCH = "/agentmesh.v1.TaskService/WatchTasks"


@pytest.fixture
async def fast_mesh() -> AsyncIterator[Mesh]:
    """An embedded mesh refreshing its gauges every 50 ms."""
    async with running_server(embedded_settings(gauge_interval=0.05)) as running:
        yield running


async def _eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a metric until ``check`` holds: gauges are refreshed on a timer, not an event."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - polling a registry; nothing to await
            await asyncio.sleep(0.02)


def _value(mesh: Mesh, name: str, labels: dict[str, str]) -> float | None:
    return mesh.metrics.registry.get_sample_value(name, labels)


async def test_grpc_metrics_unary_errors_and_streams(fast_mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(fast_mesh.address) as ch:
        stub = task_pb2_grpc.TaskServiceStub(ch)
        await stub.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="x")))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetTask(task_pb2.GetTaskRequest(name="tasks/missing"))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        call = stub.WatchTasks(task_pb2.WatchTasksRequest())
        first = asyncio.ensure_future(call.read())
        while not first.done():  # until the watch is live and has seen a change
            await stub.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="y")))
            await asyncio.wait([first], timeout=0.05)
        await first
        call.cancel()  # mid-stream: the server side ends CANCELLED
        unknown = ch.unary_unary("/agentmesh.v1.TaskService/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await unknown(b"")
        assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED

    ok = {"method": SUBMIT, "code": "OK"}
    submits = _value(fast_mesh, "agentmesh_grpc_requests_total", ok)
    assert submits is not None and submits >= 2
    assert _value(fast_mesh, "agentmesh_grpc_requests_total",
                  {"method": GET_TASK, "code": "NOT_FOUND"}) == 1
    assert _value(fast_mesh, "agentmesh_grpc_request_duration_seconds_count",
                  {"method": SUBMIT}) == submits
    await _eventually(lambda: _value(fast_mesh, "agentmesh_grpc_request_duration_seconds_count",
                                     {"method": WATCH}) == 1)
    assert _value(fast_mesh, "agentmesh_grpc_requests_total",
                  {"method": WATCH, "code": "CANCELLED"}) == 1
    methods = {s.labels["method"] for f in fast_mesh.metrics.registry.collect()
               if f.name == "agentmesh_grpc_requests" for s in f.samples}
    assert not any("NoSuchMethod" in m for m in methods)


async def test_gauges_agents_in_flight_queue_and_autonomy(fast_mesh: Mesh) -> None:
    agent = Agent("gauge-agent", target=fast_mesh.address, max_concurrency=4)
    release = asyncio.Event()
    started = asyncio.Event()

    @agent.handler("slow")
    async def slow(task: TaskContext) -> object:
        started.set()
        await release.wait()
        return task.input

    run = asyncio.create_task(agent.run())
    try:
        async with MeshClient(fast_mesh.address) as client:
            await _eventually(lambda: _value(fast_mesh, "agentmesh_agents",
                                             {"namespace": "default", "state": "active"}) == 1)
            assert _value(fast_mesh, "agentmesh_capability_agents",
                          {"namespace": "default", "capability": "slow"}) == 1
            first = await client.submit_task("slow", 1)
            await client.submit_task("nobody-serves-this", 2)
            await started.wait()
            await _eventually(lambda: _value(
                fast_mesh, "agentmesh_queue_depth",
                {"namespace": "default", "capability": "slow", "state": "running"}) == 1)
            assert _value(fast_mesh, "agentmesh_queue_depth",
                          {"namespace": "default", "capability": "nobody-serves-this",
                           "state": "queued"}) == 1
            await _eventually(lambda: _value(fast_mesh, "agentmesh_agent_in_flight",
                                             {"agent": "gauge-agent"}) == 1)
            release.set()
            await client.wait_task(first.name, timeout=5)
            await _eventually(lambda: _value(
                fast_mesh, "agentmesh_queue_depth",
                {"namespace": "default", "capability": "slow", "state": "running"}) == 0)
            assert _value(fast_mesh, "agentmesh_autonomy_ratio", {"namespace": "default"}) == 1
            assert _value(fast_mesh, "agentmesh_tasks_finished_total", {
                "namespace": "default", "capability": "slow", "outcome": "succeeded"}) == 1
            assert _value(fast_mesh, "agentmesh_task_dispatch_latency_seconds_count",
                          {"capability": "slow"}) == 1
    finally:
        await agent.stop(grace=1.0)
        await run
    # The agent left: its in-flight series goes, its capability reads 0.
    await _eventually(lambda: _value(fast_mesh, "agentmesh_agent_in_flight",
                                     {"agent": "gauge-agent"}) is None)
    await _eventually(lambda: _value(fast_mesh, "agentmesh_capability_agents",
                                     {"namespace": "default", "capability": "slow"}) == 0)


async def test_bus_counters(fast_mesh: Mesh) -> None:
    async with MeshClient(fast_mesh.address) as client:
        await client.submit_task("x", None)
    published = _value(fast_mesh, "agentmesh_bus_messages_published_total", {"kind": "task"})
    assert published is not None and published >= 1
    await _eventually(lambda: (_value(fast_mesh, "agentmesh_bus_messages_delivered_total",
                                      {"kind": "ready"}) or 0) >= 1)
    assert subject_kind("_sys.task.default.live.2") == "task"
    assert subject_kind("default.chat") == "user"
    assert subject_kind("_sys.weird") == "system"


async def test_metered_bus_injects_traceparent_only_inside_a_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415

    seen: list[dict[str, str]] = []

    class Recorder:
        async def publish(self, subject: str, data: bytes,
                          headers: dict[str, str] | None = None) -> None:
            seen.append(dict(headers or {}))

    from server.observability.metrics import MeshMetrics  # noqa: PLC0415

    bus = MeteredBus(Recorder(), MeshMetrics(), inject_trace=True)  # type: ignore[arg-type]
    await bus.publish("ns.default.x", b"", None)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("outer"):
        await bus.publish("ns.default.x", b"", {"k": "v"})
    assert seen[0] == {}
    assert seen[1]["k"] == "v"
    assert seen[1]["traceparent"].startswith("00-")


@pytest.fixture
def json_log() -> Any:
    """configure_logging("json") into a StringIO; restores logging afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    try:
        yield stream
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


async def test_handler_logs_carry_task_ids(fast_mesh: Mesh, json_log: io.StringIO) -> None:
    agent = Agent("logging-agent", target=fast_mesh.address)

    @agent.handler("talk")
    async def talk(task: TaskContext) -> object:
        logging.getLogger("handler").info("working on it")
        return None

    run = asyncio.create_task(agent.run())
    try:
        async with MeshClient(fast_mesh.address) as client:
            wf = await client.submit_workflow(
                {"name": "logs", "steps": [{"id": "only", "capability": "talk"}]})
            await client.wait_workflow(wf.name, timeout=5)
    finally:
        await agent.stop(grace=1.0)
        await run
    records = [json.loads(line) for line in json_log.getvalue().splitlines() if line.strip()]
    working = [r for r in records if r["message"] == "working on it"]
    assert len(working) == 1
    rec = working[0]
    assert rec["workflow_id"] == wf.id
    assert rec["task_id"] == f"{wf.id}-only"
    assert rec["agent_id"]
    assert rec["logger"] == "handler"
    assert rec["level"] == "info"
    assert "trace_id" not in rec  # tracing is off: no ids invented

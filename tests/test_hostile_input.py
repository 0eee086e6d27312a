"""Hostile input never reaches INTERNAL: forged page tokens and lists past their bounds.

Raw generated stubs against a live embedded mesh. A page token's fingerprint is
a plain hash of the filter, so anyone can forge one: every paginated RPC must
answer a forged token whose cursor is of the wrong type, out of range or too
long with INVALID_ARGUMENT on ``page_token``. Every repeated and map field of
every request, at any depth, has a bound; one entry past it is
INVALID_ARGUMENT with a BadRequest violation naming the field.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)
from google.protobuf import descriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from server.api import convert
from server.app import Mesh, running_server
from tests._rpcs import ALL_RPCS, Rpc
from tests.conftest import embedded_settings

FD = descriptor.FieldDescriptor
IA = grpc.StatusCode.INVALID_ARGUMENT
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    """A mesh with a snapshot directory of its own (ListSnapshots pages too)."""
    async with running_server(embedded_settings(blob=str(tmp_path / "snapshots"),
                                                heartbeat_interval=5.0)) as running:
        yield running


def failure(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, list[str]]:
    """The code and the BadRequest violation fields of a failed call."""
    status = rpc_status.from_call(err)
    fields: list[str] = []
    for detail in status.details if status else ():
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            fields += [v.field for v in br.field_violations]
    return err.code(), fields


async def outcome(call: Awaitable[Any]) -> tuple[grpc.StatusCode, list[str]]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return failure(err)
    return grpc.StatusCode.OK, []


# -- page tokens -----------------------------------------------------------------------

ListCall = Callable[[grpc.aio.Channel, str], Awaitable[Any]]


def _lists() -> dict[str, tuple[ListCall, convert.Cursor]]:
    def tasks(ch: grpc.aio.Channel, token: str) -> Awaitable[Any]:
        return task_pb2_grpc.TaskServiceStub(ch).ListTasks(
            task_pb2.ListTasksRequest(page_size=1, page_token=token))

    def workflows(ch: grpc.aio.Channel, token: str) -> Awaitable[Any]:
        return task_pb2_grpc.TaskServiceStub(ch).ListWorkflows(
            task_pb2.ListWorkflowsRequest(page_size=1, page_token=token))

    def agents(ch: grpc.aio.Channel, token: str) -> Awaitable[Any]:
        return discovery_pb2_grpc.DiscoveryServiceStub(ch).ListAgents(
            discovery_pb2.ListAgentsRequest(page_size=1, page_token=token))

    def state(ch: grpc.aio.Channel, token: str) -> Awaitable[Any]:
        return state_pb2_grpc.StateServiceStub(ch).List(
            state_pb2.ListRequest(page_size=1, page_token=token))

    def snapshots(ch: grpc.aio.Channel, token: str) -> Awaitable[Any]:
        return state_pb2_grpc.StateServiceStub(ch).ListSnapshots(
            state_pb2.ListSnapshotsRequest(page_size=1, page_token=token))

    return {"TaskService.ListTasks": (tasks, convert.Cursor.SEQ),
            "TaskService.ListWorkflows": (workflows, convert.Cursor.SEQ),
            "DiscoveryService.ListAgents": (agents, convert.Cursor.ID),
            "StateService.List": (state, convert.Cursor.KEY),
            "StateService.ListSnapshots": (snapshots, convert.Cursor.KEY)}


LISTS = _lists()


def test_every_paginated_rpc_is_covered() -> None:
    paginated = {rpc.name for rpc in ALL_RPCS
                 if "page_token" in rpc.method.input_type.fields_by_name}
    assert paginated == set(LISTS)


async def _seed(ch: grpc.aio.Channel) -> None:
    """Two of everything, so each list hands out a real next_page_token."""
    t = task_pb2_grpc.TaskServiceStub(ch)
    d = discovery_pb2_grpc.DiscoveryServiceStub(ch)
    s = state_pb2_grpc.StateServiceStub(ch)
    for i in range(2):
        await t.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="seed")))
        await t.SubmitWorkflow(task_pb2.SubmitWorkflowRequest(workflow=task_pb2.Workflow(
            steps=[task_pb2.WorkflowStep(id="a", capability="seed")])))
        await d.RegisterAgent(discovery_pb2.RegisterAgentRequest(agent=discovery_pb2.Agent(
            display_name=f"seed-{i}", max_concurrency=1,
            capabilities=[discovery_pb2.Capability(name="seed")])))
        await s.Put(state_pb2.PutRequest(key=f"seed/{i}"))
        await s.CreateSnapshot(state_pb2.CreateSnapshotRequest())


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _forge(cursor: Any, fingerprint: str) -> str:
    return _raw(json.dumps({"c": cursor, "f": fingerprint}))


BAD_FOR_EVERY_KIND: list[Any] = [
    -1, 1.5, [1], {"a": {"b": 1}}, True, None, "9" * 5000, 2**63, 10**400, "x" * 2000]
BAD_FOR_KIND: dict[convert.Cursor, list[Any]] = {
    convert.Cursor.SEQ: ["abc", "12", "", False],
    convert.Cursor.ID: ["../x", "a b", "é", "\x00"],
    convert.Cursor.KEY: ["bad\x00key", "\ud800", "é" * 600],
}


def _garbage(fingerprint: str) -> Iterator[tuple[str, str]]:
    """Tokens that are not tokens at all, whatever the list."""
    yield "garbage base64", "!!!not base64!!!"
    yield "not JSON", _raw("plain text")
    yield "a JSON list", _raw("[1, 2]")
    yield "a JSON string", _raw('"c"')
    yield "no fingerprint", _raw(json.dumps({"c": 1}))
    yield "extra keys", _raw(json.dumps({"c": 1, "f": fingerprint, "x": 2}))
    yield "fingerprint a list", _raw(json.dumps({"c": 1, "f": [fingerprint]}))
    yield "wrong filter", _forge(1, "0" * 16)
    yield "5000-digit JSON int", _raw('{"c": ' + "9" * 5000 + f', "f": "{fingerprint}"}}')
    yield "nested 5000 deep", _raw("[" * 5000 + "]" * 5000)
    yield "NaN", _raw(f'{{"c": NaN, "f": "{fingerprint}"}}')
    yield "huge token", "A" * 100_000
    yield "non-ASCII token", "é" * 10


async def test_forged_page_tokens_are_invalid_argument(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as ch:
        await _seed(ch)
        answers: dict[str, tuple[grpc.StatusCode, list[str]]] = {}
        for name, (call, kind) in LISTS.items():
            first = await call(ch, "")
            assert first.next_page_token, name
            fingerprint = json.loads(base64.urlsafe_b64decode(
                first.next_page_token + "=" * (-len(first.next_page_token) % 4)))["f"]
            # A real token still pages.
            assert (await outcome(call(ch, first.next_page_token)))[0] == grpc.StatusCode.OK
            cases = [(repr(c)[:30], _forge(c, fingerprint))
                     for c in BAD_FOR_EVERY_KIND + BAD_FOR_KIND[kind]]
            for label, token in [*cases, *_garbage(fingerprint)]:
                answers[f"{name}: {label}"] = await outcome(call(ch, token))
        assert {k: v for k, v in answers.items() if v != (IA, ["page_token"])} == {}
        await _still_serving(ch)


async def test_a_forged_cursor_of_the_right_kind_is_only_a_position(mesh: Mesh) -> None:
    """Validation, not authentication: an in-range cursor pages like a real one."""
    async with grpc.aio.insecure_channel(mesh.address) as ch:
        await _seed(ch)
        call, _ = LISTS["TaskService.ListTasks"]
        first = await call(ch, "")
        fingerprint = json.loads(base64.urlsafe_b64decode(
            first.next_page_token + "=" * (-len(first.next_page_token) % 4)))["f"]
        for cursor in (0, 1, 2**63 - 1):
            code, _ = await outcome(call(ch, _forge(cursor, fingerprint)))
            assert code == grpc.StatusCode.OK, cursor


# -- bounded lists and maps ----------------------------------------------------------


def _paths(desc: descriptor.Descriptor, prefix: str = "", depth: int = 0,
           ) -> Iterator[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every repeated or map field reachable from ``desc``: (path, steps to get there).

    A step is (field name, how): "msg" for a singular message, "add" for the
    first element of a repeated message, "key" for the entry "k" of a map of
    messages.
    """
    if depth > 6:
        return
    for f in desc.fields:
        sub = f.message_type
        is_map = sub is not None and sub.GetOptions().map_entry
        if f.is_repeated:
            yield prefix + f.name, ((f.name, "end"),)
        if sub is None:
            continue
        if is_map:
            value = sub.fields_by_name["value"].message_type
            if value is not None:
                for path, steps in _paths(value, f"{prefix}{f.name}['k'].", depth + 1):
                    yield path, ((f.name, "key"), *steps)
        elif f.is_repeated:
            for path, steps in _paths(sub, f"{prefix}{f.name}[0].", depth + 1):
                yield path, ((f.name, "add"), *steps)
        else:
            for path, steps in _paths(sub, f"{prefix}{f.name}.", depth + 1):
                yield path, ((f.name, "msg"), *steps)


def _overfill(msg: Message, name: str, count: int) -> None:
    f = msg.DESCRIPTOR.fields_by_name[name]
    target = getattr(msg, name)
    sub = f.message_type
    if sub is not None and sub.GetOptions().map_entry:
        key_f = sub.fields_by_name["key"]
        value_f = sub.fields_by_name["value"]
        for i in range(count):
            key: Any = f"k{i}" if key_f.type == FD.TYPE_STRING else i
            if value_f.message_type is not None:
                target[key].SetInParent()
            elif value_f.type == FD.TYPE_STRING:
                target[key] = "v"
            elif value_f.type == FD.TYPE_BYTES:
                target[key] = b"v"
            else:
                target[key] = 1
    elif sub is not None:
        for _ in range(count):
            target.add()
    elif f.type == FD.TYPE_STRING:
        target.extend([f"x{i}" for i in range(count)])
    elif f.type == FD.TYPE_ENUM:
        target.extend([1] * count)
    else:
        target.extend(range(count))


def over_bound(rpc: Rpc, steps: tuple[tuple[str, str], ...], full_name: str) -> Message:
    """A request of ``rpc`` with one entry more than the bound at the end of ``steps``."""
    msg = rpc.request_class()()
    node: Message = msg
    for name, how in steps:
        if how == "end":
            _overfill(node, name, convert.REPEATED_BOUNDS[full_name] + 1)
        elif how == "msg":
            getattr(node, name).SetInParent()
            node = getattr(node, name)
        elif how == "add":
            node = getattr(node, name).add()
        else:
            node = getattr(node, name)["k"]
    return msg


def _full_name(rpc: Rpc, steps: tuple[tuple[str, str], ...]) -> str:
    desc = rpc.method.input_type
    for name, how in steps:
        f = desc.fields_by_name[name]
        if how == "end":
            return str(f.full_name)
        sub = f.message_type
        assert sub is not None
        desc = sub.fields_by_name["value"].message_type if how == "key" else sub
    raise AssertionError(steps)


CASES = [(rpc, path, steps) for rpc in ALL_RPCS
         for path, steps in _paths(rpc.method.input_type)]


def test_every_reachable_list_has_its_own_bound() -> None:
    """A new repeated field in a request proto needs a bound in REPEATED_BOUNDS."""
    reachable = {_full_name(rpc, steps) for rpc, _, steps in CASES}
    assert reachable - set(convert.REPEATED_BOUNDS) == set()
    assert set(convert.REPEATED_BOUNDS) - reachable == set()


async def _answer(ch: grpc.aio.Channel, rpc: Rpc,
                  request: Message) -> tuple[grpc.StatusCode, list[str]]:
    body = request.SerializeToString()
    assert len(body) < 4 << 20
    if not rpc.client_streaming and not rpc.server_streaming:
        return await outcome(ch.unary_unary(rpc.path)(body, timeout=5))

    async def drain(call: Any) -> None:
        async for _ in call:
            pass

    if not rpc.client_streaming:
        return await outcome(drain(ch.unary_stream(rpc.path)(body, timeout=5)))

    async def one() -> AsyncIterator[bytes]:
        yield body

    return await outcome(drain(ch.stream_stream(rpc.path)(one(), timeout=5)))


async def test_lists_past_their_bound_are_invalid_argument(mesh: Mesh) -> None:
    assert len(CASES) > 30
    async with grpc.aio.insecure_channel(mesh.address) as ch:
        wrong = {}
        for rpc, path, steps in CASES:
            request = over_bound(rpc, steps, _full_name(rpc, steps))
            answer = await _answer(ch, rpc, request)
            if answer != (IA, [path]):
                wrong[f"{rpc.name} {path}"] = answer
        assert wrong == {}
        await _still_serving(ch)


async def test_trace_context_is_bounded(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as ch:
        t = task_pb2_grpc.TaskServiceStub(ch)

        def submit(trace: dict[str, str], **kw: Any) -> Awaitable[Any]:
            return t.SubmitTask(task_pb2.SubmitTaskRequest(
                task=task_pb2.Task(capability="c", trace_context=trace)), **kw)

        # The tester's case: 10,000 entries (1.1 MB) were stored and sent to agents.
        huge = {f"key-{i:05d}": "v" * 100 for i in range(10_000)}
        assert await outcome(submit(huge)) == (IA, ["task.trace_context"])
        assert await outcome(submit({"tracestate": "x" * 2000})) == (
            IA, ["task.trace_context['tracestate']"])
        assert await outcome(submit({"": "x"})) == (IA, ["task.trace_context"])
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ok = await submit({"traceparent": parent, "tracestate": "a=b"})
        stored = await t.GetTask(task_pb2.GetTaskRequest(name=ok.task.name))
        assert dict(stored.task.trace_context) == {"traceparent": parent, "tracestate": "a=b"}
        # The call's own (metadata) context: an oversized entry is dropped, not fatal.
        ok = await submit({}, metadata=(("traceparent", parent), ("tracestate", "x" * 5000)))
        stored = await t.GetTask(task_pb2.GetTaskRequest(name=ok.task.name))
        assert dict(stored.task.trace_context) == {"traceparent": parent}


async def test_entry_sizes_are_bounded_and_errors_stay_small(mesh: Mesh) -> None:
    """Past 8 KiB of trailers a client reads RESOURCE_EXHAUSTED, not the error."""
    async with grpc.aio.insecure_channel(mesh.address) as ch:
        t = task_pb2_grpc.TaskServiceStub(ch)
        code, fields = await outcome(t.SubmitTask(task_pb2.SubmitTaskRequest(
            task=task_pb2.Task(capability="c", labels={"k" * 100_000: "v"}))))
        assert code == IA and len(fields) == 1 and fields[0].startswith("task.labels['kkk")
        assert len(fields[0]) < 128
        code, fields = await outcome(t.SubmitTask(task_pb2.SubmitTaskRequest(
            task=task_pb2.Task(capability="c", input=common_pb2.Payload(
                metadata={"m" * 1000: b"v"})))))
        assert code == IA and fields[0].startswith("task.input.metadata['mmm")
        code, fields = await outcome(t.SubmitTask(task_pb2.SubmitTaskRequest(
            task=task_pb2.Task(capability="c", input=common_pb2.Payload(
                metadata={"bad\x01key": b"v"})))))
        assert code == IA and fields[0].startswith("task.input.metadata[")
        # Thousands of violations (unknown dependencies): the first few, still IA.
        steps = [task_pb2.WorkflowStep(id=f"s{i}", capability="c",
                                       depends_on=[f"x{j}" for j in range(100)])
                 for i in range(500)]
        code, fields = await outcome(t.SubmitWorkflow(task_pb2.SubmitWorkflowRequest(
            workflow=task_pb2.Workflow(steps=steps))))
        assert code == IA and 1 <= len(fields) <= 10
        await _still_serving(ch)


async def _still_serving(ch: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(ch)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    t = task_pb2_grpc.TaskServiceStub(ch)
    ok = await t.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="c")))
    assert ok.task.name

"""Steps that wait for a person: approve, reject, supply input, time out; audit and roles.

A workflow's ``human`` step pauses RUNNING at the desk (``awaiting_human``),
is announced on the bus, and goes on when a person decides through the SDK,
the CLI or A2A; a timeout dead-letters and escalates it; every decision is
audited; with auth on only clients and admins of the namespace decide; a
human step never counts as autonomous.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.types import a2a_pb2
from agentmesh.v1 import common_pb2, discovery_pb2, discovery_pb2_grpc, task_pb2, task_pb2_grpc

from agent_sdk import Agent, MeshClient, TaskContext
from agent_sdk.errors import FailedPreconditionError, InvalidArgumentError
from server.app import Mesh, running_server
from server.console.access import CSRF_HEADER
from tests._rpcs import bearer
from tests._services import free_port
from tests.conftest import embedded_settings
from tests.test_auth import TOKENS, write_auth_file
from tests.test_cli import cli
from tests.test_liveness import reason_of
from tests.test_sdk_agent import running, until

WAIT = 30.0
ACT = {CSRF_HEADER: "1"}


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with running_server(embedded_settings(heartbeat_interval=1.0)) as m:
        yield m


def team(mesh: Mesh) -> tuple[Agent, list[Any]]:
    """A writer that streams its draft and a publisher that reads the review."""
    seen: list[Any] = []
    agent = Agent("team", target=mesh.address)

    @agent.handler("write")
    async def write(task: TaskContext) -> str:
        for word in ("A", " short", " draft"):
            await task.emit(word)
        return "A short draft"

    @agent.handler("publish")
    async def publish(task: TaskContext) -> str:
        seen.append(task.upstream)
        return "published"

    return agent, seen


SPEC = {"name": "reviewed", "steps": [
    {"id": "draft", "capability": "write"},
    {"id": "review", "capability": "human", "depends_on": ["draft"],
     "input": {"prompt": "Publish this draft?"}},
    {"id": "publish", "capability": "publish", "depends_on": ["review"]}]}


async def waiting(client: MeshClient, task: str) -> None:
    async def check() -> bool:
        return (await client.get_task(task)).awaiting_human

    await until(check, f"{task} waits for a person")


async def test_a_step_waits_for_approval_then_the_workflow_goes_on(mesh: Mesh) -> None:
    agent, seen = team(mesh)
    async with MeshClient(mesh.address) as client, running(agent):
        requests = client.subscribe("approvals.>")
        first = asyncio.ensure_future(anext(requests))
        await asyncio.sleep(0)
        wf = await client.submit_workflow(SPEC)
        review = f"tasks/{wf.id}-review"
        await waiting(client, review)
        note = await asyncio.wait_for(first, WAIT)
        body = note.value
        assert note.subject == "approvals.requested" and body["task"] == review
        assert body["input"] == {"prompt": "Publish this draft?"} and body["upstream"] == ["draft"]
        task = await client.get_task(review)
        assert (task.state, task.awaiting_human, task.agent) == (
            "RUNNING", True, "agents/human-desk-default")
        assert [t.name for t in await client.list_approvals()] == [review]
        done = await client.approve(review, comment="ship it", approver="alice")
        assert done.state == "SUCCEEDED" and not done.awaiting_human
        assert (done.output["decision"], done.output["by"], done.output["comment"]) == (
            "approve", "alice", "ship it")
        finished = await client.wait_workflow(wf.name, timeout=WAIT)
        assert finished.state == "SUCCEEDED"
        assert seen[0]["review"]["decision"] == "approve"
        audit = await client.get_state(f"_approvals/{wf.id}-review")
        assert audit is not None and audit.value["by"] == "alice" and audit.value["time"] > 0
        decided = (await asyncio.wait_for(anext(requests), WAIT)).value
        assert (decided["decision"], decided["by"]) == ("approve", "alice")
        with pytest.raises(FailedPreconditionError) as again:
            await client.approve(review, approver="bob")
        assert again.value.reason == "NOT_AWAITING_HUMAN"
        # the human step is human action: 2 of the 3 ended tasks were autonomous
        stats = await client.stats()
        assert (stats.tasks_ended, stats.tasks_succeeded_autonomously) == (3, 2)
        await requests.aclose()  # type: ignore[attr-defined]


async def test_reject_fails_the_workflow_and_cancels_what_follows(mesh: Mesh) -> None:
    agent, seen = team(mesh)
    async with MeshClient(mesh.address) as client, running(agent):
        wf = await client.submit_workflow(SPEC)
        review = f"tasks/{wf.id}-review"
        await waiting(client, review)
        rejected = await client.reject(review, comment="too short", approver="carol")
        assert rejected.state == "FAILED" and rejected.failure is not None
        assert rejected.failure.error_type == "REJECTED" and "carol" in rejected.failure.message
        ended = await client.wait_workflow(wf.name, timeout=WAIT)
        assert ended.state == "FAILED" and "review" in ended.failure_reason
        assert (await client.get_task(f"tasks/{wf.id}-publish")).state == "CANCELLED"
        assert not seen


async def test_a_timeout_dead_letters_and_escalates_then_input_answers(tmp_path: Path) -> None:
    async with running_server(embedded_settings(approval_timeout=0.3)) as mesh, \
            MeshClient(mesh.address) as client:
        notes = client.subscribe("approvals.escalated")
        first = asyncio.ensure_future(anext(notes))
        await asyncio.sleep(0)
        task = await client.submit_task("human", {"question": "Which title?"})

        async def dead() -> bool:
            return (await client.get_task(task.name)).state == "DEAD_LETTERED"

        await until(dead, "the unanswered task is dead-lettered")
        escalated = (await asyncio.wait_for(first, WAIT)).value
        assert escalated["task"] == task.name
        with pytest.raises(FailedPreconditionError):
            await client.supply_input(task.name, "late")
        await client.retry_task(task.name)  # a person asks again
        await waiting(client, task.name)
        with pytest.raises(InvalidArgumentError):
            await client.supply_input(task.name, "x", comment="c" * 2000)
        # Python's json writes NaN and Infinity; the decision record is JSON that any
        # language reads, so they are refused (they were kept, and read back as NaN)
        for odd in ({"score": float("nan")}, [float("inf")]):
            with pytest.raises(InvalidArgumentError, match="not JSON"):
                await client.supply_input(task.name, odd)
        # JSON nested past the parser's depth (200 kB) was INTERNAL
        deep = b"[" * 100_000 + b"]" * 100_000
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as too_deep:
                await task_pb2_grpc.TaskServiceStub(channel).ResolveHumanTask(
                    task_pb2.ResolveHumanTaskRequest(
                        name=task.name, decision=task_pb2.HUMAN_DECISION_SUPPLY_INPUT,
                        input=common_pb2.Payload(data=deep,
                                                 metadata={"encoding": b"json/plain"})))
        assert too_deep.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        answered = await client.supply_input(task.name, {"title": "Agents at work"},
                                             approver="dana")
        assert answered.state == "SUCCEEDED"
        assert answered.output["input"] == {"title": "Agents at work"}
        await notes.aclose()  # type: ignore[attr-defined]


async def test_roles_bound_who_decides_and_the_audit_names_the_principal(
        tmp_path: Path) -> None:
    settings = embedded_settings(auth_file=str(write_auth_file(tmp_path / "tokens.yaml")),
                                 blob=str(tmp_path / "snapshots"))
    async with running_server(settings) as mesh, \
            grpc.aio.insecure_channel(mesh.address) as ch:
        tasks = task_pb2_grpc.TaskServiceStub(ch)
        sub = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
            capability="human", namespace="team-a")), metadata=bearer(TOKENS["alice"]))
        name = sub.task.name

        async def at_desk() -> bool:
            got = await tasks.GetTask(task_pb2.GetTaskRequest(name=name),
                                      metadata=bearer(TOKENS["alice"]))
            return got.task.awaiting_human

        await until(at_desk, "the task waits for a person")
        req = task_pb2.ResolveHumanTaskRequest(name=name, approver="mallory",
                                               decision=task_pb2.HUMAN_DECISION_APPROVE)
        with pytest.raises(grpc.aio.AioRpcError) as agent:
            await tasks.ResolveHumanTask(req, metadata=bearer(TOKENS["agent-a"]))
        assert agent.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await tasks.ResolveHumanTask(req, metadata=bearer(TOKENS["bob"]))
        assert other.value.code() == grpc.StatusCode.NOT_FOUND  # team-b sees nothing of it
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await tasks.ResolveHumanTask(task_pb2.ResolveHumanTaskRequest(name=name),
                                         metadata=bearer(TOKENS["carol"]))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        done = await tasks.ResolveHumanTask(req, metadata=bearer(TOKENS["carol"]))
        assert done.task.state == task_pb2.TASK_STATE_SUCCEEDED
        assert json.loads(done.task.output.data)["by"] == "carol"  # not the claimed approver
        assert json.loads(done.task.output.data)["role"] == "client"
        # nobody may register as the desk's capability
        disc = discovery_pb2_grpc.DiscoveryServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as reserved:
            await disc.RegisterAgent(discovery_pb2.RegisterAgentRequest(agent=discovery_pb2.Agent(
                display_name="impostor", max_concurrency=1, namespace="team-a",
                capabilities=[discovery_pb2.Capability(name="human")])),
                metadata=bearer(TOKENS["agent-a"]))
        assert reserved.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reserved" in (reserved.value.details() or "")
        assert reason_of(reserved.value) == "INVALID_ARGUMENT"


async def test_cli_and_a2a_answer_a_waiting_task(
        capsys: pytest.CaptureFixture[str]) -> None:
    async with running_server(embedded_settings(a2a_port=free_port())) as mesh, \
            MeshClient(mesh.address) as client:
        first = await client.submit_task("human", {"prompt": "ok?"})
        await waiting(client, first.name)
        server = ("--server", mesh.address)
        status, out, _ = await cli(capsys, *server, "approvals", "list")
        assert status == 0 and first.id in out
        status, out, _ = await cli(capsys, *server, "approvals", "approve", first.id,
                                   "--comment", "fine", "--as", "erin")
        assert (status, out.strip()) == (0, f"task {first.id} SUCCEEDED")
        assert (await client.get_task(first.name)).output["by"] == "erin"
        status, _, err = await cli(capsys, *server, "approvals", "reject", first.id)
        assert status == 1 and "does not wait for a person" in err and len(err.splitlines()) == 1
        # A2A: a human task is input-required; a reply message answers it
        async with httpx.AsyncClient(timeout=WAIT) as http:
            a2a = await create_client(mesh.a2a_url, client_config=ClientConfig(
                streaming=False, httpx_client=http))
            meta = a2a_pb2.SendMessageRequest().metadata
            meta.update({"skill": "human"})
            req = a2a_pb2.SendMessageRequest(message=a2a_pb2.Message(
                message_id=uuid.uuid4().hex, role=a2a_pb2.Role.ROLE_USER,
                parts=[a2a_pb2.Part(text="Pick a title")]), metadata=meta)
            sent = [e async for e in a2a.send_message(req)]
            task_id = sent[0].task.id
            assert sent[0].task.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED
            reply = a2a_pb2.SendMessageRequest(message=a2a_pb2.Message(
                message_id=uuid.uuid4().hex, role=a2a_pb2.Role.ROLE_USER, task_id=task_id,
                parts=[a2a_pb2.Part(text="Agents at work")]))
            answered = [e async for e in a2a.send_message(reply)]
            assert answered[0].task.status.state == a2a_pb2.TASK_STATE_COMPLETED
            # a raw part answers with bytes, kept as ResolveHumanTask keeps them (it was
            # an internal error: bytes in the JSON decision record)
            req.message.message_id = uuid.uuid4().hex  # a second human task
            second = [e async for e in a2a.send_message(req)]
            raw_task = second[0].task.id
            raw = a2a_pb2.SendMessageRequest(message=a2a_pb2.Message(
                message_id=uuid.uuid4().hex, role=a2a_pb2.Role.ROLE_USER, task_id=raw_task,
                parts=[a2a_pb2.Part(raw=b"\x00title")]))
            answered = [e async for e in a2a.send_message(raw)]
            assert answered[0].task.status.state == a2a_pb2.TASK_STATE_COMPLETED
            await a2a.close()
        got = await client.get_task(task_id)
        assert (got.output["decision"], got.output["input"], got.output["by"]) == (
            "supply_input", "Agents at work", "a2a")
        assert (await client.get_task(raw_task)).output["input"] == {"base64": "AHRpdGxl"}


async def test_the_console_lists_waiting_tasks_and_decides_one() -> None:
    async with running_server(embedded_settings(console_port=free_port())) as mesh, \
            MeshClient(mesh.address) as client, aiohttp.ClientSession() as http:
        assert mesh.console is not None
        url = mesh.console.url.rstrip("/")
        task = await client.submit_task("human", {"prompt": "ok?"})
        await waiting(client, task.name)
        async with http.get(f"{url}/api/approvals") as r:
            rows = (await r.json())["tasks"]
        assert [(t["id"], t["awaiting_human"]) for t in rows] == [(task.id, True)]
        decide = f"{url}/api/tasks/{task.id}/decide"
        async with http.post(decide, json={"decision": "maybe"}, headers=ACT) as r:
            assert r.status == 400
        async with http.post(decide, json={"decision": "reject", "comment": "no",
                                           "approver": "fran"}, headers=ACT) as r:
            assert r.status == 200 and (await r.json())["task"]["state"] == "FAILED"
        async with http.post(decide, json={"decision": "approve"}, headers=ACT) as r:
            assert r.status == 412 or r.status == 409 or r.status == 400, r.status
        audit = await client.get_state(f"_approvals/{task.id}")
        assert audit is not None and (audit.value["by"], audit.value["decision"]) == (
            "fran", "reject")


async def test_a_human_task_whose_input_is_not_json_is_still_announced(mesh: Mesh) -> None:
    """A raw-stub client may label bytes JSON that are not: the desk's pass failed on it
    (a traceback each time), and its approvals.requested was never sent."""
    async with MeshClient(mesh.address) as client, \
            grpc.aio.insecure_channel(mesh.address) as channel:
        requests = client.subscribe("approvals.requested")

        async def subscribed() -> bool:  # the subscription is live once a probe arrives
            probe = asyncio.ensure_future(anext(requests))
            while not probe.done():
                await client.publish("approvals.requested", "probe")
                await asyncio.wait({probe}, timeout=0.1)
            return True

        await until(subscribed, "the subscription is live")
        first = asyncio.ensure_future(anext(requests))
        submitted = await task_pb2_grpc.TaskServiceStub(channel).SubmitTask(
            task_pb2.SubmitTaskRequest(task=task_pb2.Task(
                capability="human", input=common_pb2.Payload(
                    data=b"{not json", metadata={"encoding": b"json/plain"}))))
        note = await asyncio.wait_for(first, WAIT)
        while note.value == "probe":  # probes sent while the first was on its way
            note = await asyncio.wait_for(anext(requests), WAIT)
        assert note.value["task"] == submitted.task.name
        assert note.value["input"] == "{not json"
        await requests.aclose()  # type: ignore[attr-defined]

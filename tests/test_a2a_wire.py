"""The A2A gateway as an outside checker drives it: raw JSON-RPC over HTTP.

Inputs a conforming client never sends, and values an agent may write, must
get the JSON-RPC/A2A error the spec names (or a readable task), never an
internal error (-32603) nor a task left in a state nothing can reach.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agentmesh.v1 import common_pb2, task_pb2

from agent_sdk import Agent, TaskContext
from server.api.a2a import mapping
from server.api.a2a.cards import parse_card
from server.api.auth import hash_token
from server.app import Mesh, running_server
from server.domain.errors import InvalidArgumentError
from server.domain.models import Payload
from server.ports import TaskFilter
from tests._services import free_port
from tests.conftest import embedded_settings
from tests.test_sdk_agent import running, until

WAIT = 30.0
INVALID_PARAMS = -32602
UNSUPPORTED_OPERATION = -32004


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with running_server(embedded_settings(heartbeat_interval=1.0,
                                                a2a_port=free_port())) as m:
        yield m


async def rpc(http: httpx.AsyncClient, mesh: Mesh, method: str, params: Any) -> dict[str, Any]:
    """One JSON-RPC call; NaN and Infinity go out as Python's json writes them."""
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params})
    reply = await http.post(mesh.a2a_url, content=body.encode(), headers={
        "A2A-Version": "1.0", "Content-Type": "application/json"})
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def send(skill: str | None, parts: list[dict[str, Any]] | None = None, **extra: Any,
         ) -> dict[str, Any]:
    meta = {} if skill is None else {"skill": skill}
    message = {"messageId": uuid.uuid4().hex, "role": "ROLE_USER",
               "parts": parts or [{"text": "hi"}], "metadata": meta}
    return {"message": message, **extra}


def team(mesh: Mesh) -> Agent:
    agent = Agent("odd-writer", target=mesh.address)

    @agent.handler("score")
    async def score(task: TaskContext) -> dict[str, float]:
        # Python's json writes NaN and Infinity; A2A's JSON has neither
        await task.emit_artifact({"max": float("inf")}, artifact="stats")
        return {"score": float("nan")}

    @agent.handler("garbled")
    async def garbled(task: TaskContext) -> str:
        # a chunk that claims JSON but is not (any gRPC agent may send one)
        bad = common_pb2.Payload(data=b"{not json", metadata={"encoding": b"json/plain"})
        await task._emit(task_pb2.TaskChunk(kind=task_pb2.TASK_CHUNK_KIND_ARTIFACT, data=bad,
                                            artifact="notes"))
        return "done"

    return agent


def error_code(reply: dict[str, Any]) -> int:
    assert "error" in reply, reply
    code: int = reply["error"]["code"]
    return code


async def test_bad_tenants_skills_and_numbers_are_invalid_params(mesh: Mesh) -> None:
    async with running(team(mesh)), httpx.AsyncClient(timeout=WAIT) as http:
        await until(lambda: _live(mesh, "garbled"), "the agent registered")
        # a tenant that is no namespace: refused before anything is stored (it reached the
        # store and failed at the bus: -32603, a task no agent could ever take)
        reply = await rpc(http, mesh, "SendMessage", send("score", tenant="Bad NS!"))
        assert error_code(reply) == INVALID_PARAMS and "tenant" in reply["error"]["message"]
        assert await mesh.scheduler.list_tasks(TaskFilter("Bad NS!"), before_seq=0,
                                               limit=10) == []
        for method, params in (("GetTask", {"id": "x", "tenant": "../x"}),
                               ("ListTasks", {"tenant": "UPPER"})):
            assert error_code(await rpc(http, mesh, method, params)) == INVALID_PARAMS
        # a skill that is no capability name, or that no live agent offers: refused (a
        # blocking send waited forever on a task nobody would take)
        for skill in ("Bad Skill!", "x" * 200, "no-such-skill"):
            reply = await rpc(http, mesh, "SendMessage", send(skill))
            assert error_code(reply) == INVALID_PARAMS, skill
            assert "skill" in reply["error"]["message"]
        # NaN and Infinity are no JSON: InvalidParams naming the field, not -32603
        reply = await rpc(http, mesh, "SendMessage",
                          send("score", [{"data": {"x": float("nan")}}]))
        assert error_code(reply) == INVALID_PARAMS
        assert "message.parts[0].data" in reply["error"]["message"]
        params = send("score")
        params["message"]["metadata"]["weight"] = float("inf")
        assert error_code(await rpc(http, mesh, "SendMessage", params)) == INVALID_PARAMS
        # a state A2A does not have is no filter that matches nothing
        assert error_code(await rpc(http, mesh, "ListTasks", {"status": 99})) == INVALID_PARAMS
        # GetTask without an id is a missing parameter, not a task that was not found
        assert error_code(await rpc(http, mesh, "GetTask", {})) == INVALID_PARAMS
        assert await mesh.scheduler.list_tasks(TaskFilter("default"), before_seq=0,
                                               limit=10) == []


async def _live(mesh: Mesh, capability: str) -> bool:
    return capability in await mesh.scheduler.live_capabilities("default")


async def test_what_an_agent_wrote_is_always_readable(mesh: Mesh) -> None:
    """A result or chunk holding NaN, or a 'JSON' chunk that is not, made GetTask, the
    blocking send and ListTasks(includeArtifacts) of the whole namespace fail (-32603,
    -32700): they are shown as text and as raw bytes."""
    async with running(team(mesh)), httpx.AsyncClient(timeout=WAIT) as http:
        await until(lambda: _live(mesh, "garbled"), "the agent registered")
        done = await rpc(http, mesh, "SendMessage", send("score"))
        task = done["result"]["task"]
        assert task["status"]["state"] == "TASK_STATE_COMPLETED", done
        arts = {a["artifactId"]: a for a in task["artifacts"]}
        assert arts["result"]["parts"][0]["data"] == {"score": "NaN"}
        assert arts["stats"]["parts"][0]["data"] == {"max": "Infinity"}
        garbled = (await rpc(http, mesh, "SendMessage", send("garbled")))["result"]["task"]
        notes = {a["artifactId"]: a for a in garbled["artifacts"]}["notes"]
        assert notes["parts"][0]["raw"]  # the bytes, base64
        for task_id in (task["id"], garbled["id"]):
            got = await rpc(http, mesh, "GetTask", {"id": task_id})
            assert got["result"]["status"]["state"] == "TASK_STATE_COMPLETED", got
        listed = await rpc(http, mesh, "ListTasks", {"includeArtifacts": True})
        assert len(listed["result"]["tasks"]) == 2, listed


def test_decode_shows_non_json_numbers_as_text_and_bad_json_as_bytes() -> None:
    json_ = {"encoding": mapping.JSON}
    assert mapping.decode(Payload(b'{"a":NaN,"b":-Infinity,"c":1e999,"d":1.5}', json_)) == {
        "a": "NaN", "b": "-Infinity", "c": "1e999", "d": 1.5}
    assert mapping.decode(Payload(b"{oops", json_)) == b"{oops"
    assert mapping.decode(Payload(b"\xff", json_)) == b"\xff"
    deep = b"[" * 100_000 + b"]" * 100_000
    assert mapping.decode(Payload(deep, json_)) == deep


async def test_subscribing_to_an_ended_task_is_unsupported(mesh: Mesh) -> None:
    """The spec: SubscribeToTask on a task in a terminal state is UnsupportedOperationError,
    answered at once (it streamed the ended task instead)."""
    async with running(team(mesh)), httpx.AsyncClient(timeout=WAIT) as http:
        await until(lambda: _live(mesh, "garbled"), "the agent registered")
        task = (await rpc(http, mesh, "SendMessage", send("garbled")))["result"]["task"]
        reply = await http.post(mesh.a2a_url, headers={"A2A-Version": "1.0"}, json={
            "jsonrpc": "2.0", "id": 1, "method": "SubscribeToTask",
            "params": {"id": task["id"]}})
        assert reply.headers["content-type"].startswith("application/json")  # not a stream
        assert error_code(reply.json()) == UNSUPPORTED_OPERATION


async def test_the_one_live_skill_may_be_left_out_and_long_message_ids_stay_apart(
        mesh: Mesh) -> None:
    """With one agent capability live the skill may be left out (the human desk, always
    live, counted as a second one); message ids that differ only past 124 characters are
    two messages (cut to 128 bytes, they were one task)."""
    agent = Agent("only-one", target=mesh.address)

    @agent.handler("echo")
    async def echo(task: TaskContext) -> Any:
        return task.input

    async with running(agent), httpx.AsyncClient(timeout=WAIT) as http:
        await until(lambda: _live(mesh, "echo"), "the agent registered")
        reply = await rpc(http, mesh, "SendMessage", send(None, [{"text": "no skill named"}]))
        assert reply["result"]["task"]["metadata"]["agentmesh"]["capability"] == "echo", reply
        ids = []
        for tail in ("a", "b"):
            params = send("echo")
            params["message"]["messageId"] = "m" * 200 + tail
            ids.append((await rpc(http, mesh, "SendMessage", params))["result"]["task"]["id"])
        assert ids[0] != ids[1]
        params["message"]["messageId"] = "m" * 200 + "b"  # the same message again
        again = await rpc(http, mesh, "SendMessage", params)
        assert again["result"]["task"]["id"] == ids[1]


async def test_a_clients_malformed_request_leaves_no_traceback(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """a2a-sdk logged each malformed request at ERROR with a traceback (any client could
    fill the log); its WARNING line with the parse error is what stays."""
    bodies = (b"[]", b'{"id": 1, "method": "GetTask", "params": {"id": "x"}}',
              b'{"jsonrpc": "2.0", "id": 1.5, "method": "GetTask", "params": {}}',
              b'{"jsonrpc": "2.0", "id": 1, "method": "ListTasks", "params": {"pageSize": 1e12}}')
    async with httpx.AsyncClient(timeout=WAIT) as http:
        with caplog.at_level(logging.INFO):
            for body in bodies:
                reply = await http.post(mesh.a2a_url, content=body, headers={
                    "A2A-Version": "1.0", "Content-Type": "application/json"})
                assert error_code(reply.json()) in (-32600, INVALID_PARAMS), body
    records = [r for r in caplog.records if r.name.startswith("a2a.")]
    assert len(records) == len(bodies)  # one WARNING each, with the parse error
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in records), [
        (r.levelname, r.getMessage()) for r in records]



async def test_a_blocking_send_whose_client_left_frees_its_stream() -> None:
    """A blocking SendMessage whose client gave up kept its watch and its stream place
    until the task ended (an hour for an approval); with max_watch_streams 1, nothing
    else could stream meanwhile."""
    settings = embedded_settings(heartbeat_interval=1.0, a2a_port=free_port(),
                                 max_watch_streams=1)
    async with running_server(settings) as mesh:
        agent = Agent("sleeper", target=mesh.address)

        @agent.handler("sleep")
        async def sleep(task: TaskContext) -> str:
            await asyncio.sleep(60)
            return "late"

        @agent.handler("echo")
        async def echo(task: TaskContext) -> Any:
            return task.input

        async with running(agent), httpx.AsyncClient(timeout=WAIT) as http:
            await until(lambda: _live(mesh, "echo"), "the agent registered")
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "SendMessage",
                               "params": send("sleep")})
            with pytest.raises(httpx.ReadTimeout):  # the client gives up
                await http.post(mesh.a2a_url, content=body, timeout=1.0, headers={
                    "A2A-Version": "1.0", "Content-Type": "application/json"})

            async def streams_again() -> bool:
                reply = await http.post(mesh.a2a_url, content=json.dumps({
                    "jsonrpc": "2.0", "id": 2, "method": "SendMessage",
                    "params": send("echo")}), headers={
                    "A2A-Version": "1.0", "Content-Type": "application/json"})
                return reply.status_code == 200

            await until(streams_again, "the abandoned send's stream place is free", limit=10)
            stuck = await mesh.scheduler.list_tasks(TaskFilter("default"), before_seq=0,
                                                    limit=10)
            assert "sleep" in {t.capability for t in stuck}  # the task itself goes on


DEEP = b"[" * 100_000 + b"]" * 100_000
"""JSON nested past Python's recursion limit: 200 kB, well within a request's bound."""


async def test_json_nested_too_deeply_is_a_parse_error(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """It was an internal error (-32603) with a traceback in the log."""
    async with httpx.AsyncClient(timeout=WAIT) as http:
        with caplog.at_level(logging.WARNING):
            for body in (DEEP, b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", '
                               b'"params": {"id": "x", "z": ' + DEEP + b"}}"):
                reply = await http.post(mesh.a2a_url, content=body, headers={
                    "A2A-Version": "1.0", "Content-Type": "application/json"})
                assert reply.status_code == 200
                assert error_code(reply.json()) == -32700
        assert not [r for r in caplog.records if r.exc_info]
        # a plain parse error is still a2a-sdk's, and the gateway still answers
        reply = await http.post(mesh.a2a_url, content=b"{oops", headers={
            "A2A-Version": "1.0", "Content-Type": "application/json"})
        assert error_code(reply.json()) == -32700
        assert error_code(await rpc(http, mesh, "GetTask", {"id": "x"})) == -32001


async def test_json_nested_too_deeply_is_a_parse_error_with_auth_on(tmp_path: Path) -> None:
    """The auth guard parses the body to learn the method: it answered HTTP 500."""
    path = tmp_path / "auth.yaml"
    path.write_text(json.dumps({"principals": [{
        "name": "ci", "role": "client", "namespaces": ["*"],
        "token_sha256": hash_token("amt_wire_test_token_0123456789")}]}))
    settings = embedded_settings(heartbeat_interval=1.0, a2a_port=free_port(),
                                 auth_file=str(path))
    async with running_server(settings) as mesh, httpx.AsyncClient(timeout=WAIT) as http:
        reply = await http.post(mesh.a2a_url, content=DEEP, headers={
            "A2A-Version": "1.0", "Content-Type": "application/json",
            "Authorization": "Bearer amt_wire_test_token_0123456789"})
        assert reply.status_code == 200, reply.text
        assert error_code(reply.json()) == -32700


def test_a_registration_card_nested_past_the_parsers_depth_is_invalid() -> None:
    """RegisterAgent's a2a_agent_card of 2 kB of brackets was INTERNAL (RecursionError)."""
    with pytest.raises(InvalidArgumentError, match="a2a_agent_card"):
        parse_card("[" * 2000 + "]" * 2000)


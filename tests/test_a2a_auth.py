"""The A2A gateway with auth on, driven by the a2a-sdk client only.

The same tokens as gRPC (``Authorization: Bearer``), the same role rules as
the gRPC method each A2A method stands for: no or an unknown token is 401
with a Bearer challenge, a role that may not is 403, the right token works
end to end. The public card declares the scheme well enough for a2a-sdk's
own AuthInterceptor to send the token.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from a2a.client import ClientCallContext, ClientConfig, create_client
from a2a.client.auth import AuthInterceptor, CredentialService
from a2a.client.client import Client
from a2a.client.errors import A2AClientError
from a2a.types import a2a_pb2
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from agent_sdk import Agent, TaskContext
from server.api.auth import hash_token
from server.app import Mesh, running_server
from tests._services import free_port
from tests.conftest import embedded_settings
from tests.test_sdk_agent import running, until

WAIT = 30.0
TOKENS = {"alice": ("client", ["*"]), "bob": ("client", ["*"]), "vic": ("viewer", ["*"]),
          "agents": ("agent", ["*"]), "billing": ("client", ["billing"])}


def token(name: str) -> str:
    return f"amt_test_token_of_{name}_0123456789"


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    path = tmp_path / "auth.yaml"
    path.write_text(json.dumps({"principals": [
        {"name": n, "role": r, "namespaces": ns, "token_sha256": hash_token(token(n))}
        for n, (r, ns) in TOKENS.items()]}))
    async with running_server(embedded_settings(heartbeat_interval=1.0, a2a_port=free_port(),
                                                auth_file=str(path))) as m:
        yield m


class _Token(CredentialService):
    def __init__(self, value: str) -> None:
        self.value = value
        self.schemes: list[str] = []

    async def get_credentials(self, security_scheme_name: str,
                              context: ClientCallContext | None) -> str | None:
        self.schemes.append(security_scheme_name)
        return self.value


async def _client(mesh: Mesh, http: httpx.AsyncClient, who: str | None = None,
                  *, streaming: bool = False) -> Client:
    """An a2a-sdk client; with ``who``, a2a-sdk's AuthInterceptor sends their token as the
    card's security scheme says."""
    interceptors = [AuthInterceptor(_Token(token(who)))] if who else []
    return await create_client(mesh.a2a_url, client_config=ClientConfig(
        streaming=streaming, httpx_client=http), interceptors=interceptors)


def message(text: str, skill: str, *, task_id: str = "") -> a2a_pb2.SendMessageRequest:
    meta = struct_pb2.Struct()
    meta.update({"skill": skill})
    return a2a_pb2.SendMessageRequest(message=a2a_pb2.Message(
        message_id=uuid.uuid4().hex, role=a2a_pb2.Role.ROLE_USER, task_id=task_id,
        parts=[a2a_pb2.Part(text=text)], metadata=meta))


def status_of(exc: pytest.ExceptionInfo[A2AClientError]) -> httpx.Response:
    cause = exc.value.__cause__
    assert isinstance(cause, httpx.HTTPStatusError), repr(exc.value)
    return cause.response


def echo_agent(mesh: Mesh, gate: asyncio.Event) -> Agent:
    agent = Agent("echo", target=mesh.address, token=token("agents"))

    @agent.handler("echo", description="Echo the text back.")
    async def echo(task: TaskContext) -> dict[str, object]:
        await task.emit(f"{task.input} ")
        return {"echo": task.input}

    @agent.handler("slow")
    async def slow(task: TaskContext) -> str:
        await gate.wait()
        return "late"

    return agent


async def test_the_public_card_declares_the_bearer_scheme(mesh: Mesh) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as http:  # no token: the card is public
        reply = await http.get(f"{mesh.a2a_url}.well-known/agent-card.json")
    assert reply.status_code == 200
    card = reply.json()
    assert card["securitySchemes"] == {"bearer": {"httpAuthSecurityScheme": {
        "scheme": "Bearer", "bearerFormat": "agentmesh token",
        "description": card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"][
            "description"]}}}
    assert card["securityRequirements"] == [{"schemes": {"bearer": {}}}]


async def test_missing_unknown_and_wrong_role_tokens_are_refused(mesh: Mesh) -> None:
    gate = asyncio.Event()
    async with running(echo_agent(mesh, gate)), httpx.AsyncClient(timeout=WAIT) as http:
        await until(lambda: _live(mesh), "the agent registered")
        anonymous = await _client(mesh, http)
        with pytest.raises(A2AClientError) as missing:
            async for _ in anonymous.send_message(message("hi", "echo")):
                pass
        reply = status_of(missing)
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"] == 'Bearer realm="agentmesh"'
        body = reply.json()
        assert body["error"]["code"] == -32000
        assert body["error"]["data"][0]["reason"] == "MISSING_TOKEN"
        with pytest.raises(A2AClientError) as missing_read:
            await anonymous.get_task(a2a_pb2.GetTaskRequest(id="any"))
        assert status_of(missing_read).status_code == 401

        async with httpx.AsyncClient(timeout=WAIT, headers={
                "Authorization": "Bearer amt_not_a_token_of_this_server"}) as stranger_http:
            stranger = await _client(mesh, stranger_http)
            with pytest.raises(A2AClientError) as unknown:
                await stranger.list_tasks(a2a_pb2.ListTasksRequest())
        reply = status_of(unknown)
        assert reply.status_code == 401
        assert 'error="invalid_token"' in reply.headers["www-authenticate"]
        assert reply.json()["error"]["data"][0]["reason"] == "UNKNOWN_TOKEN"

        # A viewer reads but may not submit (SubmitTask's roles), nor cancel; an agent
        # may not submit; nothing was created by the refused sends.
        viewer = await _client(mesh, http, "vic")
        for who in ("vic", "agents"):
            refused_client = await _client(mesh, http, who, streaming=True)
            with pytest.raises(A2AClientError) as denied:
                async for _ in refused_client.send_message(message("hi", "echo")):
                    pass
            reply = status_of(denied)
            assert reply.status_code == 403, who
            info = reply.json()["error"]["data"][0]
            assert (info["reason"], info["metadata"]["role"]) == (
                "ROLE_DENIED", TOKENS[who][0])
        assert (await viewer.list_tasks(a2a_pb2.ListTasksRequest())).tasks == []
        # a token bound to another namespace may not use the default tenant
        billing = await _client(mesh, http, "billing")
        with pytest.raises(A2AClientError) as elsewhere:
            await billing.list_tasks(a2a_pb2.ListTasksRequest())
        assert status_of(elsewhere).json()["error"]["data"][0]["reason"] == "NAMESPACE_DENIED"
        assert status_of(elsewhere).status_code == 403
        billing_own = await billing.list_tasks(a2a_pb2.ListTasksRequest(tenant="billing"))
        assert billing_own.tasks == []


async def test_the_right_token_works_end_to_end_as_its_principal(mesh: Mesh) -> None:
    gate = asyncio.Event()
    async with running(echo_agent(mesh, gate)), httpx.AsyncClient(timeout=WAIT) as http:
        await until(lambda: _live(mesh), "the agent registered")
        alice = await _client(mesh, http, "alice", streaming=True)
        async with asyncio.timeout(WAIT):
            events = [e async for e in alice.send_message(message("hello", "echo"))]
        task_id = events[0].task.id
        assert events[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED
        chunks = [p.text for e in events if e.WhichOneof("payload") == "artifact_update"
                  and e.artifact_update.artifact.artifact_id == "output"
                  for p in e.artifact_update.artifact.parts]
        assert chunks == ["hello "]
        stored = await mesh.scheduler.get_task(task_id)
        assert stored.labels["agentmesh.dev/owner"] == "alice"  # submitted as alice

        viewer = await _client(mesh, http, "vic", streaming=True)
        got = await viewer.get_task(a2a_pb2.GetTaskRequest(id=task_id))  # read roles
        result = next(a for a in got.artifacts if a.artifact_id == "result")
        assert MessageToDict(result.parts[0].data) == {"echo": "hello"}
        assert [t.id for t in (await viewer.list_tasks(a2a_pb2.ListTasksRequest())).tasks] == [
            task_id]
        # the viewer's role may subscribe: the handler answers (the task has ended, so
        # the spec's UnsupportedOperationError), not the guard (403)
        with pytest.raises(Exception, match="has ended") as ended:
            async for _ in viewer.subscribe(a2a_pb2.SubscribeToTaskRequest(id=task_id)):
                pass
        assert not isinstance(ended.value.__cause__, httpx.HTTPStatusError)

        # cancel: the viewer's role may not; bob may not cancel alice's task (as over
        # gRPC: NOT_OWNER); alice may
        slow = message("wait", "slow")
        slow.configuration.return_immediately = True
        submitted = [e async for e in alice.send_message(slow)]
        slow_id = submitted[0].task.id
        with pytest.raises(A2AClientError) as as_viewer:
            await viewer.cancel_task(a2a_pb2.CancelTaskRequest(id=slow_id))
        assert status_of(as_viewer).status_code == 403
        bob = await _client(mesh, http, "bob")
        with pytest.raises(A2AClientError) as not_owner:
            await bob.cancel_task(a2a_pb2.CancelTaskRequest(id=slow_id))
        assert status_of(not_owner).status_code == 403
        assert status_of(not_owner).json()["error"]["data"][0]["reason"] == "NOT_OWNER"
        cancelled = await alice.cancel_task(a2a_pb2.CancelTaskRequest(id=slow_id))
        assert cancelled.status.state == a2a_pb2.TASK_STATE_CANCELED
        gate.set()


async def test_an_answer_is_decided_by_the_callers_principal(mesh: Mesh) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        alice = await _client(mesh, http, "alice")
        ask = message("Publish it?", "human")
        ask.configuration.return_immediately = True
        asked = [e async for e in alice.send_message(ask)]
        human_id = asked[0].task.id

        async def waiting() -> bool:
            got = await alice.get_task(a2a_pb2.GetTaskRequest(id=human_id))
            return got.status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED

        await until(waiting, "the human task waits for a person")
        # a viewer may not decide (ResolveHumanTask's roles), a client may
        viewer = await _client(mesh, http, "vic")
        with pytest.raises(A2AClientError) as denied:
            async for _ in viewer.send_message(message("approve", "", task_id=human_id)):
                pass
        assert status_of(denied).status_code == 403
        bob = await _client(mesh, http, "bob")
        decided = [e async for e in bob.send_message(message("approve", "", task_id=human_id))]
        assert decided[-1].task.status.state == a2a_pb2.TASK_STATE_COMPLETED
        record = (await mesh.scheduler.get_task(human_id)).output
        assert record is not None
        assert (json.loads(record.data)["by"], json.loads(record.data)["role"]) == (
            "bob", "client")


async def _live(mesh: Mesh) -> bool:
    return "echo" in await mesh.scheduler.live_capabilities("default")


async def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(mesh: Mesh) -> None:
    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"jsonrpc": "2.0", "id": 7, "method": "GetTask", "params": {"id": "'
        for _ in range(5 << 4):  # 5 MiB, over the default max_message_bytes (4 MiB)
            yield b"x" * (64 << 10)
        yield b'"}}'

    async with httpx.AsyncClient(timeout=WAIT) as http:
        reply = await http.post(mesh.a2a_url, content=chunked(), headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {token('vic')}"})
    assert reply.status_code == 413
    assert "over" in reply.json()["error"]["message"]

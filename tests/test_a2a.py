"""The A2A gateway driven by the a2a-sdk client only (JSON-RPC over HTTP, SSE streams).

An A2A-described agent joins with its card; the mesh's card lists its skills;
a message to a skill becomes a mesh task whose chunks arrive as artifact
updates in order; get, list, cancel and subscribe behave as the spec says,
with agentmesh's states mapped as docs/a2a.md's table says.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.client.client import Client
from a2a.client.errors import A2AClientError
from a2a.types import a2a_pb2
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from agent_sdk import Agent, MeshClient, RPCError, TaskContext
from server.api.a2a.http import A2AServer
from server.app import Mesh, running_server
from server.netutil import PortInUseError
from server.settings import DEFAULT_A2A_PORT, Settings
from tests._services import free_port
from tests.conftest import embedded_settings
from tests.test_sdk_agent import running, until

WAIT = 30.0
CARD = {
    "name": "summarizer",
    "description": "Summarizes text, streaming the summary as it writes it.",
    "version": "2.1.0",
    "supportedInterfaces": [{"url": "http://summarizer.example/a2a",
                             "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}],
    "capabilities": {"streaming": True},
    "defaultInputModes": ["text/plain"], "defaultOutputModes": ["text/plain"],
    "skills": [{"id": "summarize", "name": "Summarize",
                "description": "Summarize a text in a few words.",
                "tags": ["text", "summary"], "examples": ["Summarize: the cat sat on the mat"]}],
}


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with running_server(embedded_settings(heartbeat_interval=1.0,
                                                a2a_port=free_port())) as m:
        yield m


@pytest.fixture
async def client(mesh: Mesh) -> AsyncIterator[Client]:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        a2a = await create_client(mesh.a2a_url, client_config=ClientConfig(
            streaming=True, httpx_client=http))
        try:
            yield a2a
        finally:
            await a2a.close()


async def _live(mesh: Mesh) -> bool:
    return "summarize" in await mesh.scheduler.live_capabilities("default")


def message(text: str, skill: str) -> a2a_pb2.SendMessageRequest:
    meta = struct_pb2.Struct()
    meta.update({"skill": skill})
    return a2a_pb2.SendMessageRequest(message=a2a_pb2.Message(
        message_id=uuid.uuid4().hex, role=a2a_pb2.Role.ROLE_USER,
        parts=[a2a_pb2.Part(text=text)], metadata=meta))


def summarizer(mesh: Mesh, gate: asyncio.Event) -> Agent:
    agent = Agent("summarizer", target=mesh.address, a2a_card=CARD)

    @agent.handler("summarize")
    async def summarize(task: TaskContext) -> dict[str, object]:
        words = str(task.input).split()
        for word in words[:3]:
            await task.emit(word + " ")
        await task.emit_progress("thinking", 0.5)
        await gate.wait()
        await task.emit_artifact({"count": len(words)}, artifact="stats", last=True)
        return {"summary": " ".join(words[:3])}

    @agent.handler("slow")
    async def slow(task: TaskContext) -> str:
        await asyncio.sleep(60)
        return "never"

    return agent


async def test_card_lists_the_skills_of_an_a2a_described_agent(mesh: Mesh) -> None:
    gate = asyncio.Event()
    async with running(summarizer(mesh, gate)):
        async with httpx.AsyncClient() as http:
            async with asyncio.timeout(WAIT):
                while True:  # until the agent is registered
                    card = (await http.get(f"{mesh.a2a_url}.well-known/agent-card.json")).json()
                    if card.get("skills"):
                        break
                    await asyncio.sleep(0.05)
    assert card["name"] == "agentmesh" and card["capabilities"]["streaming"] is True
    assert card["supportedInterfaces"][0]["url"] == mesh.a2a_url
    skills = {s["id"]: s for s in card["skills"]}
    assert set(skills) == {"summarize", "slow"}
    s = skills["summarize"]
    assert (s["description"], s["tags"], s["examples"]) == (
        "Summarize a text in a few words.", ["text", "summary"],
        ["Summarize: the cat sat on the mat"])
    # a capability without a description of its own is described by its agent
    assert skills["slow"]["description"] == CARD["description"]
    assert skills["slow"]["tags"] == ["slow"]


async def test_stream_get_list_subscribe_and_cancel(mesh: Mesh, client: Client) -> None:
    gate = asyncio.Event()
    async with running(summarizer(mesh, gate)):
        await until(lambda: _live(mesh), "the agent registered")
        events: list[a2a_pb2.StreamResponse] = []
        task_id = ""
        async with asyncio.timeout(WAIT):
            async for event in client.send_message(message("the cat sat on the mat", "summarize")):
                events.append(event)
                kind = event.WhichOneof("payload")
                if kind == "task":
                    task_id = event.task.id
                if kind == "status_update" and "thinking" in str(event.status_update.status):
                    # A second client subscribes mid-stream: what was streamed so far
                    # comes in its first Task, the rest as updates, nothing twice.
                    sub = client.subscribe(a2a_pb2.SubscribeToTaskRequest(id=task_id))
                    first = await anext(sub)
                    gate.set()
                    rest = [e async for e in sub]
        kinds = [e.WhichOneof("payload") for e in events]
        assert kinds[0] == "task" and events[0].task.status.state in (
            a2a_pb2.TASK_STATE_SUBMITTED, a2a_pb2.TASK_STATE_WORKING)
        text = [e.artifact_update for e in events if kinds[events.index(e)] == "artifact_update"
                and e.artifact_update.artifact.artifact_id == "output"]
        assert [p.text for u in text for p in u.artifact.parts] == ["the ", "cat ", "sat "]
        assert [u.append for u in text] == [False, True, True]
        seqs = [MessageToDict(u.metadata)["agentmesh"]["sequence"] for u in text]
        assert seqs == [1, 2, 3]
        final = events[-1].status_update
        assert final.status.state == a2a_pb2.TASK_STATE_COMPLETED
        result = next(e.artifact_update for e in events
                      if e.WhichOneof("payload") == "artifact_update"
                      and e.artifact_update.artifact.artifact_id == "result")
        assert MessageToDict(result.artifact.parts[0].data) == {"summary": "the cat sat"}
        # the subscriber: first the task with the 3 text chunks, then only what followed
        snap = first.task
        assert [p.text for a in snap.artifacts if a.artifact_id == "output"
                for p in a.parts] == ["the ", "cat ", "sat "]
        later = [e.artifact_update.artifact.artifact_id for e in rest
                 if e.WhichOneof("payload") == "artifact_update"]
        assert later == ["stats", "result"]
        assert rest[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED
        # get: the whole task, artifacts assembled
        got = await client.get_task(a2a_pb2.GetTaskRequest(id=task_id))
        assert got.status.state == a2a_pb2.TASK_STATE_COMPLETED
        arts = {a.artifact_id: a for a in got.artifacts}
        assert "".join(p.text for p in arts["output"].parts) == "the cat sat "
        assert MessageToDict(arts["stats"].parts[0].data) == {"count": 6}
        assert MessageToDict(got.metadata)["agentmesh"]["state"] == "SUCCEEDED"
        # cancel a running task; a second cancel is refused (it has ended)
        req = message("wait", "slow")
        req.configuration.return_immediately = True
        submitted = [e async for e in client.send_message(req)]
        slow_id = submitted[0].task.id

        async def working() -> bool:
            got = await client.get_task(a2a_pb2.GetTaskRequest(id=slow_id))
            return got.status.state == a2a_pb2.TASK_STATE_WORKING

        await until(working, "the slow task runs")
        cancelled = await client.cancel_task(a2a_pb2.CancelTaskRequest(id=slow_id))
        assert cancelled.status.state == a2a_pb2.TASK_STATE_CANCELED
        with pytest.raises(Exception, match=r"(?i)cancel"):
            await client.cancel_task(a2a_pb2.CancelTaskRequest(id=slow_id))
        # list: newest first, filtered by state
        listed = await client.list_tasks(a2a_pb2.ListTasksRequest())
        assert [t.id for t in listed.tasks][:2] == [slow_id, task_id]
        done = await client.list_tasks(a2a_pb2.ListTasksRequest(
            status=a2a_pb2.TASK_STATE_COMPLETED))
        assert [t.id for t in done.tasks] == [task_id]
        paged = await client.list_tasks(a2a_pb2.ListTasksRequest(page_size=1))
        assert [t.id for t in paged.tasks] == [slow_id] and paged.next_page_token
        second = await client.list_tasks(a2a_pb2.ListTasksRequest(
            page_size=1, page_token=paged.next_page_token))
        assert [t.id for t in second.tasks] == [task_id]
        # errors the spec names
        with pytest.raises(Exception, match=r"(?i)not found"):
            await client.get_task(a2a_pb2.GetTaskRequest(id="no-such-task"))
        with pytest.raises(Exception, match="skill"):
            async for _ in client.send_message(message("x", "")):
                pass


async def test_blocking_send_resends_are_idempotent(mesh: Mesh) -> None:
    gate = asyncio.Event()
    gate.set()
    async with running(summarizer(mesh, gate)), httpx.AsyncClient(timeout=WAIT) as http:
        blocking = await create_client(mesh.a2a_url, client_config=ClientConfig(
            streaming=False, httpx_client=http))
        await until(lambda: _live(mesh), "the agent registered")
        req = message("one two", "summarize")
        first = [e async for e in blocking.send_message(req)]
        again = [e async for e in blocking.send_message(req)]  # same message id
        assert first[0].task.status.state == a2a_pb2.TASK_STATE_COMPLETED
        assert again[0].task.id == first[0].task.id
        await blocking.close()


async def test_the_gateway_port_defaults_and_port_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTMESH_A2A_PORT", raising=False)
    assert Settings().a2a_listen_port == DEFAULT_A2A_PORT  # embedded mode: on
    assert Settings(store="redis").a2a_listen_port == 0  # type: ignore[call-arg]
    assert Settings(a2a_port=0).a2a_listen_port == 0
    port = free_port()
    async with running_server(embedded_settings(a2a_port=port)):
        with pytest.raises(PortInUseError, match=rf"{port}.*A2A"):
            async with running_server(embedded_settings(a2a_port=port)):
                pass



def test_the_gateway_answers_without_waiting_for_delayed_acks() -> None:
    """Accepted connections have TCP_NODELAY, so a reply's header and body writes go out
    at once and not 40 ms apart behind the client's delayed ACK (Nagle): asyncio does
    not set it on a socket the gateway binds itself."""
    gateway = A2AServer(None, None, host="127.0.0.1", port=0)  # type: ignore[arg-type]
    port = gateway.bind()
    listening = gateway._sock  # the socket under test
    assert listening is not None
    listening.setblocking(True)
    with socket.create_connection(("127.0.0.1", port)):
        accepted, _ = listening.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    listening.close()


async def test_a2a_streams_count_against_the_servers_stream_bounds() -> None:
    """A2A streams and gRPC watches share max_watch_streams: past it, an A2A stream is
    HTTP 429 (STREAM_LIMIT) and a gRPC watch RESOURCE_EXHAUSTED; a closed one frees it."""
    settings = embedded_settings(heartbeat_interval=1.0, a2a_port=free_port(),
                                 max_watch_streams=1)
    gate = asyncio.Event()
    async with running_server(settings) as mesh, running(summarizer(mesh, gate)), \
            httpx.AsyncClient(timeout=WAIT) as http, MeshClient(mesh.address) as grpc_client:
        client = await create_client(mesh.a2a_url, client_config=ClientConfig(
            streaming=True, httpx_client=http))
        await until(lambda: _live(mesh), "the agent registered")
        req = message("wait", "slow")
        req.configuration.return_immediately = True
        submitted = [e async for e in client.send_message(req)]
        slow_id = submitted[0].task.id
        held = client.subscribe(a2a_pb2.SubscribeToTaskRequest(id=slow_id))
        assert (await anext(held)).task.id == slow_id  # the one stream allowed is open
        with pytest.raises(A2AClientError) as refused:
            await anext(client.subscribe(a2a_pb2.SubscribeToTaskRequest(id=slow_id)))
        cause = refused.value.__cause__
        assert isinstance(cause, httpx.HTTPStatusError)
        assert cause.response.status_code == 429
        assert cause.response.json()["error"]["data"][0]["reason"] == "STREAM_LIMIT"
        # a streaming or blocking send refused past the bound has submitted nothing (a
        # client retrying it with a new message id got the task twice)
        for streaming in (True, False):
            sender = await create_client(mesh.a2a_url, client_config=ClientConfig(
                streaming=streaming, httpx_client=http))
            with pytest.raises(A2AClientError) as send_refused:
                async for _ in sender.send_message(message("refused", "summarize")):
                    pass
            cause = send_refused.value.__cause__
            assert isinstance(cause, httpx.HTTPStatusError)
            assert cause.response.status_code == 429
        listed = await client.list_tasks(a2a_pb2.ListTasksRequest())
        assert [t.id for t in listed.tasks] == [slow_id]
        with pytest.raises(RPCError) as watch_refused:
            await anext(grpc_client.watch_chunks(slow_id))
        assert watch_refused.value.code.name == "RESOURCE_EXHAUSTED"
        await held.aclose()

        async def freed() -> bool:
            sub = client.subscribe(a2a_pb2.SubscribeToTaskRequest(id=slow_id))
            try:
                return (await anext(sub)).task.id == slow_id
            except A2AClientError:
                return False
            finally:
                await sub.aclose()

        await until(freed, "the closed stream's place is free again")
        await client.cancel_task(a2a_pb2.CancelTaskRequest(id=slow_id))
        await client.close()


async def test_inputs_and_bodies_are_bounded_as_over_grpc() -> None:
    """A message's input is within max_payload_bytes (InvalidParams past it), a request
    body within max_message_bytes (HTTP 413, or the JSON-RPC error for a chunked body)."""
    settings = embedded_settings(heartbeat_interval=1.0, a2a_port=free_port(),
                                 max_payload_bytes=1024, max_chunk_bytes=1024,
                                 max_message_bytes=1024 + (64 << 10))
    gate = asyncio.Event()
    gate.set()
    async with running_server(settings) as mesh, running(summarizer(mesh, gate)), \
            httpx.AsyncClient(timeout=WAIT) as http:
        client = await create_client(mesh.a2a_url, client_config=ClientConfig(
            streaming=False, httpx_client=http))
        await until(lambda: _live(mesh), "the agent registered")
        with pytest.raises(Exception, match=r"message\.parts is \d+ bytes; the limit is 1024"):
            async for _ in client.send_message(message("word " * 400, "summarize")):
                pass
        with pytest.raises(A2AClientError) as too_big:
            async for _ in client.send_message(message("x" * (100 << 10), "summarize")):
                pass
        cause = too_big.value.__cause__
        assert isinstance(cause, httpx.HTTPStatusError)
        assert cause.response.status_code == 413

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length
            yield b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "'
            for _ in range(100):
                yield b"x" * 1024
            yield b'"}}'

        reply = await http.post(mesh.a2a_url, content=chunked(),
                                headers={"Content-Type": "application/json"})
        assert "too large" in reply.json()["error"]["message"].lower()
        # within the bounds, the same client still works
        done = [e async for e in client.send_message(message("small enough", "summarize"))]
        assert done[-1].task.status.state == a2a_pb2.TASK_STATE_COMPLETED
        await client.close()

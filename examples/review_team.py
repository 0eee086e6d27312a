"""A writer streams its draft, a person approves it, and an A2A client asked for it.

Starts the embedded agentmesh server with its A2A gateway and a team of two
agents, then plays an external A2A client (the a2a-sdk client only, as any
A2A agent would): it sends "write an article about TOPIC" to the mesh's
``write`` skill and prints the draft as its tokens stream in (A2A artifact
updates).

The editor's ``write`` skill runs the job as a workflow ``draft -> review``:
the writer's ``draft`` step streams the draft (the editor passes the chunks
on to the A2A task), and the ``review`` step, of the reserved capability
``human``, waits for a person (``agentmesh approvals list``) once the draft
has succeeded; the A2A client sees a status update saying so. Approve it from
another terminal with the command it prints, or reject it (the workflow, and
so the A2A task, then fails); ``--auto`` approves it itself after a moment
(what the test does). The approved article is the A2A result.

    python examples/review_team.py [--topic "tide pools"] [--auto] [--a2a-port 41241]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from typing import Any

import httpx
from a2a.client import ClientConfig, create_client
from a2a.types import a2a_pb2
from google.protobuf.json_format import MessageToDict

from agent_sdk import Agent, MeshClient, NonRetryableError, TaskChunk, TaskContext
from server.app import running_server
from server.settings import Settings

DRAFT = ("{topic} are a small world of their own. Every tide rearranges them, and what "
         "survives there has learned to wait.")


def writer(target: str) -> Agent:
    """The writer: streams a draft word by word (the workflow's ``draft`` step)."""
    agent = Agent("writer", target=target, description="Writes short articles")

    @agent.handler("draft", description="Stream a first draft of a short article about a "
                   "topic", tags=["writing"], examples=["tide pools"])
    async def draft(task: TaskContext) -> str:
        text = DRAFT.format(topic=str(task.input).capitalize())
        for word in text.split(" "):
            await task.emit(word + " ")
            await asyncio.sleep(0.02)
        await task.emit("", last=True)
        return text

    return agent


def editor(target: str) -> Agent:
    """The editor: the A2A-facing ``write`` skill, run as a workflow draft -> review."""
    agent = Agent("editor", target=target, description="Has articles written and reviewed",
                  max_concurrency=8)

    @agent.handler("write", description="Write a short article about a topic, reviewed by "
                   "a person before it is final", tags=["writing", "review"],
                   examples=["write an article about tide pools"])
    async def write(task: TaskContext) -> dict[str, Any]:
        topic = str(task.input).removeprefix("write an article about ").strip() or "agents"
        async with MeshClient(target) as mesh:
            # One workflow per A2A task: a retried attempt finds the same one.
            flow = await mesh.submit_workflow({"name": f"article: {topic}", "steps": [
                {"id": "draft", "capability": "draft", "input": topic},
                {"id": "review", "capability": "human", "depends_on": ["draft"],
                 "input": {"prompt": f"Publish the draft about {topic}?"}}]},
                request_id=f"write:{task.name}")
            try:
                return await _follow(task, mesh, flow.name)
            except asyncio.CancelledError:  # the A2A task was cancelled: so is the job
                await asyncio.shield(mesh.cancel_workflow(flow.name, "the A2A task ended"))
                raise

    return agent


async def _follow(task: TaskContext, mesh: MeshClient, flow: str) -> dict[str, Any]:
    """Pass the draft step's chunks on to the A2A task, then wait for the review."""
    async for item in mesh.watch_chunks((await mesh.get_workflow(flow)).step("draft").task):
        if isinstance(item, TaskChunk):
            await task.emit(item.text, artifact="draft", last=item.last)
    review = (await mesh.get_workflow(flow)).step("review").task
    if review:
        await task.emit_progress(f"waiting for a person to review {review}")
    while True:
        try:
            done = await mesh.wait_workflow(flow, timeout=5.0)
            break
        except TimeoutError:
            await task.progress()  # keeps this attempt's lease while the person thinks
    if done.state != "SUCCEEDED":  # retrying cannot help; a person's no stays a no
        failure = done.step("review").failure
        rejected = failure is not None and failure.error_type == "REJECTED"
        raise NonRetryableError(f"{flow} ended {done.state}: {done.failure_reason}",
                                error_type="REJECTED" if rejected else None)
    decision = done.step("review").output
    return {"article": done.step("draft").output, "approved_by": decision["by"],
            "comment": decision["comment"], "workflow": flow}


async def approve_when_asked(target: str) -> None:
    """``--auto``: the person, played by a script: approve the first review request."""
    async with MeshClient(target) as mesh:
        while not (waiting := await mesh.list_approvals()):  # noqa: ASYNC110 - a person polls
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        await mesh.approve(waiting[0].name, comment="looks good", approver="auto-reviewer")


async def a2a_client(url: str, topic: str, grpc_address: str) -> bool:
    """The external A2A client: send the job, print what streams back."""
    # No read timeout: the stream stays quiet while the person reviews.
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
        client = await create_client(url, client_config=ClientConfig(streaming=True,
                                                                     httpx_client=http))
        card = (await http.get(f"{url}.well-known/agent-card.json")).json()
        print(f"A2A card: {card['name']}, skills: "
              f"{', '.join(s['id'] for s in card['skills'])}", flush=True)
        meta = a2a_pb2.SendMessageRequest().metadata
        meta.update({"skill": "write"})
        request = a2a_pb2.SendMessageRequest(message=a2a_pb2.Message(
            message_id=uuid.uuid4().hex, role=a2a_pb2.Role.ROLE_USER,
            parts=[a2a_pb2.Part(text=f"write an article about {topic}")]), metadata=meta)
        final = a2a_pb2.TASK_STATE_UNSPECIFIED
        async for event in client.send_message(request):
            kind = event.WhichOneof("payload")
            if kind == "task":
                print(f"A2A task {event.task.id} submitted\n", flush=True)
            elif kind == "artifact_update":
                art = event.artifact_update.artifact
                if art.artifact_id == "draft":
                    print("".join(p.text for p in art.parts), end="", flush=True)
                elif art.artifact_id == "result":
                    result = MessageToDict(art.parts[0].data)
                    print(f"\n\nfinal article (approved by {result['approved_by']}: "
                          f"{result['comment']!r}; {result['workflow']}):\n"
                          f"{result['article']}", flush=True)
            elif kind == "status_update":
                status = event.status_update.status
                final = status.state
                note = " ".join(p.text for p in status.message.parts)
                if note.startswith("waiting for a person"):
                    task = note.rsplit(" ", 1)[-1].removeprefix("tasks/")
                    print(f"\n\n{note}\n  approve: .venv/bin/agentmesh --server {grpc_address} "
                          f"approvals approve {task} --comment 'ship it'\n  reject:  "
                          f".venv/bin/agentmesh --server {grpc_address} approvals reject "
                          f"{task}", flush=True)
                elif note:
                    print(f"\n[{a2a_pb2.TaskState.Name(status.state)}] {note}", flush=True)
        await client.close()
    return final == a2a_pb2.TASK_STATE_COMPLETED


async def main(args: argparse.Namespace) -> int:
    settings = Settings(port=args.port, metrics_port=0, console_port=0,
                        a2a_port=args.a2a_port, log_format="console", log_level="WARNING")
    if not args.a2a_port:
        print("review_team.py: error: the example needs the A2A gateway (--a2a-port > 0)",
              file=sys.stderr)
        return 2
    async with running_server(settings) as mesh:
        print(f"agentmesh on {mesh.address}, A2A gateway on {mesh.a2a_url}", flush=True)
        team = [writer(mesh.address), editor(mesh.address)]
        async with asyncio.TaskGroup() as group:
            runs = [group.create_task(agent.run()) for agent in team]
            async with MeshClient(mesh.address) as client:
                while len(await client.list_agents()) < len(team):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            helper = group.create_task(approve_when_asked(mesh.address)) if args.auto else None
            try:
                ok = await a2a_client(mesh.a2a_url, args.topic, mesh.address)
            finally:
                if helper is not None:
                    helper.cancel()
                for agent in team:
                    await agent.stop(grace=2.0)
                for run in runs:
                    await run
    print("done" if ok else "the job did not complete", flush=True)
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topic", default="tide pools")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: any free one)")
    parser.add_argument("--a2a-port", type=int, default=41241, help="A2A gateway port")
    parser.add_argument("--auto", action="store_true",
                        help="approve the review automatically (no person needed)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except KeyboardInterrupt:
        sys.exit(130)

"""Run the research team end to end in one process.

Starts the embedded agentmesh server, connects the five agents of
``agents.py``, submits ``research_report.yaml``, prints every step change and
the reviewed report, then keeps serving (so you can poke at it with the
``agentmesh`` CLI) until Ctrl-C or SIGTERM, when the agents and then the server
drain. ``--once`` exits right after the report.

    python examples/run.py [--port 50051] [--topic "..."] [--flaky] [--once]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from agents import TEAM, build_team, wait_for_agents

from agent_sdk import MeshClient, WorkflowInfo, load_workflow_file
from server.app import running_server
from server.observability.logging import configure_logging
from server.settings import Settings

HERE = Path(__file__).resolve().parent
WORKFLOW_FILE = HERE / "research_report.yaml"

T = TypeVar("T")


async def follow(client: MeshClient, name: str) -> WorkflowInfo:
    """Print a line per step change until the workflow ends; return its final state."""
    started = time.monotonic()
    seen: dict[str, str] = {}
    async for workflow in client.watch_workflow(name):
        for step in workflow.steps:
            if seen.get(step.id) == step.state:
                continue
            seen[step.id] = step.state
            line = f"{time.monotonic() - started:6.2f}s  {step.id:<22} {step.state}"
            if isinstance(step.output, dict) and "by" in step.output:
                line += f" (by {step.output['by']})"
            if step.failure is not None and step.state != "SUCCEEDED":
                line += f" ({step.failure.error_type}: {step.failure.message})"
            print(line, flush=True)
        if workflow.done:
            return workflow
    return await client.wait_workflow(name)


async def report(address: str, topic: str | None) -> bool:
    """Submit the workflow, follow it and print the reviewed result; True on success."""
    spec = load_workflow_file(WORKFLOW_FILE)
    if topic:
        steps = tuple(dataclasses.replace(s, input={"topic": topic}) if s.id == "plan" else s
                      for s in spec.steps)
        spec = dataclasses.replace(spec, steps=steps)
    async with MeshClient(address) as client:
        workflow = await client.submit_workflow(spec)
        print(f"submitted {workflow.name} ({workflow.display_name})", flush=True)
        final = await follow(client, workflow.name)
    if final.state != "SUCCEEDED":
        print(f"workflow {final.state}: {final.failure_reason}", flush=True)
        return False
    result = final.step("review").output
    print(f"\nverdict: {result['verdict']}\n")
    print(result["text"], flush=True)
    return True


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await ``work``, or cancel it and return None as soon as ``stop`` is set."""
    job = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({job, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not job.done():
            job.cancel()
        await asyncio.gather(job, waiter, return_exceptions=True)
    return None if job.cancelled() else job.result()


async def run(args: argparse.Namespace) -> int:
    """Server, team, workflow; then serve until a signal; then drain everything."""
    configure_logging("console", args.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    settings = Settings(port=args.port, log_format="console", metrics_port=0,
                        console_port=args.console_port, a2a_port=args.a2a_port)
    ok: bool | None = None
    async with running_server(settings) as mesh:
        print(f"agentmesh serving on {mesh.address}", flush=True)
        if mesh.console is not None:
            print(f"console: {mesh.console.url}", flush=True)
        if mesh.a2a_url:
            print(f"A2A: {mesh.a2a_url} (try .venv/bin/python examples/review_team.py: a "
                  "writer streams its draft, a person approves it)", flush=True)
        team = build_team(mesh.address, flaky=args.flaky)
        async with asyncio.TaskGroup() as group:
            for agent in team:
                group.create_task(agent.run(install_signal_handlers=False))
            try:
                names = list(TEAM)
                async with MeshClient(mesh.address) as client:
                    await until_stopped(wait_for_agents(client, names), stop)
                if not stop.is_set():
                    print(f"{len(team)} agents ready: {', '.join(names)}\n", flush=True)
                    ok = await until_stopped(report(mesh.address, args.topic), stop)
                if ok is not None and not args.once:
                    print(f"\nstill serving on {mesh.address}; try "
                          f"`.venv/bin/agentmesh --server {mesh.address} stats`. Ctrl-C to stop.",
                          flush=True)
                    await stop.wait()
            finally:
                print("stopping: agents drain, then the server", flush=True)
                await asyncio.gather(*(agent.stop(grace=5.0) for agent in team))
        mesh.stopping.set()
        await mesh.drain()
    if ok is None:
        return 130
    return 0 if ok else 1


def main() -> int:
    """Parse the flags and run."""
    parser = argparse.ArgumentParser(description="Run the research team end to end.")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free one)")
    parser.add_argument("--console-port", type=int, default=8470,
                        help="web console port (0: off)")
    parser.add_argument("--a2a-port", type=int, default=41241,
                        help="A2A gateway port (0: off)")
    parser.add_argument("--topic", help="topic of the report (default: from the YAML)")
    parser.add_argument("--once", action="store_true", help="exit after printing the result")
    parser.add_argument("--flaky", action="store_true",
                        help="make the first history research attempt fail, to show retries")
    parser.add_argument("--log-level", default="WARNING", help="server log level")
    args = parser.parse_args()
    try:
        return asyncio.run(run(args))
    except OSError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

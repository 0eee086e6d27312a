"""A benchmark agent process: one capability whose handler echoes its input.

    .venv/bin/python loadtests/noop_agent.py --target HOST:PORT[,HOST:PORT...]
        [--capability noop] [--namespace default] [--concurrency 64] [--delay 0]

``--delay`` makes the handler sleep that many seconds before it answers (the
k6 stress scenario uses it so that 1,000 tasks really are in flight at once).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from agent_sdk import Agent, TaskContext


async def main() -> None:
    """Run one agent until SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--name", default="noop")
    parser.add_argument("--capability", default="noop")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds the handler sleeps before it answers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    agent = Agent(args.name, target=args.target.split(","), max_concurrency=args.concurrency,
                  namespace=args.namespace, token=os.environ.get("AGENTMESH_TOKEN") or None)
    delay = args.delay

    @agent.handler(args.capability)
    async def noop(task: TaskContext) -> object:
        if delay > 0:
            await asyncio.sleep(delay)
        return task.input

    await agent.run(install_signal_handlers=True)


if __name__ == "__main__":
    asyncio.run(main())

"""A benchmark agent process: one no-op capability."""

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
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    agent = Agent(args.name, target=args.target.split(","), max_concurrency=args.concurrency,
                  token=os.environ.get("AGENTMESH_TOKEN") or None)

    @agent.handler("noop")
    async def noop(task: TaskContext) -> object:
        return task.input

    await agent.run(install_signal_handlers=True)


if __name__ == "__main__":
    asyncio.run(main())

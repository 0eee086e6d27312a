"""A 15-line client: asks a `greet` agent for a greeting and prints it."""

import asyncio
import sys

from agent_sdk import MeshClient


async def main(target: str) -> None:
    async with MeshClient(target) as client:
        task = await client.submit_task("greet", {"name": "world"})
        done = await client.wait_task(task.name, timeout=30)
        print(task.name, done.state, done.output, f"(by {done.agent})")


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))

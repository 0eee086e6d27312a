"""A 15-line agent: offers `greet` until Ctrl-C (examples/quickstart in the docs)."""

import asyncio
import sys

from agent_sdk import Agent, TaskContext

agent = Agent("greeter", target=sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")


@agent.handler("greet")
async def greet(task: TaskContext) -> dict[str, str]:
    return {"greeting": f"hello, {task.input['name']}"}


asyncio.run(agent.run(install_signal_handlers=True))

"""Agent processes for the console's browser tests (run as a script, not collected).

    python tests/console_fleet.py TARGET ROLE [FIX_FILE]

ROLE ``team``: the research team of examples/agents.py, a ``stepper`` (capability
``step``: 0.4 s per task, so a workflow visibly advances step by step) and
``billing`` (capability ``job``: fails with ``LedgerDownError``, a retryable
error, until FIX_FILE exists, then succeeds). ROLE ``sleepy``: one agent
(``nap``) for the test to SIGSTOP. Runs until SIGTERM (the SDK drains).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from agent_sdk import Agent, TaskContext

ROOT = Path(__file__).resolve().parents[1]


class LedgerDownError(Exception):
    """The job's dependency is down (retryable)."""


def _team(target: str) -> list[Agent]:
    spec = importlib.util.spec_from_file_location("example_agents", ROOT / "examples" / "agents.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    agents: list[Agent] = module.build_team(target)
    return agents


def build(target: str, role: str, fix_file: str) -> list[Agent]:
    """The agents of one role."""
    token = os.environ.get("AGENTMESH_TOKEN") or None
    if role == "sleepy":
        sleepy = Agent("sleepy", target=target, token=token)

        @sleepy.handler("nap")
        async def nap(task: TaskContext) -> dict[str, Any]:
            return {"slept": True}

        return [sleepy]
    stepper = Agent("stepper", target=target, max_concurrency=4, labels={"pool": "steps"})

    @stepper.handler("step")
    async def step(task: TaskContext) -> dict[str, Any]:
        await asyncio.sleep(0.4)
        return {"step": task.input, "upstream": sorted(task.upstream or {})}

    billing = Agent("billing", target=target, max_concurrency=8, labels={"team": "payments"})

    @billing.handler("job")
    async def job(task: TaskContext) -> dict[str, Any]:
        if not await asyncio.to_thread(Path(fix_file).exists):
            raise LedgerDownError("the ledger is down")
        return {"charged": task.input}

    return [*_team(target), stepper, billing]


async def main() -> None:
    target, role = sys.argv[1], sys.argv[2]
    fix_file = sys.argv[3] if len(sys.argv) > 3 else "/nonexistent"
    agents = build(target, role, fix_file)
    async with asyncio.TaskGroup() as group:
        for agent in agents:
            group.create_task(agent.run(install_signal_handlers=True))


if __name__ == "__main__":
    asyncio.run(main())

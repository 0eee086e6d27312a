"""examples/review_team.py end to end: an A2A client submits, the editor runs the job as a
workflow draft -> review, the writer's draft streams back, a person (played by ``--auto``)
approves the review step, the final article comes back as the A2A result."""

from __future__ import annotations

import asyncio
import sys

from tests._services import free_port
from tests.test_cli import EXAMPLES, ROOT


async def test_review_team_example_runs_end_to_end() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "review_team.py"), "--auto", "--a2a-port",
        str(free_port()), "--topic", "tide pools", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, (text, err.decode())
    lines = text.splitlines()
    assert "A2A card: agentmesh, skills: draft, write" in lines
    assert any(line.startswith("Tide pools are a small world") for line in lines)  # streamed
    # the review is the workflow's step after the draft, and the result names that workflow
    waiting = next(line for line in lines if line.startswith("waiting for a person to review"))
    flow = waiting.rsplit("tasks/", 1)[1].removesuffix("-review")
    assert any("approvals approve" in line for line in lines)
    assert (f"final article (approved by auto-reviewer: 'looks good'; workflows/{flow}):"
            in lines)
    assert lines[-1] == "done"

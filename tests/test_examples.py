"""The examples the docs show really work: each runs as written against an embedded mesh.

- ``examples/quickstart/agent.py`` + ``client.py`` (docs/quickstart.md);
- ``examples/node-agent/agent.js`` (docs/protocol.md), a grpc-js agent with no
  SDK: tasks complete with its results, a bad input fails for good on the
  first attempt, a session the server ends (SESSION_ENDED) is re-established,
  and SIGTERM drains it and deregisters it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_sdk import MeshClient
from server.app import Mesh, running_server
from tests.conftest import embedded_settings

ROOT = Path(__file__).resolve().parent.parent
NODE_AGENT = ROOT / "examples" / "node-agent" / "agent.js"

pytestmark = pytest.mark.slow


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with running_server(embedded_settings(heartbeat_interval=0.5)) as running:
        yield running


async def _spawn(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """SIGTERM, wait for the exit; returns (status, stderr)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
    return proc.returncode if proc.returncode is not None else -1, err.decode()


async def _wait_agent(client: MeshClient, display_name: str, *, not_id: str = "") -> str:
    """The id of the live agent of that display name (a new one when ``not_id``)."""
    async with asyncio.timeout(15):
        while True:
            for agent in await client.list_agents():
                if agent.display_name == display_name and agent.state == "ACTIVE" \
                        and agent.id != not_id:
                    return agent.id
            await asyncio.sleep(0.05)


async def test_quickstart_agent_and_client(mesh: Mesh) -> None:
    agent = await _spawn(sys.executable, "examples/quickstart/agent.py", mesh.address)
    try:
        client = await _spawn(sys.executable, "examples/quickstart/client.py", mesh.address)
        async with asyncio.timeout(60):
            out, err = await client.communicate()
        assert client.returncode == 0, err.decode()
        line = out.decode().strip()
        assert " SUCCEEDED {'greeting': 'hello, world'} (by agents/" in line, line
        assert line.startswith("tasks/")
    finally:
        status, err = await _stop(agent)
    assert status == 0, err
    async with MeshClient(mesh.address) as c:
        gone = await c.list_agents(state="GONE")
        assert [a.display_name for a in gone] == ["greeter"], "SIGTERM should deregister"


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("node or node_modules/@grpc/grpc-js missing: run `make test` "
                        "(it runs npm install)")
        pytest.skip("needs node and `npm install` (make test does it)")
    return node


async def test_node_agent_runs_tasks_and_recovers(mesh: Mesh) -> None:
    node = _node()
    agent = await _spawn(node, str(NODE_AGENT), "--server", mesh.address,
                         "--name", "node-1", "--concurrency", "4")
    try:
        async with MeshClient(mesh.address) as client:
            first_id = await _wait_agent(client, "node-1")
            submitted = [await client.submit_task("shout", {"text": f"hello {i}"})
                         for i in range(40)]
            count = await client.submit_task("wordcount", {"text": "one two  three"})
            bad = await client.submit_task("shout", "not an object")
            async with asyncio.timeout(30):
                done = [await client.wait_task(t.name) for t in submitted]
                counted = await client.wait_task(count.name)
                refused = await client.wait_task(bad.name)
            assert [t.state for t in done] == ["SUCCEEDED"] * 40
            assert [t.output for t in done] == [
                {"text": f"HELLO {i}", "agent": "node-1"} for i in range(40)]
            assert all(t.attempt == 1 and t.agent.endswith(first_id) for t in done)
            assert counted.state == "SUCCEEDED" and counted.output == {"words": 3}
            # Bad input: non-retryable, so FAILED at once, not retried or dead-lettered.
            assert refused.state == "FAILED" and refused.attempt == 1
            assert refused.failure is not None and refused.failure.error_type == "InvalidInput"

            # The server ends the session (as when heartbeats stop): its streams end
            # with SESSION_ENDED and the agent registers again under a new id.
            await mesh.registry.mark_gone(first_id, "test ends the session")
            second_id = await _wait_agent(client, "node-1", not_id=first_id)
            again = await client.run_task("shout", {"text": "again"}, wait_timeout=30)
            assert again == {"text": "AGAIN", "agent": "node-1"}
            latest = (await client.list_tasks(capability="shout", limit=1))[0]
            assert latest.agent.endswith(second_id)
    finally:
        status, err = await _stop(agent)
    assert status == 0, err
    assert "deregistered" in err, err
    async with MeshClient(mesh.address) as c:
        live = [a for a in await c.list_agents() if a.display_name == "node-1"]
        assert live == [], f"SIGTERM should deregister the node agent: {live}"

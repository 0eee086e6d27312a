"""The CLI side of every console action: drain an agent, re-drive or cancel by filter.

``agentmesh agents drain``, ``tasks retry-all``, ``tasks cancel-all`` and the
``tasks list`` filters (labels, times) over the DrainAgent, BulkRetryTasks and
BulkCancelTasks RPCs; bad input is one line and exit status 2.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent_sdk import Agent, MeshClient, RetryPolicy, TaskContext
from server.app import Mesh, running_server
from server.cli import EXIT_OK, EXIT_USAGE, main_async, parse_time
from tests.conftest import embedded_settings
from tests.test_cli import assert_one_error_line, cli

NO_RETRY = RetryPolicy(max_attempts=1)


class DownError(Exception):
    """Retryable: with one attempt allowed, the task is dead-lettered."""


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with running_server(embedded_settings(breaker_fail_max=1000)) as running:
        yield running


@pytest.fixture
async def worker(mesh: Mesh) -> AsyncIterator[dict[str, bool]]:
    broken = {"on": True}
    agent = Agent("cli-worker", target=mesh.address, max_concurrency=8)

    @agent.handler("job")
    async def job(task: TaskContext) -> object:
        if broken["on"]:
            raise DownError("down")
        return task.input

    run = asyncio.create_task(agent.run())
    async with MeshClient(mesh.address) as client, asyncio.timeout(10):
        while not await client.list_agents():  # noqa: ASYNC110 - polls the mesh
            await asyncio.sleep(0.02)
    yield broken
    await agent.stop(grace=1.0)
    await run


async def test_retry_all_by_label_moves_exactly_the_matching_tasks(
        mesh: Mesh, worker: dict[str, bool], capsys: pytest.CaptureFixture[str]) -> None:
    server = ("--server", mesh.address)
    async with MeshClient(mesh.address) as client:
        blue = [(await client.submit_task("job", i, labels={"team": "blue"}, retry=NO_RETRY)).id
                for i in range(3)]
        red = [(await client.submit_task("job", i, labels={"team": "red"}, retry=NO_RETRY)).id
               for i in range(2)]
        for task_id in blue + red:
            await client.wait_task(task_id, timeout=10)
        status, out, _ = await cli(capsys, *server, "--json", "tasks", "list", "--label",
                                   "team=blue", "--state", "dead_lettered", "--since", "5m")
        assert status == EXIT_OK
        assert "team" in out and all(t in out for t in blue) and not any(t in out for t in red)
        status, out, err = await cli(capsys, *server, "tasks", "retry-all", "--label",
                                     "team=blue", "--dry-run")
        assert status == EXIT_OK and sorted(out.split()) == sorted(blue)
        assert "3 task(s) would be re-driven" in err
        assert {t.id for t in await client.list_tasks(state="DEAD_LETTERED")} == {*blue, *red}
        worker["on"] = False
        status, out, err = await cli(capsys, *server, "tasks", "retry-all", "--label",
                                     "team=blue", "--yes")
        assert status == EXIT_OK and sorted(out.split()) == sorted(blue), err
        for task_id in blue:
            assert (await client.wait_task(task_id, timeout=10)).state == "SUCCEEDED"
        assert {t.id for t in await client.list_tasks(state="DEAD_LETTERED")} == set(red)


async def test_cancel_all_and_drain(mesh: Mesh, worker: dict[str, bool],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    server = ("--server", mesh.address)
    async with MeshClient(mesh.address) as client:
        waiting = [(await client.submit_task("nobody", i, labels={"batch": "7"})).id
                   for i in range(4)]
        other = await client.submit_task("nobody", 9)
        status, out, _ = await cli(capsys, *server, "tasks", "cancel-all", "--label",
                                   "batch=7", "--reason", "bad batch", "--yes")
        assert status == EXIT_OK and sorted(out.split()) == sorted(waiting)
        for task_id in waiting:
            task = await client.get_task(task_id)
            assert task.state == "CANCELLED" and task.failure is not None
            assert task.failure.message == "bad batch"
        assert (await client.get_task(other.id)).state == "QUEUED"
        status, out, _ = await cli(capsys, *server, "agents", "drain", "cli-worker",
                                   "--reason", "maintenance")
        assert status == EXIT_OK and "cli-worker DRAINING" in out
        # Told to drain (leave), the SDK agent finishes and stops: no new session.
        async with asyncio.timeout(10):
            while await _live_agents(client):  # noqa: ASYNC110 - polls the mesh
                await asyncio.sleep(0.05)
        [agent] = await client.list_agents(state="GONE")
        assert agent.display_name == "cli-worker"


async def _live_agents(client: MeshClient) -> bool:
    return bool(await client.list_agents(state="ACTIVE")
                or await client.list_agents(state="DRAINING"))


async def test_bulk_and_filter_bad_input_is_one_line(
        mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    server = ("--server", mesh.address)
    # Refused by the server (INVALID_ARGUMENT naming the field): bad input, exit status 2.
    for argv, fragment in (
            (["tasks", "retry-all", "--yes", "--state", "running"], "state: RUNNING tasks "
             "cannot be re-driven"),
            (["tasks", "cancel-all", "--yes", "--state", "succeeded"], "have ended"),
            (["tasks", "retry-all", "--yes", "--max", "20000"], "max_tasks")):
        status, _, err = await cli(capsys, *server, *argv)
        assert status == EXIT_USAGE, (argv, status, err)
        assert_one_error_line(err, "INVALID_ARGUMENT", fragment)
    # Refused before any call (bad flags): exit status 2.
    for argv, fragment in (
            (["tasks", "list", "--label", "nokey"], "expected KEY=VALUE"),
            (["tasks", "list", "--since", "yesterday"], "invalid time for --since"),
            (["tasks", "retry-all"], "pass --yes")):
        status, _, err = await cli(capsys, *server, *argv)
        assert status == EXIT_USAGE, (argv, status, err)
        assert_one_error_line(err, fragment)
    status, _, err = await cli(capsys, *server, "agents", "drain", "no-such-agent")
    assert status != EXIT_OK
    assert_one_error_line(err, "no-such-agent")


def test_parse_time_accepts_iso_and_ages() -> None:
    assert parse_time("2026-01-31T03:00", "--since") == 1769828400.0
    assert parse_time("2026-01-31T03:00+01:00", "--since") == 1769824800.0
    assert 0 < parse_time("15m", "--since") < parse_time("1m", "--since")


async def test_cli_usage_of_the_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["agents", "drain", "--help"], ["tasks", "retry-all", "--help"],
                 ["tasks", "cancel-all", "--help"]):
        assert await main_async(argv) == EXIT_OK
    assert "--label" in capsys.readouterr().out

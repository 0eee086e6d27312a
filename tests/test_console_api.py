"""The console's HTTP API against a live mesh (aiohttp client, no browser).

What the browser tests (tests/test_console_browser.py) show through the
page, checked here at the API: aggregates, filters and their errors, the
bulk actions moving exactly the matching tasks with an audit record, the
roles of the gRPC table applied to every route, the live stream, and the
settings that turn the console on and off.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from agent_sdk import Agent, MeshClient, RetryPolicy, TaskContext
from agent_sdk.errors import PermissionDeniedError
from server.api.auth import generate_token, hash_token
from server.app import Mesh, running_server
from server.console.access import CSRF_HEADER
from server.console.routes import ROUTES
from server.netutil import PortInUseError
from server.settings import DEFAULT_CONSOLE_PORT, Settings
from tests._services import free_port
from tests.conftest import embedded_settings

ACT = {CSRF_HEADER: "1"}


class BrokenJobError(Exception):
    """A retryable failure: with one attempt allowed, the task is dead-lettered."""

NO_RETRY = RetryPolicy(max_attempts=1)


async def _get(session: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, Any]:
    async with session.get(url, params=params) as r:
        return r.status, await r.json()


async def _post(session: aiohttp.ClientSession, url: str, body: object = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with session.post(url, json=body or {}, headers=ACT if headers is None else headers) \
            as r:
        return r.status, await r.json()


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    settings = embedded_settings(console_port=free_port(), breaker_fail_max=1000)
    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def http(mesh: Mesh) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    assert mesh.console is not None
    async with aiohttp.ClientSession() as session:
        yield session, mesh.console.url.rstrip("/")


@pytest.fixture
async def flaky(mesh: Mesh) -> AsyncIterator[dict[str, bool]]:
    """An agent whose ``job`` fails while ``broken["on"]`` and succeeds after."""
    broken = {"on": True}
    agent = Agent("console-worker", target=mesh.address, max_concurrency=8)

    @agent.handler("job")
    async def job(task: TaskContext) -> dict[str, object]:
        if broken["on"]:
            raise BrokenJobError("the job is broken")
        return {"done": task.input}

    run = asyncio.create_task(agent.run())
    async with MeshClient(mesh.address) as client, asyncio.timeout(10):
        while not await client.list_agents():  # noqa: ASYNC110 - polls the mesh
            await asyncio.sleep(0.02)
    yield broken
    await agent.stop(grace=1.0)
    await run


async def _dead(client: MeshClient, count: int, **labels: str) -> list[str]:
    """Submit ``count`` jobs that fail for good (dead letters once retries are spent)."""
    ids = [(await client.submit_task("job", {"n": i}, labels=labels, retry=NO_RETRY)).id
           for i in range(count)]
    async with asyncio.timeout(10):
        for task_id in ids:
            await client.wait_task(task_id)
    return ids


async def test_overview_counts_agents_tasks_and_unschedulable(
        mesh: Mesh, http: tuple[aiohttp.ClientSession, str], flaky: dict[str, bool]) -> None:
    session, url = http
    async with MeshClient(mesh.address) as client:
        await _dead(client, 2)
        await client.submit_task("nobody-offers-this", {})
    status, body = await _get(session, f"{url}/api/overview")
    assert status == 200
    assert body["agents"]["by_state"]["ACTIVE"] == 1
    assert body["tasks"]["by_state"]["DEAD_LETTERED"] + body["tasks"]["by_state"]["FAILED"] == 2
    assert body["unschedulable"] == ["nobody-offers-this"]
    job = next(c for c in body["capabilities"] if c["capability"] == "job")
    assert job["agents"] == 1 and not job["unschedulable"]
    failed = sum(b["failed"] for b in body["throughput"]["buckets"])
    assert failed == 2, body["throughput"]


async def test_bad_filters_name_the_field(http: tuple[aiohttp.ClientSession, str]) -> None:
    session, url = http
    for params, field in ([{"state": "SLEEPING"}, "state"], [{"label": "team"}, "label"],
                          [{"since": "yesterday"}, "since"],
                          [{"capability": "bad cap!"}, "capability"],
                          [{"since": "2h", "until": "3h"}, "until"],
                          [{"page_token": "forged"}, "page_token"],
                          [{"namespace": "Not_A_Namespace"}, "namespace"]):
        status, body = await _get(session, f"{url}/api/tasks", **params)
        assert status == 400, (params, body)
        assert body["error"]["code"] == "INVALID_ARGUMENT"
        assert body["error"]["field"] == field, body
    status, body = await _get(session, f"{url}/api/tasks/no-such-task")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = await _get(session, f"{url}/api/nothing-here")
    assert status == 404


async def test_bulk_redrive_moves_exactly_the_matching_dead_letters(
        mesh: Mesh, http: tuple[aiohttp.ClientSession, str], flaky: dict[str, bool]) -> None:
    session, url = http
    async with MeshClient(mesh.address) as client:
        blue = await _dead(client, 3, team="blue")
        red = await _dead(client, 2, team="red")
        dead = {t.id for t in await client.list_tasks(state="DEAD_LETTERED")}
        assert dead == set(blue) | set(red)
        flaky["on"] = False
        body = {"filter": {"label": "team=blue"}, "dry_run": True}
        status, preview = await _post(session, f"{url}/api/tasks/bulk-retry", body)
        assert status == 200 and sorted(preview["task_ids"]) == sorted(blue)
        assert {t.id for t in await client.list_tasks(state="DEAD_LETTERED")} == dead
        status, done = await _post(session, f"{url}/api/tasks/bulk-retry",
                                   {"filter": {"label": "team=blue"}})
        assert status == 200 and sorted(done["task_ids"]) == sorted(blue)
        async with asyncio.timeout(10):
            for task_id in blue:
                assert (await client.wait_task(task_id)).state == "SUCCEEDED"
        left = {t.id for t in await client.list_tasks(state="DEAD_LETTERED")}
        assert left == set(red)
    status, audit = await _get(session, f"{url}/api/audit")
    actions = [(r["action"], r["resource"], r["outcome"]) for r in audit["records"]]
    assert ("bulk-redrive", "tasks?label=team=blue", "ok") in actions
    assert sum(1 for a, _, _ in actions if a == "redrive") == 3


async def test_task_page_shows_payloads_attempts_and_tokens(
        mesh: Mesh, http: tuple[aiohttp.ClientSession, str], flaky: dict[str, bool]) -> None:
    session, url = http
    async with MeshClient(mesh.address) as client:
        [task_id] = await _dead(client, 1)
        flaky["on"] = False
        status, _ = await _post(session, f"{url}/api/tasks/{task_id}/retry")
        assert status == 200
        async with asyncio.timeout(10):
            await client.wait_task(task_id)
    status, body = await _get(session, f"{url}/api/tasks/{task_id}")
    task = body["task"]
    assert status == 200 and task["state"] == "SUCCEEDED" and task["human_intervened"]
    assert task["input"]["kind"] == "json" and json.loads(task["input"]["text"]) == {"n": 0}
    assert json.loads(task["output"]["text"]) == {"done": {"n": 0}}
    assert [a["agent_name"] for a in task["attempts"]] == ["console-worker"] * 2
    assert task["attempts"][0]["error"].startswith("BrokenJobError")
    assert task["fencing_token"] >= 2


async def test_drain_one_agent_from_the_console(
        mesh: Mesh, http: tuple[aiohttp.ClientSession, str], flaky: dict[str, bool]) -> None:
    session, url = http
    status, body = await _get(session, f"{url}/api/agents")
    [card] = body["agents"]
    assert card["health"] == "ok" and card["name"] == "console-worker"
    status, body = await _post(session, f"{url}/api/agents/{card['id']}/drain",
                               {"reason": "maintenance"})
    assert status == 200 and body["agent"]["state"] in ("DRAINING", "GONE")
    status, body = await _post(session, f"{url}/api/agents/{card['id']}/drain", {},
                               headers={})
    assert status == 403 and body["error"]["reason"] == "CSRF_HEADER_MISSING"


async def test_sse_stream_announces_task_changes(
        mesh: Mesh, http: tuple[aiohttp.ClientSession, str]) -> None:
    session, url = http
    async with session.get(f"{url}/api/events") as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        first = await stream.content.readuntil(b"\n\n")
        assert b"event: hello" in first
        async with MeshClient(mesh.address) as client:
            task = await client.submit_task("anything", {})
        async with asyncio.timeout(5):
            while True:
                chunk = (await stream.content.readuntil(b"\n\n")).decode()
                if "event: change" in chunk:
                    data = json.loads(chunk.split("data: ", 1)[1])
                    if f"task:{task.id}" in data["topics"]:
                        break
        assert "tasks" in data["topics"]


# -- roles -------------------------------------------------------------------------

ROLES = {"root": "admin", "ops-viewer": "viewer", "app": "client"}
TOKENS = {name: generate_token() for name in ROLES}


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Mesh]:
    doc = {"principals": [{"name": n, "role": r, "namespaces": ["*"],
                           "token_sha256": hash_token(TOKENS[n])} for n, r in ROLES.items()]}
    (tmp_path / "auth.yaml").write_text(yaml.safe_dump(doc))
    settings = embedded_settings(console_port=free_port(), auth_file=str(tmp_path / "auth.yaml"))
    async with running_server(settings) as running:
        yield running


async def test_every_route_applies_the_grpc_roles(secured: Mesh) -> None:
    """Each route with an rpc: no token -> 401; a role gRPC refuses -> 403; else not."""
    assert secured.console is not None
    url = secured.console.url.rstrip("/")
    from server.api.auth import RPC_ROLES  # noqa: PLC0415
    async with aiohttp.ClientSession() as session:
        for route in ROUTES:
            if route.rpc is None:
                continue
            path = route.path.replace("{id}", "x1")
            call = session.get if route.method == "GET" else session.post
            async with call(f"{url}{path}", headers=ACT) as r:
                assert r.status == 401, (route.path, r.status)
            for name, role in ROLES.items():
                headers = {**ACT, "Authorization": f"Bearer {TOKENS[name]}"}
                kw: dict[str, Any] = {"headers": headers}
                if route.method == "POST":
                    kw["json"] = {"filter": {"state": "DEAD_LETTERED"}, "dry_run": True}
                if route.path == "/api/events":
                    kw["timeout"] = aiohttp.ClientTimeout(sock_read=0.5)
                async with call(f"{url}{path}", **kw) as r:
                    allowed = role in {str(x) for x in RPC_ROLES[route.rpc]}
                    if allowed:
                        assert r.status not in (401, 403), (route.path, role, r.status)
                    else:
                        assert r.status == 403, (route.path, role, r.status)


async def test_viewer_signs_in_reads_and_cannot_act(secured: Mesh) -> None:
    assert secured.console is not None
    url = secured.console.url.rstrip("/")
    # A cookie of an IP-address host: browsers keep it; aiohttp only when "unsafe".
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        status, who = await _get(session, f"{url}/api/session")
        assert status == 200 and who["auth"] and who["principal"] is None
        status, body = await _post(session, f"{url}/api/login", {"token": "amt_wrong"})
        assert status == 401
        status, body = await _post(session, f"{url}/api/login",
                                   {"token": TOKENS["ops-viewer"]})
        assert status == 200 and body["role"] == "viewer"
        status, who = await _get(session, f"{url}/api/session")
        assert who["principal"] == "ops-viewer" and not who["actions"]["BulkRetryTasks"]
        assert (await _get(session, f"{url}/api/overview"))[0] == 200
        status, body = await _post(session, f"{url}/api/tasks/bulk-retry", {"filter": {}})
        assert status == 403 and body["error"]["reason"] == "ROLE_DENIED"
    async with MeshClient(secured.address, token=TOKENS["ops-viewer"]) as client:
        with pytest.raises(PermissionDeniedError):
            await client.bulk_retry_tasks(dry_run=True)
        assert await client.list_tasks() == []


# -- settings --------------------------------------------------------------------------

def test_console_is_on_in_the_embedded_mode_and_off_with_a_shared_store() -> None:
    assert Settings().console_port_effective == DEFAULT_CONSOLE_PORT
    assert Settings(console_port=0).console_port_effective is None
    assert Settings(store="redis").console_port_effective is None  # type: ignore[call-arg]
    assert Settings(store="redis", console_port=9000).console_port_effective == 9000  # type: ignore[call-arg]


async def test_console_port_in_use_is_a_port_in_use_error() -> None:
    port = free_port()
    async with running_server(embedded_settings(console_port=port)):
        with pytest.raises(PortInUseError, match=f"port {port} is already in use \\(console"):
            async with running_server(embedded_settings(console_port=port)):
                pass

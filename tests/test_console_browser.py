"""The web console in a real browser: Debian's chromium driven by Playwright.

A live mesh (``running_server``, console on a free port) with real agent
processes (tests/console_fleet.py); the browser sees what an operator sees.
Nothing downloads a browser: Playwright launches /usr/bin/chromium
(``make system-deps`` installs it). Screenshots go to ``$AGENTMESH_CONSOLE_SHOTS``
when set (docs/images/console holds the ones the docs show), else to the
test's tmp directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from agent_sdk import MeshClient, RetryPolicy, StepSpec, WorkflowSpec
from server.api.auth import generate_token, hash_token
from server.app import Mesh, running_server
from tests._services import free_port, skip_or_fail
from tests.conftest import embedded_settings

# One browser, one mesh and one fleet for the module (their start-up is most of
# the cost); each test uses its own tasks, labels and workflows.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "tests" / "console_fleet.py"
NO_RETRY = RetryPolicy(max_attempts=1)

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the dev extra brings it
    async_playwright = None  # type: ignore[assignment]


def _settings(**extra: Any) -> Any:
    # One-second beats and five misses: a paused agent is "late", then "not
    # beating", for a few seconds before it is declared GONE.
    return embedded_settings(console_port=free_port(), heartbeat_interval=1.0,
                             heartbeat_misses=5, breaker_fail_max=1000, **extra)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None:
        skip_or_fail("playwright is not installed (pip install -e '.[dev]')")
    if not HAVE_CHROMIUM:
        skip_or_fail("chromium is not installed (make system-deps)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = Path(os.environ.get("AGENTMESH_CONSOLE_SHOTS") or tmp_path_factory.mktemp("shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


class Fleet:
    """Agent processes started for a test and stopped (SIGTERM, then SIGKILL) after."""

    def __init__(self, mesh: Mesh, fix_file: Path, env: dict[str, str] | None = None) -> None:
        self.mesh = mesh
        self.fix_file = fix_file
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}", **(env or {})}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, str(FLEET), self.mesh.address, role,
                                 str(self.fix_file)], env=self.env, cwd=ROOT)
        self.procs[role] = proc
        return proc

    async def stop(self) -> None:
        # Their drain is not under test here: SIGKILL, and wait for each.
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            await asyncio.to_thread(proc.wait)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Mesh, Fleet]]:
    tmp = tmp_path_factory.mktemp("live")
    async with running_server(_settings(blob=str(tmp / "snapshots"))) as mesh:
        fleet = Fleet(mesh, tmp / "ledger-fixed")
        fleet.start("team")
        fleet.start("sleepy")
        try:
            async with MeshClient(mesh.address) as client:
                await _wait_agents(client, 8)
            yield mesh, fleet
        finally:
            await fleet.stop()


async def _open(browser: Browser, mesh: Mesh, path: str = "/") -> Page:
    assert mesh.console is not None
    page = await browser.new_page(viewport={"width": 1300, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(15_000)
    await page.goto(mesh.console.url.rstrip("/") + path)
    page.errors = errors  # type: ignore[attr-defined]
    return page


async def _wait_agents(client: MeshClient, count: int) -> None:
    async with asyncio.timeout(30):
        while len(await client.list_agents()) < count:  # noqa: ASYNC110 - polls the mesh
            await asyncio.sleep(0.1)


# -- the fleet, a workflow drawn live, a hung agent ------------------------------------

async def test_fleet_workflow_draws_live_and_hung_agent_stands_out(
        live: tuple[Mesh, Fleet], browser: Browser, shots: Path) -> None:
    mesh, fleet = live
    sleepy = fleet.procs["sleepy"]
    async with MeshClient(mesh.address) as client:
        page = await _open(browser, mesh, "/agents")
        await expect(page.locator(".agent-card")).to_have_count(8)
        for name in ("planner", "researcher-1", "writer", "stepper", "billing", "sleepy"):
            await expect(page.locator(f'.agent-card[data-agent="{name}"]')).to_be_visible()
        await page.goto(mesh.console.url + "")  # type: ignore[union-attr]
        await expect(page.get_by_test_id("agents-card")).to_contain_text("8 active")

        # A three-step chain and a fan-in, 0.4 s a step: drawn, then green step by step.
        spec = WorkflowSpec("chain", (
            StepSpec("fetch", "step", {"n": 1}), StepSpec("parse", "step", depends_on=("fetch",)),
            StepSpec("enrich", "step", depends_on=("fetch",)),
            StepSpec("store", "step", depends_on=("parse", "enrich"))))
        wf = await client.submit_workflow(spec)
        await page.goto(f"{mesh.console.url}workflows/{wf.id}")  # type: ignore[union-attr]
        nodes = page.locator("svg.dag g.node")
        await expect(nodes).to_have_count(4)
        await page.evaluate("window.__noReload = true")
        seen: list[tuple[str, ...]] = []
        shot = False
        async with asyncio.timeout(20):
            while True:
                states = tuple([await n.get_attribute("data-state") or "" for n in
                                await nodes.all()])
                if not seen or seen[-1] != states:
                    seen.append(states)
                    if not shot and 0 < states.count("SUCCEEDED") < 4:
                        shot = True
                        await page.screenshot(path=shots / "console-workflow-running.png")
                if all(s == "SUCCEEDED" for s in states):
                    break
                await asyncio.sleep(0.05)
        # The page changed under the same document (pushed, not reloaded)...
        assert await page.evaluate("window.__noReload === true")
        # ...and passed through intermediate states: some steps green, others not yet.
        partial = [s for s in seen if 0 < sum(x == "SUCCEEDED" for x in s) < 4]
        assert partial, seen
        await expect(page.locator(".badge").first).to_have_text("SUCCEEDED")
        await page.screenshot(path=shots / "console-workflow.png")

        # Click a step: its task page, with the output as pretty JSON.
        await page.locator('svg.dag g.node[data-step="store"]').click()
        await expect(page).to_have_url(f"{mesh.console.url}tasks/{wf.id}-store")  # type: ignore[union-attr]
        await expect(page.locator('pre[data-kind="json"]').last).to_contain_text('"upstream"')
        await expect(page.get_by_test_id("attempts")).to_contain_text("stepper")
        await expect(page.get_by_test_id("fencing")).to_have_text("1")
        await page.screenshot(path=shots / "console-task.png", full_page=True)

        # A hung agent (SIGSTOP: its stream stays open, its beats stop) stands out.
        await page.goto(f"{mesh.console.url}agents")  # type: ignore[union-attr]
        sleepy.send_signal(signal.SIGSTOP)
        card = page.locator('.agent-card[data-agent="sleepy"]')
        await expect(card).to_have_attribute("data-health", "hung", timeout=8000)
        await expect(card).to_contain_text("not beating")
        await page.screenshot(path=shots / "console-agents-hung.png")
        await page.goto(mesh.console.url)  # type: ignore[arg-type]
        await expect(page.get_by_test_id("troubled")).to_contain_text("sleepy")
        await page.screenshot(path=shots / "console-overview.png")
        sleepy.send_signal(signal.SIGCONT)
    assert page.errors == []  # type: ignore[attr-defined]


# -- dead letters: re-drive one, bulk re-drive by filter, bad filter input -----------

async def test_dead_letters_redrive_one_and_bulk_by_filter(
        live: tuple[Mesh, Fleet], browser: Browser, shots: Path) -> None:
    mesh, fleet = live
    async with MeshClient(mesh.address) as client:
        blue = [(await client.submit_task("job", {"invoice": i}, labels={"team": "blue"},
                                          retry=NO_RETRY)).id for i in range(3)]
        red = [(await client.submit_task("job", {"invoice": 10 + i}, labels={"team": "red"},
                                         retry=NO_RETRY)).id for i in range(2)]
        async with asyncio.timeout(15):
            for task_id in blue + red:
                assert (await client.wait_task(task_id)).state == "DEAD_LETTERED"

        page = await _open(browser, mesh, "/dead-letters")
        await expect(page.locator("tr[data-task]")).to_have_count(5)
        await expect(page.get_by_test_id("dead-table")).to_contain_text("LedgerDownError")

        # Bad input in a filter: a clear message naming the field, the field marked.
        await page.locator('input[name="label"]').fill("team")
        await page.get_by_role("button", name="Apply").click()
        alert = page.get_by_role("alert").first
        await expect(alert).to_contain_text("label")
        await expect(alert).to_contain_text("is not key=value")
        await expect(page.locator('input[name="label"]')).to_have_class("bad")
        await page.locator('input[name="since"]').fill("last tuesday")
        await page.locator('input[name="label"]').fill("")
        await page.get_by_role("button", name="Apply").click()
        await expect(page.get_by_role("alert").first).to_contain_text("since")
        await page.screenshot(path=shots / "console-bad-filter.png")

        # The ledger is back: re-drive one dead letter from its task page; it succeeds.
        fleet.fix_file.write_text("fixed")
        first = blue[0]
        await page.goto(f"{mesh.console.url}tasks/{first}")  # type: ignore[union-attr]
        await page.get_by_test_id("retry").click()
        await page.get_by_test_id("confirm").click()
        await expect(page.locator("h2 .badge")).to_have_text("SUCCEEDED")
        await expect(page.get_by_test_id("attempts").locator("tbody tr")).to_have_count(2)

        # Bulk: every dead letter labelled team=blue (the two left), and only those.
        await page.goto(f"{mesh.console.url}dead-letters?label=team%3Dblue")  # type: ignore[union-attr]
        await expect(page.locator("tr[data-task]")).to_have_count(2)
        await page.get_by_test_id("bulk-retry").click()
        await expect(page.get_by_test_id("bulk-count")).to_contain_text("2 task(s) match")
        await expect(page.get_by_test_id("bulk-count")).to_contain_text("label team=blue")
        await page.screenshot(path=shots / "console-bulk-confirm.png")
        await page.get_by_test_id("confirm").click()
        await expect(page.get_by_test_id("bulk-result")).to_contain_text("Re-drove 2 task(s)")
        await expect(page.get_by_test_id("empty")).to_be_visible()
        async with asyncio.timeout(15):
            for task_id in blue:
                assert (await client.wait_task(task_id)).state == "SUCCEEDED"
        for task_id in red:
            assert (await client.get_task(task_id)).state == "DEAD_LETTERED"
        await page.goto(f"{mesh.console.url}dead-letters")  # type: ignore[union-attr]
        await expect(page.locator("tr[data-task]")).to_have_count(2)
        audit = page.get_by_test_id("audit")
        await expect(audit).to_contain_text("bulk-redrive")
        await expect(audit).to_contain_text("tasks?label=team=blue&state=DEAD_LETTERED")
        await page.screenshot(path=shots / "console-dead-letters.png", full_page=True)
    assert page.errors == []  # type: ignore[attr-defined]


# -- a viewer cannot act ---------------------------------------------------------------

async def test_viewer_sees_but_cannot_act(browser: Browser, tmp_path: Path,
                                          shots: Path) -> None:
    tokens = {"root": generate_token(), "night-viewer": generate_token()}
    roles = {"root": "admin", "night-viewer": "viewer"}
    doc = {"principals": [{"name": n, "role": roles[n], "namespaces": ["*"],
                           "token_sha256": hash_token(t)} for n, t in tokens.items()]}
    (tmp_path / "auth.yaml").write_text(yaml.safe_dump(doc))
    settings = _settings(auth_file=str(tmp_path / "auth.yaml"), blob=str(tmp_path / "s"))
    async with running_server(settings) as mesh, \
            MeshClient(mesh.address, token=tokens["root"]) as admin:
        task = await admin.submit_task("nobody-offers-this", {"x": 1})
        await admin.cancel_task(task.id, "test")  # CANCELLED: an admin may re-drive it

        async def sign_in(name: str) -> Page:
            page = await _open(browser, mesh, f"/tasks/{task.id}")
            await page.locator('input[name="token"]').fill(tokens[name])
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.locator(".who")).to_contain_text(name)
            return page

        admin_page = await sign_in("root")
        await expect(admin_page.get_by_test_id("retry")).to_be_visible()  # the control
        await admin_page.close()

        page = await sign_in("night-viewer")
        await expect(page.locator("h2 .badge")).to_have_text("CANCELLED")
        await expect(page.get_by_test_id("retry")).to_have_count(0)
        await page.goto(f"{mesh.console.url}tasks?state=CANCELLED")  # type: ignore[union-attr]
        await expect(page.locator("tr[data-task]")).to_have_count(1)
        await expect(page.get_by_test_id("bulk-retry")).to_have_count(0)
        await page.screenshot(path=shots / "console-viewer.png")
        # Forcing the request anyway: refused by the server, as gRPC would.
        status = await page.evaluate(
            """async (id) => (await fetch(`/api/tasks/${id}/retry`, {method: 'POST',
                 headers: {'X-AgentMesh-Console': '1', 'Content-Type': 'application/json'},
                 body: '{}'})).status""", task.id)
        assert status == 403
        assert (await admin.get_task(task.id)).state == "CANCELLED"

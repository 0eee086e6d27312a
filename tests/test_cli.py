"""The ``agentmesh`` CLI and the examples, against a real embedded server and real agents.

Happy paths await `server.cli.main_async` on the test's event loop, next to
the server (gRPC's asyncio stack wants one loop per process, so `main` with
its own `asyncio.run` cannot share the process with a running server). Error
paths run ``python -m server.cli`` as a subprocess, so "one line on stderr, no
traceback" covers the whole process, including gRPC's own output at exit.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest

from agent_sdk import Agent, MeshClient, TaskContext
from agent_sdk.errors import NonRetryableError
from server.app import Mesh, running_server
from server.cli import main, main_async
from server.settings import Settings
from tests._services import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WORKFLOW = EXAMPLES / "research_report.yaml"

CLIResult = tuple[int, str, str]


def _load_example_agents() -> ModuleType:
    """examples/agents.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("example_agents", EXAMPLES / "agents.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example_agents = _load_example_agents()


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    """An embedded control plane on a free loopback port."""
    settings = Settings(port=0, metrics_port=0, console_port=0, heartbeat_interval=0.2,
                        tick=0.02,
                        drain_grace=0.5)
    async with running_server(settings) as running:
        yield running


async def _run_agents(mesh: Mesh, agents: list[Agent],
                      names: list[str]) -> list[asyncio.Task[None]]:
    runs = [asyncio.create_task(agent.run()) for agent in agents]
    async with MeshClient(mesh.address) as client, asyncio.timeout(5):
        await example_agents.wait_for_agents(client, names)
    return runs


async def _stop_agents(agents: list[Agent], runs: list[asyncio.Task[None]]) -> None:
    await asyncio.gather(*(agent.stop(grace=1.0) for agent in agents))
    await asyncio.gather(*runs)


@pytest.fixture
async def echo_agent(mesh: Mesh) -> AsyncIterator[Agent]:
    """A real agent offering ``echo`` (returns its input) and ``fail`` (never succeeds)."""
    agent = Agent("cli-echo", target=mesh.address)

    @agent.handler("echo")
    async def echo(task: TaskContext) -> dict[str, object]:
        return {"echo": task.input}

    @agent.handler("fail")
    async def fail(task: TaskContext) -> None:
        raise NonRetryableError("this handler always fails", "Broken")

    runs = await _run_agents(mesh, [agent], ["cli-echo"])
    yield agent
    await _stop_agents([agent], runs)


@pytest.fixture
async def team(mesh: Mesh) -> AsyncIterator[list[Agent]]:
    """The research team of examples/agents.py."""
    agents = example_agents.build_team(mesh.address)
    runs = await _run_agents(mesh, agents, list(example_agents.TEAM))
    yield agents
    await _stop_agents(agents, runs)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> CLIResult:
    """Run the CLI in-process on this loop; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = await main_async(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


async def cli_process(*argv: str) -> CLIResult:
    """Run ``python -m server.cli argv`` as a subprocess; return (status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", *argv, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(15):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_one_error_line(err: str, *fragments: str) -> None:
    """stderr is exactly one ``agentmesh: error:`` line containing ``fragments``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("agentmesh: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


# ------------------------------------------------------------------ happy paths


async def test_submit_wait_prints_the_result(mesh: Mesh, echo_agent: Agent,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = await cli(capsys, "--server", mesh.address, "tasks", "submit", "echo",
                               "--input", '{"topic": "bees"}', "--wait")
    assert status == 0
    assert "SUCCEEDED" in out
    assert '"topic": "bees"' in out


async def test_json_output_parses(mesh: Mesh, echo_agent: Agent,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    server = ("--server", mesh.address, "--json")
    status, out, _ = await cli(capsys, *server, "tasks", "submit", "echo", "--input", "[1, 2]",
                               "--wait")
    assert status == 0
    task = json.loads(out)
    assert task["state"] == "SUCCEEDED"
    assert task["output"] == {"echo": [1, 2]}

    status, out, _ = await cli(capsys, *server, "tasks", "list", "--state", "succeeded")
    assert status == 0
    assert task["id"] in [t["id"] for t in json.loads(out)]

    status, out, _ = await cli(capsys, *server, "tasks", "get", task["id"])
    assert status == 0
    assert json.loads(out)["capability"] == "echo"

    status, out, _ = await cli(capsys, *server, "agents", "list")
    assert status == 0
    assert [a["display_name"] for a in json.loads(out)] == ["cli-echo"]

    status, out, _ = await cli(capsys, *server, "stats")
    assert status == 0
    stats = json.loads(out)
    assert stats["agents_live"] == 1
    assert stats["tasks_by_state"]["SUCCEEDED"] == 1


async def test_tables_and_state_round_trip(mesh: Mesh, echo_agent: Agent,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    server = ("--server", mesh.address)
    status, out, _ = await cli(capsys, *server, "agents", "list")
    assert status == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "CAPABILITIES"]
    assert row.split()[:3] == ["cli-echo", "ACTIVE", "echo,fail"]

    assert (await cli(capsys, *server, "state", "put", "team/lead", '{"name": "ada"}'))[0] == 0
    assert (await cli(capsys, *server, "state", "put", "team/motto", "keep going"))[0] == 0
    status, out, _ = await cli(capsys, *server, "--json", "state", "get", "team/lead")
    assert (status, json.loads(out)["value"]) == (0, {"name": "ada"})
    status, out, _ = await cli(capsys, *server, "state", "get", "team/motto")
    assert (status, out.strip()) == (0, "keep going")
    status, out, _ = await cli(capsys, *server, "state", "list", "team/")
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()] == ["KEY", "team/lead", "team/motto"]
    assert (await cli(capsys, *server, "state", "delete", "team/lead"))[0] == 0
    status, _, err = await cli(capsys, *server, "state", "get", "team/lead")
    assert status == 1
    assert_one_error_line(err, "NOT_FOUND")

    status, out, _ = await cli(capsys, *server, "stats")
    assert status == 0
    # An empty mesh has no autonomy figure yet (not "100.0% (0 of 0)").
    assert "autonomy:    n/a (no task has ended yet)" in out
    assert (await cli(capsys, *server, "tasks", "submit", "echo", "--wait"))[0] == 0
    status, out, _ = await cli(capsys, *server, "stats")
    assert "autonomy:    100.0% (1 of 1 ended tasks succeeded with no human action)" in out


async def test_workflow_run_with_the_example_team(mesh: Mesh, team: list[Agent],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = await cli(capsys, "--server", mesh.address, "workflow", "run",
                               str(WORKFLOW), "--wait")
    assert status == 0, out
    assert "[research-history] research: RUNNING" in out
    assert "[review] review: SUCCEEDED" in out
    workflow_id = out.splitlines()[0].split()[1]
    assert f"workflow {workflow_id} SUCCEEDED" in out
    assert "== review ==" in out
    # Readable like make run's report: the text keeps its lines, no "\n" escapes.
    result = out.split("== review ==\n", 1)[1]
    assert "verdict: approved\n" in result
    assert "text: |-\n  # multi-agent systems: a short report\n\n  ## History\n" in result
    assert "\\n" not in result
    assert "Reviewed: approved for publication." in result
    # JSON only with --json: the whole workflow, its outputs as values.
    status, out, _ = await cli(capsys, "--server", mesh.address, "--json", "workflow", "run",
                               str(WORKFLOW), "--wait")
    assert status == 0
    final = json.loads(out)
    [review] = [s for s in final["steps"] if s["id"] == "review"]
    assert review["output"]["verdict"] == "approved"

    status, out, _ = await cli(capsys, "--server", mesh.address, "workflow", "get", workflow_id)
    assert status == 0
    assert "research-applications" in out


async def test_failed_task_exits_1_with_one_line(mesh: Mesh, echo_agent: Agent) -> None:
    status, out, err = await cli_process("--server", mesh.address, "tasks", "submit", "fail",
                                         "--wait")
    assert status == 1
    assert "FAILED" in out
    assert_one_error_line(err, "Broken: this handler always fails")


async def test_failed_workflow_exits_1_with_the_reason(mesh: Mesh, echo_agent: Agent,
                                                      tmp_path: Path) -> None:
    spec = tmp_path / "doomed.yaml"
    spec.write_text("name: doomed\nsteps:\n"
                    "  - {id: first, capability: echo, input: 1}\n"
                    "  - {id: second, capability: fail, depends_on: [first]}\n"
                    "  - {id: third, capability: echo, depends_on: [second]}\n")
    status, out, err = await cli_process("--server", mesh.address, "workflow", "run",
                                         str(spec), "--wait")
    assert status == 1
    assert "[second] fail: FAILED - Broken: this handler always fails" in out
    assert "[third] echo: CANCELLED" in out
    assert_one_error_line(err, "FAILED")


# ------------------------------------------------------------------ error paths


async def test_unknown_task_is_one_line_exit_1(mesh: Mesh) -> None:
    status, out, err = await cli_process("--server", mesh.address, "tasks", "get", "no-such")
    assert status == 1
    assert out == ""
    assert_one_error_line(err, "NOT_FOUND")


async def test_unreachable_server_is_one_line(mesh: Mesh) -> None:
    address = f"127.0.0.1:{free_port()}"
    status, _, err = await cli_process("--server", address, "--timeout", "2", "tasks", "list")
    assert status == 1
    assert_one_error_line(err, "UNAVAILABLE", address)


async def test_bad_json_input_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = await cli(capsys, "--server", f"127.0.0.1:{free_port()}", "tasks",
                                 "submit", "echo", "--input", "{not json")
    assert (status, out) == (2, "")
    assert_one_error_line(err, "invalid JSON for --input")


async def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    status, _, err = await cli(capsys, "tasks", "frobnicate")
    assert status == 2
    assert_one_error_line(err, "invalid choice")

    status, _, err = await cli(capsys, "workflow", "run", str(tmp_path / "missing.yaml"))
    assert status == 2
    assert_one_error_line(err, "missing.yaml")

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps: [\n  - {id: a\n")
    status, _, err = await cli(capsys, "workflow", "run", str(bad))
    assert status == 2
    assert_one_error_line(err, "bad.yaml")

    shapeless = tmp_path / "shapeless.yaml"
    shapeless.write_text("name: x\nsteps:\n  - {id: a, capability: c, depends_on: [zz]}\n")
    status, _, err = await cli(capsys, "workflow", "run", str(shapeless))
    assert status == 2
    assert_one_error_line(err, "unknown step 'zz'")


def test_serve_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "70000"]) == 2
    assert_one_error_line(capsys.readouterr().err, "port")


# ------------------------------------------------------------------ examples/run.py


async def test_example_run_once() -> None:
    # The checkout first on the path, so the example runs against this tree
    # whatever the state of the editable install.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "run.py"), "--port", str(free_port()), "--once",
        "--console-port", "0", "--a2a-port", "0",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out_bytes, err_bytes = await proc.communicate()
    out, err = out_bytes.decode(), err_bytes.decode()
    assert proc.returncode == 0, err
    assert "verdict: approved" in out
    assert "Reviewed: approved for publication." in out
    assert "## History" in out and "## Applications" in out
    assert "Traceback" not in err


def test_backend_shorthands_expand_to_local_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTMESH_BUS", "NATS")
    settings = Settings(store="redis")  # type: ignore[call-arg]
    assert (settings.store, settings.bus) == ("redis://127.0.0.1:6379/0", "nats://127.0.0.1:4222")
    assert Settings(store="redis://10.0.0.1:6380/2").store == "redis://10.0.0.1:6380/2"  # type: ignore[call-arg]
    assert Settings(bus="amqp").bus == "amqp://guest:guest@127.0.0.1:5672/"  # type: ignore[call-arg]


def test_serve_help_shows_each_settings_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for env, default in [("AGENTMESH_HOST", "127.0.0.1"), ("AGENTMESH_PORT", "50051"),
                         ("AGENTMESH_STORE", "memory://"), ("AGENTMESH_BUS", "memory://"),
                         ("AGENTMESH_BLOB", ".agentmesh/snapshots"),
                         ("AGENTMESH_METRICS_PORT", "9464"), ("AGENTMESH_LOG_LEVEL", "INFO"),
                         ("AGENTMESH_HEARTBEAT_INTERVAL", "1.0"),
                         ("AGENTMESH_DRAIN_GRACE", "10.0"), ("AGENTMESH_LOG_FORMAT", "json")]:
        assert f"({env}; default {default})" in text, env
    # Defaults that depend on the store keep their own wording.
    assert "default 8470 with the memory store, off with a shared store" in text
    assert "default 41241 in embedded mode" in text


# ------------------------------------------------------------------ the first hour


async def test_submit_wait_for_an_unschedulable_task_names_it_and_honours_the_timeout(
        mesh: Mesh) -> None:
    started = asyncio.get_running_loop().time()
    status, out, err = await cli_process("--server", mesh.address, "tasks", "submit",
                                         "nosuchcap", "--wait", "--timeout", "2")
    elapsed = asyncio.get_running_loop().time() - started
    assert status == 1, (out, err)
    line = out.strip()
    assert line.startswith("task "), out
    task_id = line.split()[1]
    assert "QUEUED (unschedulable: no live agent offers 'nosuchcap')" in line
    assert "waiting for the result (up to 2 s)" in line
    assert_one_error_line(err, f"task {task_id} still QUEUED after 2 s", "unschedulable")
    assert elapsed < 12  # 2 s of waiting, plus a process start on a loaded machine
    # The global flag bounds the wait the same way.
    status, out, err = await cli_process("--server", mesh.address, "--timeout", "1", "tasks",
                                         "submit", "nosuchcap", "--wait")
    assert status == 1
    assert_one_error_line(err, "still QUEUED after 1 s")


async def test_watch_says_unschedulable_and_honours_the_timeout(
        mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    async with MeshClient(mesh.address) as client:
        task = await client.submit_task("nosuchcap")
    status, out, err = await cli(capsys, "--server", mesh.address, "tasks", "watch", task.id,
                                 "--timeout", "1")
    assert status == 1
    assert f"{task.id}  nosuchcap  QUEUED (unschedulable: no live agent offers 'nosuchcap')" \
        in out
    assert_one_error_line(err, f"{task.id} still QUEUED after 1 s")


async def test_tables_star_unschedulable_tasks_with_a_legend(
        mesh: Mesh, echo_agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    server = ("--server", mesh.address)
    assert (await cli(capsys, *server, "tasks", "submit", "echo", "--wait"))[0] == 0
    status, out, _ = await cli(capsys, *server, "tasks", "list")
    assert status == 0
    assert "*" not in out  # nothing starred, no legend
    assert (await cli(capsys, *server, "tasks", "submit", "nosuchcap"))[0] == 0
    status, out, _ = await cli(capsys, *server, "tasks", "list")
    assert "QUEUED*" in out
    assert out.rstrip().endswith("* unschedulable: no live agent offers the capability")


async def test_refused_input_exits_2_and_other_refusals_exit_1(mesh: Mesh,
                                                               tmp_path: Path) -> None:
    server = ("--server", mesh.address)
    status, out, err = await cli_process(*server, "tasks", "submit", "x", "--priority", "5000")
    assert (status, out) == (2, "")
    assert_one_error_line(err, "INVALID_ARGUMENT", "priority")
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("name: loop\nsteps:\n"
                     "  - {id: a, capability: x, depends_on: [b]}\n"
                     "  - {id: b, capability: x, depends_on: [a]}\n")
    status, out, err = await cli_process(*server, "workflow", "run", str(cycle))
    assert (status, out) == (2, "")
    assert_one_error_line(err, "cycle")
    status, _, err = await cli_process(*server, "tasks", "get", "no-such-task")
    assert status == 1
    assert_one_error_line(err, "NOT_FOUND")


def test_every_exit_status_is_in_the_one_table() -> None:
    from server import cli as cli_module  # noqa: PLC0415

    codes = [code for code, _ in cli_module.EXIT_STATUSES]
    assert codes == [0, 1, 2, 3, 130]
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for code, meaning in cli_module.EXIT_STATUSES:
        assert f"| {code} | {meaning} |" in page


async def test_a_running_line_does_not_repeat_the_previous_attempts_error(
        mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses  # noqa: PLC0415

    from server.cli import (  # noqa: PLC0415
        _print_task_change,
        build_parser,
        print_task,
        print_tasks,
    )
    from tests.test_cli_more import fields  # noqa: PLC0415

    agent = Agent("flaky", target=mesh.address)
    attempts: list[int] = []

    @agent.handler("flaky")
    async def flaky(task: TaskContext) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first attempt breaks")
        return "ok"

    runs = await _run_agents(mesh, [agent], ["flaky"])
    try:
        async with MeshClient(mesh.address) as client:
            done = await client.wait_task((await client.submit_task("flaky")).id, timeout=20)
    finally:
        await _stop_agents([agent], runs)
    assert done.state == "SUCCEEDED"
    assert done.failure is not None  # the first attempt's, kept on the record
    args = build_parser().parse_args(["tasks", "watch"])
    running = dataclasses.replace(done, state="RUNNING", attempt=2, output=None)
    capsys.readouterr()
    _print_task_change(running, args, {})
    print_tasks([running], {})
    out = capsys.readouterr().out
    assert "first attempt breaks" not in out
    _print_task_change(dataclasses.replace(done, state="RETRYING"), args, {})
    assert "first attempt breaks" in capsys.readouterr().out
    # The detail view keeps it, labelled as the earlier attempt's.
    print_task(running, {})
    detail = fields(capsys.readouterr().out)
    assert "failure" not in detail
    assert "first attempt breaks" in detail["last failure"]
    print_task(dataclasses.replace(done, state="DEAD_LETTERED"), {})
    assert "first attempt breaks" in fields(capsys.readouterr().out)["failure"]


async def test_a_task_of_an_agent_that_left_shows_its_display_name(
        mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    agent = Agent("short-lived", target=mesh.address)

    @agent.handler("once")
    async def once(task: TaskContext) -> str:
        return "done"

    runs = await _run_agents(mesh, [agent], ["short-lived"])
    try:
        async with MeshClient(mesh.address) as client:
            done = await client.wait_task((await client.submit_task("once")).id, timeout=20)
    finally:
        await _stop_agents([agent], runs)
    assert done.agent
    status, out, _ = await cli(capsys, "--server", mesh.address, "tasks", "list")
    assert status == 0
    [row] = [ln for ln in out.splitlines() if ln.startswith(done.id)]
    assert "short-lived" in row.split()
    assert done.agent.removeprefix("agents/") not in row
    status, out, _ = await cli(capsys, "--server", mesh.address, "tasks", "get", done.id)
    assert "short-lived" in out

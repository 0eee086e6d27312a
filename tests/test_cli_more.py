"""More of the ``agentmesh`` CLI against a running mesh, and ``make run`` end to end.

Covers what tests/test_cli.py does not: ``agents get`` and ``agents watch``,
``tasks cancel`` and ``tasks watch``, their bad inputs, and ``examples/run.py``
as ``make run`` starts it (no ``--once``): it serves until Ctrl-C or SIGTERM,
then exits 0 without a traceback and leaves no process behind.

Commands that end by themselves run in-process (`server.cli.main_async` on the
test's loop, next to the embedded server), like tests/test_cli.py does. Error
paths and streaming commands run ``python -m server.cli`` as a subprocess, so
"one line on stderr, no traceback" covers the whole process, and a streaming
command is stopped the way a user stops it: SIGINT (exit status 130, the
documented one). Every wait is for an event (a line on stdout, a process exit,
a watch event) under a generous deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent_sdk import Agent, AgentInfo, MeshClient, TaskContext
from server.app import Mesh
from server.cli import main_async
from tests.test_cli import EXAMPLES, ROOT, CLIResult, example_agents

#: Generous upper bound of any single wait (the machine is small and shared).
DEADLINE = 60.0




# ------------------------------------------------------------------ helpers


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: this checkout first on the path, no AGENTMESH_*.

    The checkout goes first so the child runs this tree whatever the state of
    the editable install; AGENTMESH_* variables of the caller (a token, a
    Redis store...) would change what the child does, so they are dropped.
    So is PYTHONUNBUFFERED: with stdout a pipe (``agentmesh tasks watch | grep
    ...``) a streaming command must flush each line itself.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AGENTMESH_") and k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Spawn children that react to Ctrl-C even when this process ignores SIGINT.

    A process started in the background by a non-interactive shell (``make
    test &``, some CI runners) inherits SIGINT ignored, and so would its
    children: Python then installs no KeyboardInterrupt handler and a SIGINT
    would do nothing. A handler (unlike SIG_IGN) is reset to the default at
    exec, so the child starts the way it does under a terminal.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


async def _pipe_reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """An asyncio reader of the read end ``fd`` of a pipe (which it then owns)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(fd, "rb", buffering=0))
    return reader, transport


class Child:
    """A subprocess whose stdout is read line by line as it comes.

    Its stdout and stderr are pipes of our own rather than asyncio's: asyncio's
    ``Process.wait()`` (3.11) also waits for its pipes to close, so a process
    the child leaves behind holding them would make the exit itself unobservable.
    Here the exit and the end of the output are two separate events.
    """

    def __init__(self, proc: asyncio.subprocess.Process,
                 stdout: tuple[asyncio.StreamReader, asyncio.BaseTransport],
                 stderr: tuple[asyncio.StreamReader, asyncio.BaseTransport]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._transports = (stdout[1], stderr[1])
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._pump = asyncio.create_task(self._read_stdout(stdout[0]))
        self._stderr = asyncio.create_task(self._read_stderr(stderr[0]))

    @classmethod
    async def start(cls, *argv: str, env: dict[str, str] | None = None) -> Child:
        """Start ``python argv`` in the checkout."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            with sigint_not_ignored():
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, *argv, cwd=ROOT, env=env or child_env(),
                    stdin=asyncio.subprocess.DEVNULL, stdout=out_w, stderr=err_w)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return cls(proc, await _pipe_reader(out_r), await _pipe_reader(err_r))

    @classmethod
    async def cli(cls, *argv: str) -> Child:
        """Start ``python -m server.cli argv``."""
        return await cls.start("-m", "server.cli", *argv)

    async def _read_stdout(self, reader: asyncio.StreamReader) -> None:
        async for raw in reader:
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            await self._queue.put(line)
        await self._queue.put(None)

    async def _read_stderr(self, reader: asyncio.StreamReader) -> str:
        return (await reader.read()).decode()

    async def expect(self, predicate: Callable[[str], bool],
                     timeout: float = DEADLINE) -> str:  # noqa: ASYNC109
        """The next stdout line that satisfies ``predicate`` (earlier ones are skipped).

        Fails when stdout ends first; raises TimeoutError after ``timeout``.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self._queue.get()
                    if line is None:
                        await self._queue.put(None)  # stays at the end for later calls
                        status = await self.proc.wait()
                        pytest.fail(f"stdout ended (exit {status}) before the expected "
                                    f"line; stdout: {self.lines!r}; stderr: "
                                    f"{await self._stderr!r}")
                    if predicate(line):
                        return line
        except TimeoutError:
            raise TimeoutError(f"no expected line in {timeout:g}s; stdout so far: "
                               f"{self.lines[-5:]!r}") from None

    async def exited(self, sig: int | None = None) -> int:
        """Send ``sig`` (if any) and wait for the process to exit; return its status."""
        if sig is not None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(DEADLINE):
            return await self.proc.wait()

    async def stderr(self) -> str:
        """All of stderr, once stdout and stderr are closed."""
        try:
            async with asyncio.timeout(DEADLINE):
                await self._pump
                return await self._stderr
        except TimeoutError:
            pytest.fail(f"exited with {self.proc.returncode}, but its stdout/stderr are "
                        f"still open: a process it started holds them (it left a child "
                        f"behind); last lines: {self.lines[-3:]!r}")

    async def finish(self, sig: int | None = None) -> tuple[int, str]:
        """Send ``sig`` (if any), wait for the exit; return (exit status, stderr)."""
        status = await self.exited(sig)
        return status, await self.stderr()

    async def kill(self) -> None:
        """Cleanup: make sure the process is gone, whatever happened in the test."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for transport in self._transports:
            transport.close()
        self._pump.cancel()
        self._stderr.cancel()
        await asyncio.gather(self._pump, self._stderr, return_exceptions=True)


@contextlib.asynccontextmanager
async def child(starting: Awaitable[Child] | Child) -> AsyncIterator[Child]:
    """``async with child(Child.cli(...)) as c:`` kills ``c`` on the way out."""
    proc = starting if isinstance(starting, Child) else await starting
    try:
        yield proc
    finally:
        await proc.kill()


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> CLIResult:
    """Run the CLI in-process on this loop; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = await main_async(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


async def cli_process(*argv: str) -> CLIResult:
    """Run ``python -m server.cli argv`` to the end; return (status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", *argv, cwd=ROOT, env=child_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(DEADLINE):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
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


async def assert_bad_input(argv: Iterable[str], *fragments: str) -> None:
    """The command fails, nothing on stdout, one line on stderr; the exit status is
    2 for input the server refuses as invalid, 1 for any other refusal."""
    status, out, err = await cli_process(*argv)
    expected = 2 if "INVALID_ARGUMENT" in fragments else 1
    assert (status, out) == (expected, ""), (status, out, err)
    assert_one_error_line(err, *fragments)


def fields(out: str) -> dict[str, str]:
    """``key: value`` lines of a detail view (``agents get``, ``tasks get``) as a dict."""
    pairs = (line.partition(":") for line in out.splitlines() if line and line[0] != " ")
    return {key.strip(): value.strip() for key, _, value in pairs}


@contextlib.asynccontextmanager
async def serve_echo(mesh: Mesh, name: str = "cli-worker", *, capability: str = "echo",
                     **options: Any) -> AsyncIterator[AgentInfo]:
    """Run an agent whose one handler returns its input under ``capability``.

    Entered once the server reports this very agent (``name`` offering
    ``capability``) ACTIVE; yields what the server reported. Two agents may
    share a display name, so the capability tells them apart.
    """
    agent = Agent(name, target=mesh.address, **options)

    @agent.handler(capability)
    async def echo(task: TaskContext) -> dict[str, object]:
        return {"echo": task.input}

    run = asyncio.create_task(agent.run())
    try:
        async with MeshClient(mesh.address) as client, asyncio.timeout(DEADLINE):
            async for event in client.watch_agents(capability=capability):
                if event.agent.display_name == name and event.agent.state == "ACTIVE":
                    info = event.agent
                    break
        yield info
    finally:
        await agent.stop(grace=1.0)
        async with asyncio.timeout(DEADLINE):
            await run


@pytest.fixture
async def worker(mesh: Mesh) -> AsyncIterator[AgentInfo]:
    """``cli-worker``: labels, a version and a concurrency of 3; offers ``echo``."""
    async with serve_echo(mesh, labels={"team": "blue"}, version="2.1",
                          max_concurrency=3) as info:
        yield info


@pytest.fixture
async def client(mesh: Mesh) -> AsyncIterator[MeshClient]:
    """A client of the mesh."""
    async with MeshClient(mesh.address) as c:
        yield c


def watch_line(line: str) -> list[str]:
    """An ``agents watch`` line without its timestamp: [type, name, state, [caps], ...]."""
    return line.split()[2:]


# ------------------------------------------------------------------ agents get


async def test_agents_get_shows_one_agent_by_display_name_or_id(
        mesh: Mesh, worker: AgentInfo, capsys: pytest.CaptureFixture[str]) -> None:
    server = ("--server", mesh.address)
    status, out, err = await cli(capsys, *server, "agents", "get", "cli-worker")
    assert (status, err) == (0, "")
    shown = fields(out)
    agent_id = worker.id
    assert shown["name"] == worker.name == f"agents/{agent_id}"
    assert shown["id"] == agent_id
    assert shown["display name"] == "cli-worker"
    assert shown["state"] == "ACTIVE"
    assert shown["capabilities"] == "echo"
    assert shown["in flight"] == "0/3"
    assert shown["version"] == "2.1"
    assert shown["labels"] == "team=blue"
    assert shown["registered"] and shown["heartbeat"]

    # The id and the full resource name find the same agent.
    for name in (agent_id, worker.name):
        status, out_by_id, _ = await cli(capsys, *server, "agents", "get", name)
        assert status == 0
        assert fields(out_by_id)["id"] == agent_id


async def test_agents_get_json(mesh: Mesh, worker: AgentInfo,
                               capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = await cli(capsys, "--server", mesh.address, "--json", "agents", "get",
                                 "cli-worker")
    assert (status, err) == (0, "")
    agent = json.loads(out)
    assert (agent["name"], agent["id"]) == (worker.name, worker.id)
    assert agent["display_name"] == "cli-worker"
    assert agent["state"] == "ACTIVE"
    assert agent["capabilities"] == ["echo"]
    assert agent["labels"] == {"team": "blue"}
    assert (agent["version"], agent["max_concurrency"], agent["in_flight"]) == ("2.1", 3, 0)
    assert agent["register_time"] is not None


async def test_agents_get_finds_a_display_name_that_is_not_an_id(
        mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    """`find_agent` promises "else the live one with that display name"; display
    names are free text (the server accepts "echo bot", "svc.worker"), ids are not."""
    for display_name in ("echo bot", "svc.worker"):
        async with serve_echo(mesh, display_name) as agent:
            status, out, err = await cli(capsys, "--server", mesh.address, "agents", "get",
                                         display_name)
            assert (status, err) == (0, ""), err
            assert fields(out)["name"] == agent.name


@pytest.mark.slow
async def test_agents_get_bad_names_are_one_line(mesh: Mesh, worker: AgentInfo) -> None:
    server = ("--server", mesh.address)
    async with serve_echo(mesh, "cli-worker", capability="other"):
        # Two live agents called cli-worker: an error, not an arbitrary pick.
        await asyncio.gather(
            assert_bad_input([*server, "agents", "get", "no-such-agent"], "NOT_FOUND",
                             "no-such-agent"),
            assert_bad_input([*server, "agents", "get", "agents/"], "INVALID_ARGUMENT"),
            assert_bad_input([*server, "agents", "get", "agents/a/b"], "INVALID_ARGUMENT"),
            assert_bad_input([*server, "agents", "get", "cli-worker"], "NOT_FOUND"),
        )


# ------------------------------------------------------------------ agents watch


@pytest.mark.slow
async def test_agents_watch_prints_joined_and_left_until_ctrl_c(mesh: Mesh,
                                                                worker: AgentInfo) -> None:
    async with child(Child.cli("--server", mesh.address, "agents", "watch")) as watch:
        # Existing agents come first (include_existing): the stream is open.
        await watch.expect(lambda line: watch_line(line)[:2] == ["JOINED", "cli-worker"])

        async with serve_echo(mesh, "late-joiner", capability="late-cap", max_concurrency=2):
            joined = await watch.expect(lambda line: "late-joiner" in line)
            assert watch_line(joined) == ["JOINED", "late-joiner", "ACTIVE", "[late-cap]",
                                          "in-flight", "0/2"]
        left = await watch.expect(lambda line: watch_line(line)[:2] == ["LEFT", "late-joiner"])
        assert watch_line(left)[2] == "GONE"

        status, err = await watch.finish(signal.SIGINT)
    assert status == 130, err  # the documented Ctrl-C status
    assert err == ""  # no traceback, no gRPC noise


@pytest.mark.slow
async def test_agents_watch_json_with_a_capability_filter(mesh: Mesh,
                                                          worker: AgentInfo) -> None:
    argv = ("--server", mesh.address, "--json", "agents", "watch", "--capability", "echo")
    async with child(Child.cli(*argv)) as watch:
        first = json.loads(await watch.expect(lambda line: "cli-worker" in line))
        assert (first["type"], first["agent"]["display_name"]) == ("JOINED", "cli-worker")

        # Registered one after the other: had the filter let "other-cap" through,
        # its JOINED would come before the second echo agent's.
        async with serve_echo(mesh, "not-echo", capability="other-cap"), \
                serve_echo(mesh, "second-echo"):
            line = await watch.expect(lambda line: "cli-worker" not in line)
            event = json.loads(line)
            assert (event["type"], event["agent"]["display_name"]) == ("JOINED", "second-echo")
            assert event["agent"]["capabilities"] == ["echo"]
        status, err = await watch.finish(signal.SIGINT)
    assert all(json.loads(line) for line in watch.lines)
    assert "not-echo" not in "\n".join(watch.lines)
    assert (status, err) == (130, "")


# ------------------------------------------------------------------ tasks cancel


async def test_tasks_cancel_a_queued_task(mesh: Mesh, client: MeshClient,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    server = ("--server", mesh.address)
    # No agent offers the capability: the tasks stay QUEUED until cancelled.
    first = await client.submit_task("nobody-offers-this", {"n": 1})
    second = await client.submit_task("nobody-offers-this", {"n": 2})
    assert (await client.get_task(first.id)).state == "QUEUED"
    ended = asyncio.create_task(client.wait_task(first.id))

    status, out, err = await cli(capsys, *server, "tasks", "cancel", first.id)
    assert (status, err) == (0, "")
    assert out == f"task {first.id} CANCELLED\n"
    async with asyncio.timeout(DEADLINE):
        assert (await ended).state == "CANCELLED"

    status, out, err = await cli(capsys, *server, "--json", "tasks", "cancel",
                                 f"tasks/{second.id}", "--reason", "no longer needed")
    assert (status, err) == (0, "")
    task = json.loads(out)
    assert (task["id"], task["state"]) == (second.id, "CANCELLED")
    assert task["failure"]["message"] == "no longer needed"
    assert task["end_time"] is not None
    assert (await client.get_task(second.id)).state == "CANCELLED"


@pytest.mark.slow
async def test_tasks_cancel_bad_input_is_one_line(mesh: Mesh, client: MeshClient) -> None:
    server = ("--server", mesh.address)
    done = await client.submit_task("nobody-offers-this")
    await client.cancel_task(done.id)
    await asyncio.gather(
        assert_bad_input([*server, "tasks", "cancel", "no-such-task"], "NOT_FOUND",
                         "no-such-task"),
        assert_bad_input([*server, "tasks", "cancel", "bad name!"], "INVALID_ARGUMENT"),
        assert_bad_input([*server, "tasks", "cancel", "tasks/"], "INVALID_ARGUMENT"),
        assert_bad_input([*server, "tasks", "cancel", done.id], "FAILED_PRECONDITION",
                         "already ended"),
    )


# ------------------------------------------------------------------ tasks watch


@pytest.mark.slow
async def test_tasks_watch_prints_a_task_submitted_after_it_started(
        mesh: Mesh, worker: AgentInfo, client: MeshClient) -> None:
    async with child(Child.cli("--server", mesh.address, "tasks", "watch")) as watch:
        # The command prints nothing until a change: submit probes (no agent offers
        # them, they stay QUEUED) until one shows up, then the watch is live.
        probes: set[str] = set()
        async with asyncio.timeout(DEADLINE):
            while True:
                probes.add((await client.submit_task("watch-probe")).id)
                with contextlib.suppress(TimeoutError):
                    await watch.expect(lambda line: any(p in line for p in probes), 2.0)
                    break

        task = await client.submit_task("echo", {"topic": "bees"})
        line = await watch.expect(lambda line: task.id in line and "SUCCEEDED" in line)
        tokens = line.split()
        assert tokens[2:9] == [task.id, "echo", "SUCCEEDED", "attempt", "1", "on", "cli-worker"]
        assert line.endswith('-> {"echo": {"topic": "bees"}}')
        status, err = await watch.finish(signal.SIGINT)
    assert (status, err) == (130, "")


@pytest.mark.slow
async def test_tasks_watch_ids_exits_once_they_end(mesh: Mesh, client: MeshClient) -> None:
    task = await client.submit_task("nobody-offers-this", [1, 2])
    argv = ("--server", mesh.address, "--json", "tasks", "watch", task.id)
    async with child(Child.cli(*argv)) as watch:
        queued = json.loads(await watch.expect(lambda line: task.id in line))
        assert (queued["id"], queued["state"], queued["input"]) == (task.id, "QUEUED", [1, 2])
        await client.cancel_task(task.id, reason="stop watching")
        status, err = await watch.finish()  # no signal: it ends by itself
    assert (status, err) == (0, "")
    states = [json.loads(line)["state"] for line in watch.lines]
    assert states[-1] == "CANCELLED"
    assert states.count("CANCELLED") == 1


@pytest.mark.slow
async def test_tasks_watch_bad_input_is_one_line(mesh: Mesh, client: MeshClient) -> None:
    server = ("--server", mesh.address)
    real = await client.submit_task("nobody-offers-this")
    await asyncio.gather(
        assert_bad_input([*server, "tasks", "watch", "no-such-task"], "NOT_FOUND",
                         "no-such-task"),
        # One unknown id among known ones still fails the command, quickly.
        assert_bad_input([*server, "tasks", "watch", real.id, "no-such-task"], "NOT_FOUND"),
        assert_bad_input([*server, "tasks", "watch", "bad/name"], "INVALID_ARGUMENT"),
    )


# ------------------------------------------------------------------ make run


def _descendants(pid: int) -> set[int]:
    """Pids of every live descendant of ``pid`` (Linux /proc)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for text in children.read_text().split():
                    if int(text) not in found:
                        found.add(int(text))
                        todo.append(int(text))
    return found


def _alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _processes_with_env(marker: str) -> dict[int, str]:
    """Live processes whose environment holds ``marker``, with their command lines."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            pid = int(environ.parent.name)
            if marker.encode() in environ.read_bytes() and _alive(pid):
                found[pid] = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ")
    return {pid: cmd.decode(errors="replace").strip() for pid, cmd in found.items()}


def _kill_marked(marker: str) -> None:
    """Cleanup: SIGKILL what a failed run left behind (only processes carrying ``marker``)."""
    for pid in _processes_with_env(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return int(response.status)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_make_run_serves_until_stopped(stop_signal: signal.Signals) -> None:
    # As the Makefile runs it (`$(PY) examples/run.py`, from the checkout), on
    # a port the OS picks; run.py prints the address. The marker finds any
    # process it starts, even one that left its process tree.
    marker = f"CLI_MORE_RUN_{uuid.uuid4().hex}"
    env = child_env(**{marker: "1"})
    try:
        await _run_and_stop(env, marker, stop_signal)
    finally:
        _kill_marked(marker)


async def _run_and_stop(env: dict[str, str], marker: str, stop_signal: signal.Signals) -> None:
    async with child(Child.start(str(EXAMPLES / "run.py"), "--port", "0", "--console-port", "0",
                                 "--a2a-port", "0", env=env)) as run:
        serving = await run.expect(lambda line: line.startswith("agentmesh serving on "))
        address = serving.removeprefix("agentmesh serving on ")
        await run.expect(lambda line: line == "verdict: approved")
        await run.expect(lambda line: line == "Reviewed: approved for publication.")
        still = await run.expect(lambda line: line.startswith(f"still serving on {address}"))
        # The command it suggests works as written from the checkout (agentmesh is
        # not on PATH after make: it is the virtualenv's).
        assert f"try `.venv/bin/agentmesh --server {address} stats`" in still

        # Still serving: healthy, the team is there, the workflow's tasks are listed.
        assert await _health(address) == health_pb2.HealthCheckResponse.SERVING
        status, out, err = await cli_process("--server", address, "--json", "agents", "list")
        assert (status, err) == (0, "")
        agents = {a["display_name"]: a["state"] for a in json.loads(out)}
        assert agents == dict.fromkeys(example_agents.TEAM, "ACTIVE")
        status, out, _ = await cli_process("--server", address, "--json", "tasks", "list")
        assert status == 0
        assert sorted(t["state"] for t in json.loads(out)) == ["SUCCEEDED"] * 5

        started = _descendants(run.proc.pid) | set(_processes_with_env(marker))
        started.discard(run.proc.pid)
        status = await run.exited(stop_signal)
        # Nothing it started outlives it: neither its children seen while it
        # served nor any process carrying its environment (even a detached one).
        assert [pid for pid in started if _alive(pid)] == []
        assert _processes_with_env(marker) == {}
        err = await run.stderr()
    assert status == 0, err  # examples/README.md: "the exit status is 0"
    assert "Traceback" not in err, err
    assert run.lines[-1] == "stopping: agents drain, then the server"
    host, port = address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 5):
        pass  # the gRPC port is closed

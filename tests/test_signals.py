"""``agentmesh serve`` as a real process: SIGTERM and SIGINT drain it gracefully.

The process is ``python -m server.cli serve`` (the ``agentmesh`` console
script), its exit status observed with ``wait()``. An agent speaking the raw
protocol holds an in-flight task when the signal arrives; the test awaits each
step of the shutdown (health NOT_SERVING, the drain directive, the accepted
result, the exit) with generous deadlines. The only time bounds are upper ones
with a wide margin, plus one lower bound the server guarantees (it waits the
whole grace for a silent agent).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentmesh.v1 import task_pb2, task_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests._services import free_port
from tests.test_protocol import RawAgent, js, next_kind

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 20.0  # interpreter start-up and shutdown on a loaded 2-core machine
WAIT = 15.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServeProcess:
    """One ``python -m server.cli serve`` child process."""

    def __init__(self, log: Path, drain_grace: float) -> None:
        self.port = free_port()
        self.log = log
        self.drain_grace = drain_grace
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        """host:port."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> ServeProcess:
        """Spawn and wait until the gRPC port answers."""
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"}
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.cli", "serve", "--port", str(self.port),
                "--metrics-port", "0", "--console-port", "0", "--log-level", "INFO",
                "--drain-grace", str(self.drain_grace),
                # Agents here never beat: a long interval keeps their sessions alive.
                "--heartbeat-interval", "60",
                cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
        async with grpc.aio.insecure_channel(self.address) as ch:
            await asyncio.wait_for(ch.channel_ready(), 30)
        return self

    def send(self, sig: signal.Signals) -> float:
        """Send a signal; returns the loop time it was sent."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return asyncio.get_running_loop().time()

    async def exit_status(self, limit: float) -> int:
        """Wait for the process to end (TimeoutError after ``limit``)."""
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), limit)

    def output(self) -> str:
        """What the process wrote (for failure messages)."""
        return self.log.read_text(errors="replace")[-4000:]

    async def kill(self) -> None:
        """SIGKILL and reap if still running."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def processes() -> AsyncIterator[list[ServeProcess]]:
    """Server processes of a test; killed at the end if still running."""
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        await proc.kill()


async def hold_a_task(ch: grpc.aio.Channel) -> tuple[
        RawAgent, task_pb2.TaskAssignment]:
    """A raw agent with one leased, running task."""
    agent = RawAgent(ch, "holder", ["work"], concurrency=2)
    await agent.register()
    work = agent.open_work()
    await next_kind(work, "opened")
    tasks = task_pb2_grpc.TaskServiceStub(ch)
    await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(capability="work")))
    assignment = (await next_kind(work, "assignment")).assignment
    return agent, assignment


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_accepts_the_in_flight_result_and_exits_0(
        sig: signal.Signals, processes: list[ServeProcess], tmp_path: Path) -> None:
    grace = 10.0
    server = await ServeProcess(tmp_path / "serve.log", drain_grace=grace).start()
    processes.append(server)
    async with grpc.aio.insecure_channel(server.address) as ch:
        agent, assignment = await hold_a_task(ch)
        health = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        assert (await asyncio.wait_for(health.read(), WAIT)).status == SERVING

        sent = server.send(sig)
        # Health turns NOT_SERVING...
        async with asyncio.timeout(WAIT):
            while True:
                update = await health.read()
                assert update is not grpc.aio.EOF, "the health watch ended while SERVING"
                if update.status == NOT_SERVING:
                    break
        # ...and the agent is told to drain, with the server's grace.
        directive = await agent.directive(WAIT)
        assert directive.WhichOneof("kind") == "drain", directive
        assert directive.drain.grace_period.ToNanoseconds() / 1e9 == pytest.approx(grace)
        assert server.proc is not None and server.proc.returncode is None, \
            "the server exited with a task in flight"
        # The in-flight result is still accepted.
        done = await task_pb2_grpc.TaskServiceStub(ch).CompleteTask(
            task_pb2.CompleteTaskRequest(task=assignment.task.name,
                                         fencing_token=assignment.fencing_token,
                                         output=js("finished during the drain")),
            timeout=WAIT)
        assert done.task.state == task_pb2.TASK_STATE_SUCCEEDED
        health.cancel()
        agent.out.put_nowait(None)
        agent.hb_out.put_nowait(None)
    try:
        status = await server.exit_status(grace + MARGIN)
    except TimeoutError:
        pytest.fail(f"still running {grace + MARGIN}s after {sig.name}:\n{server.output()}")
    elapsed = asyncio.get_running_loop().time() - sent
    assert status == 0, f"exit status {status} after {sig.name}:\n{server.output()}"
    assert elapsed < grace + MARGIN
    assert "Traceback" not in server.output()


async def test_sigterm_waits_the_grace_for_a_silent_agent_then_exits_0(
        processes: list[ServeProcess], tmp_path: Path) -> None:
    """An agent that never reports does not keep the server up past the grace.

    The grace (3 s) is longer than the 1 s gRPC stop that follows the drain, so
    the lower bound shows the drain itself waited.
    """
    grace = 3.0
    server = await ServeProcess(tmp_path / "serve.log", drain_grace=grace).start()
    processes.append(server)
    async with grpc.aio.insecure_channel(server.address) as ch:
        agent, _ = await hold_a_task(ch)
        sent = server.send(signal.SIGTERM)
        directive = await agent.directive(WAIT)
        assert directive.WhichOneof("kind") == "drain", directive
        try:
            status = await server.exit_status(grace + MARGIN)
        except TimeoutError:
            pytest.fail(f"still running {grace + MARGIN}s after SIGTERM:\n{server.output()}")
        elapsed = asyncio.get_running_loop().time() - sent
        agent.out.put_nowait(None)
        agent.hb_out.put_nowait(None)
    assert status == 0, f"exit status {status}:\n{server.output()}"
    assert grace <= elapsed < grace + MARGIN, elapsed

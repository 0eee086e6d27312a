"""Processes for the chaos suite: servers and agents as subprocesses, their logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import grpc
from agentmesh.v1 import common_pb2, task_pb2, task_pb2_grpc

from tests._services import free_port

ROOT = Path(__file__).resolve().parents[2]
AGENT = Path(__file__).with_name("agent.py")
SERVE = ("import asyncio; from server.app import serve; from server.settings import Settings; "
         "asyncio.run(serve(Settings()))")
FAST = {"AGENTMESH_HEARTBEAT_INTERVAL": "0.2", "AGENTMESH_HEARTBEAT_MISSES": "3",
        "AGENTMESH_TICK": "0.02", "AGENTMESH_DRAIN_GRACE": "0.2"}


class Server:
    """One ``agentmesh serve`` process."""

    startup_timeout = 60.0
    """Longest wait for the port to answer (a loaded 2-core box imports slowly)."""

    def __init__(self, env: dict[str, str], port: int = 0, log: Path | None = None,
                 argv: list[str] | None = None, cwd: Path = ROOT) -> None:
        self.port = port or free_port()
        self.argv = argv or [sys.executable, "-c", SERVE]
        self.cwd = cwd
        # Embedded mode opens the A2A gateway on 41241 by default: two servers (or
        # any other agentmesh here) would collide on it, so it is off unless asked.
        self.env = {**os.environ, **FAST, "AGENTMESH_A2A_PORT": "0", **env,
                    "AGENTMESH_PORT": str(self.port),
                    "AGENTMESH_METRICS_PORT": "0", "AGENTMESH_CONSOLE_PORT": "0",
                    "AGENTMESH_LOG_LEVEL": "WARNING",
                    "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}"}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """host:port."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Self:
        """Spawn and wait until the gRPC port answers.

        When it does not (the process exits first, ``startup_timeout`` passes, or
        the wait is cancelled), the process is killed and reaped before the error
        propagates: callers register a server for clean-up only once this returns,
        so a process left running here would outlive the test.
        """
        out = open(self.log, "ab") if self.log else None  # noqa: ASYNC230
        try:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - spawning is instant
                self.argv, cwd=self.cwd, env=self.env,
                stdout=out or subprocess.DEVNULL, stderr=out or subprocess.DEVNULL)
        finally:
            if out is not None:
                out.close()  # the child has its own copy
        try:
            await self._wait_ready(self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    async def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.startup_timeout
        async with grpc.aio.insecure_channel(self.address) as ch:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server on {self.address} exited with "
                                       f"{proc.returncode} before answering (log: {self.log})")
                left = end - loop.time()
                if left <= 0:
                    raise TimeoutError(f"server on {self.address} did not answer within "
                                       f"{self.startup_timeout:g} s (log: {self.log})")
                try:
                    await asyncio.wait_for(ch.channel_ready(), min(left, 0.5))
                    return
                except TimeoutError:
                    continue

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)


class AgentProc:
    """One chaos agent process and its JSON-lines log."""

    def __init__(self, tmp: Path, name: str, targets: list[str], cap: str, **opts: Any) -> None:
        self.name = name
        self.log = tmp / f"{name}.jsonl"
        args = [sys.executable, str(AGENT), "--targets", ",".join(targets), "--cap", cap,
                "--name", name, "--log", str(self.log)]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def events(self, ev: str | None = None) -> list[dict[str, Any]]:
        """Events logged so far."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            with_ev = json.loads(line)
            if ev is None or with_ev["ev"] == ev:
                out.append(with_ev)
        return out

    def signal(self, sig: int) -> float:
        """Send a signal; returns the time it was sent."""
        t = time.time()
        self.proc.send_signal(sig)
        return t

    def stop(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


async def until(cond: Callable[[], Any], timeout: float = 20.0,  # noqa: ASYNC109
                what: str = "") -> Any:
    """Poll a condition on other processes' output (files, RPCs) until it holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > end:
            raise TimeoutError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.02)


def js(value: object) -> common_pb2.Payload:
    """A JSON payload."""
    return common_pb2.Payload(data=json.dumps(value).encode(),
                              metadata={"encoding": b"json/plain"})


class Client:
    """Submit and read tasks on any of several servers."""

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets
        self._i = 0

    async def _call(self, fn: Callable[[task_pb2_grpc.TaskServiceStub], Any]) -> Any:
        last: Exception | None = None
        for _ in range(40):
            target = self.targets[self._i % len(self.targets)]
            try:
                async with grpc.aio.insecure_channel(target) as ch:
                    return await fn(task_pb2_grpc.TaskServiceStub(ch))
            except grpc.aio.AioRpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                last = err
                self._i += 1
                await asyncio.sleep(0.1)
        raise AssertionError(f"no server answered: {last}")

    async def submit(self, cap: str, **task: Any) -> str:
        """Queue a task; returns its name."""
        resp = await self._call(lambda s: s.SubmitTask(task_pb2.SubmitTaskRequest(
            task=task_pb2.Task(capability=cap, input=js(1), **task)), timeout=5))
        return str(resp.task.name)

    async def get(self, name: str) -> task_pb2.Task:
        """One task."""
        resp = await self._call(lambda s: s.GetTask(task_pb2.GetTaskRequest(name=name),
                                                    timeout=5))
        return resp.task

    async def all_ended(self, names: list[str]) -> bool:
        """True when every task ended."""
        for n in names:
            t = await self.get(n)
            if t.state not in (task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED,
                               task_pb2.TASK_STATE_DEAD_LETTERED,
                               task_pb2.TASK_STATE_CANCELLED):
                return False
        return True


async def assert_invariants(client: Client, names: list[str], agents: list[AgentProc]) -> dict[
        str, int]:
    """No task lost, exactly one accepted result per task, refusals counted."""
    for n in names:
        t = await client.get(n)
        assert t.state == task_pb2.TASK_STATE_SUCCEEDED, (n, t.state, t.failure)
    accepted: Counter[str] = Counter()
    refused = 0
    for a in agents:
        for e in a.events("accepted"):
            accepted[e["task"]] += 1
        refused += len(a.events("refused"))
    dupes = {k: v for k, v in accepted.items() if v > 1}
    assert not dupes, f"duplicate accepted results: {dupes}"
    # A report whose reply was lost (the replica died after committing it) is
    # logged as report_error. Such a task counts as accepted once only if the
    # server's record says its successful attempt is exactly that report's
    # (fencing token == attempt number here: no task is re-driven).
    unanswered: dict[str, set[int]] = {}
    for a in agents:
        for e in a.events("report_error"):
            unanswered.setdefault(e["task"], set()).add(int(e["token"]))
    missing = []
    for n in names:
        if accepted[n] == 1:
            continue
        t = await client.get(n)
        if accepted[n] == 0 and t.attempt in unanswered.get(n, set()):
            continue
        missing.append(n)
    assert not missing, f"tasks without exactly one accepted result: {missing}"
    return {"tasks": len(names), "refused": refused}


PY_RETRY = common_pb2.RetryPolicy(max_attempts=20, initial_backoff={"nanos": 10_000_000},
                                  max_backoff={"nanos": 50_000_000})


# -- Additive helpers (replica restart tests) ------------------------------------------


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A private ``redis-server`` on ``port`` without persistence (the caller kills it)."""
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_listening(port: int, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Wait until something accepts TCP connections on ``127.0.0.1:port``."""

    async def accepts() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    await until(accepts, timeout, what=f"port {port} listening")


async def restart_server(server: Server) -> Server:
    """Reap ``server``'s process (SIGKILL if it still runs), then start it on the same port."""
    server.kill()
    if server.proc is not None:
        await asyncio.to_thread(server.proc.wait, 10)
    return await server.start()


async def submit_batch(target: str, cap: str, count: int, **task: Any) -> list[str]:
    """Queue ``count`` tasks in one BatchSubmitTasks call (one store step); their names."""
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await task_pb2_grpc.TaskServiceStub(ch).BatchSubmitTasks(
            task_pb2.BatchSubmitTasksRequest(requests=[task_pb2.SubmitTaskRequest(
                task=task_pb2.Task(capability=cap, input=js(i), **task)) for i in range(count)]),
            timeout=10)
    return [str(t.name) for t in resp.tasks]


async def complete_with(target: str, name: str, token: int, output: object) -> grpc.StatusCode:
    """Report a result for ``name`` under ``token`` with CompleteTask (what a zombie does).

    Returns the call's status code: OK when accepted, ABORTED when refused as stale.
    """
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            await task_pb2_grpc.TaskServiceStub(ch).CompleteTask(task_pb2.CompleteTaskRequest(
                task=name, fencing_token=token, output=js(output)), timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK

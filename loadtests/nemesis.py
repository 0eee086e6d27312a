"""Nemesis: an adversarial fault campaign against a real mesh, checked from its history.

    .venv/bin/python loadtests/nemesis.py --seed 7 --minutes 2
    .venv/bin/python loadtests/nemesis.py --seed 7 --minutes 2 --store redis --bus nats \\
        --replicas 2

What runs (all on loopback, all children of this process, all killed on exit):
``agentmesh serve`` replicas (fast heartbeats: 0.25 s x 3), a PRIVATE
``redis-server`` (AOF, fsync always) and ``nats-server`` (JetStream) on free
ports when asked for, SDK agents (``nemesis_sdk_agent.py``) and agents written
on the raw stubs (``nemesis_raw_agent.py``). Every agent reaches every replica
through its own fault proxy (``NemesisProxy``: cut, reset, delay); the
driver's submits go through client proxies that can also duplicate a
connection's requests onto a second upstream connection.

The replicas reach the private Redis through a proxy too (reply loss).

The workload: tasks (some with a request_id, some with a chosen task_id, some
failing once, a fifth long enough to be in flight when a fault strikes), small
DAG workflows (diamonds; a quarter fail for good), CAS clients on shared keys,
lock clients with fenced writes, WatchAgents and WatchTasks on every replica.
The nemesis (``random.Random(seed)``) injects one fault at a time: first
every kind once in a seeded order, then weighted draws. The kinds:

- agent_kill: SIGKILL an agent, start a new one in its place;
- agent_pause: SIGSTOP an agent past 3 heartbeat intervals, then SIGCONT
  (its late results must be refused);
- hb_stall / work_break / probe (raw agent on command): beats stop while both
  streams stay open; only the work stream is cancelled and reopened; a work
  stream is opened for a registered agent that has no heartbeat stream;
- net_cut / net_reset / net_delay: an agent's traffic silently held (shorter
  or longer than the session TTL), reset, or delayed;
- client_dup: the driver's submits (with request_ids) duplicated on the wire;
- dup_submit: the same task_id + request_id again (the same task back), the
  same task_id with another request_id and input (ALREADY_EXISTS), the same
  request_id alone again;
- cancel_race: CancelTask racing the completion of a short task;
- lock_pause: a lock holder pauses past its lease, then writes with its old
  fencing token (fenced Put), renews and releases;
- with --store redis --bus nats --replicas 2: replica_kill (SIGKILL, restart
  on the same port), replica_term (SIGTERM: graceful drain, restart),
  replica_pause (SIGSTOP for less or more than the session TTL, then SIGCONT:
  a hung replica whose agents the other one declares GONE, which then wakes
  up with sessions, leases and a dispatcher from before),
  redis_restart (SIGKILL, restart on the same AOF), redis_reply_loss (Redis
  runs the replicas' commands but the answers are lost, then the connections
  reset) and nats_restart; CAS Puts are hammered across the Redis faults.
 When the time is up it heals everything, lets the mesh settle, reads
every task, workflow and key, merges every process's records into one JSONL
history and runs the checker (``nemesis_checker.py``). Exit code 1 when any
invariant is violated; the seed and the history file reproduce the case
(fault schedule and workload are seeded; the interleaving is the machine's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import grpc  # noqa: E402
from agentmesh.v1 import (  # noqa: E402
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)
from google.protobuf import duration_pb2  # noqa: E402

from loadtests import nemesis_checker  # noqa: E402
from tests._services import free_port  # noqa: E402
from tests.chaos._harness import SERVE, Server, wait_listening  # noqa: E402

HERE = Path(__file__).resolve().parent
SDK_AGENT = HERE / "nemesis_sdk_agent.py"
RAW_AGENT = HERE / "nemesis_raw_agent.py"
HEARTBEAT = 0.25
MISSES = 3
TTL = HEARTBEAT * MISSES
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "DEAD_LETTERED"}
INDETERMINATE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
RETRY = common_pb2.RetryPolicy(max_attempts=50, initial_backoff=duration_pb2.Duration(
    nanos=20_000_000), max_backoff=duration_pb2.Duration(nanos=200_000_000))
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]


def _ts(ts: Any) -> float | None:
    """A protobuf Timestamp as Unix seconds, None when unset."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return float(ts.seconds) + ts.nanos / 1e9


def _canon(payload: common_pb2.Payload) -> str:
    """A payload's JSON in canonical form (sorted keys), or its raw text."""
    if not payload.data:
        return ""
    text = payload.data.decode("utf-8", "replace")
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        return text


def _js(value: object) -> common_pb2.Payload:
    return common_pb2.Payload(data=json.dumps(value, sort_keys=True).encode(),
                              metadata={"encoding": b"json/plain"})


def _dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def task_record(t: task_pb2.Task) -> dict[str, Any]:
    """What the checker needs of a task."""
    return {
        "name": t.name, "state": task_pb2.TaskState.Name(t.state).removeprefix("TASK_STATE_"),
        "attempt": t.attempt, "agent": t.agent, "labels": dict(t.labels),
        "input": _canon(t.input), "output": _canon(t.output) if t.HasField("output") else "",
        "workflow": t.workflow, "step_id": t.step_id, "end_time": _ts(t.end_time),
        "failure": ({"type": t.failure.error_type, "message": t.failure.message}
                    if t.HasField("failure") else None),
        "attempts": [{"attempt": a.attempt, "agent": a.agent, "start": _ts(a.start_time),
                      "end": _ts(a.end_time),
                      "failure": ({"type": a.failure.error_type, "message": a.failure.message}
                                  if a.HasField("failure") else None)} for a in t.attempts],
    }


# ---------------------------------------------------------------------- recording


class Recorder:
    """The driver's own history: JSON lines, flushed per line."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._n = 0

    def write(self, type_: str, **fields: Any) -> None:
        """One record."""
        self._f.write(json.dumps({"t": time.time(), "src": "driver", "type": type_, **fields},
                                 default=str) + "\n")

    def invoke(self, f: str, **fields: Any) -> str:
        """Record an operation's invocation; returns its id."""
        self._n += 1
        oid = f"{f}-{self._n}"
        self.write("op", f=f, id=oid, phase="invoke", **fields)
        return oid

    def ok(self, oid: str, **fields: Any) -> None:
        """The operation succeeded."""
        self.write("op", id=oid, phase="ok", **fields)

    def fail(self, oid: str, code: grpc.StatusCode | str, **fields: Any) -> None:
        """The operation failed with ``code``."""
        name = code.name if isinstance(code, grpc.StatusCode) else code
        self.write("op", id=oid, phase="fail", code=name, **fields)

    def close(self) -> None:
        """Flush and close."""
        self._f.close()


# ---------------------------------------------------------------------- fault proxy


class NemesisProxy:
    """A TCP proxy with faults (a copy-with-changes of tests/chaos/proxy.py).

    ``pause()``/``resume()``: a silent partition (bytes are held, connections
    stay open). ``drop()``: reset every connection. ``delay``: seconds added to
    every chunk in both directions (order kept, throughput not serialised).
    ``mirror``: connections accepted while it is set have their client bytes
    copied to a second upstream connection whose replies are thrown away, so
    the server receives every request of that connection twice.
    ``lose_replies``: bytes from the upstream are thrown away (requests still
    arrive and run; their answers never come back), until ``drop()``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.delay = 0.0
        self.mirror = False
        self.mirrored_bytes = 0
        self.lose_replies = False
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._jobs: set[asyncio.Task[None]] = set()

    async def start(self) -> NemesisProxy:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        """host:port to give clients."""
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        """Stop forwarding (connections stay open)."""
        self._open.clear()

    def resume(self) -> None:
        """Forward again."""
        self._open.set()

    def heal(self) -> None:
        """Undo every fault."""
        self.resume()
        self.delay = 0.0
        self.mirror = False
        self.lose_replies = False

    def drop(self) -> None:
        """Close every connection now."""
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def aclose(self) -> None:
        """Stop listening and close everything."""
        self.drop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        for t in list(self._jobs):
            t.cancel()
        for t in list(self._jobs):
            with contextlib.suppress(BaseException):
                await t

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        mirror: asyncio.StreamWriter | None = None
        if self.mirror:
            try:
                m_r, mirror = await asyncio.open_connection(*self.target)
                self._spawn(self._discard(m_r, mirror))
            except OSError:
                mirror = None
        conn = [writer, up_w]
        self._writers.update(conn)
        self._spawn(self._pump(reader, up_w, conn, mirror))
        self._spawn(self._pump(up_r, writer, conn, None, replies=True))

    async def _discard(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while await reader.read(65536):
                    pass
        finally:
            writer.transport.abort()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    conn: list[asyncio.StreamWriter],
                    mirror: asyncio.StreamWriter | None, *, replies: bool = False) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=4096)

        async def deliver() -> None:
            try:
                while True:
                    item = await queue.get()
                    if item is None:
                        return
                    due, data = item
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    await self._open.wait()
                    if replies and self.lose_replies:
                        continue  # the request got through; its answer is lost
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                for w in conn:
                    self._writers.discard(w)
                    w.transport.abort()
                if mirror is not None:
                    # Leave the duplicate a moment to be served, then close it.
                    await asyncio.sleep(1.0)
                    mirror.transport.abort()

        sender = asyncio.ensure_future(deliver())
        self._jobs.add(sender)
        sender.add_done_callback(self._jobs.discard)
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if mirror is not None and not mirror.is_closing():
                    mirror.write(data)
                    self.mirrored_bytes += len(data)
                await queue.put((time.monotonic() + self.delay, data))
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
            if sender.done():
                for w in conn:
                    w.transport.abort()


# ---------------------------------------------------------------------- services


TIED = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG, kept across exec\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the driver died before the prctl\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")
"""A launcher that ties its command to the driver's life: when the driver dies
(even by SIGKILL) the kernel kills the child, so no server, agent or service
outlives a campaign. (A ``preexec_fn`` would do it in the forked child before
exec, which is unsafe in a process with gRPC threads: it crashes.)"""


def tied(*args: str) -> list[str]:
    """``args`` run through the TIED launcher (Linux)."""
    if not sys.platform.startswith("linux"):
        return list(args)
    return [sys.executable, "-c", TIED, str(os.getpid()), *args]


class NemesisServer(Server):
    """The chaos harness's ``agentmesh serve`` process, tied to the driver's life,
    run from the source tree ``code``."""

    startup_timeout = 90.0
    """Generous: on a machine loaded far past its cores a restart takes seconds."""

    def __init__(self, env: dict[str, str], code: Path, log: Path | None = None) -> None:
        # Server.start spawns it, waits for the port and, when start-up fails, kills
        # and reaps it before the error propagates.
        super().__init__(env, log=log, argv=tied(sys.executable, "-c", SERVE), cwd=code)
        self.code = code
        self.env["PYTHONPATH"] = f"{code}:{code / 'gen'}"


async def _spawn(*args: str, log: Path | None = None, stdin: int | None = None,
                 code: Path = ROOT) -> asyncio.subprocess.Process:
    out = open(log, "ab") if log else None  # noqa: SIM115, ASYNC230
    try:
        return await asyncio.create_subprocess_exec(
            *tied(*args), cwd=ROOT, stdin=stdin, stdout=asyncio.subprocess.DEVNULL,
            stderr=out if out is not None else asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": f"{code}:{code / 'gen'}",
                 "NEMESIS_CODE_ROOT": str(code)})
    finally:
        if out is not None:
            out.close()


async def _reap(proc: asyncio.subprocess.Process | None, sig: int = signal.SIGKILL) -> None:
    if proc is None:
        return
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class PrivateRedis:
    """A private redis-server (AOF, fsync always: a SIGKILL loses nothing acknowledged)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start (again) on the same port and directory."""
        self.proc = await _spawn(
            shutil.which("redis-server") or "redis-server", "--port", str(self.port),
            "--bind", "127.0.0.1", "--dir", str(self.dir), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--logfile", str(self.dir / "redis.log"))
        await wait_listening(self.port)

    async def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill it."""
        await _reap(self.proc, sig)
        self.proc = None


class PrivateNats:
    """A private nats-server with JetStream in its own store directory."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        venv = Path(sys.executable).parent / "nats-server"
        self.binary = str(venv) if venv.exists() else (shutil.which("nats-server") or "")

    @property
    def url(self) -> str:
        """nats:// URL."""
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start (again) on the same port and store."""
        self.proc = await _spawn(self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js",
                                 "-sd", str(self.dir))
        await wait_listening(self.port)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it."""
        await _reap(self.proc, sig)
        self.proc = None


# ---------------------------------------------------------------------- agents


@dataclass
class AgentSlot:
    """A place for one agent process; a killed agent is replaced in the same slot."""

    base: str
    kind: str
    proxies: list[NemesisProxy]
    gen: int = 0
    proc: asyncio.subprocess.Process | None = None
    procname: str = ""
    logs: list[Path] = field(default_factory=list)

    async def spawn(self, workdir: Path, seed: int, code: Path = ROOT) -> None:
        """Start a fresh agent process in this slot."""
        self.gen += 1
        self.procname = f"{self.base}.{self.gen}"
        log = workdir / f"agent-{self.procname}.jsonl"
        self.logs.append(log)
        targets = ",".join(p.address for p in self.proxies)
        script = SDK_AGENT if self.kind == "sdk" else RAW_AGENT
        args = [sys.executable, str(script), "--targets", targets, "--name", self.procname,
                "--log", str(log)]
        if self.kind == "raw":
            args += ["--seed", str(seed)]
        self.proc = await _spawn(*args, log=workdir / f"agent-{self.procname}.stderr",
                                 stdin=asyncio.subprocess.PIPE, code=code)

    def command(self, cmd: dict[str, Any]) -> None:
        """Send a command line to a raw agent."""
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    async def stop(self) -> None:
        """SIGKILL and reap."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
        await _reap(proc)


# ---------------------------------------------------------------------- campaign


@dataclass
class Config:
    """One campaign."""

    seed: int = 1
    seconds: float = 60.0
    store: str = "memory"
    bus: str = "memory"
    replicas: int = 1
    sdk_agents: int = 3
    raw_agents: int = 2
    rate: float = 12.0
    settle: float = 45.0
    workdir: Path | None = None
    code: Path | None = None
    """Source tree the servers and agents run from (default: this one); e.g. an
    export of another commit, to run the same campaign against older code."""
    quiet: bool = False
    service_faults_first: bool = False
    """Start the first round of faults with the service faults (replicas, Redis, NATS)."""
    min_faults: int = 0
    """Go on past ``seconds`` (to at most twice as long) until this many faults were
    injected: on a loaded machine each fault takes longer, and a short campaign
    would otherwise test little."""


FAULT_WEIGHTS = {
    "agent_kill": 3, "agent_pause": 3, "hb_stall": 2, "work_break": 2, "net_cut": 2,
    "net_reset": 2, "net_delay": 2, "client_dup": 1, "dup_submit": 2, "cancel_race": 2,
    "lock_pause": 1, "probe": 1,
}
SERVICE_WEIGHTS = {"replica_kill": 2, "replica_term": 1, "replica_pause": 1, "redis_restart": 1,
                   "nats_restart": 1, "redis_reply_loss": 1}


class Campaign:
    """The processes, the workload, the nemesis and the final reads of one run."""

    def __init__(self, cfg: Config, workdir: Path) -> None:
        self.cfg = cfg
        self.dir = workdir
        self.code = (cfg.code or ROOT).resolve()
        self.rec = Recorder(workdir / "driver.jsonl")
        self.fault_rng = random.Random(cfg.seed)
        self.work_rng = random.Random(cfg.seed * 7919 + 1)
        self.redis: PrivateRedis | None = None
        self.redis_proxy: NemesisProxy | None = None
        self.nats: PrivateNats | None = None
        self.servers: list[NemesisServer] = []
        self.client_proxies: list[NemesisProxy] = []
        self.slots: list[AgentSlot] = []
        self.stop_work = asyncio.Event()
        self.stopping = asyncio.Event()
        self.chosen: list[tuple[str, str, dict[str, Any], str]] = []
        self.with_rid: list[tuple[str, dict[str, Any], str]] = []
        self.workflows: list[str] = []
        self.lock_pause = asyncio.Event()
        self.lock_paused = asyncio.Event()
        self.cas_keys = ["cas/k0", "cas/k1", *(f"cas/h{k}" for k in range(4))]
        self._rr = 0
        self.targets_of: dict[str, str] = {}
        """The address each operation went to."""
        self._jobs: set[asyncio.Task[None]] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.fault_id = 0

    # -- plumbing ----------------------------------------------------------------

    def log(self, msg: str) -> None:
        """Progress line."""
        if not self.cfg.quiet:
            print(f"[nemesis {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def channel(self, target: str) -> grpc.aio.Channel:
        """A long-lived channel to ``target``."""
        ch = self._channels.get(target)
        if ch is None:
            ch = self._channels[target] = grpc.aio.insecure_channel(target)
        return ch

    def direct(self) -> list[str]:
        """Replica addresses."""
        return [s.address for s in self.servers]

    def via_proxy(self) -> list[str]:
        """Client proxy addresses."""
        return [p.address for p in self.client_proxies]

    def pick(self, targets: list[str]) -> str:
        """Round robin."""
        self._rr += 1
        return targets[self._rr % len(targets)]

    def spawn(self, coro: Awaitable[None]) -> None:
        """A background job owned by the campaign."""
        task = asyncio.ensure_future(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    # -- start and stop ------------------------------------------------------------

    async def start(self) -> None:
        """Services, replicas, proxies, agents."""
        cfg = self.cfg
        store, bus = "memory://", "memory://"
        if cfg.store == "redis":
            self.redis = PrivateRedis(self.dir / "redis")
            await self.redis.start()
            # The replicas reach Redis through a proxy, for the reply-loss fault.
            self.redis_proxy = await NemesisProxy("127.0.0.1", self.redis.port).start()
            store = f"redis://{self.redis_proxy.address}/0"
        if cfg.bus == "nats":
            self.nats = PrivateNats(self.dir / "nats")
            await self.nats.start()
            bus = self.nats.url
        env = {"AGENTMESH_STORE": store, "AGENTMESH_BUS": bus,
               "AGENTMESH_KEY_PREFIX": f"nemesis{cfg.seed}",
               "AGENTMESH_HEARTBEAT_INTERVAL": str(HEARTBEAT),
               "AGENTMESH_HEARTBEAT_MISSES": str(MISSES), "AGENTMESH_TICK": "0.02",
               "AGENTMESH_DRAIN_GRACE": "0.3", "AGENTMESH_DEFAULT_EXECUTION_TIMEOUT": "4",
               "AGENTMESH_DEFAULT_MAX_ATTEMPTS": "50", "AGENTMESH_BREAKER_FAIL_MAX": "50",
               "AGENTMESH_BLOB": str(self.dir / "blob"), "AGENTMESH_LOG_LEVEL": "WARNING"}
        self.servers = [NemesisServer(env, self.code, log=self.dir / f"server{i}.log")
                        for i in range(cfg.replicas)]
        for s in self.servers:
            await s.start()
        self.client_proxies = [await NemesisProxy("127.0.0.1", s.port).start()
                               for s in self.servers]
        names = [(f"sdk{i}", "sdk") for i in range(cfg.sdk_agents)] + [
            (f"raw{i}", "raw") for i in range(cfg.raw_agents)]
        for base, kind in names:
            proxies = [await NemesisProxy("127.0.0.1", s.port).start() for s in self.servers]
            slot = AgentSlot(base, kind, proxies)
            await slot.spawn(self.dir, cfg.seed, self.code)
            self.slots.append(slot)
        self.rec.write("meta", seed=cfg.seed, store=cfg.store, bus=cfg.bus, code=str(self.code),
                       replicas=cfg.replicas, heartbeat=HEARTBEAT, ttl=TTL,
                       tolerance=nemesis_checker.TOL, seconds=cfg.seconds,
                       servers=self.direct(), agents=[s.base for s in self.slots])
        await self._wait_agents(len(self.slots), 30)

    async def _wait_agents(self, n: int, timeout: float) -> None:  # noqa: ASYNC109
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(grpc.aio.AioRpcError):
                resp = await discovery_pb2_grpc.DiscoveryServiceStub(
                    self.channel(self.direct()[0])).ListAgents(
                    discovery_pb2.ListAgentsRequest(capability="work"), timeout=2)
                names = {a.display_name.rsplit(".", 1)[0] for a in resp.agents}
                if len(names) >= n:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"fewer than {n} agents registered within {timeout}s")

    async def aclose(self) -> None:
        """Kill everything this campaign started."""
        for t in list(self._jobs):
            t.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        for slot in self.slots:
            await slot.stop()
        for s in self.servers:
            s.kill(signal.SIGCONT)
            s.stop()
        for ch in self._channels.values():
            await ch.close()
        for p in [*self.client_proxies, *(p for s in self.slots for p in s.proxies),
                  *([self.redis_proxy] if self.redis_proxy else [])]:
            await p.aclose()
        if self.redis is not None:
            await self.redis.stop()
        if self.nats is not None:
            await self.nats.stop(signal.SIGKILL)
        self.rec.close()

    # -- client operations ---------------------------------------------------------

    async def _unary(self, oid: str, call: Callable[[grpc.aio.Channel], Awaitable[Any]],
                     targets: list[str], *,
                     quiet: frozenset[grpc.StatusCode] = frozenset()) -> tuple[Any,
                                                                               grpc.StatusCode]:
        """One call on the next target; failures are recorded unless ``quiet``."""
        target = self.pick(targets)
        self.targets_of[oid] = target
        try:
            resp = await call(self.channel(target))
        except grpc.aio.AioRpcError as err:
            if err.code() not in quiet:
                self.rec.fail(oid, err.code(), target=target,
                              detail=(err.details() or "")[:200])
            return None, err.code()
        return resp, grpc.StatusCode.OK

    async def submit(self, spec: dict[str, Any], rid: str, tid: str, *, retries: int = 5,
                     via: str = "proxy", channel: grpc.aio.Channel | None = None) -> str:
        """SubmitTask (retried with the same request_id on an indeterminate failure)."""
        for attempt in range(retries if rid else 1):
            oid = self.rec.invoke("submit", task_id=tid, request_id=rid,
                                  input=json.dumps(spec, sort_keys=True), via=via,
                                  attempt=attempt)
            # "call" names this one SubmitTask call: two tasks carrying it mean the
            # server ran one call twice (a retry of its own), request_id or not.
            labels = {"call": oid, **({"rid": rid} if rid else {})}
            task = task_pb2.Task(capability="work", input=_js(spec), retry_policy=RETRY,
                                 execution_timeout=_dur(4.0), labels=labels)
            req = task_pb2.SubmitTaskRequest(task=task, task_id=tid, request_id=rid)
            if channel is not None:
                try:
                    resp = await task_pb2_grpc.TaskServiceStub(channel).SubmitTask(req,
                                                                                   timeout=3)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    self.rec.fail(oid, err.code())
                    resp, code = None, err.code()
            else:
                resp, code = await self._unary(
                    oid, lambda ch, req=req: task_pb2_grpc.TaskServiceStub(ch).SubmitTask(
                        req, timeout=3),
                    self.via_proxy())
            if code == grpc.StatusCode.OK:
                name = str(resp.task.name)
                self.rec.ok(oid, task=name, state=task_pb2.TaskState.Name(resp.task.state),
                            target=self.targets_of.pop(oid, "direct"))
                return name
            if code not in INDETERMINATE:
                return ""
            await asyncio.sleep(0.2)
        return ""

    async def _submitter(self) -> None:
        sem = asyncio.Semaphore(8)
        i = 0
        rng = self.work_rng
        seed = self.cfg.seed

        async def one(spec: dict[str, Any], rid: str, tid: str) -> None:
            async with sem:
                name = await self.submit(spec, rid, tid)
            if name and tid:
                self.chosen.append((tid, rid, spec, name))
            elif name and rid:
                self.with_rid.append((rid, spec, name))

        while not self.stop_work.is_set():
            i += 1
            slow = rng.random() < 0.2  # long enough to be in flight when a fault hits
            spec: dict[str, Any] = {"n": i, "ms": rng.randint(600, 2000) if slow
                                    else rng.randint(10, 200)}
            if rng.random() < 0.08:
                spec["fail"] = "first"
            r = rng.random()
            rid = f"r{seed}-{i}" if r < 0.6 else ""
            tid = f"t{seed}-{i}" if r < 0.25 else ""
            self.spawn(one(spec, rid, tid))
            await asyncio.sleep(1.0 / self.cfg.rate)

    async def _workflow_submitter(self) -> None:
        rng = random.Random(self.cfg.seed * 31 + 5)
        i = 0
        while not self.stop_work.is_set():
            i += 1
            fails = i % 4 == 0

            def step(sid: str, deps: list[str], spec: dict[str, Any]) -> task_pb2.WorkflowStep:
                return task_pb2.WorkflowStep(id=sid, capability="step", input=_js(spec),
                                             depends_on=deps, retry_policy=RETRY,
                                             timeout=_dur(4.0))

            ms = rng.randint(10, 120)
            steps = [step("a", [], {"ms": ms, "wf": i}), step("b", ["a"], {"ms": ms}),
                     step("c", ["a"], {"ms": ms, "fail": "always"} if fails else {"ms": ms}),
                     step("d", ["b", "c"], {"ms": ms})]
            rid = f"w{self.cfg.seed}-{i}"
            req = task_pb2.SubmitWorkflowRequest(workflow=task_pb2.Workflow(
                display_name=f"nemesis-{i}", steps=steps), request_id=rid)
            for _ in range(5):
                oid = self.rec.invoke("workflow", request_id=rid, fails=fails)
                resp, code = await self._unary(
                    oid, lambda ch, req=req: task_pb2_grpc.TaskServiceStub(ch).SubmitWorkflow(
                        req, timeout=3), self.via_proxy())
                if code == grpc.StatusCode.OK:
                    wf = resp.workflow
                    self.rec.ok(oid, workflow=wf.name,
                                steps={s.id: s.task for s in wf.steps})
                    self.workflows.append(str(wf.name))
                    break
                if code not in INDETERMINATE:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(rng.uniform(1.0, 2.0))

    async def _cas_get(self, n: int, key: str) -> int | None:
        """Get ``key``; its version (0 when absent), None when the read failed."""
        oid = self.rec.invoke("cas_get", key=key, client=n)
        resp, code = await self._unary(
            oid, lambda ch: state_pb2_grpc.StateServiceStub(ch).Get(
                state_pb2.GetRequest(key=key), timeout=2), self.direct(),
            quiet=frozenset({grpc.StatusCode.NOT_FOUND}))
        if code == grpc.StatusCode.OK:
            value = json.loads(resp.entry.value.data) if resp.entry.value.data else None
            self.rec.ok(oid, version=int(resp.entry.version), value=value)
            return int(resp.entry.version)
        if code == grpc.StatusCode.NOT_FOUND:
            self.rec.ok(oid, version=0, value=None)
            return 0
        return None

    async def _cas_put(self, n: int, key: str, version: int, seq: int) -> int | None:
        """Put ``key`` at expected ``version``; the new version, None when it failed."""
        val = {"c": n, "s": seq}
        oid = self.rec.invoke("cas_put", key=key, client=n, expected=version, value=val)
        resp, code = await self._unary(
            oid, lambda ch: state_pb2_grpc.StateServiceStub(ch).Put(state_pb2.PutRequest(
                key=key, value=_js(val), expected_version=version), timeout=2),
            self.direct())
        if code != grpc.StatusCode.OK:
            return None
        self.rec.ok(oid, version=int(resp.entry.version))
        return int(resp.entry.version)

    async def _cas_client(self, n: int) -> None:
        """Get, then Put at the version read, on two keys shared by three clients."""
        rng = random.Random(self.cfg.seed * 101 + n)
        seq = 0
        while not self.stop_work.is_set():
            seq += 1
            key = rng.choice(self.cas_keys[:2])
            version = await self._cas_get(n, key)
            if version is not None:
                await self._cas_put(n, key, version, seq)
            await asyncio.sleep(rng.uniform(0.02, 0.1))

    async def _cas_hammer(self, stop: asyncio.Event) -> None:
        """Back-to-back CAS Puts, each client on its own key (so every Put is at
        the right version and succeeds unless something is wrong): whenever a
        service fault strikes, a Put that should succeed is in flight."""

        async def client(k: int) -> None:
            n, key = 100 + self.fault_id * 10 + k, f"cas/h{k}"
            seq = 0
            version = await self._cas_get(n, key)
            while not stop.is_set():
                seq += 1
                if version is None:
                    version = await self._cas_get(n, key)
                    continue
                version = await self._cas_put(n, key, version, seq)

        await asyncio.gather(*(client(k) for k in range(4)))

    async def _lock_client(self, n: int) -> None:
        rng = random.Random(self.cfg.seed * 211 + n)
        lock, key, lease = "lk/a", "lkdata/a", 0.8
        owner = f"L{n}"
        seq = 0
        while not self.stop_work.is_set():
            oid = self.rec.invoke("lock_acquire", lock=lock, owner=owner)
            resp, code = await self._unary(
                oid, lambda ch: state_pb2_grpc.StateServiceStub(ch).AcquireLock(
                    state_pb2.AcquireLockRequest(name=lock, owner=owner,
                                                 lease_duration=_dur(lease),
                                                 wait_timeout=_dur(1.0)), timeout=3),
                self.direct())
            if code != grpc.StatusCode.OK:
                await asyncio.sleep(rng.uniform(0.02, 0.1))
                continue
            token = int(resp.fencing_token)
            self.rec.ok(oid, token=token, expire=_ts(resp.expire_time))
            pause = n == 0 and self.lock_pause.is_set()

            async def fenced_put(token: int = token) -> None:
                nonlocal seq
                seq += 1
                val = {"owner": owner, "token": token, "s": seq}
                oid = self.rec.invoke("lock_put", lock=lock, owner=owner, token=token, key=key,
                                      value=val)
                r, c = await self._unary(
                    oid, lambda ch: state_pb2_grpc.StateServiceStub(ch).Put(state_pb2.PutRequest(
                        key=key, value=_js(val), lock=lock, fencing_token=token), timeout=2),
                    self.direct())
                if c == grpc.StatusCode.OK:
                    self.rec.ok(oid, version=int(r.entry.version))

            await fenced_put()
            if pause:
                self.rec.write("lock_pause", owner=owner, token=token, secs=lease + 0.6)
                await asyncio.sleep(lease + 0.6)
            elif rng.random() < 0.5:
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                oid = self.rec.invoke("lock_renew", lock=lock, owner=owner, token=token)
                resp, code = await self._unary(
                    oid, lambda ch, token=token: state_pb2_grpc.StateServiceStub(ch).RenewLock(
                        state_pb2.RenewLockRequest(name=lock, fencing_token=token,
                                                   lease_duration=_dur(lease)), timeout=2),
                    self.direct())
                if code == grpc.StatusCode.OK:
                    self.rec.ok(oid, expire=_ts(resp.expire_time))
            await fenced_put()
            if pause:
                oid = self.rec.invoke("lock_renew", lock=lock, owner=owner, token=token)
                resp, code = await self._unary(
                    oid, lambda ch, token=token: state_pb2_grpc.StateServiceStub(ch).RenewLock(
                        state_pb2.RenewLockRequest(name=lock, fencing_token=token,
                                                   lease_duration=_dur(lease)), timeout=2),
                    self.direct())
                if code == grpc.StatusCode.OK:
                    self.rec.ok(oid, expire=_ts(resp.expire_time))
            oid = self.rec.invoke("lock_release", lock=lock, owner=owner, token=token)
            resp, code = await self._unary(
                oid, lambda ch, token=token: state_pb2_grpc.StateServiceStub(ch).ReleaseLock(
                    state_pb2.ReleaseLockRequest(name=lock, fencing_token=token), timeout=2),
                self.direct())
            if code == grpc.StatusCode.OK:
                self.rec.ok(oid)
            if pause:
                self.lock_pause.clear()
                self.lock_paused.set()
            await asyncio.sleep(rng.uniform(0.02, 0.1))

    async def _watch_agents(self, replica: int) -> None:
        while not self.stopping.is_set():
            try:
                stub = discovery_pb2_grpc.DiscoveryServiceStub(
                    self.channel(self.servers[replica].address))
                call = stub.WatchAgents(discovery_pb2.WatchAgentsRequest(include_existing=True))
                async for ev in call:
                    state = discovery_pb2.AgentState.Name(ev.agent.state).removeprefix(
                        "AGENT_STATE_")
                    kind = discovery_pb2.AgentEventType.Name(ev.type).removeprefix(
                        "AGENT_EVENT_TYPE_")
                    if kind == "UPDATED" and state == "ACTIVE":
                        continue  # load changes
                    self.rec.write("agent_event", replica=replica, agent=ev.agent.name,
                                   display=ev.agent.display_name, event=kind, state=state,
                                   event_time=_ts(ev.event_time))
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)

    async def _watch_tasks(self, replica: int) -> None:
        states = [task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED,
                  task_pb2.TASK_STATE_CANCELLED, task_pb2.TASK_STATE_DEAD_LETTERED]
        while not self.stopping.is_set():
            try:
                stub = task_pb2_grpc.TaskServiceStub(self.channel(self.servers[replica].address))
                async for ev in stub.WatchTasks(task_pb2.WatchTasksRequest(states=states)):
                    t = ev.task
                    self.rec.write("task_event", replica=replica, task=t.name,
                                   state=task_pb2.TaskState.Name(t.state).removeprefix(
                                       "TASK_STATE_"), attempt=t.attempt,
                                   output=_canon(t.output) if t.HasField("output") else "")
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)

    # -- faults ----------------------------------------------------------------------

    def _fault(self, kind: str, **fields: Any) -> str:
        self.fault_id += 1
        fid = str(self.fault_id)
        self.rec.write("fault", fid=fid, kind=kind, phase="start", **fields)
        self.log(f"fault {fid}: {kind} {fields}")
        return fid

    def _fault_end(self, fid: str, **fields: Any) -> None:
        self.rec.write("fault", fid=fid, phase="end", **fields)

    def kinds(self) -> dict[str, int]:
        """Fault kinds this configuration can inject, with their weights."""
        kinds = dict(FAULT_WEIGHTS)
        if not any(s.kind == "raw" for s in self.slots):
            for k in ("hb_stall", "work_break", "probe"):
                kinds.pop(k)
        if self.cfg.replicas >= 2 and self.cfg.store == "redis":
            kinds["replica_kill"] = SERVICE_WEIGHTS["replica_kill"]
            kinds["replica_term"] = SERVICE_WEIGHTS["replica_term"]
            kinds["replica_pause"] = SERVICE_WEIGHTS["replica_pause"]
        if self.redis is not None:
            kinds["redis_restart"] = SERVICE_WEIGHTS["redis_restart"]
            kinds["redis_reply_loss"] = SERVICE_WEIGHTS["redis_reply_loss"]
        if self.nats is not None:
            kinds["nats_restart"] = SERVICE_WEIGHTS["nats_restart"]
        return kinds

    async def _nemesis(self, until: float) -> None:
        rng = self.fault_rng
        kinds = self.kinds()
        order = sorted(kinds)
        rng.shuffle(order)
        if self.cfg.service_faults_first:  # order is popped from its end
            order = ([k for k in order if k not in SERVICE_WEIGHTS]
                     + [k for k in order if k in SERVICE_WEIGHTS])
        injected = 0
        cap = until + self.cfg.seconds
        while time.monotonic() < until or (injected < self.cfg.min_faults
                                            and time.monotonic() < cap):
            await asyncio.sleep(rng.uniform(0.4, 1.2))
            if time.monotonic() >= until and injected >= self.cfg.min_faults:
                break
            injected += 1
            if order:
                kind = order.pop()
            else:
                kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
            await getattr(self, f"_f_{kind}")(rng)

    async def _slot(self, rng: random.Random, kind: str | None = None) -> AgentSlot:
        pool = [s for s in self.slots if kind is None or s.kind == kind]
        slot = rng.choice(pool)
        if slot.proc is None or slot.proc.returncode is not None:
            code = slot.proc.returncode if slot.proc is not None else None
            self.rec.write("agent_died", proc=slot.procname, returncode=code)
            self.log(f"agent {slot.procname} had died (returncode {code}); replacing it")
            await slot.stop()
            await slot.spawn(self.dir, self.cfg.seed, self.code)
        return slot

    async def _f_agent_kill(self, rng: random.Random) -> None:
        slot = await self._slot(rng)
        fid = self._fault("agent_kill", proc=slot.procname)
        await slot.stop()
        await slot.spawn(self.dir, self.cfg.seed, self.code)
        self._fault_end(fid, replacement=slot.procname)

    async def _f_agent_pause(self, rng: random.Random) -> None:
        slot = await self._slot(rng)
        secs = TTL + rng.uniform(0.6, 1.2)
        fid = self._fault("agent_pause", proc=slot.procname, secs=secs)
        assert slot.proc is not None
        slot.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(secs)
        finally:
            slot.proc.send_signal(signal.SIGCONT)
        self._fault_end(fid)

    async def _f_hb_stall(self, rng: random.Random) -> None:
        slot = await self._slot(rng, "raw")
        secs = TTL + rng.uniform(0.6, 1.2)
        fid = self._fault("hb_stall", proc=slot.procname, secs=secs)
        slot.command({"cmd": "hb_stall", "secs": secs})
        await asyncio.sleep(secs)
        self._fault_end(fid)

    async def _f_work_break(self, rng: random.Random) -> None:
        slot = await self._slot(rng, "raw")
        fid = self._fault("work_break", proc=slot.procname)
        slot.command({"cmd": "work_break"})
        await asyncio.sleep(0.5)
        self._fault_end(fid)

    async def _f_probe(self, rng: random.Random) -> None:
        slot = await self._slot(rng, "raw")
        fid = self._fault("probe", proc=slot.procname)
        slot.command({"cmd": "probe"})
        await asyncio.sleep(TTL + 1.5)
        self._fault_end(fid)

    async def _f_net_cut(self, rng: random.Random) -> None:
        slot = await self._slot(rng)
        secs = rng.choice([rng.uniform(0.2, 0.4), TTL + rng.uniform(0.6, 1.2)])
        fid = self._fault("net_cut", proc=slot.procname, secs=secs)
        for p in slot.proxies:
            p.pause()
        try:
            await asyncio.sleep(secs)
        finally:
            for p in slot.proxies:
                p.resume()
        self._fault_end(fid)

    async def _f_net_reset(self, rng: random.Random) -> None:
        slot = await self._slot(rng)
        fid = self._fault("net_reset", proc=slot.procname)
        for p in slot.proxies:
            p.drop()
        await asyncio.sleep(0.2)
        self._fault_end(fid)

    async def _f_net_delay(self, rng: random.Random) -> None:
        slot = await self._slot(rng)
        delay, secs = rng.uniform(0.05, 0.25), rng.uniform(1.5, 3.0)
        fid = self._fault("net_delay", proc=slot.procname, delay=delay, secs=secs)
        for p in slot.proxies:
            p.delay = delay
        try:
            await asyncio.sleep(secs)
        finally:
            for p in slot.proxies:
                p.delay = 0.0
        self._fault_end(fid)

    async def _f_client_dup(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.client_proxies))
        # A proxy of its own: the shared client proxy would also mirror any connection
        # the steady submitter happens to open in this window, duplicating its submits
        # that carry no request_id (which the server rightly cannot tell apart).
        proxy = await NemesisProxy("127.0.0.1", self.servers[i].port).start()
        fid = self._fault("client_dup", replica=i)
        proxy.mirror = True
        before = proxy.mirrored_bytes
        try:
            async with grpc.aio.insecure_channel(proxy.address, options=LOCAL_POOL) as ch:
                for k in range(4):
                    n = 1_000_000 + self.fault_id * 10 + k
                    spec = {"n": n, "ms": rng.randint(10, 100)}
                    rid = f"m{self.cfg.seed}-{n}"
                    tid = f"tm{self.cfg.seed}-{n}" if k % 2 else ""
                    await self.submit(spec, rid, tid, retries=1, via="mirror", channel=ch)
        finally:
            proxy.mirror = False
            mirrored = proxy.mirrored_bytes - before
            await proxy.aclose()
        self._fault_end(fid, mirrored_bytes=mirrored)

    async def _f_dup_submit(self, rng: random.Random) -> None:
        fid = self._fault("dup_submit")
        for tid, rid, spec, _ in rng.sample(self.chosen, min(2, len(self.chosen))):
            await self.submit(spec, rid, tid, via="dup-same")
            other = {**spec, "n": -int(spec["n"]), "dup": True}
            await self.submit(other, f"{rid}-other", tid, retries=1, via="dup-other")
        for rid, spec, _ in rng.sample(self.with_rid, min(2, len(self.with_rid))):
            await self.submit(spec, rid, "", via="dup-rid")
        self._fault_end(fid)

    async def _f_cancel_race(self, rng: random.Random) -> None:
        fid = self._fault("cancel_race")

        async def race(k: int) -> None:
            spec = {"n": 2_000_000 + self.fault_id * 10 + k, "ms": rng.randint(60, 250)}
            name = await self.submit(spec, "", "", via="cancel-race")
            if not name:
                return
            await asyncio.sleep(rng.uniform(0.05, 0.35))
            oid = self.rec.invoke("cancel", task=name)
            resp, code = await self._unary(
                oid, lambda ch: task_pb2_grpc.TaskServiceStub(ch).CancelTask(
                    task_pb2.CancelTaskRequest(name=name, reason="nemesis race"), timeout=3),
                self.via_proxy())
            if code == grpc.StatusCode.OK:
                self.rec.ok(oid, state=task_pb2.TaskState.Name(resp.task.state).removeprefix(
                    "TASK_STATE_"))

        await asyncio.gather(*(race(k) for k in range(3)))
        self._fault_end(fid)

    async def _f_lock_pause(self, rng: random.Random) -> None:
        fid = self._fault("lock_pause", owner="L0")
        self.lock_paused.clear()
        self.lock_pause.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.lock_paused.wait(), 8)
        self._fault_end(fid, done=self.lock_paused.is_set())

    async def _f_replica_kill(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.servers))
        secs = rng.uniform(0.5, 2.0)
        fid = self._fault("replica_kill", replica=i, secs=secs)
        server = self.servers[i]
        server.kill(signal.SIGKILL)
        if server.proc is not None:
            await asyncio.to_thread(server.proc.wait, 10)
        await asyncio.sleep(secs)
        await server.start()
        self._fault_end(fid)

    async def _f_replica_pause(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.servers))
        secs = rng.uniform(0.5, TTL + 1.5)
        fid = self._fault("replica_pause", replica=i, secs=secs)
        proc = self.servers[i].proc
        if proc is None or proc.poll() is not None:
            self._fault_end(fid, done=False)
            return
        proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(secs)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
        self._fault_end(fid)

    async def _f_replica_term(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.servers))
        fid = self._fault("replica_term", replica=i)
        server = self.servers[i]
        server.kill(signal.SIGTERM)
        if server.proc is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(server.proc.wait, 10), 10)
            except (TimeoutError, Exception):
                server.stop()
        exited = time.time()
        await asyncio.sleep(0.3)
        await server.start()
        self._fault_end(fid, exited=exited, proxy=self.client_proxies[i].address)

    async def _f_redis_restart(self, rng: random.Random) -> None:
        assert self.redis is not None
        secs = rng.uniform(0.3, 1.2)
        fid = self._fault("redis_restart", secs=secs)
        stop = asyncio.Event()
        hammer = asyncio.ensure_future(self._cas_hammer(stop))
        try:
            await asyncio.sleep(0.15)
            await self.redis.stop(signal.SIGKILL)
            await asyncio.sleep(0.1)
            stop.set()
            await asyncio.sleep(secs)
            await self.redis.start()
        finally:
            stop.set()
            await hammer
        self._fault_end(fid)

    async def _f_redis_reply_loss(self, rng: random.Random) -> None:
        """Redis runs the replicas' commands but its answers are lost, then the
        connections reset: a client that retries a non-idempotent command re-runs it."""
        assert self.redis_proxy is not None
        secs = rng.uniform(0.1, 0.3)
        fid = self._fault("redis_reply_loss", secs=secs)
        stop = asyncio.Event()
        hammer = asyncio.ensure_future(self._cas_hammer(stop))
        try:
            await asyncio.sleep(0.1)
            self.redis_proxy.lose_replies = True
            await asyncio.sleep(secs)
            self.redis_proxy.drop()
        finally:
            self.redis_proxy.lose_replies = False
            await asyncio.sleep(0.2)
            stop.set()
            await hammer
        self._fault_end(fid)

    async def _f_nats_restart(self, rng: random.Random) -> None:
        assert self.nats is not None
        secs = rng.uniform(0.3, 1.0)
        fid = self._fault("nats_restart", secs=secs)
        await self.nats.stop(signal.SIGTERM)
        await asyncio.sleep(secs)
        await self.nats.start()
        self._fault_end(fid)

    # -- settle and final reads -----------------------------------------------------------

    async def heal(self) -> None:
        """Undo every fault: proxies healed, agents resumed, services and replicas up."""
        for p in [*self.client_proxies, *(p for s in self.slots for p in s.proxies),
                  *([self.redis_proxy] if self.redis_proxy else [])]:
            p.heal()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGCONT)
            else:
                await slot.spawn(self.dir, self.cfg.seed, self.code)
        if self.redis is not None and (self.redis.proc is None
                                       or self.redis.proc.returncode is not None):
            await self.redis.start()
        if self.nats is not None and (self.nats.proc is None
                                      or self.nats.proc.returncode is not None):
            await self.nats.start()
        for s in self.servers:
            if s.proc is None or s.proc.poll() is not None:
                await s.start()

    async def list_all(self) -> list[task_pb2.Task]:
        """Every task of the namespace."""
        stub = task_pb2_grpc.TaskServiceStub(self.channel(self.direct()[0]))
        out: list[task_pb2.Task] = []
        token = ""
        while True:
            resp = await stub.ListTasks(task_pb2.ListTasksRequest(page_size=1000,
                                                                  page_token=token), timeout=10)
            out.extend(resp.tasks)
            token = resp.next_page_token
            if not token:
                return out

    async def settle(self) -> bool:
        """Wait until no task is left open; True when everything ended in time."""
        self.rec.write("settle", phase="start")
        end = time.monotonic() + self.cfg.settle
        ok = False
        while time.monotonic() < end:
            try:
                tasks = await self.list_all()
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
                continue
            open_ = [t for t in tasks if task_pb2.TaskState.Name(t.state).removeprefix(
                "TASK_STATE_") not in TERMINAL]
            if not open_:
                ok = True
                break
            await asyncio.sleep(0.5)
        self.rec.write("settle", phase="end", settled=ok)
        return ok

    async def final_reads(self) -> None:
        """Record every task, workflow and key as the mesh holds them now."""
        tasks = await self.list_all()
        self.rec.write("final_list", tasks=[{"name": t.name, "labels": dict(t.labels),
                                             "state": task_pb2.TaskState.Name(t.state)}
                                            for t in tasks])
        for t in tasks:
            self.rec.write("final_task", task=task_record(t))
        stub = task_pb2_grpc.TaskServiceStub(self.channel(self.direct()[0]))
        for name in self.workflows:
            try:
                wf = (await stub.GetWorkflow(task_pb2.GetWorkflowRequest(name=name),
                                             timeout=5)).workflow
            except grpc.aio.AioRpcError as err:
                self.rec.write("final_workflow_error", workflow=name, code=err.code().name)
                continue
            self.rec.write("final_workflow", workflow={
                "name": wf.name, "failure_reason": wf.failure_reason,
                "state": task_pb2.WorkflowState.Name(wf.state).removeprefix("WORKFLOW_STATE_"),
                "steps": [{"id": s.id, "task": s.task, "depends_on": list(s.depends_on),
                           "state": task_pb2.TaskState.Name(s.state).removeprefix(
                               "TASK_STATE_")} for s in wf.steps]})
        state = state_pb2_grpc.StateServiceStub(self.channel(self.direct()[0]))
        for key in self.cas_keys:
            try:
                e = (await state.Get(state_pb2.GetRequest(key=key), timeout=5)).entry
                self.rec.write("final_state", key=key, version=int(e.version),
                               value=json.loads(e.value.data) if e.value.data else None)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    self.rec.write("final_state", key=key, version=0, value=None)

    # -- the run ---------------------------------------------------------------------

    async def run(self) -> None:
        """Start, load, inject faults, heal, settle, read."""
        cfg = self.cfg
        t_start = time.monotonic()
        await self.start()
        self.log(f"mesh up in {time.monotonic() - t_start:.1f}s: {len(self.servers)} "
                 f"replica(s), {len(self.slots)} agents; store {cfg.store}, bus {cfg.bus}")
        for i in range(len(self.servers)):
            self.spawn(self._watch_agents(i))
            self.spawn(self._watch_tasks(i))
        await asyncio.sleep(0.3)
        loads = [asyncio.ensure_future(c) for c in (
            self._submitter(), self._workflow_submitter(), *(self._cas_client(n)
                                                             for n in range(3)),
            *(self._lock_client(n) for n in range(2)))]
        try:
            await self._nemesis(time.monotonic() + cfg.seconds)
        finally:
            self.stop_work.set()
            await self.heal()
            done, pending = await asyncio.wait(loads, timeout=10)
            for t in pending:
                t.cancel()
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    self.log(f"workload error: {t.exception()!r}")
        await asyncio.sleep(0.5)
        pending_jobs = [t for t in self._jobs if not t.done()]
        self.log(f"faults over; settling ({len(pending_jobs)} background jobs)")
        settled = await self.settle()
        self.log(f"settled: {settled}; final reads")
        await self.final_reads()
        await asyncio.sleep(0.3)  # the watchers' last events
        self.stopping.set()

    def history_path(self) -> Path:
        """Where the merged history goes."""
        return self.dir / "history.jsonl"

    def merge(self) -> list[dict[str, Any]]:
        """Every process's records, merged by time into one history file."""
        records: list[dict[str, Any]] = []
        for path in sorted(self.dir.glob("*.jsonl")):
            if path.name == "history.jsonl":
                continue
            with open(path, encoding="utf-8") as f:
                for raw in f:
                    line = raw.strip()
                    if not line:
                        continue
                    with contextlib.suppress(ValueError):
                        records.append(json.loads(line))  # a torn last line of a SIGKILL
        records.sort(key=lambda r: float(r.get("t", 0.0)))
        with open(self.history_path(), "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        return records

    def check(self) -> nemesis_checker.Result:
        """Merge the history and run the checker on it."""
        return nemesis_checker.check(self.merge())


async def run_campaign(cfg: Config) -> tuple[nemesis_checker.Result, Path]:
    """One campaign; returns the checker's result and the history file."""
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix=f"nemesis-{cfg.seed}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(cfg, workdir)
    try:
        await campaign.run()
    finally:
        await campaign.aclose()
    # Checked once every process is gone: the proxies run on this event loop.
    return campaign.check(), campaign.history_path()


def main() -> None:
    """CLI."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--bus", choices=["memory", "nats"], default="memory")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--sdk-agents", type=int, default=3)
    parser.add_argument("--raw-agents", type=int, default=2)
    parser.add_argument("--rate", type=float, default=12.0, help="tasks submitted per second")
    parser.add_argument("--settle", type=float, default=45.0)
    parser.add_argument("--out", type=Path, default=None, help="directory for logs + history")
    parser.add_argument("--code", type=Path, default=None,
                        help="source tree the servers and agents run from, e.g. "
                        "`git archive HEAD | tar -x -C /tmp/head` (default: this one)")
    args = parser.parse_args()
    if args.replicas > 1 and args.store == "memory":
        parser.error("--replicas > 1 needs --store redis (replicas share the store)")
    cfg = Config(seed=args.seed, seconds=args.minutes * 60, store=args.store, bus=args.bus,
                 replicas=args.replicas, sdk_agents=args.sdk_agents, raw_agents=args.raw_agents,
                 rate=args.rate, settle=args.settle, workdir=args.out, code=args.code)
    t0 = time.monotonic()
    result, path = asyncio.run(run_campaign(cfg))
    print(result.render())
    print(f"history: {path}")
    print(f"wall time: {time.monotonic() - t0:.1f}s; seed {args.seed}; "
          f"{result.violation_count} violation(s)")
    raise SystemExit(1 if result.violation_count else 0)


if __name__ == "__main__":
    main()

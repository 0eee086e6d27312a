"""End-to-end benchmark: no-op tasks through real agent processes.

W1: N tasks submitted back to back (pipelined, --inflight at once) with 2 agent
    processes; tasks/s from the first submit to the last result seen at the
    submitter (through WatchTasks).
W2: open loop at --rate tasks/s for --duration s; p50/p95/p99 of
    submit -> result seen at the submitter.

    .venv/bin/python loadtests/bench.py                       # embedded
    .venv/bin/python loadtests/bench.py --store redis --bus nats --replicas 2
        # production backends at their local defaults (or full URLs)

The server(s) and the agents are separate processes; the submitter runs here.
``--code DIR`` runs the servers and agents from another source tree (a
``git worktree`` of another commit); with ``PYTHONPATH=DIR:DIR/gen`` the
submitter's SDK comes from there too (``peer_bench.py --code`` does both), so
two commits can be measured side by side. ``--cpu-pid NAME=PID`` adds a
process (redis-server, nats-server) to W1's CPU figures, and ``cpu_us_per_task``
is the sum over every listed process divided by the task count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from agent_sdk import MeshClient, TaskInfo
from server.settings import backend_url

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_report(procs: dict[str, int], before: dict[str, float]) -> dict[str, float]:
    """CPU seconds each named process used since ``before``."""
    return {name: round(cpu_seconds(pid) - before.get(name, 0.0), 3)
            for name, pid in procs.items()}


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, limit: float = 60.0) -> None:
    """Until something listens on the port."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def write_auth_file(directory: Path) -> dict[str, str]:
    """--auth: a token file with a client and an agent principal; returns their tokens."""
    from server.api.auth import generate_token, hash_token  # noqa: PLC0415

    tokens = {"client": generate_token(), "agent": generate_token()}
    lines = ["principals:"]
    for role, token in tokens.items():
        lines += [f"  - name: bench-{role}", f"    role: {role}", "    namespaces: [default]",
                  f"    token_sha256: {hash_token(token)}"]
    (directory / "tokens.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tokens


def start_servers(args: argparse.Namespace) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """Start --replicas server processes."""
    procs, targets = [], []
    prefix = args.key_prefix = f"bench-{uuid.uuid4().hex[:8]}"
    for _ in range(args.replicas):
        port = free_port()
        # no A2A gateway: its embedded-mode default port is fixed, so a bench server
        # would fail to start while any other agentmesh on the machine holds it
        env = {**os.environ, "AGENTMESH_KEY_PREFIX": prefix, "AGENTMESH_LOG_LEVEL": "WARNING",
               "AGENTMESH_A2A_PORT": "0"}
        if args.auth_file:
            env["AGENTMESH_AUTH_FILE"] = args.auth_file
        metrics_port = str(free_port()) if args.observability else "0"
        cmd = [PY, "-m", "server.cli", "serve", "--port", str(port), "--metrics-port", metrics_port,
               "--console-port", str(free_port()) if args.console else "0",
               "--store", args.store, "--bus", args.bus]
        procs.append(subprocess.Popen(cmd, cwd=args.code, env=env))
        targets.append(f"127.0.0.1:{port}")
    return procs, targets


def start_agents(targets: list[str], n: int, concurrency: int,
                 token: str | None = None, code: Path = ROOT,
                 extra_env: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
    """Start n agent processes, spread over the replicas (with AGENTMESH_TOKEN when given)."""
    env = {**os.environ, **({"AGENTMESH_TOKEN": token} if token else {}), **(extra_env or {})}
    return [subprocess.Popen(
        [PY, str(code / "loadtests" / "noop_agent.py"), "--target", targets[i % len(targets)],
         "--name", f"noop-{i}", "--concurrency", str(concurrency)], cwd=code, env=env)
        for i in range(n)]


async def wait_agents(client: MeshClient, n: int, limit: float = 60.0) -> None:
    """Until n agents offer the capability."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if len(await client.list_agents(capability="noop")) >= n:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("agents did not register")


async def w1(client: MeshClient, n: int, inflight: int) -> dict[str, float]:
    """Back-to-back submission of n tasks; throughput to the last result."""
    done: set[str] = set()
    submitted: set[str] = set()
    all_done = asyncio.Event()
    watching = asyncio.Event()

    async def watch() -> None:
        stream = client.watch_tasks(capability="noop", states=["SUCCEEDED"])
        watching.set()
        async for task in stream:
            if task.state == "SUCCEEDED" and task.id not in done:
                done.add(task.id)
                if len(done) >= n:
                    all_done.set()
                    return

    watcher = asyncio.create_task(watch())
    await watching.wait()
    await asyncio.sleep(0.2)  # let the watch subscription reach the server
    sem = asyncio.Semaphore(inflight)

    async def submit(i: int) -> None:
        async with sem:
            t = await client.submit_task("noop", {"i": i})
            submitted.add(t.id)

    start = time.perf_counter()
    await asyncio.gather(*(submit(i) for i in range(n)))
    submit_s = time.perf_counter() - start
    await asyncio.wait_for(all_done.wait(), timeout=120)
    total = time.perf_counter() - start
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert done == submitted, "every submitted task must succeed exactly once"
    return {"tasks": n, "seconds": round(total, 3), "tasks_per_s": round(n / total, 1),
            "submit_per_s": round(n / submit_s, 1)}


async def w2(client: MeshClient, rate: float, duration: float,
             dump: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Open loop at a fixed rate; latency percentiles from submit to result.

    ``segments`` splits each latency with the server's timestamps (same
    machine, same clock): submit -> created, created -> leased (dispatch),
    leased -> result accepted (the agent round trip), result -> seen here.
    """
    started: dict[str, tuple[float, float]] = {}
    latencies: list[float] = []
    segments: dict[str, list[float]] = {"submit_to_created": [], "created_to_leased": [],
                                        "leased_to_done": [], "done_to_seen": []}
    n = int(rate * duration)
    finished = asyncio.Event()
    early: dict[str, tuple[float, float, TaskInfo]] = {}

    def record(t0: float, t0_wall: float, seen: float, seen_wall: float,
               task: TaskInfo) -> None:
        latencies.append(seen - t0)
        created = task.create_time.timestamp() if task.create_time else t0_wall
        leased = task.attempts[-1].start_time if task.attempts else None
        lease_t = leased.timestamp() if leased else created
        done = task.end_time.timestamp() if task.end_time else seen_wall
        segments["submit_to_created"].append(created - t0_wall)
        segments["created_to_leased"].append(lease_t - created)
        segments["leased_to_done"].append(done - lease_t)
        segments["done_to_seen"].append(seen_wall - done)
        if dump is not None:
            dump.append({"t0": t0_wall, "ms": round((seen - t0) * 1e3, 3),
                         **{k: round(v[-1] * 1e3, 3) for k, v in segments.items()}})
        if len(latencies) >= n:
            finished.set()

    async def watch() -> None:
        async for task in client.watch_tasks(capability="noop", states=["SUCCEEDED"]):
            if task.state != "SUCCEEDED":
                continue
            now, now_wall = time.perf_counter(), time.time()
            if task.id in started:
                record(*started.pop(task.id), now, now_wall, task)
            else:
                early[task.id] = (now, now_wall, task)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.3)

    async def one(i: int) -> None:
        t0, t0_wall = time.perf_counter(), time.time()
        task = await client.submit_task("noop", {"i": i})
        if task.id in early:
            seen, seen_wall, info = early.pop(task.id)
            record(t0, t0_wall, seen, seen_wall, info)
        else:
            started[task.id] = (t0, t0_wall)

    begin = time.perf_counter()
    launched = []
    for i in range(n):
        target = begin + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        launched.append(asyncio.create_task(one(i)))
    await asyncio.gather(*launched)
    await asyncio.wait_for(finished.wait(), timeout=60)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    qs = statistics.quantiles(latencies, n=100)

    def ms(values: list[float], q: int) -> float:
        return round(statistics.quantiles(values, n=100)[q - 1] * 1e3, 2)

    return {"tasks": n, "p50_ms": round(qs[49] * 1e3, 2), "p95_ms": round(qs[94] * 1e3, 2),
            "p99_ms": round(qs[98] * 1e3, 2), "max_ms": round(max(latencies) * 1e3, 2),
            "segments_p50_p99_ms": {k: [ms(v, 50), ms(v, 99)] for k, v in segments.items()}}


async def main() -> None:
    """Run W1 and W2 and print one JSON line per workload."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="memory://", type=backend_url,
                        help="memory:// or redis://host:port/db; 'redis' means the local default")
    parser.add_argument("--bus", default="memory://", type=backend_url,
                        help="memory://, nats://host:port or amqp://...; 'nats' or 'amqp' "
                             "mean the local default")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--only", choices=["w1", "w2"], default=None)
    parser.add_argument("--dump", metavar="FILE",
                        help="W2: write one JSON line per task (submit time, latency, segments)")
    parser.add_argument("--observability", action="store_true",
                        help="metrics endpoint on, and tracing on in every process (spans "
                             "written as JSON lines to a temp file, like an exporter would)")
    parser.add_argument("--console", action="store_true",
                        help="serve with the web console on (its live feed reads every task "
                             "event), to measure what it costs")
    parser.add_argument("--auth", action="store_true",
                        help="run the server with a generated token file; clients and "
                             "agents send tokens")
    parser.add_argument("--unbatched-submits", action="store_true",
                        help="one SubmitTask call per task (as a raw-stub or k6 client "
                             "sends them), not the SDK's BatchSubmitTasks coalescing")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="source tree the servers and agents run from (default: this one)")
    parser.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID",
                        help="another process to count in W1's CPU (repeatable)")
    args = parser.parse_args()
    args.code = args.code.resolve()
    extra = {}
    for item in args.cpu_pid:
        name, _, pid = item.partition("=")
        extra[name] = int(pid)
    if args.observability:  # inherited by the servers and agents; read here by MeshClient
        os.environ["OTEL_TRACES_EXPORTER"] = "agentmesh_jsonl"
        os.environ["AGENTMESH_TRACES_FILE"] = f"/tmp/agentmesh-bench-{os.getpid()}.spans.jsonl"
    tokens: dict[str, str] = {}
    args.auth_file = None
    if args.auth:
        tmp = Path(tempfile.mkdtemp(prefix="agentmesh-bench-"))
        tokens = write_auth_file(tmp)
        args.auth_file = str(tmp / "tokens.yaml")
    if args.replicas > 1 and args.store.startswith("memory"):
        parser.error("--replicas > 1 needs a shared store (--store redis://...) and bus")
    servers, targets = start_servers(args)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        for t in targets:
            await wait_port(int(t.rsplit(":", 1)[1]))
        agents = start_agents(targets, args.agents, args.concurrency, tokens.get("agent"),
                              args.code)
        async with MeshClient(targets[0], token=tokens.get("client"),
                              batch_submits=not args.unbatched_submits) as client:
            await wait_agents(client, args.agents)
            setup = {"store": args.store, "bus": args.bus, "replicas": args.replicas,
                     "agents": args.agents, "auth": args.auth,
                     "observability": args.observability}
            procs = {"submitter": os.getpid(),
                     **{f"server{i}": p.pid for i, p in enumerate(servers)},
                     **{f"agent{i}": p.pid for i, p in enumerate(agents)}, **extra}
            if args.only in (None, "w1"):
                before = {name: cpu_seconds(pid) for name, pid in procs.items()}
                result = await w1(client, args.tasks, args.inflight)
                cpu = cpu_report(procs, before)
                print(json.dumps({"workload": "W1", **setup, **result, "cpu_s": cpu,
                                  "cpu_us_per_task": round(sum(cpu.values()) / args.tasks * 1e6)}),
                      flush=True)
            if args.only in (None, "w2"):
                dump: list[dict[str, Any]] | None = [] if args.dump else None
                print(json.dumps({"workload": "W2", **setup,
                                  **await w2(client, args.rate, args.duration, dump)}),
                      flush=True)
                if args.dump and dump is not None:
                    text = "".join(json.dumps(d) + "\n" for d in dump)
                    await asyncio.to_thread(Path(args.dump).write_text, text)
    finally:
        for p in agents + servers:
            p.send_signal(signal.SIGTERM)
        for p in agents + servers:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if args.store.startswith("redis"):
            await drop_keys(args.store, args.key_prefix)


async def drop_keys(url: str, prefix: str) -> None:
    """Delete the run's keys from a shared Redis (the run used its own prefix)."""
    from server.backends.redis import RedisStores  # noqa: PLC0415

    stores = await RedisStores.connect(url, prefix=prefix)
    try:
        await stores.delete_all_keys()
    finally:
        await stores.aclose()


if __name__ == "__main__":
    asyncio.run(main())

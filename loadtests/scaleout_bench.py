"""Scale-out and durability cost on a private Redis Cluster + NATS cluster.

Starts a Redis Cluster (3 primaries, 1 replica each, AOF everysec) and a
3-node NATS cluster with JetStream from the real binaries on free loopback
ports (``tests/clusters.py``), then runs bench.py's W1 (N no-op tasks
pipelined, throughput to the last result seen) and optionally W2 (open loop,
latency percentiles) for each configuration, interleaved over ``--rounds``:

    .venv/bin/python loadtests/scaleout_bench.py                      # 1, 2, 3 replicas
    .venv/bin/python loadtests/scaleout_bench.py --replicas 1 --durability none,replicas:1
    .venv/bin/python loadtests/scaleout_bench.py --code /tmp/before,.   # two commits, interleaved

A configuration is (code, replicas, durability); ``--code`` names source trees
(e.g. ``git archive REV | tar -x -C /tmp/before``) whose servers and agents are
run (the submitter's SDK stays this tree's). Each run starts its servers
(``agentmesh serve`` processes) and agents (``noop_agent.py``, spread round
robin over the replicas), submits through every replica in turn, and stops
them. Printed: one JSON line per run, then the medians per configuration with
ratios to the first one, CPU per task summed over every process (servers,
agents, the submitter, every redis-server and nats-server), and the Redis
commands per task on the primaries (INFO commandstats: Function calls,
reads), which do not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "loadtests")]

from bench import cpu_seconds, free_port, start_agents, w2, wait_agents, wait_port  # noqa: E402

from agent_sdk import MeshClient  # noqa: E402
from tests.clusters import NatsCluster, RedisCluster, nats_cluster, redis_cluster  # noqa: E402

PY = sys.executable


def redis_calls(rc: RedisCluster) -> dict[str, int]:
    """Commands executed so far, summed over the cluster's primaries (INFO commandstats)."""
    total: dict[str, int] = {}
    for node in rc.nodes:
        if not node.alive:
            continue
        with node.client() as c:
            if c.info("replication").get("role") != "master":
                continue
            for name, stat in c.info("commandstats").items():
                cmd = name.removeprefix("cmdstat_")
                total[cmd] = total.get(cmd, 0) + int(stat["calls"])
    return total


def code_path(code: Path) -> dict[str, str]:
    """PYTHONPATH that makes a process import server/, agent_sdk/ and gen/ from ``code``."""
    return {"PYTHONPATH": f"{code}{os.pathsep}{code / 'gen'}"}


def start_servers(rc: RedisCluster, nc: NatsCluster, replicas: int, durability: str,
                  prefix: str, code: Path = ROOT
                  ) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """``replicas`` server processes on the clusters under one key prefix."""
    procs, targets = [], []
    env = {**os.environ, "AGENTMESH_KEY_PREFIX": prefix, "AGENTMESH_LOG_LEVEL": "WARNING",
           **code_path(code)}
    for _ in range(replicas):
        port = free_port()
        procs.append(subprocess.Popen(
            [PY, "-m", "server.cli", "serve", "--port", str(port), "--metrics-port", "0",
             "--store", rc.url, "--bus", nc.url, "--durability", durability],
            cwd=code, env=env))
        targets.append(f"127.0.0.1:{port}")
    return procs, targets


async def w1_spread(clients: list[MeshClient], n: int, inflight: int) -> dict[str, float]:
    """bench.py's W1 with submits spread over every replica's client (round robin)."""
    done: set[str] = set()
    submitted: set[str] = set()
    all_done = asyncio.Event()
    watching = asyncio.Event()

    async def watch() -> None:
        stream = clients[0].watch_tasks(capability="noop", states=["SUCCEEDED"])
        watching.set()
        async for task in stream:
            if task.state == "SUCCEEDED" and task.id not in done:
                done.add(task.id)
                if len(done) >= n:
                    all_done.set()
                    return

    watcher = asyncio.create_task(watch())
    await watching.wait()
    await asyncio.sleep(0.3)  # let the watch subscription reach the server
    sem = asyncio.Semaphore(inflight)

    async def submit(i: int) -> None:
        async with sem:
            t = await clients[i % len(clients)].submit_task("noop", {"i": i})
            submitted.add(t.id)

    start = time.perf_counter()
    await asyncio.gather(*(submit(i) for i in range(n)))
    await asyncio.wait_for(all_done.wait(), timeout=180)
    total = time.perf_counter() - start
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert done == submitted, "every submitted task must succeed exactly once"
    return {"tasks": n, "seconds": round(total, 3), "tasks_per_s": round(n / total, 1)}


async def one_run(rc: RedisCluster, nc: NatsCluster, code: Path, replicas: int,
                  durability: str, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    servers, targets = start_servers(rc, nc, replicas, durability, prefix, code)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        for t in targets:
            await wait_port(int(t.rsplit(":", 1)[1]), limit=60)
        agents = start_agents(targets, args.agents, args.concurrency, code=code,
                              extra_env=code_path(code))
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(MeshClient(t)) for t in targets]
            await wait_agents(clients[0], args.agents, limit=60)
            procs = {"submitter": os.getpid(),
                     **{f"server{i}": p.pid for i, p in enumerate(servers)},
                     **{f"agent{i}": p.pid for i, p in enumerate(agents)},
                     **{f"redis{n.port}": n.proc.pid for n in rc.nodes if n.proc},
                     **{f"nats{n.port}": n.proc.pid for n in nc.nodes if n.proc}}
            before = {k: cpu_seconds(pid) for k, pid in procs.items()}
            calls_before = await asyncio.to_thread(redis_calls, rc)
            result = await w1_spread(clients, args.tasks, args.inflight)
            cpu = {k: cpu_seconds(pid) - before[k] for k, pid in procs.items()}
            calls_after = await asyncio.to_thread(redis_calls, rc)
            calls = {k: v - calls_before.get(k, 0) for k, v in calls_after.items()}
            out: dict[str, Any] = {
                "code": str(code), "replicas": replicas, "durability": durability,
                "agents": args.agents,
                **result,
                "cpu_us_per_task": round(sum(cpu.values()) / args.tasks * 1e6),
                "cpu_us_per_task_by_kind": {
                    kind: round(sum(v for k, v in cpu.items() if k.startswith(kind))
                                / args.tasks * 1e6)
                    for kind in ("submitter", "server", "agent", "redis", "nats")},
                # Redis commands per task on the primaries (INFO commandstats; the
                # probes of this script itself are a handful per run)
                "redis_calls_per_task": {
                    k: round(v / args.tasks, 2) for k, v in sorted(calls.items())
                    if v / args.tasks >= 0.05}}
            if args.w2:
                out["w2"] = await w2(clients[0], args.rate, args.duration)
            return out
    finally:
        for p in agents + servers:
            p.send_signal(signal.SIGTERM)
        for p in agents + servers:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per configuration, with ratios to the first configuration."""
    keys: list[tuple[str, int, str]] = []
    for r in runs:
        if (r["code"], r["replicas"], r["durability"]) not in keys:
            keys.append((r["code"], r["replicas"], r["durability"]))
    rows = []
    for code, replicas, durability in keys:
        mine = [r for r in runs
                if (r["code"], r["replicas"], r["durability"]) == (code, replicas, durability)]
        row: dict[str, Any] = {
            "code": code, "replicas": replicas, "durability": durability, "runs": len(mine),
            "w1_tasks_per_s": statistics.median(r["tasks_per_s"] for r in mine),
            "cpu_us_per_task": statistics.median(r["cpu_us_per_task"] for r in mine),
            "fcalls_per_task": statistics.median(
                r["redis_calls_per_task"].get("fcall", 0.0)
                + r["redis_calls_per_task"].get("fcall_ro", 0.0) for r in mine)}
        if all("w2" in r for r in mine):
            row["w2_p50_ms"] = statistics.median(r["w2"]["p50_ms"] for r in mine)
            row["w2_p99_ms"] = statistics.median(r["w2"]["p99_ms"] for r in mine)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["w1_ratio"] = round(row["w1_tasks_per_s"] / base["w1_tasks_per_s"], 2)
        row["cpu_ratio"] = round(row["cpu_us_per_task"] / base["cpu_us_per_task"], 2)
        row["fcalls_ratio"] = round(row["fcalls_per_task"] / base["fcalls_per_task"], 2)
        if "w2_p99_ms" in row and "w2_p99_ms" in base:
            row["w2_p99_ratio"] = round(row["w2_p99_ms"] / base["w2_p99_ms"], 2)
    return rows


def parse_args() -> argparse.Namespace:
    """The command line, with ``configs`` (code, replicas, durability) in run order."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2,3",
                        help="comma-separated replica counts (default 1,2,3)")
    parser.add_argument("--durability", default="auto",
                        help="comma-separated durability values (auto, none, replicas:N)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--inflight", type=int, default=96)
    parser.add_argument("--w2", action="store_true", help="also run W2 (open loop) each run")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--code", default=str(ROOT),
                        help="comma-separated source trees to run servers and agents from")
    args = parser.parse_args()
    args.configs = [(Path(c).resolve(), int(r), d.strip()) for c in args.code.split(",")
                    for r in args.replicas.split(",") for d in args.durability.split(",")]
    return args


async def main(args: argparse.Namespace) -> None:
    configs = args.configs
    runs = []
    with redis_cluster() as rc, nats_cluster() as nc:
        for _ in range(args.rounds):
            for code, replicas, durability in configs:  # interleaved: drift hits all
                run = await one_run(rc, nc, code, replicas, durability, args)
                print(json.dumps(run), flush=True)
                runs.append(run)
    print(json.dumps({"summary": summary(runs)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))

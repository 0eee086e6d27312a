"""Console responsiveness at fleet size: 1,000 agents and 100,000 tasks, embedded store.

    .venv/bin/python loadtests/console_bench.py [--agents 1000] [--tasks 100000]
        [--requests 100] [--lag-samples 60] [--storm 500]

Two server processes, one after the other in this invocation, so the figures
compare side by side: a small mesh (1 % of the agents and tasks) and the
full one. Each is ``running_server`` with the console on (memory store),
seeded through the same services the gRPC API uses: agents registered with
``Registry.register`` and beaten once (a long heartbeat interval keeps them
ACTIVE without 1,000 streams), tasks queued with ``Scheduler.submit_many``
(20 capabilities, 10 ``team`` labels); then, straight through the store,
60 % are leased and completed and 5 % dead-lettered, so every state and
aggregate has something in it. Nothing leases the rest (no agent has a work
stream): they stay QUEUED.

Against each, from this process:

- latency of the console API over HTTP (sequential requests, after a warm-up):
  the overview (every aggregate), the agents page (every card), a task page
  by label, the dead letters, a capability nobody has (an index miss), and
  the worst list, a label nobody has (one page reads at most 20,000 tasks);
- the server's CPU per overview request (``/proc/<pid>/stat`` around the loop);
- SSE update lag: a task submitted over gRPC -> the ``change`` event naming
  it on ``/api/events`` (what makes a page re-read), and -> a fresh overview
  in hand (what the page then shows); idle, and under a storm of ``--storm``
  task submissions per second from another client.

Prints one line per figure, then the ratios full/small.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]
CAPS = 20
TEAMS = 10


# -- the server process ------------------------------------------------------------

async def serve(agents: int, tasks: int, blob: str) -> None:
    """Seed a mesh, print READY with its addresses, serve until SIGTERM."""
    from server.app import running_server  # noqa: PLC0415
    from server.domain.models import (  # noqa: PLC0415
        Agent,
        Capability,
        Payload,
        RetryPolicy,
        Task,
        TaskFailure,
    )
    from server.ports import FailVerdict  # noqa: PLC0415
    from server.settings import Settings  # noqa: PLC0415
    from tests._services import free_port  # noqa: PLC0415

    settings = Settings(port=0, metrics_port=0, console_port=free_port(), blob=blob,
                        heartbeat_interval=3600.0, max_queued_per_namespace=tasks + 1_000_000,
                        log_level="WARNING")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with running_server(settings) as mesh:
        ids_by_cap: dict[str, list[str]] = {}
        for i in range(agents):
            cap = f"cap-{i % CAPS}"
            agent = await mesh.registry.register(Agent(
                id="", display_name=f"agent-{i:04d}", capabilities=(Capability(cap),),
                max_concurrency=4, labels={"zone": f"z{i % 5}"}))
            await mesh.registry.beat(agent.id, 0, 0.0)
            ids_by_cap.setdefault(cap, []).append(agent.id)
        batch: list[tuple[Task, str]] = []
        for i in range(tasks):
            batch.append((Task(id="", capability=f"cap-{i % CAPS}",
                               labels={"team": f"t{i % TEAMS}"},
                               input=Payload(json.dumps({"n": i}).encode(),
                                             {"encoding": b"json/plain"}),
                               retry_policy=RetryPolicy(max_attempts=1)), ""))
            if len(batch) == 1000:
                await mesh.scheduler.submit_many(batch)
                batch = []
        if batch:
            await mesh.scheduler.submit_many(batch)
        # States through the store (seeding only): 60 % succeed, 5 % dead-letter.
        store = mesh.scheduler._tasks  # a benchmark seeds the store directly
        now = time.time()
        done = dead = 0
        for cap, holders in ids_by_cap.items():
            quota_ok, quota_dead = int(tasks * 0.60 / CAPS), int(tasks * 0.05 / CAPS)
            while quota_ok + quota_dead > 0:
                leases = await store.lease_batch("default", [cap], holders[0], now=now,
                                                 default_timeout=3600, count=500)
                if not leases:
                    break
                for lease in leases:
                    if quota_dead > 0:
                        await store.fail(lease.task.id, lease.fencing_token,
                                         TaskFailure("LedgerDownError", "the ledger is down"),
                                         verdict=FailVerdict.DEAD_LETTER, retry_at=0, now=now)
                        quota_dead -= 1
                        dead += 1
                    else:
                        await store.complete(lease.task.id, lease.fencing_token,
                                             Payload(b'{"ok":true}'), now=now)
                        quota_ok -= 1
                        done += 1
        assert mesh.console is not None
        print("READY " + json.dumps({"grpc": mesh.address, "console": mesh.console.url,
                                     "pid": os.getpid(), "succeeded": done,
                                     "dead": dead}), flush=True)
        await stop.wait()
        mesh.stopping.set()


# -- the measuring side ------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(session: Any, url: str, n: int) -> tuple[list[float], int]:
    for _ in range(5):
        async with session.get(url) as r:
            await r.read()
    out: list[float] = []
    size = 0
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.get(url) as r:
            body = await r.read()
            assert r.status == 200, (url, r.status, body[:200])
        out.append((time.perf_counter() - t0) * 1000)
        size = len(body)
    return out, size


async def storm(target: str, rate: int, stop: asyncio.Event) -> int:
    """Submit ``rate`` tasks a second (batches of rate/10 every 0.1 s) until ``stop``."""
    from agent_sdk import MeshClient  # noqa: PLC0415
    sent = 0
    async with MeshClient(target) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.gather(*(client.submit_task("storm-nobody-offers-this", {"i": i})
                                   for i in range(max(1, rate // 10))))
            sent += max(1, rate // 10)
            await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))
    return sent


async def sse_lag(session: Any, console: str, target: str,
                  samples: int) -> tuple[list[float], list[float]]:
    """(submit -> change event naming it, submit -> fresh overview) in ms."""
    from agent_sdk import MeshClient  # noqa: PLC0415
    events_ms: list[float] = []
    view_ms: list[float] = []
    async with MeshClient(target) as client, session.get(f"{console}api/events") as stream:
        await stream.content.readuntil(b"\n\n")  # hello
        named: dict[str, float] = {}  # task id -> first change event naming it
        many: list[float] = []  # arrivals of "re-read everything" updates
        arrived = asyncio.Event()

        async def read() -> None:
            while True:
                chunk = (await stream.content.readuntil(b"\n\n")).decode()
                if not chunk.startswith("event: change"):
                    continue
                at = time.perf_counter()
                data = json.loads(chunk.split("data: ", 1)[1])
                if data["many"] or "all" in data["topics"]:
                    many.append(at)  # too many ids to name: the page re-reads every view
                for topic in data["topics"]:
                    if topic.startswith("task:"):
                        named.setdefault(topic[5:], at)
                arrived.set()

        def seen(task_id: str, submitted: float) -> float | None:
            # The event may arrive before the submit call returns (it is published
            # first), so it is looked up once the id is known.
            if task_id in named:
                return named[task_id]
            later = [t for t in many if t >= submitted]
            return later[0] if later else None

        reader = asyncio.create_task(read())
        try:
            for _ in range(samples):
                t0 = time.perf_counter()
                task = await client.submit_task("lag-probe", {})
                t1 = time.perf_counter()
                async with asyncio.timeout(10):
                    while (at := seen(task.id, t1)) is None:
                        if reader.done():
                            reader.result()  # re-raise why the stream reader stopped
                        arrived.clear()
                        await arrived.wait()
                events_ms.append((at - t0) * 1000)
                async with session.get(f"{console}api/overview") as r:
                    await r.read()
                view_ms.append((time.perf_counter() - t0) * 1000)
                await asyncio.sleep(0.05)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    return events_ms, view_ms


async def measure(label: str, agents: int, tasks: int, args: argparse.Namespace,
                  tmp: Path) -> dict[str, float]:
    import aiohttp  # noqa: PLC0415

    t_seed = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--agents", str(agents),  # noqa: ASYNC220
                             "--tasks", str(tasks), "--blob", str(tmp / label)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line.startswith("READY "):
            raise RuntimeError(f"server did not start: {line!r}")
        info = json.loads(line[6:])
        console, target, pid = info["console"], info["grpc"], info["pid"]
        print(f"[{label}] {agents} agents, {tasks} tasks ({info['succeeded']} succeeded, "
              f"{info['dead']} dead-lettered, the rest QUEUED); seeded in "
              f"{time.perf_counter() - t_seed:.1f} s", flush=True)
        out: dict[str, float] = {}
        async with aiohttp.ClientSession() as session:
            pages = {
                "overview": "api/overview",
                "agents (every card)": "api/agents",
                "tasks, label team=t3 (page of 50)": "api/tasks?label=team%3Dt3",
                "dead letters (page of 50)": "api/dead-letters",
                "tasks, capability nobody has (index miss)": "api/tasks?capability=nope",
                "tasks, label nobody has (one page reads 20,000 tasks)":
                    "api/tasks?label=team%3Dnope",
            }
            for name, path in pages.items():
                n = args.requests if "20,000" not in name else max(10, args.requests // 5)
                cpu0 = cpu_seconds(pid)
                ms, size = await latency(session, console + path, n)
                cpu = (cpu_seconds(pid) - cpu0) / n * 1000
                out[name] = statistics.median(ms)
                print(f"[{label}] GET /{path}: p50 {statistics.median(ms):.1f} ms, "
                      f"p95 {pct(ms, 0.95):.1f} ms, max {max(ms):.1f} ms; {size / 1024:.1f} KiB; "
                      f"server CPU {cpu:.1f} ms/request ({n} requests)", flush=True)
            ev, view = await sse_lag(session, console, target, args.lag_samples)
            out["sse idle"] = statistics.median(ev)
            print(f"[{label}] SSE idle: submit -> change event p50 {statistics.median(ev):.1f} ms,"
                  f" p95 {pct(ev, 0.95):.1f} ms; -> fresh overview p50 "
                  f"{statistics.median(view):.1f} ms, p95 {pct(view, 0.95):.1f} ms "
                  f"({len(ev)} samples)", flush=True)
            stop = asyncio.Event()
            storming = asyncio.create_task(storm(target, args.storm, stop))
            await asyncio.sleep(1.0)
            cpu0 = cpu_seconds(pid)
            ev, view = await sse_lag(session, console, target, args.lag_samples)
            stop.set()
            sent = await storming
            out["sse storm"] = statistics.median(ev)
            print(f"[{label}] SSE under {args.storm} submits/s ({sent} sent): submit -> change "
                  f"event p50 {statistics.median(ev):.1f} ms, p95 {pct(ev, 0.95):.1f} ms; -> "
                  f"fresh overview p50 {statistics.median(view):.1f} ms, p95 "
                  f"{pct(view, 0.95):.1f} ms; server CPU {cpu_seconds(pid) - cpu0:.2f} s",
                  flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def main(args: argparse.Namespace) -> int:
    import tempfile  # noqa: PLC0415
    with tempfile.TemporaryDirectory() as tmp:
        small = await measure("small", max(1, args.agents // 100), max(100, args.tasks // 100),
                              args, Path(tmp))
        full = await measure("full", args.agents, args.tasks, args, Path(tmp))
    print("ratios full/small (p50): " + "; ".join(
        f"{name} {full[name] / small[name]:.2f}x" for name in full), flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--lag-samples", type=int, default=60)
    parser.add_argument("--storm", type=int, default=500, help="submits per second")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--blob", default="", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve:
        asyncio.run(serve(parsed.agents, parsed.tasks, parsed.blob))
    else:
        sys.exit(asyncio.run(main(parsed)))

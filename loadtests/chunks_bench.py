"""Streamed chunks and the A2A gateway, measured side by side in one invocation.

    .venv/bin/python loadtests/chunks_bench.py                  # memory, then Redis
    .venv/bin/python loadtests/chunks_bench.py --stores memory --chunks 200 --ops 20

The server is a child process (``agentmesh serve``), so its CPU is measured
alone (``/proc/<pid>/stat`` around each phase); the agent and the clients run
here, in one event loop.

(a) chunks, on each store of ``--stores`` (Redis at ``--redis-url`` with a
    key prefix of its own per run, deleted after): one task emits
    ``--chunks`` chunks back to back (a burst: chunks/s from the first emit to
    the last chunk a ``WatchTaskChunks`` watcher receives, and latency emit ->
    receive p50/p99, queueing included), then ``--paced`` chunks at
    ``--rate`` chunks/s (an LLM's pace: latency with no backlog). Each chunk
    carries its emit time (``time.perf_counter_ns``, one clock for the whole
    machine).
(b) the A2A gateway's overhead, on the memory store: ``--ops`` round trips of
    a blocking A2A ``SendMessage`` (a2a-sdk client, JSON-RPC) to a no-op skill
    until its result, against the same task through gRPC (``MeshClient``:
    SubmitTask, then the result through WatchTasks), in alternating rounds on
    the same mesh; latency p50/p99 and server CPU per operation, and their
    ratios A2A / gRPC.

Server CPU figures are above the server's idle CPU (sampled for ``--idle``
seconds before each phase: its timers and the agent's heartbeats), and come
from ``/proc`` in clock ticks (10 ms): give a phase a second or more of work
for them to mean something.

Prints one JSON line per figure, then a table. A benchmark, never a test:
tests/test_chunks_bench.py only runs it with tiny parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from loadtests.bench import cpu_seconds, drop_keys, free_port, wait_port  # noqa: E402

PY = sys.executable


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def emit_line(figure: dict[str, Any]) -> None:
    """One JSON line per figure."""
    print(json.dumps(figure), flush=True)


# -- the server process ------------------------------------------------------------

@contextlib.asynccontextmanager
async def server(store: str, *, a2a: bool) -> AsyncIterator[tuple[int, str, str]]:
    """``agentmesh serve`` in a child process: (pid, gRPC target, A2A URL or "")."""
    port, a2a_port = free_port(), free_port() if a2a else 0
    prefix = f"chunks-bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "AGENTMESH_KEY_PREFIX": prefix, "AGENTMESH_LOG_LEVEL": "WARNING",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
        [PY, "-m", "server.cli", "serve", "--port", str(port), "--metrics-port", "0",
         "--console-port", "0", "--a2a-port", str(a2a_port), "--store", store,
         "--blob", f"/tmp/agentmesh-bench-snapshots-{prefix}"], cwd=ROOT, env=env)
    try:
        await wait_port(port)
        if a2a_port:
            await wait_port(a2a_port)
        yield proc.pid, f"127.0.0.1:{port}", f"http://127.0.0.1:{a2a_port}/" if a2a else ""
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
        except TimeoutError:
            proc.kill()
        if store.startswith("redis"):
            await drop_keys(store, prefix)


# -- the agent (here) --------------------------------------------------------------

class Bench:
    """The benchmark agent: ``stream`` emits timed chunks, ``noop`` returns its input."""

    def __init__(self, target: str) -> None:
        from agent_sdk import Agent, TaskContext  # noqa: PLC0415

        self.gates: dict[str, asyncio.Event] = {}
        self.agent = Agent("chunks-bench", target=target, max_concurrency=64)

        @self.agent.handler("stream")
        async def stream(task: TaskContext) -> int:
            spec = task.input
            await self.gates[spec["run"]].wait()  # the watcher is listening
            pad = "x" * int(spec["pad"])
            interval = float(spec["interval"])
            n = int(spec["n"])
            start = time.perf_counter()
            for i in range(n):
                if interval:
                    delay = start + i * interval - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await task.emit(f"{time.perf_counter_ns()} {pad}")
            return n

        @self.agent.handler("noop")
        async def noop(task: TaskContext) -> object:
            return task.input

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the agent for the block."""
        run = asyncio.create_task(self.agent.run())
        try:
            yield
        finally:
            await self.agent.stop(grace=2.0)
            await asyncio.wait_for(run, 30)


async def idle_cpu(pid: int, seconds: float) -> float:
    """The server's CPU seconds per second with nothing to do (its timers, the agent's
    heartbeats): subtracted from each phase's CPU, so a per-operation figure is the
    operation's own cost."""
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


async def _live(client: Any, capability: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if await client.list_agents(capability=capability):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no agent offers {capability}")


# -- (a) chunks ----------------------------------------------------------------------

async def stream_once(client: Any, bench: Bench, pid: int, *, n: int, interval: float,
                      pad: int, idle: float = 0.0) -> dict[str, float]:
    """One task streaming n chunks to one watcher: rate, latency, server CPU."""
    from agent_sdk import TaskChunk  # noqa: PLC0415

    run = uuid.uuid4().hex
    gate = bench.gates[run] = asyncio.Event()
    task = await client.submit_task("stream", {"run": run, "n": n, "interval": interval,
                                               "pad": pad})
    latencies: list[float] = []
    first_sent = last_seen = 0
    cpu, started = cpu_seconds(pid), time.monotonic()
    async with asyncio.timeout(max(120.0, n * interval * 4)):
        async for item in client.watch_chunks(task.name):
            if not isinstance(item, TaskChunk):
                gate.set()  # the first item is the task: the watch is open
                continue
            now = time.perf_counter_ns()
            sent = int(item.text.split(" ", 1)[0])
            first_sent = first_sent or sent
            last_seen = now
            latencies.append((now - sent) / 1e6)
    cpu = max(0.0, cpu_seconds(pid) - cpu - idle * (time.monotonic() - started))
    bench.gates.pop(run, None)
    if len(latencies) != n:
        raise RuntimeError(f"the watcher received {len(latencies)} of {n} chunks")
    seconds = (last_seen - first_sent) / 1e9
    return {"chunks": n, "chunks_per_s": round(n / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": round(pct(latencies, 0.5), 2), "p99_ms": round(pct(latencies, 0.99), 2),
            "server_cpu_us_per_chunk": round(cpu / n * 1e6, 1)}


async def chunks_on(store: str, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """(a) on one store: a burst, then a paced stream."""
    from agent_sdk import MeshClient  # noqa: PLC0415

    out: dict[str, Any] = {}
    async with server(store, a2a=False) as (pid, target, _), MeshClient(target) as client:
        bench = Bench(target)
        async with bench.running():
            await _live(client, "stream")
            await stream_once(client, bench, pid, n=min(50, args.chunks), interval=0,
                              pad=args.chunk_bytes)  # warm-up
            idle = await idle_cpu(pid, args.idle)
            emit_line({"figure": "server.idle", "store": label,
                       "cpu_pct": round(idle * 100, 1)})
            for mode, n, interval in (("burst", args.chunks, 0.0),
                                      ("paced", args.paced, 1.0 / args.rate)):
                figure = await stream_once(client, bench, pid, n=n, interval=interval,
                                           pad=args.chunk_bytes, idle=idle)
                figure = {"figure": f"chunks.{mode}", "store": label, **figure}
                if mode == "paced":
                    figure["rate"] = args.rate
                emit_line(figure)
                out[mode] = figure
    return out


# -- (b) A2A against gRPC ------------------------------------------------------------

async def a2a_vs_grpc(args: argparse.Namespace) -> dict[str, Any]:
    """(b) blocking A2A SendMessage vs gRPC SubmitTask + result, alternating rounds."""
    import httpx  # noqa: PLC0415
    from a2a.client import ClientConfig, create_client  # noqa: PLC0415
    from a2a.types import a2a_pb2  # noqa: PLC0415
    from google.protobuf import struct_pb2  # noqa: PLC0415

    from agent_sdk import MeshClient  # noqa: PLC0415

    times: dict[str, list[float]] = {"a2a": [], "grpc": []}
    cpu: dict[str, float] = {"a2a": 0.0, "grpc": 0.0}
    async with server("memory://", a2a=True) as (pid, target, url), \
            MeshClient(target) as client, httpx.AsyncClient(timeout=60) as http:
        meta = struct_pb2.Struct()
        meta.update({"skill": "noop"})

        async def by_a2a() -> None:
            request = a2a_pb2.SendMessageRequest(message=a2a_pb2.Message(
                message_id=uuid.uuid4().hex, role=a2a_pb2.Role.ROLE_USER,
                parts=[a2a_pb2.Part(text="ping")], metadata=meta))
            events = [e async for e in a2a.send_message(request)]
            if events[-1].task.status.state != a2a_pb2.TASK_STATE_COMPLETED:
                raise RuntimeError(f"A2A task ended {events[-1].task.status.state}")

        async def by_grpc() -> None:
            await client.run_task("noop", "ping", wait_timeout=60)

        ways: dict[str, Callable[[], Any]] = {"a2a": by_a2a, "grpc": by_grpc}
        a2a: Any = None
        bench = Bench(target)
        async with bench.running():
            await _live(client, "noop")
            a2a = await create_client(url, client_config=ClientConfig(streaming=False,
                                                                      httpx_client=http))
            for way in ways.values():  # warm-up: connections, caches
                for _ in range(min(10, args.ops)):
                    await way()
            idle = await idle_cpu(pid, args.idle)
            rounds = max(1, args.rounds)
            per_round = max(1, args.ops // rounds)
            for _ in range(rounds):
                for name, way in ways.items():
                    before, started = cpu_seconds(pid), time.monotonic()
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        await way()
                        times[name].append((time.perf_counter() - t0) * 1e3)
                    cpu[name] += max(0.0, cpu_seconds(pid) - before
                                     - idle * (time.monotonic() - started))
            await a2a.close()
    out: dict[str, Any] = {}
    for name, values in times.items():
        out[name] = figure = {
            "figure": f"roundtrip.{name}", "ops": len(values),
            "p50_ms": round(pct(values, 0.5), 2), "p99_ms": round(pct(values, 0.99), 2),
            "mean_ms": round(statistics.fmean(values), 2),
            "server_cpu_us_per_op": round(cpu[name] / len(values) * 1e6, 1)}
        emit_line(figure)
    ratio = {"figure": "roundtrip.ratio_a2a_over_grpc",
             "p50": round(out["a2a"]["p50_ms"] / out["grpc"]["p50_ms"], 2),
             "p99": round(out["a2a"]["p99_ms"] / out["grpc"]["p99_ms"], 2),
             "server_cpu": round(out["a2a"]["server_cpu_us_per_op"]
                                 / max(out["grpc"]["server_cpu_us_per_op"], 0.1), 2)}
    emit_line(ratio)
    out["ratio"] = ratio
    return out


def table(chunks: dict[str, dict[str, Any]], rt: dict[str, Any] | None) -> list[str]:
    """The figures as the markdown rows of docs/performance.md."""
    lines = []
    if chunks:
        lines += ["| store | burst chunks/s | burst p50 / p99 | paced p50 / p99 "
                  "| server CPU per chunk (burst) |", "|---|---|---|---|---|"]
        for label, f in chunks.items():
            b, p = f["burst"], f["paced"]
            lines.append(f"| {label} | {b['chunks_per_s']:,.0f} | {b['p50_ms']} / "
                         f"{b['p99_ms']} ms | {p['p50_ms']} / {p['p99_ms']} ms "
                         f"({p['rate']}/s) | {b['server_cpu_us_per_chunk']} µs |")
    if rt:
        lines += ["", "| round trip to a no-op skill | p50 | p99 | server CPU per op |",
                  "|---|---|---|---|"]
        for name, label in (("a2a", "A2A SendMessage (blocking)"),
                            ("grpc", "gRPC SubmitTask + result")):
            f = rt[name]
            lines.append(f"| {label} | {f['p50_ms']} ms | {f['p99_ms']} ms | "
                         f"{f['server_cpu_us_per_op']} µs |")
        r = rt["ratio"]
        lines.append(f"| ratio A2A / gRPC | {r['p50']}x | {r['p99']}x | {r['server_cpu']}x |")
    return lines


async def main(args: argparse.Namespace) -> int:
    """Run (a) on each store, then (b); print the table."""
    chunks: dict[str, dict[str, Any]] = {}
    for name in (n.strip() for n in args.stores.split(",") if n.strip()):
        store = {"memory": "memory://", "redis": args.redis_url}.get(name)
        if store is None:
            raise SystemExit(f"--stores: memory and/or redis, not {name!r}")
        chunks[name] = await chunks_on(store, name, args)
    rt = None if args.ops <= 0 else await a2a_vs_grpc(args)
    print("\n".join(table(chunks, rt)), flush=True)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--stores", default="memory,redis",
                   help="memory and/or redis, comma-separated; empty skips (a)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--chunks", type=int, default=2000, help="chunks of the burst")
    p.add_argument("--paced", type=int, default=400, help="chunks of the paced stream")
    p.add_argument("--rate", type=float, default=200.0, help="chunks/s of the paced stream")
    p.add_argument("--chunk-bytes", type=int, default=32, help="padding of each chunk's text")
    p.add_argument("--ops", type=int, default=300,
                   help="round trips of each kind in (b); 0 skips (b)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of (b)")
    p.add_argument("--idle", type=float, default=2.0,
                   help="seconds the server's idle CPU is sampled before each phase")
    args = p.parse_args(argv)
    if args.chunks < 1 or args.paced < 1 or args.rate <= 0 or args.chunk_bytes < 0:
        p.error("--chunks and --paced at least 1, --rate above 0, --chunk-bytes at least 0")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))

"""The floor under W2: the same four gRPC hops with no mesh code at all.

W2 (``bench.py``) measures submit -> result through four processes and four
gRPC messages: the submitter's unary SubmitTask, the server's push to an
agent on its work stream, the agent's result on that stream, and the
server's push to the submitter's WatchTasks stream. This script sends the
same four messages between the same four kinds of process (relay server,
two workers, the client here) with bare ``grpc.aio`` and raw bytes: no
protobuf, no store, no bus, no interceptors. Whatever latency it shows is
what Python gRPC on this machine costs before agentmesh does any work, so
W2 can be read against it.

    .venv/bin/python loadtests/grpc_floor.py                 # 100/s for 10 s, like W2
    .venv/bin/python loadtests/grpc_floor.py --rate 100 --duration 10 --rounds 3
    .venv/bin/python loadtests/grpc_floor.py --duration 3 --w1 5000  # + W1: CPU per task

``--w1 N`` also runs W1's shape (N submits pipelined, 64 in flight) and
prints the CPU per task summed over the four processes: the CPU floor of
Python gRPC under W1's four messages a task, before any mesh work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

SERVICE = "floor.Relay"


def _handler(kind: str, fn: Any) -> grpc.RpcMethodHandler:
    """A bytes-in, bytes-out handler (no (de)serialisation at all)."""
    return getattr(grpc, f"{kind}_rpc_method_handler")(fn)


async def relay(port: int) -> None:
    """Submit (unary) -> a worker's stream -> its answer -> the watchers' streams."""
    workers: list[asyncio.Queue[bytes]] = []
    watchers: list[asyncio.Queue[bytes]] = []
    turn = 0

    async def submit(request: bytes, context: Any) -> bytes:
        nonlocal turn
        turn += 1
        workers[turn % len(workers)].put_nowait(request)
        return b"ok"

    async def work(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        workers.append(queue)

        async def answers() -> None:
            async for answer in requests:
                for w in watchers:
                    w.put_nowait(answer)

        reader = asyncio.create_task(answers())
        try:
            while True:
                yield await queue.get()
        finally:
            reader.cancel()

    async def watch(request: bytes, context: Any) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        watchers.append(queue)
        while True:
            yield await queue.get()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Submit": _handler("unary_unary", submit),
        "Work": _handler("stream_stream", work),
        "Watch": _handler("unary_stream", watch),
    })])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def worker(port: int) -> None:
    """Answer every item with itself, as a no-op agent would."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(f"/{SERVICE}/Work")()
        async for item in call:
            await call.write(item)


async def client(port: int, rate: float, duration: float) -> dict[str, float]:
    """Open loop at ``rate``; submit -> answer seen on the watch stream."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        submit = channel.unary_unary(f"/{SERVICE}/Submit")
        stream = channel.unary_stream(f"/{SERVICE}/Watch")(b"")
        started: dict[bytes, float] = {}
        latencies: list[float] = []
        n = int(rate * duration)
        all_seen = asyncio.Event()

        async def watch() -> None:
            async for item in stream:
                t0 = started.pop(item, None)
                if t0 is not None:
                    latencies.append(time.perf_counter() - t0)
                    if len(latencies) >= n:
                        all_seen.set()

        watcher = asyncio.create_task(watch())
        for i in range(200):  # warm-up: connections, workers attached, code paths hot
            await submit(b"w%d" % i)
        await asyncio.sleep(0.5)
        begin = time.perf_counter()
        calls = []
        for i in range(n):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key = b"%d" % i
            started[key] = time.perf_counter()
            calls.append(asyncio.ensure_future(submit(key)))
        await asyncio.gather(*calls)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), timeout=10)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        qs = statistics.quantiles(latencies, n=100)
        return {"tasks": len(latencies), "p50_ms": round(qs[49] * 1e3, 2),
                "p95_ms": round(qs[94] * 1e3, 2), "p99_ms": round(qs[98] * 1e3, 2),
                "max_ms": round(max(latencies) * 1e3, 2)}


async def client_w1(port: int, n: int, inflight: int,
                    pids: list[int]) -> dict[str, float]:
    """W1's shape on the bare floor: ``n`` submits pipelined (``inflight`` at once),
    throughput to the last answer seen, and CPU per task summed over the four
    processes (this client, the relay, both workers)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        submit = channel.unary_unary(f"/{SERVICE}/Submit")
        stream = channel.unary_stream(f"/{SERVICE}/Watch")(b"")
        seen = 0
        all_seen = asyncio.Event()

        async def watch() -> None:
            nonlocal seen
            async for item in stream:
                if not item.startswith(b"w"):
                    seen += 1
                    if seen >= n:
                        all_seen.set()

        watcher = asyncio.create_task(watch())
        for i in range(200):
            await submit(b"w%d" % i)
        await asyncio.sleep(0.5)
        sem = asyncio.Semaphore(inflight)

        async def one(i: int) -> None:
            async with sem:
                await submit(b"%d" % i)

        cpu0 = time.process_time() + sum(cpu_seconds(p) for p in pids)
        begin = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        await asyncio.wait_for(all_seen.wait(), timeout=60)
        seconds = time.perf_counter() - begin
        cpu = time.process_time() + sum(cpu_seconds(p) for p in pids) - cpu0
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        return {"tasks": n, "tasks_per_s": round(n / seconds, 1),
                "cpu_us_per_task": round(cpu / n * 1e6)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(port: int, role: str) -> subprocess.Popen[bytes]:
    """This script again, in a role."""
    return subprocess.Popen([sys.executable, __file__, "--port", str(port), "--role", role])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int) -> None:
    for _ in range(200):
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--w1", type=int, default=0, metavar="N",
                        help="also W1's shape: N pipelined submits, throughput and CPU per task")
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--role", choices=["relay", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "relay":
        return await relay(args.port)
    if args.role == "worker":
        return await worker(args.port)
    port = free_port()
    procs = [spawn(port, "relay")]
    try:
        await wait_port(port)
        procs += [spawn(port, "worker") for _ in range(2)]
        await asyncio.sleep(1.0)
        for _ in range(args.rounds):
            result = await client(port, args.rate, args.duration)
            print(json.dumps({"workload": "grpc_floor", **result}), flush=True)
            if args.w1:
                w1 = await client_w1(port, args.w1, args.inflight, [p.pid for p in procs])
                print(json.dumps({"workload": "grpc_floor_w1", **w1}), flush=True)
    finally:
        for p in reversed(procs):  # workers first: they would complain of a lost relay
            p.kill()
            p.wait()


if __name__ == "__main__":
    asyncio.run(main())

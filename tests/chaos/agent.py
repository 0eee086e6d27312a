"""A small chaos agent, run as a subprocess: raw gRPC stubs (what any language does).

It registers, keeps its heartbeat stream, takes work on the ProcessTasks stream
and reports every outcome through the unary CompleteTask, so it knows exactly
whether the server ACCEPTED the result or refused it (ABORTED: stale lease).
Every event is one JSON line in ``--log`` (flushed at once, so a SIGKILL loses
nothing already written):

    {"ev": "start"|"accepted"|"refused"|"failed"|"connected", "task": ..., "token": ..., "t": ...}

Given several ``--targets`` it moves to the next one whenever its session
breaks, registering again (a fresh session), like the SDK's failover.
``--fail-rate`` makes a share of handler calls fail with a retryable error;
``--fail-file`` makes every call fail while that file exists (a flapping agent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import grpc  # noqa: E402
from agentmesh.v1 import (  # noqa: E402
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)


class Log:
    """Append-only JSON lines, flushed per line."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, ev: str, **fields: object) -> None:
        """One event."""
        self._f.write(json.dumps({"ev": ev, "t": time.time(), **fields}) + "\n")
        self._f.flush()


async def _queue_iter(q: asyncio.Queue[object]) -> AsyncIterator[object]:
    while True:
        item = await q.get()
        if item is None:
            return
        yield item


async def session(target: str, args: argparse.Namespace, log: Log) -> None:
    """One registration on one server, until its streams break."""
    async with grpc.aio.insecure_channel(target) as channel:
        disc = discovery_pb2_grpc.DiscoveryServiceStub(channel)
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        reg = await disc.RegisterAgent(discovery_pb2.RegisterAgentRequest(agent=discovery_pb2.Agent(
            display_name=args.name, max_concurrency=args.concurrency,
            capabilities=[discovery_pb2.Capability(name=c) for c in args.cap.split(",")])),
            timeout=3)
        agent, token = reg.agent.name, reg.session_token
        interval = max(reg.heartbeat_interval.ToNanoseconds() / 1e9, 0.05)
        hb_q: asyncio.Queue[object] = asyncio.Queue()
        hb_q.put_nowait(discovery_pb2.HeartbeatRequest(
            open=discovery_pb2.HeartbeatOpen(agent=agent, session_token=token)))
        hb = disc.Heartbeat(_queue_iter(hb_q))
        # A work stream is accepted once the heartbeat stream is open and answered.
        first = await asyncio.wait_for(hb.read(), 5)
        if first is grpc.aio.EOF:
            raise ConnectionError("heartbeat stream did not open")
        out: asyncio.Queue[object] = asyncio.Queue()
        out.put_nowait(task_pb2.ProcessTasksRequest(
            open=task_pb2.ProcessTasksOpen(agent=agent, session_token=token)))
        out.put_nowait(task_pb2.ProcessTasksRequest(
            credit=task_pb2.TaskCredit(count=args.concurrency)))
        work = tasks.ProcessTasks(_queue_iter(out))
        log.write("connected", target=target, agent=agent, pid=os.getpid())
        running: dict[str, asyncio.Task[None]] = {}

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval / 2)
                hb_q.put_nowait(discovery_pb2.HeartbeatRequest(
                    beat=discovery_pb2.HeartbeatBeat(in_flight=len(running))))

        async def read_hb() -> None:
            while await hb.read() is not grpc.aio.EOF:
                pass
            raise ConnectionError("heartbeat stream ended")

        async def handle(a: task_pb2.TaskAssignment) -> None:
            name, tok = a.task.name, a.fencing_token
            log.write("start", task=name, token=tok, attempt=a.task.attempt, agent=agent,
                      fallback=a.task.capability not in args.cap.split(","))
            try:
                loop = asyncio.get_running_loop()
                end = loop.time() + args.work
                while loop.time() < end:
                    await asyncio.sleep(min(args.progress, max(end - loop.time(), 0)))
                    if args.progress < args.work:
                        out.put_nowait(task_pb2.ProcessTasksRequest(progress=task_pb2.TaskProgress(
                            task=name, fencing_token=tok)))
                failing = (args.fail_file and os.path.exists(args.fail_file)) or (  # noqa: ASYNC240
                    random.random() < args.fail_rate)
                req = task_pb2.CompleteTaskRequest(task=name, fencing_token=tok)
                if failing:
                    req.failure.CopyFrom(task_pb2.TaskFailure(error_type="Transient",
                                                              message="chaos"))
                else:
                    req.output.CopyFrom(common_pb2.Payload(
                        data=json.dumps({"by": args.name}).encode(),
                        metadata={"encoding": b"json/plain"}))
                try:
                    await tasks.CompleteTask(req, timeout=5)
                    log.write("failed" if failing else "accepted", task=name, token=tok,
                              agent=agent)
                except grpc.aio.AioRpcError as err:
                    # ABORTED: a newer lease holds the task; FAILED_PRECONDITION:
                    # the task has ended (another attempt's result was accepted).
                    if err.code() in (grpc.StatusCode.ABORTED,
                                      grpc.StatusCode.FAILED_PRECONDITION):
                        log.write("refused", task=name, token=tok, agent=agent)
                    else:
                        log.write("report_error", task=name, token=tok, code=str(err.code()))
            finally:
                running.pop(name, None)
                with contextlib.suppress(Exception):
                    out.put_nowait(task_pb2.ProcessTasksRequest(
                        credit=task_pb2.TaskCredit(count=1)))

        async def read_work() -> None:
            async for msg in work:
                kind = msg.WhichOneof("kind")
                if kind in ("assignment", "assignments"):
                    batch = ([msg.assignment] if kind == "assignment"
                             else list(msg.assignments.assignments))
                    for a in batch:
                        running[a.task.name] = asyncio.create_task(handle(a))
                elif kind == "cancellation":
                    t = running.pop(msg.cancellation.task, None)
                    if t is not None:
                        t.cancel()
                        log.write("cancelled", task=msg.cancellation.task)
            raise ConnectionError("work stream ended")

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(beat())
                group.create_task(read_hb())
                group.create_task(read_work())
        finally:
            # Like a real zombie (and the SDK's flush): finish and report what runs.
            if running:
                await asyncio.wait(list(running.values()), timeout=5)
            for t in running.values():
                t.cancel()
            hb.cancel()
            work.cancel()


async def main() -> None:
    """Serve until killed, failing over between targets."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", required=True)
    parser.add_argument("--cap", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--work", type=float, default=0.05)
    parser.add_argument("--progress", type=float, default=3600.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--fail-file", default="")
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    log = Log(args.log)
    targets = args.targets.split(",")
    i = 0
    while True:
        target = targets[i % len(targets)]
        try:
            await session(target, args, log)
        except* Exception as group:
            log.write("disconnected", target=target, error=repr(group.exceptions[0])[:200])
        i += 1
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main())

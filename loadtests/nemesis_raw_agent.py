"""A nemesis agent written only on the generated stubs (gen/agentmesh/v1), no agent_sdk.

    python loadtests/nemesis_raw_agent.py --targets A,B --name raw0 --log raw0.jsonl

It is what an agent in another language does: RegisterAgent, a Heartbeat
stream, a ProcessTasks stream; it re-registers whenever its session ends.
Results go back over the work stream or, for a share of them, through the
unary CompleteTask (whose status code says for certain whether the server
took the result). It records every event as one JSON line (flushed at once):
``registered``, ``exec_start``, ``report`` (written just before the result or
failure is sent, so its time is a lower bound of the send), ``ack`` (a
refusal on the work stream), ``unary_ack`` (the CompleteTask status code),
``work_end`` / ``hb_end`` (how a stream ended and who ended it), ``probe``.

It obeys commands, one JSON object per line on stdin, so the nemesis can do
what only a misbehaving agent does:

- ``{"cmd": "hb_stall", "secs": S}``: stop beating for S seconds but keep both
  streams open (the server must declare it GONE, close its work stream with
  FAILED_PRECONDITION and requeue its leases; results it sends meanwhile must
  be refused).
- ``{"cmd": "work_break"}``: cancel only the work stream, keep the heartbeat,
  and open a new work stream on the same session.
- ``{"cmd": "probe"}``: register a second card and open a work stream for it
  with no heartbeat stream: the server must refuse it (FAILED_PRECONDITION)
  and never lease to it.

The process exits when stdin closes (the driver is gone).
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
from pathlib import Path
from typing import Any

CODE = Path(os.environ.get("NEMESIS_CODE_ROOT") or Path(__file__).resolve().parents[1])
sys.path[:0] = [str(CODE / "gen")]

import grpc  # noqa: E402
from agentmesh.v1 import (  # noqa: E402
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

CAPS = ("work", "step")
ACK_REPORTS = "ack_reports" in task_pb2.ProcessTasksOpen.DESCRIPTOR.fields_by_name
"""Newer contracts can acknowledge accepted reports too: then every stream report
gets a definite answer (the campaign also runs against older trees)."""
OUTCOMES = {task_pb2.TASK_REPORT_OUTCOME_ACCEPTED: "ACCEPTED",
            task_pb2.TASK_REPORT_OUTCOME_STALE_LEASE: "STALE_LEASE",
            task_pb2.TASK_REPORT_OUTCOME_NOT_RUNNING: "NOT_RUNNING"}
WorkCall = grpc.aio.StreamStreamCall[task_pb2.ProcessTasksRequest, task_pb2.ProcessTasksResponse]
HbCall = grpc.aio.StreamStreamCall[discovery_pb2.HeartbeatRequest,
                                   discovery_pb2.HeartbeatResponse]


class Recorder:
    """Append-only JSON lines, flushed per line."""

    def __init__(self, path: str, src: str) -> None:
        self._f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._src = src

    def write(self, ev: str, **fields: object) -> None:
        """One event."""
        self._f.write(json.dumps({"t": time.time(), "src": self._src, "type": "agent",
                                  "ev": ev, **fields}) + "\n")
        self._f.flush()


def _card(name: str, concurrency: int) -> discovery_pb2.Agent:
    return discovery_pb2.Agent(display_name=name, max_concurrency=concurrency,
                               capabilities=[discovery_pb2.Capability(name=c) for c in CAPS])


def _canon(payload: common_pb2.Payload) -> str:
    """A JSON payload in canonical form (sorted keys), else its text."""
    text = payload.data.decode("utf-8", "replace")
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        return text


async def _code_of(call: grpc.aio.Call) -> str:
    try:
        return str((await call.code()).name)
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        return "CANCELLED"


async def _details_of(call: grpc.aio.Call) -> str:
    try:
        return str(await call.details() or "")[:200]
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        return ""


class Session:
    """One registration: its streams and what the commands did to them."""

    def __init__(self, agent: str, token: str, stub: task_pb2_grpc.TaskServiceStub,
                 interval: float) -> None:
        self.agent = agent
        self.token = token
        self.stub = stub
        self.interval = interval
        self.work: WorkCall | None = None
        self.stall_until = 0.0
        self.breaking = False
        self.ended = asyncio.Event()
        self.wlock = asyncio.Lock()
        """grpc.aio allows one write at a time on a stream: every writer holds this."""

    async def send(self, req: task_pb2.ProcessTasksRequest, work: WorkCall | None = None
                   ) -> None:
        """Write on the work stream (the current one unless ``work`` is given)."""
        async with self.wlock:
            call = work or self.work
            if call is None:
                raise RuntimeError("no work stream")
            await call.write(req)


class RawAgent:
    """The agent process."""

    def __init__(self, args: argparse.Namespace, rec: Recorder) -> None:
        self.args = args
        self.rec = rec
        self.name = str(args.name)
        self.targets = str(args.targets).split(",")
        self.rng = random.Random(f"{args.seed}-{self.name}")
        self.session: Session | None = None
        self.target = self.targets[0]
        self.running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.unary: dict[str, grpc.aio.Channel] = {}
        self.jobs: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)
        return task

    def _unary_stub(self, target: str) -> task_pb2_grpc.TaskServiceStub:
        ch = self.unary.get(target)
        if ch is None:
            ch = self.unary[target] = grpc.aio.insecure_channel(target)
        return task_pb2_grpc.TaskServiceStub(ch)

    # ------------------------------------------------------------------ sessions

    async def run(self) -> None:
        """Serve sessions until stdin closes."""
        commands = asyncio.create_task(self._commands())
        i = 0
        try:
            while not commands.done():
                self.target = self.targets[i % len(self.targets)]
                try:
                    await self._session(self.target)
                except grpc.aio.AioRpcError as err:
                    self.rec.write("session_error", target=self.target, code=err.code().name)
                    if err.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                        i += 1
                except (OSError, ConnectionError, TimeoutError) as err:
                    self.rec.write("session_error", target=self.target, error=repr(err)[:200])
                    i += 1
                await asyncio.sleep(0.1)
        finally:
            commands.cancel()
            for t in list(self.jobs):
                t.cancel()
            for ch in self.unary.values():
                await ch.close()

    async def _session(self, target: str) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            disc = discovery_pb2_grpc.DiscoveryServiceStub(channel)
            stub = task_pb2_grpc.TaskServiceStub(channel)
            reg = await disc.RegisterAgent(discovery_pb2.RegisterAgentRequest(
                agent=_card(self.name, self.args.concurrency)), timeout=3)
            interval = max(reg.heartbeat_interval.ToNanoseconds() / 1e9, 0.05)
            sess = Session(reg.agent.name, reg.session_token, stub, interval)
            self.rec.write("registered", agent=sess.agent, target=target, pid=os.getpid())
            hb: HbCall = disc.Heartbeat()
            await hb.write(discovery_pb2.HeartbeatRequest(open=discovery_pb2.HeartbeatOpen(
                agent=sess.agent, session_token=sess.token)))
            self.session = sess
            try:
                # The work stream needs a heartbeat session: wait for its first ack.
                first = await asyncio.wait_for(hb.read(), 5)
                if first is grpc.aio.EOF:
                    self.rec.write("hb_end", agent=sess.agent, code=await _code_of(hb),
                                   by="server", at="open")
                    return
                await self._open_work(sess)
                beats = asyncio.create_task(self._beat(hb, sess))
                reader = asyncio.create_task(self._read_hb(hb, sess))
                try:
                    await sess.ended.wait()
                finally:
                    beats.cancel()
                    reader.cancel()
                    await asyncio.gather(beats, reader, return_exceptions=True)
            finally:
                self.session = None
                hb.cancel()
                if sess.work is not None:
                    sess.work.cancel()
                await self._wind_down()

    async def _open_work(self, sess: Session) -> None:
        work: WorkCall = sess.stub.ProcessTasks()
        opening = task_pb2.ProcessTasksOpen(agent=sess.agent, session_token=sess.token)
        if ACK_REPORTS:
            opening.ack_reports = True
        await work.write(task_pb2.ProcessTasksRequest(open=opening))
        first = await asyncio.wait_for(work.read(), 5)
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "opened":
            code = await _code_of(work)
            self.rec.write("work_end", agent=sess.agent, code=code, by="server", at="open")
            sess.ended.set()
            return
        await work.write(task_pb2.ProcessTasksRequest(
            credit=task_pb2.TaskCredit(count=self.args.concurrency)))
        sess.work = work
        self.rec.write("work_open", agent=sess.agent)
        self._spawn(self._read_work(work, sess))

    async def _beat(self, hb: HbCall, sess: Session) -> None:
        n = 0
        while True:
            await asyncio.sleep(sess.interval / 2)
            if time.time() < sess.stall_until:
                continue
            try:
                await hb.write(discovery_pb2.HeartbeatRequest(beat=discovery_pb2.HeartbeatBeat(
                    in_flight=len(self.running),
                    load=len(self.running) / max(1, self.args.concurrency))))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError):
                return  # the reader records how the stream ended
            n += 1
            if n % 8 == 0 and sess.work is not None:
                # Credits are capped by free slots on the server: re-granting heals drift.
                with contextlib.suppress(Exception):
                    await sess.send(task_pb2.ProcessTasksRequest(
                        credit=task_pb2.TaskCredit(count=self.args.concurrency)))

    async def _read_hb(self, hb: HbCall, sess: Session) -> None:
        try:
            while True:
                msg = await hb.read()
                if msg is grpc.aio.EOF:
                    break
        except grpc.aio.AioRpcError:
            pass
        self.rec.write("hb_end", agent=sess.agent, code=await _code_of(hb), by="server",
                       detail=await _details_of(hb))
        # Give the server a moment to close the work stream itself (it must, for a GONE agent).
        work = sess.work
        if work is not None:
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                await asyncio.wait_for(work.code(), 1.0)
        sess.ended.set()

    async def _read_work(self, work: WorkCall, sess: Session) -> None:
        try:
            while True:
                msg = await work.read()
                if msg is grpc.aio.EOF:
                    break
                kind = msg.WhichOneof("kind")
                batch: list[task_pb2.TaskAssignment] = []
                if kind == "assignment":
                    batch = [msg.assignment]
                elif kind == "assignments":
                    batch = list(msg.assignments.assignments)
                elif kind == "ack":
                    self.rec.write("ack", task=msg.ack.task, token=msg.ack.fencing_token,
                                   outcome=OUTCOMES.get(msg.ack.outcome, str(msg.ack.outcome)))
                elif kind == "cancellation":
                    c = msg.cancellation
                    job = self.running.pop((c.task, c.fencing_token), None)
                    if job is not None:
                        job.cancel()
                        with contextlib.suppress(Exception):
                            await sess.send(task_pb2.ProcessTasksRequest(
                                credit=task_pb2.TaskCredit(count=1)), work)
                for a in batch:
                    key = (a.task.name, a.fencing_token)
                    self.running[key] = self._spawn(self._execute(a, sess))
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError:
            if not work.cancelled():
                raise  # this task itself is being cancelled
        mine = sess.breaking and sess.work is work
        self.rec.write("work_end", agent=sess.agent, code=await _code_of(work),
                       by="self" if mine or sess.ended.is_set() else "server",
                       detail=await _details_of(work))
        if not mine and sess.work is work:
            sess.ended.set()

    async def _wind_down(self) -> None:
        """A session ended: let running handlers finish and report (as a zombie would)."""
        jobs = list(self.running.values())
        if jobs:
            await asyncio.wait(jobs, timeout=3)

    # ------------------------------------------------------------------ work

    async def _execute(self, a: task_pb2.TaskAssignment, sess: Session) -> None:
        name, tok = a.task.name, a.fencing_token
        me = sess.agent
        extra: dict[str, Any] = {}
        if a.task.step_id:
            extra["upstream"] = {k: _canon(v) for k, v in a.task.dependency_outputs.items()}
        self.rec.write("exec_start", task=name, token=tok, attempt=a.task.attempt, agent=me,
                       **extra)
        try:
            spec = json.loads(a.task.input.data) if a.task.input.data else {}
        except ValueError:
            spec = {}
        if not isinstance(spec, dict):
            spec = {}
        try:
            try:
                await asyncio.sleep(float(spec.get("ms", 20)) / 1000.0)
            except asyncio.CancelledError:
                self.rec.write("cancelled", task=name, token=tok, agent=me)
                raise
            fail = spec.get("fail")
            failing = fail == "always" or (fail == "first" and a.task.attempt == 1)
            if failing:
                message = f"nemesis failure by {me} under token {tok}"
                failure = task_pb2.TaskFailure(
                    error_type="NemesisFailure" if fail == "always" else "NemesisTransient",
                    message=message, non_retryable=fail == "always")
                output_text = message
            else:
                value = {"agent": me, "p": self.name, "task": name, "token": tok}
                output_text = json.dumps(value, sort_keys=True)
                payload = common_pb2.Payload(data=output_text.encode(),
                                             metadata={"encoding": b"json/plain"})
            kind = "failure" if failing else "result"
            current = self.session
            use_stream = (current is sess and sess.work is not None and not sess.breaking
                          and self.rng.random() >= self.args.unary_share)
            if use_stream and sess.work is not None:
                req = (task_pb2.ProcessTasksRequest(failure=task_pb2.TaskFailureReport(
                    task=name, fencing_token=tok, failure=failure)) if failing else
                    task_pb2.ProcessTasksRequest(result=task_pb2.TaskResult(
                        task=name, fencing_token=tok, output=payload)))
                self.rec.write("report", task=name, token=tok, agent=me, kind=kind,
                               output=output_text, via="stream")
                try:
                    await sess.send(req)
                    return
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError):
                    self.rec.write("report_unsent", task=name, token=tok)
            ureq = task_pb2.CompleteTaskRequest(task=name, fencing_token=tok)
            if failing:
                ureq.failure.CopyFrom(failure)
            else:
                ureq.output.CopyFrom(payload)
            self.rec.write("report", task=name, token=tok, agent=me, kind=kind,
                           output=output_text, via="unary")
            try:
                await self._unary_stub(self.target).CompleteTask(ureq, timeout=5)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            self.rec.write("unary_ack", task=name, token=tok, code=code)
        finally:
            self.running.pop((name, tok), None)

    # ------------------------------------------------------------------ commands

    async def _commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                return  # the driver is gone
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            self._command(cmd)

    def _command(self, cmd: dict[str, Any]) -> None:
        sess = self.session
        what = cmd.get("cmd")
        if what == "hb_stall" and sess is not None:
            secs = float(cmd.get("secs", 1.0))
            sess.stall_until = time.time() + secs
            self.rec.write("stall", agent=sess.agent, secs=secs)
        elif what == "work_break" and sess is not None and sess.work is not None:
            self._spawn(self._work_break(sess))
        elif what == "probe":
            self._spawn(self._probe(self.target))
        else:
            self.rec.write("command_ignored", cmd=cmd)

    async def _work_break(self, sess: Session) -> None:
        old = sess.work
        sess.breaking = True
        self.rec.write("work_break", agent=sess.agent)
        if old is not None:
            old.cancel()
        await asyncio.sleep(0.2)
        sess.work = None
        sess.breaking = False
        if sess.ended.is_set():
            return
        try:
            await self._open_work(sess)
        except (grpc.aio.AioRpcError, TimeoutError) as err:
            code = err.code().name if isinstance(err, grpc.aio.AioRpcError) else "TIMEOUT"
            self.rec.write("work_end", agent=sess.agent, code=code, by="server", at="reopen")
            sess.ended.set()

    async def _probe(self, target: str) -> None:
        """A work stream for a registered agent that never opened a heartbeat stream."""
        ttl = 3.5
        async with grpc.aio.insecure_channel(target) as channel:
            disc = discovery_pb2_grpc.DiscoveryServiceStub(channel)
            stub = task_pb2_grpc.TaskServiceStub(channel)
            try:
                reg = await disc.RegisterAgent(discovery_pb2.RegisterAgentRequest(
                    agent=_card(f"{self.name}-probe", 1)), timeout=3)
            except grpc.aio.AioRpcError as err:
                self.rec.write("probe_skipped", code=err.code().name)
                return
            ttl = 3 * reg.heartbeat_interval.ToNanoseconds() / 1e9 + 1.0
            agent = reg.agent.name
            await asyncio.sleep(0.1)
            work: WorkCall = stub.ProcessTasks()
            got = 0
            code = ""
            try:
                await work.write(task_pb2.ProcessTasksRequest(open=task_pb2.ProcessTasksOpen(
                    agent=agent, session_token=reg.session_token)))
                await work.write(task_pb2.ProcessTasksRequest(
                    credit=task_pb2.TaskCredit(count=1)))
                async with asyncio.timeout(ttl):
                    while True:
                        msg = await work.read()
                        if msg is grpc.aio.EOF:
                            code = await _code_of(work)
                            break
                        kind = msg.WhichOneof("kind")
                        leases = ([msg.assignment] if kind == "assignment" else
                                  list(msg.assignments.assignments) if kind == "assignments"
                                  else [])
                        for a in leases:
                            got += 1
                            # Hand it straight back (recorded, so the checker sees it).
                            text = f"probe {agent} gives back token {a.fencing_token}"
                            self.rec.write("exec_start", task=a.task.name, token=a.fencing_token,
                                           attempt=a.task.attempt, agent=agent)
                            self.rec.write("report", task=a.task.name, token=a.fencing_token,
                                           agent=agent, kind="failure", output=text,
                                           via="stream")
                            await work.write(task_pb2.ProcessTasksRequest(
                                failure=task_pb2.TaskFailureReport(
                                    task=a.task.name, fencing_token=a.fencing_token,
                                    failure=task_pb2.TaskFailure(error_type="Probe",
                                                                 message=text))))
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            except TimeoutError:
                code = ""
            finally:
                work.cancel()
            self.rec.write("probe", agent=agent, code=code, assignments=got)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await disc.DeregisterAgent(discovery_pb2.DeregisterAgentRequest(
                    name=agent, session_token=reg.session_token), timeout=3)


async def main() -> None:
    """Serve until stdin closes (or SIGKILL)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unary-share", type=float, default=0.4)
    args = parser.parse_args()
    rec = Recorder(args.log, args.name)
    rec.write("started", pid=os.getpid())
    await RawAgent(args, rec).run()


if __name__ == "__main__":
    asyncio.run(main())

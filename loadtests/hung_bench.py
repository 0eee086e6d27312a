"""Hung-agent figures: how fast a paused agent stops getting work and loses its task.

    .venv/bin/python loadtests/hung_bench.py [--rounds 5] [--interval 0.2]
        [--store redis --bus nats] [--agents 4] [--concurrency 64] [--work 0.1]
        [--rate 40] [--keep-logs]

A real ``agentmesh serve`` process (``python -m server.cli serve``, heartbeat
interval ``--interval``, 3 missed intervals make an agent GONE) and
``--agents`` raw-stub agent processes (``tests/chaos/agent.py``) run while a
steady stream of short tasks (``--rate`` per second, ``--work`` seconds each)
flows. Each round SIGSTOPs one agent that is running a task (its sockets stay
open, it sends nothing: a hung process), waits for the mesh to route around
it, checks that the late result is refused, SIGCONTs it (it registers again,
as a fresh session, and rejoins the pool) and moves on.

Probes: left alone, a hung agent stops getting work long before the server
could know it hung, for reasons that say nothing about liveness: it grants
no new credits, and least-loaded routing prefers the others once its tasks
stop finishing. So every agent also offers a capability of its own
(``probe-<name>``) and, from the SIGSTOP until an interval after the agent
is seen GONE, a probe task of the hung agent's capability is submitted every
tenth of an interval, with enough slots (``--concurrency``) left to take
them all: work the server can lease to it and only to it. The last of those
leases is then the server's own cut-off. Probes queued after the cut-off run
on the agent's new session once it is resumed, and count in the totals.

Everything is measured on the server's record (each task's attempts: agent,
start and end time), since a stopped process cannot tell when it was last
sent work. The server and this script share the machine's wall clock.

(a) SIGSTOP -> last lease granted to the hung agent: the start time of the
    newest attempt leased to it after the SIGSTOP (0 when there was none).
    Bar: within 3 heartbeat intervals. The server leases only to an agent
    whose session has not expired (last beat + 3 intervals, read in the same
    store step as the lease), so with beats every half interval this lands
    between 2.5 and 3 intervals.
(b) SIGSTOP -> its running task RUNNING on another agent: the start time of
    the next attempt of every task it held at the SIGSTOP (the round's figure
    is the slowest one). Bar: 3 heartbeat intervals + 1 s.
(c) SIGSTOP -> GetAgent says GONE (polled every 10 ms; shown, no bar: the
    server's expiry sweep runs every half interval, so up to 3.5 intervals).

Checks (each a failure when broken): every held task's late result is
refused, both when this script replays it with CompleteTask once the task
has ended (FAILED_PRECONDITION, ErrorInfo reason TASK_NOT_RUNNING) and when
the resumed agent reports it itself (its log says "refused"), and no report
the GONE session makes after the SIGCONT is accepted; no lease is ever
granted to the hung session after it is seen GONE; at the end every task
SUCCEEDED with exactly one successful attempt on the server and exactly one
accepted result in the agents' logs (nothing lost, nothing completed twice).

Exits 1 when a bar is missed or a check fails; every process it started is
killed in ``finally`` (and, with a Redis store, the run's keys deleted).
This is a benchmark to run by hand, never a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
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
    task_pb2,
    task_pb2_grpc,
)
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from tests._services import free_port  # noqa: E402
from tests.chaos._harness import AgentProc, js, until  # noqa: E402

MISSES = 3
CAP = "hung-bench"
OUTCOMES = ("accepted", "failed", "refused", "report_error", "cancelled")
RETRY = common_pb2.RetryPolicy(max_attempts=20, initial_backoff={"nanos": 10_000_000},
                               max_backoff={"nanos": 50_000_000})
ENDED = (task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED,
         task_pb2.TASK_STATE_CANCELLED, task_pb2.TASK_STATE_DEAD_LETTERED)


def ts(value: Timestamp) -> float:
    """A protobuf Timestamp in Unix seconds (0.0 when unset)."""
    return float(value.seconds) + value.nanos / 1e9


class ServeProc:
    """One ``agentmesh serve`` process with the bench's liveness settings."""

    def __init__(self, args: argparse.Namespace, log: Path) -> None:
        self.port = free_port()
        self.prefix = f"hungbench-{uuid.uuid4().hex[:8]}"
        self.store, self.bus = args.store, args.bus
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}",
               "AGENTMESH_HEARTBEAT_MISSES": str(MISSES),
               "AGENTMESH_TICK": f"{args.interval / 10:g}",
               "AGENTMESH_DRAIN_GRACE": "0.2", "AGENTMESH_KEY_PREFIX": self.prefix}
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port),
               "--metrics-port", "0", "--console-port", "0",
               "--store", args.store, "--bus", args.bus,
               "--heartbeat-interval", f"{args.interval:g}", "--log-level", "WARNING"]
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._out,
                                     stderr=self._out)

    @property
    def address(self) -> str:
        """host:port."""
        return f"127.0.0.1:{self.port}"

    async def ready(self) -> None:
        """Until the gRPC port answers."""
        async with grpc.aio.insecure_channel(self.address) as ch:
            await asyncio.wait_for(ch.channel_ready(), 30)

    def stop(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._out.close()

    async def drop_keys(self) -> None:
        """Delete the run's keys from a shared Redis (the run used its own prefix)."""
        if not self.store.startswith("redis"):
            return
        from server.backends.redis import RedisStores  # noqa: PLC0415
        from server.settings import backend_url  # noqa: PLC0415

        stores = await RedisStores.connect(backend_url(self.store), prefix=self.prefix)
        try:
            await stores.delete_all_keys()
        finally:
            await stores.aclose()


class Feed:
    """A steady stream of tasks of one capability at ``rate`` per second."""

    def __init__(self, stub: task_pb2_grpc.TaskServiceStub, rate: float, cap: str = CAP,
                 names: list[str] | None = None) -> None:
        self.stub = stub
        self.rate = rate
        self.cap = cap
        self.names: list[str] = [] if names is None else names
        self.sent = 0
        self.errors = 0

    async def run(self) -> None:
        """Submit until cancelled."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            self.sent += 1
            try:
                resp = await self.stub.SubmitTask(task_pb2.SubmitTaskRequest(task=task_pb2.Task(
                    capability=self.cap, input=js(self.sent), retry_policy=RETRY)), timeout=10)
                self.names.append(resp.task.name)
            except grpc.aio.AioRpcError:
                self.errors += 1
            # Paced on the schedule, not on the reply: a slow reply does not lower the rate.
            await asyncio.sleep(max(0.0, start + self.sent / self.rate - loop.time()))


def probe_cap(agent_name: str) -> str:
    """The capability only that agent process offers (the probes of its rounds)."""
    return f"probe-{agent_name}"


@dataclass
class Round:
    """One SIGSTOP and what the bench saw of it."""

    index: int
    agent_proc: str
    agent: str = ""
    t_stop: float = 0.0
    t_gone: float = 0.0
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (token, attempt)
    replays: list[tuple[str, str]] = field(default_factory=list)  # (code, reason)
    own_refused: int = 0
    own_accepted: int = 0
    late_refused: int = 0
    late_accepted: list[str] = field(default_factory=list)  # tasks, per the agent's log
    probes: int = 0
    a: float = 0.0
    late_leases: int = 0
    b: float = 0.0
    held_on_server: int = 0
    recovered: int = 0
    problems: list[str] = field(default_factory=list)


def session_of(agent: AgentProc) -> str:
    """The agent's current session (agents/<id> from its newest "connected")."""
    connected = agent.events("connected")
    return str(connected[-1]["agent"]) if connected else ""


def open_starts(agent: AgentProc, session: str) -> dict[str, dict[str, Any]]:
    """Tasks this session started and has not reported yet, by task name."""
    events = agent.events()
    done = {(e["task"], e.get("token")) for e in events if e["ev"] in OUTCOMES}
    return {e["task"]: e for e in events
            if e["ev"] == "start" and e["agent"] == session
            and (e["task"], e["token"]) not in done}


async def reason_of(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call ("" when none)."""
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


async def replay(stub: task_pb2_grpc.TaskServiceStub, task: str, token: int) -> tuple[str, str]:
    """Report the hung attempt's result late, as the zombie would: (code, reason)."""
    try:
        await stub.CompleteTask(task_pb2.CompleteTaskRequest(
            task=task, fencing_token=token, output=js("late")), timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code().name, await reason_of(err)
    return "OK", ""


async def one_round(r: Round, hung: AgentProc, args: argparse.Namespace,
                    tasks: task_pb2_grpc.TaskServiceStub,
                    disc: discovery_pb2_grpc.DiscoveryServiceStub, names: list[str]) -> bool:
    """SIGSTOP ``hung`` while it runs a task, watch the mesh route around it, SIGCONT it.

    From the SIGSTOP until an interval after it is seen GONE, probe tasks
    only ``hung`` offers are submitted every tenth of an interval (their names
    go to ``names``), so there is always work the server could lease to it.
    False when the agent turned out to hold no running task (the round is void).
    """
    interval = args.interval
    r.agent = session_of(hung)
    # Stop it only while it is running something it started recently.
    held = await until(lambda: {n: e for n, e in open_starts(hung, r.agent).items()
                                if time.time() - float(e["t"]) < args.work / 2},
                       timeout=30, what=f"{hung.name} running a task")
    r.t_stop = hung.signal(signal.SIGSTOP)
    r.held = {n: (int(e["token"]), int(e["attempt"])) for n, e in held.items()}
    probe = Feed(tasks, 10 / interval, probe_cap(hung.name), names)
    probing = asyncio.create_task(probe.run())

    async def gone() -> bool:
        got = await disc.GetAgent(discovery_pb2.GetAgentRequest(name=r.agent), timeout=5)
        return bool(got.agent.state == discovery_pb2.AGENT_STATE_GONE)

    slack = 10.0 + 5 * interval  # a loaded machine is slow; the bars are judged afterwards
    try:
        await until(gone, timeout=MISSES * interval + slack, what=f"{r.agent} GONE")
        r.t_gone = time.time()
        await asyncio.sleep(interval)  # still offering work after GONE: none may be leased
    finally:
        probing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probing
    r.probes = probe.sent

    # A result already on the wire at the SIGSTOP may still have been accepted: only
    # attempts the server ended without a result count as held.
    for name, (_, attempt) in list(r.held.items()):
        got = (await tasks.GetTask(task_pb2.GetTaskRequest(name=name), timeout=5)).task
        mine = [a for a in got.attempts if a.attempt == attempt and a.agent == r.agent]
        if mine and ts(mine[0].end_time) and not mine[0].HasField("failure"):
            del r.held[name]

    async def all_ended() -> bool:
        for name in r.held:
            got = (await tasks.GetTask(task_pb2.GetTaskRequest(name=name), timeout=5)).task
            if got.state not in ENDED:
                return False
        return True

    await until(all_ended, timeout=MISSES * interval + 1.0 + slack,
                what="held tasks ended elsewhere")
    for name, (token, _) in r.held.items():
        r.replays.append(await replay(tasks, name, token))
    # Resume it: its streams end with SESSION_ENDED, it reports what it ran, registers again.
    t_cont = hung.signal(signal.SIGCONT)
    leases = {(n, t) for n, (t, _) in r.held.items()}

    def reported() -> tuple[list[dict[str, Any]]] | None:
        events = hung.events()
        outcomes = [e for e in events if e["ev"] in OUTCOMES
                    and (e["task"], e.get("token")) in leases]
        reconnected = any(e["ev"] == "connected" and e["agent"] != r.agent for e in events)
        return (outcomes,) if len(outcomes) >= len(leases) and reconnected else None

    (outcomes,) = await until(reported, timeout=15.0,
                           what=f"{hung.name} reported late and re-registered")
    r.own_refused = sum(e["ev"] == "refused" for e in outcomes)
    r.own_accepted = sum(e["ev"] == "accepted" for e in outcomes)
    # Whatever the old session reports after the SIGCONT (probes it was leased while it
    # hung, read from its socket now) is late too. It may log "accepted" only for a
    # result it had sent before the SIGSTOP (the reply waited); judge() checks that
    # on the server's record.
    await asyncio.sleep(1.0)
    late = [e for e in hung.events() if e.get("agent") == r.agent and float(e["t"]) >= t_cont]
    r.late_refused = sum(e["ev"] == "refused" for e in late)
    r.late_accepted = [str(e["task"]) for e in late if e["ev"] == "accepted"]
    return bool(r.held)


def judge(r: Round, by_task: dict[str, task_pb2.Task]) -> None:
    """Fill (a) and (b) of a round from the server's record of every attempt.

    The tasks it held are those the server had leased to it when it was
    stopped and ended without its result: the ones this script picked from
    its log and any other (say, one leased a moment before the SIGSTOP).
    """
    late: list[float] = []
    recovered: list[float] = []
    held = 0
    for name, task in by_task.items():
        attempts = sorted(task.attempts, key=lambda a: a.attempt)
        for i, att in enumerate(attempts):
            if att.agent != r.agent:
                continue
            start, ended = ts(att.start_time), ts(att.end_time)
            won = not att.HasField("failure")
            if won and ended > r.t_gone:
                r.problems.append(f"{name}: a result of {r.agent} accepted after it was GONE")
            if start > r.t_stop:
                late.append(start - r.t_stop)
                if start > r.t_gone:
                    r.problems.append(f"{name} leased to {r.agent} after it was GONE")
                continue
            if ended and ended < r.t_stop:
                continue  # over before the SIGSTOP
            if won:  # its result was on the wire at the SIGSTOP
                if name in r.held and att.attempt == r.held[name][1]:
                    r.problems.append(f"{name}: the hung attempt {att.attempt} succeeded")
                continue
            held += 1
            nxt = attempts[i + 1] if i + 1 < len(attempts) else None
            if nxt is None or nxt.agent == r.agent:
                r.problems.append(f"{name}: attempt {att.attempt} never ran elsewhere")
                continue
            recovered.append(ts(nxt.start_time) - r.t_stop)
    r.late_leases = len(late)
    r.a = max(late, default=0.0)
    r.held_on_server = held
    r.recovered = len(recovered)
    r.b = max(recovered, default=0.0)
    if len(recovered) < max(held, len(r.held)):
        r.problems.append(f"round {r.index}: {max(held, len(r.held)) - len(recovered)} held "
                          "task(s) not recovered")
    for code, reason in r.replays:
        if (code, reason) != ("FAILED_PRECONDITION", "TASK_NOT_RUNNING"):
            r.problems.append(f"late replay answered {code} {reason}")
    if r.own_accepted or r.own_refused < len(r.held):
        r.problems.append(f"the resumed agent's own reports: {r.own_refused} refused, "
                          f"{r.own_accepted} accepted of {len(r.held)} held")
    for name in r.late_accepted:  # logged after the SIGCONT: must predate the GONE
        won = [a for a in by_task[name].attempts if a.agent == r.agent and ts(a.end_time)
               and not a.HasField("failure")] if name in by_task else []
        if not won or ts(won[0].end_time) > r.t_gone:
            r.problems.append(f"{name}: the GONE session's late report was accepted")


def table(rounds: list[Round], interval: float) -> bool:
    """Print the figures and bars; True when every bar holds."""
    bars = {"a": MISSES * interval, "b": MISSES * interval + 1.0, "c": None}
    labels = {"a": "(a) SIGSTOP -> last lease to hung agent",
              "b": "(b) SIGSTOP -> its task RUNNING elsewhere",
              "c": "(c) SIGSTOP -> GetAgent says GONE (polled)"}
    values = {"a": [r.a for r in rounds], "b": [r.b for r in rounds],
              "c": [r.t_gone - r.t_stop for r in rounds]}
    ok = True
    head = f"{'metric':44} {'median':>16} {'max':>16} {'bar':>16}  verdict"
    print(head)
    print("-" * len(head))
    for key, label in labels.items():
        vals = values[key]
        med, top = statistics.median(vals), max(vals)
        bar = bars[key]

        def fmt(v: float) -> str:
            return f"{v * 1000:7.0f} ms {v / interval:4.2f}i"

        verdict = "-"
        bar_s = "-"
        if bar is not None:
            passed = top <= bar
            ok &= passed
            verdict = "PASS" if passed else "FAIL"
            bar_s = fmt(bar)
        print(f"{label:44} {fmt(med):>16} {fmt(top):>16} {bar_s:>16}  {verdict}")
    print(f"(i = heartbeat interval = {interval * 1000:.0f} ms; bars: (a) <= {MISSES} i, "
          f"(b) <= {MISSES} i + 1 s, judged on the max)")
    return ok


async def run(args: argparse.Namespace, tmp: Path) -> int:
    """The whole bench; the exit status."""
    server = ServeProc(args, tmp / "server.log")
    agents: list[AgentProc] = []
    feed_task: asyncio.Task[None] | None = None
    try:
        await server.ready()
        agents = [AgentProc(tmp, f"w{i}", [server.address], f"{CAP},{probe_cap(f'w{i}')}",
                            work=args.work, concurrency=args.concurrency)
                  for i in range(args.agents)]
        for a in agents:
            await until(lambda a=a: a.events("connected"), timeout=30, what=f"{a.name} up")
        rate = args.rate
        async with grpc.aio.insecure_channel(server.address) as ch:
            tasks = task_pb2_grpc.TaskServiceStub(ch)
            disc = discovery_pb2_grpc.DiscoveryServiceStub(ch)
            feed = Feed(tasks, rate)
            probes: list[str] = []
            feed_task = asyncio.create_task(feed.run())
            await asyncio.sleep(1.0)  # the stream is flowing
            rounds: list[Round] = []
            tries = void = 0
            while len(rounds) < args.rounds and tries < 3 * args.rounds:
                hung = agents[tries % len(agents)]
                tries += 1
                r = Round(len(rounds), hung.name)
                if await one_round(r, hung, args, tasks, disc, probes):
                    rounds.append(r)
                else:
                    void += 1
                print(f"round {r.index}: {hung.name} ({r.agent}) SIGSTOPped running "
                      f"{len(r.held)} task(s); GONE seen after "
                      f"{(r.t_gone - r.t_stop) * 1000:.0f} ms", flush=True)
                await asyncio.sleep(0.5)  # steady again before the next one
            feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed_task
            names = list(feed.names) + probes

            async def final() -> dict[str, task_pb2.Task] | None:
                got = {}
                for n in names:
                    t = (await tasks.GetTask(task_pb2.GetTaskRequest(name=n), timeout=5)).task
                    if t.state not in ENDED:
                        return None
                    got[n] = t
                return got

            by_task = await until(final, timeout=60, what="every task ended")
        for r in rounds:
            judge(r, by_task)
        judged = rounds
        accepted: Counter[str] = Counter()
        for a in agents:
            for e in a.events("accepted"):
                accepted[e["task"]] += 1
        not_ok = [n for n, t in by_task.items() if t.state != task_pb2.TASK_STATE_SUCCEEDED]
        wins = {n: sum(1 for att in t.attempts if ts(att.end_time) and
                       not att.HasField("failure")) for n, t in by_task.items()}
        twice_server = [n for n, w in wins.items() if w > 1]
        twice_logs = [n for n, c in accepted.items() if c > 1]
        unconfirmed = [n for n in names if accepted[n] == 0]
        print(f"\nhung-agent bench: store {args.store}, bus {args.bus}, {args.agents} agents x "
              f"{args.concurrency} slots, tasks of {args.work * 1000:.0f} ms at {rate:.0f}/s; "
              f"{len(judged)} rounds ({void} void and redone: its result was "
              f"already in flight at the SIGSTOP)\n")
        if not judged:
            print("no round judged")
            return 1
        for r in judged:
            print(f"  round {r.index}: {r.agent_proc} held {r.held_on_server}, probes offered "
                  f"{r.probes}, leases after SIGSTOP {r.late_leases}, (a) {r.a * 1000:.0f} ms, "
                  f"(b) {r.b * 1000:.0f} ms, GONE seen {(r.t_gone - r.t_stop) * 1000:.0f} ms"
                  + (f", late 'accepted' in its log {r.late_accepted}" if r.late_accepted else ""))
        print()
        ok = table(judged, args.interval)
        late = sum(r.late_leases for r in judged)
        print(f"\nleases granted to a hung agent after its SIGSTOP: {late} in {len(judged)} "
              f"rounds (probe tasks offered only to it: {sum(r.probes for r in judged)}); "
              f"held tasks recovered: {sum(r.recovered for r in judged)}; "
              f"late results replayed: {sum(len(r.replays) for r in judged)} "
              f"({dict(Counter(f'{c} {x}' for r in judged for c, x in r.replays))}); "
              f"reports of the GONE sessions after SIGCONT: "
              f"{sum(r.late_refused for r in judged)} refused, "
              f"{sum(len(r.late_accepted) for r in judged)} logged accepted (each a result "
              f"the server took before the GONE: checked)")
        print(f"tasks: {len(names)} submitted ({feed.errors} submit errors), "
              f"{len(names) - len(not_ok)} SUCCEEDED, not succeeded {len(not_ok)}, "
              f"two successful attempts {len(twice_server)}, accepted twice "
              f"{len(twice_logs)}, no accepted report in the logs {len(unconfirmed)}")
        problems = [p for r in judged for p in r.problems]
        problems += [f"{n} ended {task_pb2.TaskState.Name(by_task[n].state)}" for n in not_ok]
        problems += [f"{n} succeeded twice (server)" for n in twice_server]
        problems += [f"{n} accepted twice (agents)" for n in twice_logs]
        problems += [f"{n}: no accepted report" for n in unconfirmed]
        for p in problems[:20]:
            print(f"CHECK FAILED: {p}")
        if not ok:
            print("BAR MISSED")
        return 0 if ok and not problems else 1
    finally:
        if feed_task is not None:
            feed_task.cancel()
        for a in agents:
            with contextlib.suppress(Exception):
                a.stop()
        server.stop()
        with contextlib.suppress(Exception):
            await server.drop_keys()


def main() -> None:
    """Parse flags, run, exit with the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.2,
                        help="heartbeat interval, seconds (3 missed make an agent GONE)")
    parser.add_argument("--store", default="memory")
    parser.add_argument("--bus", default="memory")
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64,
                        help="slots per agent: room for the probes a hung one is offered")
    parser.add_argument("--work", type=float, default=0.1, help="seconds per task")
    parser.add_argument("--rate", type=float, default=40.0, help="steady tasks per second")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the server and agent logs (the directory is printed)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.keep_logs:
            tmp = tempfile.mkdtemp(prefix="hung_bench-")
            print(f"logs in {tmp}")
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="hung_bench-"))
        try:
            status = asyncio.run(run(args, Path(tmp)))
        except TimeoutError as err:  # a step of a round never happened: a failure too
            print(f"CHECK FAILED: {err}")
            status = 1
    sys.exit(status)


if __name__ == "__main__":
    main()

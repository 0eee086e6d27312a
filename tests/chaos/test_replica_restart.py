"""A replica SIGKILLed and restarted on the same port loses nothing.

Real processes: a private ``redis-server``, two ``agentmesh serve`` replicas
(A and B) on it, the shared NATS under a per-run subject prefix, and chaos
agents (``tests/chaos/agent.py``) whose handlers are slow.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from agentmesh.v1 import task_pb2, task_pb2_grpc

from tests._services import free_port, require_nats, skip_or_fail, unique_prefix
from tests.chaos._harness import (
    PY_RETRY,
    AgentProc,
    Client,
    Server,
    assert_invariants,
    complete_with,
    restart_server,
    start_redis,
    submit_batch,
    until,
    wait_listening,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

Record = Callable[[str, object], None]

WORK = 1.5
"""Seconds each handler runs: the margin between the agents' first starts and the kill."""
SLOTS = 8
"""Concurrency of each agent."""
TASKS = 40
REPORTS = ("accepted", "refused", "failed", "report_error")


def _agent_ids(agent: AgentProc) -> list[str]:
    return [str(e["agent"]) for e in agent.events("connected")]


async def test_replica_sigkill_and_restart_loses_nothing(
        tmp_path: Path, procs: list[AgentProc | Server], record_property: Record) -> None:
    """SIGKILL replica A while its agents run tasks, restart A on the same port.

    Setup: A and B share a private Redis. ``a-stay`` (targets: A only) and
    ``a-move`` (targets: A, then B) are connected to A; ``b-keep`` to B. Each
    has 8 slots and 1.5 s handlers. 40 tasks are queued in one batch, so 16 run
    on A's agents, 8 on B's, and 16 stay QUEUED.

    Sequence: as soon as A's agents have started their 16 tasks, they are
    SIGSTOPped (frozen: no report can leave them), then A is SIGKILLed and
    restarted on the same port. The test waits until the server side ended
    each killed attempt (the frozen agents' registrations expire and their
    leases go back to the queue, failure AGENT_GONE); only then are the agents
    resumed. Their handlers finish at once and report with the old fencing
    tokens over their old channel: that "late result" reaches the restarted A
    (and must be refused) or finds no server yet (``report_error``,
    UNAVAILABLE); which of the two is up to gRPC's reconnection, so both are
    allowed, but an accepted one is not. To refuse stale results
    deterministically as well, the test replays each killed attempt's result
    itself (CompleteTask, old token) through B as soon as the task's new
    attempt is seen, and once more through the restarted A at the end.

    Asserted:
    - the precondition: A's agents were frozen before any of their handlers
      could finish (stop time < first start + 1.5 s), so no report was in flight
      at the kill;
    - every task ends SUCCEEDED (GetTask and GetStats) with exactly one
      accepted result in the agents' logs, no allowance for lost replies
      (``assert_invariants`` too);
    - each of the 16 killed attempts: no accepted result; the task ran exactly
      twice (attempt 2, first attempt failed AGENT_GONE on A's agent); every
      other task ran exactly once;
    - every late report the agents got an answer to was refused: refusals
      logged by the agents == their late reports that reached a server, and no
      other report was refused;
    - all 32 replays of stale results are ABORTED, and at least one of them hit
      the task while its new attempt was RUNNING (the fencing token, not only
      the state, refused it);
    - the agents came back: ``a-stay`` re-registered on the restarted A and
      ``a-move`` failed over to B, each then running a task only it can run.
    """
    nats_url = require_nats()
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server is not installed")
    rport = free_port()
    redis = start_redis(rport, tmp_path)
    try:
        await wait_listening(rport)
        # Agents beat every 0.25 s and expire after 2 s of silence: generous, so a
        # busy machine never takes a live agent for a dead one.
        env = {"AGENTMESH_STORE": f"redis://127.0.0.1:{rport}/0", "AGENTMESH_BUS": nats_url,
               "AGENTMESH_KEY_PREFIX": unique_prefix("restart"),
               "AGENTMESH_HEARTBEAT_INTERVAL": "0.5", "AGENTMESH_HEARTBEAT_MISSES": "4"}
        a = await Server(env, log=tmp_path / "server-a.log").start()
        b = await Server(env, log=tmp_path / "server-b.log").start()
        procs += [a, b]
        async with grpc.aio.insecure_channel(b.address) as chb:
            await _scenario(tmp_path, procs, record_property, a, b,
                            task_pb2_grpc.TaskServiceStub(chb))
    finally:
        for proc in procs:  # before their Redis goes
            proc.stop()
        redis.kill()
        redis.wait(10)


async def _get(tb: task_pb2_grpc.TaskServiceStub, name: str) -> task_pb2.Task:
    return (await tb.GetTask(task_pb2.GetTaskRequest(name=name), timeout=10)).task


async def _states(tb: task_pb2_grpc.TaskServiceStub) -> Counter[str]:
    """Tasks of this run's (private) store by state name, from ListTasks."""
    out: Counter[str] = Counter()
    token = ""
    while True:
        page = await tb.ListTasks(task_pb2.ListTasksRequest(page_size=1000, page_token=token),
                                  timeout=10)
        out.update(task_pb2.TaskState.Name(t.state).removeprefix("TASK_STATE_")
                   for t in page.tasks)
        token = page.next_page_token
        if not token:
            return out


async def _ended(tb: task_pb2_grpc.TaskServiceStub, count: int) -> bool:
    """True when ``count`` tasks have ended."""
    by_state = await _states(tb)
    return sum(by_state[s] for s in ("SUCCEEDED", "FAILED", "CANCELLED",
                                     "DEAD_LETTERED")) >= count


async def _scenario(tmp_path: Path, procs: list[AgentProc | Server], record: Record,
                    a: Server, b: Server, tb: task_pb2_grpc.TaskServiceStub) -> None:
    client = Client([b.address])
    stay = AgentProc(tmp_path, "a-stay", [a.address], "rs,only-stay", work=WORK,
                     concurrency=SLOTS)
    move = AgentProc(tmp_path, "a-move", [a.address, b.address], "rs,only-move",
                     work=WORK, concurrency=SLOTS)
    keep = AgentProc(tmp_path, "b-keep", [b.address], "rs", work=WORK, concurrency=SLOTS)
    agents = [stay, move, keep]
    procs += agents
    await until(lambda: all(x.events("connected") for x in agents), what="agents up")
    assert stay.events("connected")[0]["target"] == a.address
    assert move.events("connected")[0]["target"] == a.address

    names = await submit_batch(b.address, "rs", TASKS, retry_policy=PY_RETRY)
    on_a = [stay, move]
    await until(lambda: all(len(x.events("start")) >= SLOTS for x in on_a),
                what="A's agents running a full batch")
    stopped_at = time.time()
    for x in on_a:
        x.signal(signal.SIGSTOP)
    starts = [e for x in on_a for e in x.events("start")]
    assert stopped_at < min(float(e["t"]) for e in starts) + WORK, (
        "precondition: A's agents were frozen before any handler could report")
    assert not [e for x in on_a for ev in REPORTS for e in x.events(ev)]
    killed = {str(e["task"]): int(e["token"]) for e in starts}
    assert len(killed) == 2 * SLOTS
    assert all(int(e["attempt"]) == 1 for e in starts)
    old_agents = {str(e["task"]): str(e["agent"]) for e in starts}

    # Opened before the kill; the first new attempt comes >= 2 s after it (expiry).
    watch = tb.WatchTasks(task_pb2.WatchTasksRequest(capability="rs"))
    replays: dict[str, tuple[grpc.StatusCode, bool]] = {}

    async def replay_on_new_attempt() -> None:
        """Replay a killed attempt's result as soon as its next attempt shows up."""
        async for ev in watch:
            t = ev.task
            if t.name not in killed or t.name in replays or t.attempt < 2:
                continue
            running = t.state == task_pb2.TASK_STATE_RUNNING
            code = await complete_with(b.address, t.name, killed[t.name], "stale")
            replays[t.name] = (code, running)
            if len(replays) == len(killed):
                return

    async def killed_attempts_ended() -> bool:
        for n in killed:
            if not (await _get(tb, n)).attempts[0].failure.error_type:
                return False
        return True

    try:
        async with asyncio.TaskGroup() as group:
            replayer = group.create_task(replay_on_new_attempt())
            killed_at = time.time()
            a.kill()
            await restart_server(a)
            restarted_at = time.time()
            await until(killed_attempts_ended, timeout=30,
                        what="the killed attempts' leases ended")
            requeued_at = time.time()
            for x in on_a:
                x.signal(signal.SIGCONT)
            await until(lambda: len(stay.events("connected")) >= 2
                        and len(move.events("connected")) >= 2, timeout=30,
                        what="A's agents back")
            await until(lambda: _ended(tb, TASKS), timeout=60, what="all tasks ended")
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(replayer)
            except TimeoutError:
                replayer.cancel()
    finally:
        watch.cancel()

    # Replays of every killed attempt's result: refused through B while the
    # new attempt ran, and through the restarted A after the end.
    assert set(replays) == set(killed), "a replay for every killed attempt"
    # ABORTED while the task is live under the new lease; FAILED_PRECONDITION once
    # it has ended (the replay can land after the new attempt's result).
    assert {code for code, _ in replays.values()} <= {grpc.StatusCode.ABORTED,
                                                      grpc.StatusCode.FAILED_PRECONDITION}
    hits = sum(hit for _, hit in replays.values())
    assert hits >= 1, "at least one replay met the new attempt RUNNING"
    for n, token in killed.items():
        assert await complete_with(a.address, n, token, "stale") == \
            grpc.StatusCode.FAILED_PRECONDITION, "the task has ended: not running"

    # The agents came back: on the restarted A, and on B by failover; each then
    # runs a task that only it can run.
    assert stay.events("connected")[1]["target"] == a.address
    assert move.events("connected")[1]["target"] == b.address
    extra = [await client.submit("only-stay", retry_policy=PY_RETRY),
             await client.submit("only-move", retry_policy=PY_RETRY)]
    await until(lambda: _ended(tb, TASKS + 2), timeout=30, what="post-restart tasks")
    assert [e["task"] for e in stay.events("accepted")
            if e["agent"] == _agent_ids(stay)[1] and e["task"] == extra[0]] == [extra[0]]
    assert [e["task"] for e in move.events("accepted")
            if e["agent"] == _agent_ids(move)[1] and e["task"] == extra[1]] == [extra[1]]

    # Nothing lost, exactly one accepted result per task (no allowance).
    every = names + extra
    await assert_invariants(client, every, agents)
    accepted = Counter(str(e["task"]) for x in agents for e in x.events("accepted"))
    assert accepted == Counter(every), "each task has exactly one accepted result"
    assert await _states(tb) == Counter({"SUCCEEDED": len(every)})
    stats = await tb.GetStats(task_pb2.GetStatsRequest(), timeout=10)
    assert (dict(stats.tasks_by_state), stats.tasks_ended) == (
        {"SUCCEEDED": len(every)}, len(every)), f"GetStats disagrees with the tasks: {stats}"

    # Each killed attempt ran again exactly once; every other task ran once; each
    # output is the one of the agent whose result was accepted.
    by = {str(e["task"]): x.name for x in agents for e in x.events("accepted")}
    for n in names:
        t = await _get(tb, n)
        if n in killed:
            assert t.attempt == 2, (n, t.attempt)
            assert t.attempts[0].agent == old_agents[n]
            assert t.attempts[0].failure.error_type == "AGENT_GONE", t.attempts[0]
            assert not t.attempts[1].HasField("failure")
        else:
            assert t.attempt == 1, (n, t.attempt)
        assert json.loads(t.output.data) == {"by": by[n]}, (n, t.output.data)
    zombie_accepted = [e for x in on_a for e in x.events("accepted")
                       if killed.get(str(e["task"])) == int(e["token"])]
    assert not zombie_accepted, f"a killed attempt's late result was accepted: {zombie_accepted}"

    # The zombies' own late reports: refused whenever they reached a server.
    late = [e for x in on_a for ev in ("refused", "report_error") for e in x.events(ev)
            if killed.get(str(e["task"])) == int(e["token"])]
    assert len({(e["task"], e["token"]) for e in late}) == len(late), "one report each"
    answered = [e for e in late if e["ev"] == "refused"]
    unanswered = [e for e in late if e["ev"] == "report_error"]
    assert all("UNAVAILABLE" in str(e["code"]) or "DEADLINE" in str(e["code"])
               for e in unanswered), unanswered
    refused = [e for x in agents for e in x.events("refused")]
    assert len(refused) == len(answered), "only killed attempts' results were refused"
    assert not [e for x in agents for e in x.events("report_error")
                if killed.get(str(e["task"])) != int(e["token"])]
    assert not [e for x in agents for e in x.events("failed")]


    print(f"\nkilled attempts: {len(killed)}; their late reports: {len(answered)} refused, "
          f"{len(unanswered)} found no server; replays refused: {len(replays)} "
          f"({hits} while the new attempt ran); restart {restarted_at - killed_at:.2f} s, "
          f"leases ended {requeued_at - killed_at:.2f} s after the kill")
    record("restart_s", round(restarted_at - killed_at, 3))
    record("killed_leases_ended_s", round(requeued_at - killed_at, 3))
    record("late_results_refused", len(answered))

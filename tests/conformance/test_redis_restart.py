"""The Redis stores survive a crash of Redis: nothing acknowledged is lost.

Runs a PRIVATE redis-server (AOF, ``appendfsync always``) on a free port in a
temp dir, kills it with SIGKILL, restarts it on the same port and dir, and
checks that every task is still there and that the client reconnects on its
own. The shared Redis on 6379 is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from server.backends.redis import RedisStores
from server.domain.errors import StaleLeaseError
from server.domain.models import Agent, Payload, Task, TaskFailure, TaskState
from server.ports import FailVerdict
from tests._services import free_port, unique_prefix

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HAVE_REDIS_SERVER = Path(REDIS_SERVER).exists()
NS = "ns1"
T0 = 1_000.0

pytestmark = pytest.mark.slow


class PrivateRedis:
    """A redis-server child process with AOF persistence in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        async with asyncio.timeout(10):
            while True:
                probe = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.2)
                try:
                    if await probe.ping():
                        return
                except RedisConnectionError:
                    await asyncio.sleep(0.02)
                finally:
                    await probe.aclose()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.proc = None

    async def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            self.proc = None


async def test_nothing_lost_after_sigkill_and_client_recovers(
        private_redis: PrivateRedis) -> None:
    stores = await RedisStores.connect(private_redis.url, prefix=unique_prefix("restart"))
    try:
        tasks = stores.tasks
        for i in range(10):
            await tasks.create_task(Task(id=f"t{i}", capability="cap", namespace=NS,
                                         priority=i % 3, input=Payload(f"in{i}".encode())),
                                    request_id=f"req-{i}")
        for i in (*range(4), "new", "x"):
            await stores.agents.register(Agent(id=f"agent-{i}", display_name="a", namespace=NS,
                                               expire_time=T0 + 3600))
        leases = []
        for i in range(4):
            lease = await tasks.lease_next(NS, ["cap"], f"agent-{i}", now=T0,
                                           default_timeout=30)
            assert lease is not None
            leases.append(lease)
        await tasks.complete(leases[0].task.id, leases[0].fencing_token, Payload(b"done"),
                             now=T0 + 1)
        # a zombie: its lease is requeued and taken by someone else
        zombie = leases[1]
        await tasks.fail(zombie.task.id, zombie.fencing_token, TaskFailure("LEASE_EXPIRED"),
                         verdict=FailVerdict.RETRY, retry_at=T0 + 2, now=T0 + 2)
        fresh = await tasks.lease_next(NS, ["cap"], "agent-new", now=T0 + 3, default_timeout=30)
        assert fresh is not None and fresh.task.id == zombie.task.id
        await stores.state.put(NS, "k", Payload(b"v"), expected_version=0, ttl=0, now=T0)
        before = {f"t{i}": await tasks.get_task(f"t{i}") for i in range(10)}
        stats_before = await tasks.stats(NS)

        await private_redis.kill()
        # a call made while Redis is down waits for it (client retry with backoff)
        pending = asyncio.ensure_future(tasks.get_task("t0"))
        await asyncio.sleep(0.05)
        assert not pending.done()
        await private_redis.start()
        async with asyncio.timeout(20):
            assert await pending == before["t0"]

        after = {f"t{i}": await tasks.get_task(f"t{i}") for i in range(10)}
        assert after == before
        assert await tasks.stats(NS) == stats_before
        by_state = {s: sum(1 for t in after.values() if t and t.state is s) for s in TaskState}
        assert by_state[TaskState.SUCCEEDED] == 1 and by_state[TaskState.RUNNING] == 3
        assert by_state[TaskState.QUEUED] == 6
        entry = await stores.state.get(NS, "k", now=T0)
        assert entry is not None and entry.value == Payload(b"v")
        # idempotency survived
        _, created, _ = await tasks.create_task(Task(id="dup", capability="cap", namespace=NS),
                                                request_id="req-3")
        assert not created
        # fencing survived: the zombie's token is still refused, the new one accepted
        with pytest.raises(StaleLeaseError):
            await tasks.complete(zombie.task.id, zombie.fencing_token, Payload(b"z"), now=T0 + 4)
        await tasks.complete(fresh.task.id, fresh.fencing_token, Payload(b"ok"), now=T0 + 4)
        # the queue order survived too
        nxt = await tasks.lease_next(NS, ["cap"], "agent-x", now=T0 + 5, default_timeout=30)
        assert nxt is not None
        queued = [t for t in before.values() if t is not None and t.state is TaskState.QUEUED]
        best = min(queued, key=lambda t: (-t.priority, t.seq))
        assert nxt.task.id == best.id
    finally:
        await stores.aclose()


async def test_redis_down_is_unavailable_not_internal(private_redis: PrivateRedis) -> None:
    """Once the client's retries are spent, a store call with Redis down raises
    UnavailableError (UNAVAILABLE to clients, so they retry or fail over); it used
    to raise redis' ConnectionError, which reached clients as INTERNAL."""
    from server.domain.errors import UnavailableError  # noqa: PLC0415

    stores = await RedisStores.connect(private_redis.url, prefix=unique_prefix("down"),
                                       retries=1, socket_timeout=0.5)
    try:
        await stores.tasks.create_task(Task(id="t1", capability="cap", namespace=NS,
                                            create_time=T0, update_time=T0))
        await private_redis.kill()
        with pytest.raises(UnavailableError) as err:
            await stores.tasks.get_task("t1")
        assert err.value.reason == "STORE_UNAVAILABLE"
        await private_redis.start()  # and it recovers on its own
        got = await stores.tasks.get_task("t1")
        assert got is not None and got.id == "t1"
    finally:
        await stores.aclose()


async def test_redis_down_under_wait_durability_is_unavailable(
        private_redis: PrivateRedis) -> None:
    """The same through the FCALL + WAIT pipeline of ``durability=replicas:1``."""
    from server.domain.errors import UnavailableError  # noqa: PLC0415

    stores = await RedisStores.connect(private_redis.url, prefix=unique_prefix("down-wait"),
                                       retries=1, socket_timeout=0.5, durability="replicas:1")
    try:
        await private_redis.kill()
        with pytest.raises(UnavailableError) as err:
            await stores.tasks.create_task(Task(id="t1", capability="cap", namespace=NS,
                                                create_time=T0, update_time=T0))
        assert err.value.reason == "STORE_UNAVAILABLE"
    finally:
        await stores.aclose()


"""The Redis stores on a real Redis Cluster (3 primaries, 1 replica each).

The task, agent and state conformance suites run on the cluster too (their
``redis-cluster`` parameter); this file holds what is proper to a cluster:

- every Function call declares keys of exactly one slot, the deployment's
  (a spy on the client's routing records every FCALL/FCALL_RO of a workload);
- Redis itself refuses a script that touches a key outside its declared slot
  (so the conformance suites running on the cluster check every op they reach);
- the Lua sources derive every key from ``KEYS[1]`` (static check);
- the libraries are on every primary and replica, and come back on a primary
  that lost them;
- the URL form, and the durability setting (WAIT) on the cluster.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, ResponseError

from server.backends.redis import RedisStores, parse_durability
from server.backends.redis._client import FunctionCluster, open_client, parse_cluster_url
from server.backends.redis._durability import Durability
from server.backends.redis._scripts import library_code
from server.domain.errors import UnavailableError
from server.domain.models import Agent, Payload, Task, TaskFailure
from server.ports import FailVerdict, TaskFilter
from tests._services import redis_stores, require_redis
from tests.clusters import RedisCluster

NS = "ns1"
T0 = 1_000.0
LUA_DIR = Path(__file__).resolve().parents[2] / "server" / "backends" / "redis"
STEMS = ("tasks", "agents", "state")


@pytest.fixture
async def cluster_stores(shared_redis_cluster: RedisCluster) -> AsyncIterator[RedisStores]:
    async with redis_stores("cluster", shared_redis_cluster.url) as stores:
        yield stores


async def _workload(stores: RedisStores) -> None:
    """Every kind of store call once or more: tasks, agents, state, locks."""
    await stores.agents.register(Agent(id="a1", display_name="a1", namespace=NS,
                                       expire_time=4e9))
    await stores.agents.heartbeat("a1", in_flight=0, load=0.0, now=T0, expire_time=4e9)
    for i in range(4):
        await stores.tasks.create_task(Task(id=f"t{i}", capability="cap", namespace=NS),
                                       request_id=f"r{i}")
    first = await stores.tasks.lease_next(NS, ["cap"], "a1", now=T0, default_timeout=30)
    second = await stores.tasks.lease_next(NS, ["cap"], "a1", now=T0, default_timeout=30)
    assert first is not None and second is not None
    await stores.tasks.complete(first.task.id, first.fencing_token, Payload(b"ok"), now=T0)
    await stores.tasks.fail(second.task.id, second.fencing_token, TaskFailure("X"),
                            verdict=FailVerdict.RETRY, retry_at=T0 + 1, now=T0)
    await stores.tasks.promote_due(T0 + 2, 10)
    await stores.tasks.get_tasks(["t0", "t1", "t2"])
    await stores.tasks.list_tasks(TaskFilter(NS), before_seq=2**62, limit=10)
    await stores.tasks.stats(NS)
    await stores.state.put(NS, "k", Payload(b"v"), expected_version=0, ttl=0, now=T0)
    await stores.state.get(NS, "k", now=T0)
    await stores.state.events_since(NS, "", 0, 10)
    grant = await stores.state.acquire_lock(NS, "job", "owner", agent_id="", ttl=10, now=T0)
    await stores.state.release_lock(NS, "job", grant.fencing_token, now=T0)


async def test_every_function_call_lands_on_the_deployment_slot(
        cluster_stores: RedisStores, monkeypatch: pytest.MonkeyPatch) -> None:
    client = cluster_stores.client
    assert isinstance(client, FunctionCluster)
    calls: list[tuple[str, tuple[Any, ...], int]] = []
    routed = FunctionCluster._determine_slot

    async def spy(self: FunctionCluster, command: str, *args: Any) -> int:
        slot = await routed(self, command, *args)
        calls.append((command.upper(), args, slot))
        return slot

    monkeypatch.setattr(FunctionCluster, "_determine_slot", spy)
    await _workload(cluster_stores)
    fcalls = [c for c in calls if c[0] in ("FCALL", "FCALL_RO")]
    names = {str(args[0]) for _, args, _ in fcalls}
    assert {library_code(stem)[0] for stem in STEMS} <= {n.removesuffix("_ro") for n in names}
    home = client.keyslot("{" + cluster_stores.prefix + "}")
    for command, args, slot in fcalls:
        keys = args[2:2 + int(args[1])]
        assert keys == ("{" + cluster_stores.prefix + "}",), (command, args[:4])
        assert slot == home
    # the plain reads (GET, MGET, HGETALL) go to the same slot
    assert {slot for cmd, _, slot in calls if cmd not in ("FCALL", "FCALL_RO")} <= {home}


async def test_redis_refuses_a_script_touching_another_slot(
        cluster_stores: RedisStores) -> None:
    """The check the conformance suites rely on: Redis Cluster errors on a key
    outside the declared slot, so a key not derived from KEYS[1] cannot pass."""
    client = cluster_stores.client
    assert isinstance(client, FunctionCluster)
    await client.function_load(
        "#!lua name=amtest_stray\nredis.register_function('amtest_stray', "
        "function(keys, args) return redis.call('SET', args[1], 'x') end)", replace=True)
    base = "{" + cluster_stores.prefix + "}"
    assert await client.fcall("amtest_stray", 1, base, base + ":fine") == "OK"
    home = client.keyslot(base)
    stray = next(k for k in (f"stray{i}" for i in range(100_000))
                 if client.keyslot(k) != home and client.slot_primary(k).name
                 == client.slot_primary(base).name)
    with pytest.raises(ResponseError, match="same slot"):
        await client.fcall("amtest_stray", 1, base, stray)
    await client.function_delete("amtest_stray")
    await client.delete(base + ":fine")


async def test_the_client_refuses_a_call_whose_keys_span_slots(
        cluster_stores: RedisStores) -> None:
    client = cluster_stores.client
    name = cluster_stores.tasks.library.name
    with pytest.raises(RedisClusterException, match="exactly one slot"):
        await client.fcall(name, 2, "{a}", "{b}", "stats", NS)


@pytest.mark.parametrize("stem", STEMS)
def test_lua_derives_every_key_from_keys_1(stem: str) -> None:
    """Static check of the sources: the hash tag only ever comes from KEYS[1].

    - ``keys[1]`` is the only key argument read, and only into ``B``;
    - no string literal carries a hash tag of its own (``{``, JSON fragments aside);
    - no ``redis.call`` names a key by a literal or by an argument (ARGV);
    - every base a key is built on (``X = B .. ':...'``) starts from ``B``.
    """
    code = "\n".join(line.split("--", 1)[0]
                     for line in (LUA_DIR / f"{stem}.lua").read_text().splitlines())
    assert "KEYS[" not in code
    assert set(re.findall(r"keys\[(\d+)\]", code)) == {"1"}
    for assignment in re.findall(r"([\w, ]+)=\s*([^\n]*keys\[1\][^\n]*)", code):
        targets = [t.strip() for t in assignment[0].split(",")]
        values = [v.strip() for v in assignment[1].split(",")]
        assert values[targets.index("B")] == "keys[1]", assignment
    literals = re.findall(r"'([^'\n]*)'", code)  # JSON fragments are the only '{' ones
    assert not [text for text in literals if "{" in text and '"' not in text]
    for call in re.findall(r"redis\.p?call\('(\w+)',\s*([^,)]+)", code):
        _command, first = call
        assert not first.startswith(("'", '"', "ARGV", "args")), call
    for name, expr in re.findall(r"\b(\w+)\s*=\s*(\w+)\s*\.\.\s*'", code):
        assert expr in ("B", "S", "s"), (name, expr)


async def test_libraries_are_on_every_node_and_come_back(
        shared_redis_cluster: RedisCluster, cluster_stores: RedisStores) -> None:
    names = {library_code(stem)[0] for stem in STEMS}

    def loaded(port: int) -> set[str]:
        with shared_redis_cluster._node(port).client() as c:
            listed = [dict(zip(lib[::2], lib[1::2], strict=True)) for lib in c.function_list()]
            return {str(lib["library_name"]) for lib in listed} & names

    topo = shared_redis_cluster.topology()
    every = [a for p, reps in topo.items() for a in (p, *reps)]
    assert len(every) == 6
    assert all(loaded(int(a.rsplit(":", 1)[1])) == names for a in every)
    # A primary that lost them (FUNCTION FLUSH replicates to its replica) gets
    # them back at the next call: "Function not found" -> load on every primary.
    home = shared_redis_cluster.primary_of("{" + cluster_stores.prefix + "}")
    with home.client() as c:
        c.function_flush()
    assert loaded(home.port) == set()
    await cluster_stores.tasks.create_task(Task(id="after", capability="c", namespace=NS))
    await cluster_stores.agents.register(Agent(id="a", display_name="a", namespace=NS,
                                               expire_time=4e9))
    await cluster_stores.state.put(NS, "k", Payload(b"v"), expected_version=None, ttl=0,
                                   now=T0)
    assert all(loaded(int(a.rsplit(":", 1)[1])) == names
               for a in shared_redis_cluster.topology()[home.address] + [home.address])


def test_cluster_url_forms() -> None:
    parsed = parse_cluster_url("redis+cluster://u:p%40ss@10.0.0.1:7000,redis-1:7001/")
    assert parsed.seeds == (("10.0.0.1", 7000), ("redis-1", 7001))
    assert (parsed.username, parsed.password, parsed.tls) == ("u", "p@ss", False)
    assert parse_cluster_url("rediss+cluster://h:1").tls
    for bad in ("redis://h:1", "redis+cluster://h", "redis+cluster://h:1/3",
                "redis+cluster://h:1,h2:x", "redis+cluster://h:1?db=2"):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)


def test_durability_forms() -> None:
    assert parse_durability("none") == Durability(0)
    assert parse_durability("replicas:2", 0.5) == Durability(2, 0.5)
    auto = parse_durability("AUTO")
    assert auto.auto and auto.resolve(1) == Durability(1) and auto.resolve(0) == Durability(0)
    assert auto.resolve(3) == Durability(1)
    for bad in ("", "all", "replicas:0", "replicas:6", "replicas:x"):
        with pytest.raises(ValueError):
            parse_durability(bad)
    with pytest.raises(ValueError):
        parse_durability("none", timeout=0)


async def test_auto_durability_follows_the_primary_replicas(
        shared_redis_cluster: RedisCluster) -> None:
    async with redis_stores("dur-auto", shared_redis_cluster.url) as on_cluster:
        assert on_cluster.durability == Durability(1)
    async with redis_stores("dur-auto") as single:  # the shared Redis has no replica
        assert single.durability == Durability(0)


async def test_a_write_fewer_replicas_confirm_is_unavailable(
        shared_redis_cluster: RedisCluster) -> None:
    """WAIT 2 with one replica: the write is applied on the primary, the caller is
    told UNAVAILABLE (it may or may not survive a failover), a retry is harmless."""
    async with redis_stores("dur-2", shared_redis_cluster.url,
                            durability=Durability(2, timeout=0.2)) as stores:
        task = Task(id="t", capability="cap", namespace=NS)
        with pytest.raises(UnavailableError, match="1 of 2 replicas"):
            await stores.tasks.create_task(task, request_id="req")
        assert await stores.tasks.get_task("t") is not None  # reads never wait
        with pytest.raises(UnavailableError):  # the retry finds its own write
            await stores.tasks.create_task(task, request_id="req")
    url = require_redis()
    async with redis_stores("dur-single", url, durability=Durability(1, 0.05)) as single:
        with pytest.raises(UnavailableError, match="0 of 1"):
            await single.tasks.create_task(task)


async def test_durable_calls_raise_the_call_errors_unchanged(
        shared_redis_cluster: RedisCluster) -> None:
    """A Lua error in a WAITed pipeline reads exactly as without WAIT (the stores
    parse these messages)."""
    messages = []
    for durability in ("none", "replicas:1"):
        async with redis_stores("dur-err", shared_redis_cluster.url,
                                durability=durability) as stores:
            with pytest.raises(ResponseError) as raised:
                await stores.tasks.library.call(["{" + stores.prefix + "}"], ["no-such-op"])
            messages.append(str(raised.value))
    assert messages[0] == messages[1] and "unknown task op" in messages[0]


async def test_open_client_single_server_is_plain_redis() -> None:
    client = open_client(require_redis())
    try:
        assert isinstance(client, aioredis.Redis) and await client.ping()
    finally:
        await client.aclose()

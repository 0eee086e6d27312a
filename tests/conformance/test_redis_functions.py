"""The Redis stores' Lua libraries run as Redis Functions, and write counters once per call.

- Library names carry a hash of the code; ``connect`` loads the libraries and
  refuses a Redis older than 7.0.
- One library serves every key prefix and outlives each call: nothing of one
  call (base key, task cache, counters read) may leak into the next.
- A library that disappears (FUNCTION DELETE / FLUSH here; a Redis restarted
  without persistence answers the same) is loaded again by the next call,
  which succeeds.
- ``put_task`` adds counter changes up and writes them at the end of the call:
  the queue bound and the concurrency limits must still see every change made
  earlier in the same call (checked against the in-memory store), and the
  counters must equal a recount of the task documents.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ResponseError

from server.backends.memory import InMemoryAgentRegistry, InMemoryStateStore, InMemoryTaskStore
from server.backends.redis import RedisStores, RedisTaskStore, RedisVersionError
from server.backends.redis._scripts import Library, build_library, check_version, library_code
from server.domain.errors import AgentMeshError, NotFoundError, OutOfRangeError
from server.domain.limits import DispatchLimits
from server.domain.models import (
    TERMINAL_TASK_STATES,
    Agent,
    AgentState,
    Capability,
    Payload,
    Stats,
    Task,
    TaskFailure,
    TaskState,
    Workflow,
    WorkflowStep,
)
from server.ports import AgentFilter, FailVerdict, TaskFilter
from tests._services import redis_stores, require_redis, unique_prefix
from tests.conformance.conftest import live_agents, memory_stores
from tests.conformance.test_redis_restart import PrivateRedis

NS = "fn-ns"
T0 = 1_000.0
STEMS = ("tasks", "agents", "state", "chunks")
LIVE = (TaskState.PENDING, TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING)


def mk(task_id: str, cap: str = "cap", *, priority: int = 0, **kw: Any) -> Task:
    """A fresh task as the service would build it."""
    return Task(id=task_id, capability=cap, namespace=NS, priority=priority,
                input=Payload(b"in-" + task_id.encode()), create_time=T0, update_time=T0, **kw)


# -- names, loading, versions ------------------------------------------------------------


def test_library_names_carry_a_hash_of_the_code() -> None:
    for stem in STEMS:
        name, code = library_code(stem)
        assert re.fullmatch(rf"agentmesh_{stem}_[0-9a-f]{{12}}", name)
        assert code.startswith(f"#!lua name={name}\n")
        assert f"function_name = '{name}'" in code and f"function_name = '{name}_ro'" in code
    assert len({library_code(s)[0] for s in STEMS}) == len(STEMS)
    source = "#!lua name=agentmesh_tasks\nlocal function call() end\nlocal call_ro = call\n"
    same, _ = build_library("tasks", source)
    changed, _ = build_library("tasks", source + "-- one more line\n")
    assert same == build_library("tasks", source)[0] and changed != same
    with pytest.raises(ValueError, match="must start with"):
        build_library("tasks", "-- no header\n")


def test_redis_before_7_is_refused() -> None:
    for ok in ("7.0.0", "7.0.15", "7.2.4", "8.0.2", "10.1.0"):
        check_version(ok)
    for old in ("6.2.14", "6.0.0", "5.0.7", "", "unknown"):
        with pytest.raises(RedisVersionError, match=r"Redis >= 7\.0") as err:
            check_version(old)
        assert err.value.version == old


async def test_connect_refuses_an_old_server(monkeypatch: pytest.MonkeyPatch) -> None:
    url = require_redis()

    async def old_info(self: object, section: str | None = None, *args: object) -> dict[str, str]:
        return {"redis_version": "6.2.14"}

    monkeypatch.setattr("redis.asyncio.Redis.info", old_info)
    with pytest.raises(RedisVersionError, match=r"needs Redis >= 7\.0.*runs 6\.2\.14"):
        await RedisStores.connect(url, prefix=unique_prefix("fn-old"))


async def test_a_server_without_functions_gives_the_version_error() -> None:
    """A store built on a client by hand meets an old server at its first call."""

    class OldServer:
        async def fcall(self, *args: object) -> object:
            raise ResponseError("unknown command 'FCALL', with args beginning with: ")

        async def function_load(self, *args: object, **kw: object) -> object:
            raise ResponseError("unknown command 'FUNCTION', with args beginning with: ")

    lib = Library(OldServer(), "tasks")  # type: ignore[arg-type]
    with pytest.raises(RedisVersionError):
        await lib.call(["{x}"], ["leases_of", "a"])
    with pytest.raises(RedisVersionError):
        await lib.load()


async def test_connect_loads_the_libraries_and_reads_use_fcall_ro() -> None:
    async with redis_stores("fn-load") as stores:
        for stem in STEMS:
            name = library_code(stem)[0]
            listed = [_pairs(lib) for lib in await stores.client.function_list(library=name)]
            assert [lib["library_name"] for lib in listed] == [name]
            functions = {f["name"]: f["flags"] for f in map(_pairs, listed[0]["functions"])}
            assert functions == {name: [], name + "_ro": ["no-writes"]}
        # the read-only entry point refuses the ops that write
        with pytest.raises(ResponseError, match="not a read-only task op"):
            await stores.tasks.library.call_ro(["{" + stores.prefix + "}"],
                                               ["renew_lease", "x", "1", "2.0"])
        await stores.tasks.create_task(mk("r1"))
        listed_tasks = await stores.tasks.list_tasks(TaskFilter(NS), before_seq=0, limit=10)
        assert [t.id for t in listed_tasks] == ["r1"]


def _pairs(flat: list[Any]) -> dict[str, Any]:
    """A RESP2 map reply (flat key, value list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


# -- one library, many prefixes, many calls ----------------------------------------------


async def test_nothing_of_a_call_leaks_into_the_next() -> None:
    """Two deployments (prefixes) on one Redis run the same library, with the same task ids."""
    async with redis_stores("fn-a") as sa, redis_stores("fn-b") as sb:
        a, b = sa.tasks, sb.tasks
        for s in (sa, sb):
            await live_agents(s.agents, "ag", namespace=NS)
        limits = DispatchLimits(capability_limits={"cap": 1})
        _, created, tr = await a.create_task(mk("same", labels={"k": "v"}))
        assert created and tr.tasks[0].previous_state is None
        # The same id under the other prefix is a new task (no "previous" version).
        _, created, tr = await b.create_task(mk("same", cap="other"))
        assert created and tr.tasks[0].previous_state is None
        got = await b.get_task("same")
        assert got is not None and got.capability == "other"
        lease = await a.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30, limits=limits)
        assert lease is not None and lease.task.capability == "cap"
        # a's RUNNING count for "cap" is 1 (its limit): b, with none, still leases
        await b.create_task(mk("b2"))
        lb = await b.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30, limits=limits)
        assert lb is not None and lb.task.id == "b2"
        assert await a.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30,
                                  limits=limits) is None
        await a.complete("same", lease.fencing_token, Payload(b"a"), now=T0)
        # b's "same" was never leased: completing it is refused, and it stays QUEUED
        with pytest.raises(AgentMeshError):
            await b.complete("same", lease.fencing_token, Payload(b"b"), now=T0)
        got = await b.get_task("same")
        assert got is not None and got.state is TaskState.QUEUED
        assert await a.stats(NS) == Stats({TaskState.SUCCEEDED: 1}, 1, 1, {})
        assert await b.stats(NS) == Stats(
            {TaskState.QUEUED: 1, TaskState.RUNNING: 1}, 0, 0,
            {("other", TaskState.QUEUED): 1, ("cap", TaskState.RUNNING): 1})
        # a's done: the next call on a leases nothing, on b it leases "same" (cap "other")
        lo = await b.lease_next(NS, ["other"], "ag", now=T0, default_timeout=30)
        assert lo is not None and lo.task.id == "same" and lo.task.capability == "other"
        for store in (a, b):
            await _assert_counters_match_tasks(store, NS)


# -- reload when Redis lost the library ------------------------------------------------


@pytest.mark.slow
async def test_a_lost_library_is_loaded_again(private_redis: PrivateRedis) -> None:
    stores = await RedisStores.connect(private_redis.url, prefix=unique_prefix("fn-reload"))
    try:
        r, tasks = stores.client, stores.tasks
        await tasks.create_tasks([(mk(f"t{i}"), f"req-{i}") for i in range(6)])
        await live_agents(stores.agents, "ag", *(f"ag{i}" for i in range(5)), namespace=NS)
        first = await tasks.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30)
        assert first is not None and first.task.id == "t0"
        await stores.state.put(NS, "k", Payload(b"v"), expected_version=0, ttl=0, now=T0)
        await stores.agents.register(Agent(id="a1", display_name="a1", namespace=NS,
                                           capabilities=(Capability("cap"),)))
        before = await tasks.get_tasks([f"t{i}" for i in range(6)])
        stats = await tasks.stats(NS)

        # One library deleted: its next call loads it again and succeeds.
        await r.function_delete(tasks.library.name)
        assert await r.function_list(library=tasks.library.name) == []
        await tasks.complete("t0", first.fencing_token, Payload(b"done"), now=T0)
        assert len(await r.function_list(library=tasks.library.name)) == 1
        assert await tasks.get_tasks([f"t{i}" for i in range(1, 6)]) == before[1:]

        # Everything flushed, then many calls at once: each succeeds, one load per library.
        await r.function_flush()
        loads = {stem: lib._loads for stem, lib in _libraries(stores).items()}
        leases = await asyncio.gather(*(
            tasks.lease_next(NS, ["cap"], f"ag{i}", now=T0, default_timeout=30)
            for i in range(5)))
        assert sorted(x.task.id for x in leases if x is not None) == ["t1", "t2", "t3", "t4",
                                                                    "t5"]
        assert _libraries(stores)["tasks"]._loads == loads["tasks"] + 1
        # the read-only entry point (FCALL_RO) and the other libraries reload too
        await r.function_flush()
        assert len(await tasks.list_tasks(TaskFilter(NS), before_seq=0, limit=10)) == 6
        entry = await stores.state.get(NS, "k", now=T0)
        assert entry is not None and entry.value == Payload(b"v")
        agent = await stores.agents.heartbeat("a1", in_flight=0, load=0.0, now=T0,
                                              expire_time=T0 + 10)
        assert agent is not None and agent.expire_time == T0 + 10
        # nothing was lost: idempotency, counters, fencing
        _, created, _ = await tasks.create_task(mk("again"), request_id="req-3")
        assert not created
        after = await tasks.stats(NS)
        assert after.tasks_by_state == {TaskState.RUNNING: 5, TaskState.SUCCEEDED: 1}
        assert sum(stats.tasks_by_state.values()) == sum(after.tasks_by_state.values())
        await _assert_counters_match_tasks(tasks, NS)
        # a call that fails for another reason is not retried: errors pass through
        with pytest.raises(NotFoundError):
            await tasks.renew_lease("missing", 1, T0 + 5)
    finally:
        await stores.aclose()


def _libraries(stores: RedisStores) -> dict[str, Library]:
    return {"tasks": stores.tasks.library, "agents": stores.agents.library,
            "state": stores.state.library}


# -- counters written once per call -------------------------------------------------------


@pytest.fixture
async def pair() -> AsyncIterator[tuple[InMemoryTaskStore, RedisTaskStore]]:
    """The reference in-memory store and a Redis store under a fresh prefix, both
    with the live agent "ag"."""
    mem, registry = memory_stores()
    async with redis_stores("fn-diff") as stores:
        for reg in (registry, stores.agents):
            await live_agents(reg, "ag", namespace=NS)
        yield mem, stores.tasks
    await mem.aclose()


async def test_limits_count_the_leases_of_the_same_batch(
        pair: tuple[InMemoryTaskStore, RedisTaskStore]) -> None:
    mem, red = pair
    cap_limit = DispatchLimits(capability_limits={"cap": 2})
    key_limit = DispatchLimits(key_label="tenant", key_limits={"a": 1}, default_key_limit=2)
    tenants = ["a", "a", "b", "b", "b", "a", "c", "c", "c"]
    for store in (mem, red):
        await store.create_tasks([(mk(f"c{i}"), "") for i in range(5)])
        await store.create_tasks([(mk(f"k{i}", "keyed", labels={"tenant": t}), "")
                                  for i, t in enumerate(tenants)])
    for _ in range(2):
        got = []
        for store in (mem, red):
            by_cap = await store.lease_batch(NS, ["cap"], "ag", now=T0, default_timeout=30,
                                             count=5, limits=cap_limit)
            by_key = await store.lease_batch(NS, ["keyed"], "ag", now=T0, default_timeout=30,
                                             count=9, limits=key_limit)
            got.append(([x.task.id for x in by_cap], [x.task.id for x in by_key]))
            # free one slot of each kind: the next batch takes exactly that much
            done = [(by_cap[0].task.id, by_cap[0].fencing_token, Payload(b"")),
                    (by_key[0].task.id, by_key[0].fencing_token, Payload(b""))] \
                if by_cap and by_key else []
            await store.complete_many(done, now=T0)
        assert got[0] == got[1]
    assert got[0][0] == ["c2"]  # the second round: one slot freed under the limit of 2
    assert await mem.stats(NS) == await red.stats(NS)
    await _assert_counters_match_tasks(red, NS)


async def test_queue_bound_counts_the_tasks_of_the_same_call(
        pair: tuple[InMemoryTaskStore, RedisTaskStore]) -> None:
    mem, red = pair
    wf = Workflow(id="wf", namespace=NS, steps=(WorkflowStep("a", "cap"),
                                                WorkflowStep("b", "cap", depends_on=("a",))),
                  step_tasks={"a": "wf-a", "b": "wf-b"}, create_time=T0)
    steps = [mk("wf-a", workflow_id="wf", step_id="a"),
             mk("wf-b", workflow_id="wf", step_id="b", depends_on=("a",))]
    for store in (mem, red):
        await store.create_workflow(wf, steps)  # one QUEUED, one PENDING
        await store.create_task(mk("r"))
        lease = await store.lease_next(NS, ["cap"], "ag", now=T0, default_timeout=30)
        assert lease is not None and lease.task.id == "wf-a"
        await store.fail("wf-a", lease.fencing_token, TaskFailure("E"),
                         verdict=FailVerdict.RETRY, retry_at=T0 + 5, now=T0)  # RETRYING
    # backlog 3 (RETRYING, PENDING, QUEUED): a batch of 6 under a bound of 7 stops at 4
    results = []
    for store in (mem, red):
        created, full = await store.create_tasks(
            [(mk(f"n{i}"), f"rid-{i % 5}") for i in range(6)], max_queued=7)
        results.append(([(t.id, new) for t, new, _ in created], full))
    assert results[0] == results[1]
    assert results[1] == ([(f"n{i}", True) for i in range(4)], True)
    assert await mem.stats(NS) == await red.stats(NS)
    await _assert_counters_match_tasks(red, NS)


async def test_a_call_failing_half_way_keeps_its_counters(
        pair: tuple[InMemoryTaskStore, RedisTaskStore]) -> None:
    """A call's writes are not rolled back when it fails: its counters are written too."""
    _, red = pair
    await red.create_tasks([(mk(f"h{i}", labels={"tenant": "a"}), "") for i in range(3)])
    leases = await red.lease_batch(NS, ["cap"], "ag", now=T0, default_timeout=30, count=3)
    assert len(leases) == 3
    await red._r.set(red._key("task", "broken"), "not json")
    items = [(x.task.id, x.fencing_token, Payload(b"ok")) for x in leases]
    with pytest.raises(ResponseError):
        await red.complete_many([items[0], ("broken", 1, Payload(b"")), items[1]], now=T0)
    await red._r.delete(red._key("task", "broken"))
    states = [t.state if t else None for t in await red.get_tasks([x[0] for x in items])]
    assert states == [TaskState.SUCCEEDED, TaskState.RUNNING, TaskState.RUNNING]
    await _assert_counters_match_tasks(red, NS)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_random_runs_match_the_memory_store(
        pair: tuple[InMemoryTaskStore, RedisTaskStore], seed: int) -> None:
    mem, red = pair
    rnd = random.Random(seed)
    limits = DispatchLimits(capability_limits={"a": 4}, key_label="tenant",
                            key_limits={"t1": 2}, default_key_limit=3)
    now, n = T0, 0
    for _ in range(80):
        op = rnd.choice(["create", "create", "lease", "lease", "complete", "complete",
                         "fail", "cancel", "redrive", "promote", "expire"])
        if op == "create":
            items = []
            for _ in range(rnd.randint(1, 10)):
                labels = {"tenant": rnd.choice(["t1", "t2", "t3"])} if rnd.random() < 0.7 else {}
                items.append((mk(f"t{n}", rnd.choice(["a", "b"]), priority=rnd.randint(0, 2),
                                 labels=labels, schedule_to_start_timeout=rnd.choice([0, 0, 9])),
                              rnd.choice(["", "", f"rid-{rnd.randint(0, 40)}"])))
                n += 1
            made = []
            for s in (mem, red):
                created, full = await s.create_tasks(items, max_queued=30)
                made.append(([(t.id, c) for t, c, _ in created], full))
            assert made[0] == made[1]
        elif op == "lease":
            caps = rnd.choice([["a"], ["b"], ["a", "b"]])
            count = rnd.randint(1, 12)
            got = [[x.task.id for x in await s.lease_batch(NS, caps, "ag", now=now,
                                                           default_timeout=30, count=count,
                                                           limits=limits)]
                   for s in (mem, red)]
            assert got[0] == got[1]
        elif op in ("complete", "fail"):
            running = [t for t in (await mem.leases_of("ag")) if t.state is TaskState.RUNNING]
            rnd.shuffle(running)
            pick = running[:rnd.randint(1, 12)]
            if op == "complete":
                items3 = [(t.id, t.fencing_token, Payload(b"out")) for t in pick]
                if pick and rnd.random() < 0.3:
                    items3.append((pick[0].id, pick[0].fencing_token + 1, Payload(b"stale")))
                res = [[type(x).__name__ for x in await s.complete_many(items3, now=now)]
                       for s in (mem, red)]
                assert res[0] == res[1]
            else:
                for t in pick[:3]:
                    verdict = rnd.choice([FailVerdict.RETRY, FailVerdict.FAIL])
                    retry_at = now + rnd.choice([0.0, 1.0])
                    for s in (mem, red):
                        await s.fail(t.id, t.fencing_token, TaskFailure("E"), verdict=verdict,
                                     retry_at=retry_at, now=now)
        elif op in ("cancel", "redrive") and n:
            task_id = f"t{rnd.randrange(n)}"
            errors = []
            for s in (mem, red):
                try:
                    if op == "cancel":
                        await s.cancel_task(task_id, "test", now=now)
                    else:
                        await s.redrive(task_id, None, now=now)
                    errors.append("")
                except AgentMeshError as exc:
                    errors.append(type(exc).__name__)
            assert errors[0] == errors[1]
        elif op == "promote":
            now += 1.0
            moved = [[c.task.id for c in (await s.promote_due(now, 100)).tasks]
                     for s in (mem, red)]
            assert sorted(moved[0]) == sorted(moved[1])
        elif op == "expire":
            now += 2.0
            moved = [[c.task.id for c in (await s.expire_queued(now, 100)).tasks]
                     for s in (mem, red)]
            assert sorted(moved[0]) == sorted(moved[1])
        assert await mem.stats(NS) == await red.stats(NS)
    await _assert_counters_match_tasks(red, NS)


async def _assert_counters_match_tasks(store: RedisTaskStore, namespace: str) -> None:
    """The stats and running hashes, and the indexes, equal a recount of the task documents."""
    r = store._r
    base = store._base
    ids = list(await _zset(r, f"{base}:tasks:{namespace}"))
    tasks = [t for t in await store.get_tasks(ids) if t is not None]
    want_stats: Counter[str] = Counter()
    want_running: Counter[str] = Counter()
    for t in tasks:
        want_stats[str(int(t.state))] += 1
        if t.state in LIVE:
            want_stats[f"c:{int(t.state)}:{t.capability}"] += 1
        if t.state in TERMINAL_TASK_STATES:
            want_stats["ended"] += 1
            if t.state is TaskState.SUCCEEDED and not t.human_intervened:
                want_stats["autonomous"] += 1
        if t.state is TaskState.RUNNING:
            want_running["c:" + t.capability] += 1
            for k, v in t.labels.items():
                want_running[f"l:{k}={v}"] += 1
    stats = await r.hgetall(f"{base}:stats:{namespace}")
    running = await r.hgetall(f"{base}:running:{len(namespace)}:{namespace}")
    assert {k: int(v) for k, v in stats.items() if int(v)} == dict(want_stats)
    assert {k: int(v) for k, v in running.items() if int(v)} == dict(want_running)
    # the indexes: every task by seq; the timers of the QUEUED, RETRYING, RUNNING ones
    indexes = {name: await _zset(r, f"{base}:{name}")
               for name in (f"tasks:{namespace}", "s2s", "retry", "leases")}
    assert indexes == {
        f"tasks:{namespace}": {t.id: t.seq for t in tasks},
        "s2s": {t.id: t.queue_deadline for t in tasks
                if t.state is TaskState.QUEUED and t.queue_deadline > 0},
        "retry": {t.id: t.retry_time for t in tasks if t.state is TaskState.RETRYING},
        "leases": {t.id: t.lease_deadline for t in tasks if t.state is TaskState.RUNNING}}


# -- agents and state: the writes that a call skips --------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_agent_registry_matches_the_memory_one(seed: int) -> None:
    """Heartbeats skip the index and capability-count writes that would change nothing;
    the ACTIVE index that leases read matches the cards."""
    rnd = random.Random(seed)
    mem = InMemoryAgentRegistry()
    async with redis_stores("fn-agents") as stores:
        red = stores.agents
        namespaces, caps = ["n1", "n2"], ["x", "y", "z"]
        now = T0
        for _ in range(120):
            agent_id = f"a{rnd.randrange(6)}"
            op = rnd.choice(["register", "heartbeat", "heartbeat", "state", "purge"])
            agent = Agent(id=agent_id, display_name=agent_id, namespace=rnd.choice(namespaces),
                          capabilities=tuple(Capability(c)
                                             for c in rnd.sample(caps, rnd.randint(0, 3))),
                          state=rnd.choice([AgentState.ACTIVE, AgentState.DRAINING]),
                          heartbeat_time=now, expire_time=now + 5)
            expire, state = now + rnd.choice([1, 5]), rnd.choice(list(AgentState))
            for reg in (mem, red):
                if op == "register":
                    await reg.register(agent)
                elif op == "heartbeat":
                    await reg.heartbeat(agent_id, in_flight=1, load=0.5, now=now,
                                        expire_time=expire)
                elif op == "state":
                    await reg.set_state(agent_id, state, now=now)
                else:
                    await reg.purge(now - 3)
            now += rnd.choice([0.0, 1.0])
            for ns in namespaces:
                lists = [[a.id for a in await reg.list_agents(AgentFilter(ns), after_id="",
                                                              limit=100)] for reg in (mem, red)]
                assert lists[0] == lists[1]
                assert await mem.live_capabilities(ns) == await red.live_capabilities(ns)
                counts = await stores.client.hgetall(f"{{{stores.prefix}}}:caps:{ns}")
                want = Counter(c.name for a in await mem.list_agents(
                    AgentFilter(ns, states=frozenset({AgentState.ACTIVE})), after_id="",
                    limit=100) for c in {c.name: c for c in a.capabilities}.values())
                assert {k: int(v) for k, v in counts.items()} == dict(want)
            expired = [sorted(a.id for a in await reg.expired(now)) for reg in (mem, red)]
            assert expired[0] == expired[1]
            # the index a lease reads: every ACTIVE agent with its expire_time, no other
            active = await stores.client.hgetall(f"{{{stores.prefix}}}:agents_active")
            want_active = {a.id: a.expire_time for ns in namespaces
                           for a in await mem.list_agents(
                               AgentFilter(ns, states=frozenset({AgentState.ACTIVE})),
                               after_id="", limit=100)}
            assert {k: float(v) for k, v in active.items()} == want_active


async def test_state_log_keeps_exactly_log_size_events() -> None:
    mem = InMemoryStateStore(log_size=3)
    async with redis_stores("fn-state") as shared:
        red = RedisStores(shared.client, shared.prefix, state_log_size=3).state
        for store in (mem, red):
            for i in range(4):
                await store.put(NS, f"k{i % 2}", Payload(b"v%d" % i), expected_version=None,
                                ttl=0, now=T0)
            with pytest.raises(OutOfRangeError):
                await store.events_since(NS, "", 0, 100)
            assert [e.entry.revision for e in await store.events_since(NS, "", 1, 100)] == [
                2, 3, 4]
            assert [e.key for e in await store.list_entries(NS, "", after_key="", limit=10,
                                                            now=T0)] == ["k0", "k1"]


async def _zset(r: Any, key: str) -> dict[str, float]:
    """A sorted set as {member: score}."""
    return {str(m): float(score) for m, score in await r.zrange(key, 0, -1, withscores=True)}


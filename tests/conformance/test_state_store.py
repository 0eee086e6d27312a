"""Conformance suite of the StateStore port: every backend must pass it.

The change log is kept short (``LOG_SIZE``) so trimming is easy to reach.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.backends.memory import InMemoryStateStore
from server.backends.redis import RedisStores
from server.domain.errors import (
    AbortedError,
    FailedPreconditionError,
    NotFoundError,
    OutOfRangeError,
)
from server.domain.models import Payload, StateEventType
from server.ports import StateStore
from tests._services import require_redis, unique_prefix
from tests.conftest import redis_url_of

NS = "ns1"
T0 = 1_000.0
LOG_SIZE = 8


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """One StateStore per backend; the Redis one under a unique key prefix."""
    if request.param == "memory":
        mem = InMemoryStateStore(log_size=LOG_SIZE)
        yield mem
        await mem.aclose()
        return
    url = redis_url_of(request, request.param) or require_redis()
    stores = await RedisStores.connect(url, prefix=unique_prefix("state"),
                                       state_log_size=LOG_SIZE)
    try:
        yield stores.state
    finally:
        await stores.delete_all_keys()
        await stores.aclose()


def val(text: str) -> Payload:
    return Payload(text.encode(), {"encoding": b"text/plain"})


async def test_put_get_roundtrip(store: StateStore) -> None:
    assert await store.revision(NS) == 0
    assert await store.get(NS, "k", now=T0) is None
    e = await store.put(NS, "k", val("v1"), expected_version=None, ttl=0, now=T0)
    assert (e.key, e.value, e.version, e.revision, e.update_time, e.expire_time) == (
        "k", val("v1"), 1, 1, T0, 0.0)
    assert await store.get(NS, "k", now=T0) == e
    e2 = await store.put(NS, "k", Payload(b"\x00\xff"), expected_version=None, ttl=0,
                         now=T0 + 1)
    assert e2.version == 2 and e2.revision == 2 and e2.value == Payload(b"\x00\xff")
    assert await store.revision(NS) == 2
    assert await store.revision("other") == 0
    assert await store.get("other", "k", now=T0) is None


async def test_compare_and_set(store: StateStore) -> None:
    created = await store.put(NS, "k", val("a"), expected_version=0, ttl=0, now=T0)
    assert created.version == 1
    with pytest.raises(AbortedError) as info:
        await store.put(NS, "k", val("b"), expected_version=0, ttl=0, now=T0)
    assert info.value.reason == "VERSION_MISMATCH"
    with pytest.raises(AbortedError):
        await store.put(NS, "k", val("b"), expected_version=2, ttl=0, now=T0)
    with pytest.raises(AbortedError):
        await store.put(NS, "new", val("b"), expected_version=1, ttl=0, now=T0)
    ok = await store.put(NS, "k", val("b"), expected_version=1, ttl=0, now=T0)
    assert ok.version == 2
    assert await store.revision(NS) == 2  # refused writes do not bump the revision


async def test_delete(store: StateStore) -> None:
    await store.put(NS, "k", val("a"), expected_version=None, ttl=0, now=T0)
    with pytest.raises(NotFoundError):
        await store.delete(NS, "nope", expected_version=None, now=T0)
    with pytest.raises(AbortedError):
        await store.delete(NS, "k", expected_version=5, now=T0)
    rev = await store.delete(NS, "k", expected_version=1, now=T0 + 1)
    assert rev == 2 == await store.revision(NS)
    assert await store.get(NS, "k", now=T0) is None
    with pytest.raises(NotFoundError):
        await store.delete(NS, "k", expected_version=None, now=T0)
    again = await store.put(NS, "k", val("b"), expected_version=0, ttl=0, now=T0 + 2)
    assert again.version == 1 and again.revision == 3


async def test_ttl_expiry(store: StateStore) -> None:
    e = await store.put(NS, "k", val("a"), expected_version=None, ttl=10, now=T0)
    assert e.expire_time == T0 + 10
    assert await store.get(NS, "k", now=T0 + 9.5) == e
    assert await store.get(NS, "k", now=T0 + 10) is None
    events = await store.events_since(NS, "", 0, 10)
    assert [(ev.type, ev.entry.revision) for ev in events] == [
        (StateEventType.PUT, 1), (StateEventType.DELETE, 2)]
    assert events[1].entry.key == "k" and events[1].entry.version == 1
    # an expired key counts as absent for CAS
    created = await store.put(NS, "k", val("b"), expected_version=0, ttl=0, now=T0 + 11)
    assert created.version == 1 and created.expire_time == 0.0
    await store.put(NS, "t", val("c"), expected_version=None, ttl=1, now=T0)
    with pytest.raises(NotFoundError):
        await store.delete(NS, "t", expected_version=None, now=T0 + 2)
    assert [e.key for e in await store.list_entries(NS, "", after_key="", limit=10,
                                                    now=T0 + 20)] == ["k"]


async def test_list_prefix_pagination(store: StateStore) -> None:
    for key in ["b/2", "a/1", "b/1", "b/3", "c", "b", "b/4"]:
        await store.put(NS, key, val(key), expected_version=None,
                        ttl=5 if key == "b/3" else 0, now=T0)
    await store.put("other", "b/9", val("x"), expected_version=None, ttl=0, now=T0)
    page = await store.list_entries(NS, "b/", after_key="", limit=2, now=T0)
    assert [e.key for e in page] == ["b/1", "b/2"]
    page = await store.list_entries(NS, "b/", after_key="b/2", limit=2, now=T0 + 6)
    assert [e.key for e in page] == ["b/4"]  # b/3 expired
    everything = await store.list_entries(NS, "", after_key="", limit=100, now=T0 + 6)
    assert [e.key for e in everything] == ["a/1", "b", "b/1", "b/2", "b/4", "c"]
    assert everything[0].value == val("a/1")


async def test_events_since_ordering_and_prefix(store: StateStore) -> None:
    await store.put(NS, "a/x", val("1"), expected_version=None, ttl=0, now=T0)
    await store.put(NS, "b/x", val("2"), expected_version=None, ttl=0, now=T0)
    await store.put(NS, "a/y", val("3"), expected_version=None, ttl=0, now=T0)
    await store.delete(NS, "a/x", expected_version=None, now=T0 + 1)
    events = await store.events_since(NS, "", 0, 100)
    assert [e.entry.revision for e in events] == [1, 2, 3, 4]
    a_events = await store.events_since(NS, "a/", 1, 100)
    assert [(e.type, e.entry.key, e.entry.revision) for e in a_events] == [
        (StateEventType.PUT, "a/y", 3), (StateEventType.DELETE, "a/x", 4)]
    assert a_events[0].entry.value == val("3")
    assert [e.entry.revision for e in await store.events_since(NS, "", 0, 2)] == [1, 2]
    assert await store.events_since(NS, "", 4, 10) == []
    assert await store.events_since(NS, "", 99, 10) == []
    assert await store.events_since("other", "", 0, 10) == []


async def test_events_since_out_of_range_after_trim(store: StateStore) -> None:
    for i in range(LOG_SIZE + 4):
        await store.put(NS, f"k{i}", val(str(i)), expected_version=None, ttl=0, now=T0)
    assert await store.revision(NS) == LOG_SIZE + 4
    with pytest.raises(OutOfRangeError):
        await store.events_since(NS, "", 0, 100)
    # the oldest kept event is revision 5: asking from 4 still works
    events = await store.events_since(NS, "", 4, 100)
    assert [e.entry.revision for e in events] == list(range(5, LOG_SIZE + 5))
    with pytest.raises(OutOfRangeError):
        await store.events_since(NS, "", 3, 100)


async def test_revision_monotonic(store: StateStore) -> None:
    seen = [await store.revision(NS)]
    for i in range(5):
        await store.put(NS, "k", val(str(i)), expected_version=None, ttl=0, now=T0)
        seen.append(await store.revision(NS))
    await store.delete(NS, "k", expected_version=None, now=T0)
    seen.append(await store.revision(NS))
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workers=st.integers(min_value=2, max_value=8),
       per_worker=st.integers(min_value=1, max_value=5))
async def test_concurrent_cas_increments_never_lose_updates(
        store: StateStore, workers: int, per_worker: int) -> None:
    key = f"counter-{uuid.uuid4().hex}"

    async def increment() -> None:
        while True:
            current = await store.get(NS, key, now=T0)
            version = current.version if current is not None else 0
            value = int(current.value.data) if current is not None else 0
            await asyncio.sleep(0)  # let the other workers interleave
            try:
                await store.put(NS, key, Payload(str(value + 1).encode()),
                                expected_version=version, ttl=0, now=T0)
            except AbortedError:
                continue
            return

    async def worker() -> None:
        for _ in range(per_worker):
            await increment()

    await asyncio.gather(*[worker() for _ in range(workers)])
    final = await store.get(NS, key, now=T0)
    assert final is not None
    assert int(final.value.data) == workers * per_worker
    assert final.version == workers * per_worker


# -- locks and fenced writes --------------------------------------------------------


async def test_lock_tokens_grow_across_release_and_expiry(store: StateStore) -> None:
    a = await store.acquire_lock(NS, "L", "a", agent_id="", ttl=10, now=T0)
    assert (a.name, a.owner, a.fencing_token, a.expire_time) == ("L", "a", 1, T0 + 10)
    with pytest.raises(AbortedError) as info:
        await store.acquire_lock(NS, "L", "b", agent_id="", ttl=10, now=T0 + 1)
    assert info.value.reason == "LOCK_HELD"
    assert info.value.metadata["owner"] == "a"
    assert float(info.value.metadata["expire_time"]) == T0 + 10
    assert await store.release_lock(NS, "L", a.fencing_token, now=T0 + 2) is True
    assert await store.release_lock(NS, "L", a.fencing_token, now=T0 + 2) is False  # idempotent
    b = await store.acquire_lock(NS, "L", "b", agent_id="", ttl=5, now=T0 + 3)
    assert b.fencing_token == 2
    # b's lease ends at T0 + 8: c gets the lock with a larger token, b is stale
    c = await store.acquire_lock(NS, "L", "c", agent_id="", ttl=5, now=T0 + 8)
    assert c.fencing_token == 3
    with pytest.raises(AbortedError) as info:
        await store.release_lock(NS, "L", b.fencing_token, now=T0 + 9)
    assert info.value.reason == "STALE_FENCING_TOKEN"
    assert info.value.metadata["current_token"] == "3"
    other = await store.acquire_lock(NS, "M", "a", agent_id="", ttl=5, now=T0)
    assert other.fencing_token == 1  # per lock name
    again = await store.acquire_lock(NS, "L", "c", agent_id="", ttl=5, now=T0 + 9)
    assert again.fencing_token == 4  # same owner: a new grant fences off the old token
    assert await store.revision(NS) == 0  # locks bump no revision


async def test_renew_lock(store: StateStore) -> None:
    a = await store.acquire_lock(NS, "L", "a", agent_id="", ttl=5, now=T0)
    renewed = await store.renew_lock(NS, "L", a.fencing_token, ttl=5, now=T0 + 4)
    assert renewed.expire_time == T0 + 9 and renewed.fencing_token == a.fencing_token
    with pytest.raises(AbortedError):
        await store.acquire_lock(NS, "L", "b", agent_id="", ttl=5, now=T0 + 8)
    with pytest.raises(AbortedError) as info:
        await store.renew_lock(NS, "L", a.fencing_token, ttl=5, now=T0 + 9)  # lease ended
    assert info.value.reason == "STALE_FENCING_TOKEN"
    with pytest.raises(AbortedError):
        await store.renew_lock(NS, "L", 99, ttl=5, now=T0)
    with pytest.raises(AbortedError):
        await store.release_lock(NS, "nope", 1, now=T0)


async def test_fenced_writes_refused_after_another_holder(store: StateStore) -> None:
    a = await store.acquire_lock(NS, "L", "a", agent_id="", ttl=5, now=T0)
    fa = ("L", a.fencing_token)
    await store.put(NS, "k", val("from a"), expected_version=None, ttl=0, now=T0 + 1, fence=fa)
    # a pauses past its lease; b takes the lock and writes
    b = await store.acquire_lock(NS, "L", "b", agent_id="", ttl=5, now=T0 + 6)
    fb = ("L", b.fencing_token)
    written = await store.put(NS, "k", val("from b"), expected_version=None, ttl=0,
                              now=T0 + 6, fence=fb)
    with pytest.raises(AbortedError) as info:
        await store.put(NS, "k", val("late a"), expected_version=None, ttl=0, now=T0 + 7,
                        fence=fa)
    assert info.value.reason == "STALE_FENCING_TOKEN"
    with pytest.raises(AbortedError):
        await store.delete(NS, "k", expected_version=None, now=T0 + 7, fence=fa)
    assert await store.get(NS, "k", now=T0 + 7) == written
    assert await store.revision(NS) == 2  # refused writes log nothing
    # an expired grant is not a holder either, even with nobody else holding
    with pytest.raises(AbortedError):
        await store.put(NS, "k", val("b late"), expected_version=None, ttl=0, now=T0 + 12,
                        fence=fb)
    with pytest.raises(AbortedError):  # never granted
        await store.put(NS, "x", val("?"), expected_version=None, ttl=0, now=T0, fence=("Z", 1))
    c = await store.acquire_lock(NS, "L", "c", agent_id="", ttl=5, now=T0 + 12)
    assert await store.delete(NS, "k", expected_version=2, now=T0 + 12,
                              fence=("L", c.fencing_token)) == 3


async def test_release_agent_locks(store: StateStore) -> None:
    await store.acquire_lock(NS, "L1", "a", agent_id="ag1", ttl=50, now=T0)
    await store.acquire_lock("other", "L2", "a", agent_id="ag1", ttl=50, now=T0)
    await store.acquire_lock(NS, "L3", "b", agent_id="ag2", ttl=50, now=T0)
    freed = await store.release_agent_locks("ag1", now=T0 + 1)
    assert sorted(freed) == [(NS, "L1"), ("other", "L2")]
    assert await store.release_agent_locks("ag1", now=T0 + 1) == []
    got = await store.acquire_lock(NS, "L1", "c", agent_id="", ttl=5, now=T0 + 1)
    assert got.fencing_token == 2
    with pytest.raises(AbortedError):
        await store.acquire_lock(NS, "L3", "c", agent_id="", ttl=5, now=T0 + 1)


async def test_export_import_keeps_versions_revisions_and_tokens(store: StateStore) -> None:
    await store.put(NS, "a", val("1"), expected_version=None, ttl=0, now=T0)
    await store.put(NS, "a", val("2"), expected_version=None, ttl=0, now=T0)
    await store.put(NS, "t", val("ttl"), expected_version=None, ttl=1, now=T0)
    await store.put("other", "b", val("3"), expected_version=None, ttl=0, now=T0)
    await store.acquire_lock(NS, "L", "a", agent_id="", ttl=5, now=T0)
    await store.acquire_lock(NS, "L", "a", agent_id="", ttl=5, now=T0)
    dump = await store.export_state(None, now=T0 + 2)
    assert sorted(dump) == [NS, "other"]
    assert dump[NS].revision == 3 and dump[NS].lock_tokens == {"L": 2}
    assert [(e.key, e.version) for e in dump[NS].entries] == [("a", 2)]  # t expired
    only = await store.export_state("other", now=T0)
    assert list(only) == ["other"]
    with pytest.raises(FailedPreconditionError):
        await store.import_state(dump)
    # into a fresh namespace pair
    renamed = {"r1": dump[NS], "r2": dump["other"]}
    await store.import_state(renamed, dry_run=True)
    assert await store.revision("r1") == 0
    await store.import_state(renamed)
    assert await store.revision("r1") == 3
    got = await store.get("r1", "a", now=T0)
    assert got is not None and got.version == 2 and got.value == val("2")
    nxt = await store.put("r1", "a", val("3"), expected_version=2, ttl=0, now=T0)
    assert nxt.revision == 4
    grant = await store.acquire_lock("r1", "L", "x", agent_id="", ttl=5, now=T0)
    assert grant.fencing_token == 3  # never reuses a token granted before the snapshot
    with pytest.raises(OutOfRangeError):  # the restored namespace has no history
        await store.events_since("r2", "", 0, 10)


async def test_list_locks_shows_held_grants_only(store: StateStore) -> None:
    """The console's lock view: holder, agent and fencing token of each held lock."""
    assert await store.list_locks(NS, now=T0, limit=10) == []
    b = await store.acquire_lock(NS, "b", "worker-2", agent_id="a2", ttl=10, now=T0)
    a = await store.acquire_lock(NS, "a", "worker-1", agent_id="a1", ttl=10, now=T0)
    await store.acquire_lock(NS, "short", "w", agent_id="", ttl=1, now=T0)
    freed = await store.acquire_lock(NS, "freed", "w", agent_id="", ttl=10, now=T0)
    await store.release_lock(NS, "freed", freed.fencing_token, now=T0)
    await store.acquire_lock("other", "x", "w", agent_id="", ttl=10, now=T0)
    again = await store.acquire_lock(NS, "a", "worker-1", agent_id="a1", ttl=10, now=T0 + 1)
    held = await store.list_locks(NS, now=T0 + 2, limit=10)
    assert [(g.name, g.owner, g.agent_id, g.fencing_token) for g in held] == [
        ("a", "worker-1", "a1", again.fencing_token), ("b", "worker-2", "a2", b.fencing_token)]
    assert again.fencing_token > a.fencing_token
    assert held[0].expire_time == pytest.approx(T0 + 11)
    assert [g.name for g in await store.list_locks(NS, now=T0 + 2, limit=1)] == ["a"]

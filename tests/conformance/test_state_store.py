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
from server.domain.errors import AbortedError, NotFoundError, OutOfRangeError
from server.domain.models import Payload, StateEventType
from server.ports import StateStore
from tests._services import require_redis, unique_prefix

NS = "ns1"
T0 = 1_000.0
LOG_SIZE = 8


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """One StateStore per backend; the Redis one under a unique key prefix."""
    if request.param == "memory":
        mem = InMemoryStateStore(log_size=LOG_SIZE)
        yield mem
        await mem.aclose()
        return
    url = require_redis()
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

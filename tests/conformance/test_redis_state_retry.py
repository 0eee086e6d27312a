"""A Redis state write retried after its reply was lost answers what it did.

redis-py re-sends a command when the connection drops (the store's ``Retry``
on ConnectionError/TimeoutError). A CAS ``put`` whose first run committed and
whose reply was lost used to meet its own write on the retry and answer
ABORTED ("key is at version N+1"), though the value was stored: the nemesis
campaign's ``cas_linearizable`` check found it (``redis_reply_loss`` fault).
Each put now carries a write id stored with the entry; a retry that finds its
own id answers the first run's result.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.backends.redis import codec
from server.domain.errors import AbortedError
from server.domain.models import Payload
from tests._services import redis_stores
from tests.conftest import redis_url_of


async def _put(store: Any, key: str, data: bytes, expected: int | str, wid: str) -> list[Any]:
    """One raw call of the library's put, as the client sends it (and re-sends it)."""
    return list(await store._call(
        "put", "default", key, json.dumps(codec.payload_to_doc(Payload(data))), expected,
        "0.0", "100.0", "", 0, wid))


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_a_retried_cas_put_recognises_its_own_write(request: pytest.FixtureRequest,
                                                          kind: str) -> None:
    async with redis_stores("cas-retry", redis_url_of(request, kind)) as stores:
        state = stores.state
        first = await _put(state, "k", b"v1", 0, "w-1")
        assert first[0] == "ok"
        again = await _put(state, "k", b"v1", 0, "w-1")  # the same call, re-sent
        assert again == first, "the retry answers what the first run did"
        other = await _put(state, "k", b"v2", 0, "w-2")  # a different writer, same version
        assert other[0] == "mismatch" and int(other[1]) == 1
        entry = await state.get("default", "k", now=100.0)
        assert entry is not None and (entry.version, entry.value.data) == (1, b"v1")
        # Through the store's API every put has its own id: a second CAS on 0 is refused.
        with pytest.raises(AbortedError):
            await state.put("default", "k", Payload(b"v3"), expected_version=0, ttl=0,
                            now=100.0)
        # An unconditional put retried does not bump the version twice.
        blind = await _put(state, "u", b"x", "", "w-3")
        assert await _put(state, "u", b"x", "", "w-3") == blind
        got = await state.get("default", "u", now=100.0)
        assert got is not None and got.version == 1


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_a_retried_cas_put_after_other_writers_recognises_its_own_write(
        request: pytest.FixtureRequest, kind: str) -> None:
    """The first run committed, other clients read it and wrote on top before the
    retry arrived (nemesis, ``redis_reply_loss`` under contention): the entry now
    carries their write id, yet the retry must still answer what it did."""
    async with redis_stores("cas-retry-late", redis_url_of(request, kind)) as stores:
        state = stores.state
        first = await _put(state, "k", b"v1", 0, "w-1")
        assert first[0] == "ok"
        for i in range(3):  # others move the key on: versions 2, 3, 4
            assert (await _put(state, "k", f"o{i}".encode(), i + 1, f"o-{i}"))[0] == "ok"
        again = await _put(state, "k", b"v1", 0, "w-1")  # the lost-reply retry
        assert again == first, "the retry answers the first run's entry (version 1)"
        stranger = await _put(state, "k", b"v9", 0, "w-9")  # never written: refused
        assert stranger[0] == "mismatch" and int(stranger[1]) == 4
        entry = await state.get("default", "k", now=100.0)
        assert entry is not None and (entry.version, entry.value.data) == (4, b"o2")

"""A Redis ``fail`` retried after its reply was lost answers what it did.

redis-py re-sends a command when the connection drops (the store's ``Retry``
on ConnectionError/TimeoutError). A ``fail`` whose first run committed and
whose reply was lost used to meet its own effect on the retry (the attempt
closed, the task QUEUED or FAILED) and answer "stale": the agent's
CompleteTask failure was refused ABORTED though it had closed the attempt.
The nemesis campaign's ``stale_result_refused`` check found it on Redis +
NATS with two replicas. The retry now recognises the failure it recorded;
a different failure, or the same one after the task moved on, is still stale.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.backends.redis import codec
from server.domain.errors import StaleLeaseError
from server.domain.models import TaskFailure, TaskState
from server.ports import FailVerdict
from tests._services import redis_stores
from tests.conformance.conftest import live_agents
from tests.conformance.test_task_store import NS, T0, mk


async def _fail(store: Any, task_id: str, token: int, failure: TaskFailure,
                verdict: str) -> list[Any]:
    """One raw call of the library's fail, as the client sends it (and re-sends it)."""
    doc = {"error_type": failure.error_type, "message": failure.message,
           "non_retryable": failure.non_retryable}
    return list(await store._call("fail", task_id, token, json.dumps(doc), verdict,
                                  codec.fstr(T0 + 1), codec.fstr(T0 + 1)))


@pytest.mark.parametrize("verdict", ["retry", "fail"])
async def test_a_retried_fail_recognises_its_own_effect(verdict: str) -> None:
    async with redis_stores("fail-retry") as stores:
        tasks = stores.tasks
        await live_agents(stores.agents, "a")
        await tasks.create_task(mk("t1"))
        lease = await tasks.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
        assert lease is not None and lease.fencing_token == 1
        boom = TaskFailure("Boom", "first")
        first = await _fail(tasks, "t1", 1, boom, verdict)
        assert first[0] == "ok"
        after = await tasks.get_task("t1")
        assert after is not None and after.state is not TaskState.RUNNING
        again = await _fail(tasks, "t1", 1, boom, verdict)  # the same call, re-sent
        assert again == ["ok", ""], "the retry answers ok and changes nothing"
        same = await tasks.get_task("t1")
        assert same is not None and same.attempts == after.attempts and same.state is after.state
        # Another failure under the same (ended) lease is stale, as it always was.
        other = await _fail(tasks, "t1", 1, TaskFailure("Boom", "second"), verdict)
        assert other[0] == "stale"
        with pytest.raises(StaleLeaseError):
            await tasks.fail("t1", 1, TaskFailure("Other", "x"), verdict=FailVerdict.RETRY,
                             retry_at=T0 + 2, now=T0 + 2)


async def test_a_retried_fail_after_a_new_lease_is_stale() -> None:
    async with redis_stores("fail-retry2") as stores:
        tasks = stores.tasks
        await live_agents(stores.agents, "a")
        await tasks.create_task(mk("t1"))
        assert await tasks.lease_next(NS, ["cap"], "a", now=T0, default_timeout=10)
        boom = TaskFailure("Boom", "first")
        assert (await _fail(tasks, "t1", 1, boom, "retry"))[0] == "ok"
        lease = await tasks.lease_next(NS, ["cap"], "a", now=T0 + 2, default_timeout=10)
        assert lease is not None and lease.fencing_token == 2
        assert (await _fail(tasks, "t1", 1, boom, "retry"))[0] == "stale"
        now = await tasks.get_task("t1")
        assert now is not None and now.state is TaskState.RUNNING and now.fencing_token == 2

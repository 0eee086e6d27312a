"""The Redis codec and the shortcuts the Redis TaskStore takes with it.

- ``task_from_doc`` fills a Task slot by slot and shares RetryPolicy values
  between documents: it must still give exactly ``Task(...)`` for any document.
- ``create_tasks`` rebuilds the stored task from the submitted one (plus the
  ``seq``/``queue_deadline`` the script sets) instead of decoding the stored
  document: that must equal what a later read decodes, for any task.
- ``complete_many``/``lease_batch`` reply with one JSON text.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import AsyncIterator
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.backends.redis import RedisTaskStore, codec
from server.domain.errors import AlreadyExistsError, NotFoundError, StaleLeaseError
from server.domain.models import (
    DEFAULT_RETRY_POLICY,
    Jitter,
    Payload,
    RetryPolicy,
    Task,
    TaskAttempt,
    TaskFailure,
    TaskState,
)
from server.ports import Transition
from tests._services import redis_stores
from tests.conformance.conftest import live_agents
from tests.conftest import redis_url_of

NS = "codec-ns"
T0 = 1_732_000_000.123456


# -- strategies ------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_times = st.floats(min_value=0.0, max_value=4e9, allow_nan=False, allow_infinity=False)
_durations = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
_ints = st.integers(min_value=0, max_value=2**31 - 1)
_payloads = st.builds(Payload, st.binary(max_size=40),
                      st.dictionaries(_text, st.binary(max_size=10), max_size=3))
_failures = st.none() | st.builds(TaskFailure, _text, _text, st.booleans())
_policies = st.just(DEFAULT_RETRY_POLICY) | st.builds(
    RetryPolicy, st.integers(min_value=1, max_value=100), _durations, _durations, _durations,
    st.sampled_from(list(Jitter)), st.lists(_text, max_size=3).map(tuple))
_attempts = st.builds(TaskAttempt, _ints, _text, _times, st.none() | _times, _failures)

tasks = st.builds(
    Task, id=_text, capability=_text, namespace=_text, input=_payloads,
    state=st.sampled_from(list(TaskState)),
    priority=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    labels=st.dictionaries(_text, _text, max_size=3), retry_policy=_policies,
    execution_timeout=_durations, fallback_capability=_text, output=st.none() | _payloads,
    failure=_failures, attempt=_ints, agent_id=_text, fencing_token=_ints,
    lease_deadline=_times, workflow_id=_text, step_id=_text,
    depends_on=st.lists(_text, max_size=3).map(tuple), create_time=_times,
    update_time=_times, start_time=_times, end_time=_times, retry_time=_times,
    served_by_fallback=st.booleans(), attempts=st.lists(_attempts, max_size=3).map(tuple),
    human_intervened=st.booleans(), budget_start=_ints,
    trace_context=st.dictionaries(_text, _text, max_size=2),
    dependency_outputs=st.dictionaries(_text, _payloads, max_size=2), seq=_ints,
    schedule_to_start_timeout=_durations, heartbeat_timeout=_durations, queue_deadline=_times)


# -- the codec on its own ----------------------------------------------------------------


def test_decoder_field_order_is_the_dataclass_order() -> None:
    assert tuple(f.name for f in fields(Task)) == codec._TASK_ORDER


@settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(tasks)
def test_task_round_trips_exactly(task: Task) -> None:
    text = codec.encode_task(task)
    assert codec.decode_task(text) == task
    # The orjson text is plain JSON: the standard library reads the same document.
    assert json.loads(text) == codec.task_to_doc(task)
    assert codec.task_from_doc(json.loads(text)) == task


def test_decoder_accepts_cjson_empty_objects_and_old_documents() -> None:
    # cjson writes an empty list as {}; documents of older versions lack newer fields.
    doc = {"id": "t", "capability": "c", "namespace": "n", "state": 2, "labels": {},
           "depends_on": {}, "attempts": {}, "dependency_outputs": {}, "trace_context": {},
           "retry_policy": {"max_attempts": 3, "initial_backoff": "0.2", "max_backoff": "30.0",
                            "multiplier": "2.0", "jitter": 1, "non_retryable_error_types": {}},
           "input": {"data": "", "metadata": {}}, "output": None, "failure": None,
           "create_time": "12.5", "end_time": ""}
    assert codec.task_from_doc(doc) == Task(id="t", capability="c", namespace="n",
                                            state=TaskState.QUEUED, create_time=12.5)
    minimal = codec.task_from_doc({"id": "t", "capability": "c", "namespace": "n", "state": 3})
    assert minimal == Task(id="t", capability="c", namespace="n", state=TaskState.RUNNING,
                           input=Payload(b"", {}), retry_policy=RetryPolicy(
                               initial_backoff=0.0, max_backoff=0.0, multiplier=0.0))


def test_retry_policies_are_shared_only_between_equal_documents() -> None:
    def policy(**doc: object) -> RetryPolicy:
        base: dict[str, object] = {"id": "t", "capability": "c", "namespace": "n", "state": 2}
        return codec.task_from_doc({**base, "retry_policy": doc}).retry_policy

    a = policy(max_attempts=5, initial_backoff="1.5", max_backoff="9.0", multiplier="3.0",
               jitter=2, non_retryable_error_types=["Fatal"])
    assert a == RetryPolicy(5, 1.5, 9.0, 3.0, Jitter.NONE, ("Fatal",))
    same = policy(max_attempts=5, initial_backoff="1.5", max_backoff="9.0", multiplier="3.0",
                  jitter=2, non_retryable_error_types=["Fatal"])
    assert same is a
    assert policy(max_attempts=5, initial_backoff="1.5", max_backoff="9.0", multiplier="3.0",
                  jitter=2, non_retryable_error_types=["Other"]).non_retryable_error_types == (
                      "Other",)
    assert policy(max_attempts=6, initial_backoff="1.5", max_backoff="9.0", multiplier="3.0",
                  jitter=2).max_attempts == 6
    # Values that compare equal as keys (1 / True) convert to equal values.
    assert policy(max_attempts=True).max_attempts == policy(max_attempts=1).max_attempts == 1
    assert policy(non_retryable_error_types=[1]).non_retryable_error_types == ("1",)
    assert policy(non_retryable_error_types=[True]).non_retryable_error_types == ("True",)
    # A malformed (unhashable) value fails as it always did.
    with pytest.raises(TypeError):
        policy(max_attempts=[1])


# -- the store's shortcuts against a real Redis -----------------------------------------


@pytest.fixture(params=["redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RedisTaskStore]:
    """A Redis TaskStore under a fresh prefix (single server or cluster), with the live
    agent "ag"."""
    async with redis_stores("codec", redis_url_of(request, request.param)) as stores:
        await live_agents(stores.agents, "ag", namespace=NS)
        yield stores.tasks


def _random_task(rng: random.Random, i: int) -> Task:
    def word() -> str:
        alphabet = string.ascii_letters + "é漢字🙂 /\\\"'\t\x00=:{}"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))

    policy = rng.choice([DEFAULT_RETRY_POLICY, RetryPolicy(
        rng.randint(1, 9), rng.random() * 3, rng.random() * 100, 1 + rng.random(),
        rng.choice(list(Jitter)), tuple(word() for _ in range(rng.randint(0, 2))))])
    return Task(
        id=f"t{i}-{word()}", capability=word() or "cap", namespace=NS,
        input=Payload(rng.randbytes(rng.randint(0, 30)),
                      {word(): rng.randbytes(4) for _ in range(rng.randint(0, 2))}),
        state=rng.choice(list(TaskState)), priority=rng.randint(-(2**31), 2**31 - 1),
        labels={word(): word() for _ in range(rng.randint(0, 3))}, retry_policy=policy,
        execution_timeout=rng.choice([0.0, rng.random() * 600]),
        fallback_capability=rng.choice(["", word()]),
        create_time=T0 + rng.random(), update_time=T0 + rng.random(),
        trace_context=rng.choice([{}, {"traceparent": f"00-{rng.randbytes(16).hex()}-01"}]),
        schedule_to_start_timeout=rng.choice([0.0, 0.1 + rng.random() * 50]),
        heartbeat_timeout=rng.choice([0.0, rng.random() * 30]),
        queue_deadline=rng.choice([0.0, T0 + 7.25]))


async def test_created_tasks_equal_the_stored_documents(store: RedisTaskStore) -> None:
    rng = random.Random(20261129)
    for batch in range(8):
        items = [(_random_task(rng, batch * 100 + i), rng.choice(["", f"rq{batch}-{i}"]))
                 for i in range(25)]
        results, full = await store.create_tasks(items, max_queued=0)
        assert not full and len(results) == len(items)
        stored = await store.get_tasks([t.id for t, _ in items])
        for (task, created, transition), (submitted, _), got in zip(
                results, items, stored, strict=True):
            assert created
            assert got is not None
            assert task == got, submitted
            assert len(transition.tasks) == 1 and transition.workflow is None
            assert transition.tasks[0].task == got and transition.tasks[0].previous_state is None
            assert task.state is TaskState.QUEUED and task.seq > 0
            expected = (submitted.update_time + submitted.schedule_to_start_timeout
                        if submitted.schedule_to_start_timeout > 0 else 0.0)
            assert task.queue_deadline == expected


async def test_create_over_an_existing_task_and_repeated_request_ids(
        store: RedisTaskStore) -> None:
    first = Task(id="x", capability="cap", namespace=NS, create_time=T0, update_time=T0,
                 schedule_to_start_timeout=5.0)
    [(stored, created, _)], _ = await store.create_tasks([(first, "rq")])
    assert created and stored.queue_deadline == T0 + 5.0
    # Same id again (a client-chosen id): refused ("exists" reply), the first stays.
    again = Task(id="x", capability="cap", namespace=NS, create_time=T0 + 1,
                 update_time=T0 + 1, labels={"k": "v"}, schedule_to_start_timeout=5.0)
    for items in ([(again, "")], [(again, "rq2")], [(first, "rq"), (again, "rq3")]):
        with pytest.raises(AlreadyExistsError) as err:
            await store.create_tasks(items)
        assert err.value.metadata == {"existing": "tasks/x"}
        assert err.value.message == "tasks/x already exists"
    assert await store.get_task("x") == stored
    # Replays of "rq" ("dup" replies) decode to exactly the stored task.
    results, full = await store.create_tasks([(again, "rq"), (first, "rq")])
    assert not full
    assert results == [(stored, False, Transition()), (stored, False, Transition())]


async def test_batch_replies_carry_leases_results_and_refusals(store: RedisTaskStore) -> None:
    tasks = [Task(id=f"b{i}", capability="cap", namespace=NS, create_time=T0,
                  update_time=T0, input=Payload(b"in", {"encoding": b"raw"}))
             for i in range(4)]
    await store.create_tasks([(t, "") for t in tasks])
    leases = await store.lease_batch(NS, ["cap"], "ag", now=T0 + 1, default_timeout=30,
                                     count=10)
    assert [x.task.id for x in leases] == ["b0", "b1", "b2", "b3"]
    for lease in leases:
        assert lease.task == await store.get_task(lease.task.id)
        assert lease.fencing_token == 1 and lease.deadline == T0 + 31
    out = Payload("ünï".encode(), {"k": b"\x00\xff"})
    results = await store.complete_many(
        [("b0", 1, out), ("b1", 7, out), ("nope", 1, out), ("b2", 1, out), ("b0", 1, out)],
        now=T0 + 2)
    ok, stale, missing, ok2, repeat = results
    assert isinstance(ok, Transition) and isinstance(ok2, Transition)
    assert isinstance(stale, StaleLeaseError) and stale.metadata["current_token"] == "1"
    assert isinstance(missing, NotFoundError)
    assert isinstance(repeat, Transition) and repeat.tasks == ()
    for tr, tid in ((ok, "b0"), (ok2, "b2")):
        (change,) = tr.tasks
        assert change.previous_state is TaskState.RUNNING
        assert change.task == await store.get_task(tid)
        assert change.task.state is TaskState.SUCCEEDED and change.task.output == out
    assert await store.lease_batch(NS, ["cap"], "ag", now=T0 + 3, default_timeout=30,
                                   count=5) == []

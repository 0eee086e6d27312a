"""Domain unit tests: DAG validation, retry decisions, token buckets, task versions.

Pure functions of ``server/domain``: no gRPC, no store, no event loop. The
task state machine is a table (``TASK_TRANSITIONS``) checked here for shape;
the conformance suite (``tests/conformance/test_task_store.py``) checks every
change each store reports against it.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from server.domain.dag import find_cycle, topological_order, validate_dag
from server.domain.errors import InvalidArgumentError
from server.domain.limits import bucket_has, bucket_take
from server.domain.models import (
    LIVE_TASK_STATES,
    TASK_TRANSITIONS,
    TERMINAL_TASK_STATES,
    Jitter,
    Payload,
    RetryPolicy,
    Task,
    TaskAttempt,
    TaskFailure,
    TaskState,
    WorkflowStep,
    evolve_task,
)
from server.domain.retry import RetryVerdict, backoff_delay, decide


def steps(spec: dict[str, tuple[str, ...]]) -> list[WorkflowStep]:
    return [WorkflowStep(id=k, capability="c", depends_on=v) for k, v in spec.items()]


def fields_of(error: InvalidArgumentError) -> dict[str, str]:
    return {v.field: v.description for v in error.violations}


# -- DAG validation ------------------------------------------------------------------


def test_a_valid_dag_comes_back_in_dependency_order() -> None:
    spec = {"writer": ("r1", "r2"), "plan": (), "r1": ("plan",), "r2": ("plan",),
            "review": ("writer",)}
    order = validate_dag(steps(spec))
    assert sorted(order) == sorted(spec)
    for node, deps in spec.items():
        assert all(order.index(d) < order.index(node) for d in deps), (node, order)


def test_a_cycle_is_refused_and_named_as_a_closed_path() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        validate_dag(steps({"a": ("b",), "b": ("c",), "c": ("a",), "d": ()}))
    message = str(caught.value)
    assert caught.value.reason == "WORKFLOW_CYCLE"
    path = message.split("cycle: ", 1)[1].split(" -> ")
    assert path[0] == path[-1] and set(path) == {"a", "b", "c"} and len(path) == 4
    # each arrow is a real dependency edge
    spec = {"a": "b", "b": "c", "c": "a"}
    assert all(spec[x] == y for x, y in itertools.pairwise(path))
    assert fields_of(caught.value) == {"workflow.steps": f"cycle: {' -> '.join(path)}"}


def test_duplicate_unknown_and_self_dependencies_name_their_fields() -> None:
    bad = [WorkflowStep(id="a", capability="c"),
           WorkflowStep(id="a", capability="c"),
           WorkflowStep(id="b", capability="c", depends_on=("nope", "b")),
           WorkflowStep(id="bad id!", capability="c")]
    with pytest.raises(InvalidArgumentError) as caught:
        validate_dag(bad)
    assert fields_of(caught.value) == {
        "workflow.steps[1].id": "duplicate step id 'a'",
        "workflow.steps[2].depends_on[0]": "unknown step 'nope'",
        "workflow.steps[2].depends_on[1]": "step 'b' depends on itself",
        "workflow.steps[3].id": "must be 1-64 letters, digits, '-' or '_'",
    }


@pytest.mark.parametrize(("count", "limit", "field_text"), [
    (0, 10, "a workflow needs at least one step"),
    (11, 10, "at most 10 steps, got 11"),
])
def test_empty_and_oversized_workflows_are_refused(count: int, limit: int,
                                                   field_text: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        validate_dag([WorkflowStep(id=f"s{i}", capability="c") for i in range(count)], limit)
    assert fields_of(caught.value) == {"workflow.steps": field_text}


def test_a_deep_chain_needs_no_recursion() -> None:
    n = 20_000  # far beyond the interpreter's recursion limit
    deps = {f"s{i}": ((f"s{i - 1}",) if i else ()) for i in range(n)}
    assert find_cycle(deps) is None
    assert topological_order(deps) == [f"s{i}" for i in range(n)]
    deps["s0"] = (f"s{n - 1}",)
    cycle = find_cycle(deps)
    assert cycle is not None and len(cycle) == n + 1 and cycle[0] == cycle[-1]


def test_random_graphs_agree_with_a_brute_force_cycle_check() -> None:
    rng = random.Random(7)
    for _ in range(300):
        names = [f"n{i}" for i in range(rng.randint(1, 8))]
        deps = {a: tuple(b for b in names if rng.random() < 0.25) for a in names}
        cycle = find_cycle(deps)
        order = topological_order(deps)
        has_cycle = len(order) < len(names)  # Kahn leaves cycle members out
        assert (cycle is not None) == has_cycle, deps
        if cycle:
            assert cycle[0] == cycle[-1]
            assert all(y in deps[x] for x, y in itertools.pairwise(cycle))


# -- task states and retries ---------------------------------------------------------


def test_the_state_machine_table() -> None:
    assert set(TASK_TRANSITIONS) == {None, *TaskState}
    assert TASK_TRANSITIONS[None] == {TaskState.PENDING, TaskState.QUEUED}
    assert TASK_TRANSITIONS[TaskState.SUCCEEDED] == frozenset()  # final
    for state, targets in TASK_TRANSITIONS.items():
        assert state not in targets
        if state in TERMINAL_TASK_STATES:  # only a human re-drive leaves them
            assert targets <= {TaskState.QUEUED, TaskState.PENDING}
    # every state can be reached, and every live state can end
    reachable = set().union(*TASK_TRANSITIONS.values())
    assert reachable == set(TaskState)
    for state in LIVE_TASK_STATES:
        assert TASK_TRANSITIONS[state] & (TERMINAL_TASK_STATES | {TaskState.QUEUED})


def test_every_state_is_either_live_or_terminal() -> None:
    assert LIVE_TASK_STATES | TERMINAL_TASK_STATES == set(TaskState)
    assert not LIVE_TASK_STATES & TERMINAL_TASK_STATES
    assert [s for s in TaskState if s.terminal] == sorted(TERMINAL_TASK_STATES)


def test_retry_decisions_follow_the_policy() -> None:
    policy = RetryPolicy(max_attempts=3, non_retryable_error_types=("BadInput",))
    transient = TaskFailure("Timeout")
    assert decide(policy, 1, transient).verdict is RetryVerdict.RETRY
    assert decide(policy, 2, transient).verdict is RetryVerdict.RETRY
    assert decide(policy, 3, transient).verdict is RetryVerdict.DEAD_LETTER
    assert decide(policy, 1, TaskFailure("BadInput")).verdict is RetryVerdict.FAIL
    assert decide(policy, 1, TaskFailure("X", non_retryable=True)).verdict is RetryVerdict.FAIL
    # a human re-drive at attempt 3 gives a fresh budget of three attempts
    assert decide(policy, 4, transient, budget_start=3).verdict is RetryVerdict.RETRY
    assert decide(policy, 6, transient, budget_start=3).verdict is RetryVerdict.DEAD_LETTER


def test_backoff_is_exponential_and_capped_without_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.5, multiplier=2.0, max_backoff=3.0,
                         jitter=Jitter.NONE)
    assert [backoff_delay(policy, a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_full_jitter_stays_within_the_exponential_envelope() -> None:
    policy = RetryPolicy(initial_backoff=0.5, multiplier=2.0, max_backoff=3.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 3.0)]:
        delays = [backoff_delay(policy, attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays), (attempt, max(delays))
        assert len(set(delays)) > 150  # randomised, so retries of many tasks spread out


# -- token buckets ---------------------------------------------------------------------


def test_a_bucket_starts_full_empties_and_refills_with_time() -> None:
    tokens, stamp = 0.0, 0.0
    taken = 0
    for _ in range(5):
        tokens, stamp, ok = bucket_take(tokens, stamp, rate=3.0, now=100.0)
        taken += ok
    assert taken == 3  # burst = rate
    assert not bucket_has(tokens, stamp, 3.0, 100.0)
    assert not bucket_has(tokens, stamp, 3.0, 100.3)  # 0.9 tokens
    assert bucket_has(tokens, stamp, 3.0, 100.34)
    assert bucket_take(tokens, stamp, 3.0, 200.0)[0] == 2.0  # never above the burst


def test_a_slow_bucket_still_allows_one() -> None:
    tokens, stamp, ok = bucket_take(0.0, 0.0, rate=0.1, now=5.0)
    assert ok and not bucket_has(tokens, stamp, 0.1, 14.0)
    assert bucket_has(tokens, stamp, 0.1, 15.0)


# -- task versions ---------------------------------------------------------------------


def test_evolve_task_equals_dataclasses_replace() -> None:
    base = Task(id="t1", capability="c", labels={"team": "a"},
                input=Payload(b"{}", {"encoding": b"json"}),
                attempts=(TaskAttempt(1, "agent", 1.0, 2.0, TaskFailure("X")),),
                trace_context={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    changes = {"state": TaskState.RUNNING, "agent_id": "a1", "fencing_token": 7,
               "lease_deadline": 9.5, "attempt": 2, "update_time": 3.0}
    evolved = evolve_task(base, **changes)
    assert evolved == dataclasses.replace(base, **changes)
    assert evolve_task(base) == base and evolve_task(base) is not base
    for f in dataclasses.fields(Task):  # every field is copied, not only the changed ones
        assert getattr(evolved, f.name) == changes.get(f.name, getattr(base, f.name)), f.name
    with pytest.raises(TypeError, match="nope"):
        evolve_task(base, nope=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolved.state = TaskState.QUEUED  # type: ignore[misc]

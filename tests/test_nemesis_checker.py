"""The nemesis checker on hand-made histories: a clean one passes, and each
broken one violates exactly the invariant it was built to break (so the
checker can fail, and says why)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtests import nemesis_checker as nc

A, B = "agents/a", "agents/b"


def r(t: float, type_: str, src: str = "driver", **kw: Any) -> dict[str, Any]:
    return {"t": t, "src": src, "type": type_, **kw}


def op(oid: str, f: str, t0: float, t1: float | None, *, code: str = "OK",
       invoke: dict[str, Any] | None = None, done: dict[str, Any] | None = None
       ) -> list[dict[str, Any]]:
    recs = [r(t0, "op", f=f, id=oid, phase="invoke", **(invoke or {}))]
    if t1 is not None:
        if code == "OK":
            recs.append(r(t1, "op", id=oid, phase="ok", **(done or {})))
        else:
            recs.append(r(t1, "op", id=oid, phase="fail", code=code, **(done or {})))
    return recs


def output(task: str, agent: str, token: int, p: str = "sdk0.1") -> str:
    return json.dumps({"agent": agent, "p": p, "task": task, "token": token}, sort_keys=True)


def attempt(n: int, agent: str, start: float, end: float | None,
            failure: str | None = None, message: str = "") -> dict[str, Any]:
    return {"attempt": n, "agent": agent, "start": start, "end": end,
            "failure": {"type": failure, "message": message} if failure else None}


def final(name: str, state: str, attempts: list[dict[str, Any]], *, out: str = "",
          rid: str = "", input_: str = '{"n": 1}', end: float | None = None) -> dict[str, Any]:
    return r(9.0, "final_task", task={
        "name": name, "state": state, "attempt": len(attempts), "labels": {"rid": rid} if rid
        else {}, "input": input_, "output": out, "attempts": attempts,
        "end_time": end if end is not None else (attempts[-1]["end"] if attempts else None)})


def execution(src: str, agent: str, task: str, token: int, t0: float, t1: float,
              **report: Any) -> list[dict[str, Any]]:
    kind = report.pop("kind", "result")
    text = report.pop("output", output(task, agent, token, src))
    return [r(t0, "agent", src, ev="exec_start", task=task, token=token, attempt=token,
              agent=agent),
            r(t1, "agent", src, ev="report", task=task, token=token, agent=agent, kind=kind,
              output=text, via=report.pop("via", "stream"))]


def clean() -> list[dict[str, Any]]:
    """One task submitted, run once, succeeded; agents registered; nothing wrong."""
    x = "tasks/x"
    return [
        r(0.0, "meta", ttl=0.75),
        r(0.1, "agent", "sdk0.1", ev="registered", agent=A),
        r(0.1, "agent", "sdk1.1", ev="registered", agent=B),
        *op("submit-1", "submit", 1.0, 1.01, invoke={"task_id": "", "request_id": "r1",
                                                     "input": '{"n": 1}'},
            done={"task": x}),
        *execution("sdk0.1", A, x, 1, 1.05, 1.2),
        final(x, "SUCCEEDED", [attempt(1, A, 1.02, 1.21)], out=output(x, A, 1), rid="r1"),
        r(9.1, "final_list", tasks=[{"name": x, "labels": {"rid": "r1"}}]),
    ]


def violations(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {k: v for k, v in nc.check(records).violations.items() if v}


def only(records: list[dict[str, Any]], invariant: str) -> list[str]:
    found = violations(records)
    assert set(found) == {invariant}, found
    return found[invariant]


def test_clean_history_has_no_violation() -> None:
    result = nc.check(clean())
    assert result.violation_count == 0, result.violations
    assert result.stats["tasks_succeeded"] == 1
    assert "violations per invariant" in result.render()


def test_lost_task() -> None:
    h = clean() + op("submit-2", "submit", 2.0, 2.01, invoke={"task_id": "", "request_id": "",
                                                              "input": '{"n": 2}'},
                     done={"task": "tasks/lost"})
    assert "lost" in only(h, "acked_submits_terminal")[0]


def test_task_still_running_after_settle() -> None:
    h = [x for x in clean() if x["type"] != "final_task"]
    h.append(final("tasks/x", "RUNNING", [attempt(1, A, 1.02, None)], rid="r1"))
    assert "still RUNNING" in only(h, "acked_submits_terminal")[0]


def test_cancelled_then_succeeded() -> None:
    h = clean() + op("cancel-9", "cancel", 1.1, 1.12, invoke={"task": "tasks/x"},
                     done={"state": "CANCELLED"})
    assert "CancelTask answered CANCELLED" in only(h, "terminal_state_stable")[0]


def test_output_not_from_latest_token() -> None:
    x = "tasks/x"
    h = [y for y in clean() if y["type"] != "final_task"]
    h += execution("sdk1.1", B, x, 2, 1.3, 1.4)
    h.append(final(x, "SUCCEEDED", [attempt(1, A, 1.02, 1.21, "AGENT_GONE", "gone"),
                                    attempt(2, B, 1.25, None)], out=output(x, A, 1),
                   rid="r1", end=1.5))
    msgs = violations(h)
    assert any("latest token is 2" in m for m in msgs["succeeded_output_latest_token"]), msgs
    # The same stale result also counts as accepted after its lease moved on.
    assert set(msgs) <= {"succeeded_output_latest_token", "stale_result_refused"}


def test_lease_after_gone() -> None:
    x = "tasks/x"
    h = [y for y in clean() if y["type"] != "final_task"]
    h.append(r(1.5, "agent_event", replica=0, agent=A, event="LEFT", state="GONE",
               event_time=1.45))
    h += execution("sdk0.1", A, x, 2, 2.05, 2.2)
    h.append(final(x, "SUCCEEDED", [attempt(1, B, 1.02, 1.3, "AGENT_GONE", "gone"),
                                    attempt(2, A, 2.0, 2.21)], out=output(x, A, 2), rid="r1"))
    assert "after it was seen GONE/DRAINING" in only(h, "no_lease_after_gone")[0]


def test_lease_to_draining_agent_bounded_by_receive_time() -> None:
    x = "tasks/x"
    h = [y for y in clean() if y["type"] != "final_task"]
    # An UPDATED event shows DRAINING; its event_time may predate the change, so
    # the bound is when the watcher got it (1.5), not the event_time (0.5).
    h.append(r(1.5, "agent_event", replica=0, agent=A, event="UPDATED", state="DRAINING",
               event_time=0.5))
    h += execution("sdk0.1", A, x, 1, 1.05, 1.2)[1:]
    h.append(final(x, "SUCCEEDED", [attempt(1, A, 1.02, 1.21)], out=output(x, A, 1), rid="r1"))
    assert not violations(h)
    h[-1] = final(x, "SUCCEEDED", [attempt(1, A, 1.6, 1.7)], out=output(x, A, 1), rid="r1")
    assert only(h, "no_lease_after_gone")


def test_stale_result_accepted_by_complete_task() -> None:
    x = "tasks/x"
    h = [y for y in clean() if y["type"] != "final_task"]
    h += execution("sdk1.1", B, x, 2, 1.3, 1.4)
    # A zombie (A, token 1) reports after attempt 2 started, and CompleteTask says OK.
    h += execution("raw0.1", A, x, 1, 1.05, 1.7, via="unary", output="zombie")[1:]
    h.append(r(1.71, "agent", "raw0.1", ev="unary_ack", task=x, token=1, code="OK"))
    h.append(final(x, "SUCCEEDED", [attempt(1, A, 1.02, 1.25, "LEASE_EXPIRED", "late"),
                                    attempt(2, B, 1.26, 1.41)], out=output(x, B, 2, "sdk1.1"),
                   rid="r1"))
    msgs = violations(h)
    assert any("lease had moved on: attempt 2 ran after it" in m
               for m in msgs["stale_result_refused"]), msgs
    assert set(msgs) <= {"stale_result_refused", "terminal_state_stable"}


def test_refused_result_became_output() -> None:
    x = "tasks/x"
    h = [*clean(), r(1.25, "agent", "sdk0.1", ev="ack", task=x, token=1,
                     outcome="STALE_LEASE")]
    assert "refused (STALE_LEASE)" in only(h, "stale_result_refused")[0]


def test_stale_refused_is_fine() -> None:
    x = "tasks/x"
    h = [y for y in clean() if y["type"] != "final_task"]
    h += execution("sdk1.1", B, x, 2, 1.3, 1.4)
    h += execution("raw0.1", A, x, 1, 1.05, 1.7, via="unary", output="zombie")[1:]
    h.append(r(1.71, "agent", "raw0.1", ev="unary_ack", task=x, token=1,
               code="FAILED_PRECONDITION"))
    h.append(final(x, "SUCCEEDED", [attempt(1, A, 1.02, 1.25, "LEASE_EXPIRED", "late"),
                                    attempt(2, B, 1.26, 1.41)], out=output(x, B, 2, "sdk1.1"),
                   rid="r1"))
    assert not violations(h)


def zombie(code: str, report_t: float, field: str = "code") -> list[dict[str, Any]]:
    """Attempt 1 on A expired at 1.25, attempt 2 on B ran 1.26-1.41; A reports late."""
    x = "tasks/x"
    h = [y for y in clean() if y["type"] != "final_task"]
    h += execution("sdk1.1", B, x, 2, 1.3, 1.4)
    via = "unary" if field == "code" else "stream"
    h += execution("raw0.1", A, x, 1, 1.05, report_t, via=via, output="zombie")[1:]
    ev = "unary_ack" if field == "code" else "ack"
    h.append(r(report_t + 0.01, "agent", "raw0.1", ev=ev, task=x, token=1, **{field: code}))
    h.append(final(x, "SUCCEEDED", [attempt(1, A, 1.02, 1.25, "LEASE_EXPIRED", "late"),
                                    attempt(2, B, 1.26, 1.41)], out=output(x, B, 2, "sdk1.1"),
                   rid="r1"))
    # A watcher saw it end (the upper bound of its end that refusals are held to).
    h.append(r(1.45, "task_event", replica=0, task=x, state="SUCCEEDED", attempt=2,
               output=output(x, B, 2, "sdk1.1")))
    return h


def test_refusal_says_stale_after_the_task_ended() -> None:
    assert "wants NOT_RUNNING" in only(zombie("ABORTED", 1.7), "refusal_outcome_matches")[0]
    assert "wants NOT_RUNNING" in only(zombie("STALE_LEASE", 1.7, "outcome"),
                                       "refusal_outcome_matches")[0]
    assert not violations(zombie("NOT_RUNNING", 1.7, "outcome"))


def test_refusal_says_ended_while_the_task_is_live() -> None:
    # Reported at 1.3 (attempt 2 runs until 1.41): the task is live, so STALE_LEASE.
    assert not violations(zombie("STALE_LEASE", 1.3, "outcome"))
    assert not violations(zombie("ABORTED", 1.3))
    msg = only(zombie("FAILED_PRECONDITION", 1.3), "refusal_outcome_matches")[0]
    assert "still live" in msg


def test_stale_result_acknowledged_accepted_on_the_stream() -> None:
    msgs = violations(zombie("ACCEPTED", 1.7, "outcome"))
    assert any("ACCEPTED ack" in m for m in msgs["stale_result_refused"]), msgs


def test_one_request_id_two_tasks() -> None:
    h = clean() + op("submit-2", "submit", 1.5, 1.51, invoke={"task_id": "", "request_id": "r1",
                                                              "input": '{"n": 1}'},
                     done={"task": "tasks/other"})
    h.append(final("tasks/other", "SUCCEEDED", [attempt(1, A, 1.52, 1.6)],
                   out=output("tasks/other", A, 1), rid="r1"))
    h += execution("sdk0.1", A, "tasks/other", 1, 1.53, 1.59)
    h.append(r(9.2, "final_list", tasks=[{"name": "tasks/other", "labels": {"rid": "r1"}}]))
    msgs = only(h, "idempotent_submit")
    assert any("acknowledged as 2 tasks" in m for m in msgs)
    assert any("2 tasks exist" in m for m in msgs)


def test_chosen_task_id_other_request_id_accepted() -> None:
    t = "tasks/t1"
    h = [r(0.0, "meta", ttl=0.75), r(0.1, "agent", "sdk0.1", ev="registered", agent=A)]
    h += op("submit-1", "submit", 1.0, 1.01, invoke={"task_id": "t1", "request_id": "r1",
                                                     "input": '{"n": 1}'}, done={"task": t})
    h += op("submit-2", "submit", 1.1, 1.11, invoke={"task_id": "t1", "request_id": "r2",
                                                     "input": '{"n": -1}'}, done={"task": t})
    h += execution("sdk0.1", A, t, 1, 1.05, 1.2)
    h.append(final(t, "SUCCEEDED", [attempt(1, A, 1.02, 1.21)], out=output(t, A, 1), rid="r2",
                   input_='{"n": -1}'))
    msgs = only(h, "idempotent_submit")
    assert any("2 request_ids" in m for m in msgs)
    assert any("the stored task has request_id r2" in m for m in msgs)


def test_chosen_task_id_conflict_is_fine() -> None:
    t = "tasks/t1"
    h = [r(0.0, "meta", ttl=0.75), r(0.1, "agent", "sdk0.1", ev="registered", agent=A)]
    h += op("submit-1", "submit", 1.0, 1.01, invoke={"task_id": "t1", "request_id": "r1",
                                                     "input": '{"n": 1}'}, done={"task": t})
    h += op("submit-2", "submit", 1.1, 1.11, code="ALREADY_EXISTS",
            invoke={"task_id": "t1", "request_id": "r2", "input": '{"n": -1}'})
    h += op("submit-3", "submit", 1.2, 1.21, invoke={"task_id": "t1", "request_id": "r1",
                                                     "input": '{"n": 1}'}, done={"task": t})
    h += execution("sdk0.1", A, t, 1, 1.05, 1.2)
    h.append(final(t, "SUCCEEDED", [attempt(1, A, 1.02, 1.21)], out=output(t, A, 1), rid="r1"))
    assert not violations(h)


def workflow(state: str, steps: dict[str, tuple[str, list[str]]], fails: bool = False
             ) -> list[dict[str, Any]]:
    recs = op("workflow-1", "workflow", 1.0, 1.01, invoke={"request_id": "w1", "fails": fails},
              done={"workflow": "workflows/w", "steps": {s: f"tasks/w-{s}" for s in steps}})
    recs.append(r(9.0, "final_workflow", workflow={
        "name": "workflows/w", "state": state, "failure_reason": "",
        "steps": [{"id": s, "task": f"tasks/w-{s}", "state": st, "depends_on": deps}
                  for s, (st, deps) in steps.items()]}))
    t = 1.1
    for s, (st, _) in steps.items():
        name = f"tasks/w-{s}"
        if st == "SUCCEEDED":
            recs += execution("sdk0.1", A, name, 1, t, t + 0.05)
            recs.append(final(name, st, [attempt(1, A, t - 0.01, t + 0.06)],
                              out=output(name, A, 1)))
        elif st == "FAILED":
            recs += execution("sdk0.1", A, name, 1, t, t + 0.05, kind="failure", output="boom")
            recs.append(final(name, st, [attempt(1, A, t - 0.01, t + 0.06, "Boom", "boom")]))
        else:
            recs.append(final(name, st, []))
        t += 0.1
    return [r(0.0, "meta", ttl=0.75), r(0.1, "agent", "sdk0.1", ev="registered", agent=A),
            *recs]


def test_workflows_consistent() -> None:
    assert not violations(workflow("SUCCEEDED", {"a": ("SUCCEEDED", []),
                                                 "b": ("SUCCEEDED", ["a"])}))
    assert not violations(workflow("FAILED", {"a": ("SUCCEEDED", []), "b": ("FAILED", ["a"]),
                                              "c": ("CANCELLED", ["b"])}, fails=True))


def test_workflow_succeeded_with_failed_step() -> None:
    h = workflow("SUCCEEDED", {"a": ("SUCCEEDED", []), "b": ("FAILED", ["a"])})
    assert any("SUCCEEDED but steps" in m for m in only(h, "workflow_consistency"))


def test_workflow_dependent_of_failed_step_succeeded() -> None:
    h = workflow("FAILED", {"a": ("FAILED", []), "b": ("SUCCEEDED", ["a"])}, fails=True)
    msgs = only(h, "workflow_consistency")
    assert any("upstream ['a'] failed" in m for m in msgs)


def test_workflow_step_ran_before_dependency_ended() -> None:
    h = workflow("SUCCEEDED", {"a": ("SUCCEEDED", []), "b": ("SUCCEEDED", ["a"])})
    # A stamped start_time before the dependency's end is no proof (a store stall
    # between stamping and storing the lease): only the agent's receive time is.
    for x in h:
        if x["type"] == "final_task" and x["task"]["name"] == "tasks/w-b":
            x["task"]["attempts"][0]["start"] = 1.0
    assert not violations(h)
    for x in h:
        if x.get("ev") == "exec_start" and x["task"] == "tasks/w-b":
            x["t"] = 1.12  # a ended at 1.16
    assert any("before dependency a ended" in m for m in only(h, "workflow_consistency"))


def test_workflow_step_got_wrong_upstream_output() -> None:
    h = workflow("SUCCEEDED", {"a": ("SUCCEEDED", []), "b": ("SUCCEEDED", ["a"])})
    for x in h:
        if x.get("ev") == "exec_start" and x["task"] == "tasks/w-b":
            x["upstream"] = {"a": output("tasks/w-a", A, 1)}
    assert not violations(h)
    for x in h:
        if x.get("ev") == "exec_start" and x["task"] == "tasks/w-b":
            x["upstream"] = {"a": "stale"}
    assert any("as the output of a" in m for m in only(h, "workflow_consistency"))


def lock(oid: str, owner: str, token: int, t0: float, t1: float, expire: float
         ) -> list[dict[str, Any]]:
    return op(oid, "lock_acquire", t0, t1, invoke={"lock": "l", "owner": owner},
              done={"token": token, "expire": expire})


def release(oid: str, token: int, t0: float) -> list[dict[str, Any]]:
    return op(oid, "lock_release", t0, t0 + 0.01, invoke={"lock": "l", "owner": "x",
                                                          "token": token})


def test_locks_clean() -> None:
    h = [*lock("a", "L0", 1, 1.0, 1.01, 2.0), *release("ra", 1, 1.2),
         *lock("b", "L1", 2, 1.1, 1.25, 2.25),
         *op("p", "lock_put", 1.3, 1.31, invoke={"lock": "l", "owner": "L1", "token": 2,
                                                 "key": "k", "value": {}},
             done={"version": 1}),
         *op("p2", "lock_put", 1.4, 1.41, code="ABORTED",
             invoke={"lock": "l", "owner": "L0", "token": 1, "key": "k", "value": {}})]
    assert not violations(h)


def test_lock_granted_while_held() -> None:
    h = [*lock("a", "L0", 1, 1.0, 1.01, 2.0), *lock("b", "L1", 2, 1.1, 1.5, 2.5)]
    assert "while token 1" in only(h, "lock_safety")[0]


def test_fencing_token_went_down() -> None:
    h = [*lock("a", "L0", 5, 1.0, 1.01, 2.0), *release("ra", 5, 1.05),
         *lock("b", "L1", 3, 1.2, 1.25, 2.2)]
    assert "fencing tokens went down" in only(h, "lock_safety")[0]


def test_stale_fenced_write_accepted() -> None:
    h = [*lock("a", "L0", 1, 1.0, 1.01, 1.8),
         *lock("b", "L1", 2, 1.1, 1.9, 2.7),
         *op("p", "lock_put", 2.0, 2.01, invoke={"lock": "l", "owner": "L0", "token": 1,
                                                 "key": "k", "value": {}},
             done={"version": 3})]
    msgs = only(h, "lock_safety")
    assert any("accepted after token 2 was granted" in m for m in msgs)
    assert any("after its lease ended" in m for m in msgs)


def cas_put(oid: str, t0: float, t1: float | None, expected: int, value: Any,
            version: int | None = None, code: str = "OK") -> list[dict[str, Any]]:
    return op(oid, "cas_put", t0, t1, code=code,
              invoke={"key": "k", "client": 0, "expected": expected, "value": value},
              done={"version": version} if code == "OK" else None)


def cas_get(oid: str, t0: float, t1: float, version: int, value: Any) -> list[dict[str, Any]]:
    return op(oid, "cas_get", t0, t1, invoke={"key": "k", "client": 0},
              done={"version": version, "value": value})


def test_cas_chain_clean() -> None:
    h = [*cas_get("g0", 0.9, 0.91, 0, None),
         *cas_put("w1", 1.0, 1.1, 0, {"s": 1}, 1),
         *cas_put("w2", 1.05, 1.15, 0, {"s": 2}, code="ABORTED"),
         *cas_put("w3", 1.2, None, 1, {"s": 3}),  # indeterminate: may have written v2
         *cas_get("g1", 1.3, 1.31, 2, {"s": 3}),
         r(9.0, "final_state", key="k", version=2, value={"s": 3})]
    assert not violations(h)


def test_cas_lost_update() -> None:
    h = [*cas_put("w1", 1.0, 1.1, 0, {"s": 1}, 1), *cas_put("w2", 1.05, 1.12, 0, {"s": 2}, 1)]
    msgs = only(h, "cas_linearizable")
    assert any("lost update" in m for m in msgs)


def test_cas_stale_read() -> None:
    h = [*cas_put("w1", 1.0, 1.1, 0, {"s": 1}, 1), *cas_get("g", 1.2, 1.21, 0, None)]
    assert "stale read" in only(h, "cas_linearizable")[0]


def test_cas_phantom_version() -> None:
    h = [*cas_put("w1", 1.0, 1.1, 0, {"s": 1}, 1),
         r(9.0, "final_state", key="k", version=3, value={"s": 9})]
    msgs = only(h, "cas_linearizable")
    assert any("version 2 exists" in m for m in msgs)


def test_cas_real_time_order() -> None:
    h = [*cas_put("w1", 1.0, 1.1, 1, {"s": 1}, 2), *cas_put("w2", 1.2, 1.3, 0, {"s": 2}, 1)]
    assert any("started after CAS w1" in m for m in only(h, "cas_linearizable"))


def fault(fid: str, kind: str, proc: str, t0: float, t1: float) -> list[dict[str, Any]]:
    return [r(t0, "fault", fid=fid, kind=kind, phase="start", proc=proc),
            r(t1, "fault", fid=fid, phase="end")]


def test_paused_agent_never_declared_gone() -> None:
    h = clean() + fault("1", "agent_pause", "sdk0.1", 2.0, 4.0)
    assert "not declared GONE" in only(h, "hung_agent_gone")[0]
    h.append(r(3.0, "agent_event", replica=0, agent=A, event="LEFT", state="GONE",
               event_time=2.9))
    assert not violations(h)


def test_stalled_raw_agent_work_stream_left_open() -> None:
    h = [r(0.0, "meta", ttl=0.75), r(0.1, "agent", "raw0.1", ev="registered", agent=A),
         *fault("1", "hb_stall", "raw0.1", 2.0, 4.0),
         r(2.9, "agent_event", replica=0, agent=A, event="LEFT", state="GONE", event_time=2.8)]
    assert "not closed with FAILED_PRECONDITION" in only(h, "hung_agent_gone")[0]
    h.append(r(2.85, "agent", "raw0.1", ev="work_end", agent=A, code="FAILED_PRECONDITION",
               by="server"))
    assert not violations(h)


def test_orphan_work_stream_given_work() -> None:
    h = [*clean(), r(3.0, "agent", "raw0.1", ev="probe", agent="agents/p", code="",
                     assignments=1)]
    msgs = only(h, "orphan_stream_refused")
    assert len(msgs) == 2


def test_recovery_time_of_an_agent_kill() -> None:
    x = "tasks/x"
    h = [y for y in clean() if y["type"] != "final_task"]
    h += fault("1", "agent_kill", "sdk0.1", 1.1, 1.15)
    h += execution("sdk1.1", B, x, 2, 1.95, 2.0)
    h.append(final(x, "SUCCEEDED", [attempt(1, A, 1.02, 1.9, "AGENT_GONE", "gone"),
                                    attempt(2, B, 1.92, 2.1)], out=output(x, B, 2, "sdk1.1"),
                   rid="r1"))
    result = nc.check(h)
    assert result.violation_count == 0, result.violations
    assert result.recovery["agent_kill"] == [pytest.approx(1.0)]
    assert result.faults == {"agent_kill": 1}


def test_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in clean()) + "\n")
    assert nc.check(nc.load(path)).violation_count == 0


def test_one_submit_call_two_tasks() -> None:
    h = clean() + op("submit-7", "submit", 2.0, 2.01, invoke={"task_id": "", "request_id": "",
                                                              "input": '{"n": 7}'},
                     done={"task": "tasks/p"})
    for name in ("tasks/p", "tasks/q"):
        h += execution("sdk0.1", A, name, 1, 2.05, 2.1)
        h.append(final(name, "SUCCEEDED", [attempt(1, A, 2.02, 2.11)], out=output(name, A, 1),
                       input_='{"n": 7}'))
    h.append(r(9.3, "final_list", tasks=[{"name": n, "labels": {"call": "submit-7"}}
                                         for n in ("tasks/p", "tasks/q")]))
    assert "made 2 tasks" in only(h, "idempotent_submit")[0]


def test_submit_accepted_while_draining() -> None:
    h = [r(0.0, "meta", ttl=0.75),
         r(1.0, "fault", fid="1", kind="replica_term", phase="start", replica=0),
         r(3.0, "fault", fid="1", phase="end", exited=2.5, proxy="p0"),
         *op("submit-1", "submit", 1.1, 1.11, invoke={"task_id": "", "request_id": "",
                                                      "input": "{}"},
             done={"task": "tasks/early", "target": "p0"}),
         *op("submit-2", "submit", 1.5, 1.51, invoke={"task_id": "", "request_id": "",
                                                      "input": "{}"},
             done={"task": "tasks/late", "target": "p0"}),
         *op("submit-3", "submit", 1.5, 1.51, invoke={"task_id": "", "request_id": "",
                                                      "input": "{}"},
             done={"task": "tasks/other", "target": "p1"}),
         *op("submit-4", "submit", 1.6, 1.61, code="UNAVAILABLE",
             invoke={"task_id": "", "request_id": "", "input": "{}"})]
    for name in ("tasks/early", "tasks/late", "tasks/other"):
        h += execution("sdk0.1", A, name, 1, 1.7, 1.8)
        h.append(final(name, "SUCCEEDED", [attempt(1, A, 1.65, 1.81)], out=output(name, A, 1),
                       input_="{}"))
    msgs = only(h, "drain_refuses_submits")
    assert len(msgs) == 1 and "tasks/late" in msgs[0]


def test_stalled_raw_agent_stream_closed_when_gone_late() -> None:
    """A frozen machine delays GONE past the stall's end: the stream closes at GONE."""
    h = [r(0.0, "meta", ttl=0.75), r(0.1, "agent", "raw0.1", ev="registered", agent=A),
         *fault("1", "hb_stall", "raw0.1", 2.0, 4.0),
         r(4.45, "agent_event", replica=0, agent=A, event="LEFT", state="GONE", event_time=4.4),
         r(4.8, "agent", "raw0.1", ev="work_end", agent=A, code="FAILED_PRECONDITION",
           by="server")]
    assert not violations(h)
    h[-1]["t"] = 5.0  # 0.6 s after GONE: the session outlived the agent
    assert "not closed with FAILED_PRECONDITION" in only(h, "hung_agent_gone")[0]


def test_status_masked_by_grpc_python_counts_only_with_its_own_text() -> None:
    h = [r(0.0, "meta", ttl=0.75), r(0.1, "agent", "raw0.1", ev="registered", agent=A),
         *fault("1", "hb_stall", "raw0.1", 2.0, 4.0),
         r(2.9, "agent_event", replica=0, agent=A, event="LEFT", state="GONE", event_time=2.8),
         r(2.85, "agent", "raw0.1", ev="work_end", agent=A, code="INTERNAL", by="server",
           detail="Internal error from Core")]
    assert not violations(h)
    h[-1]["detail"] = "internal error; see the server log"  # the server's own INTERNAL
    assert "not closed with FAILED_PRECONDITION" in only(h, "hung_agent_gone")[0]

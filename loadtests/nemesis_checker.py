"""The history checker of the nemesis campaign: pure functions over a recorded history.

A history is a list of JSON records (one JSONL file, see ``loadtests/nemesis.py``
for who writes what). Every record has ``t`` (``time.time()`` of the process that
wrote it: all processes run on one machine, so these clocks are one clock),
``src`` (the process) and ``type``. Nothing here talks to a server: the checker
reads only the history, so a recorded failing history can be re-checked, and
the unit tests feed it hand-made ones.

Clocks. Server timestamps (attempt start/end, agent event times, lock expiry)
come from ``time.time()`` in the server processes; agent and driver records
from ``time.time()`` in theirs. They are compared directly, with a tolerance
``TOL`` (10 ms) that covers float/Timestamp rounding and the time between a
process reading its clock and writing the record. Every comparison is made in
the direction where the recorded time is a *bound* on the real one (an ``ok``
record is after the server acted, an ``invoke`` record before it; an attempt's
start time is read before the lease is stored), so a violation reported is a
real one, never an artefact of the order in which records were written.

Invariants (each a function ``check_<name>(h) -> list[str]`` of messages):

- ``acked_submits_terminal``: every acknowledged submit (and every step task of
  an acknowledged workflow) has a final state, and it is terminal.
- ``terminal_state_stable``: a terminal state a client saw (a CancelTask
  answer, a CompleteTask OK, a WatchTasks event) is the final one.
- ``succeeded_output_latest_token``: a SUCCEEDED task's output is the one an
  agent reported under the task's latest fencing token (= its last attempt).
- ``no_lease_after_gone``: no attempt starts on an agent after it was seen
  GONE or DRAINING.
- ``stale_result_refused``: a result/failure reported after its lease had
  moved on (a newer attempt started, or the attempt was ended by the server)
  is never accepted, and a refused result never becomes the output.
- ``refusal_outcome_matches``: a refusal names the right reason (STALE_LEASE /
  ABORTED while the task is live, NOT_RUNNING / FAILED_PRECONDITION once ended).
- ``idempotent_submit``: one request_id, one task; a chosen task_id with another
  request_id is ALREADY_EXISTS and the stored task is the first one; and one
  SubmitTask call never makes two tasks (each call is labelled).
- ``workflow_consistency``: a workflow's terminal state agrees with its steps,
  and a step ran only after its dependencies succeeded.
- ``lock_safety``: lock grants never overlap, fencing tokens only grow, and a
  fenced write under a superseded or expired grant is refused.
- ``cas_linearizable``: single-key compare-and-set is linearizable (versions
  form one chain, one write per version, real-time order respected, reads
  return what the write of that version wrote).
- ``hung_agent_gone``: an agent whose beats stopped for longer than the session
  TTL (SIGSTOP, heartbeat-only stall, silent partition) is declared GONE, and a
  stalled raw agent's work stream is closed by the server (FAILED_PRECONDITION)
  once it is GONE (grpc-python may show that status as INTERNAL "Internal error
  from Core": ``MASKED_DETAIL``).
- ``orphan_stream_refused``: a work stream opened for an agent with no
  heartbeat session gets FAILED_PRECONDITION and no assignment.
- ``drain_refuses_submits``: a replica that got SIGTERM (from 0.2 s after it,
  until it exits) acknowledges no SubmitTask.
"""

from __future__ import annotations

import bisect
import itertools
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

TOL = 0.010
"""Seconds of slack on every cross-process time comparison (see the module doc)."""
GONE_SLACK = 0.5
"""Seconds after a stall ends by which the GONE of the stalled agent must be visible."""

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "DEAD_LETTERED"})
REFUSED_ACKS = frozenset({"STALE_LEASE", "NOT_RUNNING"})
REFUSED_CODES = frozenset({"ABORTED", "FAILED_PRECONDITION", "NOT_FOUND"})
AGENT_FAULTS = frozenset({"agent_kill", "agent_pause", "hb_stall", "work_break", "net_cut",
                          "net_reset", "net_delay"})
MESH_FAULTS = frozenset({"replica_kill", "replica_term", "replica_pause", "redis_restart",
                         "nats_restart", "redis_reply_loss"})

Rec = dict[str, Any]


def load(path: str | Path) -> list[Rec]:
    """Read a JSONL history."""
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if line:
                out.append(json.loads(line))
    return out


@dataclass
class Op:
    """One client operation: its invoke record and its completion (if any)."""

    f: str
    id: str
    invoke: Rec
    done: Rec | None = None

    @property
    def t0(self) -> float:
        """When it was invoked."""
        return float(self.invoke["t"])

    @property
    def t1(self) -> float:
        """When it completed (inf when it never did)."""
        return float(self.done["t"]) if self.done is not None else float("inf")

    @property
    def ok(self) -> bool:
        """Completed successfully."""
        return self.done is not None and self.done.get("phase") == "ok"

    @property
    def code(self) -> str:
        """Status code name of the completion ("OK", "ABORTED", ... or "" when none)."""
        if self.done is None:
            return ""
        return "OK" if self.ok else str(self.done.get("code", ""))

    @property
    def definite_fail(self) -> bool:
        """Failed with a code that says nothing was done."""
        return self.code in {"ABORTED", "ALREADY_EXISTS", "FAILED_PRECONDITION", "NOT_FOUND",
                             "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}

    def get(self, key: str, default: Any = None) -> Any:
        """A field of the invoke record, else of the completion."""
        if key in self.invoke:
            return self.invoke[key]
        return self.done.get(key, default) if self.done is not None else default


@dataclass
class Report:
    """What one execution made of the task's lease: a result or failure it reported."""

    src: str
    task: str
    token: int
    agent: str
    kind: str
    output: str
    via: str
    t: float
    acks: list[str] = field(default_factory=list)
    """Outcomes the work stream answered (STALE_LEASE / NOT_RUNNING; ACCEPTED too
    when the agent asked for every report to be acknowledged)."""
    ack_t: float = 0.0
    """When the (first) answer arrived."""
    unary: str = ""
    """Status code of a CompleteTask report ("OK", "ABORTED", ...)."""

    @property
    def refusal(self) -> str:
        """The refusal it got ("STALE_LEASE", "ABORTED", ...), "" when none."""
        for a in self.acks:
            if a in REFUSED_ACKS:
                return a
        return self.unary if self.unary in REFUSED_CODES else ""

    @property
    def acked_ok(self) -> bool:
        """The server said it accepted this report."""
        return self.unary == "OK" or "ACCEPTED" in self.acks


class History:
    """A history indexed for the checks."""

    def __init__(self, records: Iterable[Rec]) -> None:
        """Index ``records`` (any order; sorted by time here)."""
        self.records = sorted(records, key=lambda r: float(r.get("t", 0.0)))
        self.meta: Rec = {}
        self.ops: dict[str, Op] = {}
        self.finals: dict[str, Rec] = {}
        self.final_workflows: dict[str, Rec] = {}
        self.final_state: dict[str, Rec] = {}
        self.listed: list[Rec] = []
        self.reports: list[Report] = []
        self.execs: list[Rec] = []
        self.agent_events: list[Rec] = []
        self.task_events: list[Rec] = []
        self.faults: dict[str, Rec] = {}
        self.registered: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self.agent_recs: list[Rec] = []
        self.settle: Rec = {}
        by_key: dict[tuple[str, str, int], Report] = {}
        for r in self.records:
            typ = r.get("type")
            if typ == "meta":
                self.meta = r
            elif typ == "op":
                oid = str(r["id"])
                if r.get("phase") == "invoke":
                    self.ops[oid] = Op(str(r["f"]), oid, r)
                elif oid in self.ops:
                    self.ops[oid].done = r
            elif typ == "final_task":
                self.finals[str(r["task"]["name"])] = r["task"]
            elif typ == "final_list":
                self.listed.extend(r["tasks"])
            elif typ == "final_workflow":
                self.final_workflows[str(r["workflow"]["name"])] = r["workflow"]
            elif typ == "final_state":
                self.final_state[str(r["key"])] = r
            elif typ == "agent_event":
                self.agent_events.append(r)
            elif typ == "task_event":
                self.task_events.append(r)
            elif typ == "settle":
                self.settle = r
            elif typ == "fault":
                fid = str(r["fid"])
                if r.get("phase") == "start":
                    self.faults[fid] = dict(r)
                elif fid in self.faults:
                    self.faults[fid]["t_end"] = float(r["t"])
                    self.faults[fid].update({k: v for k, v in r.items()
                                             if k not in ("t", "phase", "type")})
            elif typ == "agent":
                self.agent_recs.append(r)
                ev = r.get("ev")
                src = str(r.get("src", ""))
                if ev == "registered":
                    self.registered[src].append((float(r["t"]), str(r["agent"])))
                elif ev == "exec_start":
                    self.execs.append(r)
                elif ev == "report":
                    rep = Report(src, str(r["task"]), int(r["token"]), str(r.get("agent", "")),
                                 str(r["kind"]), str(r.get("output", "")), str(r.get("via", "")),
                                 float(r["t"]))
                    self.reports.append(rep)
                    by_key[(src, rep.task, rep.token)] = rep
                elif ev == "ack":
                    rep2 = by_key.get((src, str(r["task"]), int(r["token"])))
                    if rep2 is not None:
                        rep2.acks.append(str(r["outcome"]))
                        rep2.ack_t = rep2.ack_t or float(r["t"])
                elif ev == "unary_ack":
                    rep3 = by_key.get((src, str(r["task"]), int(r["token"])))
                    if rep3 is not None:
                        rep3.unary = str(r["code"])
                        rep3.ack_t = float(r["t"])
        # Server-side "this agent is no longer ACTIVE" bounds (see no_lease_after_gone).
        self.gone_at: dict[str, float] = {}
        for e in self.agent_events:
            agent = str(e["agent"])
            bounds = []
            if e.get("event") == "LEFT" and e.get("event_time"):
                bounds.append(float(e["event_time"]))
            if e.get("state") in ("GONE", "DRAINING"):
                bounds.append(float(e["t"]))
            if bounds:
                self.gone_at[agent] = min(self.gone_at.get(agent, float("inf")), *bounds)

    def ops_of(self, *fs: str) -> list[Op]:
        """Operations of these kinds, by invoke time."""
        return [o for o in self.ops.values() if o.f in fs]

    def agent_ids(self, src: str, at: float | None = None) -> list[str]:
        """Agent ids a process registered (the latest one before ``at`` when given)."""
        regs = self.registered.get(src, [])
        if at is None:
            return [a for _, a in regs]
        before = [a for t, a in regs if t <= at]
        return before[-1:] if before else []


def _parse(output: str) -> dict[str, Any]:
    try:
        value = json.loads(output) if output else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _acked_task_names(h: History) -> dict[str, str]:
    """Task names the mesh acknowledged, with what acknowledged them."""
    names: dict[str, str] = {}
    for op in h.ops_of("submit"):
        if op.ok and op.done is not None:
            names.setdefault(str(op.done["task"]), f"submit {op.id}")
    for op in h.ops_of("workflow"):
        if op.ok and op.done is not None:
            for step, task in dict(op.done.get("steps", {})).items():
                names.setdefault(str(task), f"workflow {op.done.get('workflow')} step {step}")
    return names


# ---------------------------------------------------------------------- invariants


def check_acked_submits_terminal(h: History) -> list[str]:
    """Every acknowledged task reached a terminal state; none lost."""
    out = []
    for name, why in sorted(_acked_task_names(h).items()):
        final = h.finals.get(name)
        if final is None:
            out.append(f"{name} ({why}): acknowledged but absent at the end (lost)")
        elif final["state"] not in TERMINAL:
            out.append(f"{name} ({why}): still {final['state']} after the mesh settled "
                       f"(attempt {final.get('attempt')})")
    return out


def check_terminal_state_stable(h: History) -> list[str]:
    """A terminal state any client saw is the task's final state (one terminal state)."""
    out = []
    for op in h.ops_of("cancel"):
        if not op.ok or op.done is None:
            continue
        seen = str(op.done.get("state", ""))
        final = h.finals.get(str(op.invoke["task"]))
        if seen in TERMINAL and final is not None and final["state"] != seen:
            out.append(f"{op.invoke['task']}: CancelTask answered {seen} at "
                       f"{op.t1:.3f}, final state is {final['state']}")
    for rep in h.reports:
        if rep.acked_ok and rep.kind == "result":
            final = h.finals.get(rep.task)
            if final is None:
                continue
            if final["state"] != "SUCCEEDED" or final.get("output", "") != rep.output:
                how = "CompleteTask OK" if rep.unary == "OK" else "ACCEPTED ack"
                out.append(f"{rep.task}: {how} for token {rep.token} from {rep.src}, "
                           f"but the task ended {final['state']} with output "
                           f"{final.get('output', '')!r}")
    for ev in h.task_events:
        state = str(ev.get("state", ""))
        final = h.finals.get(str(ev["task"]))
        if state not in TERMINAL or final is None:
            continue
        if final["state"] != state or (state == "SUCCEEDED"
                                       and final.get("output", "") != ev.get("output", "")):
            out.append(f"{ev['task']}: WatchTasks on replica {ev.get('replica')} saw {state} "
                       f"(output {ev.get('output', '')!r}) at {float(ev['t']):.3f}, final "
                       f"{final['state']} (output {final.get('output', '')!r})")
    return out


def check_succeeded_output_latest_token(h: History) -> list[str]:
    """A SUCCEEDED task's output was reported under its latest fencing token."""
    out = []
    reported = {(r.task, r.output) for r in h.reports if r.kind == "result"}
    for name, final in sorted(h.finals.items()):
        if final["state"] != "SUCCEEDED":
            continue
        output = str(final.get("output", ""))
        parsed = _parse(output)
        attempt = int(final.get("attempt", 0))
        attempts = final.get("attempts", [])
        last_agent = str(attempts[-1]["agent"]) if attempts else ""
        if not parsed:
            out.append(f"{name}: SUCCEEDED with an output no agent writes: {output!r}")
            continue
        if parsed.get("task") != name:
            out.append(f"{name}: output belongs to {parsed.get('task')}: {output!r}")
        if int(parsed.get("token", -1)) != attempt:
            out.append(f"{name}: output reported under token {parsed.get('token')} by "
                       f"{parsed.get('agent')}, but the latest token is {attempt}")
        elif last_agent and str(parsed.get("agent")) != last_agent:
            out.append(f"{name}: output from {parsed.get('agent')}, but attempt {attempt} "
                       f"ran on {last_agent}")
        if (name, output) not in reported:
            out.append(f"{name}: output {output!r} was never reported by any agent")
    return out


def check_no_lease_after_gone(h: History) -> list[str]:
    """No lease is granted to an agent after it was GONE or DRAINING.

    The bound of an agent is the earliest of: the server's ``event_time`` of
    its LEFT event (stamped after the state was stored), and the time a
    watcher received any event showing it GONE or DRAINING (the state is read
    before the event is sent). An attempt's ``start_time`` is stamped before
    the lease is stored; so ``start > bound + TOL`` means the lease was stored
    after the agent had left.
    """
    out = []
    for name, final in sorted(h.finals.items()):
        for a in final.get("attempts", []):
            agent = str(a.get("agent", ""))
            bound = h.gone_at.get(agent)
            start = a.get("start")
            if bound is not None and start is not None and float(start) > bound + TOL:
                out.append(f"{name}: attempt {a['attempt']} leased to {agent} at "
                           f"{float(start):.3f}, {float(start) - bound:.3f}s after it was "
                           f"seen GONE/DRAINING ({bound:.3f})")
    return out


def _moved_on(final: Rec, rep: Report) -> str:
    """Why the task's own record says the lease of ``rep`` was over, or "".

    Timing-free: a result accepted under token k ends the task in attempt k,
    so a later attempt, or attempt k closed by a failure, means it was not
    (legitimately) accepted; a failure accepted under token k closes attempt k
    with exactly that failure.
    """
    attempts = {int(a["attempt"]): a for a in final.get("attempts", [])}
    mine = attempts.get(rep.token)
    later = [n for n in attempts if n > rep.token]
    if rep.kind == "result":
        if later:
            return f"attempt {max(later)} ran after it"
        if mine is not None and mine.get("failure"):
            return f"attempt {rep.token} was ended by {mine['failure'].get('type')}"
        return ""
    if mine is not None and mine.get("failure") and (
            str(mine["failure"].get("message", "")) != rep.output):
        return f"attempt {rep.token} was ended by {mine['failure'].get('type')}"
    return ""


def check_stale_result_refused(h: History) -> list[str]:
    """A report under a lease that had moved on is refused; a refused one never applies."""
    out = []
    for rep in h.reports:
        final = h.finals.get(rep.task)
        if final is None:
            continue
        is_output = (rep.kind == "result" and final["state"] == "SUCCEEDED"
                     and final.get("output", "") == rep.output)
        accepted = rep.acked_ok or is_output
        why = _moved_on(final, rep) if accepted else ""
        if why:
            how = ("CompleteTask OK" if rep.unary == "OK" else "ACCEPTED ack"
                   if rep.acked_ok else "became the output")
            out.append(f"{rep.task}: {rep.kind} under token {rep.token} from {rep.src} "
                       f"({rep.via}, sent {rep.t:.3f}) accepted ({how}) though its lease had "
                       f"moved on: {why}")
        if rep.refusal and is_output:
            out.append(f"{rep.task}: result under token {rep.token} from {rep.src} was "
                       f"refused ({rep.refusal}) but is the task's output")
        if rep.refusal and rep.kind == "failure":
            mine = [a for a in final.get("attempts", []) if int(a["attempt"]) == rep.token]
            if mine and mine[0].get("failure") and (
                    str(mine[0]["failure"].get("message", "")) == rep.output):
                out.append(f"{rep.task}: failure under token {rep.token} from {rep.src} was "
                           f"refused ({rep.refusal}) but closed attempt {rep.token}")
    return out


def _ended_by(h: History) -> dict[str, float]:
    """An upper bound of the time each task ended: the first client-visible sign of it
    (a terminal WatchTasks event, a CancelTask answer, the accepted report's answer)."""
    seen: dict[str, float] = {}

    def note(task: str, t: float) -> None:
        seen[task] = min(seen.get(task, float("inf")), t)

    for ev in h.task_events:
        if ev.get("state") in TERMINAL:
            note(str(ev["task"]), float(ev["t"]))
    for op in h.ops_of("cancel"):
        if op.ok and op.done is not None and op.done.get("state") in TERMINAL:
            note(str(op.invoke["task"]), op.t1)
    for rep in h.reports:
        final = h.finals.get(rep.task)
        if (rep.acked_ok and rep.ack_t and rep.kind == "result" and final is not None
                and final.get("output", "") == rep.output):
            note(rep.task, rep.ack_t)
    return seen


LIVE_REFUSALS = frozenset({"STALE_LEASE", "ABORTED"})
ENDED_REFUSALS = frozenset({"NOT_RUNNING", "FAILED_PRECONDITION"})


def check_refusal_outcome_matches(h: History) -> list[str]:
    """A refusal says why: STALE_LEASE / ABORTED while the task is still live (requeued
    or held by a newer attempt), NOT_RUNNING / FAILED_PRECONDITION once it has ended.

    The server decided between the report's send time and the answer's arrival,
    and a task's end is final here (nothing is re-driven), so: a "live" refusal
    for a task a client had already seen ended before the report was sent, or
    an "ended" refusal for a task whose end_time (stamped before its end was
    stored) is after the answer arrived, is wrong.
    """
    out = []
    ended_by = _ended_by(h)
    for rep in h.reports:
        why = rep.refusal
        final = h.finals.get(rep.task)
        if not why or final is None:
            continue
        end = final.get("end_time")
        seen = ended_by.get(rep.task)
        if why in LIVE_REFUSALS and seen is not None and seen < rep.t - TOL:
            out.append(f"{rep.task}: report under token {rep.token} from {rep.src} sent "
                       f"{rep.t - seen:.3f}s after the task was seen {final['state']}, "
                       f"refused {why} (wants NOT_RUNNING / FAILED_PRECONDITION)")
        if why in ENDED_REFUSALS and rep.ack_t and (
                end is None or float(end) > rep.ack_t + TOL):
            out.append(f"{rep.task}: report under token {rep.token} from {rep.src} refused "
                       f"{why} at {rep.ack_t:.3f} while the task was still live (it ended "
                       f"{final['state']} at {end}) (wants STALE_LEASE / ABORTED)")
    return out


def check_idempotent_submit(h: History) -> list[str]:
    """request_id -> one task; chosen task_id + other request_id -> ALREADY_EXISTS."""
    out = []
    subs = h.ops_of("submit")
    by_rid: dict[str, set[str]] = defaultdict(set)
    by_tid: dict[str, list[Op]] = defaultdict(list)
    for op in subs:
        rid = str(op.invoke.get("request_id") or "")
        tid = str(op.invoke.get("task_id") or "")
        if op.ok and op.done is not None and rid:
            by_rid[rid].add(str(op.done["task"]))
        if tid:
            by_tid[tid].append(op)
    for rid, names in sorted(by_rid.items()):
        if len(names) > 1:
            out.append(f"request_id {rid}: acknowledged as {len(names)} tasks {sorted(names)}")
    for tid, ops in sorted(by_tid.items()):
        name = f"tasks/{tid}"
        final = h.finals.get(name)
        stored_rid = str(final.get("labels", {}).get("rid", "")) if final else ""
        stored_input = str(final.get("input", "")) if final else ""
        ok_rids = {str(o.invoke.get("request_id") or "") for o in ops if o.ok}
        if len(ok_rids) > 1:
            out.append(f"{name}: acknowledged for {len(ok_rids)} request_ids {sorted(ok_rids)} "
                       f"(a repeat with another request_id must be ALREADY_EXISTS)")
        for o in ops:
            rid = str(o.invoke.get("request_id") or "")
            if o.ok and o.done is not None and str(o.done["task"]) != name:
                out.append(f"{name}: submit {o.id} acknowledged as {o.done['task']}")
            if final is None:
                continue
            if o.ok and (rid != stored_rid or str(o.invoke.get("input", "")) != stored_input):
                out.append(f"{name}: submit {o.id} (request_id {rid}, input "
                           f"{o.invoke.get('input')}) acknowledged, but the stored task has "
                           f"request_id {stored_rid}, input {stored_input}")
            if o.code == "ALREADY_EXISTS" and rid == stored_rid and rid:
                out.append(f"{name}: submit {o.id} repeated the stored request_id {rid} and "
                           f"got ALREADY_EXISTS instead of the task")
        if final is not None and ops:
            candidates = {str(o.invoke.get("input", "")) for o in ops if not o.definite_fail}
            if stored_input not in candidates:
                out.append(f"{name}: stored input {stored_input} is none of the submits "
                           f"that may have created it")
    rid_count: Counter[str] = Counter()
    call_count: Counter[str] = Counter()
    for t in h.listed:
        rid = str(t.get("labels", {}).get("rid", ""))
        if rid:
            rid_count[rid] += 1
        call = str(t.get("labels", {}).get("call", ""))
        if call:
            call_count[call] += 1
    for rid, n in sorted(rid_count.items()):
        if n > 1:
            out.append(f"request_id {rid}: {n} tasks exist with it at the end")
    for call, n in sorted(call_count.items()):
        rid = str(h.ops[call].invoke.get("request_id") or "") if call in h.ops else ""
        if n > 1 and not rid:
            out.append(f"one SubmitTask call ({call}, no request_id) made {n} tasks")
    return out


def _deps_closure(steps: dict[str, Rec]) -> dict[str, set[str]]:
    closure: dict[str, set[str]] = {}

    def up(sid: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if sid in closure:
            return closure[sid]
        acc: set[str] = set()
        for d in steps.get(sid, {}).get("depends_on", []):
            if d in seen:
                continue
            acc |= {d} | up(d, seen | {sid})
        closure[sid] = acc
        return acc

    for sid in steps:
        up(sid)
    return closure


def check_workflow_consistency(h: History) -> list[str]:
    """A workflow's terminal state agrees with its steps; steps ran after their deps."""
    out = []
    expected_fail = {}
    for op in h.ops_of("workflow"):
        if op.ok and op.done is not None:
            expected_fail[str(op.done["workflow"])] = bool(op.invoke.get("fails"))
    execs_of: dict[str, list[Rec]] = defaultdict(list)
    for ex in h.execs:
        execs_of[str(ex["task"])].append(ex)
    for name in expected_fail:
        if name not in h.final_workflows:
            out.append(f"{name}: acknowledged workflow absent at the end")
    for name, wf in sorted(h.final_workflows.items()):
        steps = {str(s["id"]): s for s in wf.get("steps", [])}
        states = {sid: str(s["state"]) for sid, s in steps.items()}
        for sid, s in steps.items():
            final = h.finals.get(str(s.get("task", "")))
            if final is not None and final["state"] != states[sid]:
                out.append(f"{name}: step {sid} is {states[sid]} but its task "
                           f"{s['task']} is {final['state']}")
        state = str(wf["state"])
        failed = {sid for sid, st in states.items() if st in ("FAILED", "DEAD_LETTERED")}
        open_steps = {sid for sid, st in states.items() if st not in TERMINAL}
        if state == "RUNNING":
            out.append(f"{name}: still RUNNING after the mesh settled (steps {states})")
        elif state == "SUCCEEDED" and any(st != "SUCCEEDED" for st in states.values()):
            out.append(f"{name}: SUCCEEDED but steps are {states}")
        elif state == "FAILED":
            if not failed:
                out.append(f"{name}: FAILED but no step failed ({states})")
            if open_steps:
                out.append(f"{name}: FAILED with steps not ended {sorted(open_steps)}")
        elif state == "CANCELLED" and open_steps:
            out.append(f"{name}: CANCELLED with steps not ended {sorted(open_steps)}")
        closure = _deps_closure(steps)
        for sid, ups in closure.items():
            if ups & failed and states[sid] == "SUCCEEDED":
                out.append(f"{name}: step {sid} SUCCEEDED though upstream "
                           f"{sorted(ups & failed)} failed")
            if states[sid] == "SUCCEEDED":
                for d in steps[sid].get("depends_on", []):
                    if states.get(d) != "SUCCEEDED":
                        out.append(f"{name}: step {sid} SUCCEEDED before dependency {d} "
                                   f"({states.get(d)})")
            # An agent received the step (an upper bound of its lease) before the
            # dependency's end_time (a lower bound of its commit): leased too early.
            for ex in execs_of.get(str(steps[sid].get("task", "")), []):
                for d in steps[sid].get("depends_on", []):
                    dep = h.finals.get(str(steps.get(d, {}).get("task", "")))
                    if dep is None:
                        continue
                    if dep.get("end_time") is not None and (
                            float(ex["t"]) + TOL < float(dep["end_time"])):
                        out.append(f"{name}: step {sid} reached {ex['src']} at "
                                   f"{float(ex['t']):.3f}, before dependency {d} ended at "
                                   f"{float(dep['end_time']):.3f}")
                    upstream = ex.get("upstream")
                    if upstream is not None and dep["state"] == "SUCCEEDED" and (
                            upstream.get(d) != dep.get("output", "")):
                        out.append(f"{name}: step {sid} (token {ex.get('token')}) got "
                                   f"{upstream.get(d)!r} as the output of {d}, which ended "
                                   f"with {dep.get('output', '')!r}")
        if name in expected_fail and state in TERMINAL:
            want = "FAILED" if expected_fail[name] else "SUCCEEDED"
            if state != want:
                out.append(f"{name}: ended {state}, its steps make it {want} "
                           f"(failure: {wf.get('failure_reason', '')!r})")
    return out


@dataclass
class _Grant:
    lock: str
    owner: str
    token: int
    t0: float
    t1: float
    expire: float
    released: float = float("inf")


def check_lock_safety(h: History) -> list[str]:
    """Grants never overlap, tokens only grow, stale fenced writes are refused."""
    out = []
    grants: dict[str, list[_Grant]] = defaultdict(list)
    by_token: dict[tuple[str, int], _Grant] = {}
    for op in h.ops_of("lock_acquire"):
        if op.ok and op.done is not None:
            g = _Grant(str(op.invoke["lock"]), str(op.invoke["owner"]), int(op.done["token"]),
                       op.t0, op.t1, float(op.done["expire"]))
            if (g.lock, g.token) in by_token:
                out.append(f"lock {g.lock}: token {g.token} granted twice "
                           f"({by_token[(g.lock, g.token)].owner} and {g.owner})")
            grants[g.lock].append(g)
            by_token[(g.lock, g.token)] = g
    for op in h.ops_of("lock_renew"):
        g = by_token.get((str(op.invoke["lock"]), int(op.invoke["token"])))
        if g is not None and op.ok and op.done is not None:
            g.expire = max(g.expire, float(op.done["expire"]))
    for op in h.ops_of("lock_release"):
        g = by_token.get((str(op.invoke["lock"]), int(op.invoke["token"])))
        if g is not None:
            g.released = min(g.released, op.t0)
    # Sweeps, not pairs: a 30-minute campaign grants tens of thousands of leases.
    for lock, gs in sorted(grants.items()):
        for a, b in _real_time_inversions(gs, gs, lambda g: g.token, strict=True):
            out.append(f"lock {lock}: token {b.token} ({b.owner}) granted after "
                       f"token {a.token} ({a.owner}): fencing tokens went down")
        # Overlap: b granted (by b.t1) while a lower token a was still held.
        held: _Grant | None = None
        for b in sorted(gs, key=lambda g: g.token):
            if held is not None and held.token < b.token and (
                    b.t1 < min(held.expire, held.released) - TOL):
                out.append(f"lock {lock}: token {b.token} ({b.owner}) granted by "
                           f"{b.t1:.3f} while token {held.token} ({held.owner}) was held "
                           f"until {min(held.expire, held.released):.3f}")
            if held is None or min(b.expire, b.released) > min(held.expire, held.released):
                held = b
    # For each lock, grants by token with the earliest grant time among higher tokens.
    first_above: dict[str, tuple[list[int], list[_Grant]]] = {}
    for lock, gs in grants.items():
        ordered = sorted(gs, key=lambda g: g.token)
        earliest: list[_Grant] = [ordered[-1]] * len(ordered)
        for i in range(len(ordered) - 2, -1, -1):
            nxt = earliest[i + 1]
            earliest[i] = ordered[i] if ordered[i].t1 < nxt.t1 else nxt
        first_above[lock] = ([g.token for g in ordered], earliest)
    versions: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for op in h.ops_of("lock_put"):
        lock, token = str(op.invoke["lock"]), int(op.invoke["token"])
        if not op.ok or op.done is None:
            continue
        versions[str(op.invoke["key"])].append((int(op.done["version"]), token))
        mine = by_token.get((lock, token))
        tokens, earliest = first_above.get(lock, ([], []))
        i = bisect.bisect_right(tokens, token)
        if i < len(tokens) and earliest[i].t1 < op.t0 - TOL:
            newer = earliest[i]
            out.append(f"lock {lock}: fenced write under token {token} invoked at "
                       f"{op.t0:.3f} accepted after token {newer.token} was granted "
                       f"({newer.t1:.3f})")
        if mine is not None and op.t0 > mine.expire + TOL:
            out.append(f"lock {lock}: fenced write under token {token} invoked "
                       f"{op.t0 - mine.expire:.3f}s after its lease ended, yet accepted")
    for key, vs in versions.items():
        vs.sort()
        for (v1, t1), (v2, t2) in itertools.pairwise(vs):
            if t2 < t1:
                out.append(f"{key}: version {v2} written under token {t2} after version {v1} "
                           f"under token {t1}")
    return out


class _Timed(Protocol):
    @property
    def t0(self) -> float: ...
    @property
    def t1(self) -> float: ...


_T = TypeVar("_T", bound=_Timed)


def _real_time_inversions(before: list[_T], after: list[_T], pos: Callable[[_T], int], *,
                          strict: bool) -> list[tuple[_T, _T]]:
    """Pairs (a, b), a in ``before`` ended before b in ``after`` began, whose
    positions are out of order (``pos(a) >= pos(b)`` when ``strict``, else
    ``pos(a) > pos(b)``); for each b only the a of highest position. A sweep
    over both lists sorted by time: O(n log n)."""
    ended = sorted(before, key=lambda o: o.t1)
    out = []
    best: _T | None = None
    i = 0
    for b in sorted(after, key=lambda o: o.t0):
        while i < len(ended) and ended[i].t1 < b.t0:
            if best is None or pos(ended[i]) > pos(best):
                best = ended[i]
            i += 1
        if best is not None and best is not b and (
                pos(best) >= pos(b) if strict else pos(best) > pos(b)):
            out.append((best, b))
    return out


def check_cas_linearizable(h: History) -> list[str]:
    """Single-key CAS is linearizable (versioned register).

    Every successful write names its version, so the linearization order of
    writes is the version order and the check is direct: one write per
    version, each at expected + 1, every version up to the final one made by
    a write that may have happened, real-time order kept between any two
    operations that did not overlap, and every read returning the value the
    write of its version wrote.
    """
    out = []
    keys = {str(o.invoke["key"]) for o in h.ops_of("cas_put", "cas_get")}
    for key in sorted(keys):
        puts = [o for o in h.ops_of("cas_put") if o.invoke["key"] == key]
        gets = [o for o in h.ops_of("cas_get") if o.invoke["key"] == key and o.ok]
        by_value = {json.dumps(o.invoke["value"], sort_keys=True): o for o in puts}
        by_version: dict[int, Op] = {}
        by_expected: dict[int, Op] = {}
        for o in puts:
            if not o.ok or o.done is None:
                continue
            v, exp = int(o.done["version"]), int(o.invoke["expected"])
            if v != exp + 1:
                out.append(f"{key}: CAS {o.id} expected version {exp} but wrote version {v}")
            if v in by_version:
                out.append(f"{key}: version {v} written twice ({by_version[v].id}, {o.id})")
            if exp in by_expected:
                out.append(f"{key}: two CAS on expected version {exp} succeeded "
                           f"({by_expected[exp].id}, {o.id}): lost update")
            by_version[v] = o
            by_expected[exp] = o

        def pos(o: Op) -> int:
            assert o.done is not None
            return int(o.done["version"])

        done_puts = [o for o in puts if o.ok]
        for r in gets:
            assert r.done is not None
            v = int(r.done.get("version", 0))
            value = r.done.get("value")
            if v <= 0:
                continue
            w = by_value.get(json.dumps(value, sort_keys=True))
            if w is None:
                out.append(f"{key}: read {r.id} returned {value} (version {v}) that no CAS "
                           f"wrote")
                continue
            if int(w.invoke["expected"]) + 1 != v:
                out.append(f"{key}: read {r.id} returned version {v} with the value CAS "
                           f"{w.id} wrote at version {int(w.invoke['expected']) + 1}")
            if w.definite_fail:
                out.append(f"{key}: read {r.id} returned the value of CAS {w.id}, which "
                           f"failed {w.code}")
            if w.t0 > r.t1:
                out.append(f"{key}: read {r.id} returned a value written later (CAS {w.id})")
        # Real-time order: an operation that ended before another began is ordered
        # before it (strictly for a write, which makes a new version).
        for before, after, strict, what in (
                (done_puts, done_puts, True, "CAS {b} (version {bv}) started after CAS {a} "
                 "(version {av}) ended"),
                (done_puts, gets, False, "read {b} saw version {bv} after CAS {a} had written "
                 "version {av} (stale read)"),
                (gets, done_puts, True, "CAS {b} wrote version {bv} after read {a} had "
                 "already seen version {av}"),
                (gets, gets, False, "read {b} saw version {bv} after read {a} saw {av}")):
            for a, b in _real_time_inversions(before, after, pos, strict=strict):
                out.append(f"{key}: " + what.format(a=a.id, av=pos(a), b=b.id, bv=pos(b)))
        final = h.final_state.get(key)
        if final is not None:
            fv = int(final.get("version", 0))
            maybe = {int(o.invoke["expected"]) for o in puts
                     if not o.ok and not o.definite_fail}
            for v in range(1, fv + 1):
                if v not in by_version and (v - 1) not in maybe:
                    out.append(f"{key}: version {v} exists but no CAS on version {v - 1} "
                               f"can have written it")
            if by_version and max(by_version) > fv:
                out.append(f"{key}: final version {fv} is below acknowledged version "
                           f"{max(by_version)} (acknowledged write lost)")
            w = by_version.get(fv)
            if w is not None and json.dumps(final.get("value"), sort_keys=True) != json.dumps(
                    w.invoke["value"], sort_keys=True):
                out.append(f"{key}: final value {final.get('value')} is not what CAS {w.id} "
                           f"wrote at version {fv}")
    return out


MASKED_DETAIL = "Internal error from Core"
"""What grpc-python's aio client reports instead of the server's status when one
of its own writes fails because the server had just ended the stream
(grpc/grpc#36066, fix proposed in grpc/grpc#43486): the raw agent keeps writing
beats' credits and reports on its work stream, so the server's
FAILED_PRECONDITION is sometimes replaced by this INTERNAL on the client side.
The server's own INTERNAL says "internal error; see the server log"
(``server/api/errors.py``), never this text, so it is counted as the server's
end of the stream."""


def masked_status(r: Rec) -> bool:
    """A work stream end whose status the client library replaced (see MASKED_DETAIL)."""
    return r.get("code") == "INTERNAL" and r.get("detail") == MASKED_DETAIL


def check_hung_agent_gone(h: History) -> list[str]:
    """A stalled agent is declared GONE; a stalled raw agent's work stream is closed."""
    out = []
    ttl = float(h.meta.get("ttl", 0.0))
    for fid, f in sorted(h.faults.items(), key=lambda kv: float(kv[1]["t"])):
        if f["kind"] not in ("agent_pause", "hb_stall", "net_cut") or "t_end" not in f:
            continue
        ts, te = float(f["t"]), float(f["t_end"])
        if te - ts < ttl + 0.3 or not f.get("expect_gone", True):
            continue
        ids = h.agent_ids(str(f["proc"]), ts)
        if not ids:
            continue
        agent = ids[0]
        bound = h.gone_at.get(agent)
        if bound is not None and bound < ts - TOL:
            continue  # already gone before this stall began (another fault ended it)
        if bound is None or bound > te + GONE_SLACK:
            out.append(f"fault {fid} {f['kind']} on {f['proc']} ({agent}) for {te - ts:.2f}s "
                       f"(> TTL {ttl:.2f}s): the agent was not declared GONE "
                       f"(seen gone at {bound})")
            continue
        if f["kind"] != "hb_stall":
            continue
        # The session ends when the agent is GONE: by then, or by the end of the
        # stall, whichever is later (a machine that froze for seconds delays both
        # the driver's end mark and the server's expiry pass).
        ends = [r for r in h.agent_recs if r.get("ev") == "work_end"
                and r.get("src") == f["proc"] and r.get("agent") == agent
                and ts <= float(r["t"]) <= max(te, bound) + GONE_SLACK]
        if not any(r.get("by") == "server" and (r.get("code") == "FAILED_PRECONDITION"
                                                or masked_status(r)) for r in ends):
            seen = [(r.get("by"), r.get("code")) for r in ends]
            out.append(f"fault {fid} hb_stall on {f['proc']} ({agent}): GONE at {bound:.3f} "
                       f"but its work stream was not closed with FAILED_PRECONDITION "
                       f"before beats resumed (work stream ends seen: {seen})")
    return out


def check_orphan_stream_refused(h: History) -> list[str]:
    """A work stream without a heartbeat session is refused."""
    out = []
    for r in h.agent_recs:
        if r.get("ev") != "probe":
            continue
        if int(r.get("assignments", 0)) > 0:
            out.append(f"{r['src']}: a work stream with no heartbeat session ({r['agent']}) "
                       f"was given {r['assignments']} assignment(s)")
        if r.get("code") != "FAILED_PRECONDITION":
            out.append(f"{r['src']}: a work stream with no heartbeat session ({r['agent']}) "
                       f"ended {r.get('code') or 'not at all'} instead of FAILED_PRECONDITION")
    return out


DRAIN_SLACK = 0.2
"""Seconds after SIGTERM by which a replica must have begun its drain."""


def check_drain_refuses_submits(h: History) -> list[str]:
    """A replica draining for shutdown accepts no new task (UNAVAILABLE)."""
    out = []
    for fid, f in sorted(h.faults.items()):
        if f["kind"] != "replica_term" or "exited" not in f or "proxy" not in f:
            continue
        start, exited = float(f["t"]) + DRAIN_SLACK, float(f["exited"])
        for op in h.ops_of("submit"):
            if (op.ok and op.done is not None and op.done.get("target") == f["proxy"]
                    and start < op.t0 and op.t1 < exited):
                out.append(f"fault {fid}: replica {f.get('replica')} acknowledged submit "
                           f"{op.id} ({op.done['task']}) {op.t0 - float(f['t']):.3f}s after "
                           f"SIGTERM, while draining (wants UNAVAILABLE)")
    return out


INVARIANTS: dict[str, Callable[[History], list[str]]] = {
    "acked_submits_terminal": check_acked_submits_terminal,
    "terminal_state_stable": check_terminal_state_stable,
    "succeeded_output_latest_token": check_succeeded_output_latest_token,
    "no_lease_after_gone": check_no_lease_after_gone,
    "stale_result_refused": check_stale_result_refused,
    "refusal_outcome_matches": check_refusal_outcome_matches,
    "idempotent_submit": check_idempotent_submit,
    "workflow_consistency": check_workflow_consistency,
    "lock_safety": check_lock_safety,
    "cas_linearizable": check_cas_linearizable,
    "hung_agent_gone": check_hung_agent_gone,
    "orphan_stream_refused": check_orphan_stream_refused,
    "drain_refuses_submits": check_drain_refuses_submits,
}


# ---------------------------------------------------------------------- recovery


def _successes(h: History) -> list[tuple[float, float, str, str]]:
    """(attempt start, success end, agent, task) of every successful attempt."""
    out = []
    for name, final in h.finals.items():
        if final["state"] != "SUCCEEDED" or not final.get("attempts"):
            continue
        a = final["attempts"][-1]
        if a.get("start") is not None and a.get("end") is not None:
            out.append((float(a["start"]), float(a["end"]), str(a["agent"]), name))
    return sorted(out, key=lambda s: s[1])


def recovery_times(h: History) -> dict[str, list[float]]:
    """Seconds from each fault to recovery, by fault kind.

    Agent faults: until every task the target held when the fault began
    succeeded elsewhere (or, when it held none, until the first success on
    another agent). Mesh faults (replica, Redis, NATS): until the first
    success of a lease granted after the fault ended.
    """
    succ = _successes(h)
    out: dict[str, list[float]] = defaultdict(list)
    for f in h.faults.values():
        kind = str(f["kind"])
        ts, te = float(f["t"]), float(f.get("t_end", f["t"]))
        if kind in AGENT_FAULTS:
            ids = set(h.agent_ids(str(f.get("proc", "")), ts))
            held = set()
            for name, final in h.finals.items():
                for a in final.get("attempts", []):
                    if (str(a["agent"]) in ids and a.get("start") is not None
                            and float(a["start"]) <= ts
                            and (a.get("end") is None or float(a["end"]) >= ts)):
                        held.add(name)
            if held:
                ends = [e for _, e, ag, n in succ if n in held and ag not in ids]
                if len(ends) == len(held):
                    out[kind].append(max(ends) - ts)
                continue
            after = [e for _, e, ag, _ in succ if e > ts and ag not in ids]
            if after:
                out[kind].append(min(after) - ts)
        elif kind in MESH_FAULTS:
            after = [e for s, e, _, _ in succ if s > te]
            if after:
                out[kind].append(min(after) - ts)
    return dict(out)


def lease_lags(h: History) -> list[float]:
    """Seconds from each attempt's recorded start_time to its arrival at the agent.

    Not an invariant; a large figure means the server stamps a lease long
    before it stores or sends it (its lease deadline is then shorter too)."""
    out = []
    for ex in h.execs:
        final = h.finals.get(str(ex["task"]))
        if final is None:
            continue
        for a in final.get("attempts", []):
            if int(a["attempt"]) == int(ex.get("token", -1)) and a.get("start") is not None:
                out.append(float(ex["t"]) - float(a["start"]))
    return out


# ---------------------------------------------------------------------- summary


@dataclass
class Result:
    """The checker's verdict on one history."""

    operations: int
    faults: dict[str, int]
    violations: dict[str, list[str]]
    recovery: dict[str, list[float]]
    stats: dict[str, int]

    @property
    def violation_count(self) -> int:
        """All violations of every invariant."""
        return sum(len(v) for v in self.violations.values())

    def render(self, limit: int = 8) -> str:
        """A human-readable report."""
        lines = [f"operations: {self.operations}"]
        lines.append("stats: " + ", ".join(f"{k} {v}" for k, v in self.stats.items()))
        lines.append("faults injected: " + (", ".join(
            f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"))
        lines.append("violations per invariant (bar: 0):")
        for name, items in self.violations.items():
            lines.append(f"  {name}: {len(items)}")
            lines.extend(f"      - {m}" for m in items[:limit])
            if len(items) > limit:
                lines.append(f"      ... {len(items) - limit} more")
        lines.append("recovery (fault -> recovered), seconds:")
        for kind, times in sorted(self.recovery.items()):
            lines.append(f"  {kind}: n={len(times)} median {statistics.median(times):.2f} "
                         f"max {max(times):.2f}")
        return "\n".join(lines)


def check(records: Iterable[Rec]) -> Result:
    """Run every invariant over a history."""
    h = History(records)
    violations = {name: fn(h) for name, fn in INVARIANTS.items()}
    faults = Counter(str(f["kind"]) for f in h.faults.values())
    states = Counter(str(t["state"]) for t in h.finals.values())
    stats = {
        "tasks_acknowledged": len(_acked_task_names(h)),
        "tasks_succeeded": states["SUCCEEDED"],
        "tasks_cancelled": states["CANCELLED"],
        "tasks_failed": states["FAILED"] + states["DEAD_LETTERED"],
        "executions": len(h.execs),
        "reports": len(h.reports),
        "refused_reports": sum(1 for r in h.reports if r.refusal),
        "workflows": len(h.final_workflows),
        "cas_ok": sum(1 for o in h.ops_of("cas_put") if o.ok),
        "lock_grants": sum(1 for o in h.ops_of("lock_acquire") if o.ok),
        "stale_fenced_writes_refused": sum(1 for o in h.ops_of("lock_put")
                                           if o.code == "ABORTED"),
        "max_lease_to_agent_ms": round(1000 * max(lease_lags(h), default=0.0)),
        "agent_processes_died": sum(1 for r in h.records if r.get("type") == "agent_died"),
    }
    return Result(len(h.ops), dict(faults), violations, recovery_times(h), stats)


def main() -> None:
    """``python loadtests/nemesis_checker.py history.jsonl``: re-check a recorded history."""
    import sys  # noqa: PLC0415

    result = check(load(sys.argv[1]))
    print(result.render())
    raise SystemExit(1 if result.violation_count else 0)


if __name__ == "__main__":
    main()

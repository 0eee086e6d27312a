"""The hung-agent bench's judging (loadtests/hung_bench.py), on made-up server records.

No process is started and nothing is timed: this checks only that the figures
and checks are read off the attempts the way the bench's docstring says.
"""

from __future__ import annotations

from agentmesh.v1 import task_pb2

from loadtests.hung_bench import Round, judge, table

STOP = 1_000.0
HUNG = "agents/hung"
OTHER = "agents/other"


def attempt(n: int, agent: str, start: float, end: float = 0.0,
            failure: str = "") -> task_pb2.TaskAttempt:
    """One attempt record as GetTask returns it."""
    att = task_pb2.TaskAttempt(attempt=n, agent=agent)
    att.start_time.FromNanoseconds(int(start * 1e9))
    if end:
        att.end_time.FromNanoseconds(int(end * 1e9))
    if failure:
        att.failure.error_type = failure
    return att


def task(*attempts: task_pb2.TaskAttempt) -> task_pb2.Task:
    """A SUCCEEDED task with these attempts."""
    return task_pb2.Task(state=task_pb2.TASK_STATE_SUCCEEDED, attempts=list(attempts))


def a_round(**held: tuple[int, int]) -> Round:
    r = Round(0, "w0", agent=HUNG, t_stop=STOP, t_gone=STOP + 0.65)
    r.held = {f"tasks/{k}": v for k, v in held.items()}
    r.replays = [("FAILED_PRECONDITION", "TASK_NOT_RUNNING")] * len(held)
    r.own_refused = len(held)
    return r


def test_figures_come_from_the_attempts() -> None:
    r = a_round(t1=(1, 1))
    judge(r, {
        # held at the SIGSTOP, requeued at GONE, running elsewhere 0.62 s after the stop
        "tasks/t1": task(attempt(1, HUNG, STOP - 0.03, STOP + 0.6, "AGENT_GONE"),
                         attempt(2, OTHER, STOP + 0.62, STOP + 0.72)),
        # leased to the hung agent 0.1 s after the stop (it had a spare credit)
        "tasks/t2": task(attempt(1, HUNG, STOP + 0.1, STOP + 0.6, "AGENT_GONE"),
                         attempt(2, OTHER, STOP + 0.61, STOP + 0.7)),
        "tasks/t3": task(attempt(1, OTHER, STOP + 0.2, STOP + 0.3)),
        # held too, though the bench did not pick it from the agent's log
        "tasks/t4": task(attempt(1, HUNG, STOP - 0.08, STOP + 0.6, "AGENT_GONE"),
                         attempt(2, OTHER, STOP + 0.65, STOP + 0.75)),
        # its result reached the server just after the SIGSTOP: not held
        "tasks/t5": task(attempt(1, HUNG, STOP - 0.09, STOP + 0.002)),
        # over before the SIGSTOP
        "tasks/t6": task(attempt(1, HUNG, STOP - 0.5, STOP - 0.4)),
    })
    assert r.problems == []
    assert abs(r.a - 0.1) < 1e-6 and r.late_leases == 1
    assert abs(r.b - 0.65) < 1e-6 and r.recovered == r.held_on_server == 2
    assert table([r], 0.2)


def test_broken_promises_are_reported() -> None:
    r = a_round(t1=(1, 1))
    r.replays = [("OK", "")]
    judge(r, {
        "tasks/t1": task(attempt(1, HUNG, STOP - 0.03, STOP + 0.05)),  # the zombie's result won
        "tasks/t2": task(attempt(1, HUNG, STOP + 0.9, STOP + 1.0)),  # leased after GONE
    })
    assert any("succeeded" in p for p in r.problems)
    assert any("after it was GONE" in p for p in r.problems)
    assert any("late replay answered OK" in p for p in r.problems)
    assert any("not recovered" in p for p in r.problems)
    assert not table([r], 0.2)  # (a) 0.9 s > 3 x 0.2 s

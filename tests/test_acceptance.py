"""loadtests/acceptance.py and the chaos workload behind its autonomy bar.

The autonomy bar is "≥ 99.9 % with 10 % of agents killed and 5 % transient
failures": the workload must kill that share of its agents (rounded up) at
moments spread over the run and say what it killed; the bar fails a run that
did less. The coverage bar must report a current figure or say why it has none.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import coverage
import pytest

from loadtests import acceptance, chaos_bench


@pytest.mark.parametrize(("agents", "share", "kills"), [
    (20, 0.10, 2), (10, 0.10, 1), (21, 0.10, 3), (30, 0.10, 3), (5, 0.30, 2), (3, 0.10, 1),
    (4, 0.0, 1),
])
def test_kill_count_rounds_up_and_kills_at_least_one(agents: int, share: float,
                                                     kills: int) -> None:
    assert chaos_bench.kill_count(agents, share) == kills


def test_kill_points_are_spread_over_the_run() -> None:
    assert chaos_bench.kill_points(1) == [0.5]
    assert chaos_bench.kill_points(2) == pytest.approx([1 / 3, 2 / 3])
    points = chaos_bench.kill_points(5)
    assert points == sorted(points)
    assert 0 < points[0] and points[-1] < 1


def _result(**over: Any) -> dict[str, Any]:
    res: dict[str, Any] = {
        "workflows": 1000, "tasks": 4000, "succeeded": 1000, "lost_or_unfinished": 0,
        "failed": 0, "share_finished_no_human": 1.0, "duplicate_accepted": 0, "agents": 20,
        "kill_share": 0.1, "kills_planned": 2, "agents_killed": 2, "seconds": 30.0,
        "kills": [{"agent": "a7", "at_s": 4.04, "tasks_ended": 1334, "of_tasks": 4000,
                   "in_flight": 8},
                  {"agent": "a12", "at_s": 9.5, "tasks_ended": 2667, "of_tasks": 4000,
                   "in_flight": 6}],
        "task_autonomy": 1.0, "tasks_ended": 4000, "refused_stale": 0, "fail_rate": 0.05,
        "handler_calls": 4210, "failed_attempts": 210, "failed_share": 210 / 4210}
    res.update(over)
    return res


def test_autonomy_bar_says_what_was_killed() -> None:
    bar = acceptance.autonomy_bar(_result())
    assert bar.passed
    assert "2 of 20 agents SIGKILLed" in bar.measured
    assert "a7 at 4.0 s with 8 in flight, 33% of tasks ended" in bar.measured
    assert "a12 at 9.5 s with 6 in flight, 67% of tasks ended" in bar.measured
    assert "210 of 4,210 handler calls failed (4.99%, 5% injected)" in bar.measured
    assert "task autonomy 100.000%" in bar.measured


def test_autonomy_bar_fails_a_run_with_fewer_kills_than_planned() -> None:
    res = _result(agents_killed=1, kills=_result()["kills"][:1])
    bar = acceptance.autonomy_bar(res)
    assert not bar.passed
    assert "1 of 20 agents SIGKILLed" in bar.measured
    assert "2 planned: the work ended first" in bar.measured
    assert not acceptance.autonomy_bar(_result(failed_attempts=0)).passed
    assert not acceptance.autonomy_bar(_result(share_finished_no_human=0.998)).passed


@pytest.mark.slow
async def test_workload_kills_its_share_at_spread_out_moments(tmp_path: Path) -> None:
    # 5 agents x 30 % -> 2 kills (1.5 rounded up), at 1/3 and 2/3 of the tasks ended.
    res = await chaos_bench.workload(tmp_path, 150, 5, 0.30, 0.05)
    assert res["kills_planned"] == 2
    assert res["agents_killed"] == 2, res
    kills = res["kills"]
    assert len({k["agent"] for k in kills}) == 2
    assert {k["agent"] for k in kills} <= {f"a{i}" for i in range(5)}
    for k, mark in zip(kills, chaos_bench.kill_points(2), strict=True):
        assert k["tasks_ended"] >= mark * res["tasks"]
        assert k["in_flight"] >= 1
    assert kills[0]["at_s"] < kills[1]["at_s"]
    assert kills[0]["tasks_ended"] < res["tasks"]
    assert res["failed_attempts"] > 0
    assert res["lost_or_unfinished"] == 0
    assert res["duplicate_accepted"] == 0
    assert res["share_finished_no_human"] == 1.0


def _tree(root: Path, fail_under: int = 50) -> Path:
    (root / "server").mkdir()
    (root / "agent_sdk").mkdir()
    (root / "pyproject.toml").write_text(
        f"[tool.coverage.report]\nfail_under = {fail_under}\nprecision = 1\n")
    src = root / "server" / "m.py"
    src.write_text("a = 1\nb = 2\nc = 3\nd = 4\n")
    return src


def _write_data(root: Path, lines: dict[Path, list[int]]) -> None:
    data = coverage.CoverageData(basename=str(root / ".coverage"))
    data.add_lines({str(p): ln for p, ln in lines.items()})
    data.write()


def test_coverage_bar_without_data_says_so(tmp_path: Path) -> None:
    _tree(tmp_path)
    bar = acceptance.coverage_bar(False, tmp_path)
    assert not bar.passed
    assert bar.measured.startswith("no coverage data")
    assert "run `make test` first" in bar.measured


def test_coverage_bar_reads_current_data(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    old = time.time() - 60
    os.utime(src, (old, old))
    _write_data(tmp_path, {src: [1, 2, 3]})
    bar = acceptance.coverage_bar(False, tmp_path)
    assert bar.measured.startswith("75.0 % (data of ")
    assert not bar.passed  # under the plan's 80 % though over fail_under
    _write_data(tmp_path, {src: [1, 2, 3, 4]})
    bar = acceptance.coverage_bar(False, tmp_path)
    assert bar.measured.startswith("100.0 % (data of ")
    assert bar.passed
    assert "fail_under" in bar.ours


def test_coverage_bar_refuses_data_older_than_the_code(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    _write_data(tmp_path, {src: [1, 2, 3]})
    old = time.time() - 60
    os.utime(tmp_path / ".coverage", (old, old))  # the code changed after the data
    bar = acceptance.coverage_bar(False, tmp_path)
    assert not bar.passed
    assert bar.measured.startswith("stale coverage data")
    assert "1 source files changed since (server/m.py)" in bar.measured
    assert "%" not in bar.measured.split(":")[0]  # no figure passed off as current


def test_coverage_bar_refuses_data_of_deleted_files(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    old = time.time() - 60
    os.utime(src, (old, old))
    _write_data(tmp_path, {src: [1], tmp_path / "server" / "gone.py": [1]})
    bar = acceptance.coverage_bar(False, tmp_path)
    assert not bar.passed
    assert "1 measured files no longer exist" in bar.measured

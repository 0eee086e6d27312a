"""The nemesis campaign (loadtests/nemesis.py), short and with fixed seeds.

Each test drives a real mesh (``agentmesh serve`` subprocesses, SDK agents and
raw-stub agents, fault proxies; private redis-server and nats-server for the
replicated form) through seeded faults, then checks the recorded history
(loadtests/nemesis_checker.py). It asserts no invariant is violated, and that
the run was not vacuous: faults of many kinds were injected and many tasks
completed. On a failure the message carries the checker's report and the
history file, which ``python loadtests/nemesis_checker.py <file>`` re-checks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loadtests.nemesis import Config, run_campaign
from loadtests.nemesis_checker import Result
from tests._services import skip_or_fail

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


class CampaignError(Exception):
    """The campaign failed in a way no xfail covers."""


def _assert_campaign(result: Result, history: Path, *, kinds: int, succeeded: int,
                     known: str = "") -> None:
    """Every invariant held (``known`` is asserted last, with a plain assert, so
    an xfail(raises=AssertionError) covers that one violation and nothing else),
    and the run was not vacuous."""
    report = f"{result.render()}\nhistory: {history}"
    others = {k: v for k, v in result.violations.items() if v and k != known}
    checks = [
        (not others, f"violations: {sorted(others)}"),
        (len(result.faults) >= kinds, f"fewer than {kinds} fault kinds"),
        (sum(result.faults.values()) >= kinds + 2, "too few faults"),
        (result.stats["tasks_succeeded"] >= succeeded, f"fewer than {succeeded} tasks done"),
        (result.stats["workflows"] >= 5, "fewer than 5 workflows"),
        (result.stats["cas_ok"] >= 100 and result.stats["lock_grants"] >= 20,
         "too few CAS writes or lock grants"),
        (result.stats["executions"] > result.stats["tasks_succeeded"] // 2,
         "agents recorded too few executions"),
    ]
    for ok, why in checks:
        if not ok:
            raise CampaignError(f"{why}\n{report}")
    if known:
        assert not result.violations[known], report


@pytest.mark.timeout(240)
async def test_nemesis_memory_one_replica(tmp_path: Path) -> None:
    """Embedded store, one replica: agent, network, client and lock faults for 40 s."""
    result, history = await run_campaign(Config(
        seed=20240601, seconds=40.0, workdir=tmp_path, settle=30.0, quiet=True, min_faults=14))
    _assert_campaign(result, history, kinds=10, succeeded=200)
    wanted = {"agent_kill", "agent_pause", "hb_stall", "net_cut", "probe"}
    assert wanted <= set(result.faults), result.faults


@pytest.mark.timeout(240)
async def test_nemesis_redis_nats_two_replicas(tmp_path: Path) -> None:
    """Private Redis and NATS, two replicas: adds replica kill/pause/drain, service restarts."""
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server not found")
    result, history = await run_campaign(Config(
        seed=20240602, seconds=30.0, store="redis", bus="nats", replicas=2, workdir=tmp_path,
        settle=30.0, quiet=True, service_faults_first=True, min_faults=12))
    wanted = {"replica_kill", "replica_pause", "redis_restart", "redis_reply_loss", "nats_restart"}
    if not wanted <= set(result.faults):
        raise CampaignError(f"service faults missing: {wanted - set(result.faults)}")
    _assert_campaign(result, history, kinds=8, succeeded=120)

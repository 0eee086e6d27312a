"""A real Prometheus scraping a running mesh; dashboards and alerts evaluated against it.

Starts ``/usr/bin/prometheus`` (Debian package ``prometheus``; missing is a
skip locally and a failure under ``CI=true``) on a free port with a temporary
config that scrapes the embedded mesh's metrics port every second, runs a
workflow plus a task that fails until dead-lettered through a real
`agent_sdk.Agent`, then reads the counters back through ``/api/v1/query``
and evaluates every dashboard expression, templating query and alert rule
expression against that Prometheus: all must run without error, and every
metric they name must have data (except the few listed in
`MAY_BE_EMPTY`, which need rare events).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_sdk import Agent, MeshClient, RetryPolicy, TaskContext
from server.app import Mesh, running_server
from tests.conftest import embedded_settings
from tests.test_observability_config import (
    _substitute_grafana_vars,
    alert_exprs,
    dashboard_exprs,
    metric_names_in,
    templating_queries,
)

pytestmark = pytest.mark.slow

MAY_BE_EMPTY = {
    # A result refused for a stale fencing token needs a zombie agent.
    "agentmesh_stale_results_total",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    """The Prometheus server binary; skip without it (fail under CI=true)."""
    path = shutil.which("prometheus") or ("/usr/bin/prometheus"
                                          if Path("/usr/bin/prometheus").exists() else None)
    if path is None:
        reason = "the prometheus server is not installed (Debian package `prometheus`)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture
async def metered_mesh() -> AsyncIterator[Mesh]:
    """An embedded mesh with /metrics on a free port and fast gauges and breakers."""
    settings = embedded_settings(metrics_port=_free_port(), gauge_interval=0.2,
                                 breaker_fail_max=2)
    async with running_server(settings) as mesh:
        yield mesh


@pytest.fixture
def prometheus(prometheus_bin: str, metered_mesh: Mesh, tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping the mesh every second; yields its base URL."""
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "agentmesh",
            "static_configs": [{"targets": [
                f"127.0.0.1:{metered_mesh.settings.metrics_port}"]}],
        }],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [prometheus_bin, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                raise AssertionError("prometheus did not start: "
                                     + (tmp_path / "prometheus.log").read_text()[-2000:])
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _query(url: str, expr: str) -> dict[str, Any]:
    qs = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{qs}", timeout=5) as r:
            body: dict[str, Any] = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    return body


async def _value_at_least(url: str, expr: str, minimum: float, within: float = 8.0) -> float:
    """Poll Prometheus until ``expr`` (a scalar-ish vector) reaches ``minimum``."""
    async with asyncio.timeout(within):
        while True:
            body = await asyncio.to_thread(_query, url, expr)
            assert body["status"] == "success", body
            result = body["data"]["result"]
            if result and float(result[0]["value"][1]) >= minimum:
                return float(result[0]["value"][1])
            await asyncio.sleep(0.2)


async def test_prometheus_reads_the_mesh_and_every_dashboard_query_runs(
        metered_mesh: Mesh, prometheus: str) -> None:
    agent = Agent("prom-agent", target=metered_mesh.address, max_concurrency=4)

    @agent.handler("work")
    async def work(task: TaskContext) -> object:
        return {"ok": task.step_id}

    @agent.handler("flaky")
    async def flaky(task: TaskContext) -> object:
        raise RuntimeError("always fails")

    run = asyncio.create_task(agent.run())
    try:
        async with MeshClient(metered_mesh.address) as client:
            wf = await client.submit_workflow({"name": "prom", "steps": [
                {"id": "a", "capability": "work"},
                {"id": "b", "capability": "work", "depends_on": ["a"]},
                {"id": "c", "capability": "work", "depends_on": ["a"]},
            ]})
            done = await client.wait_workflow(wf.name, timeout=5)
            assert done.state == "SUCCEEDED"
            bad = await client.submit_task("flaky", None, retry=RetryPolicy(
                max_attempts=2, initial_backoff=0.01, max_backoff=0.01, multiplier=1.0))
            # Two failed attempts: dead-lettered, and the agent's breaker opens (fail_max 2).
            ended = await client.wait_task(bad.name, timeout=5)
            assert ended.state == "DEAD_LETTERED"

            # Counters read back through Prometheus' HTTP API.
            finished = await _value_at_least(prometheus, 'sum(agentmesh_tasks_finished_total'
                                             '{capability="work",outcome="succeeded"})', 3)
            assert finished == 3
            assert await _value_at_least(
                prometheus, 'sum(agentmesh_dead_letters_total{capability="flaky"})', 1) == 1
            await _value_at_least(prometheus, 'sum(agentmesh_grpc_requests_total'
                                  '{method="/agentmesh.v1.TaskService/SubmitWorkflow"})', 1)
            await _value_at_least(prometheus, 'max(agentmesh_agents{state="active"})', 1)
            await _value_at_least(prometheus, 'max(agentmesh_breaker_state)', 1)
            await _value_at_least(prometheus, 'up{job="agentmesh"}', 1)
            autonomy = await _value_at_least(prometheus, "max(agentmesh_autonomy_ratio)", 0)
            assert autonomy == 0.75  # 3 succeeded, 1 dead-lettered
            # Rates need two samples of the series: wait for the next scrapes.
            await _value_at_least(prometheus, "count(count_over_time("
                                  "agentmesh_tasks_finished_total[1m]) >= 2)", 1)
    finally:
        await agent.stop(grace=1.0)
        await run

    exprs = ([(f"dashboard {n}", _substitute_grafana_vars(e)) for n, e in dashboard_exprs()]
             + [(f"variable {n}", _substitute_grafana_vars(e)) for n, e in templating_queries()]
             + [(f"alert {n}", e) for n, e in alert_exprs()])
    errors = {}
    for where, expr in exprs:
        body = await asyncio.to_thread(_query, prometheus, expr)
        if body["status"] != "success":
            errors[f"{where}: {expr}"] = body.get("error")
    assert not errors, errors

    names = set().union(*(metric_names_in(e) for _, e in exprs))
    empty = []
    for name in sorted(names - MAY_BE_EMPTY):
        body = await asyncio.to_thread(_query, prometheus, f"count({name})")
        if not body["data"]["result"]:
            empty.append(name)
    assert not empty, f"metrics used by dashboards/alerts without data: {empty}"

"""One workflow, one trace: client, server and two agent processes, real OpenTelemetry.

Every process runs with ``OTEL_TRACES_EXPORTER=agentmesh_jsonl`` and its own
``AGENTMESH_TRACES_FILE``, so each writes its finished spans as JSON lines
(agent_sdk/_tracing.py ``JsonLinesSpanExporter``). The test submits a
two-step workflow (step ``a`` on agent A, step ``b`` on agent B, ``b``
depends on ``a``) from a client process, then checks that:

- every span of every process about that workflow has one trace id;
- the client's SubmitWorkflow span is the root; the server's SubmitWorkflow
  span, the queue-wait / assign / result spans and both agents' handler
  spans are its children;
- the agents' and the server's JSON log lines parse and carry the ids.

It also checks the other side: without OTEL_* variables nothing is traced.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sdk._tracing import ids_from_traceparent, tracing_requested

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

pytestmark = pytest.mark.slow

AGENT = textwrap.dedent("""
    import asyncio, logging, sys
    from agent_sdk import Agent, TaskContext
    from server.observability.logging import configure_logging

    configure_logging("json", "INFO")
    target, cap = sys.argv[1], sys.argv[2]
    agent = Agent(f"agent-{cap}", target=target)
    log = logging.getLogger("tracing-test")

    @agent.handler(cap)
    async def handle(task: TaskContext) -> object:
        log.info("handling step %s", task.step_id)
        return {"step": task.step_id, "upstream": task.upstream}

    asyncio.run(agent.run(install_signal_handlers=True))
""")

CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    from agent_sdk import MeshClient

    async def main() -> None:
        async with MeshClient(sys.argv[1]) as client:
            wf = await client.submit_workflow({"name": "traced", "steps": [
                {"id": "a", "capability": "cap-a", "input": {"x": 1}},
                {"id": "b", "capability": "cap-b", "depends_on": ["a"]},
            ]})
            done = await client.wait_workflow(wf.name, timeout=10)
            print(json.dumps({"id": wf.id, "state": done.state}), flush=True)

    asyncio.run(main())
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))  # every line must be JSON
    return out


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes to stop (SIGTERM, then kill) at the end of the test."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.terminate()
    for p in started:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _env(tmp: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({
        "OTEL_TRACES_EXPORTER": "agentmesh_jsonl",
        "AGENTMESH_TRACES_FILE": str(tmp / f"{name}.spans.jsonl"),
        "OTEL_SERVICE_NAME": name,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "PYTHONPATH": str(ROOT),
    })
    return env


def test_one_workflow_is_one_trace_across_processes(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    port = _free_port()
    server_log = (tmp_path / "server.log").open("wb")
    procs.append(subprocess.Popen(
        [PY, "-m", "server.cli", "serve", "--port", str(port), "--metrics-port", "0",
         "--console-port", "0",
         "--log-format", "json", "--heartbeat-interval", "0.5"],
        cwd=ROOT, env=_env(tmp_path, "server"), stderr=server_log))
    (tmp_path / "agent.py").write_text(AGENT)
    (tmp_path / "client.py").write_text(CLIENT)
    target = f"127.0.0.1:{port}"
    agent_logs = {}
    _wait_until(lambda: _listening(port), 10, "the server")
    for cap in ("cap-a", "cap-b"):
        agent_logs[cap] = tmp_path / f"{cap}.log"
        procs.append(subprocess.Popen(
            [PY, str(tmp_path / "agent.py"), target, cap], cwd=ROOT,
            env=_env(tmp_path, f"agent-{cap}"), stderr=agent_logs[cap].open("wb")))
    client = subprocess.run(
        [PY, str(tmp_path / "client.py"), target], cwd=ROOT, env=_env(tmp_path, "client"),
        capture_output=True, timeout=14, check=False)
    assert client.returncode == 0, client.stderr.decode()[-3000:]
    result = json.loads(client.stdout.decode().strip().splitlines()[-1])
    assert result["state"] == "SUCCEEDED"
    wf_id = result["id"]

    files = {name: tmp_path / f"{name}.spans.jsonl"
             for name in ("client", "server", "agent-cap-a", "agent-cap-b")}

    def complete() -> bool:
        server_names = {s["name"] for s in _spans(files["server"])}
        return (bool(_spans(files["client"]))
                and any(s["name"] == "handle cap-a" for s in _spans(files["agent-cap-a"]))
                and any(s["name"] == "handle cap-b" for s in _spans(files["agent-cap-b"]))
                and {"result cap-a", "result cap-b"} <= server_names)

    _wait_until(complete, 5, "every process's spans")
    spans = {name: _spans(path) for name, path in files.items()}

    submit = [s for s in spans["client"] if s["name"].endswith("/SubmitWorkflow")]
    assert len(submit) == 1, spans["client"]
    root = submit[0]
    assert root["kind"] == "CLIENT"
    trace_id = root["trace_id"]

    def about_workflow(span: dict[str, Any]) -> bool:
        return span["attributes"].get("agentmesh.workflow_id") == wf_id

    server_submit = [s for s in spans["server"] if s["name"].endswith("/SubmitWorkflow")]
    assert len(server_submit) == 1
    assert server_submit[0]["kind"] == "SERVER"
    task_spans = [s for s in spans["server"] if about_workflow(s)]
    names = sorted(s["name"] for s in task_spans)
    assert names == sorted(["queue wait cap-a", "assign cap-a", "result cap-a",
                            "queue wait cap-b", "assign cap-b", "result cap-b"])
    handlers = [s for name in ("agent-cap-a", "agent-cap-b") for s in spans[name]
                if s["name"].startswith("handle ")]
    assert len(handlers) == 2
    assert all(about_workflow(s) for s in handlers)

    # One trace, and everything hangs off the client's submit span.
    for span in [*server_submit, *task_spans, *handlers]:
        assert span["trace_id"] == trace_id, span
        assert span["parent_id"] == root["span_id"], span
    assert root["parent_id"] == ""
    for span in task_spans:
        if span["name"].startswith("result "):
            assert span["status"] == "UNSET" or span["status"] == "OK"
            assert span["attributes"]["agentmesh.outcome"] == "succeeded"
    # Step b waited for step a: its queue wait starts after a's handler ended.
    a_end = next(s["end"] for s in handlers if s["name"] == "handle cap-a")
    b_wait = next(s for s in task_spans if s["name"] == "queue wait cap-b")
    assert b_wait["start"] >= a_end - 50_000_000  # clocks of two processes, same host
    # Distinct processes reported them.
    assert {s["service"] for s in handlers} == {"agent-cap-a", "agent-cap-b"}

    # Logs: JSON lines carrying the ids.
    for cap, path in agent_logs.items():
        records = _json_lines(path)
        handling = [r for r in records if r.get("message", "").startswith("handling step")]
        assert handling, f"{cap}: {records}"
        rec = handling[0]
        assert rec["trace_id"] == trace_id
        assert rec["workflow_id"] == wf_id
        assert rec["task_id"].startswith(wf_id)
        assert rec["agent_id"]
        assert len(rec["span_id"]) == 16
        assert {"time", "level", "logger", "message"} <= rec.keys()
    server_log.close()
    server_records = _json_lines(tmp_path / "server.log")
    assert any("serving" in r.get("message", "") for r in server_records)


def test_tracing_is_off_without_otel_env() -> None:
    assert not tracing_requested({})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none",
                                  "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"})
    assert not tracing_requested({"OTEL_SDK_DISABLED": "true",
                                  "OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})


def test_traceparent_ids() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert ids_from_traceparent(tp) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert ids_from_traceparent("garbage") == ("", "")

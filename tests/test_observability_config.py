"""Static checks of deploy/ plus the metric and logging contracts behind it.

- every YAML file under deploy/ parses;
- every PromQL expression (dashboards, alert rules) names only metrics that
  `MeshMetrics` exports (or ``up``), and parses (promtool);
- alert rules pass ``promtool check rules`` and their unit tests
  (``promtool test rules``); promtool missing is a skip locally and a failure
  when ``CI=true`` (scripts/install-system-deps.sh installs it);
- `MeshMetrics` exports exactly the agreed metric names and labels;
- `configure_logging("json")` writes one JSON object per line with the bound
  context.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from server.observability.logging import bind_context, configure_logging
from server.observability.metrics import MeshMetrics
from tests._services import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OBS = DEPLOY / "observability"
DASHBOARDS = OBS / "grafana" / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])

# The contract in the brief: exposed name -> label names ("le" excluded).
EXPECTED_METRICS: dict[str, set[str]] = {
    "agentmesh_tasks_submitted_total": {"namespace", "capability"},
    "agentmesh_tasks_finished_total": {"namespace", "capability", "outcome"},
    "agentmesh_task_dispatch_latency_seconds": {"capability"},
    "agentmesh_task_run_duration_seconds": {"capability", "outcome"},
    "agentmesh_queue_depth": {"namespace", "capability", "state"},
    "agentmesh_agents": {"namespace", "state"},
    "agentmesh_agent_in_flight": {"agent"},
    "agentmesh_capability_agents": {"namespace", "capability"},
    "agentmesh_task_retries_total": {"capability"},
    "agentmesh_dead_letters_total": {"capability"},
    "agentmesh_stale_results_total": {"capability"},
    "agentmesh_breaker_state": {"agent", "capability"},
    "agentmesh_autonomy_ratio": {"namespace"},
    "agentmesh_bus_messages_published_total": {"kind"},
    "agentmesh_bus_messages_delivered_total": {"kind"},
    "agentmesh_grpc_requests_total": {"method", "code"},
    "agentmesh_grpc_request_duration_seconds": {"method"},
    "agentmesh_build_info": {"version"},
}
HISTOGRAMS = {
    "agentmesh_task_dispatch_latency_seconds",
    "agentmesh_task_run_duration_seconds",
    "agentmesh_grpc_request_duration_seconds",
}

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
}
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}


# --------------------------------------------------------------------- helpers


def _exposed_name(name: str, kind: str) -> str:
    return f"{name}_total" if kind == "counter" else name


def known_series_names() -> set[str]:
    """Every series name a query may use: derived from MeshMetrics, plus ``up``."""
    names = {"up"}
    for family in MeshMetrics().registry.collect():
        if family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(_exposed_name(family.name, family.type))
    return names


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a small, sufficient lexer)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range / subquery selectors
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text
    )  # grouping label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if is_call or word.lower() in PROMQL_KEYWORDS:
            continue
        # Skip duration/number suffixes such as the "m" in "5m" or "e" in "1e3".
        if match.start() > 0 and text[match.start() - 1].isdigit():
            continue
        names.add(word)
    return names


def _walk(obj: Any, key: str) -> Iterator[Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            else:
                yield from _walk(v, key)
    elif isinstance(obj, list):
        for item in obj:
            yield from _walk(item, key)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(file name, expr) for every panel target in every dashboard."""
    out: list[tuple[str, str]] = []
    for path in DASHBOARD_FILES:
        board = json.loads(path.read_text())
        out.extend((path.name, e) for e in _walk(board["panels"], "expr"))
    return out


def templating_queries() -> list[tuple[str, str]]:
    """(file name, query) for every query variable (label_values(...))."""
    out: list[tuple[str, str]] = []
    for path in DASHBOARD_FILES:
        board = json.loads(path.read_text())
        for var in board["templating"]["list"]:
            if var.get("type") == "query":
                query = var["query"]
                text = query["query"] if isinstance(query, dict) else query
                # label_values(<series selector>, <label>): keep the selector.
                match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text)
                out.append((path.name, match.group(1) if match else text))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    """(alert name, expr) for every rule in alerts.yml."""
    doc = yaml.safe_load((OBS / "alerts.yml").read_text())
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


def _substitute_grafana_vars(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


@pytest.fixture(scope="module")
def promtool() -> str:
    """Path to promtool; skip without it, except in CI where that is a failure."""
    path = shutil.which("promtool")
    if path is None:
        reason = (
            "promtool is not on PATH; run `sudo scripts/install-system-deps.sh` "
            "(Debian package `prometheus`)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


# ------------------------------------------------------------- (a) YAML parses


def test_deploy_tree_has_the_expected_files() -> None:
    expected = [
        "Dockerfile",
        "docker-compose.yml",
        "k8s/base/kustomization.yaml",
        "k8s/overlays/dev/kustomization.yaml",
        "k8s/overlays/prod/kustomization.yaml",
        "observability/prometheus.yml",
        "observability/alerts.yml",
        "observability/alerts_test.yml",
        "observability/alertmanager.yml",
        "observability/loki.yml",
        "observability/promtail.yml",
        "observability/otel-collector.yml",
        "observability/grafana/dashboards/system-overview.json",
        "observability/grafana/dashboards/agent-performance.json",
        "observability/grafana/dashboards/workflows.json",
    ]
    missing = [p for p in expected if not (DEPLOY / p).is_file()]
    assert not missing


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    for target in ("base", "overlays/dev", "overlays/prod"):
        result = _run(kubectl, "kustomize", str(DEPLOY / "k8s" / target))
        assert result.returncode == 0, result.stderr
        kinds = {d["kind"] for d in yaml.safe_load_all(result.stdout) if d}
        assert {
            "Deployment",
            "Service",
            "ConfigMap",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
        } <= kinds


def test_dockerfile_contract() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim|^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r"^USER (?!root|0\b)", text, re.M)
    assert 'ENTRYPOINT ["agentmesh"]' in text
    assert 'CMD ["serve"]' in text
    assert re.search(r"^EXPOSE .*\b50051\b.*\b9464\b", text, re.M)
    assert "HEALTHCHECK" in text


# ---------------------------------------------------- (b) PromQL metric names


def test_lexer_finds_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, capability) (rate(foo_bucket{a="b"}[5m])))'
        " > 1 unless on (capability) bar offset 15m or up == 0"
    )
    assert metric_names_in(expr) == {"foo_bucket", "bar", "up"}


def test_dashboards_are_grafana_json() -> None:
    assert {p.name for p in DASHBOARD_FILES} >= {
        "system-overview.json",
        "agent-performance.json",
        "workflows.json",
    }
    uids = set()
    for path in DASHBOARD_FILES:
        board = json.loads(path.read_text())
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    assert len(uids) == len(DASHBOARD_FILES)


def test_dashboard_exprs_use_known_metrics() -> None:
    known = known_series_names()
    exprs = dashboard_exprs() + templating_queries()
    assert len(exprs) > 20
    bad = {}
    for name, expr in exprs:
        used = metric_names_in(expr)
        assert used, f"{name}: no metric in {expr!r}"
        if unknown := used - known:
            bad[expr] = sorted(unknown)
    assert not bad, f"unknown metric names: {bad}"


def test_alert_exprs_use_known_metrics() -> None:
    known = known_series_names()
    bad = {name: sorted(metric_names_in(e) - known) for name, e in alert_exprs()}
    assert not {k: v for k, v in bad.items() if v}


def test_required_alerts_exist() -> None:
    names = {name for name, _ in alert_exprs()}
    assert names >= {
        "AgentMeshCapabilityUnserved",
        "AgentMeshDeadLettersGrowing",
        "AgentMeshAutonomyBelowTarget",
        "AgentMeshDispatchLatencyHigh",
        "AgentMeshBreakerOpen",
        "AgentMeshReplicaDown",
    }


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load((OBS / "alerts_test.yml").read_text())
    tested = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", [])}
    fired = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = [
        case
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    ]
    alerts = {name for name, _ in alert_exprs()}
    assert fired == alerts == tested
    assert quiet


# ------------------------------------------------------------- (c) promtool


def test_promtool_check_rules(promtool: str) -> None:
    result = _run(promtool, "check", "rules", str(OBS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules(promtool: str) -> None:
    result = _run(promtool, "test", "rules", str(OBS / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config(promtool: str) -> None:
    result = _run(promtool, "check", "config", "--syntax-only", str(OBS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_exprs_parse(promtool: str, tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:expr:{i}", "expr": _substitute_grafana_vars(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = _run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        skip_or_fail("amtool is not on PATH (Debian package prometheus-alertmanager)")
    result = _run(amtool, "check-config", str(OBS / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_script_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        skip_or_fail("shellcheck is not on PATH (Debian package shellcheck)")
    result = _run(shellcheck, str(ROOT / "scripts" / "install-system-deps.sh"))
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------- (d) metric contract


def _exercise(m: MeshMetrics) -> None:
    m.task_submitted("default", "summarize")
    m.task_finished("default", "summarize", "succeeded", 1.5)
    m.task_dispatched("summarize", 0.02)
    m.set_queue_depth("default", "summarize", "queued", 3)
    m.set_agents("default", "active", 2)
    m.set_in_flight("agent-a", 1)
    m.set_capability_agents("default", "summarize", 2)
    m.retry_scheduled("summarize")
    m.dead_lettered("summarize")
    m.stale_result("summarize")
    m.set_breaker("agent-a", "summarize", "open")
    m.set_autonomy("default", 0.97)
    m.bus_published("task.ready")
    m.bus_delivered("task.ready")
    m.grpc_request("/agentmesh.v1.TaskService/GetTask", "OK", 0.003)


def test_mesh_metrics_exposes_exactly_the_contract() -> None:
    m = MeshMetrics()
    exposed = {_exposed_name(f.name, f.type) for f in m.registry.collect()}
    assert exposed == set(EXPECTED_METRICS)
    assert {f.name for f in m.registry.collect() if f.type == "histogram"} == HISTOGRAMS


def test_mesh_metrics_labels_match_the_contract() -> None:
    m = MeshMetrics()
    _exercise(m)
    for family in m.registry.collect():
        name = _exposed_name(family.name, family.type)
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert labels == EXPECTED_METRICS[name], name
        assert "task_id" not in labels


def test_mesh_metrics_values() -> None:
    m = MeshMetrics(version="9.9.9")
    _exercise(m)
    value = m.registry.get_sample_value
    breaker = {"agent": "agent-a", "capability": "summarize"}
    finished = {"namespace": "default", "capability": "summarize", "outcome": "succeeded"}
    run_ok = {"capability": "summarize", "outcome": "succeeded"}
    run_cancelled = {"capability": "summarize", "outcome": "cancelled"}
    assert value("agentmesh_build_info", {"version": "9.9.9"}) == 1
    assert value("agentmesh_breaker_state", breaker) == 2
    assert value("agentmesh_tasks_finished_total", finished) == 1
    assert value("agentmesh_task_run_duration_seconds_count", run_ok) == 1
    # Cancelled before running: counted, but no run-duration observation.
    m.task_finished("default", "summarize", "cancelled")
    assert value("agentmesh_task_run_duration_seconds_count", run_cancelled) is None
    m.remove_agent("agent-a")
    assert value("agentmesh_agent_in_flight", {"agent": "agent-a"}) is None
    assert value("agentmesh_breaker_state", breaker) is None
    m.remove_agent("agent-a")  # idempotent


def test_mesh_metrics_rejects_unbounded_label_values() -> None:
    m = MeshMetrics()
    with pytest.raises(ValueError, match="outcome"):
        m.task_finished("default", "x", "exploded", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queue state"):
        m.set_queue_depth("default", "x", "lost", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="agent state"):
        m.set_agents("default", "sleeping", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="breaker"):
        m.set_breaker("a", "x", "ajar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="autonomy"):
        m.set_autonomy("default", 1.5)


def test_registries_are_independent() -> None:
    a, b = MeshMetrics(), MeshMetrics()
    a.task_submitted("ns", "cap")
    labels = {"namespace": "ns", "capability": "cap"}
    assert a.registry.get_sample_value("agentmesh_tasks_submitted_total", labels) == 1
    assert b.registry.get_sample_value("agentmesh_tasks_submitted_total", labels) is None


def test_metrics_http_server() -> None:
    m = MeshMetrics()
    m.task_submitted("ns", "cap")
    server = m.start_http_server(0)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
        assert 'agentmesh_tasks_submitted_total{capability="cap",namespace="ns"} 1.0' in body
    finally:
        server.close()
    server.close()


# ------------------------------------------------------------ (e) JSON logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo configure_logging's global changes after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_carry_bound_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "DEBUG")
    log = logging.getLogger("server.services.scheduler")
    with bind_context(task_id="t-123", workflow_id="wf-1", trace_id="abc123"):
        log.info("task %s assigned", "t-123", extra={"attempt": 2})
    log.debug("outside")
    records = _json_lines(capsys.readouterr().err)
    assert len(records) == 2
    first, second = records
    assert first["message"] == "task t-123 assigned"
    assert first["level"] == "info"
    assert first["logger"] == "server.services.scheduler"
    assert first["task_id"] == "t-123"
    assert first["workflow_id"] == "wf-1"
    assert first["trace_id"] == "abc123"
    assert first["attempt"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", first["time"])
    assert "task_id" not in second


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_exceptions_and_structlog(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    configure_logging("json")  # repeating does not duplicate output
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    with bind_context(agent_id="agent-7"):
        structlog.get_logger("y").warning("native", n=1)
    logging.getLogger("x").debug("below INFO: dropped")
    records = _json_lines(capsys.readouterr().err)
    assert len(records) == 2
    assert records[0]["level"] == "error"
    assert "RuntimeError: boom" in records[0]["exception"]
    assert records[1] == records[1] | {"message": "native", "n": 1, "agent_id": "agent-7"}


@pytest.mark.usefixtures("restore_logging")
def test_console_logs_and_explicit_stream() -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream=stream)
    with bind_context(task_id="t-9"):
        logging.getLogger("z").info("hello")
    out = stream.getvalue()
    assert "hello" in out
    assert "task_id=t-9" in out
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "LOUD")

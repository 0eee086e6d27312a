"""The docs site builds with --strict: a broken link, anchor or nav entry fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from server.observability.metrics import MeshMetrics

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_strict(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "performance.html").is_file()


def test_observability_page_names_every_metric() -> None:
    """docs/operations/observability.md lists every metric the server exports."""
    registry = CollectorRegistry()
    MeshMetrics(registry)
    page = (ROOT / "docs" / "operations" / "observability.md").read_text(encoding="utf-8")
    missing = []
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        if f"`{name}`" not in page:
            missing.append(name)
    assert not missing, f"observability.md does not list {missing}"


def test_observability_page_names_every_alert_and_dashboard() -> None:
    """Every alert rule and Grafana dashboard in deploy/observability is on the page."""
    page = (ROOT / "docs" / "operations" / "observability.md").read_text(encoding="utf-8")
    rules = yaml.safe_load((ROOT / "deploy" / "observability" / "alerts.yml").read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts, "no alert rules found"
    assert [a for a in alerts if a not in page] == []
    boards = sorted((ROOT / "deploy" / "observability" / "grafana" / "dashboards").glob("*.json"))
    titles = [json.loads(b.read_text())["title"].split(" / ")[-1] for b in boards]
    assert [t for t in titles if f"**{t}**" not in page] == [], titles


def test_security_page_names_every_role() -> None:
    """docs/operations/security.md describes every role of server/api/auth.py."""
    from server.api.auth import Role  # noqa: PLC0415 - imports the generated protos

    page = (ROOT / "docs" / "operations" / "security.md").read_text(encoding="utf-8")
    assert [r.value for r in Role if f"- `{r.value}`:" not in page] == []

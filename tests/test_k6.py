"""The k6 scenarios (loadtests/k6): they parse, their full forms are the plan's,
the short steady one passes against an embedded mesh with real agents, and the
"every task completes" threshold fails a run whose tasks never come back.

These start processes (agentmesh serve, agents, k6) and take about 40 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from loadtests.k6.run import (
    K6_DIR,
    PROFILES,
    ROOT,
    _bin,
    agents,
    embedded_mesh,
    k6_run,
    run_scenario,
)

pytestmark = pytest.mark.slow

SCENARIOS = ("steady", "spike", "stress", "soak")
K6_ENV = {**os.environ, "K6_NO_USAGE_REPORT": "true"}


def inspect(name: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """`k6 inspect` of one scenario: runs its init code (the protos load) and returns options."""
    cmd = [_bin("k6"), "inspect"]
    for key, value in (env or {}).items():
        cmd += ["-e", f"{key}={value}"]
    out = subprocess.run([*cmd, str(K6_DIR / f"{name}.js")], cwd=ROOT, env=K6_ENV,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    options: dict[str, object] = json.loads(out.stdout)
    return options


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_parses_in_both_forms(name: str) -> None:
    full = inspect(name)
    short = inspect(name, PROFILES[name].short)
    for options in (full, short):
        thresholds = options["thresholds"]
        assert isinstance(thresholds, dict)
        assert thresholds["task_completed"] == ["rate==1"]
        assert thresholds["mesh_errors"] == ["rate<0.001"]
        p95 = 2500 if name == "stress" else 1000
        assert thresholds["task_dispatch"] == [f"p(95)<{p95}", "p(99)<5000"]
    submit = full["scenarios"]["submit"]  # type: ignore[index]
    if name == "steady":
        assert (submit["rate"], submit["duration"]) == (10, "10m0s")
    elif name == "soak":
        assert (submit["rate"], submit["duration"]) == (50, "1h0m0s")
    elif name == "spike":
        assert [s["target"] for s in submit["stages"]] == [10, 100, 100, 10, 10]
    else:
        assert submit["vus"] * submit["iterations"] == 1000
        assert full["thresholds"]["peak_running"] == ["value>=1000"]  # type: ignore[index]


def test_bad_environment_is_refused() -> None:
    out = subprocess.run([_bin("k6"), "inspect", "-e", "RATE=fast", str(K6_DIR / "steady.js")],
                         cwd=ROOT, env=K6_ENV, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode != 0
    assert "RATE must be a positive number, got fast" in out.stderr


def test_helpers_of_the_library(tmp_path: Path) -> None:
    """lib/mesh.js's pure helpers, run by k6 itself on known values."""
    script = tmp_path / "helpers.js"
    script.write_text(f"""
import {{ millis, peakOverlap, seconds }} from '{K6_DIR / "lib" / "mesh.js"}';
export const options = {{ iterations: 1, vus: 1 }};
function eq(a, b, what) {{ if (a !== b) {{ throw new Error(`${{what}}: ${{a}} !== ${{b}}`); }} }}
export default function () {{
  eq(seconds('1m30s'), 90, 'seconds'); eq(seconds('1h'), 3600, 'hours');
  eq(seconds('2'), 2, 'bare');
  eq(millis('2026-01-01T00:00:01.000250000Z') - millis('2026-01-01T00:00:01Z'), 0.25, 'millis');
  eq(peakOverlap([[0, 10], [5, 15], [10, 20], [30, 40]]), 2, 'overlap');
  eq(peakOverlap([[0, 10], [10, 20]]), 1, 'touching');
}}
""")
    out = subprocess.run(k6_run("--quiet", "--no-summary",
                                "-e", f"PROTO_DIR={ROOT / 'protos'}", str(script)),
                         cwd=ROOT, env=K6_ENV, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "Error" not in out.stderr, out.stderr


def test_runs_at_once_and_with_6565_taken(tmp_path: Path) -> None:
    """k6 runs as run.py starts them open no REST API server: two at once, with
    k6's default API port (6565) held by something else, both run clean. (k6 1.x
    listens on localhost:6565 by default and logs "Error from API server" when it
    cannot, and a second run's API would be the first one's.)"""
    script = tmp_path / "pause.js"
    script.write_text("import { sleep } from 'k6';\n"
                      "export const options = { iterations: 1, vus: 1 };\n"
                      "export default function () { sleep(1); }\n")
    with contextlib.ExitStack() as stack:
        for host in ("127.0.0.1", "::1"):
            sock = stack.enter_context(socket.socket(
                socket.AF_INET6 if ":" in host else socket.AF_INET))
            with contextlib.suppress(OSError):  # already taken (or no IPv6): as good
                sock.bind((host, 6565))
                sock.listen()
        runs = [subprocess.Popen(k6_run("--quiet", "--no-summary", str(script)), cwd=ROOT,
                                 env=K6_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in runs]
    for proc, (stdout, stderr) in zip(runs, outs, strict=True):
        assert proc.returncode == 0, stdout + stderr
        assert "API server" not in stderr, stderr


def test_embedded_mesh_starts_while_the_fixed_ports_are_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another embedded agentmesh (a second `make loadtest`, `make run`) holds the
    console (8470) and A2A (41241) ports: the load test's own mesh still comes up
    (also outside pytest, whose conftest turns A2A off in the environment)."""
    monkeypatch.delenv("AGENTMESH_A2A_PORT", raising=False)
    monkeypatch.delenv("AGENTMESH_CONSOLE_PORT", raising=False)
    with contextlib.ExitStack() as stack:
        for port in (8470, 41241):
            sock = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):  # already held by something: as good
                sock.bind(("127.0.0.1", port))
                sock.listen()
        with embedded_mesh(tmp_path / "mesh.log") as target:
            assert target.startswith("127.0.0.1:")


def test_short_steady_passes_and_stuck_tasks_fail_it(tmp_path: Path) -> None:
    with embedded_mesh(tmp_path / "mesh.log") as target:
        res = run_scenario("steady", [target], out_dir=tmp_path,
                           extra_env={"DURATION": "8s", "DRAIN": "20s"})
        assert res["passed"], res
        assert res["thresholds_failed"] == []
        # 10 tasks/s for 8 s, each one back with its result.
        assert 75 <= res["tasks_created"] == res["tasks_submitted"] <= 85
        assert res["completed_share"] == 1
        assert res["error_rate"] == 0
        assert res["dispatch_ms"]["p(95)"] < 1000

        # The same scenario whose tasks name a capability no agent offers: they
        # stay queued, so the completion threshold must fail the run (exit 99).
        ns = "k6-stuck"
        with agents([target], ns, PROFILES["steady"], 0.0, tmp_path / "agents.log"):
            out = subprocess.run(
                k6_run("--quiet", "--summary-export", str(tmp_path / "stuck.json"),
                       "-e", f"MESH_TARGET={target}", "-e", f"MESH_NAMESPACE={ns}",
                       "-e", "MESH_CAPABILITY=nobody-offers-this", "-e", "DURATION=2s",
                       "-e", "DRAIN=2s", str(K6_DIR / "steady.js")),
                cwd=ROOT, env=K6_ENV, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 99, out.stdout + out.stderr
    metrics = json.loads((tmp_path / "stuck.json").read_text())["metrics"]
    assert metrics["task_completed"]["value"] == 0
    assert metrics["task_completed"]["thresholds"] == {"rate==1": True}  # crossed
    assert metrics["tasks_created"]["count"] >= 15

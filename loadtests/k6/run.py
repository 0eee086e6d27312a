"""Run the k6 scenarios against a mesh, with real agent processes.

    .venv/bin/python loadtests/k6/run.py [--target HOST:PORT[,HOST:PORT...]] [--full]
                                         [steady] [spike] [stress] [soak]

With no ``--target`` it starts an embedded mesh (``agentmesh serve``, memory
store) on a free port and stops it at the end; with one it drives that mesh
(several comma-separated replicas: k6's VUs and the agents are spread over
them). For each scenario it starts ``loadtests/noop_agent.py`` processes in a
namespace of the run's own, waits until the server counts them live, runs
``k6 run`` (its summary is printed as it ends, its JSON summary written to
``loadtests/k6/out/<scenario>.json``), stops the agents and, at the end,
prints one line of figures per scenario. Without ``--full`` the scenarios run
their short forms (about 2 minutes in all); with it, their defaults (steady
10 min, spike 7 min, soak 1 h).

Exit status: 0 when every scenario passed its thresholds, 1 otherwise (the
k6 exit status of each run is in its line: 99 means thresholds failed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from agentmesh.v1 import task_pb2, task_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
K6_DIR = ROOT / "loadtests" / "k6"
OUT = K6_DIR / "out"
AGENT = ROOT / "loadtests" / "noop_agent.py"
SCENARIOS = ("steady", "spike", "stress", "soak")
TREND_STATS = "avg,med,p(95),p(99),max"
NO_API = ("--address", "")
"""k6 flags that keep its REST API server off. k6 1.x starts one on
localhost:6565 unless ``--address`` is empty (2.x has it off by default), so
two runs at once, or anything else on 6565, made ``k6 run`` fail; nothing
here uses that API."""


@dataclass(frozen=True)
class Profile:
    """How one scenario is run: its agents and its environment (short and full)."""

    agents: int
    concurrency: int
    short: dict[str, str]
    full: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    full_delay: float = 0.0


PROFILES = {
    "steady": Profile(agents=2, concurrency=64, short={"RATE": "10", "DURATION": "20s"}),
    "spike": Profile(agents=2, concurrency=64,
                     short={"BASE_RATE": "10", "PEAK_RATE": "100", "BASE_DURATION": "10s",
                            "RAMP": "5s", "PEAK_DURATION": "10s"}),
    # 4 x 256 slots >= 1,000 tasks; each handler sleeps longer than the submit burst.
    "stress": Profile(agents=4, concurrency=256, short={"TASKS": "1000"}, delay=10.0,
                      full_delay=60.0, full={"DRAIN": "300s"}),
    "soak": Profile(agents=2, concurrency=64, short={"RATE": "50", "DURATION": "20s"}),
}


def seconds(value: str) -> float:
    """Seconds in a k6 duration ("90s", "10m", "1h", "1m30s" or a bare number of seconds)."""
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * units[u] for n, u in parts)


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A console script of this virtualenv, else from PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: run `make install` (it comes with the dev extra)")
    return found


def k6_run(*args: str) -> list[str]:
    """The ``k6 run`` command line with ``args``, its REST API server off (``NO_API``)."""
    return [_bin("k6"), "run", *NO_API, *args]


def _wait_ready(target: str, timeout: float = 60.0) -> None:
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout)


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def embedded_mesh(log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """An ``agentmesh serve`` process (memory store) on a free port; yields host:port."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            # No console (8470) nor A2A gateway (41241), the embedded mode's fixed
            # ports: a second run, or any agentmesh serving here, would hold them.
            [_bin("agentmesh"), "serve", "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", "0", "--console-port", "0", "--a2a-port", "0",
             "--log-level", "WARNING"],
            cwd=ROOT, stdout=out, stderr=out, env={**os.environ, **(env or {})})
    try:
        target = f"127.0.0.1:{port}"
        try:
            _wait_ready(target)
        except grpc.FutureTimeoutError:
            raise SystemExit(f"the embedded mesh did not come up; see {log}") from None
        yield target
    finally:
        _stop(proc)


def _live_agents(target: str, namespace: str) -> int:
    with grpc.insecure_channel(target) as ch:
        stats = task_pb2_grpc.TaskServiceStub(ch).GetStats(
            task_pb2.GetStatsRequest(namespace=namespace), timeout=5)
    return int(stats.agents_live)


@contextlib.contextmanager
def agents(targets: list[str], namespace: str, profile: Profile, delay: float,
           log: Path) -> Iterator[None]:
    """``profile.agents`` noop agent processes in ``namespace``, live before this yields."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with log.open("ab") as out:
            for i in range(profile.agents):
                rotated = targets[i % len(targets):] + targets[:i % len(targets)]
                procs.append(subprocess.Popen(
                    [sys.executable, str(AGENT), "--target", ",".join(rotated),
                     "--name", f"{namespace}-{i}", "--namespace", namespace,
                     "--capability", "noop", "--concurrency", str(profile.concurrency),
                     "--delay", f"{delay:g}"],
                    cwd=ROOT, stdout=out, stderr=out))
        deadline = time.monotonic() + 60
        while _live_agents(targets[0], namespace) < profile.agents:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"the agents of {namespace} did not come up; see {log}")
            time.sleep(0.2)
        yield
    finally:
        for p in procs:
            _stop(p)


def run_scenario(name: str, targets: list[str], *, full: bool = False,
                 extra_env: dict[str, str] | None = None, out_dir: Path = OUT) -> dict[str, Any]:
    """One k6 scenario with its agents; returns its figures (see ``figures``)."""
    profile = PROFILES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    namespace = f"k6-{name}-{secrets.token_hex(3)}"
    env = {**(profile.full if full else profile.short), **(extra_env or {})}
    summary = out_dir / f"{name}.json"
    summary.unlink(missing_ok=True)
    cmd = k6_run("--quiet", "--summary-export", str(summary),
                 "--summary-trend-stats", TREND_STATS,
                 "-e", f"MESH_TARGET={','.join(targets)}", "-e", f"MESH_NAMESPACE={namespace}",
                 "-e", "MESH_CAPABILITY=noop")
    for key, value in env.items():
        cmd += ["-e", f"{key}={value}"]
    cmd.append(str(K6_DIR / f"{name}.js"))
    delay = profile.full_delay if full else profile.delay
    print(f"== {name}: {' '.join(f'{k}={v}' for k, v in env.items()) or 'defaults'}; "
          f"{profile.agents} agents x {profile.concurrency}"
          f"{f', handler delay {delay:g} s' if delay else ''}; namespace {namespace}",
          flush=True)
    started = time.monotonic()
    with agents(targets, namespace, profile, delay, out_dir / f"{name}-agents.log"):
        rc = subprocess.run(cmd, cwd=ROOT, check=False,
                            env={**os.environ, "K6_NO_USAGE_REPORT": "true"}).returncode
    result = figures(summary) if summary.exists() else {}
    return {"scenario": name, "k6_exit": rc, "passed": rc == 0,
            "seconds": round(time.monotonic() - started, 1), "summary": str(summary),
            "namespace": namespace, **result}


def figures(summary: Path) -> dict[str, Any]:
    """The figures of one k6 JSON summary (``--summary-export``)."""
    metrics: dict[str, Any] = json.loads(summary.read_text())["metrics"]

    def get(metric: str, key: str) -> Any:
        return metrics.get(metric, {}).get(key)

    failed = sorted(f"{m}: {t}" for m, v in metrics.items()
                    for t, crossed in v.get("thresholds", {}).items() if crossed)
    return {
        "tasks_submitted": get("tasks_submitted", "count") or 0,
        "tasks_created": get("tasks_created", "count") or 0,
        "completed_share": get("task_completed", "value"),
        "tasks_per_s": get("tasks_created", "rate"),
        "error_rate": get("mesh_errors", "value"),
        "dispatch_ms": {k: get("task_dispatch", k) for k in ("med", "p(95)", "p(99)", "max")},
        "e2e_ms": {k: get("task_e2e", k) for k in ("med", "p(95)", "p(99)", "max")},
        "peak_running": get("peak_running", "value"),
        "uptime": get("mesh_up", "value"),
        "dropped_iterations": get("dropped_iterations", "count") or 0,
        "thresholds_failed": failed,
    }


def line(res: dict[str, Any]) -> str:
    """One line of a scenario's figures."""
    if "tasks_created" not in res:
        return f"{res['scenario']:7} FAIL k6 exit {res['k6_exit']}, no summary written"
    d = res["dispatch_ms"]
    e = res["e2e_ms"]
    parts = [f"{res['scenario']:7} {'pass' if res['passed'] else 'FAIL'}",
             f"{res['tasks_created']} tasks ({res['tasks_per_s']:.1f}/s)",
             f"completed {res['completed_share']:.2%}",
             f"errors {res['error_rate']:.3%}",
             f"dispatch p95 {d['p(95)']:.2f} ms p99 {d['p(99)']:.2f} ms",
             f"submit->result p95 {e['p(95)']:.1f} ms"]
    if res["peak_running"] is not None:
        parts.append(f"peak running {res['peak_running']:.0f}")
    if res["uptime"] is not None:
        parts.append(f"uptime {res['uptime']:.3%}")
    if res["thresholds_failed"]:
        parts.append(f"failed: {'; '.join(res['thresholds_failed'])}")
    if res["k6_exit"] not in (0, 99):
        parts.append(f"k6 exit {res['k6_exit']}")
    return ", ".join(parts)


def main() -> None:
    """Parse arguments, run the scenarios, print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--target", default=os.environ.get("TARGET", ""),
                        help="host:port[,host:port...] of a running mesh (default: start one)")
    parser.add_argument("--full", action="store_true",
                        help="the scenarios' full forms (about 80 min) instead of the short ones")
    args = parser.parse_args()
    names = args.scenarios or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    with contextlib.ExitStack() as stack:
        if args.target:
            targets = [t.strip() for t in args.target.split(",") if t.strip()]
            for t in targets:
                try:
                    _wait_ready(t, timeout=10)
                except grpc.FutureTimeoutError:
                    raise SystemExit(f"no mesh answers at {t}") from None
        else:
            targets = [stack.enter_context(embedded_mesh(OUT / "mesh.log"))]
            print(f"embedded mesh at {targets[0]} (log {OUT / 'mesh.log'})", flush=True)
        results = [run_scenario(n, targets, full=args.full) for n in names]
    print(f"\nk6 scenarios against {','.join(targets) if args.target else 'an embedded mesh'}"
          f" ({'full' if args.full else 'short'} forms); JSON summaries in {OUT}:")
    for res in results:
        print("  " + line(res))
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    sys.exit(0 if all(r["passed"] for r in results) else 1)


if __name__ == "__main__":
    main()

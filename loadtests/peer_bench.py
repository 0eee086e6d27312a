"""Peer mode: agentmesh and Dramatiq on the same private Redis, interleaved.

    .venv/bin/python loadtests/peer_bench.py                 # 3 rounds, AOF everysec
    .venv/bin/python loadtests/peer_bench.py --code /tmp/base --rounds 3
        # also agentmesh from another tree (A/B against an older commit)

Each round runs, in an order that alternates between rounds, every system on
the same W1 (5,000 no-op tasks, 2 worker processes) and W2 (100 tasks/s open
loop for 10 s, submit -> result seen at the submitter):

- ``mesh``: agentmesh on Redis + NATS, one replica (``bench.py --store redis
  --bus nats``), the production path;
- ``embedded``: agentmesh with the memory store and in-process bus;
- ``base`` (with ``--code``): ``mesh`` run from another source tree;
- ``dramatiq``: Dramatiq 2.x, RedisBroker plus the Results middleware on the
  same Redis (``dramatiq_peer.py``), 2 worker processes, its default threads.

Persistence on means, for both: a private ``redis-server`` started here with
``appendonly yes``, ``appendfsync everysec`` (``--appendfsync always`` to fsync
every write) and no RDB snapshots; every queued task, lease and result of
either system is in its AOF. NATS (a private ``nats-server -js`` started here)
carries agentmesh's wake-ups and watch events only, never the source of truth.

CPU per task (W1) is summed over every process of the system: for agentmesh
the server, both agents, the submitter, redis-server and nats-server; for
Dramatiq the worker processes (the whole ``dramatiq`` process tree), the
submitter and redis-server. The submitter, server and agents report their CPU
over the W1 interval itself; redis-server, nats-server and the Dramatiq
workers are read from /proc around the submitter's run, so they include its
start-up (a conservative count for both systems).

Output: one JSON line per run, then a summary with medians and the ratios
agentmesh / Dramatiq (W1 throughput: higher is better; W2 p99 and CPU per
task: lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import cpu_seconds, free_port  # loadtests/ is on sys.path (run as a script)

PY = sys.executable
HERE = Path(__file__).resolve().parent


def wait_tcp(port: int, limit: float = 20.0) -> None:
    """Until something accepts on the loopback port."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def children(pid: int) -> list[int]:
    """``pid`` and every descendant (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree (live processes only)."""
    return sum(cpu_seconds(p) for p in children(pid))


class Services:
    """A private redis-server (AOF on) and nats-server for the whole run."""

    def __init__(self, appendfsync: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="agentmesh-peer-"))
        self.redis_port, self.nats_port = free_port(), free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", appendfsync,
             "--save", "", "--logfile", str(self.dir / "redis.log")])
        nats = shutil.which("nats-server", path=str(Path(PY).parent)) or "nats-server"
        self.nats = subprocess.Popen(
            [nats, "-a", "127.0.0.1", "-p", str(self.nats_port), "-js", "-sd",
             str(self.dir / "js"), "-l", str(self.dir / "nats.log")])
        wait_tcp(self.redis_port)
        wait_tcp(self.nats_port)
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"

    def close(self) -> None:
        """Stop both servers and remove their files."""
        for p in (self.redis, self.nats):
            p.send_signal(signal.SIGTERM)
        for p in (self.redis, self.nats):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def last_json(text: str) -> list[dict[str, Any]]:
    """The JSON lines a run printed."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run_mesh(svc: Services, args: argparse.Namespace, workload: str, *, embedded: bool,
             code: Path | None) -> dict[str, Any]:
    """One bench.py run of one workload; W1's CPU gets redis-server and nats-server."""
    cmd = [PY, str(HERE / "bench.py"), "--only", workload, "--tasks", str(args.tasks),
           "--rate", str(args.rate), "--duration", str(args.duration)]
    if not embedded:
        cmd += ["--store", svc.redis_url, "--bus", svc.nats_url]
    tree = code or HERE.parent  # every process imports this tree's code, never an install's
    cmd += ["--code", str(tree)]
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'gen'}"}
    before = {"redis": cpu_seconds(svc.redis.pid), "nats": cpu_seconds(svc.nats.pid)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    after = {"redis": cpu_seconds(svc.redis.pid), "nats": cpu_seconds(svc.nats.pid)}
    if out.returncode != 0:
        raise RuntimeError(f"bench.py failed: {out.stderr[-2000:]}")
    result = last_json(out.stdout)[-1]
    if workload == "w1":
        cpu = result["cpu_s"]
        if not embedded:
            cpu.update({k: round(after[k] - before[k], 3) for k in after})
        result["cpu_us_per_task"] = round(sum(cpu.values()) / args.tasks * 1e6)
    return result


def run_dramatiq(svc: Services, args: argparse.Namespace, workload: str) -> dict[str, Any]:
    """Dramatiq workers (2 processes) and one submitter run of one workload."""
    env = {**os.environ, "DRAMATIQ_PEER_REDIS": svc.redis_url,
           "DRAMATIQ_PEER_NS": f"peer-{uuid.uuid4().hex[:8]}"}
    workers = subprocess.Popen(
        [PY, "-m", "dramatiq", "dramatiq_peer", "--path", str(HERE), "--processes", "2"],
        cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        time.sleep(2.0)  # the worker processes fork and connect
        pids = children(workers.pid)
        before = {"redis": cpu_seconds(svc.redis.pid), "workers": sum(map(cpu_seconds, pids))}
        out = subprocess.run(
            [PY, str(HERE / "dramatiq_peer.py"), "--only", workload, "--tasks", str(args.tasks),
             "--rate", str(args.rate), "--duration", str(args.duration)],
            env=env, capture_output=True, text=True, timeout=600, check=False)
        after = {"redis": cpu_seconds(svc.redis.pid), "workers": sum(map(cpu_seconds, pids))}
        if out.returncode != 0:
            raise RuntimeError(f"dramatiq_peer.py failed: {out.stderr[-2000:]}")
        result = last_json(out.stdout)[-1]
        if workload == "w1":
            cpu = result["cpu_s"]
            cpu.update({k: round(after[k] - before[k], 3) for k in after})
            result["cpu_us_per_task"] = round(sum(cpu.values()) / args.tasks * 1e6)
        return result
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        try:
            workers.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(workers.pid, signal.SIGKILL)
            workers.wait()


def summary(runs: dict[str, list[dict[str, Any]]], versus: str) -> dict[str, Any]:
    """Medians per system and the ratios to ``versus``."""
    med: dict[str, dict[str, float]] = {}
    for name, rows in runs.items():
        w1 = [r for r in rows if r["workload"] == "W1"]
        w2 = [r for r in rows if r["workload"] == "W2"]
        med[name] = {
            "w1_tasks_per_s": statistics.median(r["tasks_per_s"] for r in w1),
            "w1_cpu_us_per_task": statistics.median(r["cpu_us_per_task"] for r in w1),
            "w2_p50_ms": statistics.median(r["p50_ms"] for r in w2),
            "w2_p99_ms": statistics.median(r["p99_ms"] for r in w2),
        }
    ratios = {}
    ref = med.get(versus)
    if ref:
        for name, m in med.items():
            if name == versus:
                continue
            ratios[f"{name}/{versus}"] = {k: round(m[k] / ref[k], 2) if ref[k] else None
                                          for k in m}
    return {"medians": med, "ratios": ratios}


def main() -> None:
    """Interleave the systems' runs and print every run and the summary."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--systems", default="mesh,embedded,dramatiq",
                        help="comma-separated: mesh, embedded, dramatiq (base is added by "
                             "--code)")
    parser.add_argument("--code", type=Path, default=None,
                        help="another source tree to run as 'base' (agentmesh on Redis + NATS)")
    parser.add_argument("--appendfsync", choices=["everysec", "always"], default="everysec")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    if args.code is not None:
        args.code = args.code.resolve()
        systems.append("base")
    svc = Services(args.appendfsync)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    try:
        for rnd in range(args.rounds):
            order = systems if rnd % 2 == 0 else systems[::-1]
            for name in order:
                for workload in ("w1", "w2"):
                    if name == "dramatiq":
                        row = run_dramatiq(svc, args, workload)
                    else:
                        row = run_mesh(svc, args, workload, embedded=name == "embedded",
                                       code=args.code if name == "base" else None)
                    row = {"system": name, "round": rnd, **{k: v for k, v in row.items()
                                                           if k != "system"}}
                    runs[name].append(row)
                    print(json.dumps(row), flush=True)
    finally:
        svc.close()
    print(json.dumps({"summary": summary(runs, "dramatiq"),
                      "persistence": f"redis appendonly yes, appendfsync {args.appendfsync}"},
                     indent=1), flush=True)


if __name__ == "__main__":
    main()

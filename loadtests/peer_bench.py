"""Peer mode: agentmesh, Dramatiq, RQ and Celery on the same private Redis, interleaved.

    .venv/bin/python loadtests/peer_bench.py                 # 3 rounds, AOF everysec
    .venv/bin/python loadtests/peer_bench.py --systems mesh,rq,celery --rounds 2
    .venv/bin/python loadtests/peer_bench.py --code /tmp/base --rounds 3
        # also agentmesh from another tree (A/B against an older commit)

Each round runs, in an order that alternates between rounds, every system
named by ``--systems`` (default: all five below) on the same W1 (5,000 no-op
tasks, 2 worker processes) and W2 (100 tasks/s open loop for 10 s, submit ->
result seen at the submitter):

- ``mesh``: agentmesh on Redis + NATS, one replica (``bench.py --store redis
  --bus nats``), the production path;
- ``embedded``: agentmesh with the memory store and in-process bus;
- ``base`` (with ``--code``): ``mesh`` run from another source tree;
- ``dramatiq``: Dramatiq 2.x, RedisBroker plus the Results middleware on the
  same Redis (``dramatiq_peer.py``), 2 worker processes, its default threads;
- ``rq``: RQ, two ``rq worker`` processes with ``SimpleWorker`` (no fork per
  job), results awaited with ``job.latest_result(timeout=)`` (``rq_peer.py``);
- ``celery``: Celery 5, Redis broker and Redis result backend, one prefork
  worker with concurrency 2, ``acks_late``, results awaited with
  ``AsyncResult.get`` (``celery_peer.py``).

Each peer module's docstring says how that system is configured and why;
their W1 and W2 are one piece of code (``peer_workload.py``), measuring what
bench.py measures for agentmesh.

Persistence on means, for every system: a private ``redis-server`` started
here with ``appendonly yes``, ``appendfsync everysec`` (``--appendfsync
always`` to fsync every write) and no RDB snapshots; every queued task, lease
and result of each system is in its AOF. NATS (a private ``nats-server -js``
started here) carries agentmesh's wake-ups and watch events only, never the
source of truth.

CPU per task (W1) is summed over every process of the system: for agentmesh
the server, both agents, the submitter, redis-server and nats-server; for a
peer its worker process trees (Dramatiq's ``dramatiq`` tree, both RQ
workers, Celery's main and pool processes), the submitter and redis-server.
The submitter, server and agents report their CPU over the W1 interval
itself; redis-server, nats-server and the peers' workers are read from /proc
around the submitter's run, so they include its start-up (a conservative
count for every system).

Output: one JSON line per run, then a summary with medians, the ratios of
each agentmesh system to each peer (W1 throughput: higher is better; W2 p99
and CPU per task: lower is better) and issue 12's targets that this run's
systems can judge, each with its value, bar and whether it is met.
"""

from __future__ import annotations

import argparse
import contextlib
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
PEERS = ("dramatiq", "rq", "celery")  # each is loadtests/<name>_peer.py
MESH = ("mesh", "embedded")


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


def peer_workers(name: str, ns: str, redis_url: str) -> list[list[str]]:
    """The commands that start a peer's two worker processes (each its own tree)."""
    if name == "dramatiq":
        return [[PY, "-m", "dramatiq", "dramatiq_peer", "--path", str(HERE),
                 "--processes", "2"]]
    if name == "rq":
        # two RQ workers, each one process: SimpleWorker runs jobs in-process
        one = [PY, "-m", "rq.cli", "worker", "--worker-class", "rq.SimpleWorker",
               "--path", str(HERE), "--url", redis_url, "--logging_level", "WARNING", ns]
        return [one, one]
    if name == "celery":
        return [[PY, "-m", "celery", "-A", "celery_peer", "worker", "--pool", "prefork",
                 "--concurrency", "2", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "--loglevel", "WARNING"]]
    raise ValueError(f"unknown peer {name!r}")


def tree_cpus(roots: list[int]) -> dict[int, float]:
    """CPU seconds of every live process in these trees, by pid."""
    return {p: cpu_seconds(p) for root in roots for p in children(root)}


def run_peer(svc: Services, args: argparse.Namespace, name: str,
             workload: str) -> dict[str, Any]:
    """A peer's workers (2 processes) and one submitter run of one workload.

    The workers' CPU is every process of their trees read before and after the
    submitter's run; a process that appeared in between counts from zero.
    """
    ns = f"peer-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, f"{name.upper()}_PEER_REDIS": svc.redis_url,
           f"{name.upper()}_PEER_NS": ns}
    logs = [svc.dir / f"{ns}-{name}-{i}.log" for i in range(2)]
    workers = []
    for cmd, log in zip(peer_workers(name, ns, svc.redis_url), logs, strict=False):
        with log.open("wb") as err:
            workers.append(subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                                            stderr=err, start_new_session=True))
    roots = [w.pid for w in workers]
    try:
        time.sleep(2.0)  # the worker processes fork and connect
        before = {"redis": cpu_seconds(svc.redis.pid), "workers": tree_cpus(roots)}
        out = subprocess.run(
            [PY, str(HERE / f"{name}_peer.py"), "--only", workload, "--tasks", str(args.tasks),
             "--rate", str(args.rate), "--duration", str(args.duration)],
            env=env, capture_output=True, text=True, timeout=600, check=False)
        after_workers = tree_cpus(roots)
        redis_s = cpu_seconds(svc.redis.pid) - before["redis"]
        if out.returncode != 0:
            worker_log = "".join(log.read_text(errors="replace")[-1500:]
                                 for log in logs if log.exists())
            raise RuntimeError(f"{name}_peer.py failed: {out.stderr[-2000:]}\n"
                               f"{name} workers' log: {worker_log}")
        result = last_json(out.stdout)[-1]
        if workload == "w1":
            cpu = result["cpu_s"]
            cpu["workers"] = round(sum(t - before["workers"].get(p, 0.0)
                                       for p, t in after_workers.items()), 3)
            cpu["redis"] = round(redis_s, 3)
            result["cpu_us_per_task"] = round(sum(cpu.values()) / args.tasks * 1e6)
        return result
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):  # it may have died on its own
                os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait()


def medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    """One system's medians over its rounds."""
    w1 = [r for r in rows if r["workload"] == "W1"]
    w2 = [r for r in rows if r["workload"] == "W2"]
    return {
        "w1_tasks_per_s": statistics.median(r["tasks_per_s"] for r in w1),
        "w1_cpu_us_per_task": statistics.median(r["cpu_us_per_task"] for r in w1),
        "w2_p50_ms": statistics.median(r["p50_ms"] for r in w2),
        "w2_p99_ms": statistics.median(r["p99_ms"] for r in w2),
    }


def targets(med: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Issue 12's targets that the systems in this run can judge, on the medians.

    mesh (Redis + NATS, 1 replica): W1 >= 1.5x Dramatiq, W2 p99 <= RQ's and
    Celery's, CPU per task <= 500 us; embedded: W1 >= 2.5x Dramatiq, CPU per
    task <= 250 us (its W2 bar is the AutoGen runtime's p99, not run here).
    """
    out: dict[str, dict[str, Any]] = {}

    def judge(name: str, value: float, bar: float, *, at_least: bool) -> None:
        out[name] = {"value": value, "bar": round(bar, 2),
                     "met": value >= bar if at_least else value <= bar}

    for system, w1_times, cpu_bar in (("mesh", 1.5, 500), ("embedded", 2.5, 250)):
        m = med.get(system)
        if m is None:
            continue
        if "dramatiq" in med:
            judge(f"{system} W1 >= {w1_times}x dramatiq", m["w1_tasks_per_s"],
                  w1_times * med["dramatiq"]["w1_tasks_per_s"], at_least=True)
        judge(f"{system} CPU per task <= {cpu_bar} us", m["w1_cpu_us_per_task"], cpu_bar,
              at_least=False)
    durable = [p for p in ("rq", "celery") if p in med]
    if "mesh" in med and durable:
        judge(f"mesh W2 p99 <= {' and '.join(durable)}", med["mesh"]["w2_p99_ms"],
              min(med[p]["w2_p99_ms"] for p in durable), at_least=False)
    return out


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per system, the ratios of each agentmesh system to each peer, the targets."""
    med = {name: medians(rows) for name, rows in runs.items() if rows}
    ratios = {}
    for name, m in med.items():
        if name in PEERS:
            continue
        for peer in PEERS:
            ref = med.get(peer)
            if ref:
                ratios[f"{name}/{peer}"] = {k: round(m[k] / ref[k], 2) if ref[k] else None
                                            for k in m}
    return {"medians": med, "ratios": ratios, "targets": targets(med)}


def main() -> None:
    """Interleave the systems' runs and print every run and the summary."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--systems", default=",".join(MESH + PEERS),
                        help=f"comma-separated, from: {', '.join(MESH + PEERS)} (base is "
                             "added by --code)")
    parser.add_argument("--code", type=Path, default=None,
                        help="another source tree to run as 'base' (agentmesh on Redis + NATS)")
    parser.add_argument("--appendfsync", choices=["everysec", "always"], default="everysec")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(MESH + PEERS))
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
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
                    if name in PEERS:
                        row = run_peer(svc, args, name, workload)
                    else:
                        row = run_mesh(svc, args, workload, embedded=name == "embedded",
                                       code=args.code if name == "base" else None)
                    row = {"system": name, "round": rnd, **{k: v for k, v in row.items()
                                                           if k != "system"}}
                    runs[name].append(row)
                    print(json.dumps(row), flush=True)
    finally:
        svc.close()
    print(json.dumps({"summary": summary(runs),
                      "persistence": f"redis appendonly yes, appendfsync {args.appendfsync}"},
                     indent=1), flush=True)


if __name__ == "__main__":
    main()

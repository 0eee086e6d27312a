"""Dramatiq on Redis, the peer that ``peer_bench.py`` compares agentmesh with.

One module, two roles:

- the actor module the Dramatiq workers load
  (``python -m dramatiq dramatiq_peer --path loadtests --processes 2``);
- the submitter (``python loadtests/dramatiq_peer.py --only w1|w2``), which
  runs bench.py's workloads with Dramatiq's own client API: ``actor.send``
  and ``message.get_result(block=True)`` through the Results middleware on the
  same Redis, and prints one JSON line like bench.py.

W1: N no-op messages sent back to back from one thread while another thread
    collects the results in order (each a blocking BRPOPLPUSH); tasks/s from
    the first send to the last result seen here.
W2: open loop at --rate messages/s for --duration s; each result is awaited
    by its own thread from a pool (blocking get); p50/p95/p99 of send ->
    result seen here.

The broker URL and key namespace come from DRAMATIQ_PEER_REDIS and
DRAMATIQ_PEER_NS, so the workers and the submitter agree.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import threading
import time
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

URL = os.environ.get("DRAMATIQ_PEER_REDIS", "redis://127.0.0.1:6379/0")
NS = os.environ.get("DRAMATIQ_PEER_NS", "dramatiq-peer")
RESULT_TTL_MS = 600_000
GET_TIMEOUT_MS = 60_000

backend = RedisBackend(url=URL, namespace=f"{NS}-results")
broker = RedisBroker(url=URL, namespace=NS)
broker.add_middleware(Results(backend=backend, store_results=True, result_ttl=RESULT_TTL_MS))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=3)
def noop(value: Any) -> Any:
    """The no-op task: returns its input (like loadtests/noop_agent.py)."""
    return value


def cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    t = os.times()
    return t.user + t.system


def w1(n: int) -> dict[str, Any]:
    """Back-to-back sends; throughput to the last result."""
    messages: list[Any] = []
    ready = threading.Semaphore(0)
    results: list[Any] = []

    def collect() -> None:
        for i in range(n):
            ready.acquire()
            results.append(messages[i].get_result(backend=backend, block=True,
                                                  timeout=GET_TIMEOUT_MS))

    collector = threading.Thread(target=collect)
    collector.start()
    start = time.perf_counter()
    for i in range(n):
        messages.append(noop.send({"i": i}))
        ready.release()
    submit_s = time.perf_counter() - start
    collector.join()
    total = time.perf_counter() - start
    if results != [{"i": i} for i in range(n)]:
        raise SystemExit("dramatiq W1: a result is missing or wrong")
    return {"tasks": n, "seconds": round(total, 3), "tasks_per_s": round(n / total, 1),
            "submit_per_s": round(n / submit_s, 1)}


def w2(rate: float, duration: float) -> dict[str, Any]:
    """Open loop at a fixed rate; latency percentiles from send to result seen."""
    n = int(rate * duration)
    latencies: list[float] = []
    lock = threading.Lock()

    def wait(message: Any, t0: float) -> None:
        message.get_result(backend=backend, block=True, timeout=GET_TIMEOUT_MS)
        seen = time.perf_counter()
        with lock:
            latencies.append(seen - t0)

    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        begin = time.perf_counter()
        futures = []
        for i in range(n):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            futures.append(pool.submit(wait, noop.send({"i": i}), t0))
        for f in futures:
            f.result()
    qs = statistics.quantiles(latencies, n=100)
    return {"tasks": n, "p50_ms": round(qs[49] * 1e3, 2), "p95_ms": round(qs[94] * 1e3, 2),
            "p99_ms": round(qs[98] * 1e3, 2), "max_ms": round(max(latencies) * 1e3, 2)}


def main() -> None:
    """Run one workload and print one JSON line (CPU of this process included)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["w1", "w2"], required=True)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    # Warm up: one round trip through a worker, so connections and imports are done.
    noop.send({"warm": True}).get_result(backend=backend, block=True, timeout=GET_TIMEOUT_MS)
    before = cpu_seconds()
    if args.only == "w1":
        result = {"workload": "W1", **w1(args.tasks)}
    else:
        result = {"workload": "W2", **w2(args.rate, args.duration)}
    result["cpu_s"] = {"submitter": round(cpu_seconds() - before, 3)}
    print(json.dumps({"system": "dramatiq", **result}), flush=True)


if __name__ == "__main__":
    main()

"""W1 and W2 for the peer systems, measured by one piece of code for all of them.

``dramatiq_peer.py``, ``rq_peer.py`` and ``celery_peer.py`` each give this
module two callables written with their own system's client API:

- ``send(value)``: enqueue the no-op task with ``value`` and return the
  system's handle (a message, a job, an ``AsyncResult``);
- ``wait(handle)``: block until that task's result is seen here and return it
  (raising if it failed or did not come within the system's timeout).

W1: ``n`` no-op tasks sent back to back from one thread while a second thread
    waits for the results in order; tasks/s from the first send to the last
    result seen here (bench.py's W1 counts the same interval).
W2: open loop at ``rate`` tasks/s for ``duration`` s; the send time is taken
    just before each send, and a pooled thread per task waits for its result;
    p50/p95/p99 of send -> result seen here.

Both check every result against its input: a missing or wrong one ends the
run with an error, and W2 reports how many came back (``results``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

Send = Callable[[dict[str, Any]], Any]
Wait = Callable[[Any], Any]
WAITERS = 64  # W2's waiting threads: far more than 100 tasks/s x a few ms ever needs


def cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    t = os.times()
    return t.user + t.system


def w1(send: Send, wait: Wait, n: int, system: str) -> dict[str, Any]:
    """Back-to-back sends; throughput to the last result."""
    handles: list[Any] = []
    ready = threading.Semaphore(0)
    results: list[Any] = []
    failure: list[BaseException] = []

    def collect() -> None:
        try:
            for i in range(n):
                ready.acquire()
                results.append(wait(handles[i]))
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    collector = threading.Thread(target=collect)
    collector.start()
    start = time.perf_counter()
    for i in range(n):
        handles.append(send({"i": i}))
        ready.release()
    submit_s = time.perf_counter() - start
    collector.join()
    total = time.perf_counter() - start
    if failure:
        raise SystemExit(f"{system} W1: waiting for a result failed: {failure[0]!r}")
    if results != [{"i": i} for i in range(n)]:
        raise SystemExit(f"{system} W1: a result is missing or wrong")
    return {"tasks": n, "results": len(results), "seconds": round(total, 3),
            "tasks_per_s": round(n / total, 1), "submit_per_s": round(n / submit_s, 1)}


def w2(send: Send, wait: Wait, rate: float, duration: float, system: str) -> dict[str, Any]:
    """Open loop at a fixed rate; latency percentiles from send to result seen."""
    n = int(rate * duration)
    latencies: list[float] = []
    lock = threading.Lock()

    def await_one(handle: Any, i: int, t0: float) -> None:
        value = wait(handle)
        seen = time.perf_counter()
        if value != {"i": i}:
            raise SystemExit(f"{system} W2: task {i} returned {value!r}")
        with lock:
            latencies.append(seen - t0)

    with concurrent.futures.ThreadPoolExecutor(max_workers=WAITERS) as pool:
        begin = time.perf_counter()
        futures = []
        for i in range(n):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            futures.append(pool.submit(await_one, send({"i": i}), i, t0))
        for f in futures:
            f.result()
    if len(latencies) != n:
        raise SystemExit(f"{system} W2: {n - len(latencies)} results missing")
    qs = statistics.quantiles(latencies, n=100) if n > 1 else [latencies[0]] * 99
    return {"tasks": n, "results": len(latencies), "p50_ms": round(qs[49] * 1e3, 2),
            "p95_ms": round(qs[94] * 1e3, 2), "p99_ms": round(qs[98] * 1e3, 2),
            "max_ms": round(max(latencies) * 1e3, 2)}


def main(system: str, send: Send, wait: Wait, doc: str | None) -> None:
    """Run one workload and print one JSON line (this process's CPU included)."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["w1", "w2"], required=True)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    # Warm up: one round trip through a worker, so connections and imports are done.
    if wait(send({"warm": True})) != {"warm": True}:
        raise SystemExit(f"{system}: the warm-up task returned something else")
    before = cpu_seconds()
    if args.only == "w1":
        result = {"workload": "W1", **w1(send, wait, args.tasks, system)}
    else:
        result = {"workload": "W2", **w2(send, wait, args.rate, args.duration, system)}
    result["cpu_s"] = {"submitter": round(cpu_seconds() - before, 3)}
    print(json.dumps({"system": system, **result}), flush=True)

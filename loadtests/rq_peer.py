"""RQ on Redis, a peer that ``peer_bench.py`` compares agentmesh with.

One module, two roles:

- the job module the RQ workers import: ``peer_bench.py`` starts two worker
  processes, each
  ``rq worker --worker-class rq.SimpleWorker --path loadtests --url URL NS``;
- the submitter (``python loadtests/rq_peer.py --only w1|w2``), which runs
  bench.py's workloads (``peer_workload.py``, the same code for every peer)
  with RQ's own client API: ``Queue.enqueue`` and
  ``job.latest_result(timeout=...)``, and prints one JSON line like bench.py.

How it is configured, and why:

- ``SimpleWorker``: RQ's default ``Worker`` forks a work horse for every job
  (isolation, hard time-outs); RQ's notes on performance name
  ``SimpleWorker``, which runs the job in the worker process, for jobs that
  last single-digit milliseconds and trusted code, which a no-op is. It is
  the lowest-latency worker RQ ships; with the forking one the comparison
  would measure ``fork()``. Two worker processes, as every system here has;
  an RQ worker runs one job at a time.
- Results: RQ stores each job's return value in a Redis stream
  (``rq:results:<id>``, ``result_ttl`` 600 s here) and
  ``job.latest_result(timeout=N)`` waits on it with a blocking ``XREAD``
  from the stream's start, so a result written before the call is found and
  nothing polls. ``timeout`` is whole seconds (60 here, a bound, never
  reached in a healthy run).
- The job is enqueued by its dotted name (``rq_peer.noop``), so the
  submitter (run as ``__main__``) and the workers agree on it; RQ's default
  pickle serializer.
- Durability: the job hash, the queue list, the registries and the result
  stream are all in the private Redis with AOF on. ``Retry(max=3)``, as
  Dramatiq's actor has ``max_retries=3``: besides retrying a failure, it is
  what makes RQ run a job again when its worker dies (the started-job
  registry's clean-up finds it abandoned once its time-out has passed and
  requeues it while retries are left; without it the job is marked failed).
  A no-op never uses it.
- The workers log at WARNING: RQ logs two INFO lines per job, which would
  be measured as its cost.

W1 and W2 are peer_workload.py's: W1 collects the results in order from a
second thread (each ``latest_result`` its own blocking XREAD); W2 waits for
each result in a pooled thread.

The Redis URL and queue name come from RQ_PEER_REDIS and RQ_PEER_NS, so the
workers and the submitter agree.
"""

from __future__ import annotations

import os
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.job import Job
from rq.results import Result

URL = os.environ.get("RQ_PEER_REDIS", "redis://127.0.0.1:6379/0")
NS = os.environ.get("RQ_PEER_NS", "rq-peer")
RESULT_TTL_S = 600
GET_TIMEOUT_S = 60


def noop(value: Any) -> Any:
    """The no-op task: returns its input (like loadtests/noop_agent.py)."""
    return value


queue = Queue(NS, connection=Redis.from_url(URL))


def send(value: dict[str, Any]) -> Job:
    """Enqueue one no-op job."""
    return queue.enqueue("rq_peer.noop", value, result_ttl=RESULT_TTL_S, retry=Retry(max=3))


def wait(job: Job) -> Any:
    """Block until the job's result is in its result stream."""
    result = job.latest_result(timeout=GET_TIMEOUT_S)
    if result is None:
        raise TimeoutError(f"rq: no result for job {job.id} in {GET_TIMEOUT_S} s")
    if result.type != Result.Type.SUCCESSFUL:
        raise RuntimeError(f"rq: job {job.id} ended {result.type.name}: {result.exc_string}")
    return result.return_value


if __name__ == "__main__":
    from peer_workload import main  # loadtests/ is on sys.path (run as a script)

    main("rq", send, wait, __doc__)

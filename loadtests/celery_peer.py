"""Celery on Redis (broker and result backend), a peer that ``peer_bench.py`` compares.

One module, two roles:

- the app the Celery worker loads: ``peer_bench.py`` starts
  ``celery -A celery_peer worker --pool prefork --concurrency 2
  --without-gossip --without-mingle --without-heartbeat --loglevel WARNING``
  from ``loadtests/`` (one main process that talks to Redis and two pool
  processes that run the tasks);
- the submitter (``python loadtests/celery_peer.py --only w1|w2``), which runs
  bench.py's workloads (``peer_workload.py``, the same code for every peer)
  with Celery's own client API: ``task.apply_async`` and
  ``AsyncResult.get(timeout=...)``, and prints one JSON line like bench.py.

How it is configured, and why:

- Broker and result backend are both the private Redis (AOF on), the
  ``redis://`` transport and backend of ``celery[redis]``. The Redis result
  backend delivers a result by pub/sub: ``apply_async`` subscribes to the
  task's channel before it returns, ``get`` checks the stored result and
  then waits on the channel, so nothing polls (``get``'s ``interval`` is for
  polling backends only). Celery 5.7's Redis result consumer serializes its
  pub/sub reads with a lock (one thread waits on the socket and hands the
  messages to the others), so one backend is shared by the submitter's
  threads (``result_backend_thread_safe``) as Dramatiq's and RQ's are,
  rather than a backend and a pub/sub connection per thread.
- ``task_acks_late`` with ``task_reject_on_worker_lost``: the message is
  acknowledged after the task ran, and given back to the queue if the pool
  process running it dies, which is the at-least-once delivery agentmesh
  and Dramatiq give (Celery's default acknowledges before running; with
  acks_late alone a lost pool process still acknowledges). On Redis an
  unacknowledged message is restored after the visibility timeout (Celery's
  default, 1 h) when the whole worker is gone.
- ``--concurrency 2`` prefork: two processes run tasks, as every system here
  has; Celery's main process is counted in its CPU too.
- ``worker_prefetch_multiplier`` 64: Celery's optimizing guide asks for a
  large multiplier (64 or 128) when tasks are short and throughput or round
  trip latency matter, and for 1 only for long tasks; prefetched messages
  are unacknowledged, so none is lost by it.
- ``--without-gossip --without-mingle --without-heartbeat``: the worker's
  cluster events (state sync with other workers at start-up, gossip and
  heartbeat events over the broker), which a single worker does not need and
  which cost broker traffic; events (``-E``) stay off, Celery's default.
- ``--loglevel WARNING``: Celery logs one INFO line per task received and
  one per task succeeded, which would be measured as its cost.
- JSON serializer (the default), results expire after 600 s, the task has
  ``max_retries`` 3 for any exception (``autoretry_for``), as Dramatiq's
  actor does; a no-op never uses it.

W1 and W2 are peer_workload.py's: W1 collects the results in order from a
second thread, W2 waits for each result in a pooled thread.

The Redis URL and queue name come from CELERY_PEER_REDIS and CELERY_PEER_NS,
so the worker and the submitter agree.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.result import AsyncResult

URL = os.environ.get("CELERY_PEER_REDIS", "redis://127.0.0.1:6379/0")
NS = os.environ.get("CELERY_PEER_NS", "celery-peer")
RESULT_TTL_S = 600
GET_TIMEOUT_S = 60.0

app = Celery("celery_peer", broker=URL, backend=URL)
app.conf.update(
    task_default_queue=NS,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=64,
    result_expires=RESULT_TTL_S,
    result_backend_thread_safe=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="celery_peer.noop", autoretry_for=(Exception,), max_retries=3)
def noop(value: Any) -> Any:
    """The no-op task: returns its input (like loadtests/noop_agent.py)."""
    return value


def send(value: dict[str, Any]) -> AsyncResult:
    """Enqueue one no-op task."""
    return noop.apply_async((value,))


def wait(result: AsyncResult) -> Any:
    """Block until the task's result is published by the result backend."""
    return result.get(timeout=GET_TIMEOUT_S)


if __name__ == "__main__":
    from peer_workload import main  # loadtests/ is on sys.path (run as a script)

    main("celery", send, wait, __doc__)
